"""What a served adapter costs per token against the base model, on vLLM as adaptd starts it,
side by side in one run (issue 12: adapters at the base model's speed).

Arms, each a fresh vLLM server on the same model, KV cache and flags but for LoRA's:

- ``no-lora``: vLLM without ``--enable-lora``: the base model's own speed, the peer;
- ``lora-64x4``: the LoRA buffers adaptd shipped with (``--max-lora-rank 64 --max-loras 4``);
- ``lora-16x2``: buffers sized for what adaptd trains and serves (rank 16, two adapters at once);
- ``merged``: the ``lora-16x2`` server after an in-place reload of the adapter merged into the
  base weights (vLLM's dev-mode ``/pause``, ``collective_rpc reload_weights``, ``/resume``): the
  adapter's answers at the base model's speed. Each merged run sits between a reload of the
  merged weights and one of the base model's again (what a rollback would do), so it
  interleaves with that server's base and adapter runs; every reload is timed. Its greedy text
  is compared with the adapter's and the base model's.

Per arm and model, runs interleaved within a server: decode time per token of one greedy
stream (``ignore_eos``; the time from the first to the last token over the tokens between,
median of the runs), and output tokens per second with ``--concurrency`` streams at once. The adapter is rank 16 on every linear layer with
random non-zero weights (its values do not change the cost). Results go to ``--out``.

    .venv/bin/python benchmarks/serving_cost.py                    # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/serving_cost.py --tiny --runs 3    # the tests' tiny model, quick
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import ROOT, free_port, tiny_model
from serving.engine import BASE_NAME, EngineSettings, vllm_command

KEY = "bench-vllm-key"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "Write a short story about a lighthouse keeper and a storm."
KV_BYTES = 1 << 30  # 1 GiB of KV cache in every arm: nothing here needs more


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def default_model(cache: Path) -> Path:
    from serving.models import ensure_default_model

    return ensure_default_model(cache)


def make_adapter(model: Path, work: Path, rank: int) -> tuple[Path, Path]:
    """A rank-``rank`` LoRA on every linear layer with random B (PEFT starts B at zero, which
    vLLM would serve as the base), large enough that its greedy answer is not the base model's
    (so the merged model's answer tells whether the reload took), and the same adapter merged
    into a copy of the base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)  # large enough to change the greedy answer
    adapter = work / "adapter"
    peft_model.save_pretrained(adapter)
    merged = work / "merged"
    config = json.loads((model / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    peft_model.merge_and_unload().to(getattr(torch, stored)).save_pretrained(merged)
    for f in model.iterdir():  # tokenizer, chat template, generation defaults
        if f.is_file() and not (merged / f.name).exists() and f.suffix != ".safetensors":
            shutil.copy2(f, merged / f.name)
    return adapter, merged


class Server:
    """One vLLM server, started with adaptd's own command line."""

    def __init__(self, model: Path, log: Path, *, lora: tuple[int, int] | None, dev: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        s = EngineSettings(model=str(model), max_model_len=1024,
                           max_lora_rank=lora[0] if lora else 16, max_loras=lora[1] if lora else 1)  # fmt: skip
        cmd = vllm_command(s, port=self.port, api_key=KEY, kv_cache_bytes=KV_BYTES)
        if lora is None:
            i = cmd.index("--enable-lora")
            del cmd[i : i + 5]  # --enable-lora --max-loras N --max-lora-rank R
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", HF_HUB_OFFLINE="1")
        if dev:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=600,
                                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"vLLM exited with {self.proc.returncode}: see {log}")
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 900:
                raise SystemExit(f"vLLM not healthy after 900 s: see {log}")
            time.sleep(1)
        self.start_s = time.monotonic() - t0

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        r = self.client.post(path, json=body)
        if r.status_code != 200:
            raise SystemExit(f"vLLM refused {path} ({r.status_code}): {r.text[:300]}")
        return r

    def stream(self, model: str, tokens: int) -> tuple[list[float], str]:
        """One greedy stream: the arrival time of each token's event, and the text."""
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        times, text = [], []
        with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise SystemExit(f"vLLM refused a chat ({r.status_code}): {r.read()[:300]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    times.append(time.perf_counter())
                    text.append(delta)
        return times, "".join(text)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.client.close()
        self.log.close()


def one_stream(server: Server, model: str, tokens: int) -> tuple[float, str]:
    """Decode milliseconds per token of one greedy stream, and its text."""
    times, text = server.stream(model, tokens)
    return 1000 * (times[-1] - times[0]) / (len(times) - 1), text


def concurrent_rate(server: Server, model: str, args: argparse.Namespace) -> float:
    """Output tokens per second with ``args.concurrency`` streams at once."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        done = list(pool.map(lambda _: len(server.stream(model, args.tokens)[0]),
                             range(args.concurrency)))  # fmt: skip
    return sum(done) / (time.perf_counter() - t0)


def summary(runs: list[float], text: str, rate: float) -> dict[str, Any]:
    return {"ms_per_token": statistics.median(runs), "ms_per_token_runs": runs,
            "tokens_per_s_concurrent": rate, "greedy_text": text}  # fmt: skip


def measure(server: Server, models: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``models`` on one server, their runs interleaved (the machine's drift falls on all)."""
    for m in models:
        server.stream(m, 16)  # warm-up
    runs: dict[str, list[float]] = {m: [] for m in models}
    texts: dict[str, str] = {}
    for _ in range(args.runs):
        for m in models:
            ms, texts[m] = one_stream(server, m, args.tokens)
            runs[m].append(ms)
    return {m: summary(runs[m], texts[m], concurrent_rate(server, m, args)) for m in models}


def measure_merged(
    server: Server, model: Path, merged: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The base model, the adapter, and the adapter merged into the weights, on one server, runs
    interleaved: each merged run between an in-place reload of the merged weights and one of the
    base model's again (which is also what a rollback does), every reload timed."""
    base, cand = BASE_NAME, "candidate"
    for m in (base, cand):
        server.stream(m, 16)  # warm-up
    runs: dict[str, list[float]] = {base: [], cand: [], "merged": []}
    texts: dict[str, str] = {}
    swaps: list[float] = []
    for _ in range(args.runs):
        for m in (base, cand):
            ms, texts[m] = one_stream(server, m, args.tokens)
            runs[m].append(ms)
        swaps.append(reload_weights(server, merged))
        ms, texts["merged"] = one_stream(server, base, args.tokens)
        runs["merged"].append(ms)
        swaps.append(reload_weights(server, model))
    out = {m: summary(runs[m], texts[m], concurrent_rate(server, m, args)) for m in (base, cand)}
    swaps.append(reload_weights(server, merged))
    out["merged"] = summary(runs["merged"], texts["merged"], concurrent_rate(server, base, args))
    out["merged"]["swap_s_runs"] = swaps
    out["merged"]["swap_s"] = statistics.median(swaps)
    out["merged"]["swap_s_max"] = max(swaps)
    return out


def reload_weights(server: Server, weights: Path) -> float:
    """The served weights replaced in place from ``weights``: pause (in-flight requests keep
    their place), reload, drop the prefix cache, resume. Seconds."""
    t0 = time.perf_counter()
    server.post("/pause?mode=keep")
    try:
        server.post("/collective_rpc",
                    {"method": "reload_weights", "kwargs": {"weights_path": str(weights)}})  # fmt: skip
        server.post("/reset_prefix_cache")
    finally:
        server.post("/resume")
    return time.perf_counter() - t0


def same_prefix(a: str, b: str) -> float:
    """The share of ``a``'s characters that ``b`` repeats from the start."""
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return n / max(1, len(a))


def machine() -> dict[str, Any]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average_at_start": list(os.getloadavg()), "python": platform.python_version()}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="a model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model")
    p.add_argument("--rank", type=int, default=16, help="the adapter's rank (adaptd's default)")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/serving_cost_cpu.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adaptd-serving-cost-"))
    started = time.monotonic()
    try:
        if args.tiny:
            model = tiny_model(work)
        else:
            model = args.model or default_model(Path.home() / ".cache/adaptd/models")
        say(f"model {model.name}; building a rank-{args.rank} adapter and its merged copy")
        adapter, merged = make_adapter(model, work, args.rank)
        result: dict[str, Any] = {
            "benchmark": "serving_cost", "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": commit(), "machine": machine(), "model": model.name, "rank": args.rank,
            "tokens": args.tokens, "runs": args.runs, "concurrency": args.concurrency,
            "kv_cache_bytes": KV_BYTES, "arms": {},
        }  # fmt: skip
        arms = result["arms"]
        say("arm no-lora")
        s = Server(model, work / "no-lora.log", lora=None, dev=False)
        arms["no-lora"] = {"start_s": s.start_s, **measure(s, [BASE_NAME], args)}
        s.stop()
        say("arm lora-64x4")
        s = Server(model, work / "lora-64x4.log", lora=(64, 4), dev=False)
        s.post("/v1/load_lora_adapter", {"lora_name": "candidate", "lora_path": str(adapter)})
        arms["lora-64x4"] = {"start_s": s.start_s, **measure(s, [BASE_NAME, "candidate"], args)}
        s.stop()
        say("arm lora-16x2, and the adapter merged in place (reloaded before each merged run)")
        s = Server(model, work / "lora-16x2.log", lora=(max(16, args.rank), 2), dev=True)
        s.post("/v1/load_lora_adapter", {"lora_name": "candidate", "lora_path": str(adapter)})
        got = measure_merged(s, model, merged, args)
        s.stop()
        arms["lora-16x2"] = {
            "start_s": s.start_s,
            BASE_NAME: got[BASE_NAME],
            "candidate": got["candidate"],
        }
        m = arms["merged"] = got["merged"]
        m["same_text_as_adapter"] = same_prefix(got["candidate"]["greedy_text"], m["greedy_text"])
        m["same_text_as_base"] = same_prefix(got[BASE_NAME]["greedy_text"], m["greedy_text"])
        result["total_s"] = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # (server, what it serves, the measure, the same server's base model)
    peer = arms["no-lora"][BASE_NAME]
    rows = [("no-lora", "base", peer, peer)]
    for name in ("lora-64x4", "lora-16x2"):
        base = arms[name][BASE_NAME]
        rows += [(name, "base", base, base), (name, "adapter", arms[name]["candidate"], base)]
    rows.append(
        ("lora-16x2", "adapter merged in place", arms["merged"], arms["lora-16x2"][BASE_NAME])
    )
    result["table"] = [
        {"server": a, "serves": b, "ms_per_token": m["ms_per_token"],
         "vs_base": m["ms_per_token"] / peer["ms_per_token"],
         "vs_base_same_server": m["ms_per_token"] / ref["ms_per_token"],
         "tokens_per_s_concurrent": m["tokens_per_s_concurrent"]}
        for a, b, m, ref in rows
    ]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['model']}, rank {args.rank}, {args.tokens} greedy tokens, "
          f"median of {args.runs}; {args.concurrency} streams at once\n")  # fmt: skip
    print("| server | serves | ms/token | vs base, no LoRA | vs base, same server "
          "| tokens/s, concurrent |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["table"]:
        print(f"| {r['server']} | {r['serves']} | {r['ms_per_token']:.1f} | {r['vs_base']:.2f}x "
              f"| {r['vs_base_same_server']:.2f}x | {r['tokens_per_s_concurrent']:.0f} |")  # fmt: skip
    m = arms["merged"]
    print(f"\nin-place reload (pause, reload, resume): median {m['swap_s']:.2f} s, at most "
          f"{m['swap_s_max']:.2f} s over {len(m['swap_s_runs'])}; the merged model's greedy "
          f"answer repeats {m['same_text_as_adapter']:.0%} of the adapter's from the start "
          f"({m['same_text_as_base']:.0%} of the base model's)")  # fmt: skip
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
