"""Adapter admission: what is checked on an adapter folder before vLLM ever sees it."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodel import make_random_adapter

from learners.lora import admission_problems


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_adapter(tiny_model, tmp_path_factory.mktemp("a") / "v0001")


def variant(adapter: Path, tmp_path: Path, change: Callable[[Path], None]) -> Path:
    out = tmp_path / "v0002"
    shutil.copytree(adapter, out)
    (out / "README.md").unlink(missing_ok=True)
    change(out)
    return out


def edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        t = load_file(str(d / "adapter_model.safetensors"))
        fn(t)
        save_file(t, str(d / "adapter_model.safetensors"))

    return change


def edit_config(**kw: object) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(kw)
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    return change


def first(t: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(t) if f"lora_{part}" in k)


def nan_in(t: dict[str, torch.Tensor]) -> None:
    t[first(t, "A")][0, 0] = math.nan


def wrong_a(t: dict[str, torch.Tensor]) -> None:
    k = first(t, "A")
    t[k] = torch.zeros(t[k].shape[0], t[k].shape[1] + 1)


def wrong_b(t: dict[str, torch.Tensor]) -> None:
    k = first(t, "B")
    t[k] = torch.zeros(t[k].shape[0] * 2, t[k].shape[1])


def stray(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 128)


def link_out(d: Path) -> None:
    (d / "state").mkdir()
    (d / "state" / "x.json").symlink_to("/etc/hostname")


def test_a_good_adapter_is_admitted(adapter: Path, tiny_model: Path) -> None:
    assert admission_problems(adapter, str(tiny_model), max_rank=8) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04"), "pickle-based"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda d: (d / "notes.txt").write_text("hi"), "unexpected file notes.txt"),
        (link_out, "links outside the folder"),
        (edit_config(r=64), "rank 64 exceeds"),
        (edit_config(peft_type="IA3"), "not a LoRA adapter"),
        (edit_config(target_modules=["q_proj", "qkv_fused"]), "['qkv_fused'] are not linear layers"),
        (edit_tensors(nan_in), "non-finite values in"),
        (edit_tensors(wrong_a), "expected [rank, 256]"),  # down_proj: intermediate 256
        (edit_tensors(wrong_b), "expected ["),
        (edit_tensors(stray), "matches no linear layer"),
    ],
    ids=["pickle", "missing", "extra-file", "symlink", "rank", "peft-type", "targets", "nan",
         "shape-A", "shape-B", "stray-tensor"],
)  # fmt: skip
def test_bad_adapters_are_refused_with_the_reason(
    adapter: Path, tiny_model: Path, tmp_path: Path, change: Callable[[Path], None], problem: str
) -> None:
    bad = variant(adapter, tmp_path, change)
    problems = admission_problems(bad, str(tiny_model), max_rank=8)
    assert any(problem in p for p in problems), problems
