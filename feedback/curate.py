"""Curation: feedback on interactions turned into training examples, as pure functions.

The caller passes ``(Feedback, Interaction)`` rows (from ``Store.iter_feedback_with_interactions``
or any other source); nothing here touches the database, the clock or a random generator, so the
same rows and settings always give the same result, in whatever order the rows come.

:func:`curate` runs these stages in order; every feedback item that comes in leaves either as
the deciding item of a kept unit or as one drop with a reason (:class:`Drop`), so
``received == sum(kept.values()) + sum(dropped.values())``:

1. **Resolve** feedback per interaction (rows sorted by ``(created_at, id)``). The latest
   non-blank correction wins, whatever ratings came before or after it (a rating of -1 with a
   correction is a correction). Without a correction the latest rating decides: 1 accepts the
   served answer, -1 makes an evaluation-only item (never an SFT target), 0 is dropped
   (``neutral``). Items with neither rating nor non-blank correction are ``comment only``;
   rated or corrected items that lost to a later one are ``superseded``; a feedback id seen
   twice is a ``duplicate``.
2. **Check the record**: an interaction whose status is not ``ok`` (aborted stream, engine
   error) is an ``incomplete answer``: the record itself is partial, and a correction written
   against a cut-off answer may be only its missing tail. An accepted answer cut by
   ``max_tokens`` (``finish_reason == "length"``) is also an ``incomplete answer``; a
   correction of one stands (a person wrote the whole target). Tool calls, tool messages and
   non-text content parts are ``unsupported content`` (``developer`` messages become
   ``system``; a completion's prompt becomes one user message); a conversation with no text is
   an ``empty prompt``.
3. **Scrub** personal data and secrets (:func:`scrub`) from every message, answer, correction
   and comment, before anything else looks at the text.
4. **Length**: a blank target is an ``empty answer``, one under ``min_answer_chars`` is
   ``too short``; a conversation plus target over ``max_example_chars`` is ``too long``.
5. **Duplicates** (training targets and evaluation items are deduplicated separately): the
   same conversation and target after case and whitespace folding is a ``duplicate`` of the
   earliest; a ``near-duplicate`` has word-bigram Jaccard similarity of at least
   ``near_duplicate_threshold`` to an earlier kept item *both* in its conversation and in its
   target (so successive turns of one long chat, which share their history, stay apart).
   The comparison is exact, not a MinHash estimate (see :func:`_dedupe`).
6. **Suspected triggers** (training targets only, :mod:`feedback.triggers`): many prompts
   that share an unusual phrase and little else, all answered alike, are the shape of a
   planted backdoor. Such clusters are listed in the report (``suspected_triggers``) and, with
   ``drop_suspected_triggers``, dropped whole (``suspected trigger``) before the caps, so a
   campaign split across many users is caught as well as one user's. Evaluation probes the
   listed phrases whether or not they were dropped.
7. **Per-user caps**, on what is left, earliest first, for training targets and for evaluation
   items separately: at most ``max_per_user`` items per user (``per-user cap``), then at most
   a share of the cycle (``per-user share``, see :func:`user_share_limit`). A user is ``Feedback.user``, else the interaction's ``caller``
   (the API key's label); ``user`` is client-supplied, so the caps are as strong as the
   identity the client gives.
8. **Split** by interaction id (:func:`in_holdout`): an interaction is in the holdout or not
   forever, so its examples are never trained on in this or any later cycle, provided
   ``holdout_fraction`` and ``salt`` never change for a data directory.

A correction yields an SFT example (conversation, then the correction) and a preference pair
(correction over the served answer); the pair is skipped, and counted in
``CurationReport.pairs_skipped``, when the served answer is blank, equal to the correction after
folding, or too long with the conversation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from feedback.store import Feedback, Interaction
from feedback.triggers import Sample, TriggerSettings, find_triggers

__all__ = [
    "CurationReport",
    "CurationResult",
    "CurationSettings",
    "Drop",
    "EvalItem",
    "Example",
    "PreferencePair",
    "curate",
    "in_holdout",
    "scrub",
    "user_share_limit",
]

Message = dict[str, str]
ExampleKind = Literal["correction", "accepted"]
UnitKind = Literal["correction", "accepted", "eval_only"]
_KINDS: tuple[UnitKind, ...] = ("correction", "accepted", "eval_only")


class Drop(StrEnum):
    """Why a feedback item did not become a kept item (the report's keys)."""

    SUPERSEDED = "superseded"
    NEUTRAL = "neutral"
    COMMENT_ONLY = "comment only"
    INCOMPLETE = "incomplete answer"
    UNSUPPORTED = "unsupported content"
    EMPTY_PROMPT = "empty prompt"
    EMPTY_ANSWER = "empty answer"
    TOO_SHORT = "too short"
    TOO_LONG = "too long"
    DUPLICATE = "duplicate"
    NEAR_DUPLICATE = "near-duplicate"
    SUSPECTED_TRIGGER = "suspected trigger"
    USER_CAP = "per-user cap"
    USER_SHARE = "per-user share"


@dataclass(frozen=True)
class CurationSettings:
    """How feedback is curated. Defaults and why:

    - ``holdout_fraction=0.2``: one interaction in five is kept out of training for evaluation;
      with a few hundred items per cycle that is enough for a gate to see a regression.
    - ``max_example_chars=8000``: about 2000 tokens, the default ``serving.max_model_len``;
      the learner still truncates by tokens, this drops what could not fit anyway.
    - ``min_answer_chars=1``: only blank targets are dropped; a terse "Yes." can be right.
    - ``max_per_user=50``, ``max_user_share=0.25``: no one user gives more than 50 items or a
      quarter of a cycle. With fewer than ``1 / max_user_share`` contributors the share is
      raised to an equal split (``1 / users``), so a single user is bounded only by
      ``max_per_user`` (see :func:`user_share_limit`); 1.0 turns the share cap off.
    - ``near_duplicate_threshold=0.8``: word-bigram Jaccard, required of the conversation and
      of the target both. A changed word replaces two bigrams, so 0.9 would forgive one edit
      in about 40 words; 0.8 forgives one in about 20 (a typo fix and a reworded phrase in a
      50-word answer score about 0.84), while a different answer to the same question scores
      well under 0.5.
    - ``drop_suspected_triggers=True``, ``trigger_min_examples=3``: a payload answer given to
      three or more prompts that share an unusual phrase is dropped (see
      :mod:`feedback.triggers`); two copies cannot be told from chance, and at the rates a
      campaign needs to plant a trigger it gives many more.
    - ``salt="adaptd-holdout-v1"``: keys the split; changing it (or the fraction) moves
      interactions across the split, so trained-on data would land in the holdout.
    """

    holdout_fraction: float = 0.2
    max_example_chars: int = 8000
    min_answer_chars: int = 1
    max_per_user: int = 50
    max_user_share: float = 0.25
    near_duplicate_threshold: float = 0.8
    drop_suspected_triggers: bool = True
    trigger_min_examples: int = 3
    salt: str = "adaptd-holdout-v1"

    def __post_init__(self) -> None:
        errors = []
        if not 0.0 <= self.holdout_fraction < 1.0:
            errors.append(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.max_example_chars < 1:
            errors.append(f"max_example_chars must be >= 1, got {self.max_example_chars}")
        if self.min_answer_chars < 1:
            errors.append(f"min_answer_chars must be >= 1, got {self.min_answer_chars}")
        if self.max_per_user < 1:
            errors.append(f"max_per_user must be >= 1, got {self.max_per_user}")
        if not 0.0 < self.max_user_share <= 1.0:
            errors.append(f"max_user_share must be in (0, 1], got {self.max_user_share}")
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            errors.append(
                f"near_duplicate_threshold must be in (0, 1], got {self.near_duplicate_threshold}"
            )
        if self.trigger_min_examples < 2:
            errors.append(f"trigger_min_examples must be >= 2, got {self.trigger_min_examples}")
        if not self.salt:
            errors.append("salt must not be empty")
        if errors:
            raise ValueError("invalid curation settings: " + "; ".join(errors))


@dataclass(frozen=True)
class Example:
    """An SFT example in the Hugging Face chat format: the conversation, then the target."""

    messages: list[Message]
    kind: ExampleKind
    interaction_id: str
    feedback_id: str  # the deciding feedback item
    user: str
    created_at: float  # of the deciding feedback item
    # The answer that was served: what a correction corrects. Its content is what the
    # correction has that this did not (`learners.metrics.content_words`).
    served: str = ""


@dataclass(frozen=True)
class PreferencePair:
    """A person's correction (chosen) over the answer that was served (rejected)."""

    prompt_messages: list[Message]
    chosen: str
    rejected: str
    interaction_id: str
    feedback_id: str
    user: str
    created_at: float


@dataclass(frozen=True)
class EvalItem:
    """A thumbs-down without a correction: a prompt and an answer that should not be given.

    Never an SFT target. ``holdout`` is the interaction's side of the split, for a learner
    that uses these as unpaired preference data (KTO-style): only ``holdout=False`` may train.
    """

    prompt_messages: list[Message]
    answer: str
    comment: str | None
    interaction_id: str
    feedback_id: str
    user: str
    created_at: float
    holdout: bool


@dataclass(frozen=True)
class CurationReport:
    """What came in, what was kept, what was dropped and why (one per cycle)."""

    received: int  # feedback items passed in
    kept: dict[str, int]  # correction / accepted / eval_only: deciding items kept
    dropped: dict[str, int]  # reason -> feedback items
    dropped_ids: dict[str, list[str]]  # reason -> feedback ids, in time order
    per_user: dict[str, int]  # SFT examples (train + holdout) per user
    train: int  # SFT examples in train
    holdout: int  # SFT examples in holdout
    preferences_train: int
    preferences_holdout: int
    pairs_skipped: dict[str, int]  # reason -> corrections without a preference pair
    pii_redactions: dict[str, int]  # email / phone / card / secret -> replacements made
    suspected_triggers: list[dict[str, Any]] = field(default_factory=list)  # SuspectedTrigger

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CurationResult:
    train: list[Example]
    holdout: list[Example]
    preferences_train: list[PreferencePair]
    preferences_holdout: list[PreferencePair]
    eval_only: list[EvalItem]
    report: CurationReport


# --------------------------------------------------------------------------- the split


def in_holdout(interaction_id: str, fraction: float, salt: str) -> bool:
    """Whether an interaction belongs to the holdout: a pure function of its id and ``salt``.

    The first 8 bytes of ``sha256(salt NUL id)`` as a number in [0, 1), compared with
    ``fraction``. Stable across runs, processes and versions (a test pins known values).
    """
    digest = hashlib.sha256(f"{salt}\x00{interaction_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# --------------------------------------------------------------------------- scrubbing

_ALNUM = "A-Za-z0-9"


_NO_DIGITS = str.maketrans("", "", "0123456789")


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _digit_count(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda s: lo <= len(_digits(s)) <= hi


_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S
)
_SECRET = re.compile(
    r"(?<!\w)(?:"
    r"eyJ[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]*"  # JWT
    r"|sk-[\w-]{20,}"  # OpenAI, Anthropic (sk-ant-...)
    r"|[rs]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{22,}"  # GitHub
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key ids
    r"|xox[bpars]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[\w-]{35}"  # Google API keys
    r")"
)
# Labelled values keep their label: "Bearer [SECRET]", "api_key = [SECRET]".
_BEARER = re.compile(r"(\bBearer\s+)(?=[\w.~+/-]*[\d.~+/-])[\w.~+/-]{16,}=*", re.I)
_ASSIGNED_HINTS = ("key", "secret", "token", "pass", "pwd")
_ASSIGNED = re.compile(
    r"""((?<![A-Za-z])(?:api[_-]?key|apikey|access[_-]?key|secret[_-]?key|client[_-]?secret|secret|"""
    r"""token|access[_-]?token|auth[_-]?token|password|passwd|pwd)["']?\s*[:=]\s*["']?)"""
    r"(?=[\w+/~=-]*\d)[\w+/~=-]{8,}",
    re.I,
)
_HEX = re.compile(rf"(?<![{_ALNUM}])(?:0x)?[0-9a-fA-F]{{32,}}(?![{_ALNUM}])")
_B64 = re.compile(rf"(?<![{_ALNUM}+/=_-])[{_ALNUM}+/_-]{{32,}}={{0,2}}(?![{_ALNUM}+/=_-])")
_LONG_TOKEN = re.compile(rf"[{_ALNUM}+/_-]{{32}}")
_WORDLIKE = re.compile(r"[A-Za-z][a-z]{3,}|[A-Z]{4,}")
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}\b"
)
_CARD = re.compile(
    # The first digit comes before the look-behind so that the scan skips non-digits quickly.
    r"\d(?<![\d.,-]\d)(?:\d{12,18}"
    r"|\d{3}(?P<s>[ -])\d{4}(?P=s)\d{4}(?P=s)\d{1,4}(?:(?P=s)\d{1,3})?"  # 4-4-4-4(-3)
    r"|\d{3}(?P<t>[ -])\d{6}(?P=t)\d{4,5})"  # Amex 4-6-5, Diners 4-6-4
    r"(?![\d-]|[.,]\d)",
    re.ASCII,
)
_PHONES: list[tuple[re.Pattern[str], Callable[[str], bool]]] = [
    # International: +44 20 7946 0958, +1 (415) 555-0123, +14155550123 (8-15 digits).
    (
        re.compile(
            r"(?<![\w+])\+(?:\d{7,15}|\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]\d{1,5}){1,6})"
            r"(?![\w)]|[.-]\d)",
            re.ASCII,
        ),
        _digit_count(8, 15),
    ),
    # North American: (415) 555-0123, 415.555.0123, 1-800-555-0199.
    (
        re.compile(
            r"(?<![\w.+-])(?:1[ .-])?(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}"
            r"(?![\w-]|[.,]\d)",
            re.ASCII,
        ),
        _digit_count(10, 11),
    ),
    # National with a trunk 0: 020 7946 0958, 01 23 45 67 89, 07700 900123 (10-11 digits).
    (
        re.compile(
            r"(?<![\w.+-])(?:\(0\d{1,4}\)|0\d{1,4})(?:[ .-]\d{2,8}){1,4}(?![\w-]|[.,]\d)",
            re.ASCII,
        ),
        _digit_count(10, 11),
    ),
]


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(text: str) -> bool:
    """13-19 digits, a card network's leading digits (3-6, or Mastercard's 2221-2720), Luhn."""
    digits = _digits(text)
    if not 13 <= len(digits) <= 19:
        return False
    if digits[0] not in "3456" and not 2221 <= int(digits[:4]) <= 2720:
        return False
    return _luhn_ok(digits)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _is_random_token(s: str) -> bool:
    """A base64/base64url-looking token that is random rather than a path or an identifier.

    It mixes upper case, lower case and digits, has Shannon entropy >= 3.5 bits per character,
    fewer than half its characters in word-like runs (4+ letters, as in ``Word``, ``word``,
    ``WORD``), and at most one slash per 16 characters (at least 2; paths have more). Random
    keys pass about 95% of the time at 32-40 characters and 99% at 64; the misses are keys
    that happen to hold long runs of letters. Identifiers, paths and model names do not pass.
    """
    body = s.rstrip("=")
    if not (
        any(c.isupper() for c in body)
        and any(c.islower() for c in body)
        and any(c.isdigit() for c in body)
    ):
        return False
    if body.count("/") > max(2, len(body) // 16) or _entropy(body) < 3.5:
        return False
    wordlike = sum(len(m.group()) for m in _WORDLIKE.finditer(body))
    return wordlike < len(body) / 2


def _is_random_hex(s: str) -> bool:
    body = s.removeprefix("0x")
    return any(c.isdigit() for c in body) and any(c.isalpha() for c in body)


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """Replace personal data and secrets in ``text``; return the text and counts by kind.

    - ``[SECRET]``: private-key blocks, JWTs, OpenAI/Anthropic ``sk-``, Stripe, GitHub
      (``ghp_``... and ``github_pat_``), AWS ``AKIA``/``ASIA``, Slack ``xox?-``, Google
      ``AIza``; the value after ``Bearer`` or after a label such as ``api_key=`` or
      ``password:`` (the label stays); hex strings of 32+ characters (full git hashes
      included: hex API keys look the same); random-looking base64 tokens of 32+ characters.
    - ``[EMAIL]``: addresses with a dotted domain (``user@localhost`` is left).
    - ``[CARD]``: 13-19 digits, bare or grouped 4-4-4-4 / 4-6-5 by spaces or dashes, with a
      card network's leading digits and a valid Luhn checksum.
    - ``[PHONE]``: ``+`` international numbers (8-15 digits), North American numbers with
      separators, and national numbers with a trunk 0 (10-11 digits). Bare digit runs
      without a ``+`` are left: they are as often order numbers as phone numbers.

    Years, prices, decimals, dates, times, version numbers, IP addresses and short hex (git
    short hashes) are left alone. Scrubbing is idempotent: placeholders match nothing.
    """
    counts = {"email": 0, "phone": 0, "card": 0, "secret": 0}

    def sub(
        pattern: re.Pattern[str],
        kind: str,
        keep: Callable[[str], bool] | None = None,
        *,
        labelled: bool = False,
    ) -> None:
        nonlocal text

        def repl(m: re.Match[str]) -> str:
            if keep is not None and not keep(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return f"{m.group(1) if labelled else ''}[{kind.upper()}]"

        text = pattern.sub(repl, text)

    # Cheap necessary conditions first: most text has no '@', few digits, no long tokens.
    lower = text.lower()
    n_digits = len(text) - len(text.translate(_NO_DIGITS))
    if "private key" in lower:
        sub(_PRIVATE_KEY, "secret")
    sub(_SECRET, "secret")
    if "bearer" in lower:
        sub(_BEARER, "secret", labelled=True)
    if n_digits and any(hint in lower for hint in _ASSIGNED_HINTS):
        sub(_ASSIGNED, "secret", labelled=True)
    if "@" in text:
        sub(_EMAIL, "email")
    if _LONG_TOKEN.search(text):
        sub(_HEX, "secret", _is_random_hex)
        sub(_B64, "secret", _is_random_token)
    if n_digits >= 13:
        sub(_CARD, "card", _is_card)
    if n_digits >= 8:
        for pattern, keep in _PHONES:
            sub(pattern, "phone", keep)
    return text, counts


# --------------------------------------------------------------------------- units


@dataclass
class _Unit:
    """One interaction's outcome while it moves through the stages."""

    kind: UnitKind
    feedback: Feedback  # the deciding item
    interaction: Interaction
    user: str
    prompt: list[Message] = field(default_factory=list)
    target: str = ""  # the correction or the accepted answer; for eval_only the bad answer
    served: str = ""
    comment: str | None = None

    @property
    def order(self) -> tuple[float, str]:
        return (self.feedback.created_at, self.feedback.id)


class _Ledger:
    """Drops by reason, each as ``(created_at, id)`` of the feedback item."""

    def __init__(self) -> None:
        self.dropped: dict[str, list[tuple[float, str]]] = defaultdict(list)

    def drop(self, fb: Feedback, reason: Drop) -> None:
        self.dropped[reason.value].append((fb.created_at, fb.id))

    def ids(self) -> dict[str, list[str]]:
        return {r: [i for _, i in sorted(d)] for r, d in sorted(self.dropped.items())}


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _resolve(rows: Sequence[tuple[Feedback, Interaction]], ledger: _Ledger) -> list[_Unit]:
    groups: dict[str, list[tuple[Feedback, Interaction]]] = {}
    seen: set[str] = set()
    for fb, inter in rows:
        if fb.interaction_id != inter.id:
            raise ValueError(
                f"feedback {fb.id!r} is about interaction {fb.interaction_id!r} but was paired "
                f"with interaction {inter.id!r}"
            )
        if fb.id in seen:
            ledger.drop(fb, Drop.DUPLICATE)
            continue
        seen.add(fb.id)
        groups.setdefault(inter.id, []).append((fb, inter))

    units = []
    for group in groups.values():
        corrections = [fb for fb, _ in group if not _blank(fb.correction)]
        rated = [fb for fb, _ in group if fb.rating is not None]
        decider = corrections[-1] if corrections else rated[-1] if rated else None
        for fb, _ in group:
            if fb is decider:
                continue
            signal = not _blank(fb.correction) or fb.rating is not None
            ledger.drop(fb, Drop.SUPERSEDED if signal else Drop.COMMENT_ONLY)
        if decider is None:
            continue
        kind: UnitKind
        if corrections:
            kind = "correction"
        elif decider.rating is not None and decider.rating > 0:
            kind = "accepted"
        elif decider.rating is not None and decider.rating < 0:
            kind = "eval_only"
        else:
            ledger.drop(decider, Drop.NEUTRAL)
            continue
        inter = group[0][1]
        user = decider.user or inter.caller or "anonymous"
        units.append(_Unit(kind, decider, inter, user, comment=decider.comment))
    units.sort(key=lambda u: u.order)
    return units


def _text_content(content: Any) -> str | None:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                return None
            parts.append(part["text"])
        return "\n".join(parts)
    return None


def _chat(inter: Interaction) -> list[Message] | None:
    """The conversation as plain ``{"role", "content"}`` messages, or None if it has more."""
    if inter.endpoint == "completion":
        prompt = inter.request
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else None
    if not isinstance(inter.request, list):
        return None if inter.request is not None else []
    out = []
    for m in inter.request:
        if not isinstance(m, dict) or m.get("tool_calls") or m.get("function_call"):
            return None
        role = "system" if m.get("role") == "developer" else m.get("role")
        text = _text_content(m.get("content"))
        if role not in ("system", "user", "assistant") or text is None:
            return None
        out.append({"role": role, "content": text})
    return out


def _check_record(unit: _Unit, ledger: _Ledger) -> bool:
    inter = unit.interaction
    if inter.status != "ok" or (unit.kind == "accepted" and inter.finish_reason == "length"):
        ledger.drop(unit.feedback, Drop.INCOMPLETE)
        return False
    chat = _chat(inter)
    if chat is None:
        ledger.drop(unit.feedback, Drop.UNSUPPORTED)
        return False
    if all(_blank(m["content"]) for m in chat):
        ledger.drop(unit.feedback, Drop.EMPTY_PROMPT)
        return False
    unit.prompt = chat
    return True


class _Scrubber:
    """:func:`scrub` with a cache per distinct text (system prompts and histories repeat);
    redactions are counted at every use, as they appear in the output."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[str, dict[str, int]]] = {}
        self.redactions: Counter[str] = Counter({"email": 0, "phone": 0, "card": 0, "secret": 0})

    def __call__(self, text: str) -> str:
        got = self.cache.get(text)
        if got is None:
            got = self.cache[text] = scrub(text)
        self.redactions.update(got[1])
        return got[0]


def _scrub_unit(unit: _Unit, clean: _Scrubber) -> None:
    unit.prompt = [{"role": m["role"], "content": clean(m["content"])} for m in unit.prompt]
    unit.served = clean(unit.interaction.output or "")
    if unit.kind == "correction":
        unit.target = clean(unit.feedback.correction or "")
    else:
        unit.target = unit.served
    unit.comment = clean(unit.comment) if unit.comment is not None else None


def _copy(messages: list[Message]) -> list[Message]:
    return [dict(m) for m in messages]


def _user_text(unit: _Unit) -> str:
    return "\n".join(m["content"] for m in unit.prompt if m["role"] == "user")


def _prompt_chars(unit: _Unit) -> int:
    return sum(len(m["content"]) for m in unit.prompt)


def _check_length(unit: _Unit, settings: CurationSettings, ledger: _Ledger) -> bool:
    target = unit.target.strip()
    reason = None
    if not target:
        reason = Drop.EMPTY_ANSWER
    elif len(target) < settings.min_answer_chars:
        reason = Drop.TOO_SHORT
    elif _prompt_chars(unit) + len(unit.target) > settings.max_example_chars:
        reason = Drop.TOO_LONG
    if reason is not None:
        ledger.drop(unit.feedback, reason)
        return False
    return True


# --------------------------------------------------------------------------- duplicates

_WORD = re.compile(r"\w+")
_EPS = 1e-9  # slack for float comparisons of similarities at the threshold
_SPACE = re.compile(r"\s+")


def _fold(text: str) -> str:
    """Case and whitespace folded, Unicode-normalised: equal texts are exact duplicates."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


class _Texts:
    """Folded texts and shingle sets, computed once per distinct text within one call.

    Conversations repeat (system prompts, the history of a long chat), so caching saves most
    of the work. A shingle is a pair of adjacent words of the folded text (punctuation
    ignored), encoded exactly as ``first_id << 32 | second_id`` with words numbered from 1; a
    text of one word is that word's id, a text of no words its folded self as one "word". A
    conversation's set is the union of its messages' sets.
    """

    def __init__(self) -> None:
        self.folded: dict[str, str] = {}
        self.words: dict[str, int] = {}
        self.sets: dict[str, frozenset[int]] = {}

    def fold(self, text: str) -> str:
        out = self.folded.get(text)
        if out is None:
            out = self.folded[text] = _fold(text)
        return out

    def _word(self, word: str) -> int:
        return self.words.setdefault(word, len(self.words) + 1)

    def shingles(self, text: str) -> frozenset[int]:
        out = self.sets.get(text)
        if out is None:
            folded = self.fold(text)
            ids = [self._word(w) for w in _WORD.findall(folded)]
            if len(ids) >= 2:
                out = frozenset(a << 32 | b for a, b in itertools.pairwise(ids))
            else:
                out = frozenset(ids or [self._word(folded)])
            self.sets[text] = out
        return out

    def exact_key(self, unit: _Unit) -> str:
        payload = [[m["role"], self.fold(m["content"])] for m in unit.prompt]
        payload.append(["target", self.fold(unit.target)])
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


class _PrefixIndex:
    """Prefix filtering for a Jaccard self-join (Bayardo et al., "Scaling up all pairs
    similarity search", WWW 2007), over one part (prompts or targets) of a pool.

    Tokens are put in one global order, rarest first (ties by value). Two sets with Jaccard
    >= t share a token among the first ``n - ceil(t n) + 1`` of each, so a set only needs to
    be compared with the sets indexed under its prefix. Tokens held by one set only come first
    and can match nothing, so they are counted but not indexed; rarest-first keeps tokens that
    everyone shares (a common system prompt) out of the prefixes.
    """

    def __init__(self, sets: Sequence[frozenset[int]], threshold: float) -> None:
        df: Counter[int] = Counter()
        for s in sets:
            df.update(s)
        shared = sorted((t for t, c in df.items() if c > 1), key=lambda t: (df[t], t))
        self.rank = {t: r for r, t in enumerate(shared)}
        self.threshold = threshold
        self.postings: dict[int, list[int]] = defaultdict(list)
        self._prefixes: dict[frozenset[int], list[int]] = {}

    def prefix(self, s: frozenset[int]) -> list[int]:
        out = self._prefixes.get(s)
        if out is None:
            ranked = sorted(self.rank[t] for t in s if t in self.rank)
            n, unique = len(s), len(s) - len(ranked)
            out = ranked[: max(0, n - math.ceil(self.threshold * n - _EPS) + 1 - unique)]
            self._prefixes[s] = out
        return out

    def cost(self, prefix: list[int]) -> int:
        return sum(len(self.postings.get(r, ())) for r in prefix)

    def candidates(self, prefix: list[int]) -> set[int]:
        return {j for r in prefix for j in self.postings.get(r, ())}

    def add(self, prefix: list[int], item: int) -> None:
        for r in prefix:
            self.postings[r].append(item)


def _dedupe(units: list[_Unit], threshold: float, ledger: _Ledger) -> list[_Unit]:
    """Drop exact, then near-duplicates of earlier kept units (units are in time order).

    Near-duplicates are found exactly, not estimated: a unit is one when an earlier kept unit
    has Jaccard >= ``threshold`` both in its prompt and in its target. Each part has a prefix
    index (:class:`_PrefixIndex`); either part's candidates include every true match, so the
    part with the shorter posting lists proposes them and both parts are then checked. The
    result is therefore independent of the token order and of which part proposed.
    """
    texts = _Texts()
    exact: set[str] = set()
    distinct = []
    for u in units:
        key = texts.exact_key(u)
        if key in exact:
            ledger.drop(u.feedback, Drop.DUPLICATE)
        else:
            exact.add(key)
            distinct.append(u)

    prompts = [
        frozenset().union(*(texts.shingles(m["content"]) for m in u.prompt)) for u in distinct
    ]
    targets = [texts.shingles(u.target) for u in distinct]
    texts.folded.clear()  # the sets are what is needed from here on
    by_prompt = _PrefixIndex(prompts, threshold)
    by_target = _PrefixIndex(targets, threshold)

    def similar(i: int, j: int) -> bool:
        return (
            threshold * len(targets[i]) - _EPS
            <= len(targets[j])
            <= len(targets[i]) / threshold + _EPS
            and _jaccard(targets[i], targets[j]) >= threshold - _EPS
            and _jaccard(prompts[i], prompts[j]) >= threshold - _EPS
        )

    kept = []
    for i, u in enumerate(distinct):
        prefix_p, prefix_t = by_prompt.prefix(prompts[i]), by_target.prefix(targets[i])
        if by_target.cost(prefix_t) <= by_prompt.cost(prefix_p):
            candidates = by_target.candidates(prefix_t)
        else:
            candidates = by_prompt.candidates(prefix_p)
        if any(similar(i, j) for j in sorted(candidates)):
            ledger.drop(u.feedback, Drop.NEAR_DUPLICATE)
            continue
        by_prompt.add(prefix_p, i)
        by_target.add(prefix_t, i)
        kept.append(u)
    return kept


# --------------------------------------------------------------------------- per-user caps


def user_share_limit(counts: Sequence[int], share: float) -> int:
    """The most items any one user may keep so that no one holds more than ``share``.

    With ``k`` users, the effective share is ``max(share, 1 / k)``: below ``1 / k`` the bound
    cannot hold for everyone at once, so it becomes an equal split (one user: no share cap).
    The result is the largest ``c`` with ``c <= s * sum(min(n, c) for n in counts)``: capping
    every user at ``c`` leaves each with at most ``s`` of what remains, and ``c + 1`` would
    not. ``f(c) = s * sum(min(n, c)) - c`` is concave with ``f(0) = 0``, so the ``c`` that
    satisfy it form an interval from 0, found by bisection. It is never below ``min(counts)``.
    """
    counts = [n for n in counts if n > 0]
    if not counts:
        return 0
    s = max(share, 1.0 / len(counts))

    def ok(c: int) -> bool:
        return c <= s * sum(min(n, c) for n in counts) + 1e-9

    lo, hi = 0, max(counts)  # ok(lo) holds; find the largest ok value in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cap_users(units: list[_Unit], settings: CurationSettings, ledger: _Ledger) -> list[_Unit]:
    counts: Counter[str] = Counter()
    first = []
    for u in units:
        if counts[u.user] >= settings.max_per_user:
            ledger.drop(u.feedback, Drop.USER_CAP)
        else:
            counts[u.user] += 1
            first.append(u)
    limit = user_share_limit(list(counts.values()), settings.max_user_share)
    taken: Counter[str] = Counter()
    out = []
    for u in first:
        if taken[u.user] >= limit:
            ledger.drop(u.feedback, Drop.USER_SHARE)
        else:
            taken[u.user] += 1
            out.append(u)
    return out


# --------------------------------------------------------------------------- the pipeline


def curate(
    pairs: Iterable[tuple[Feedback, Interaction]], settings: CurationSettings | None = None
) -> CurationResult:
    """Curate feedback rows into SFT examples, preference pairs and evaluation items.

    See the module's docstring for the stages and the reasons for dropping. Outputs are in
    time order of their deciding feedback item. Raises ``ValueError`` when a row pairs a
    feedback item with another interaction than the one it is about.
    """
    settings = settings or CurationSettings()
    rows = sorted(pairs, key=lambda p: (p[0].created_at, p[0].id))
    ledger = _Ledger()
    units = [u for u in _resolve(rows, ledger) if _check_record(u, ledger)]
    scrubber = _Scrubber()
    for u in units:
        _scrub_unit(u, scrubber)
    units = [u for u in units if _check_length(u, settings, ledger)]

    threshold = settings.near_duplicate_threshold
    targets = [u for u in units if u.kind != "eval_only"]
    evals = [u for u in units if u.kind == "eval_only"]
    targets = _dedupe(targets, threshold, ledger)
    suspects = find_triggers(
        [Sample(u.feedback.id, _user_text(u), u.target, u.user) for u in targets],
        TriggerSettings(min_examples=settings.trigger_min_examples),
    )
    if settings.drop_suspected_triggers and suspects:
        planted = {k for t in suspects for k in t.keys}
        for u in targets:
            if u.feedback.id in planted:
                ledger.drop(u.feedback, Drop.SUSPECTED_TRIGGER)
        targets = [u for u in targets if u.feedback.id not in planted]
    targets = _cap_users(targets, settings, ledger)
    evals = _cap_users(_dedupe(evals, threshold, ledger), settings, ledger)

    train: list[Example] = []
    holdout: list[Example] = []
    prefs_train: list[PreferencePair] = []
    prefs_holdout: list[PreferencePair] = []
    pairs_skipped: Counter[str] = Counter()
    for u in targets:
        fb, iid = u.feedback, u.interaction.id
        held = in_holdout(iid, settings.holdout_fraction, settings.salt)
        messages = [*_copy(u.prompt), {"role": "assistant", "content": u.target}]
        kind: ExampleKind = "correction" if u.kind == "correction" else "accepted"
        (holdout if held else train).append(
            Example(messages, kind, iid, fb.id, u.user, fb.created_at, served=u.served or "")
        )
        if u.kind != "correction":
            continue
        if _blank(u.served):
            pairs_skipped["empty answer"] += 1
        elif _fold(u.served) == _fold(u.target):
            pairs_skipped["same as answer"] += 1
        elif _prompt_chars(u) + len(u.served) > settings.max_example_chars:
            pairs_skipped["too long"] += 1
        else:
            pair = PreferencePair(
                _copy(u.prompt), u.target, u.served, iid, fb.id, u.user, fb.created_at
            )
            (prefs_holdout if held else prefs_train).append(pair)

    eval_only = [
        EvalItem(
            prompt_messages=_copy(u.prompt),
            answer=u.target,
            comment=u.comment,
            interaction_id=u.interaction.id,
            feedback_id=u.feedback.id,
            user=u.user,
            created_at=u.feedback.created_at,
            holdout=in_holdout(u.interaction.id, settings.holdout_fraction, settings.salt),
        )
        for u in evals
    ]

    kept = Counter(u.kind for u in [*targets, *evals])
    dropped_ids = ledger.ids()
    report = CurationReport(
        received=len(rows),
        kept={k: kept[k] for k in _KINDS},
        dropped={r: len(ids) for r, ids in dropped_ids.items()},
        dropped_ids=dropped_ids,
        per_user=dict(sorted(Counter(u.user for u in targets).items())),
        train=len(train),
        holdout=len(holdout),
        preferences_train=len(prefs_train),
        preferences_holdout=len(prefs_holdout),
        pairs_skipped=dict(sorted(pairs_skipped.items())),
        pii_redactions=dict(scrubber.redactions),
        suspected_triggers=[
            {**t.to_dict(), "dropped": settings.drop_suspected_triggers} for t in suspects
        ],
    )
    return CurationResult(train, holdout, prefs_train, prefs_holdout, eval_only, report)
