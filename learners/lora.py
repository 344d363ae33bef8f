"""The one module that speaks PEFT: attach, warm-start, read and save LoRA adapters."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS


def load_model(
    base: str,
    *,
    settings: LoraSettings,
    warm_start: Path | None,
    dtype: torch.dtype,
    device: torch.device,
    gradient_checkpointing: bool,
    attention: str = "sdpa",
) -> Any:
    """The base model with a trainable LoRA adapter: a copy of ``warm_start``, or a fresh one."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=attention)
    model.to(device)  # type: ignore[arg-type]
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    if warm_start is not None:
        peft_model = PeftModel.from_pretrained(model, str(warm_start), is_trainable=True)
    else:
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            task_type="CAUSAL_LM",
            bias="none",
        )
        peft_model = get_peft_model(model, config)
    # LoRA weights train in float32 even when the base runs in bf16 (stable small updates).
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


def trainable(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's parameters by name (live tensors)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = trainable(model)
    missing = set(params) - set(state)
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} adapter tensors, e.g. {sorted(missing)[0]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))


def save_adapter(model: Any, out_dir: Path) -> list[str]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``; return the file names."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card: not part of a version
    return sorted(p.name for p in out_dir.iterdir())


def target_modules_of(model: Any) -> Sequence[str]:
    cfg = model.peft_config["default"]
    return sorted(cfg.target_modules)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_finite(adapter_dir: Path) -> tuple[bool, str]:
    """Whether every value of a saved adapter is finite, and which tensor is not.

    Reads the safetensors file only (never a pickle); nothing is loaded into a model.
    """
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return False, f"{path.name} is missing"
    bad = []
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_tensor(name)
            if not bool(torch.isfinite(t).all()):
                bad.append(name)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return False, f"non-finite values in {', '.join(bad[:3])}{more}"
    return True, "all finite"


def load_for_scoring(
    base: str, adapters: dict[str, str], *, dtype: torch.dtype, device: torch.device
) -> Any:
    """The base model with every named adapter attached (inference only)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    if not adapters:
        return model
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    peft_model.eval()
    return peft_model


def use_adapter(model: Any, name: str | None) -> Any:
    """A context in which ``model`` computes with adapter ``name`` (None: the base model)."""
    import contextlib

    if name is None:
        return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
    model.set_adapter(name)
    return contextlib.nullcontext()


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
_EXTRA_ALLOWED = {"manifest.json", "README.md"}


@functools.lru_cache(maxsize=4)
def _linear_shapes(base: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear layer of the base model, from its config
    alone: the model is built on the meta device, no weights are read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def admission_problems(adapter_dir: Path, base: str, *, max_rank: int | None = None) -> list[str]:
    """Everything wrong with an adapter folder before it goes anywhere near vLLM:

    * files: ``adapter_config.json`` and ``adapter_model.safetensors`` present, no pickle-based
      weight file anywhere (vLLM and PEFT would read ``adapter_model.bin``), no link that leads
      out of the folder; besides them only ``manifest.json`` and the ``state/`` folder;
    * config: LoRA, rank within ``max_rank``, target modules that exist in the base model;
    * tensors: every name maps to a linear layer of the base model, ``lora_A`` is
      ``[rank, in_features]`` and ``lora_B`` ``[out_features, rank]``, every value finite.
    An empty list means admitted.
    """
    import json

    from safetensors import safe_open

    problems: list[str] = []
    root = adapter_dir.resolve()
    for p in adapter_dir.rglob("*"):
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            problems.append(f"{p.relative_to(adapter_dir)} links outside the folder")
        if p.suffix.lower() in _PICKLE_SUFFIXES:
            problems.append(f"{p.relative_to(adapter_dir)} is a pickle-based file; refused")
    for p in adapter_dir.iterdir():
        if p.is_file() and p.name not in (*ADAPTER_FILES, *_EXTRA_ALLOWED):
            problems.append(f"unexpected file {p.name}")
        elif p.is_dir() and p.name != "state":
            problems.append(f"unexpected folder {p.name}/")
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            problems.append(f"{name} is missing")
    if problems:
        return problems

    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        return [f"adapter_config.json is unreadable: {e}"]
    if cfg.get("peft_type", "LORA") != "LORA":
        return [f"not a LoRA adapter (peft_type {cfg.get('peft_type')!r})"]
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        return [f"rank {rank!r} is not a positive integer"]
    ranks = [rank, *(cfg.get("rank_pattern") or {}).values()]
    if max_rank is not None and max(ranks) > max_rank:
        problems.append(f"rank {max(ranks)} exceeds the server's max_lora_rank {max_rank}")

    shapes = _linear_shapes(base)
    leaves = {n.rsplit(".", 1)[-1] for n in shapes}
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    missing = [t for t in targets if t not in leaves and t != "all-linear"]
    if missing:
        problems.append(f"target modules {missing} are not linear layers of the base model")

    bad_values: list[str] = []
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            module, sep, part = key.partition(".lora_")
            name = module.removeprefix("base_model.model.")
            if not sep or name not in shapes:
                problems.append(f"tensor {key} matches no linear layer of the base model")
                continue
            fan_in, fan_out = shapes[name]
            shape = tuple(f.get_slice(key).get_shape())
            if part.startswith("A") and (len(shape) != 2 or shape[1] != fan_in):
                problems.append(f"{key} has shape {list(shape)}; expected [rank, {fan_in}]")
            if part.startswith("B") and (len(shape) != 2 or shape[0] != fan_out):
                problems.append(f"{key} has shape {list(shape)}; expected [{fan_out}, rank]")
            if not bool(torch.isfinite(f.get_tensor(key)).all()):
                bad_values.append(key)
    if bad_values:
        more = f" and {len(bad_values) - 3} more" if len(bad_values) > 3 else ""
        problems.append(f"non-finite values in {', '.join(bad_values[:3])}{more}")
    return problems
