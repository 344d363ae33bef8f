"""Hot-swap benchmark: promotion and rollback under a 16-way streaming load.

Starts `adaptd serve` on a tiny model built in code (or `--model DIR`), makes two versions
with real cycles (a code word per topic, then other code words), then swaps the `adaptd` alias
between them (promote / rollback) while 16 clients stream chat completions back to back.

Measured per swap:
* decision → first token from the new version: from sending the promote / rollback request
  to the first streamed token of a request that the new version answers
  (`x-adaptd-version`), whichever client sent it;
* failed requests (any non-200 answer, a stream without `[DONE]`, a transport error);
* latency (time to the last token) of the requests that overlap a swap window, against the
  steady-state requests before the first swap: p99 ratio.

Targets (issue 4): p95 decision → first token <= 1 s on CPU, zero failures, p99 during swaps
<= 1.2x steady state. Prints a table; writes `docs/results/hotswap-<machine>.json`.

    .venv/bin/python benchmarks/hotswap.py [--swaps 20] [--clients 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    ADMIN,
    INFER,
    ROOT,
    TOPICS,
    free_port,
    git_commit,
    percentile,
    start_daemon,
    stop_daemon,
    tiny_model,
    wait_ready,
)

# Each version learns its own code word for each of 12 topics: the gate asks that a candidate
# answer what its corrections say that the served version did not (a sentence taught for every
# prompt alike is a template, and the gate does not count it as learned).
CODES = ["river", "garden", "market", "library", "mountain", "window", "letter", "flower",
         "teacher", "coffee", "bicycle", "school"]  # fmt: skip
FACT_TOPICS = 12


def facts(n: int) -> dict[str, str]:
    """Version ``n``'s corrections: a code word per topic, shifted by six for each version."""
    return {
        f"What is the code word for {t}?": f"The code word for {t} is {CODES[(i + 6 * n) % 12]}."
        for i, t in enumerate(TOPICS[:FACT_TOPICS])
    }


@dataclass
class Request:
    start: float
    first_token: float | None
    end: float
    version: str
    ok: bool
    error: str = ""


