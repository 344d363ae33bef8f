"""Log-likelihoods of given token sequences under the base model and LoRA adapters.

Evaluation needs the likelihood of answers a model did not generate (the corrections,
held-out general text, multiple-choice options). vLLM's ``prompt_logprobs`` cannot give
them safely while LoRA is enabled: with more than one sequence in a batch its LoRA logits
path crashes the engine or returns wrong values (vLLM issues 16668, 29955, 51594). So the
likelihoods are computed here, with transformers + PEFT, in a child process
(``python -m learners.score WORK``), the same stack that trained the adapters.

Job (``WORK/job.json``): ``{"base_model", "adapters": {name: path}, "models": [name|null],
"sequences": [{"ids": [...], "positions": [...]}]}``; each position ``p`` asks for
log P(ids[p] | ids[:p]). Result (``WORK/result.json``): ``{"ok": true, "logprobs":
{model: [[...per position...] per sequence]}}``, with ``"base"`` for the base model.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def sequence_logprobs(model: Any, ids: Sequence[int], positions: Sequence[int]) -> list[float]:
    """log P(ids[p] | ids[:p]) for each p in ``positions`` (p >= 1), one forward pass."""
    if not positions:
        return []
    if min(positions) < 1 or max(positions) >= len(ids):
        raise ValueError(f"positions must lie in [1, {len(ids) - 1}]")
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    with torch.inference_mode():
        logits = model(input_ids=x).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)  # row j predicts ids[j + 1]
    rows = torch.tensor([p - 1 for p in positions], device=device)
    toks = torch.tensor([ids[p] for p in positions], device=device)
    return [float(v) for v in logp[rows, toks].tolist()]


def run(job: dict[str, Any]) -> dict[str, list[list[float]]]:
    from learners.lora import load_for_scoring, use_adapter

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    adapters = {k: str(v) for k, v in job["adapters"].items()}
    model = load_for_scoring(job["base_model"], adapters, dtype=dtype, device=device)
    out: dict[str, list[list[float]]] = {}
    for name in job["models"]:
        key = name or "base"
        with use_adapter(model, name):
            out[key] = [
                sequence_logprobs(model, s["ids"], s["positions"]) for s in job["sequences"]
            ]
        log.info("scored %d sequences under %s", len(job["sequences"]), key)
    return out


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work = Path(argv[0])
    out = work / "result.json"
    try:
        result: dict[str, Any] = {
            "ok": True,
            "logprobs": run(json.loads((work / "job.json").read_text())),
        }
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        result = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    sys.exit(_main(sys.argv[1:]))


class ScoringFailed(RuntimeError):
    pass


def score_in_child(work: Path, job: dict[str, Any], *, timeout: float = 3600.0) -> dict[str, Any]:
    """Run a scoring job in a child process; returns ``{model: [[logprob...]...]}``."""
    import subprocess

    from learners.run import _children, spawn

    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").unlink(missing_ok=True)
    (work / "job.json").write_text(json.dumps(job))
    proc = spawn(["learners.score", str(work)], work / "child.log")
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        raise ScoringFailed(f"scoring took longer than {timeout:.0f} s") from e
    finally:
        _children.discard(proc)
    path = work / "result.json"
    if not path.exists():
        raise ScoringFailed(f"the scoring child died; see {work / 'child.log'}")
    result = json.loads(path.read_text())
    if not result["ok"]:
        raise ScoringFailed(result["reason"])
    return dict(result["logprobs"])
