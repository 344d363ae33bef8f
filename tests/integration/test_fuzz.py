"""Fuzzing every route of the running session daemon from its own OpenAPI document, with
schemathesis: bodies that fit the document and bodies that break it, sent with the admin key,
the inference key and no key.

Every answer must come within `CALL_TIMEOUT_S` (no hang), none may be a 5xx other than a 503
`not_ready` / `store_busy` (the documented "retry" answers: a full write queue or a model server
coming back are back-pressure, not a crash; the last test checks that vLLM never restarted, so
a case that killed it still fails), every error is in OpenAI's shape, and every status, content
type and body is one the document declares.

Short by default (CI: about a thousand cases, under a minute); `ADAPTD_FUZZ_LONG=1` runs
about five thousand.

The daemon is shared with the other modules, so the cases must not change what it serves:
`POST /admin/cycles` is fuzzed only with keys that may not start a cycle; a rollback, promotion
or rejection never names a real version (a rollback with no version would go back to one, so
it is sent to `base`, which is already served); and the module ends with the `adaptd` alias on
the base model.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from conftest import ADMIN_KEY, INFERENCE_KEY, RunningDaemon, admin_headers, daemon_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import CheckFunction

pytestmark = pytest.mark.vllm

LONG = os.environ.get("ADAPTD_FUZZ_LONG") == "1"
# Most cases per route (a route without inputs has one), with the admin key and with each of
# the other two keys.
ADMIN_EXAMPLES, OTHER_EXAMPLES = (400, 60) if LONG else (100, 10)
CALL_TIMEOUT_S = 60.0  # a hang; a busy CPU can take tens of seconds on one case
RETRY_CODES = {"not_ready", "store_busy"}
INFERENCE_PATHS = {"/v1/chat/completions", "/v1/completions"}
KEYS = {"admin": ADMIN_KEY, "inference": INFERENCE_KEY, "none": None}
MAX_TOKENS = int(daemon_env()["ADAPTD_LIMITS__MAX_TOKENS"])
MAX_N = 8  # the default `limits.max_n`
SHORT_ANSWER = 4  # tokens: enough to reach vLLM, cheap on a busy CPU

# What each key's pass answered: (key, status) -> count.
SEEN: Counter[tuple[str, int]] = Counter()
VLLM_ANSWERS: Counter[str] = Counter()  # 200s from the inference routes, by key


@dataclass(frozen=True)
class Before:
    engine_pid: int | None
    engine_restarts: int
    versions: frozenset[str]


def admin_get(daemon: RunningDaemon, path: str) -> Any:
    r = httpx.get(daemon.url + path, headers=admin_headers(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def back_to_base(daemon: RunningDaemon) -> None:
    if admin_get(daemon, "/admin/status")["serving"]["version"] != "base":
        r = httpx.post(
            daemon.url + "/admin/rollback",
            json={"version": "base", "reason": "test_fuzz"},
            headers=admin_headers(),
            timeout=120,
        )
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def before(daemon: RunningDaemon) -> Iterator[Before]:
    """Serve the base model while fuzzing, note what must not change, and leave it on base."""
    back_to_base(daemon)
    status = admin_get(daemon, "/admin/status")
    versions = admin_get(daemon, "/admin/versions")["versions"]
    yield Before(
        engine_pid=status["engine"]["pid"],
        engine_restarts=status["engine"]["restarts"],
        versions=frozenset(v["name"] for v in versions),
    )
    back_to_base(daemon)


@pytest.fixture(scope="module")
def api_schema(daemon: RunningDaemon) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(daemon.url + "/openapi.json", timeout=60)
    schema.config.update(base_url=daemon.url)
    schema.config.output.sanitization.update(enabled=False)  # test keys: show them in repros
    return schema


CHECKS: list[CheckFunction] = [
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]
# Declarations daemon/http.py lacks: GET /metrics answers Prometheus text but is declared JSON
# (its decorator wants `response_class=PlainTextResponse`); until then, that check is skipped.
DOC_GAPS: dict[str, list[CheckFunction]] = {
    "GET /metrics": [schemathesis.checks.content_type_conformance],
}
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
# Most generated `model` names are unknown (404 before vLLM): two cases in three name one it
# serves instead, so that the fuzzed parameters reach vLLM (None: keep the generated name).
MODELS = ("adaptd", "base", None)


def keep_small(case: Case) -> None:
    """Short answers from vLLM: a case that asks for many tokens (within the limit) asks for a
    few; one over the limit is kept, the gateway refuses it without vLLM."""
    body = case.body
    if case.path not in INFERENCE_PATHS or not isinstance(body, dict):
        return
    for key, small, cap in (
        ("max_tokens", SHORT_ANSWER, MAX_TOKENS),
        ("max_completion_tokens", SHORT_ANSWER, MAX_TOKENS),
        ("n", 2, MAX_N),
        ("best_of", 2, MAX_N),
    ):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and small < value <= cap:
            body[key] = small
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = SHORT_ANSWER


def keep_state(case: Case, before: Before) -> None:
    """No case may change which version is served (see the module docstring)."""
    params = case.path_parameters or {}
    if "version" in params and params["version"] in before.versions:
        params["version"] = "no-such-version"
    if case.path == "/admin/rollback" and isinstance(case.body, dict):
        target = case.body.get("version")
        if target is None or (isinstance(target, str) and target in before.versions):
            case.body["version"] = "base"


def assert_error_shape(body: Any) -> None:
    """OpenAI's shape: {"error": {"message", "type", "param", "code"}}, code a string or null."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err


