"""Abuse benchmark: normal chat latency with and without abusive clients alongside.

Starts `adaptd serve` on a tiny model built in code (or `--model DIR`) with the default limits
(`limits.*`: 64 KiB of head, 100 headers, 10 s for a head, 30 s of body silence, 1 MiB of body,
`max_tokens` 4096, `n` 8, 200,000 prompt characters). A steady set of clients sends chat
completions back to back (keep-alive, `max_tokens` 16), phase after phase:

* `none`: no abuse;
* `header floods`: threads sending 10,000 headers, or one 1 MB header, in a loop;
* `slowloris`: 200 connections sending their head one byte a second (cut off at 10 s, then
  they reconnect), plus 20 that send nothing;
* `huge bodies`: threads sending 50 MB with a Content-Length, or 5 MB chunked, in a loop;
* `oversize params`: threads sending `max_tokens` 1,000,000, `n` 100, a 300,000-character
  prompt, in a loop;
* `all`: all of the above at once;
* `none (again)`: no abuse, to see drift.

Measured per phase: the normal requests' latency (p50, p90, p99) and failures, the p99 over the
first `none` phase's, and per abuse kind the answers (status: count) and how long they took.
The abusive clients run in processes of their own (one per kind) but on the same machine, the
same CPUs, as the daemon and vLLM: their own CPU use is part of what the normal clients feel,
so the attackers' CPU and the daemon's own are reported per phase too (100 % is one core). The ratio's baseline pools both
phases without abuse.

Prints a Markdown table; writes `docs/results/abuse-cpu.json`.

    .venv/bin/python benchmarks/abuse.py [--phase-s 25] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    HOST,
    INFER,
    ROOT,
    free_port,
    percentile,
    rss_mib,
    start_daemon,
    stop_daemon,
    tiny_model,
    wait_ready,
)

sys.path.insert(0, str(ROOT / "tests"))
from abusers import (
    Outcome,
    header_flood,
    huge_body,
    huge_header,
    silent,
    slowloris,
)

CHAT = {"model": "adaptd", "max_tokens": 16, "temperature": 0}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process ``pid`` (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the abusive clients: each kind in a process of its own (its threads must not take the
# measuring clients' GIL), on the same CPUs as the daemon ---------------------------------
def json_abuse(client: httpx.Client, kind: str) -> Outcome:
    body: dict[str, Any] = {**CHAT, "messages": [{"role": "user", "content": "Hi"}]}
    if kind == "max_tokens":
        body["max_tokens"] = 1_000_000
    elif kind == "n":
        body["n"] = 100
    elif kind == "prompt":
        body["messages"] = [{"role": "user", "content": "word " * 60_000}]  # 300,000 chars
    t0 = time.monotonic()
    try:
        r = client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as e:
        return Outcome(kind, None, time.monotonic() - t0, error=type(e).__name__)
    code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
    return Outcome(kind, r.status_code, time.monotonic() - t0, code)


# kind -> threads (each makes the kind's calls in turn, back to back)
ATTACKS: dict[str, int] = {
    "header floods": 4,
    "slowloris": 200,
    "silent": 20,
    "huge bodies": 4,
    "oversize params": 4,
}
PHASES: dict[str, list[str]] = {
    "header floods": ["header floods"],
    "slowloris": ["slowloris", "silent"],
    "huge bodies": ["huge bodies"],
    "oversize params": ["oversize params"],
}


def attack_calls(kind: str, url: str, port: int) -> list[Callable[[], Outcome]]:
    if kind == "header floods":
        return [lambda: header_flood(HOST, port), lambda: huge_header(HOST, port)]
    if kind == "slowloris":
        return [lambda: slowloris(HOST, port, interval=1.0)]
    if kind == "silent":
        return [lambda: silent(HOST, port)]
    if kind == "huge bodies":
        return [lambda: huge_body(HOST, port, INFER),
                lambda: huge_body(HOST, port, INFER, 5_000_000, chunked=True)]  # fmt: skip
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {INFER}"}, timeout=60)
    return [partial(json_abuse, client, k) for k in ("max_tokens", "n", "prompt")]


def attack_process(kind: str, url: str, port: int, stop: Any, results: Any) -> None:
    """In a child process: ``ATTACKS[kind]`` threads each looping over the kind's calls."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def loop(offset: int) -> None:
        calls = attack_calls(kind, url, port)
        i = offset
        while not stop.is_set():
            out = calls[i % len(calls)]()
            i += 1
            with lock:
                outcomes.append(out)

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(ATTACKS[kind])]
    for t in threads:
        t.start()
        if len(threads) > 20:
            time.sleep(0.005)  # a ramp, not a burst of SYNs at once
    for t in threads:
        t.join()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu_percent = 100 * (ru.ru_utime + ru.ru_stime) / (time.monotonic() - t0)
    results.put((kind, [asdict(o) for o in outcomes], cpu_percent))


# -- the normal clients --------------------------------------------------------------------
@dataclass
class Normal:
    start: float
    end: float
    status: int | None


def normal_client(url: str, stop: threading.Event, out: list[Normal], lock: threading.Lock) -> None:
    n = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {INFER}"}, timeout=120) as c:
        while not stop.is_set():
            n += 1
            body = {**CHAT, "messages": [{"role": "user", "content": f"Tell me a story, part {n}"}]}
            t0 = time.perf_counter()
            status: int | None
            try:
                status = c.post("/v1/chat/completions", json=body).status_code
            except httpx.HTTPError:
                status = None
            with lock:
                out.append(Normal(t0, time.perf_counter(), status))


