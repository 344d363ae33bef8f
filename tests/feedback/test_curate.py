"""Curation: table-driven cases, PII scrubbing, per-user caps, the split, and invariants.

Every case checks the accounting identity: each feedback item is kept once or dropped once.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.curate import (
    CurationResult,
    CurationSettings,
    curate,
    in_holdout,
    scrub,
    user_share_limit,
)
from feedback.store import Feedback, Interaction

T0 = 1_700_000_000.0
Row = tuple[Feedback, Interaction]


def interaction(
    iid: str,
    question: str = "What is the capital of France?",
    answer: str = "The capital of France is Paris.",
    *,
    status: str = "ok",
    finish_reason: str | None = "stop",
    endpoint: str = "chat",
    request: Any = None,
    caller: str = "key-a",
) -> Interaction:
    if request is None:
        request = question if endpoint == "completion" else [{"role": "user", "content": question}]
    return Interaction(
        id=iid,
        created_at=T0,
        endpoint=endpoint,
        model="adaptd",
        version="base",
        caller=caller,
        request=request,
        params={},
        output=answer,
        finish_reason=finish_reason,
        status=status,
    )


def feedback(
    fid: str,
    inter: Interaction,
    at: float = 0.0,
    *,
    rating: int | None = None,
    correction: str | None = None,
    comment: str | None = None,
    user: str | None = "alice",
) -> Row:
    fb = Feedback(
        id=fid,
        interaction_id=inter.id,
        created_at=T0 + at,
        rating=rating,
        correction=correction,
        comment=comment,
        user=user,
        tags=[],
    )
    return fb, inter


def check_accounting(result: CurationResult) -> None:
    r = result.report
    assert r.received == sum(r.kept.values()) + sum(r.dropped.values())
    assert r.dropped == {k: len(v) for k, v in r.dropped_ids.items()}
    assert r.train == len(result.train) and r.holdout == len(result.holdout)
    assert r.kept["correction"] + r.kept["accepted"] == r.train + r.holdout
    assert r.kept["eval_only"] == len(result.eval_only)
    assert sum(r.per_user.values()) == r.train + r.holdout
    json.dumps(r.to_dict())  # a cycle record is plain JSON


def nonzero(d: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in d.items() if v}


# --------------------------------------------------------------------------- table

LONG = (
    "Photosynthesis is the process by which green plants and some other organisms use "
    "sunlight to synthesize foods from carbon dioxide and water. It generally involves the "
    "green pigment chlorophyll and generates oxygen as a byproduct. The light reactions happen "
    "in the thylakoid membranes, and the Calvin cycle happens in the stroma of the chloroplast."
)
# Small edits: a typo, changed punctuation, case and spacing, and one word replaced.
LONG_EDITED = (
    LONG.replace("synthesize", "synthesise")
    .replace(", and the", " and  the")
    .replace("It generally", "it generally")
    .replace("byproduct", "by-product")
)
HISTORY = [
    {"role": "system", "content": "You are a patient tutor who explains biology to students."},
    {"role": "user", "content": "Explain photosynthesis."},
    {"role": "assistant", "content": LONG},
]
Q = "What is the capital of France?"


@dataclass
class Case:
    name: str
    rows: Callable[[], list[Row]]
    kept: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)


I1 = interaction("i1")
CASES = [
    Case("thumbs-up", lambda: [feedback("f1", I1, rating=1)], kept={"accepted": 1}),
    Case(
        "correction with thumbs-down",
        lambda: [feedback("f1", I1, rating=-1, correction="Paris.")],
        kept={"correction": 1},
    ),
    Case(
        "correction without a rating",
        lambda: [feedback("f1", I1, correction="Paris.")],
        kept={"correction": 1},
    ),
    Case("thumbs-down", lambda: [feedback("f1", I1, rating=-1)], kept={"eval_only": 1}),
    Case("neutral", lambda: [feedback("f1", I1, rating=0)], dropped={"neutral": 1}),
    Case(
        "comment only",
        lambda: [feedback("f1", I1, comment="interesting")],
        dropped={"comment only": 1},
    ),
    Case(
        "blank correction with thumbs-down is a thumbs-down",
        lambda: [feedback("f1", I1, rating=-1, correction="  \n")],
        kept={"eval_only": 1},
    ),
    Case(
        "blank correction alone",
        lambda: [feedback("f1", I1, correction=" ", comment="meh")],
        dropped={"comment only": 1},
    ),
    Case(
        "latest correction wins",
        lambda: [
            feedback("f1", I1, 1, correction="Paris."),
            feedback("f2", I1, 2, correction="Paris, on the Seine."),
        ],
        kept={"correction": 1},
        dropped={"superseded": 1},
    ),
    Case(
        "thumbs-up after a correction keeps the correction",
        lambda: [
            feedback("f1", I1, 1, rating=-1, correction="Paris."),
            feedback("f2", I1, 2, rating=1),
        ],
        kept={"correction": 1},
        dropped={"superseded": 1},
    ),
    Case(
        "thumbs-down then thumbs-up: the latest rating decides",
        lambda: [feedback("f1", I1, 1, rating=-1), feedback("f2", I1, 2, rating=1)],
        kept={"accepted": 1},
        dropped={"superseded": 1},
    ),
    Case(
        "thumbs-up withdrawn to neutral",
        lambda: [feedback("f1", I1, 1, rating=1), feedback("f2", I1, 2, rating=0)],
        dropped={"neutral": 1, "superseded": 1},
    ),
    Case(
        "a comment beside a rating",
        lambda: [feedback("f1", I1, 1, rating=1), feedback("f2", I1, 2, comment="nice")],
        kept={"accepted": 1},
        dropped={"comment only": 1},
    ),
    Case(
        "aborted stream",
        lambda: [
            feedback("f1", interaction("i1", answer="The capital", status="aborted"), rating=1)
        ],
        dropped={"incomplete answer": 1},
    ),
    Case(
        "engine error, even with a correction",
        lambda: [feedback("f1", interaction("i1", answer="", status="error"), correction="Paris.")],
        dropped={"incomplete answer": 1},
    ),
    Case(
        "accepted answer cut by max_tokens",
        lambda: [feedback("f1", interaction("i1", finish_reason="length"), rating=1)],
        dropped={"incomplete answer": 1},
    ),
    Case(
        "correction of an answer cut by max_tokens stands",
        lambda: [
            feedback(
                "f1", interaction("i1", finish_reason="length"), rating=-1, correction="Paris."
            )
        ],
        kept={"correction": 1},
    ),
    Case(
        "missing answer",
        lambda: [feedback("f1", interaction("i1", answer=""), rating=1)],
        dropped={"empty answer": 1},
    ),
    Case(
        "whitespace answer",
        lambda: [feedback("f1", interaction("i1", answer=" \n\t"), rating=1)],
        dropped={"empty answer": 1},
    ),
    Case(
        "too long",
        lambda: [feedback("f1", interaction("i1", answer="word " * 2000), rating=1)],
        dropped={"too long": 1},
    ),
    Case(
        "empty conversation",
        lambda: [feedback("f1", interaction("i1", request=[]), rating=1)],
        dropped={"empty prompt": 1},
    ),
    Case(
        "tool calls",
        lambda: [
            feedback(
                "f1",
                interaction(
                    "i1",
                    request=[
                        {"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
                        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
                    ],
                ),
                rating=1,
            )
        ],
        dropped={"unsupported content": 1},
    ),
    Case(
        "image content part",
        lambda: [
            feedback(
                "f1",
                interaction(
                    "i1",
                    request=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                            ],
                        }
                    ],
                ),
                rating=1,
            )
        ],
        dropped={"unsupported content": 1},
    ),
    Case(
        "text content parts",
        lambda: [
            feedback(
                "f1",
                interaction(
                    "i1", request=[{"role": "user", "content": [{"type": "text", "text": Q}]}]
                ),
                rating=1,
            )
        ],
        kept={"accepted": 1},
    ),
    Case(
        "completion endpoint",
        lambda: [
            feedback("f1", interaction("i1", "Once upon a time", endpoint="completion"), rating=1)
        ],
        kept={"accepted": 1},
    ),
    Case(
        "the same feedback row twice",
        lambda: [feedback("f1", I1, rating=1), feedback("f1", I1, rating=1)],
        kept={"accepted": 1},
        dropped={"duplicate": 1},
    ),
    Case(
        "exact duplicate on another interaction",
        lambda: [
            feedback("f1", interaction("i1"), 1, rating=1),
            feedback("f2", interaction("i2"), 2, rating=1, user="bob"),
        ],
        kept={"accepted": 1},
        dropped={"duplicate": 1},
    ),
    Case(
        "duplicate up to case and spacing",
        lambda: [
            feedback("f1", interaction("i1"), 1, rating=1),
            feedback(
                "f2",
                interaction(
                    "i2", "what is the  capital of France?", "The capital of france is Paris. "
                ),
                2,
                rating=1,
            ),
        ],
        kept={"accepted": 1},
        dropped={"duplicate": 1},
    ),
    Case(
        "a correction equal to an accepted answer",
        lambda: [
            feedback("f1", interaction("i1", answer="Paris."), 1, rating=1),
            feedback("f2", interaction("i2", answer="Lyon."), 2, correction="Paris."),
        ],
        kept={"accepted": 1},
        dropped={"duplicate": 1},
    ),
    Case(
        "near-duplicate with small edits",
        lambda: [
            feedback("f1", interaction("i1", "Explain photosynthesis.", LONG), 1, rating=1),
            feedback("f2", interaction("i2", "Explain photosynthesis!", LONG_EDITED), 2, rating=1),
        ],
        kept={"accepted": 1},
        dropped={"near-duplicate": 1},
    ),
    Case(
        "same question, different answers",
        lambda: [
            feedback("f1", interaction("i1", answer="Paris."), 1, rating=1),
            feedback("f2", interaction("i2", answer="It is Paris, on the Seine."), 2, rating=1),
        ],
        kept={"accepted": 2},
    ),
    Case(
        "same answer to different questions",
        lambda: [
            feedback("f1", interaction("i1", "Capital of France?", "Paris."), 1, rating=1),
            feedback("f2", interaction("i2", "City of the Louvre?", "Paris."), 2, rating=1),
        ],
        kept={"accepted": 2},
    ),
    Case(
        "successive turns of one long chat share a history but are not duplicates",
        lambda: [
            feedback("f1", interaction("i1", request=HISTORY[:2], answer=LONG), 1, rating=1),
            feedback(
                "f2",
                interaction(
                    "i2",
                    request=[*HISTORY, {"role": "user", "content": "Where does it happen?"}],
                    answer="In the chloroplasts of leaf cells.",
                ),
                2,
                rating=1,
            ),
        ],
        kept={"accepted": 2},
    ),
    Case(
        "a thumbs-down is deduplicated apart from training targets",
        lambda: [
            feedback("f1", interaction("i1"), 1, rating=1),
            feedback("f2", interaction("i2"), 2, rating=-1, user="bob"),
        ],
        kept={"accepted": 1, "eval_only": 1},
    ),
    Case(
        "PII inside is scrubbed, not dropped",
        lambda: [
            feedback(
                "f1",
                interaction("i1", "Mail john@example.com or call +44 20 7946 0958.", "Done."),
                rating=1,
            )
        ],
        kept={"accepted": 1},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_curation_cases(case: Case) -> None:
    result = curate(case.rows())
    check_accounting(result)
    assert nonzero(result.report.kept) == case.kept
    assert result.report.dropped == case.dropped


def test_outputs_of_a_correction_a_thumbs_up_and_a_thumbs_down() -> None:
    a = interaction("a", "Capital of France?", "Lyon.")
    b = interaction("b", "Capital of Italy?", "Rome.")
    c = interaction("c", "Capital of Spain?", "Barcelona.")
    rows = [
        feedback("f1", a, 1, rating=-1, correction="A first try."),
        feedback("f2", a, 2, rating=-1, correction="Paris."),
        feedback("f3", b, 3, rating=1),
        feedback("f4", c, 4, rating=-1, comment="It is Madrid."),
    ]
    result = curate(rows, CurationSettings(holdout_fraction=0.0))
    check_accounting(result)
    by_kind = {e.kind: e for e in result.train}
    corr = by_kind["correction"]
    assert corr.messages == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert (corr.interaction_id, corr.feedback_id, corr.user) == ("a", "f2", "alice")
    assert corr.created_at == T0 + 2
    assert by_kind["accepted"].messages[-1] == {"role": "assistant", "content": "Rome."}
    [pair] = result.preferences_train
    assert (pair.chosen, pair.rejected) == ("Paris.", "Lyon.")
    assert pair.prompt_messages == [{"role": "user", "content": "Capital of France?"}]
    [ev] = result.eval_only
    assert (ev.answer, ev.comment, ev.feedback_id) == ("Barcelona.", "It is Madrid.", "f4")
    assert result.report.dropped_ids == {"superseded": ["f1"]}
    assert [e.feedback_id for e in result.train] == ["f2", "f3"]  # time order


def test_no_preference_pair_when_the_correction_repeats_the_answer() -> None:
    inter = interaction("a", answer="Paris.")
    result = curate([feedback("f1", inter, correction="paris. ")])
    assert result.report.kept["correction"] == 1
    assert result.preferences_train == result.preferences_holdout == []
    assert result.report.pairs_skipped == {"same as answer": 1}


def test_developer_role_becomes_system() -> None:
    inter = interaction(
        "a", request=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": Q}]
    )
    result = curate([feedback("f1", inter, rating=1)], CurationSettings(holdout_fraction=0.0))
    assert result.train[0].messages[0] == {"role": "system", "content": "Be brief."}


def test_user_falls_back_to_the_caller() -> None:
    inter = interaction("a", caller="key-mobile")
    result = curate([feedback("f1", inter, rating=1, user=None)])
    assert result.report.per_user == {"key-mobile": 1}


def test_mismatched_pair_is_refused() -> None:
    fb, _ = feedback("f1", interaction("a"), rating=1)
    with pytest.raises(ValueError, match=r"'f1' is about interaction 'a'.*'b'"):
        curate([(fb, interaction("b"))])


def test_settings_are_validated_together() -> None:
    with pytest.raises(ValueError) as e:
        CurationSettings(holdout_fraction=1.0, max_user_share=0.0, max_per_user=0)
    for name in ("holdout_fraction", "max_user_share", "max_per_user"):
        assert name in str(e.value)


# --------------------------------------------------------------------------- PII


def test_pii_is_scrubbed_everywhere_before_training() -> None:
    inter = interaction(
        "a",
        request=[
            {"role": "system", "content": "Support bot. Escalate to ops@acme.io."},
            {
                "role": "user",
                "content": "I'm jane.doe@gmail.com, card 4111 1111 1111 1111, call (415) 555-0123.",
            },
        ],
        answer="Use key sk-proj-abcDEF123ghiJKL456mnoPQR789 to log in.",
    )
    rows = [
        feedback("f1", inter, correction="Never share keys; rotate ghp_" + "aB3" * 12 + " now."),
    ]
    result = curate(rows, CurationSettings(holdout_fraction=0.0))
    text = json.dumps([result.train, result.preferences_train], default=vars)
    for secret in ("ops@acme.io", "jane.doe@gmail.com", "4111", "555-0123", "sk-proj", "ghp_"):
        assert secret not in text
    for placeholder in ("[EMAIL]", "[CARD]", "[PHONE]", "[SECRET]"):
        assert placeholder in text
    # system + user: 2 e-mails, 1 card, 1 phone; served answer: 1 key; correction: 1 token.
    assert result.report.pii_redactions == {"email": 2, "phone": 1, "card": 1, "secret": 2}
    ev = curate(
        [feedback("f2", interaction("b"), rating=-1, comment="mail me: x.y@example.org")]
    ).eval_only[0]
    assert ev.comment == "mail me: [EMAIL]"


POSITIVES = [
    ("e-mail", "write to john.doe+tag@example.co.uk today", "write to [EMAIL] today"),
    ("e-mail in brackets", "<a.b@c-d.io>", "<[EMAIL]>"),
    ("phone +1", "call +1 (415) 555-0123 now", "call [PHONE] now"),
    ("phone UK", "ring +44 20 7946 0958.", "ring [PHONE]."),
    ("phone FR", "+33 1 23 45 67 89", "[PHONE]"),
    ("phone E.164", "+14155550123", "[PHONE]"),
    ("phone US parens", "(415) 555-0123", "[PHONE]"),
    ("phone US dashes", "at 415-555-0123.", "at [PHONE]."),
    ("phone US dots", "415.555.0123", "[PHONE]"),
    ("phone toll-free", "1-800-555-0199", "[PHONE]"),
    ("phone UK national", "020 7946 0958", "[PHONE]"),
    ("phone UK mobile", "07700 900123", "[PHONE]"),
    ("card spaces", "card 4111 1111 1111 1111 exp 12/29", "card [CARD] exp 12/29"),
    ("card dashes", "5500-0000-0000-0004", "[CARD]"),
    ("card bare", "4012888888881881", "[CARD]"),
    ("card amex", "3782 822463 10005", "[CARD]"),
    ("openai", "key sk-proj-abcdEFGH1234ijklMNOP5678qrst", "key [SECRET]"),
    ("anthropic", "sk-ant-api03-abcDEF123_ghiJKL456-mnoPQR", "[SECRET]"),
    ("github", "ghp_" + "a1B2" * 9, "[SECRET]"),
    ("github pat", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "[SECRET]"),
    ("aws key id", "AKIAIOSFODNN7EXAMPLE", "[SECRET]"),
    ("slack", "xoxb-123456789012-abcdefghijkl", "[SECRET]"),
    ("stripe", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "[SECRET]"),
    ("google", "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW", "[SECRET]"),
    ("bearer", "Authorization: Bearer abc123def456ghi789jkl", "Authorization: Bearer [SECRET]"),
    (
        "jwt",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "[SECRET]",
    ),
    (
        "labelled value",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "aws_secret_access_key = [SECRET]",
    ),
    ("labelled in JSON", '{"api_key": "abc123def456ghi"}', '{"api_key": "[SECRET]"}'),
    ("password", "password=hunter2hunter2", "password=[SECRET]"),
    ("hex", "token 9f8e7d6c5b4a39281706f5e4d3c2b1a0ffeeddcc", "token [SECRET]"),
    ("base64", "x Zk3Qm9Lp2Xr7Vt4Nw8Hy6Jb1Gc5Fd0Sa3Ke", "x [SECRET]"),
    (
        "private key",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
        "[SECRET]",
    ),
]

NEGATIVES = [
    "In 2024 prices rose to $1,299.99, up 3.14% since 1999.",
    "Released on 2024-05-01 at 12:30:45, version 1.2.3 (build 10.0.19045).",
    "ISO 8601: 2024-05-01T12:00:00+02:00, or 1/2/2024, or 05 10 2024.",
    "Commit a1b2c3d fixed it; see PR #1234 and issue 567.",
    "Visit https://github.com/openai/openai-python/blob/main/README.md for details.",
    "https://example.com/search?q=hello+world&page=2#results",
    "Server 192.168.100.200 port 8080; IPv6 ::1.",
    "Call getUserProfileSettingsByIdV2Async() from AbstractSingletonProxyFactoryBean2.",
    "Models: HuggingFaceTB/SmolLM2-135M-Instruct and meta-llama/Meta-Llama-3.1-8B-Instruct.",
    "Paths /usr/lib/python3/dist-packages/Foo/Bar and src/lib/v2/api/HTTPClient/io/fs/x9.",
    "He was the bearer of bad news.",
    "Population 8,336,817; area 783.8 km2; ISBN 978-0-306-40615-7.",
    "Coordinates 48.8566, 2.3522.",
    "UUID 123e4567-e89b-12d3-a456-426614174000.",
    "Values 100 200 3000, and the sequence 2019 2020 2021 2022.",
    "Order 1234567890123456 shipped; tracking 4111 1111 1111 1112.",
    "pip install torch==2.4.0+cu121; target x86_64-unknown-linux-gnu.",
    "Set max_tokens = 4096 and call token = get_token().",
    "tokenizer = AutoTokenizer.from_pretrained(name)",
    "Decorators like @property; user@localhost; C++17; +5 points, +10%.",
    "pi is 3.14159265358979323846264338327950288",
    "Already scrubbed: [EMAIL], [PHONE], [CARD], [SECRET].",
]


@pytest.mark.parametrize(
    ("text", "expected"), [p[1:] for p in POSITIVES], ids=[p[0] for p in POSITIVES]
)
def test_scrub_finds(text: str, expected: str) -> None:
    out, counts = scrub(text)
    assert out == expected
    assert sum(counts.values()) >= 1


@pytest.mark.parametrize("text", NEGATIVES)
def test_scrub_leaves_ordinary_text(text: str) -> None:
    assert scrub(text) == (text, {"email": 0, "phone": 0, "card": 0, "secret": 0})


@pytest.mark.parametrize(("length", "extra", "at_least"), [(40, "", 0.94), (64, "+/", 0.98)])
def test_scrub_catches_most_random_keys(length: int, extra: str, at_least: float) -> None:
    # A generic key has no prefix to match; the heuristic catches most (about 95% at 40 chars).
    rng = random.Random(7)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" + extra
    keys = ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(500)]
    caught = sum(scrub(f"key {k} end")[0] == "key [SECRET] end" for k in keys)
    assert caught >= at_least * len(keys)


def luhn_complete(body: str) -> str:
    for check in "0123456789":
        digits = body + check
        total = sum(
            (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 else d
            for i, d in enumerate(int(c) for c in reversed(digits))
        )
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


cards = st.builds(
    lambda first, rest, length: luhn_complete((first + rest)[: length - 1]),
    st.sampled_from(["4", "51", "55", "37", "6011", "2221"]),
    st.text("0123456789", min_size=18, max_size=18),
    st.sampled_from([13, 15, 16, 19]),
)
words = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10)
prose = st.lists(words, max_size=20).map(" ".join)
emails = st.builds(
    lambda user, host, tld: f"{user}@{host}.{tld}",
    st.text("abcdefghijklmnopqrstuvwxyz0123456789._+", min_size=1, max_size=12).filter(
        lambda s: s[0] not in "._+"
    ),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10),
    st.sampled_from(["com", "org", "io", "co.uk", "de"]),
)


@settings(max_examples=60, deadline=None)
@given(before=prose, after=prose, card=cards, sep=st.sampled_from(["", " ", "-"]))
def test_scrub_removes_any_valid_card(before: str, after: str, card: str, sep: str) -> None:
    grouped = sep.join(card[i : i + 4] for i in range(0, len(card), 4)) if sep else card
    out, counts = scrub(f"{before} {grouped} {after}")
    assert out == f"{before} [CARD] {after}"
    assert counts["card"] == 1


@settings(max_examples=60, deadline=None)
@given(before=prose, after=prose, email=emails)
def test_scrub_removes_any_email(before: str, after: str, email: str) -> None:
    out, _ = scrub(f"{before} {email} {after}")
    assert out == f"{before} [EMAIL] {after}"


@settings(max_examples=60, deadline=None)
@given(text=prose)
def test_scrub_leaves_plain_words(text: str) -> None:
    assert scrub(text)[0] == text


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(st.sampled_from("ab1234567890 +-.()@:_/=Kx"), max_size=80) | st.text(max_size=80)
)
def test_scrub_is_idempotent(text: str) -> None:
    once, _ = scrub(text)
    twice, counts = scrub(once)
    assert twice == once
    assert sum(counts.values()) == 0


# --------------------------------------------------------------------------- per-user caps

VOCAB = ["".join(random.Random(i).choices("bcdfghjklmnpqrstvwxz", k=6)) for i in range(5000)]


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def distinct_rows(counts: dict[str, int], seed: int = 0) -> list[Row]:
    """Thumbs-up items with unrelated texts, users interleaved in time."""
    rng = random.Random(seed)
    users = [u for u, n in counts.items() for _ in range(n)]
    rng.shuffle(users)
    rows = []
    for k, user in enumerate(users):
        inter = interaction(f"i{k:04d}", sentence(rng), sentence(rng))
        rows.append(feedback(f"f{k:04d}", inter, k, rating=1, user=user))
    return rows


def test_one_user_flooding_is_capped_by_count_and_share() -> None:
    counts = {"flood": 250} | {f"user{n}": 5 for n in range(10)}  # 250 among 50 from others
    rows = distinct_rows(counts)
    result = curate(rows, CurationSettings())
    check_accounting(result)
    r = result.report
    # Count cap: 250 -> 50. Share: c <= 0.25 * (50 + c) gives c = 16 (16/66 = 24%).
    assert r.dropped == {"per-user cap": 200, "per-user share": 34}
    assert r.per_user == {"flood": 16} | {f"user{n}": 5 for n in range(10)}
    assert max(r.per_user.values()) <= 0.25 * sum(r.per_user.values())
    flood_ids = [fb.id for fb, _ in rows if fb.user == "flood"]  # rows are in time order
    kept_ids = {e.feedback_id for e in [*result.train, *result.holdout] if e.user == "flood"}
    assert kept_ids == set(flood_ids[:16])  # the earliest


def test_a_single_user_is_bounded_by_the_count_only() -> None:
    result = curate(distinct_rows({"solo": 80}))
    assert result.report.per_user == {"solo": 50}
    assert result.report.dropped == {"per-user cap": 30}


def test_few_users_get_an_equal_split() -> None:
    # Two users: a quarter each is impossible, so the share becomes a half.
    result = curate(distinct_rows({"alice": 40, "bob": 2}))
    assert result.report.per_user == {"alice": 2, "bob": 2}
    assert result.report.dropped == {"per-user share": 38}


def test_share_cap_can_be_turned_off() -> None:
    result = curate(distinct_rows({"alice": 40, "bob": 2}), CurationSettings(max_user_share=1.0))
    assert result.report.per_user == {"alice": 40, "bob": 2}


@pytest.mark.parametrize(
    ("counts", "share", "limit"),
    [
        ([], 0.25, 0),
        ([10], 0.25, 10),  # one user: no share cap
        ([3, 3, 3], 0.25, 3),  # three equal users: a third each is allowed
        ([40, 2], 0.25, 2),  # two users: an equal split
        ([50] + [5] * 10, 0.25, 16),  # 16 <= 0.25 * 66 = 16.5; 17 > 0.25 * 67
        ([50, 50, 50, 50, 1], 0.25, 50),  # five users: 50 <= 0.25 * 201
        ([100, 30, 30, 30, 30], 0.25, 40),  # 40 <= 0.25 * 160 exactly
    ],
)
def test_user_share_limit_by_hand(counts: list[int], share: float, limit: int) -> None:
    assert user_share_limit(counts, share) == limit


@given(
    counts=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=12),
    share=st.floats(min_value=0.01, max_value=1.0),
)
def test_user_share_limit_is_the_largest_fair_cap(counts: list[int], share: float) -> None:
    c = user_share_limit(counts, share)
    s = max(share, 1 / len(counts))
    capped = [min(n, c) for n in counts]
    assert max(capped) <= s * sum(capped) + 1e-9  # nobody above the share afterwards
    assert c >= min(counts)  # nobody is cut to nothing
    if c < max(counts):  # and one more would break it
        assert c + 1 > s * sum(min(n, c + 1) for n in counts) + 1e-9


# --------------------------------------------------------------------------- the split

PINNED = {  # in_holdout(id, 0.2, "adaptd-holdout-v1"): a change here moves data across
    f"chatcmpl-{n}": n == 4 for n in range(12)
}


def test_split_is_pinned() -> None:
    got = {i: in_holdout(i, 0.2, "adaptd-holdout-v1") for i in PINNED}
    assert got == PINNED


def test_split_fraction_and_stability_over_10k_ids() -> None:
    ids = [f"chatcmpl-{n}" for n in range(10_000)]
    first = [in_holdout(i, 0.2, "adaptd-holdout-v1") for i in ids]
    assert first == [in_holdout(i, 0.2, "adaptd-holdout-v1") for i in ids]
    assert 0.19 <= sum(first) / len(ids) <= 0.21
    other = [in_holdout(i, 0.2, "another-salt") for i in ids]
    assert 0.19 <= sum(other) / len(ids) <= 0.21 and other != first
    assert not any(in_holdout(i, 0.0, "adaptd-holdout-v1") for i in ids[:1000])


def test_holdout_is_never_trained_on_even_in_a_later_cycle() -> None:
    rng = random.Random(3)
    inters = [interaction(f"chatcmpl-{k}", sentence(rng), sentence(rng)) for k in range(60)]
    users = [f"u{k % 12}" for k in range(60)]
    cycle1 = curate(
        [feedback(f"a{k}", it, k, rating=1, user=users[k]) for k, it in enumerate(inters)]
    )
    held = {e.interaction_id for e in cycle1.holdout}
    assert held and not held & {e.interaction_id for e in cycle1.train}
    # Later feedback on the same interactions (corrections now) in another call.
    cycle2 = curate(
        [
            feedback(f"b{k}", it, 100 + k, correction=sentence(rng), user=users[k])
            for k, it in enumerate(inters)
        ]
    )
    assert not held & {e.interaction_id for e in cycle2.train}
    assert not held & {p.interaction_id for p in cycle2.preferences_train}
    assert held == {e.interaction_id for e in cycle2.holdout}


# --------------------------------------------------------------------------- invariants

SMALL_VOCAB = ["red", "green", "blue", "cat", "dog", "sun"]


@st.composite
def feedback_sets(draw: st.DrawFn) -> list[Row]:
    n_inter = draw(st.integers(min_value=1, max_value=12))
    inters = []
    for k in range(n_inter):
        q = " ".join(draw(st.lists(st.sampled_from(SMALL_VOCAB), min_size=1, max_size=5)))
        a = " ".join(draw(st.lists(st.sampled_from(SMALL_VOCAB), min_size=0, max_size=5)))
        status = draw(st.sampled_from(["ok", "ok", "ok", "aborted"]))
        inters.append(interaction(f"chatcmpl-{k}", q, a, status=status, caller=f"key{k % 2}"))
    rows = []
    for n in range(draw(st.integers(min_value=0, max_value=25))):
        rows.append(
            feedback(
                f"fb-{n}",
                draw(st.sampled_from(inters)),
                draw(st.integers(min_value=0, max_value=8)),
                rating=draw(st.sampled_from([None, -1, 0, 1])),
                correction=draw(st.sampled_from([None, None, "", "blue sun", "red cat dog"])),
                comment=draw(st.sampled_from([None, "hm"])),
                user=draw(st.sampled_from([None, "ann", "bo", "cy"])),
            )
        )
    return rows


small = CurationSettings(max_per_user=3, max_user_share=0.4, near_duplicate_threshold=0.6)


@settings(max_examples=100, deadline=None)
@given(rows=feedback_sets(), seed=st.integers(min_value=0, max_value=1000))
def test_curation_invariants(rows: list[Row], seed: int) -> None:
    result = curate(rows, small)
    check_accounting(result)
    assert result.report.received == len(rows)
    # The same input in any order gives the same result.
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    assert curate(shuffled, small) == result
    # The split follows in_holdout, for examples, pairs and evaluation items alike.
    fraction, salt = small.holdout_fraction, small.salt
    assert not any(in_holdout(e.interaction_id, fraction, salt) for e in result.train)
    assert all(in_holdout(e.interaction_id, fraction, salt) for e in result.holdout)
    assert not any(in_holdout(p.interaction_id, fraction, salt) for p in result.preferences_train)
    assert all(
        ev.holdout == in_holdout(ev.interaction_id, fraction, salt) for ev in result.eval_only
    )
    # One output per interaction; every example ends with a non-empty assistant answer.
    examples = [*result.train, *result.holdout]
    assert len({e.interaction_id for e in examples}) == len(examples)
    assert all(
        e.messages[-1]["role"] == "assistant" and e.messages[-1]["content"] for e in examples
    )
    assert max(Counter(e.user for e in examples).values(), default=0) <= small.max_per_user


def bigrams(text: str) -> set[str]:
    w = re.findall(r"\w+", " ".join(text.casefold().split()))
    return {f"{a} {b}" for a, b in itertools.pairwise(w)} if len(w) > 1 else {" ".join(w)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


@settings(max_examples=100, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.lists(st.sampled_from(SMALL_VOCAB[:4]), min_size=1, max_size=6),
            st.lists(st.sampled_from(SMALL_VOCAB[:4]), min_size=1, max_size=6),
        ),
        max_size=14,
    ),
    threshold=st.sampled_from([0.3, 0.5, 0.6, 0.75, 0.9, 1.0]),
)
def test_near_duplicates_match_brute_force(
    items: list[tuple[list[str], list[str]]], threshold: float
) -> None:
    """The prefix-filtered join finds exactly what comparing every pair finds."""
    rows = [
        feedback(f"f{k:02d}", interaction(f"i{k:02d}", " ".join(q), " ".join(a)), k, rating=1)
        for k, (q, a) in enumerate(items)
    ]
    config = CurationSettings(
        near_duplicate_threshold=threshold,
        max_per_user=100,
        max_user_share=1,
        drop_suspected_triggers=False,
    )
    result = curate(rows, config)
    # Reference: one pass in time order, comparing with every earlier kept item.
    expected: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    kept: list[tuple[set[str], set[str]]] = []
    for k, (q, a) in enumerate(items):
        key = (" ".join(q), " ".join(a))
        parts = (bigrams(key[0]), bigrams(key[1]))
        if key in seen:
            expected.setdefault("duplicate", []).append(f"f{k:02d}")
            continue
        seen.add(key)
        if any(
            jaccard(parts[0], p) >= threshold and jaccard(parts[1], t) >= threshold for p, t in kept
        ):
            expected.setdefault("near-duplicate", []).append(f"f{k:02d}")
            continue
        kept.append(parts)
    assert result.report.dropped_ids == expected
