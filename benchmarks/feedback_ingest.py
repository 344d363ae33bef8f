"""Sustained feedback ingest: POST /v1/feedback per second, every 201 durable.

Starts the real daemon (its feedback path needs no model, so it is pointed at a vLLM URL where
nothing listens), seeds interactions straight into its database, then drives it with `wrk`
(a C load generator, so the client takes little of the two cores) for a fixed time. Every 201's
body names the stored item's id; the load script writes each one down, and afterwards every
acknowledged id is looked up in the database (not a row count: a row stored for a request that
was not acknowledged cannot hide one that was lost). SQLite's journal mode and ``synchronous``
are the daemon's writing connection's, read from ``/admin/status``.

    .venv/bin/python benchmarks/feedback_ingest.py [--seconds 20] [--connections 64]

Needs `wrk` (Debian package `wrk`). Prints a table and writes docs/results/feedback_ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
N_SEED = 20_000

LUA = """
local n = 0
local ids = {}
for line in io.lines("%(ids)s") do ids[#ids + 1] = line end
request = function()
  n = n + 1
  local body
  if %(external)s then
    body = '{"messages":[{"role":"user","content":"q' .. n .. '"}],"response":"a","rating":1,"user":"bench"}'
  else
    body = '{"interaction_id":"' .. ids[(n %% #ids) + 1] .. '","rating":-1,"correction":"better answer ' .. n .. '","user":"bench","tags":["x"]}'
  end
  return wrk.format("POST", "/v1/feedback", {["Content-Type"] = "application/json"}, body)
end
local acked = io.open("%(acked)s", "a")
acked:setvbuf("line")
response = function(status, headers, body)
  if status == 201 then
    acked:write((body:match('"id":"([^"]+)"') or "?"), "\\n")
  end
end
done = function(summary, latency, requests)
  io.write(string.format("LAT50 %%d\\nLAT90 %%d\\nLAT99 %%d\\n", latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(db: Path, n: int) -> list[str]:
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(n)]
    now = time.time()
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO interactions (id, created_at, endpoint, model, version, caller, request, "
            "params, output, status, stream) VALUES (?, ?, 'chat', 'adaptd', 'base', 'bench', "
            "'[]', '{}', 'answer', 'ok', 0)",
            [(i, now) for i in ids],
        )
    return ids


def durability(db: Path, acked: list[str], *, responses_2xx: int) -> dict[str, Any]:
    """Look up every acknowledged id in the database. Every 2xx must have named an id, and
    every id named must be stored."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM feedback")}
    missing = [i for i in acked if i not in stored]
    return {
        "responses_2xx": responses_2xx,
        "acknowledged": len(acked),
        "acknowledged_missing": len(missing),
        "missing_examples": missing[:5],
        "every_201_stored": bool(acked) and not missing and len(acked) == responses_2xx,
    }


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    if out.stderr.strip():  # wrk reports a Lua error there and runs on with a broken script
        sys.exit(f"wrk's script failed: {out.stderr.strip().splitlines()[0]}")
    out = out.stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {k: int(v) / 1000 for k, v in re.findall(r"(LAT\d+) (\d+)", out)}
    return {
        "requests": reqs,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
        "per_s": reqs / seconds,
        "p50_ms": lat.get("LAT50", 0),
        "p90_ms": lat.get("LAT90", 0),
        "p99_ms": lat.get("LAT99", 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs/results/feedback_ingest.json"))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("needs wrk (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="adaptd-ingest-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env["ADAPTD_LOG_LEVEL"] = "warning"
    dead_vllm = f"http://127.0.0.1:{free_port()}"  # nothing listens: feedback needs no model
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "serve", "--vllm-url", dead_vllm,
         "--data-dir", str(work / "data"), "--port", str(port)],
        cwd=ROOT, env=env, stdout=open(work / "daemon.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        db = work / "data" / "adaptd.db"
        ids = seed(db, N_SEED)
        (work / "ids.txt").write_text("\n".join(ids) + "\n")
        for name, external in (("by interaction id", "false"), ("external conversation", "true")):
            script = work / f"{external}.lua"
            acked_file = work / f"acked-{external}.txt"
            script.write_text(
                LUA % {"ids": work / "ids.txt", "external": external, "acked": acked_file}
            )
            load0 = os.getloadavg()[0]
            r = run_wrk(url, script, args.seconds, args.connections)
            acked = acked_file.read_text().split() if acked_file.exists() else []
            r.update(durability(db, acked, responses_2xx=int(r["requests"] - r["non_2xx"])))
            r["load_before"] = load0
            results[name] = r
        stats = httpx.get(url + "/admin/status", timeout=10).json()
        store = stats["store"]
    finally:
        proc.terminate()
        proc.wait(30)
    out = {
        "benchmark": "feedback_ingest",
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or "unknown",
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "sqlite": {
            "version": store["sqlite_version"],
            "journal_mode": store["journal_mode"],
            "synchronous": store["synchronous"],
        },
        "seconds": args.seconds,
        "connections": args.connections,
        "results": results,
        "target_per_s": 2000,
        "interactions_after": stats["interactions"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nfeedback ingest, {args.seconds} s, {args.connections} connections, {os.cpu_count()} cores, "
          f"SQLite {store['sqlite_version']} {store['journal_mode']} "
          f"synchronous={store['synchronous']}\n")  # fmt: skip
    print(
        f"{'mode':<24}{'POST/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'acked':>9}{'missing':>9}  durable  target"
    )
    for name, r in results.items():
        print(f"{name:<24}{r['per_s']:>9.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['acknowledged']:>9}"
              f"{r['acknowledged_missing']:>9}  {'yes' if r['every_201_stored'] else 'NO':<7}  "
              f"{'met' if r['per_s'] >= 2000 else 'missed'}")  # fmt: skip
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