def measure(url: str, port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    lock = threading.Lock()
    normal: list[Normal] = []
    latencies: dict[str, list[float]] = {}
    stop_normal = threading.Event()
    clients = [threading.Thread(target=normal_client, args=(url, stop_normal, normal, lock))
               for _ in range(args.clients)]  # fmt: skip
    for t in clients:
        t.start()
    time.sleep(5)  # warm-up: first requests, connections made
    plan: list[tuple[str, list[str]]] = [("none", [])]
    plan += list(PHASES.items())
    plan += [("all", [k for kinds in PHASES.values() for k in kinds]), ("none (again)", [])]
    ctx = mp.get_context("spawn")
    phases: list[dict[str, Any]] = []
    for name, kinds in plan:
        stop, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=attack_process, args=(k, url, port, stop, results))
                 for k in kinds]  # fmt: skip
        for proc in procs:
            proc.start()
        time.sleep(args.ramp_s)
        t_lo, cpu_lo = time.perf_counter(), cpu_s(pid)
        time.sleep(args.phase_s)
        t_hi, cpu_hi = time.perf_counter(), cpu_s(pid)
        rss, fds = rss_mib(pid), open_fds(pid)
        stop.set()
        got = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(60)
        with lock:
            lat = [r.end - r.start for r in normal if t_lo <= r.start and r.end <= t_hi]
            failed = sum(1 for r in normal if t_lo <= r.start <= t_hi and r.status != 200)
        latencies[name] = lat
        abuse = {}
        for kind, outs, attacker_cpu in got:
            answered = Counter(f"{o['status']} {o['code']}" if o["status"] else
                               f"none ({o['error']})" for o in outs)  # fmt: skip
            secs = [o["seconds"] for o in outs]
            abuse[kind] = {
                "attempts": len(outs),
                "answers": dict(answered),
                "seconds_p50": percentile(secs, 50),
                "seconds_max": max(secs) if secs else None,
                "connect_s_p50": percentile([o["connect_s"] for o in outs], 50),
                "connect_s_max": max((o["connect_s"] for o in outs), default=None),
                "attacker_cpu_percent": attacker_cpu,
            }
        phases.append({
            "phase": name, "requests": len(lat), "failed": failed,
            "p50_s": percentile(lat, 50), "p90_s": percentile(lat, 90),
            "p99_s": percentile(lat, 99), "daemon_rss_mib": rss, "daemon_open_fds": fds,
            "daemon_cpu_percent": 100 * (cpu_hi - cpu_lo) / (t_hi - t_lo),
            "attackers_cpu_percent": sum(a["attacker_cpu_percent"] for a in abuse.values()),
            "abuse": abuse,
        })  # fmt: skip
        print(f"  {name}: {len(lat)} requests, p99 {1000 * phases[-1]['p99_s']:.0f} ms, "
              f"{sum(v['attempts'] for v in abuse.values())} abusive attempts", file=sys.stderr)  # fmt: skip
        time.sleep(2)  # let the refused connections drain
    stop_normal.set()
    for t in clients:
        t.join(120)
    # The baseline pools both phases without abuse (p99 of a few hundred requests is noisy).
    base = percentile(latencies["none"] + latencies["none (again)"], 99)
    for p in phases:
        p["p99_ratio"] = p["p99_s"] / base if base else None
    return {
        "clients": args.clients,
        "phase_s": args.phase_s,
        "baseline_p99_s": base,
        "phases": phases,
        "daemon_open_fds_after": open_fds(pid),
        "limits": "defaults: 64 KiB head, 100 headers, 10 s head, 30 s body pause, 1 MiB body, "
        "max_tokens 4096, n 8, 200,000 prompt characters, 512 connections",
    }


def print_table(r: dict[str, Any]) -> None:
    print("| phase | normal requests | failed | p50 ms | p90 ms | p99 ms | p99 / none | "
          "abusive attempts: answers (time p50 / max, of which connecting max) | attackers' CPU | daemon CPU | "
          "daemon RSS MiB |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for p in r["phases"]:
        abuse = (
            "; ".join(
                f"{name} {a['attempts']}: "
                + ", ".join(f"{k}: {v}" for k, v in sorted(a["answers"].items()))
                + f" ({a['seconds_p50']:.2f} / {a['seconds_max']:.2f} s, {a['connect_s_max']:.2f} s)"
                for name, a in p["abuse"].items()
                if a["attempts"]
            )
            or "none"
        )
        print(f"| {p['phase']} | {p['requests']} | {p['failed']} | {1000 * p['p50_s']:.0f} | "
              f"{1000 * p['p90_s']:.0f} | {1000 * p['p99_s']:.0f} | {p['p99_ratio']:.2f} | "
              f"{abuse} | {p['attackers_cpu_percent']:.0f} % | {p['daemon_cpu_percent']:.0f} % | "
              f"{p['daemon_rss_mib']:.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder (default: a tiny model built in code)")
    ap.add_argument("--clients", type=int, default=4, help="steady normal clients")
    ap.add_argument("--phase-s", type=float, default=25.0, help="measured seconds per phase")
    ap.add_argument("--ramp-s", type=float, default=3.0, help="abuse running before measuring")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "abuse-cpu.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="adaptd-abuse-"))
    model = Path(args.model) if args.model else tiny_model(work)
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc = start_daemon(model, work / "data", port, work / "adaptd.log")
    try:
        print(f"starting adaptd ({model.name}); log {work / 'adaptd.log'}", file=sys.stderr)
        wait_ready(url, proc)
        results = measure(url, port, proc.pid, args)
    finally:
        stop_daemon(proc)
    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "model": "tiny (built in code)" if not args.model else args.model}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
