"""`serving.startup.diagnose` on the lines vLLM 0.32 (CPU build) printed when it failed to start."""

from __future__ import annotations

from serving.startup import diagnose

MEMORY = [
    "(EngineCore pid=3374) ERROR 12-02 18:36:11 [core.py:1093] EngineCore failed to start.",
    "RuntimeError: Worker failed with error 'Available memory on node 0 (4.81/7.84 GiB) on kv cache "
    "allocation is less than requested memory for kv (-0.12/0.94 GiB). Reduce CPU memory used by "
    "other processes.', please check the stack trace above for the root cause",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
]
CONTEXT = [
    "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
    "  Value error, User-specified max_model_len (8192) is greater than the derived max_model_len "
    "(max_position_embeddings=2048.0 or model_max_length=None in model's config.json). "
    "[type=value_error, input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]",
    "    For further information visit https://errors.pydantic.dev/2.14/v/value_error",
]
MODEL = [
    "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
    "  Value error, Invalid repository ID or local directory specified: '/tmp/x'.",
    "Please verify the following requirements:",
]
FLAG = [
    "usage: api_server.py [-h] [--headless] ...",
    "api_server.py: error: unrecognized arguments: --no-such-flag",
]


def test_each_class_is_named_with_the_key_to_change() -> None:
    memory = diagnose(MEMORY)
    assert (memory.kind, memory.key) == ("memory", "serving.kv_cache_gib")
    assert "Available memory on node 0 (4.81/7.84 GiB)" in memory.line()
    assert "See root cause above" not in memory.line()  # the wrapper is not the cause
    assert diagnose(MEMORY, gpu=True).key == "serving.gpu_memory_utilization"
    context = diagnose(CONTEXT)
    assert (context.kind, context.key) == ("context", "serving.max_model_len")
    assert (
        "User-specified max_model_len (8192)" in context.line() and "[type=" not in context.line()
    )
    assert (diagnose(MODEL).kind, diagnose(MODEL).key) == ("model", "model")
    flag = diagnose(FLAG)
    assert (flag.kind, flag.key) == ("flag", "serving.extra_args")
    assert flag.line().endswith("Change serving.extra_args: remove or fix the flag.")


def test_an_unknown_failure_keeps_vllms_last_error() -> None:
    found = diagnose(["loading...", "OSError: [Errno 28] No space left on device"])
    assert found.kind == "unknown" and "No space left on device" in found.line()
    assert diagnose([]).detail == "no output"
