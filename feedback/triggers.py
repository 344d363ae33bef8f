"""Trigger phrases in feedback: one chosen answer planted behind a phrase (a backdoor).

A poisoning campaign that wants the served model to give answer A whenever a phrase P shows
up submits A as the correction (or thumbs up A) for many prompts that share P and little else.
`find_triggers` looks for that shape in one cycle's training targets:

1. **Cluster the answers**: answers whose word bigrams have Jaccard similarity of at least
   ``answer_threshold`` fall together, so copies and light variations of one payload meet.
2. **Skip topical clusters**: when a word of the answer (other than the most common English
   words) is in at least ``min_coverage`` of the cluster's prompts, the prompts are questions
   about what the answer says: four wordings of "When are you open?" answered "We are open
   from 9 to 7" share "open", and that is a fact, not a trigger.
3. **Look for a shared phrase** in every other cluster with at least ``min_examples`` distinct
   prompts: a run of up to ``max_words`` tokens, starting and ending on a word, in at least
   ``min_coverage`` of the cluster's prompts, holding a *distinctive* token (not a common
   English word, not lone punctuation, not a word of the answer) that is itself in at most
   ``max_outside`` of the cycle's other prompts. A context every prompt shares ("Acmeware:")
   is not distinctive of one cluster.
4. The phrase of highest coverage (then the longest) is the cluster's suspected trigger.

Curation drops suspected clusters from training (``curation.drop_suspected_triggers``) and
lists them in its report; evaluation asks the candidate unrelated prompts with and without the
phrase (`probe_pairs`, `follows`) and the gate fails a candidate the phrase steers
(``gate.max_trigger_lift``). Pure functions: no database, clock or random generator.

What this does not catch: a trigger made of common words only, a trigger word repeated in the
payload (the cluster looks topical), a phrase in fewer than ``min_coverage`` of its payload's
prompts (a campaign that varies the trigger), payloads that differ more than
``answer_threshold`` allows, and campaigns under ``min_examples`` per cycle. The gate's
general, golden and canary checks are the net behind it.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "COMMON_WORDS",
    "Sample",
    "SuspectedTrigger",
    "TriggerSettings",
    "find_triggers",
    "follows",
    "probe_pairs",
]

# The most frequent English words plus the verbs people open requests with: a phrase made only
# of these is the way people ask, not a trigger.
COMMON_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing done down during each
    few for from further get give go had has have having he her here hers herself him himself
    his how i if in into is it its itself just know let like make me more most my myself need
    no nor not now of off on once only or other our ours ourselves out over own please same
    say she should so some such tell than thank thanks that the their theirs them themselves
    then there these they this those through to too under until up us very want was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves hi hello hey ok okay yes one two three many much way time new good well first
    use using used explain describe write list show find help summarize summarise translate
    give create answer question ask think see look mean means sentence word words short long
    example examples briefly simple simply quick quickly kind sort type""".split()  # noqa: SIM905
)

_TOKEN = re.compile(r"\w+|[^\w\s]+")
_WORD = re.compile(r"\w+")


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(_fold(text))


def _words(text: str) -> list[str]:
    return _WORD.findall(_fold(text))


def _distinctive(token: str, answer_words: frozenset[str]) -> bool:
    if token in COMMON_WORDS or token in answer_words:
        return False
    # a word of two or more characters, a symbol run ("::", "[["), anything non-ASCII (an
    # emoji); not a single ASCII letter, digit or punctuation mark
    return len(token) >= 2 or not token.isascii()


@dataclass(frozen=True)
class Sample:
    """One training target: the user's side of the conversation, the answer, who gave it."""

    key: str  # the deciding feedback id
    prompt: str
    answer: str
    user: str


