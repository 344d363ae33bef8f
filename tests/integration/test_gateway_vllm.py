"""The gateway against the real daemon and its real vLLM child (tiny model, CPU).

The official `openai` client talks to the gateway; what it gets back is checked against the
rows in the real SQLite file.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import ADMIN_KEY, INFERENCE_KEY, RunningDaemon

pytestmark = pytest.mark.vllm

CHAT = {
    "model": "adaptd",
    "messages": [{"role": "user", "content": "Hello there"}],
    "max_tokens": 6,
}


def rows(daemon: RunningDaemon, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(daemon.data_dir / "adaptd.db") as conn:
        return conn.execute(sql, args).fetchall()


def interaction(daemon: RunningDaemon, iid: str, timeout: float = 10.0) -> dict[str, Any]:
    """The stored row of an interaction (the log is written off the request path)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(daemon.data_dir / "adaptd.db") as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM interactions WHERE id = ?", [iid]).fetchone()
        if row is not None:
            return dict(row)
        time.sleep(0.05)
    raise AssertionError(f"interaction {iid} was not logged")


def snapshot(daemon: RunningDaemon) -> tuple[int, int]:
    return (
        rows(daemon, "SELECT COUNT(*) FROM interactions")[0][0],
        rows(daemon, "SELECT COUNT(*) FROM feedback")[0][0],
    )


@pytest.fixture()
def oai(daemon: RunningDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=INFERENCE_KEY, max_retries=0)


# -- the OpenAI routes ------------------------------------------------------------------
def test_chat_with_the_official_client_links_id_headers_and_row(
    oai: openai.OpenAI, daemon: RunningDaemon
) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="adaptd", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8, temperature=0,
    )  # fmt: skip
    resp = raw.parse()
    iid = raw.headers["x-adaptd-interaction-id"]
    assert resp.id == iid and iid.startswith("chatcmpl-")
    assert raw.headers["x-adaptd-version"] == "base"
    assert resp.model == "adaptd"
    assert (
        resp.usage is not None and resp.usage.completion_tokens == len(resp.choices) * 8
    ) or resp.choices[0].finish_reason == "stop"
    row = interaction(daemon, iid)
    assert row["endpoint"] == "chat" and row["status"] == "ok" and row["stream"] == 0
    assert row["output"] == resp.choices[0].message.content
    assert row["finish_reason"] == resp.choices[0].finish_reason
    assert row["prompt_tokens"] == resp.usage.prompt_tokens
    assert row["completion_tokens"] == resp.usage.completion_tokens
    assert "France" in row["request"] and '"temperature": 0' in row["params"]
    assert row["version"] == "base" and row["model"] == "adaptd"
    assert row["caller"].startswith("key-") and row["latency_ms"] > 0


