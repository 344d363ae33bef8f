"""Tokenization with answer-only labels, packing, and the block-diagonal mask."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learners.data import IGNORE, Tokenized, batches, collate, pack, shift_loss, tokenize_chat

CHAT = [
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
]


@pytest.fixture(scope="module")
def tok(tiny_model: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model)


def test_only_the_final_answer_and_its_end_of_turn_are_labelled(tok) -> None:  # type: ignore[no-untyped-def]
    multi = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        *CHAT,
    ]
    t = tokenize_chat(tok, multi, 512)
    assert t is not None
    target = [x for x in t.labels if x != IGNORE]
    assert tok.decode(target) == "Lima.<|im_end|>"
    # The prompt part is exactly what the server renders for generation.
    prompt = tok.apply_chat_template(multi[:-1], tokenize=False, add_generation_prompt=True)
    n_prompt = t.labels.index(target[0])
    assert tok.decode(t.input_ids[:n_prompt]) == prompt


def test_an_unfinished_answer_is_trained_without_its_end_of_turn(tok) -> None:  # type: ignore[no-untyped-def]
    # a self-replay answer cut off by max_tokens: its words are targets, stopping there is not
    cut = [CHAT[0], {"role": "assistant", "content": "Lima is the capital and", "unfinished": True}]
    t = tokenize_chat(tok, cut, 512)
    assert t is not None
    assert tok.decode([x for x in t.labels if x != IGNORE]) == "Lima is the capital and"
    assert tok.decode(t.input_ids).endswith("Lima is the capital and<|im_end|>")
    whole = tokenize_chat(tok, [CHAT[0], {**cut[1], "unfinished": False}], 512)
    assert whole is not None and tok.decode([x for x in whole.labels if x != IGNORE]).endswith(
        "<|im_end|>"
    )


def test_too_long_prompt_is_cut_from_the_left_and_the_answer_kept(tok) -> None:  # type: ignore[no-untyped-def]
    long = [
        {"role": "user", "content": "word " * 300},
        {"role": "assistant", "content": "Short answer."},
    ]
    t = tokenize_chat(tok, long, 64)
    assert t is not None and len(t.input_ids) == 64
    assert tok.decode([x for x in t.labels if x != IGNORE]) == "Short answer.<|im_end|>"
    assert (
        tokenize_chat(
            tok,
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a " * 200}],
            32,
        )
        is None
    )


def test_a_conversation_must_end_with_the_answer(tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="end with the assistant"):
        tokenize_chat(tok, CHAT[:1], 64)


def test_pack_first_fit_decreasing() -> None:
    exs = [Tokenized([1] * n, [1] * n) for n in (5, 3, 4, 2, 6)]
    rows = pack(exs, 8)
    # decreasing: 6 -> row 0, 5 -> row 1, 4 -> row 2, 3 -> row 1 (5+3), 2 -> row 0 (6+2)
    assert [len(r) for r in rows] == [8, 8, 4]
    assert all(len(r) <= 8 for r in rows)
    assert sum(len(r) for r in rows) == 20
    for r in rows:
        assert r.position_ids[0] == 0
    with pytest.raises(ValueError, match="over max_len"):
        pack([Tokenized([1] * 9, [1] * 9)], 8)


def test_batches_are_a_seeded_permutation() -> None:
    rows = pack([Tokenized([i] * 3, [i] * 3) for i in range(10)], 3)
    a = batches(rows, 4, random.Random(1))
    b = batches(rows, 4, random.Random(1))
    assert [[r.input_ids for r in g] for g in a] == [[r.input_ids for r in g] for g in b]
    assert sorted(r.input_ids[0] for g in a for r in g) == list(range(10))


def test_packed_logits_equal_separate_logits(tiny_model: Path, tok) -> None:  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    a = tokenize_chat(tok, CHAT, 128)
    b = tokenize_chat(
        tok,
        [
            {"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": "Blue, like the sea."},
        ],
        128,
    )
    assert a is not None and b is not None
    (row,) = pack([a, b], 256)
    batch = collate([row], tok.pad_token_id)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        first, second = (b, a) if len(b.input_ids) >= len(a.input_ids) else (a, b)  # FFD order
        alone1 = model(input_ids=torch.tensor([first.input_ids])).logits
        alone2 = model(input_ids=torch.tensor([second.input_ids])).logits
    n1 = len(first.input_ids)
    torch.testing.assert_close(packed[:, :n1], alone1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[:, n1:], alone2, atol=1e-4, rtol=1e-4)
    # With positions running on across the row, the second example sees the first: the
    # separation really comes from the restarting positions (so this test can fail).
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert not torch.allclose(leaky[:, n1:], alone2, atol=1e-3)


def test_padding_rows_carry_no_loss() -> None:
    rows = pack([Tokenized([5, 6, 7], [IGNORE, 6, 7]), Tokenized([8, 9], [IGNORE, 9])], 3)
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"][1].tolist() == [IGNORE, 9, IGNORE]
    assert batch["position_ids"][1].tolist() == [0, 1, 0]  # the pad is a sequence of its own
    assert collate(rows, pad_id=0, pad_to=5)["input_ids"].shape == (2, 5)
    logits = torch.zeros(2, 3, 10)
    loss, n = shift_loss(logits, batch["labels"])
    assert n == 3
    torch.testing.assert_close(loss, torch.tensor(float(torch.log(torch.tensor(10.0)))))
