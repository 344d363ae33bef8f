"""The one module that speaks PEFT: attach, warm-start, read and save LoRA adapters."""

from __future__ import annotations

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
