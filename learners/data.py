"""Chat examples into packed training batches: loss on the answer only, no cross-talk.

* `tokenize_chat` renders a conversation with the model's chat template and labels only the
  final assistant answer (its end-of-turn token included), so the model learns what to say and
  when to stop, not to imitate users. The prompt is tokenized exactly as the server will see it
  (the template with ``add_generation_prompt=True``), and the answer is appended.
* `pack` puts examples into rows of at most ``max_len`` tokens (first-fit by decreasing length).
* `collate` turns packed rows into tensors with per-example position ids; from those (and no
  cache) transformers builds a block-diagonal causal mask, so a token never attends to another
  example in the same row: the logits of a packed example equal those of the example alone
  (tested).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE = -100

Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    # Fit the answer to the teacher's distribution (replay by distillation, see
    # `learners.train`), not to its tokens.
    soft: bool = False

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class PackedRow:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    soft: list[bool] = field(default_factory=list)

    def add(self, ex: Tokenized) -> None:
        seg = (self.segments[-1] + 1) if self.segments else 0
        self.input_ids += ex.input_ids
        self.labels += ex.labels
        self.soft += [ex.soft] * len(ex.input_ids)
        self.position_ids += list(range(len(ex.input_ids)))
        self.segments += [seg] * len(ex.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_chat(tokenizer: Any, messages: Messages, max_len: int) -> Tokenized | None:
    """Tokenize one conversation ending with the assistant's answer; None if it cannot fit.

    A prompt that is too long is cut from the left (oldest turns first); the answer is never
    cut. Labels are `IGNORE` everywhere but on the answer's tokens. An answer marked
    ``"unfinished": True`` (cut off by a token limit when it was generated) is trained without
    its end-of-turn token: the model learns its words, not to stop after them.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training conversation must end with the assistant's answer")
    prompt = tokenizer.apply_chat_template(
        [dict(m) for m in messages[:-1]], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the chat")
    answer = full[len(prompt) :]
    # Templates that add a trailing newline after the end-of-turn token: keep it out of the
    # target; the model must learn to emit the end-of-turn token, nothing after it.
    eos = tokenizer.eos_token
    if eos and eos in answer:
        answer = answer[: answer.rindex(eos) + len(eos)]
    p_ids, a_ids = _ids(tokenizer, prompt), _ids(tokenizer, answer)
    if len(a_ids) >= max_len:
        return None
    if len(p_ids) + len(a_ids) > max_len:
        p_ids = p_ids[len(p_ids) + len(a_ids) - max_len :]
    labels = list(a_ids)
    if messages[-1].get("unfinished") and eos and answer.endswith(eos):
        n_end = len(_ids(tokenizer, eos))
        labels[len(labels) - n_end :] = [IGNORE] * n_end
    return Tokenized(p_ids + a_ids, [IGNORE] * len(p_ids) + labels)


def pack(examples: Iterable[Tokenized], max_len: int) -> list[PackedRow]:
    """First-fit decreasing: few rows, little padding; deterministic for the same input."""
    rows: list[PackedRow] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        if len(ex.input_ids) > max_len:
            raise ValueError(f"an example of {len(ex.input_ids)} tokens is over max_len {max_len}")
        for row in rows:
            if len(row) + len(ex.input_ids) <= max_len:
                row.add(ex)
                break
        else:
            row = PackedRow()
            row.add(ex)
            rows.append(row)
    return rows


def batches(
    rows: Sequence[PackedRow], batch_rows: int, rng: random.Random
) -> list[list[PackedRow]]:
    """One epoch of row batches in a seeded random order."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [[rows[i] for i in order[k : k + batch_rows]] for k in range(0, len(order), batch_rows)]


def collate(
    rows: Sequence[PackedRow], pad_id: int, *, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Tensors for a batch of packed rows, padded to the longest row (or to ``pad_to``).

    No attention mask is built here: with ``position_ids`` restarting at 0 for every example
    and no cache, transformers derives the block-diagonal causal mask itself, on the device
    (for SDPA a dense mask, for flex attention a block-sparse one that skips the blocks between
    examples). Padding gets position 0, so each pad token is a sequence of its own, attends to
    itself only and carries no label.
    """
    length = max(max(len(r) for r in rows), pad_to or 0)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    soft = torch.zeros((n, length), dtype=torch.bool)
    for i, r in enumerate(rows):
        k = len(r)
        input_ids[i, :k] = torch.tensor(r.input_ids)
        labels[i, :k] = torch.tensor(r.labels)
        position_ids[i, :k] = torch.tensor(r.position_ids)
        if any(r.soft):
            soft[i, :k] = torch.tensor(r.soft)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "soft": soft}


def shift_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled tokens, and how many there were."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE).sum())
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss / max(n, 1), n


def load_tokenizer(model: str) -> Any:
    """The base model's tokenizer (a local folder or a hub id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def answer_positions(tok: Tokenized) -> list[int]:
    """Indexes of the answer's tokens (the labelled ones)."""
    return [i for i, x in enumerate(tok.labels) if x != IGNORE]