def check_answer(path: str, response: schemathesis.Response) -> None:
    """No 5xx but a 503 that says retry; every error, an error event in a stream included,
    in OpenAI's shape."""
    status = response.status_code
    media = (response.headers.get("content-type") or [""])[0]
    if status >= 400:
        if path.startswith("/reports") and status in (401, 403):
            assert media.startswith("text/html"), media  # the key form of a report page
            return
        assert media.startswith("application/json"), media
        body = orjson.loads(response.content)
        assert_error_shape(body)
        if status >= 500:
            assert status == 503 and body["error"]["code"] in RETRY_CODES, body
    elif media.startswith("text/event-stream"):
        for line in response.content.splitlines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    assert_error_shape(chunk)


def fuzz(case: Case, key: str, before: Before) -> None:
    keep_small(case)
    keep_state(case, before)
    headers = {"Authorization": f"Bearer {KEYS[key]}"} if KEYS[key] else {}
    curl = case.as_curl_command(headers=headers)
    t0 = time.monotonic()
    try:
        response = case.call(headers=headers, timeout=CALL_TIMEOUT_S)
    except Exception as e:  # a timeout (a hang) or a dropped connection (a crash)
        pytest.fail(f"{case.method} {case.formatted_path} ({key} key): no answer: {e!r}\n{curl}")
    SEEN[(key, response.status_code)] += 1
    if case.path in INFERENCE_PATHS and response.status_code == 200:
        VLLM_ANSWERS[key] += 1
    try:
        check_answer(case.path, response)
    except (AssertionError, ValueError) as e:
        took = time.monotonic() - t0
        raise AssertionError(
            f"{case.method} {case.formatted_path} ({key} key) -> {response.status_code} "
            f"in {took:.1f} s: {e}\n{response.text[:1000]}\n{curl}"
        ) from None
    gaps = DOC_GAPS.get(f"{case.method} {case.path}", [])
    case.validate_response(response, checks=[c for c in CHECKS if c not in gaps], headers=headers)


def fuzz_route(operation: APIOperation, key: str, examples: int, before: Before) -> None:
    """Bodies that fit the document and, where there is a body, bodies that break it."""
    modes = [GenerationMode.POSITIVE]
    if list(operation.body):
        modes.append(GenerationMode.NEGATIVE)
    cases = st.one_of(*(operation.as_strategy(generation_mode=m) for m in modes))

    @settings(FUZZ, max_examples=examples)
    @given(case=cases, model=st.sampled_from(MODELS))
    def run(case: Case, model: str | None) -> None:
        if model and case.path in INFERENCE_PATHS and isinstance(case.body, dict):
            case.body["model"] = model
        fuzz(case, key, before)

    run()


@pytest.mark.timeout(3600 if LONG else 600)
@pytest.mark.parametrize("key", list(KEYS))
def test_fuzz_every_route(
    key: str,
    api_schema: schemathesis.BaseSchema,
    before: Before,
    subtests: pytest.Subtests,
) -> None:
    examples = ADMIN_EXAMPLES if key == "admin" else OTHER_EXAMPLES
    operations = [op for path in api_schema for op in api_schema[path].values()]
    assert len(operations) >= 19, [op.label for op in operations]
    for operation in operations:
        if key == "admin" and operation.label == "POST /admin/cycles":
            continue  # it would start a real training cycle; other keys must be refused
        with subtests.test(msg=operation.label):
            fuzz_route(operation, key, examples, before)


def test_after_fuzzing_vllm_never_restarted_and_base_is_served(
    daemon: RunningDaemon, before: Before
) -> None:
    total = sum(SEEN.values())
    summary = ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(SEEN.items()))
    print(f"\nfuzzed {total} cases ({summary}); vLLM answered {dict(VLLM_ANSWERS)}")
    assert total > 0
    assert VLLM_ANSWERS["admin"] > 0, "no fuzzed case reached vLLM"
    assert httpx.get(daemon.url + "/readyz", timeout=10).status_code == 200
    status = admin_get(daemon, "/admin/status")
    assert status["engine"]["pid"] == before.engine_pid, "vLLM was restarted while fuzzing"
    assert status["engine"]["restarts"] == before.engine_restarts
    assert status["serving"]["version"] == "base"
