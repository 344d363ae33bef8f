"""The gateway's request limits (`serving.gateway.validate`): one over each cap is a 400
`limit_exceeded` naming the parameter; exactly at the cap passes. The whole daemon answers these
the same way (tests/integration/test_gateway_vllm.py, test_abuse.py)."""

from __future__ import annotations

from typing import Any

import pytest

from serving.gateway import LimitExceeded, Limits, validate

LIMITS = Limits(max_tokens=64, max_n=4, max_prompt_chars=100, max_messages=5)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "adaptd", "messages": [{"role": "user", "content": "hi"}], **extra}


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "adaptd", "prompt": "hi", **extra}


def messages(n: int, chars: int = 1) -> list[dict[str, str]]:
    return [{"role": "user", "content": "x" * chars} for _ in range(n)]


# (case, endpoint, body at the cap, body over it, the parameter named)
CASES = [
    ("max_tokens", "chat", chat(max_tokens=64), chat(max_tokens=65), "max_tokens"),
    (
        "max_completion_tokens",
        "chat",
        chat(max_completion_tokens=64),
        chat(max_completion_tokens=65),
        "max_completion_tokens",
    ),
    ("n", "chat", chat(n=4), chat(n=5), "n"),
    ("best_of", "completion", completion(best_of=4), completion(best_of=5), "best_of"),
    ("messages", "chat", chat(messages=messages(5)), chat(messages=messages(6)), "messages"),
    (
        "chat prompt characters, over several messages",
        "chat",
        chat(messages=messages(4, 25)),
        chat(messages=[*messages(4, 25), {"role": "user", "content": "x"}]),
        "messages",
    ),
    (
        "chat prompt characters, in content parts",
        "chat",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 100}]}]),
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 101}]}]),
        "messages",
    ),
    (
        "completion prompt",
        "completion",
        completion(prompt="x" * 100),
        completion(prompt="x" * 101),
        "prompt",
    ),
    (
        "completion prompt list",
        "completion",
        completion(prompt=["x" * 50, "x" * 50]),
        completion(prompt=["x" * 50, "x" * 51]),
        "prompt",
    ),
]


@pytest.mark.parametrize(
    ("case", "endpoint", "at_cap", "over", "param"), CASES, ids=[c[0] for c in CASES]
)
def test_one_over_each_cap_is_refused_naming_the_parameter(
    case: str, endpoint: str, at_cap: dict[str, Any], over: dict[str, Any], param: str
) -> None:
    assert validate(at_cap, endpoint, LIMITS) is at_cap
    with pytest.raises(LimitExceeded) as e:
        validate(over, endpoint, LIMITS)
    assert (e.value.status, e.value.code, e.value.param) == (400, "limit_exceeded", param)
    assert "at most" in str(e.value)
