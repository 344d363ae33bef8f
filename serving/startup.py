"""Why vLLM failed to start, in one line, with the setting to change.

vLLM reports a failed start as a traceback in its own output, often behind a second one ("Engine
core initialization failed. See root cause above"). `diagnose` reads the tail of that output
and names the cause by class, with the adaptd key that changes it:

| class | what vLLM said (in substance) | key |
| --- | --- | --- |
| memory | the KV cache or the weights do not fit | serving.kv_cache_gib (CPU), serving.gpu_memory_utilization (GPU) |
| context | max_model_len above what the model or the cache allows | serving.max_model_len |
| flag | argparse refused a flag | serving.extra_args |
| model | no usable model at that path or id | model |
| architecture | the model's architecture is not supported | model |

Anything else is reported as vLLM's last error line, as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_ERROR_LINE = re.compile(r"\b(\w+(?:Error|Exception)): (.+)$")
_ARGPARSE = re.compile(r"error: (unrecognized arguments: .+|argument .+)$")
# pydantic's form: "ValidationError: 1 validation error for ModelConfig" then, indented,
# "Value error, <the message> [type=value_error, ...]"
_VALUE_ERROR = re.compile(r"^\s*Value error, (.+?)(?: \[type=.*)?$")
_WRAPPERS = ("See root cause above", "validation error for")

# (class, pattern on the text of vLLM's error lines, key to change, advice)
_CLASSES: tuple[tuple[str, re.Pattern[str], str, str], ...] = (
    (
        "context",
        re.compile(
            r"max_model_len|max_seq_len|max seq len|maximum number of tokens that can be stored in KV cache"
            r"|larger than the maximum model length",
            re.I,
        ),
        "serving.max_model_len",
        "lower serving.max_model_len (or give the KV cache more memory)",
    ),
    (
        "memory",
        re.compile(
            r"available memory|out of memory|not enough memory|no available memory"
            r"|insufficient memory|cannot allocate memory|kv cache allocation",
            re.I,
        ),
        "serving.kv_cache_gib",
        "give vLLM a size that fits (serving.kv_cache_gib on the CPU, "
        "serving.gpu_memory_utilization on a GPU) or free memory",
    ),
    (
        "architecture",
        re.compile(
            r"architectures? .*(not supported|are not supported)|cannot find model module"
            r"|unsupported model architecture",
            re.I,
        ),
        "model",
        "serve a model whose architecture vLLM supports",
    ),
    (
        "model",
        re.compile(
            r"config\.json|not a valid model|invalid repository id|no such file|"
            r"does not appear to have|can't load|could not find|is not a local folder|"
            r"unrecognized model|repo id must be",
            re.I,
        ),
        "model",
        "point model at a Hugging Face model folder (config.json, weights, tokenizer) or hub id",
    ),
)


@dataclass(frozen=True)
class Diagnosis:
    kind: str  # memory | context | flag | model | architecture | unknown
    detail: str  # vLLM's own words, trimmed
    key: str | None  # the adaptd setting to change

    def line(self) -> str:
        head = f"vLLM could not start ({self.kind}): {self.detail.rstrip('.')}"
        advice = {kind: advice for kind, _pat, _key, advice in _CLASSES}.get(self.kind)
        if self.kind == "flag":
            advice = "remove or fix the flag"
        if advice and self.key:
            return f"{head}. Change {self.key}: {advice}."
        return f"{head}. See the daemon's log for vLLM's output."


def _errors(lines: list[str]) -> list[str]:
    """vLLM's error messages in the tail, oldest first, without the log prefixes."""
    out = []
    for line in lines:
        m = _ARGPARSE.search(line)
        if m:
            out.append("argparse: " + m.group(1).strip())
            continue
        m = _VALUE_ERROR.search(line)
        if m:
            out.append("ValueError: " + m.group(1).strip())
            continue
        m = _ERROR_LINE.search(line)
        if m and not any(w in m.group(2) for w in _WRAPPERS):
            out.append(f"{m.group(1)}: {m.group(2).strip()}")
    return out


def diagnose(tail: Iterable[str], *, gpu: bool = False) -> Diagnosis:
    """The cause of a failed start from the last lines vLLM printed."""
    lines = list(tail)
    errors = _errors(lines)
    flags = [e for e in errors if e.startswith("argparse: ")]
    if flags:
        return Diagnosis("flag", flags[-1].removeprefix("argparse: "), "serving.extra_args")
    for error in reversed(errors):  # the root cause is usually the last error that is not a wrapper
        for kind, pattern, key, _advice in _CLASSES:
            if pattern.search(error):
                if kind == "memory" and gpu:
                    key = "serving.gpu_memory_utilization"
                return Diagnosis(kind, _trim(error), key)
    if errors:
        return Diagnosis("unknown", _trim(errors[-1]), None)
    last = next((s.strip() for s in reversed(lines) if s.strip()), "no output")
    return Diagnosis("unknown", _trim(last), None)


def _trim(text: str, limit: int = 400) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