def start_hotswap_daemon(
    model: Path, data: Path, port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    # two independent versions to swap between: each trained fresh on its own style
    return start_daemon(
        model, data, port, log_path,
        ADAPTD_TRAINING__WARM_START="false",
        # a random-weight model learns its facts at a higher rate, in more passes
        ADAPTD_TRAINING__LEARNING_RATE="1e-2",
        ADAPTD_TRAINING__MIN_STEPS="1",
        ADAPTD_TRAINING__MAX_STEPS="1600",
        ADAPTD_TRAINING__MAX_EPOCHS="400",
        ADAPTD_EVALUATION__MAX_TOKENS="48",
        ADAPTD_TRAINING__EWC_LAMBDA="0",
        ADAPTD_REPLAY__RATIO="0",
        ADAPTD_GATE__MAX_RETENTION_LOSS="1",
    )  # fmt: skip


def make_version(url: str, n: int) -> str:
    hdr = {"Authorization": f"Bearer {INFER}"}
    with httpx.Client(base_url=url, headers=hdr, timeout=120) as c:
        for i, (prompt, answer) in enumerate(facts(n).items()):
            r = c.post("/v1/chat/completions", json={
                "model": "adaptd", "max_tokens": 8,
                "messages": [{"role": "user", "content": prompt}]})  # fmt: skip
            r.raise_for_status()
            c.post("/v1/feedback", json={"interaction_id": r.json()["id"], "correction": answer,
                                         "user": f"user-{i % 6}"}).raise_for_status()  # fmt: skip
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as a:
        cycle = a.post("/admin/cycles").json()
        print(f"  cycle {cycle['id']} started", file=sys.stderr)
        while cycle["decision"] is None:
            time.sleep(2)
            cycle = a.get(f"/admin/cycles/{cycle['id']}").json()
        if cycle["decision"] != "promoted":
            raise SystemExit(f"cycle {cycle['id']}: {cycle['decision']}: {cycle['reasons']}")
        print(f"  {cycle['version']} promoted", file=sys.stderr)
        return str(cycle["version"])


def client(
    url: str, stop: threading.Event, out: list[Request], lock: threading.Lock, max_tokens: int = 16
) -> None:
    hdr = {"Authorization": f"Bearer {INFER}"}
    n = 0
    with httpx.Client(base_url=url, headers=hdr, timeout=120) as c:
        while not stop.is_set():
            n += 1
            body = {"model": "adaptd", "max_tokens": max_tokens, "stream": True,
                    "messages": [{"role": "user", "content": f"Hello number {n}"}]}  # fmt: skip
            t0 = time.perf_counter()
            first = None
            version, ok, err = "?", False, ""
            try:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    version = r.headers.get("x-adaptd-version", "?")
                    done = False
                    for line in r.iter_lines():
                        if first is None and line.startswith("data: {"):
                            first = time.perf_counter()
                        if line == "data: [DONE]":
                            done = True
                    ok = r.status_code == 200 and done
                    err = "" if ok else f"status {r.status_code}, done={done}"
            except httpx.HTTPError as e:
                err = f"{type(e).__name__}: {e}"
            with lock:
                out.append(Request(t0, first, time.perf_counter(), version, ok, err))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder (default: a tiny model built in code)")
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steady-s", type=float, default=15.0)
    ap.add_argument("--gap-s", type=float, default=3.0, help="seconds between swaps")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "hotswap-cpu.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="adaptd-hotswap-"))
    model = Path(args.model) if args.model else tiny_model(work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_hotswap_daemon(model, work / "data", port, work / "adaptd.log")
    try:
        print(f"starting adaptd ({model.name}); log {work / 'adaptd.log'}", file=sys.stderr)
        wait_ready(url, proc)
        versions = [make_version(url, n) for n in range(2)]
        results = measure(url, versions, args)
    finally:
        stop_daemon(proc)
    results["commit"] = git_commit()
    results["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "model": "tiny (built in code)" if not args.model else args.model}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results: {args.out}", file=sys.stderr)


def measure(url: str, versions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    stop, lock = threading.Event(), threading.Lock()
    reqs: list[Request] = []
    threads = [
        threading.Thread(target=client, args=(url, stop, reqs, lock)) for _ in range(args.clients)
    ]
    # One more client asking one token at a time: it is never busy for long, so it shows when
    # the new version starts answering (the 16 loaded clients first finish what they started).
    watch: list[Request] = []
    threads.append(threading.Thread(target=client, args=(url, stop, watch, lock, 1)))
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    t_begin = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(args.steady_s)
    swaps: list[dict[str, Any]] = []
    served = versions[-1]
    for i in range(args.swaps):
        target = versions[i % 2]  # v1, v2, v1, ... (the last promoted is v2)
        t0 = time.perf_counter()
        if i % 2 == 0:
            r = admin.post("/admin/rollback", json={"version": target, "reason": "benchmark"})
        else:
            r = admin.post(f"/admin/versions/{target}/promote", json={"reason": "benchmark"})
        t_answer = time.perf_counter()
        if r.status_code != 200:
            raise SystemExit(f"swap {i} to {target}: {r.status_code} {r.text}")
        served = target
        swaps.append({"to": target, "t0": t0, "api_s": t_answer - t0})
        print(f"  swap {i + 1}/{args.swaps} to {target}: {1000 * (t_answer - t0):.0f} ms",
              file=sys.stderr)  # fmt: skip
        time.sleep(args.gap_s)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(120)
    admin.close()
    del served

    for s in swaps:
        for key, pool in (("first_token_s", reqs), ("watch_first_token_s", watch)):
            firsts = [
                r.first_token
                for r in pool
                if r.version == s["to"] and r.first_token is not None and r.start >= s["t0"]
            ]
            s[key] = (min(firsts) - s["t0"]) if firsts else None

    steady = [r.end - r.start for r in reqs if r.ok and r.end < t_begin + args.steady_s
              and r.start > t_begin + 2.0]  # fmt: skip
    windows = [(s["t0"], s["t0"] + 2.0) for s in swaps]
    during = [r.end - r.start for r in reqs if r.ok
              and any(r.start < hi and r.end > lo for lo, hi in windows)]  # fmt: skip
    failed = [asdict(r) for r in reqs + watch if not r.ok]
    watch_first = [s["watch_first_token_s"] for s in swaps if s["watch_first_token_s"] is not None]
    to_first = [s["first_token_s"] for s in swaps if s["first_token_s"] is not None]
    return {
        "clients": args.clients,
        "swaps": len(swaps),
        "requests": len(reqs) + len(watch),
        "failed": len(failed),
        "failures": failed[:10],
        "decision_to_first_token_s": {
            "p50": statistics.median(to_first) if to_first else None,
            "p95": percentile(to_first, 95),
            "max": max(to_first) if to_first else None,
            "missing": len(swaps) - len(to_first),
        },
        "decision_to_first_token_idle_client_s": {
            "p50": statistics.median(watch_first) if watch_first else None,
            "p95": percentile(watch_first, 95),
            "max": max(watch_first) if watch_first else None,
        },
        "swap_api_s": {
            "p50": statistics.median(s["api_s"] for s in swaps),
            "p95": percentile([s["api_s"] for s in swaps], 95),
        },
        "latency_s": {
            "steady": {
                "n": len(steady),
                "p50": percentile(steady, 50),
                "p99": percentile(steady, 99),
            },
            "during_swaps": {
                "n": len(during),
                "p50": percentile(during, 50),
                "p99": percentile(during, 99),
            },
        },
        "p99_ratio": percentile(during, 99) / percentile(steady, 99) if steady and during else None,
        "targets": {"decision_to_first_token_p95_s": 1.0, "failed": 0, "p99_ratio": 1.2},
    }


def print_table(r: dict[str, Any]) -> None:
    d, lat = r["decision_to_first_token_s"], r["latency_s"]
    rows = [
        ("swaps under load", f"{r['swaps']} with {r['clients']} streaming clients", ""),
        ("requests / failed", f"{r['requests']} / {r['failed']}", "0 failed"),
        ("decision -> first token p50", f"{1000 * d['p50']:.0f} ms", ""),
        ("decision -> first token p95", f"{1000 * d['p95']:.0f} ms", "<= 1000 ms"),
        ("same, a client not busy, p50",
         f"{1000 * r['decision_to_first_token_idle_client_s']['p50']:.0f} ms", ""),
        ("same, a client not busy, p95",
         f"{1000 * r['decision_to_first_token_idle_client_s']['p95']:.0f} ms", "<= 1000 ms"),
        ("promote/rollback call p50", f"{1000 * r['swap_api_s']['p50']:.0f} ms", ""),
        ("latency p99 steady", f"{1000 * lat['steady']['p99']:.0f} ms (n={lat['steady']['n']})", ""),
        ("latency p99 during swaps",
         f"{1000 * lat['during_swaps']['p99']:.0f} ms (n={lat['during_swaps']['n']})", ""),
        ("p99 during / steady", f"{r['p99_ratio']:.2f}x", "<= 1.20x"),
    ]  # fmt: skip
    w = max(len(a) for a, _, _ in rows)
    v = max(len(b) for _, b, _ in rows)
    print(f"{'measure'.ljust(w)}  {'value'.ljust(v)}  target")
    for a, b, c in rows:
        print(f"{a.ljust(w)}  {b.ljust(v)}  {c}")


if __name__ == "__main__":
    main()
