"""Likelihoods of given sequences under the base model and adapters (the child process that
evaluation uses instead of vLLM's prompt_logprobs), against a direct transformers forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinymodel import make_random_adapter
from transformers import AutoModelForCausalLM

from learners.score import ScoringFailed, score_in_child, sequence_logprobs

SEQS = [
    {"ids": [1, 5, 9, 13, 17, 21], "positions": [3, 4, 5]},
    {"ids": [2, 4, 6], "positions": [1, 2]},
]


def direct(model_dir: Path, ids: list[int], positions: list[int]) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[p - 1, ids[p]]) for p in positions]


def test_child_scores_base_and_adapters(tiny_model: Path, tmp_path: Path) -> None:
    adapter = make_random_adapter(tiny_model, tmp_path / "a")
    job = {"base_model": str(tiny_model), "adapters": {"v0001": str(adapter)},
           "models": [None, "v0001"], "sequences": SEQS}  # fmt: skip
    out = score_in_child(tmp_path / "work", job)
    assert set(out) == {"base", "v0001"}
    assert [len(x) for x in out["base"]] == [3, 2]
    for s, got in zip(SEQS, out["base"], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(direct(tiny_model, **s)))
    assert all(v < 0 for row in out["v0001"] for v in row)
    assert out["v0001"] != out["base"]  # the adapter is applied


def test_positions_are_checked(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with pytest.raises(ValueError, match="positions"):
        sequence_logprobs(model, [1, 2, 3], [0])
    assert sequence_logprobs(model, [1, 2, 3], []) == []


def test_a_bad_job_is_a_clear_error(tmp_path: Path) -> None:
    job = {"base_model": str(tmp_path / "missing"), "adapters": {}, "models": [None],
           "sequences": SEQS}  # fmt: skip
    with pytest.raises(ScoringFailed):
        score_in_child(tmp_path / "w", job)
