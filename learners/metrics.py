"""Evaluation metrics: pure functions over answers, references and log-probabilities.

* Text similarity: ROUGE-L F1 and normalized exact match, computed by Hugging Face
  `evaluate` from the local metric script `learners/text_metric.py` (it loads offline).
* Likelihood: mean negative log-likelihood per token of a reference answer.
* Deltas between two models scored on the same items carry a paired bootstrap
  confidence interval: items are resampled with replacement, the same resample for
  both models, and the interval is the percentile interval of the mean difference.
* Backward transfer as TRACE defines it: BWT = 1/(T-1) * sum_{i<T} (R_{T,i} - R_{i,i}),
  where R_{j,i} is the score on task i after learning task j. Negative is forgetting.
* Golden cases: a prompt's answer must (not) contain strings, match a regex, or equal a
  string exactly.
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCRIPT = Path(__file__).with_name("text_metric.py")
_metric: Any = None
_metric_lock = threading.Lock()


@dataclass(frozen=True)
class TextScores:
    rouge_l: list[float]
    exact_match: list[float]


@dataclass(frozen=True)
class Interval:
    """The mean paired difference (b - a) with its bootstrap interval."""

    delta: float
    low: float
    high: float
    n: int
    confidence: float


def _load_metric() -> Any:
    global _metric
    with _metric_lock:
        if _metric is None:
            import evaluate

            _metric = evaluate.load(str(_SCRIPT))
        return _metric


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> TextScores:
    """Per-item ROUGE-L F1 and exact match of each prediction against its reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return TextScores([], [])
    out = _load_metric().compute(predictions=list(predictions), references=list(references))
    return TextScores(list(out["rouge_l_per_item"]), list(out["exact_match_per_item"]))


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mean_nll(logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood per token (nats)."""
    if not logprobs:
        raise ValueError("no tokens to score")
    return -sum(logprobs) / len(logprobs)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 2000,
    confidence: float = 0.9,
    seed: int = 0,
) -> Interval:
    """Mean of ``b - a`` over paired items with a percentile bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no items to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [y - x for x, y in zip(a, b, strict=False)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - confidence) / 2.0
    lo = means[max(0, math.floor(tail * resamples))]
    hi = means[min(resamples - 1, math.ceil((1.0 - tail) * resamples) - 1)]
    return Interval(sum(diffs) / n, lo, hi, n, confidence)


def backward_transfer(final: Sequence[float], at_learning: Sequence[float]) -> float:
    """TRACE's BWT: the mean of (score on task i now - score on task i right after it)."""
    if len(final) != len(at_learning):
        raise ValueError(f"{len(final)} final scores for {len(at_learning)} earlier tasks")
    if not final:
        raise ValueError("backward transfer needs at least one earlier task")
    return sum(f - s for f, s in zip(final, at_learning, strict=False)) / len(final)


@dataclass(frozen=True)
class GoldenCase:
    id: str
    messages: list[dict[str, str]]
    must_contain: tuple[str, ...] = ()
    must_not_contain: tuple[str, ...] = ()
    regex: str | None = None
    exact: str | None = None
    ignore_case: bool = True


def golden_case(raw: Mapping[str, Any], index: int) -> GoldenCase:
    """One golden case from a JSONL record; ValueError names what is wrong."""
    where = f"golden case {raw.get('id', index)!r}"
    if "messages" in raw:
        messages = raw["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: `messages` must be a non-empty list")
    elif isinstance(raw.get("prompt"), str):
        messages = [{"role": "user", "content": raw["prompt"]}]
    else:
        raise ValueError(f"{where}: give `prompt` (string) or `messages` (list)")

    def strings(key: str) -> tuple[str, ...]:
        v = raw.get(key, [])
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError(f"{where}: `{key}` must be a string or a list of strings")
        return tuple(v)

    case = GoldenCase(
        id=str(raw.get("id", f"case-{index + 1}")),
        messages=messages,
        must_contain=strings("must_contain"),
        must_not_contain=strings("must_not_contain"),
        regex=raw.get("regex"),
        exact=raw.get("exact"),
        ignore_case=bool(raw.get("ignore_case", True)),
    )
    if case.regex is not None:
        try:
            re.compile(case.regex)
        except re.error as e:
            raise ValueError(f"{where}: `regex` does not compile: {e}") from e
    if not (case.must_contain or case.must_not_contain or case.regex or case.exact is not None):
        raise ValueError(f"{where}: needs must_contain, must_not_contain, regex or exact")
    return case


def golden_check(case: GoldenCase, answer: str) -> tuple[bool, str]:
    """Whether ``answer`` passes ``case``, and why not."""
    fold = (lambda s: s.casefold()) if case.ignore_case else (lambda s: s)
    text = fold(answer)
    problems = [f"missing {s!r}" for s in case.must_contain if fold(s) not in text]
    problems += [f"contains {s!r}" for s in case.must_not_contain if fold(s) in text]
    if case.regex is not None:
        flags = re.IGNORECASE if case.ignore_case else 0
        if re.search(case.regex, answer, flags) is None:
            problems.append(f"no match for /{case.regex}/")
    if case.exact is not None and fold(answer.strip()) != fold(case.exact.strip()):
        problems.append(f"not exactly {case.exact!r}")
    return (not problems, "; ".join(problems) or "ok")


# -- content: what a correction says that the served answer did not -----------------------------
# A correction teaches its *content*: the words it has that the prompt and the answer it
# corrects did not. ROUGE-L cannot tell content from form: an answer with the correction's
# wording and a made-up name where the taught one belongs scores high on it (issue 11 measured
# +0.42 ROUGE-L with none of twelve facts learned). Content recall counts only those words.

LEARNED_RECALL = 0.5  # an answer knows a correction's content with at least this recall

_WORD_RE = re.compile(r"[0-9a-z]+(?:[:'.,/-][0-9a-z]+)*")
# Function words carry form, not content (a short list: content words are what is left).
_STOPWORD_TEXT = """a about above after again all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its
    itself just me more most my myself no nor not now of off on once only or other our ours out
    over own same she should so some such than that the their theirs them then there these they
    this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself also every s t don doesn isn it's i'm
    you're there's that's let's yes please thank thanks"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def _fold_word(w: str) -> str:
    w = w.strip("'")
    # a light plural fold, so that "parsnip" and "parsnips" match (not a stemmer)
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss") and w.isalpha():
        return w[:-1]
    return w


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``, numbers and codes kept whole ("6:40", "314b")."""
    return [_fold_word(w) for w in _WORD_RE.findall(text.casefold())]


def template_words(
    corrections: Sequence[str], *, share: float = 0.5, min_items: int = 4
) -> frozenset[str]:
    """Words found in more than ``share`` of ``corrections``: the cycle's template (form that
    corrections share), not any one correction's content. None with fewer than ``min_items``
    corrections, where a share says little."""
    if len(corrections) < min_items:
        return frozenset()
    counts: dict[str, int] = {}
    for c in corrections:
        for w in set(words(c)):
            counts[w] = counts.get(w, 0) + 1
    return frozenset(w for w, k in counts.items() if k > share * len(corrections))


def content_words(
    correction: str, *, prompt: str, served: str, template: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """The words of ``correction`` that neither the ``prompt`` nor the ``served`` answer had,
    that are not function words and not the cycle's ``template``, in order, once each."""
    known = set(words(prompt)) | set(words(served)) | STOPWORDS | template
    out: list[str] = []
    for w in words(correction):
        if w not in known and w not in out:
            out.append(w)
    return tuple(out)


def content_recall(answer: str, content: Sequence[str]) -> float | None:
    """The share of ``content`` words that ``answer`` has; None when there is no content."""
    if not content:
        return None
    have = set(words(answer))
    return sum(w in have for w in content) / len(content)