def test_streaming_passes_tokens_through_and_logs_the_whole_answer(
    oai: openai.OpenAI, daemon: RunningDaemon
) -> None:
    stream = oai.chat.completions.create(
        model="adaptd", messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=12, temperature=0, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    (iid,) = ids
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert all(c.usage is None for c in chunks)  # we asked vLLM for usage, not the client
    row = interaction(daemon, iid)
    assert row["stream"] == 1 and row["status"] == "ok"
    assert row["output"] == text
    assert row["completion_tokens"] == 12 or row["finish_reason"] == "stop"


def test_streaming_with_usage_requested_keeps_the_usage_chunk(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens <= 4


def test_greedy_stream_equals_greedy_plain(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model="base", messages=[{"role": "user", "content": "Once"}], max_tokens=10, temperature=0
    )
    plain = oai.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(stream=True, **kw)
        if c.choices
    )
    assert plain == streamed


def test_completions_plain_and_streaming(oai: openai.OpenAI, daemon: RunningDaemon) -> None:
    raw = oai.completions.with_raw_response.create(
        model="base", prompt="The capital of", max_tokens=5
    )
    resp = raw.parse()
    assert resp.id == raw.headers["x-adaptd-interaction-id"] and resp.id.startswith("cmpl-")
    row = interaction(daemon, resp.id)
    assert row["endpoint"] == "completion" and row["output"] == resp.choices[0].text
    chunks = list(oai.completions.create(model="base", prompt="One two", max_tokens=5, stream=True))
    assert len({c.id for c in chunks}) == 1
    assert interaction(daemon, chunks[0].id)["stream"] == 1


def test_models_lists_aliases(oai: openai.OpenAI) -> None:
    assert {m.id for m in oai.models.list()} >= {"adaptd", "base"}


def test_version_name_needs_admin_key_and_serves_the_adapter(
    daemon: RunningDaemon, tiny_model: Path, tmp_path: Path, oai: openai.OpenAI
) -> None:
    from tinymodel import make_random_adapter

    name = "v-test-0001"
    make_random_adapter(tiny_model, daemon.data_dir / "adapters" / name, rank=8, seed=3)
    with sqlite3.connect(daemon.data_dir / "adaptd.db") as conn:
        conn.execute(
            "INSERT INTO adapter_versions (name, created_at, parent, path, sha256, manifest) VALUES (?, ?, NULL, ?, '', '{}')",
            [name, time.time(), f"adapters/{name}"],
        )
    msgs = [{"role": "user", "content": "What is the capital of Peru?"}]
    with pytest.raises(openai.PermissionDeniedError):
        oai.chat.completions.create(model=name, messages=msgs, max_tokens=8)  # type: ignore[arg-type]
    admin = openai.OpenAI(base_url=daemon.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    raw = admin.chat.completions.with_raw_response.create(
        model=name, messages=msgs, max_tokens=8, temperature=0
    )  # type: ignore[arg-type]
    assert raw.headers["x-adaptd-version"] == name
    adapted = raw.parse().choices[0].message.content
    base = (
        admin.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
    )  # type: ignore[arg-type]
    assert adapted != base  # the adapter is really applied
    assert name in {m.id for m in admin.models.list()}
    assert name not in {m.id for m in oai.models.list()}


# -- feedback ------------------------------------------------------------------------------
def test_feedback_links_to_the_interaction(client: httpx.Client, daemon: RunningDaemon) -> None:
    iid = client.post("/v1/chat/completions", json=CHAT).json()["id"]
    r = client.post(
        "/v1/feedback",
        json={
            "interaction_id": iid,
            "rating": -1,
            "correction": "Hi!",
            "comment": "too odd",
            "user": "u1",
            "tags": ["greeting"],
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["interaction_id"] == iid
    (row,) = rows(
        daemon,
        "SELECT interaction_id, rating, correction, comment, user, tags FROM feedback WHERE id = ?",
        body["id"],
    )
    assert row == (iid, -1, "Hi!", "too odd", "u1", '["greeting"]')


def test_feedback_on_a_conversation_served_elsewhere(
    client: httpx.Client, daemon: RunningDaemon
) -> None:
    r = client.post(
        "/v1/feedback",
        json={
            "messages": [{"role": "user", "content": "2+2?"}],
            "response": "5",
            "correction": "4",
        },
    )
    assert r.status_code == 201, r.text
    iid = r.json()["interaction_id"]
    row = interaction(daemon, iid)
    assert row["endpoint"] == "external" and row["output"] == "5"


def test_feedback_batch_is_all_or_nothing(client: httpx.Client, daemon: RunningDaemon) -> None:
    iid = client.post("/v1/chat/completions", json=CHAT).json()["id"]
    interaction(daemon, iid)
    before = snapshot(daemon)
    bad = {
        "items": [
            {"interaction_id": iid, "rating": 1},
            {"interaction_id": "chatcmpl-unknown", "rating": 1},
        ]
    }
    r = client.post("/v1/feedback/batch", json=bad)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_interaction"
    assert snapshot(daemon) == before
    bad_shape = {
        "items": [{"interaction_id": iid, "rating": 1}, {"interaction_id": iid, "rating": 7}]
    }
    r = client.post("/v1/feedback/batch", json=bad_shape)
    assert r.status_code == 422 and "items[1]" in r.json()["error"]["message"]
    assert snapshot(daemon) == before
    good = {
        "items": [{"interaction_id": iid, "rating": 1}, {"interaction_id": iid, "comment": "fine"}]
    }
    r = client.post("/v1/feedback/batch", json=good)
    assert r.status_code == 201 and len(r.json()["items"]) == 2
    assert snapshot(daemon)[1] == before[1] + 2


# -- auth on every route class --------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "inference_ok"),
    [
        ("POST", "/v1/chat/completions", True),
        ("POST", "/v1/completions", True),
        ("GET", "/v1/models", True),
        ("POST", "/v1/feedback", True),
        ("POST", "/v1/feedback/batch", True),
        ("GET", "/admin/status", False),
        ("GET", "/admin/versions", False),
    ],
)
def test_auth(daemon: RunningDaemon, method: str, path: str, inference_ok: bool) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.request(method, daemon.url + path, headers=headers, json={}, timeout=30)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.request(
        method,
        daemon.url + path,
        headers={"Authorization": f"Bearer {INFERENCE_KEY}"},
        json={},
        timeout=30,
    )
    if inference_ok:
        assert r.status_code not in (401, 403)
    else:
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    r = httpx.request(
        method,
        daemon.url + path,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={},
        timeout=30,
    )
    assert r.status_code not in (401, 403)


def test_open_routes_need_no_key(daemon: RunningDaemon) -> None:
    assert httpx.get(daemon.url + "/healthz").status_code == 200
    assert httpx.get(daemon.url + "/readyz").json()["ready"] is True
    metrics = httpx.get(daemon.url + "/metrics").text
    assert "adaptd_requests_total" in metrics and "adaptd_interaction_log_dropped_total" in metrics


def test_vllm_control_endpoints_are_not_reachable(client: httpx.Client) -> None:
    for path in (
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/sleep",
        "/wake_up",
        "/collective_rpc",
        "/reset_prefix_cache",
    ):
        r = client.post(path, json={"lora_name": "x", "lora_path": "/etc"})
        assert r.status_code in (404, 405), path


# -- bad input: the status, the error shape, and nothing stored changed -----------------------
BAD_INPUTS = [
    ("malformed JSON (chat)", "/v1/chat/completions", b'{"model": "adaptd", "messages": [', 400),
    ("malformed JSON (feedback)", "/v1/feedback", b'{"rating": ', 422),
    ("wrong type: rating", "/v1/feedback", {"interaction_id": "x", "rating": "1"}, 422),
    ("wrong type: messages", "/v1/chat/completions", {"model": "adaptd", "messages": "hi"}, 400),
    ("wrong type: max_tokens", "/v1/chat/completions", {**CHAT, "max_tokens": "9"}, 400),
    ("missing fields: feedback", "/v1/feedback", {"comment": "no target"}, 422),
    ("missing fields: no rating/correction/comment", "/v1/feedback", {"interaction_id": "x"}, 422),
    (
        "missing fields: model",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}]},
        400,
    ),
    ("unknown field in feedback", "/v1/feedback", {"interaction_id": "x", "raiting": 1}, 422),
    (
        "oversized body",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]},
        413,
    ),
    ("oversized feedback", "/v1/feedback", {"interaction_id": "x", "comment": "y" * 70_000}, 413),
    ("unknown interaction", "/v1/feedback", {"interaction_id": "chatcmpl-nope", "rating": 1}, 404),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404),
    ("max_tokens over the cap", "/v1/chat/completions", {**CHAT, "max_tokens": 65}, 400),
    ("n over the cap", "/v1/chat/completions", {**CHAT, "n": 50}, 400),
    ("empty batch", "/v1/feedback/batch", {"items": []}, 422),
]


@pytest.mark.parametrize(
    ("case", "path", "body", "status"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input(
    client: httpx.Client, daemon: RunningDaemon, case: str, path: str, body: Any, status: int
) -> None:
    before = snapshot(daemon)
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    time.sleep(0.2)  # anything wrongly queued would have been written by now
    assert snapshot(daemon) == before


def test_prompt_longer_than_the_model_is_refused_by_vllm_in_openai_shape(
    client: httpx.Client,
) -> None:
    long = " ".join(["word"] * 2000)
    r = client.post(
        "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": long}]}
    )
    assert r.status_code == 400
    assert "error" in r.json() and r.json()["error"]["message"]