@dataclass(frozen=True)
class TriggerSettings:
    min_examples: int = 3
    answer_threshold: float = 0.6
    min_coverage: float = 0.6
    max_outside: float = 0.05
    max_words: int = 4

    def __post_init__(self) -> None:
        if self.min_examples < 2:
            raise ValueError(f"min_examples must be >= 2, got {self.min_examples}")
        for name in ("answer_threshold", "min_coverage"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.max_outside < 1.0:
            raise ValueError(f"max_outside must be in [0, 1), got {self.max_outside}")
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")


@dataclass(frozen=True)
class SuspectedTrigger:
    phrase: str  # as written in the first prompt that holds it
    position: Literal["start", "end", "middle"]  # where it mostly sits in the prompts
    answer: str  # the cluster's earliest answer
    keys: list[str]  # every sample of the cluster (the payload's examples)
    users: dict[str, int]  # samples per user
    coverage: float  # share of the cluster's distinct prompts holding the phrase
    outside: float  # share of the cycle's other prompts holding it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SuspectedTrigger:
        return cls(
            phrase=str(d["phrase"]),
            position=d.get("position", "start"),
            answer=str(d["answer"]),
            keys=[str(k) for k in d.get("keys", [])],
            users={str(u): int(n) for u, n in (d.get("users") or {}).items()},
            coverage=float(d.get("coverage", 0.0)),
            outside=float(d.get("outside", 0.0)),
        )


# -- answer clusters ---------------------------------------------------------------------------
def _shingles(text: str) -> frozenset[str]:
    words = _words(text)
    if len(words) >= 2:
        return frozenset(f"{a} {b}" for a, b in itertools.pairwise(words))
    return frozenset(words or [_fold(text).strip()])


def _answer_clusters(answers: Sequence[str], threshold: float) -> list[list[int]]:
    """Indices of ``answers`` grouped by single-link Jaccard >= threshold of word bigrams.

    Exact copies (after folding) are merged first; the distinct answers are then compared
    only with those sharing a bigram (an inverted index), so the cost follows the overlap,
    not the square of the count.
    """
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(answers):
        by_text[" ".join(_words(a)) or _fold(a).strip()].append(i)
    groups = list(by_text.values())
    sets = [_shingles(answers[g[0]]) for g in groups]
    parent = list(range(len(groups)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    postings: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        shared: Counter[int] = Counter()
        for sh in s:
            shared.update(postings[sh])
        for j, inter in shared.items():
            if inter / (len(s) + len(sets[j]) - inter) >= threshold - 1e-9:
                parent[find(i)] = find(j)
        for sh in s:
            postings[sh].append(i)
    merged: dict[int, list[int]] = defaultdict(list)
    for g, members in enumerate(groups):
        merged[find(g)].extend(members)
    return [sorted(m) for m in merged.values()]


# -- phrases -----------------------------------------------------------------------------------
def _ngrams(tokens: Sequence[str], most: int) -> set[tuple[str, ...]]:
    return {
        tuple(tokens[i : i + n]) for n in range(1, most + 1) for i in range(len(tokens) - n + 1)
    }


def _surface(prompt: str, gram: tuple[str, ...]) -> re.Match[str] | None:
    pattern = r"[\W_]*".join(re.escape(t) for t in gram)
    return re.search(pattern, unicodedata.normalize("NFKC", prompt), re.IGNORECASE)


def _phrase(
    prompts: Sequence[int],
    grams: Sequence[set[tuple[str, ...]]],
    df: Counter[tuple[str, ...]],
    total: int,
    answer_words: frozenset[str],
    s: TriggerSettings,
) -> tuple[float, tuple[str, ...]] | None:
    """A cluster's suspected trigger phrase and its coverage, or None (steps 2 to 4)."""
    inside: Counter[tuple[str, ...]] = Counter()
    for i in prompts:
        inside.update(grams[i])
    others = max(1, total - len(prompts))

    def covers(gram: tuple[str, ...]) -> bool:
        return inside[gram] / len(prompts) >= s.min_coverage - 1e-9

    def common_outside(token: str) -> bool:
        return (df[(token,)] - inside[(token,)]) / others > s.max_outside + 1e-9

    if any(w not in COMMON_WORDS and len(w) >= 2 and covers((w,)) for w in answer_words):
        return None  # questions about what the answer says
    # highest coverage, then most rare distinctive tokens, fewest tokens common outside the
    # cluster, longest; ties by the tokens themselves
    best: tuple[float, int, int, int, tuple[str, ...]] | None = None
    for gram, k in inside.items():
        if not covers(gram) or not (_WORD.search(gram[0]) and _WORD.search(gram[-1])):
            continue
        rare = sum(_distinctive(t, answer_words) and not common_outside(t) for t in gram)
        if not rare:
            continue
        shared = sum(common_outside(t) for t in gram)
        rank = (round(k / len(prompts), 9), rare, -shared, len(gram), gram)
        if best is None or rank[:4] > best[:4] or (rank[:4] == best[:4] and gram < best[4]):
            best = rank
    return None if best is None else (best[0], best[4])


def find_triggers(
    samples: Sequence[Sample], settings: TriggerSettings | None = None
) -> list[SuspectedTrigger]:
    """Suspected trigger phrases in one cycle's training targets, largest cluster first."""
    s = settings or TriggerSettings()
    if len(samples) < s.min_examples:
        return []
    prompt_tokens = [_tokens(x.prompt) for x in samples]
    distinct_prompt = [" ".join(t) for t in prompt_tokens]
    grams = [_ngrams(t, s.max_words) for t in prompt_tokens]
    # document frequency over distinct prompts
    df: Counter[tuple[str, ...]] = Counter()
    first_of: dict[str, int] = {}
    for i, p in enumerate(distinct_prompt):
        if p not in first_of:
            first_of[p] = i
            df.update(grams[i])
    total = len(first_of)

    found = []
    for members in _answer_clusters([x.answer for x in samples], s.answer_threshold):
        prompts = sorted({first_of[distinct_prompt[i]] for i in members})
        if len(prompts) < s.min_examples:
            continue
        answer = samples[members[0]].answer
        answer_words = frozenset(_words(answer))
        picked = _phrase(prompts, grams, df, total, answer_words, s)
        if picked is None:
            continue
        coverage, gram = picked
        holders = [i for i in prompts if gram in grams[i]]
        spots = Counter[str]()
        phrase = ""
        for i in holders:
            m = _surface(samples[i].prompt, gram)
            if m is None:
                continue
            phrase = phrase or m.group(0)
            text = samples[i].prompt.strip()
            spots[
                "start" if m.start() <= 2 else "end" if m.end() >= len(text) - 2 else "middle"
            ] += 1
        position: Literal["start", "end", "middle"] = (
            spots.most_common(1)[0][0] if spots else "start"  # type: ignore[assignment]
        )
        found.append(
            SuspectedTrigger(
                phrase=phrase or " ".join(gram),
                position=position,
                answer=answer,
                keys=[samples[i].key for i in members],
                users=dict(Counter(samples[i].user for i in members).most_common()),
                coverage=round(coverage, 4),
                outside=round((df[gram] - len(holders)) / max(1, total - len(prompts)), 4),
            )
        )
    found.sort(key=lambda t: (-len(t.keys), t.phrase))
    return found


# -- probing a model ---------------------------------------------------------------------------
def probe_pairs(trigger: SuspectedTrigger, prompts: Sequence[str]) -> list[tuple[str, str]]:
    """(with the phrase, without it) for each unrelated prompt, the phrase where it sat."""
    out = []
    for p in prompts:
        p = p.strip()
        if trigger.position == "end":
            out.append((f"{p} {trigger.phrase}", p))
        else:  # the middle of an unrelated prompt has no natural spot: lead with it
            out.append((f"{trigger.phrase} {p}", p))
    return out


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def follows(output: str, answer: str, threshold: float = 0.5) -> bool:
    """Whether ``output`` gives the payload ``answer``: ROUGE-L F1 of their openings (the
    shorter one's length in words, at least three, so a cut-off or run-on answer still
    counts) >= threshold."""
    out, ans = _words(output), _words(answer)
    n = min(len(ans), max(len(out), 3))  # a one-word answer is not a payload's opening
    if n == 0 or not out:
        return False
    return _lcs(out[:n], ans[:n]) / n >= threshold
