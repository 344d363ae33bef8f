"""Soak: half an hour of mixed traffic and feedback through scheduled cycles and a rollback.

Starts `adaptd serve` on a tiny model built in code (or `--model DIR`) with the scheduler on
(a cycle every ``--minutes / 4`` minutes once 20 new feedback items are in), and runs, all at
once, for ``--minutes``:

* ``--clients`` clients, each pausing ``--think-s`` on average between requests, each one of: a chat completion, a streamed
  chat completion, a text completion (16 tokens), on the `adaptd` alias;
* a feedback client: corrections, thumbs up and comments on the interactions just served,
  one at a time and in batches of five, about five a second;
* an operator polling `/admin/status`, `/admin/cycles` and `/metrics` every five seconds, and
  rolling the alias back one version at ``--rollback-at`` of the run.

Measured: every answer's status (a 5xx or a transport error is a failure: the target is zero),
latency p50 / p90 / p99 per kind, resident memory of the daemon and of vLLM every five seconds
(flat: the growth over the second half, MiB per minute), the WAL file's size (bounded), the
cycles and their decisions, and at the end, with the daemon stopped, that every feedback item
acknowledged with a 201 is in the database.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--clients 3]

Prints a table; writes ``docs/results/soak-cpu.json`` and an SVG of memory and WAL over time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    ADMIN,
    INFER,
    ROOT,
    TOPICS,
    descendants,
    free_port,
    percentile,
    rss_mib,
    start_daemon,
    stop_daemon,
    tiny_model,
    wait_ready,
)

ASKS = ["Tell me about {}.", "What should I know about {}?", "Any advice on {}?"]


@dataclass
class Sample:
    t: float  # seconds since the start
    kind: str
    status: int  # 0: a transport error
    seconds: float
    error: str = ""


class Run:
    """Everything the threads record, behind one lock."""

    def __init__(self, url: str, t0: float) -> None:
        self.url, self.t0 = url, t0
        self.lock = threading.Lock()
        self.samples: list[Sample] = []
        self.recent: deque[tuple[str, str]] = deque(maxlen=200)  # (interaction id, topic)
        self.acked: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.gauges: list[dict[str, float]] = []
        self.stop = threading.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, kind: str, status: int, seconds: float, error: str = "") -> None:
        with self.lock:
            self.samples.append(Sample(round(self.now(), 3), kind, status, seconds, error[:200]))

    def send(self, kind: str, request: Callable[[], httpx.Response]) -> httpx.Response | None:
        """Send one request and record it: every request the soak sends is a sample, so a
        5xx cannot hide behind a later answer. None after a transport error (status 0)."""
        t0 = time.perf_counter()
        try:
            r = request()
        except httpx.HTTPError as e:
            self.record(kind, 0, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
            return None
        error = "" if r.status_code < 400 else r.text[:200]
        self.record(kind, r.status_code, time.perf_counter() - t0, error)
        return r


def traffic(run: Run, seed: int, think_s: float) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=run.url, headers={"Authorization": f"Bearer {INFER}"},
                      timeout=120) as c:  # fmt: skip
        while not run.stop.is_set():
            topic = rng.choice(TOPICS)
            prompt = rng.choice(ASKS).format(topic)
            kind = rng.choice(["chat", "stream", "completion"])
            t0 = time.perf_counter()
            status, error, iid = 0, "", None
            try:
                if kind == "completion":
                    r = c.post("/v1/completions", json={"model": "adaptd", "prompt": prompt,
                                                        "max_tokens": 16})  # fmt: skip
                    status, iid = r.status_code, r.json().get("id") if r.is_success else None
                elif kind == "chat":
                    r = c.post("/v1/chat/completions", json={
                        "model": "adaptd", "max_tokens": 16,
                        "messages": [{"role": "user", "content": prompt}]})  # fmt: skip
                    status, iid = r.status_code, r.json().get("id") if r.is_success else None
                else:
                    body = {"model": "adaptd", "max_tokens": 16, "stream": True,
                            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        done = False
                        for line in r.iter_lines():
                            if iid is None and line.startswith("data: {"):
                                iid = json.loads(line[6:]).get("id")
                            done = done or line == "data: [DONE]"
                        status = r.status_code if done or r.status_code != 200 else 0
                        error = "" if done or r.status_code != 200 else "stream without [DONE]"
                if status >= 400:
                    error = error or r.text[:200]
            except (httpx.HTTPError, ValueError) as e:
                status, error = 0, f"{type(e).__name__}: {e}"
            run.record(kind, status, time.perf_counter() - t0, error)
            if status == 200 and iid:
                with run.lock:
                    run.recent.append((iid, topic))
            run.stop.wait(rng.uniform(0, 2 * think_s))


def feedback(run: Run, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    with httpx.Client(base_url=run.url, headers={"Authorization": f"Bearer {INFER}"},
                      timeout=120) as c:  # fmt: skip
        while not run.stop.is_set():
            time.sleep(0.2)
            with run.lock:
                picks = [run.recent.popleft() for _ in range(min(len(run.recent), 5))]
            if not picks:
                continue
            items = []
            for iid, topic in picks:
                n += 1
                roll = rng.random()
                item: dict[str, Any] = {"interaction_id": iid, "user": f"user-{n % 7}"}
                if roll < 0.6:
                    item |= {"rating": -1, "correction": f"About {topic}: the help desk on "
                             "floor two has the details."}  # fmt: skip
                elif roll < 0.9:
                    item |= {"rating": 1}
                else:
                    item |= {"comment": "Thanks."}
                items.append(item)
            acked = []
            if len(items) == 5 and rng.random() < 0.3:
                r = run.send("feedback_batch", partial(c.post, "/v1/feedback/batch",
                                                       json={"items": items}))  # fmt: skip
                if r is not None and r.status_code == 201:
                    acked = [x["id"] for x in r.json()["items"]]
            else:
                for item in items:
                    r = run.send("feedback", partial(c.post, "/v1/feedback", json=item))
                    if r is not None and r.status_code == 201:
                        acked.append(r.json()["id"])
            with run.lock:
                run.acked.extend(acked)


def operator(run: Run, pid: int, data: Path, rollback_at: float) -> None:
    wal = data / "adaptd.db-wal"
    rolled = False
    seen: dict[str, str | None] = {}
    with httpx.Client(base_url=run.url, headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=120) as a:  # fmt: skip
        while not run.stop.is_set():
            kids = descendants(pid)
            vllm = sum(rss_mib(k) for k in kids if "vllm" in _cmdline(k).lower() or
                       "VLLM" in _comm(k))  # fmt: skip
            others = sum(rss_mib(k) for k in kids) - vllm
            run.gauges.append({
                "t": round(run.now(), 1), "daemon_mib": round(rss_mib(pid), 1),
                "vllm_mib": round(vllm, 1), "other_children_mib": round(others, 1),
                "wal_mib": round(wal.stat().st_size / 2**20, 3) if wal.exists() else 0.0,
                "db_mib": round((data / "adaptd.db").stat().st_size / 2**20, 3),
                "load1": os.getloadavg()[0],
            })  # fmt: skip
            status = run.send("admin", lambda: a.get("/admin/status"))
            run.send("admin", lambda: a.get("/metrics"))
            got = run.send("admin", lambda: a.get("/admin/cycles"))
            cycles = got.json()["cycles"] if got is not None and got.status_code == 200 else []
            for cyc in cycles:
                if seen.get(cyc["id"], "?") != cyc["decision"]:
                    seen[cyc["id"]] = cyc["decision"]
                    run.events.append({"t": round(run.now(), 1), "cycle": cyc["id"],
                                       "state": cyc["state"], "decision": cyc["decision"],
                                       "version": cyc.get("version")})  # fmt: skip
                    print(f"  [{run.now() / 60:5.1f} min] cycle {cyc['id']}: {cyc['state']} "
                          f"{cyc['decision'] or ''} {cyc.get('version') or ''}", file=sys.stderr)  # fmt: skip
            ok = status is not None and status.status_code == 200
            serving = status.json()["serving"]["version"] if ok else "base"  # type: ignore[union-attr]
            if not rolled and run.now() >= rollback_at and serving != "base":
                t0 = time.perf_counter()
                r = run.send("admin", lambda: a.post("/admin/rollback",
                                                     json={"reason": "soak: a rollback under load"}))  # fmt: skip
                rolled = True
                run.events.append({"t": round(run.now(), 1),
                                   "rollback": r.status_code if r is not None else 0,
                                   "from": serving,
                                   "to": r.json().get("version") if r is not None else None,
                                   "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
                print(f"  [{run.now() / 60:5.1f} min] rollback from {serving}: "
                      f"{run.events[-1]['rollback']}", file=sys.stderr)  # fmt: skip
            run.stop.wait(5.0)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (v - my) for t, v in points) / sxx if sxx else float("nan")


def summarise(run: Run, present: int, minutes: float) -> dict[str, Any]:
    kinds = sorted({s.kind for s in run.samples})
    latency = {}
    for k in kinds:
        xs = [s.seconds for s in run.samples if s.kind == k and s.status and s.status < 400]
        latency[k] = {"n": len(xs), **{f"p{q}_ms": round(1000 * percentile(xs, q), 1)
                                       for q in (50, 90, 99)}}  # fmt: skip
    statuses = Counter(f"{s.kind} {s.status}" for s in run.samples)
    failures = [asdict(s) for s in run.samples if s.status == 0 or s.status >= 500]
    half = minutes * 30
    second = [g for g in run.gauges if g["t"] >= half]
    memory = {}
    for key in ("daemon_mib", "vllm_mib", "other_children_mib"):
        vals = [g[key] for g in run.gauges]
        memory[key] = {
            "first": vals[0] if vals else None, "last": vals[-1] if vals else None,
            "max": max(vals) if vals else None,
            "second_half_slope_mib_per_min": round(slope_per_min(
                [(g["t"], g[key]) for g in second]), 3),
        }  # fmt: skip
    return {
        "requests": len(run.samples),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(1 for s in run.samples if s.status >= 500),
        "transport_errors": sum(1 for s in run.samples if s.status == 0),
        "failures": failures[:50],
        "latency": latency,
        "memory": memory,
        "wal_max_mib": max((g["wal_mib"] for g in run.gauges), default=0.0),
        "db_final_mib": run.gauges[-1]["db_mib"] if run.gauges else None,
        "feedback_acked": len(run.acked),
        "feedback_present": present,
        "events": run.events,
        "cycles_decided": sum(1 for e in run.events if e.get("decision")),
        "rollbacks": sum(1 for e in run.events if "rollback" in e),
        "gauges": run.gauges,
    }


def print_table(res: dict[str, Any]) -> None:
    print(f"\nSoak: {res['minutes']:g} min, {res['requests']} requests, "
          f"{res['cycles_decided']} cycles decided, {res['rollbacks']} rollback(s)\n")  # fmt: skip
    print("| kind | n | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for k, v in res["latency"].items():
        print(f"| {k} | {v['n']} | {v['p50_ms']} | {v['p90_ms']} | {v['p99_ms']} |")
    m = res["memory"]
    print("\n| check | value |")
    print("|---|---|")
    print(f"| server errors (5xx) | {res['server_errors']} |")
    print(f"| transport errors | {res['transport_errors']} |")
    print(f"| feedback acknowledged / present at the end | {res['feedback_acked']} / "
          f"{res['feedback_present']} |")  # fmt: skip
    for key, label in (("daemon_mib", "daemon"), ("vllm_mib", "vLLM"),
                       ("other_children_mib", "other children")):  # fmt: skip
        v = m[key]
        print(f"| {label} RSS first / max / last (MiB) | {v['first']} / {v['max']} / "
              f"{v['last']} |")  # fmt: skip
        print(f"| {label} RSS slope, second half (MiB/min) | "
              f"{v['second_half_slope_mib_per_min']} |")  # fmt: skip
    print(f"| WAL largest (MiB) | {res['wal_max_mib']} |")
    print(f"| database at the end (MiB) | {res['db_final_mib']} |")
    for e in res["events"]:
        if e.get("decision"):
            print(f"| cycle {e['cycle']} at {e['t'] / 60:.1f} min | {e['decision']} "
                  f"{e.get('version') or ''} |")  # fmt: skip
        elif "rollback" in e:
            print(f"| rollback at {e['t'] / 60:.1f} min | {e['rollback']}: {e['from']} -> "
                  f"{e['to']} in {e['seconds']} s |")  # fmt: skip


def write_svg(res: dict[str, Any], path: Path) -> None:
    """Memory (daemon, vLLM) and WAL size over the run, with cycle and rollback marks."""
    g = res["gauges"]
    if len(g) < 2:
        return
    w, h, pad = 720, 300, 50
    tmax = max(x["t"] for x in g) or 1.0

    def panel(y0: float, keys: list[tuple[str, str]], title: str) -> str:
        top = max(max(x[k] for x in g) for k, _ in keys) or 1.0
        ph = (h - 3 * pad) / 2
        out = [f'<text x="{pad}" y="{y0 - 6}" font-size="12">{title} (max {top:.1f})</text>',
               f'<rect x="{pad}" y="{y0}" width="{w - 2 * pad}" height="{ph}" fill="none" '
               'stroke="#ccc"/>']  # fmt: skip
        for key, colour in keys:
            pts = " ".join(
                f"{pad + (w - 2 * pad) * x['t'] / tmax:.1f},{y0 + ph - ph * x[key] / top:.1f}"
                for x in g
            )
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}"/>')
        for e in res["events"]:
            if e.get("decision") or "rollback" in e:
                x = pad + (w - 2 * pad) * e["t"] / tmax
                col = "#2a2" if e.get("decision") == "promoted" else "#c33" if "rollback" in e \
                    else "#999"  # fmt: skip
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + ph}" '
                           f'stroke="{col}" stroke-dasharray="3,3"/>')  # fmt: skip
        return "".join(out)

    body = panel(pad, [("daemon_mib", "#1f77b4"), ("vllm_mib", "#ff7f0e")],
                 "RSS MiB: daemon (blue), vLLM (orange)")  # fmt: skip
    body += panel(pad + (h - 3 * pad) / 2 + pad, [("wal_mib", "#9467bd")], "WAL MiB")
    body += (f'<text x="{w / 2}" y="{h - 8}" font-size="11" text-anchor="middle">'
             f"{tmax / 60:.0f} minutes; dashed: cycle decided (green promoted), rollback (red)"
             "</text>")  # fmt: skip
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                    f'font-family="sans-serif">{body}</svg>\n')  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder (default: a tiny model built in code)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--think-s", type=float, default=0.25, help="mean pause between requests")
    ap.add_argument("--rollback-at", type=float, default=0.85, help="share of the run")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "soak-cpu.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="adaptd-soak-"))
    model = Path(args.model) if args.model else tiny_model(work)
    port, data = free_port(), work / "data"
    url = f"http://127.0.0.1:{port}"
    every = args.minutes / 4
    proc = start_daemon(
        model, data, port, work / "adaptd.log",
        ADAPTD_SCHEDULE__ENABLED="true",
        ADAPTD_SCHEDULE__INTERVAL_MINUTES=f"{every:g}",
        ADAPTD_SCHEDULE__MIN_NEW_FEEDBACK="20",
        ADAPTD_SCHEDULE__MIN_MINUTES_BETWEEN=f"{every / 2:g}",
        ADAPTD_REPLAY__RATIO="0.5",
        ADAPTD_REPLAY__MIN_EXAMPLES="0",  # as measured before the floor (8989fbb)
        ADAPTD_GATE__MAX_RETENTION_LOSS="1",
    )  # fmt: skip
    print(f"starting adaptd; log {work / 'adaptd.log'}", file=sys.stderr)
    wait_ready(url, proc)
    run = Run(url, time.monotonic())
    threads = [
        threading.Thread(target=traffic, args=(run, i, args.think_s)) for i in range(args.clients)
    ]
    threads += [
        threading.Thread(target=feedback, args=(run, 99)),
        threading.Thread(target=operator,
                         args=(run, proc.pid, data, args.rollback_at * args.minutes * 60)),
    ]  # fmt: skip
    for t in threads:
        t.start()
    try:
        while run.now() < args.minutes * 60:
            time.sleep(min(60.0, args.minutes * 60 - run.now() + 0.01))
            n = len(run.samples)
            bad = sum(1 for s in run.samples if s.status == 0 or s.status >= 500)
            print(f"  [{run.now() / 60:5.1f} min] {n} requests, {bad} failed, "
                  f"{len(run.acked)} feedback acknowledged", file=sys.stderr)  # fmt: skip
    finally:
        run.stop.set()
        for t in threads:
            t.join(180)
        code = stop_daemon(proc)
    with sqlite3.connect(f"file:{data / 'adaptd.db'}?mode=ro", uri=True) as db:
        stored = {r[0] for r in db.execute("SELECT id FROM feedback")}
    present = sum(1 for i in run.acked if i in stored)
    res = {"benchmark": "soak", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "minutes": args.minutes, "clients": args.clients, "exit_status": code,
           **summarise(run, present, args.minutes),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "model": "tiny (built in code)" if not args.model else Path(args.model).name}}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    write_svg(res, out.with_suffix(".svg"))
    print_table(res)
    print(f"\nresults: {out.name} (and {out.with_suffix('.svg').name})", file=sys.stderr)


if __name__ == "__main__":
    main()
