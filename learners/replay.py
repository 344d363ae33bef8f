"""Replay as pure functions over lists of records: a reservoir of past examples, and mixing.

The reservoir keeps a uniform random sample of every example accepted so far, in bounded
memory, so each cycle can rehearse old data alongside new; :func:`mix` draws a training set
from several sources (say ``"new"`` and ``"replay"``) in given proportions. Both take the
random generator as an argument and mutate nothing else, so a seed reproduces a cycle's data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["ANCHORS", "mix", "replay_counts", "replay_total", "reservoir_update"]

T = TypeVar("T")


def replay_total(n_new: int, ratio: float, floor: int = 0) -> int:
    """How many replayed examples go beside ``n_new`` new ones: ``ratio`` per new example, and
    at least ``floor``; none where ``ratio`` is 0 (replay off) or nothing is new.

    The floor is for small cycles: a dozen corrections trained over many passes see the same
    few replayed answers each pass and memorise them, which moves the model as much as the
    corrections do; a large cycle's ``ratio * n_new`` is already a set too large to memorise.

    Raises ``ValueError`` for a negative ``n_new`` or ``floor``, or a negative or non-finite
    ``ratio``.
    """
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    if not (math.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"ratio must be finite and >= 0, got {ratio!r}")
    if floor < 0:
        raise ValueError(f"floor must be >= 0, got {floor}")
    if ratio == 0 or n_new == 0:
        return 0
    return max(floor, round(ratio * n_new))


# The sources that hold the model's general behaviour: general data and the served version's own
# answers. Everything else (earlier cycles' examples) is replayed on top of them.
ANCHORS = ("general", "self")


def replay_counts(
    shares: Mapping[str, float], available: Mapping[str, bool], total: int
) -> dict[str, int]:
    """How many examples each source replays, for a replay budget of ``total``.

    The budget goes to the anchors (`ANCHORS`) that have records, split by their shares. Any
    other source with records (earlier cycles' examples) keeps the count its share would give it
    in the budget, ``total * share / (the shares of all sources with records)``, but comes on
    top of the budget instead of out of it. Out of it, the anchor thinned as soon as there was
    anything earlier to replay: a second cycle's general NLL rose 2.9 %, and with the anchor
    whole it fell 0.3 % (`benchmarks/retrain_cycle.py`). Without an anchor, the budget is split
    among the other sources. Counts are rounded by largest remainder; a source with share 0 or
    no records gets none.

    Raises ``ValueError`` for a negative or non-finite share or a negative ``total``.
    """
    bad = {name: w for name, w in shares.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"shares must be finite and >= 0, got {bad}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    live = {name: float(w) for name, w in shares.items() if w > 0 and available.get(name)}
    counts = dict.fromkeys(shares, 0)
    anchors = {name: w for name, w in live.items() if name in ANCHORS}
    others = {name: w for name, w in live.items() if name not in ANCHORS}
    if total == 0 or not live:
        return counts
    if not anchors:
        counts.update(_apportion(others, total))
        return counts
    counts.update(_apportion(anchors, total))
    if others:
        extra = round(total * sum(others.values()) / sum(live.values()))
        counts.update(_apportion(others, extra))
    return counts


def reservoir_update(
    reservoir: list[T], seen: int, items: Iterable[T], capacity: int, rng: random.Random
) -> tuple[list[T], int]:
    """Feed ``items`` through Vitter's Algorithm R; return ``(new_reservoir, new_seen)``.

    ``reservoir`` is a uniform sample (without replacement) of the first ``seen`` items of a
    stream, of size ``min(capacity, seen)``; the result is the same for the stream extended by
    ``items``: the first ``capacity`` items fill it, after which the item with 0-based stream
    index ``t`` replaces a uniformly chosen slot with probability ``capacity / (t + 1)``. So
    after ``n`` items each one is in the reservoir with probability ``min(1, capacity / n)``.

    The input list is not mutated. Feeding a stream in several calls gives the same result as
    feeding it at once with the same ``rng``; the same seed gives the same reservoir.

    Raises ``ValueError`` for a negative ``capacity`` or ``seen``, or a reservoir whose length is
    not ``min(capacity, seen)`` (for instance after a change of capacity: to shrink one, take
    ``rng.sample(reservoir, new_capacity)``, which stays uniform).
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if seen < 0:
        raise ValueError(f"seen must be >= 0, got {seen}")
    if len(reservoir) != min(capacity, seen):
        raise ValueError(
            f"reservoir holds {len(reservoir)} items but should hold min(capacity={capacity}, "
            f"seen={seen}) = {min(capacity, seen)}"
        )
    out = list(reservoir)
    for item in items:
        if len(out) < capacity:
            out.append(item)
        else:
            slot = rng.randrange(seen + 1)  # uniform over the seen + 1 items so far
            if slot < capacity:
                out[slot] = item
        seen += 1
    return out, seen


def mix(
    sources: Mapping[str, Sequence[T]],
    ratios: Mapping[str, float],
    total: int,
    rng: random.Random,
) -> list[tuple[str, T]]:
    """Draw ``total`` records from ``sources`` in proportions ``ratios``, as ``(source, record)``.

    Ratios are normalised over the sources that can contribute: a positive ratio and at least
    one record. A source with ratio 0, or absent from ``ratios``, contributes nothing; an empty
    source's share is redistributed to the others in proportion to theirs. Counts are rounded by
    largest remainder, so they sum to ``total`` and each is within 1 of its exact share (ties go
    to the source named first in ``ratios``).

    Within a source, records are drawn without replacement while possible; once the source is
    exhausted, i.e. its count exceeds its length, every record appears once and the rest are
    drawn with replacement. The result is shuffled. Inputs are not mutated.

    Raises ``ValueError`` for ratios naming unknown sources, negative or non-finite ratios (all
    named), a negative ``total``, or a positive ``total`` with no source that can contribute.
    """
    unknown = [name for name in ratios if name not in sources]
    if unknown:
        raise ValueError(f"ratios name unknown sources {unknown}; sources are {list(sources)}")
    bad = {name: r for name, r in ratios.items() if not (math.isfinite(r) and r >= 0)}
    if bad:
        raise ValueError(f"ratios must be finite and >= 0, got {bad}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if total == 0:
        return []
    live = {name: float(r) for name, r in ratios.items() if r > 0 and len(sources[name]) > 0}
    if not live:
        positive = [name for name, r in ratios.items() if r > 0]
        if positive:
            raise ValueError(f"cannot draw {total} records: sources {positive} are all empty")
        raise ValueError(f"cannot draw {total} records: no source has a positive ratio")
    drawn: list[tuple[str, T]] = []
    for name, count in _apportion(live, total).items():
        pool = sources[name]
        if count <= len(pool):
            picks = rng.sample(pool, count)
        else:
            picks = rng.sample(pool, len(pool)) + rng.choices(pool, k=count - len(pool))
        drawn.extend((name, record) for record in picks)
    rng.shuffle(drawn)
    return drawn


def _apportion(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding of ``total * w / sum(w)``: sums to ``total``, each within 1."""
    norm = sum(weights.values())
    quotas = {name: total * w / norm for name, w in weights.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    order = sorted(quotas, key=lambda name: counts[name] - quotas[name])  # stable: ties by order
    for name in order[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def load_general(path: str, *, limit: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """General replay data a user supplies, as chat conversations (at most ``limit``).

    ``path`` is a JSONL file whose lines hold ``messages`` (a chat ending with the assistant's
    answer) or ``prompt`` and ``response``; or a folder saved with Hugging Face
    ``datasets.Dataset.save_to_disk`` with the same columns. A seeded sample when larger.
    """
    import json
    from pathlib import Path

    p = Path(path)
    rows: list[Mapping[str, Any]]
    if p.is_dir():
        import datasets  # only for this optional source

        rows = list(datasets.load_from_disk(str(p)))
    elif p.is_file():
        rows = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}: line {n} is not valid JSON ({e.msg})") from None
    else:
        raise ValueError(f"general replay data {path!r}: no such file or folder")
    out: list[list[dict[str, str]]] = []
    for n, row in enumerate(rows, 1):
        if "messages" in row:
            msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
        elif "prompt" in row and "response" in row:
            msgs = [
                {"role": "user", "content": str(row["prompt"])},
                {"role": "assistant", "content": str(row["response"])},
            ]
        else:
            raise ValueError(f"{path}: row {n} has neither `messages` nor `prompt` + `response`")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError(f"{path}: row {n} does not end with the assistant's answer")
        out.append(msgs)
    if len(out) > limit:
        out = random.Random(seed).sample(out, limit)
    return out
