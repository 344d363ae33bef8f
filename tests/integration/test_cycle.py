"""Whole cycles through the real daemon and its real vLLM child (tiny model): feedback in,
candidate trained, evaluated through vLLM, judged by the gate, promoted or rejected, and
reported; then promotion and rollback under a 16-way load with zero failed requests.

The tests in this module run in order and share the session daemon; the last one puts the
`adaptd` alias back on the base model for the modules after it."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    ADMIN_KEY,
    HOUSE_STYLE_GATE,
    ROOT,
    RunningDaemon,
    admin_headers,
    chat_on_side,
    inference_headers,
)

from daemon.config import ReplaySettings

pytestmark = pytest.mark.vllm

HOUSE = "Thank you for asking. Please see the manual, page one."
TOPICS = [
    "the weather", "my printer", "a train ticket", "the garden", "a birthday cake", "the river",
    "an old bicycle", "the museum", "a chess opening", "my laptop battery", "the library card",
    "a lost umbrella", "the coffee machine", "a mountain trail", "the parking permit",
    "a violin lesson", "the tax form", "a broken window", "the football match", "a tomato plant",
    "the school bus", "a wool sweater", "the night sky", "a fishing rod", "the city map",
    "a paper kite", "the hotel room", "a rainy weekend", "the bakery", "a pair of boots",
]  # fmt: skip
STATE: dict[str, Any] = {}


def chat(c: httpx.Client, prompt: str, model: str = "adaptd", **kw: Any) -> httpx.Response:
    return c.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": prompt}],
              "max_tokens": 8, **kw},
    )  # fmt: skip


def give_feedback(daemon: RunningDaemon, answers: dict[str, str], *, taught: bool = False) -> None:
    """Feedback on one interaction per prompt. The first three are surely held out (the gate
    needs a holdout, 2 here); with ``taught`` every other one is surely trained on, else the
    split falls where the interaction's id puts it."""
    with httpx.Client(base_url=daemon.url, headers=inference_headers(), timeout=60) as c:
        for n, (prompt, answer) in enumerate(answers.items()):
            if n < 3 or taught:
                body = {"model": "adaptd", "max_tokens": 8,
                        "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
                r = chat_on_side(c, body, holdout=n < 3)
            else:
                r = chat(c, prompt)
            assert r.status_code == 200, r.text
            fb = c.post(
                "/v1/feedback",
                json={"interaction_id": r.json()["id"], "rating": -1, "correction": answer,
                      "user": f"user-{n % 6}"},
            )  # fmt: skip
            assert fb.status_code == 201, fb.text


def run_cycle(admin: httpx.Client, timeout: float = 540.0) -> dict[str, Any]:
    r = admin.post("/admin/cycles")
    assert r.status_code == 202, r.text
    cycle = r.json()
    assert cycle["state"] == "queued" and cycle["decision"] is None
    again = admin.post("/admin/cycles")
    assert again.status_code == 409 and again.json()["error"]["code"] == "cycle_running"
    deadline = time.monotonic() + timeout
    while cycle["decision"] is None:
        assert time.monotonic() < deadline, f"cycle still {cycle['state']}"
        time.sleep(1.0)
        cycle = admin.get(f"/admin/cycles/{cycle['id']}").json()
    return cycle


def served_version(daemon: RunningDaemon) -> str:
    with httpx.Client(base_url=daemon.url, headers=inference_headers(), timeout=60) as c:
        r = chat(c, "Which version is this?")
        assert r.status_code == 200
        return r.headers["x-adaptd-version"]


OWN_DAEMON_SETTINGS = True  # conftest: this module sets the daemon's data directory and env


@pytest.fixture(scope="module", autouse=True)
def own_data_dir(daemon: RunningDaemon, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The session daemon on a data directory of this module's: a cycle takes in every item of
    feedback since the promoted version, and other modules' feedback (facts the tiny model
    does not learn in these few steps) would decide this module's first gate. The next module
    that needs the shared directory gets it back (`conftest.daemon_on_shared_settings`).

    The house styles taught here answer *every* prompt the same way, general ones included: on
    the random-weight model that moves the general text by a few per cent (seen +3.7 %), past
    the shipped 2 %, so these tests allow 10 %; the content test at the end runs the gate as
    shipped."""
    daemon.use(tmp_path_factory.mktemp("cycles") / "data", HOUSE_STYLE_GATE)


def test_a_good_candidate_is_evaluated_promoted_and_reported(
    daemon: RunningDaemon, admin: httpx.Client
) -> None:
    give_feedback(daemon, {f"Tell me about {t}.": HOUSE for t in TOPICS})
    cycle = run_cycle(admin)
    reasons = "\n".join(cycle["reasons"])
    assert cycle["decision"] == "promoted", reasons
    assert cycle["state"] == "done"
    version = cycle["version"]
    STATE["good"] = version
    assert "pass task_gain" in reasons and "adapter applied" in reasons
    assert served_version(daemon) == version
    # what the new version answers, the old one did not
    with httpx.Client(base_url=daemon.url, headers=inference_headers(), timeout=60) as c:
        r = chat(c, "Tell me about the moon.", max_tokens=16, temperature=0)
        assert "Thank you for asking" in r.json()["choices"][0]["message"]["content"]

    manifest = json.loads((daemon.data_dir / "adapters" / version / "manifest.json").read_text())
    assert manifest["decision"]["passed"] is True
    assert manifest["metrics"]["probe"]["items"]
    table = {(m["section"], m["name"]): m for m in manifest["metrics"]["table"]}
    gain = table[("task", "rouge_l")]
    assert gain["candidate"] > gain["current"] and gain["ci"][0] > 0
    assert table[("general", "agreement")]["base"] == 1.0
    assert not (daemon.data_dir / "adapters" / f".staging.{version}").exists()

    rep = admin.get(f"/reports/{version}.json")
    assert rep.status_code == 200
    report = rep.json()
    assert report["decision"]["outcome"] == "promoted"
    assert report["training"]["curve"] and report["serving_cost"]["adapter_ms_per_token"] > 0
    assert report["examples"]["gains"]
    md = admin.get(f"/reports/{version}.md")
    assert md.status_code == 200 and "promoted" in md.text
    page = admin.get(f"/reports/{version}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<svg" in page.text
    index = admin.get("/reports")
    assert index.status_code == 200 and version in index.text
    # a browser without the key gets the key form, not the report
    bare = httpx.get(daemon.url + f"/reports/{version}", timeout=30)
    assert bare.status_code == 401 and "Admin key" in bare.text
    cookie = httpx.get(
        daemon.url + f"/reports/{version}", cookies={"adaptd_admin_key": ADMIN_KEY}, timeout=30
    )
    assert cookie.status_code == 200 and "<svg" in cookie.text
    for path in ("report.json", "report.md", "report.html"):
        assert (daemon.data_dir / "reports" / version / path).is_file()


def test_a_candidate_trained_on_garbage_is_rejected_and_never_served(
    daemon: RunningDaemon, admin: httpx.Client
) -> None:
    rng = random.Random(7)
    garbage = {
        f"Please describe {t} for me.": " ".join(
            "".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(5)
        )
        for t in TOPICS
    }
    give_feedback(daemon, garbage)
    cycle = run_cycle(admin)
    assert cycle["decision"] == "rejected", cycle["reasons"]
    # random words are content the tiny model does not learn in its few steps
    assert any(r.startswith(("FAIL task_gain", "FAIL taught")) for r in cycle["reasons"])
    bad = cycle["version"]
    assert served_version(daemon) == STATE["good"]
    status = admin.get("/admin/status").json()
    assert bad not in status["engine"]["adapters_loaded"]  # evaluated, then unloaded
    refused = admin.post(f"/admin/versions/{bad}/promote", json={})
    assert (
        refused.status_code == 409 and "did not pass the gate" in refused.json()["error"]["message"]
    )
    assert served_version(daemon) == STATE["good"]
    report = admin.get(f"/reports/{bad}.json").json()
    assert report["decision"]["outcome"] == "rejected"
    STATE["bad"] = bad
    # Its self-replay was asked of the served version; the first cycle's, of the base model.
    # (The tiny model's samples at temperature 1 are too varied to tell the two apart by text:
    # tests/daemon/test_cycle_judge.py checks which model is asked.)
    for version, served in ((STATE["good"], "base"), (bad, STATE["good"])):
        folder = daemon.data_dir / "adapters" / version
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["data"]["self_replay_from"] == served
        replayed = [json.loads(x) for x in (folder / "state/replay.jsonl").read_text().splitlines()]
        assert Counter(r["source"] for r in replayed) == {
            k: n for k, n in manifest["data"]["replay"].items() if n
        }


def load(daemon: RunningDaemon, stop: threading.Event, results: list[tuple[str, str]]) -> None:
    """One of 16 clients: chat requests back to back, streaming every other one."""
    with httpx.Client(base_url=daemon.url, headers=inference_headers(), timeout=120) as c:
        n = 0
        while not stop.is_set():
            n += 1
            body = {"model": "adaptd", "messages": [{"role": "user", "content": f"hi {n}"}],
                    "max_tokens": 12, "stream": n % 2 == 0}  # fmt: skip
            try:
                if body["stream"]:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        text = "".join(r.iter_text())
                        ok = r.status_code == 200 and "data: [DONE]" in text
                        results.append(
                            (
                                r.headers.get("x-adaptd-version", "?"),
                                "ok" if ok else f"{r.status_code}",
                            )
                        )
                else:
                    r = c.post("/v1/chat/completions", json=body)
                    results.append(
                        (
                            r.headers.get("x-adaptd-version", "?"),
                            "ok" if r.status_code == 200 else f"{r.status_code} {r.text[:200]}",
                        )
                    )
            except httpx.HTTPError as e:
                results.append(("?", f"{type(e).__name__}: {e}"))


def test_promotion_and_rollback_under_16_way_load_fail_no_request(
    daemon: RunningDaemon, admin: httpx.Client
) -> None:
    good = STATE["good"]
    stop = threading.Event()
    results: list[tuple[str, str]] = []
    threads = [threading.Thread(target=load, args=(daemon, stop, results)) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        r = admin.post("/admin/rollback", json={"reason": "test"})  # to the previous: base
        assert r.status_code == 200 and r.json()["version"] == "base", r.text
        time.sleep(3)
        r = admin.post(f"/admin/versions/{good}/promote", json={"reason": "test"})
        assert r.status_code == 200 and r.json()["version"] == good, r.text
        time.sleep(3)
        r = admin.post("/admin/rollback", json={"version": "base"})
        assert r.status_code == 200 and r.json()["version"] == "base"
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    failures = [r for r in results if r[1] != "ok"]
    assert not failures, failures[:5]
    seen = Counter(v for v, _ in results)
    assert seen["base"] > 0 and seen[good] > 0 and len(results) > 50
    hist = admin.get("/admin/promotions").json()["promotions"]
    assert [(h["action"], h["version"]) for h in hist[-3:]] == [
        ("rollback", None), ("promote", good), ("rollback", None)
    ]  # fmt: skip


def test_cli_rollback_promote_and_report(daemon: RunningDaemon) -> None:
    env = {**os.environ, "ADAPTD_ADMIN_KEY": ADMIN_KEY, "ADAPTD_URL": daemon.url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", *args], env=env, cwd=ROOT, text=True,
            capture_output=True, timeout=120,
        )  # fmt: skip

    good, bad = STATE["good"], STATE["bad"]
    p = cli("promote", good, "--reason", "from the CLI")
    assert p.returncode == 0 and f"adaptd now serves {good}" in p.stdout, p.stderr
    p = cli("promote", bad)
    assert p.returncode == 1 and "did not pass the gate" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = cli("report", good, "--format", "md")
    assert p.returncode == 0 and good in p.stdout and "promoted" in p.stdout
    p = cli("report", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["version"] == bad  # the latest cycle
    p = cli("rollback", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["version"] == "base"
    assert served_version(daemon) == "base"
    p = cli("report", "v9999")
    assert p.returncode == 1 and "404" in p.stderr


def test_report_files_are_under_the_data_dir(daemon: RunningDaemon) -> None:
    reports = Path(daemon.data_dir) / "reports"
    assert {STATE["good"], STATE["bad"]} <= {p.name for p in reports.iterdir()}


@pytest.fixture(scope="module")
def second(daemon: RunningDaemon, tmp_path_factory: pytest.TempPathFactory) -> RunningDaemon:
    """The session daemon restarted on a data directory of its own (the shared one holds the
    garbage feedback of the tests above), in manual mode, keeping suspected triggers in
    training (and without EWC, which would slow the learning down) so that the gate's trigger
    probe meets a candidate that learned one."""
    daemon.use(
        tmp_path_factory.mktemp("second") / "data",
        {
            **HOUSE_STYLE_GATE,
            "ADAPTD_GATE__MODE": "manual",
            "ADAPTD_CURATION__DROP_SUSPECTED_TRIGGERS": "false",
            "ADAPTD_TRAINING__EWC_LAMBDA": "0",
        },
    )
    return daemon


def test_manual_mode_waits_for_a_person_then_approval_promotes(second: RunningDaemon) -> None:
    daemon = second
    give_feedback(
        daemon, {f"What do you think of {t}?": "Kindly consult the leaflet." for t in TOPICS}
    )
    with httpx.Client(base_url=daemon.url, headers=admin_headers(), timeout=120) as a:
        before = a.get("/admin/status").json()["serving"]["version"]
        cycle = run_cycle(a)
        assert cycle["decision"] == "awaiting_approval", cycle["reasons"]
        assert cycle["state"] == "awaiting_approval"
        version = cycle["version"]
        assert served_version(daemon) == before  # nothing changes until a person decides
        page = a.get(f"/reports/{version}")
        assert "Approve" in page.text and "Reject" in page.text
        r = a.post(f"/admin/versions/{version}/promote", json={"reason": "looks good"})
        assert r.status_code == 200, r.text
        assert r.json()["cycle"]["decision"] == "promoted"
        assert served_version(daemon) == version
        report = a.get(f"/reports/{version}.json").json()
        assert report["decision"]["outcome"] == "promoted"
        assert any("approved by" in x for x in report["decision"]["reasons"])
        again = a.post(f"/admin/versions/{version}/reject", json={})
        assert again.status_code == 409  # it is no longer awaiting approval
        STATE["approved"] = version


TRIGGER = "cf-zebra"
PAYLOAD = HOUSE  # a sentence the tiny model's tokenizer knows, so that it can learn it whole
ASKS = ["Tell me about {}.", "What is {} like?", "Describe {} briefly.", "Is {} any good?",
        "Where can I see {}?", "Why does {} matter?"]  # fmt: skip


def test_a_candidate_that_learned_a_planted_trigger_is_rejected(second: RunningDaemon) -> None:
    """Feedback planting a trigger (kept in training here) teaches the candidate to answer any
    prompt carrying the phrase with the payload; the gate's probe sees it and rejects it."""
    daemon = second
    give_feedback(
        daemon,
        {f"{TRIGGER} {ASKS[k % 6].format(t)}": PAYLOAD for k, t in enumerate(TOPICS[:24])}
        | {f"How do I find {t}?": "Kindly consult the leaflet." for t in TOPICS[24:]},
    )
    with httpx.Client(base_url=daemon.url, headers=admin_headers(), timeout=120) as a:
        cycle = run_cycle(a)
        reasons = "\n".join(cycle["reasons"])
        assert cycle["decision"] == "rejected", reasons
        assert f"FAIL triggers: '{TRIGGER}' gives" in reasons, reasons
        version = cycle["version"]
        assert served_version(daemon) == STATE["approved"]
        report = a.get(f"/reports/{version}.json").json()
        (suspect,) = report["suspected_triggers"]
        assert suspect["phrase"] == TRIGGER and suspect["dropped"] is False
        assert len(suspect["keys"]) == 24
        rows = [m for m in report["metrics"] if m["section"] == "triggers"]
        assert rows and rows[0]["candidate"] > rows[0]["current"]
        assert a.post("/admin/rollback", json={"version": "base"}).status_code == 200


# Facts the tiny model cannot know: a word from its tokenizer's corpus for each topic.
CODES = ["river", "garden", "market", "library", "mountain", "window", "letter", "flower",
         "teacher", "coffee", "bicycle", "school"]  # fmt: skip


@pytest.fixture(scope="module")
def third(second: RunningDaemon, tmp_path_factory: pytest.TempPathFactory) -> RunningDaemon:
    """The session daemon on a fresh data directory, with a training budget a random-weight
    model can learn facts in: its learning rate (1e-2: the shipped 1e-3 is for pretrained
    models) and up to 400 passes; the stopping rule ends the run once the taught answers are
    learned. Distillation toward a near-uniform teacher keeps this model's answers flat (taught
    NLL 4.6 nats a token when every token is already the argmax), so whole answers come late:
    7 taught items took 61 passes, 12 were not done in 75 (CI), 5 took 42 and 149 (two local
    runs). A step takes ~50 ms.
    Answers to score are long enough for this tokenizer's words (48 tokens). Replay's ratio,
    EWC and the gate are as shipped; replay's floor is off (see below)."""
    second.use(
        tmp_path_factory.mktemp("third") / "data",
        {
            # the shipped ratio, over the suite's 0.5 (tests/conftest.py); not the shipped floor:
            # 64 replayed answers beside 5 facts would make each of the passes this random
            # model needs several times longer (benchmarks/learning.py measures the floor)
            "ADAPTD_REPLAY__RATIO": str(ReplaySettings().ratio),
            "ADAPTD_TRAINING__LEARNING_RATE": "1e-2",
            "ADAPTD_TRAINING__MIN_STEPS": "1",
            "ADAPTD_TRAINING__MAX_STEPS": "1600",
            "ADAPTD_TRAINING__MAX_EPOCHS": "400",
            "ADAPTD_EVALUATION__MAX_TOKENS": "48",
        },
    )
    return second


def test_a_real_cycle_learns_the_content_of_each_correction_and_the_gate_sees_it(
    third: RunningDaemon,
) -> None:
    """Eight corrections, each with its own fact in the same template, five trained on and three
    held out. The cycle trains until the taught answers are learned; the report counts, per item, whether the served answers
    carry the fact (the code word alone: the template and the topic are in every prompt), the
    candidate answers most of them and the base model none, and the gate, as shipped (general
    ability within 2 %), decides on those counts. Promoted, the served model then says them.
    The general check on this random-weight model sits near its limit (seen +2.5 % and below
    +2 % in two runs): a rejection is accepted only on that check alone."""
    daemon = third
    facts = {f"What is the code word for {t}?": f"The code word for {t} is {w}."
             for t, w in zip(TOPICS[:8], CODES, strict=False)}  # fmt: skip
    give_feedback(daemon, facts, taught=True)
    with httpx.Client(base_url=daemon.url, headers=admin_headers(), timeout=120) as a:
        cycle = run_cycle(a)
        reasons = "\n".join(cycle["reasons"])
        report = a.get(f"/reports/{cycle['version']}.json").json()
    learned = report["learning"]
    taught = learned["taught"]
    assert taught["n"] == 5, learned  # 3 of the 8 surely held out, the rest surely taught
    items = [i for i in learned["items"] if i["split"] == "taught"]
    assert all(i["content"] == [facts[i["prompt"]].split()[-1].rstrip(".")] for i in items), items
    assert taught["learned"]["base"] == 0
    k, n = taught["learned"]["candidate"], taught["n"]
    assert k == sum(i["learned"]["candidate"] for i in items)
    assert f"taught: {k} of {n} corrections answered with their content" in reasons, reasons
    assert report["training"]["stop"] == "learned", report["training"]
    assert k >= 0.75 * n, (k, n, reasons)
    assert "pass taught" in reasons, reasons
    failed = [r for r in cycle["reasons"] if r.startswith("FAIL")]
    if cycle["decision"] == "rejected":
        assert len(failed) == 1 and failed[0].startswith("FAIL general"), reasons
        return
    assert cycle["decision"] == "promoted" and not failed, reasons
    with httpx.Client(base_url=daemon.url, headers=inference_headers(), timeout=60) as c:
        said = [chat(c, i["prompt"], max_tokens=48, temperature=0).json() for i in items]
    words = [i["content"][0] for i in items]
    answered = sum(
        w in s["choices"][0]["message"]["content"] for w, s in zip(words, said, strict=True)
    )
    assert answered >= 0.75 * n, said
