"""The vLLM command line the engine builds (no vLLM started here)."""

from __future__ import annotations

import argparse

from serving.engine import UPSTREAM_KEEPALIVE_S, EngineSettings, VllmEngine, vllm_command


def test_private_keys_never_read_as_flags() -> None:
    # A key like "-x3..." once made vLLM's argparse fail ("--api-key: expected at least one
    # argument") and the server never started.
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-key")
    parser.add_argument("--port")
    for _ in range(300):
        engine = VllmEngine(EngineSettings(model="m"))
        assert engine.settings is not None
        cmd = vllm_command(engine.settings, port=1234, api_key=engine.api_key)
        i = cmd.index("--api-key")
        args, _ = parser.parse_known_args(cmd[i : i + 2])
        assert args.api_key == engine.api_key


def test_command_carries_the_lora_and_memory_flags() -> None:
    cmd = vllm_command(
        EngineSettings(model="m", max_loras=3, max_lora_rank=16), port=9, api_key="k"
    )
    assert cmd[cmd.index("--max-loras") + 1] == "3"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16"
    assert "--enable-lora" in cmd and cmd[cmd.index("--served-model-name") + 1] == "base"


def test_pools_to_vllm_drop_idle_connections_before_vllm_closes_them() -> None:
    """A pooled connection kept past vLLM's keep-alive can carry a request into a socket the
    server is closing (a promotion's probe failed so, with "Can not write request body")."""
    import vllm.envs

    assert UPSTREAM_KEEPALIVE_S < vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE
