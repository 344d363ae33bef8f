"""Reservoir invariants (hypothesis) and mixing proportions, every RNG seeded."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.replay import mix, replay_counts, replay_total, reservoir_update

capacities = st.integers(min_value=0, max_value=20)
stream_lengths = st.integers(min_value=0, max_value=80)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def stream(n: int, start: int = 0) -> list[tuple[int, str]]:
    """Records tagged with their stream index, so duplicates and origins can be checked."""
    return [(i, f"example-{i}") for i in range(start, start + n)]


# --------------------------------------------------------------------------- reservoir


@given(capacity=capacities, n=stream_lengths, seed=seeds)
def test_reservoir_invariants(capacity: int, n: int, seed: int) -> None:
    items = stream(n)
    reservoir, seen = reservoir_update([], 0, items, capacity, random.Random(seed))
    assert seen == n
    assert len(reservoir) == min(capacity, n)
    assert all(item in items for item in reservoir)  # every element came from the stream
    indices = [i for i, _ in reservoir]
    assert len(set(indices)) == len(indices)  # no stream index twice
    if n <= capacity:
        assert reservoir == items  # nothing evicted yet: the whole stream, in order


@given(capacity=capacities, n=stream_lengths, seed=seeds)
def test_reservoir_is_deterministic_for_a_seed(capacity: int, n: int, seed: int) -> None:
    a = reservoir_update([], 0, stream(n), capacity, random.Random(seed))
    b = reservoir_update([], 0, stream(n), capacity, random.Random(seed))
    assert a == b


@given(
    capacity=capacities,
    chunks=st.lists(st.integers(min_value=0, max_value=15), max_size=6),
    seed=seeds,
)
def test_reservoir_in_chunks_equals_one_pass(capacity: int, chunks: list[int], seed: int) -> None:
    # Cycles feed the reservoir a few examples at a time; that must be the same as one stream.
    total = sum(chunks)
    whole = reservoir_update([], 0, stream(total), capacity, random.Random(seed))
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for size in chunks:
        before = list(reservoir)
        new_reservoir, seen = reservoir_update(reservoir, seen, stream(size, seen), capacity, rng)
        assert reservoir == before  # the input list is not mutated
        reservoir = new_reservoir
        assert len(reservoir) == min(capacity, seen)
    assert (reservoir, seen) == whole


def test_reservoir_is_roughly_uniform_over_many_seeds() -> None:
    # 20 items, capacity 5: each item should be kept with probability 5 / 20 = 0.25. Over 4000
    # seeds the standard deviation of a frequency is sqrt(0.25 * 0.75 / 4000) ~ 0.0068, so
    # 0.04 is about 6 of them: a correct sampler passes (the seeds are fixed, so it always does),
    # while "keep the first 5" (1 / 0), "keep the last 5" or an off-by-one in the slot range
    # that skews early vs late items (e.g. 5/19 ~ 0.263 for the last, below but rising toward
    # the first: ~0.21 for the item at index 5) fail it.
    n, capacity, runs = 20, 5, 4000
    kept: Counter[int] = Counter()
    for seed in range(runs):
        reservoir, _ = reservoir_update([], 0, range(n), capacity, random.Random(seed))
        kept.update(reservoir)
    for item in range(n):
        assert abs(kept[item] / runs - capacity / n) < 0.04, (item, kept[item] / runs)


def test_reservoir_rejects_inconsistent_arguments() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError, match="capacity must be >= 0, got -1"):
        reservoir_update([], 0, [1], -1, rng)
    with pytest.raises(ValueError, match="seen must be >= 0, got -2"):
        reservoir_update([], -2, [1], 3, rng)
    with pytest.raises(ValueError, match=r"holds 2 items but should hold .* = 3"):
        reservoir_update([1, 2], 7, [1], 3, rng)


# --------------------------------------------------------------------------- mix


def counts(drawn: list[tuple[str, object]]) -> Counter[str]:
    return Counter(name for name, _ in drawn)


def test_mix_respects_exact_ratios_without_replacement() -> None:
    # 12 * 3/4 = 9 and 12 * 1/4 = 3: exactly each source's length, so drawing without
    # replacement must return every record once (with replacement would repeat some).
    sources = {"new": [f"n{i}" for i in range(9)], "replay": [f"r{i}" for i in range(3)]}
    drawn = mix(sources, {"new": 3.0, "replay": 1.0}, 12, random.Random(0))
    assert counts(drawn) == {"new": 9, "replay": 3}
    assert sorted(drawn) == sorted((n, r) for n, records in sources.items() for r in records)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=4),
    total=st.integers(min_value=1, max_value=40),
    seed=seeds,
)
def test_mix_repeats_a_record_only_once_its_source_is_exhausted(
    lengths: list[int], total: int, seed: int
) -> None:
    sources = {f"s{i}": [f"s{i}-{j}" for j in range(n)] for i, n in enumerate(lengths)}
    drawn = mix(sources, dict.fromkeys(sources, 1.0), total, random.Random(seed))
    for name, records in sources.items():
        mine = [record for source, record in drawn if source == name]
        assert set(mine) <= set(records)
        assert len(set(mine)) == min(len(mine), len(records))


@settings(max_examples=200)
@given(
    ratios=st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=5).filter(
        lambda rs: sum(rs) > 0
    ),
    total=st.integers(min_value=0, max_value=200),
    seed=seeds,
)
def test_mix_counts_are_within_rounding_of_the_ratios(
    ratios: list[float], total: int, seed: int
) -> None:
    names = [f"s{i}" for i in range(len(ratios))]
    sources = {name: list(range(30)) for name in names}
    drawn = mix(sources, dict(zip(names, ratios, strict=True)), total, random.Random(seed))
    assert len(drawn) == total
    got = counts(drawn)
    norm = sum(ratios)
    for name, r in zip(names, ratios, strict=True):
        assert abs(got[name] - total * r / norm) < 1 + 1e-9, (name, got[name], total * r / norm)
        if r == 0:
            assert got[name] == 0


def test_mix_exhausted_source_gives_everything_then_repeats() -> None:
    sources = {"new": ["a", "b"], "replay": [f"r{i}" for i in range(20)]}
    drawn = mix(sources, {"new": 1.0, "replay": 1.0}, 10, random.Random(1))
    from_new = [record for name, record in drawn if name == "new"]
    assert len(from_new) == 5
    assert set(from_new) == {"a", "b"}  # each of the two at least once, nothing else
    from_replay = [record for name, record in drawn if name == "replay"]
    assert len(set(from_replay)) == 5  # the other source still without replacement


def test_mix_redistributes_the_share_of_an_empty_source() -> None:
    sources: dict[str, list[str]] = {"new": [], "replay": ["x", "y", "z"], "other": ["o"] * 10}
    drawn = mix(sources, {"new": 2.0, "replay": 1.0, "other": 1.0}, 6, random.Random(2))
    assert counts(drawn) == {"replay": 3, "other": 3}  # new's half split 1:1


def test_mix_ignores_sources_without_a_ratio() -> None:
    sources = {"new": ["a", "b", "c"], "held_out": ["h"]}
    drawn = mix(sources, {"new": 1.0}, 3, random.Random(3))
    assert counts(drawn) == {"new": 3}


def test_mix_is_shuffled_and_deterministic() -> None:
    sources = {"new": list(range(100)), "replay": list(range(100, 200))}
    ratios = {"new": 1.0, "replay": 1.0}
    runs = [mix(sources, ratios, 20, random.Random(seed)) for seed in range(10)]
    assert runs[0] == mix(sources, ratios, 20, random.Random(0))
    # A grouped order ("new" x10 then "replay" x10, or the reverse) has probability
    # 2 / C(20, 10) ~ 1e-5 per seed when shuffled; a missing shuffle gives it every time.
    grouped = (("new",) * 10 + ("replay",) * 10, ("replay",) * 10 + ("new",) * 10)
    orders = [tuple(name for name, _ in run) for run in runs]
    assert not any(order in grouped for order in orders)
    assert len(set(orders)) > 1


def test_mix_does_not_mutate_sources() -> None:
    sources = {"new": [3, 1, 2], "replay": [9, 8]}
    mix(sources, {"new": 1.0, "replay": 1.0}, 9, random.Random(4))
    assert sources == {"new": [3, 1, 2], "replay": [9, 8]}


def test_mix_zero_total_is_empty() -> None:
    assert mix({"new": [1]}, {"new": 1.0}, 0, random.Random(5)) == []


@pytest.mark.parametrize(
    ("sources", "ratios", "total", "message"),
    [
        ({"new": [1]}, {"new": 1.0, "replya": 1.0}, 4, r"unknown sources \['replya'\]"),
        ({"new": [1], "replay": [2]}, {"new": -1.0, "replay": 1.0}, 4, r"'new': -1\.0"),
        ({"new": [1]}, {"new": math.nan}, 4, r"'new': nan"),
        ({"new": [1]}, {"new": 1.0}, -1, r"total must be >= 0, got -1"),
        ({"new": [], "replay": []}, {"new": 1.0, "replay": 0.0}, 4, r"\['new'\] are all empty"),
        ({"new": [1]}, {"new": 0.0}, 4, r"no source has a positive ratio"),
    ],
)
def test_mix_errors_name_the_problem(
    sources: dict[str, list[int]], ratios: dict[str, float], total: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mix(sources, ratios, total, random.Random(6))


def test_replay_total_is_the_ratio_with_a_floor_for_small_cycles() -> None:
    assert replay_total(200, 1.0, 64) == 200  # a large cycle: one per new example
    assert replay_total(12, 1.0, 64) == 64  # a dozen corrections: the floor
    assert replay_total(12, 3.0, 0) == 36
    assert replay_total(5, 0.5, 0) == 2  # rounds half to even, as round() does
    assert replay_total(12, 0.0, 64) == 0  # replay off: no floor
    assert replay_total(0, 1.0, 64) == 0  # nothing new, nothing replayed
    for bad in ((-1, 1.0, 0), (3, -0.5, 0), (3, math.inf, 0), (3, math.nan, 0), (3, 1.0, -1)):
        with pytest.raises(ValueError):
            replay_total(*bad)


# -- replay_counts ------------------------------------------------------------------------------
DAEMON_SHARES = {"general": 0.3, "self": 0.4, "past": 0.3}


def test_earlier_examples_come_on_top_of_the_anchor_budget() -> None:
    # the daemon's shares, no general file: the whole budget is the served model's own answers
    got = replay_counts(DAEMON_SHARES, {"general": False, "self": True, "past": True}, 64)
    # earlier examples keep the 27 they had when they shared it (64 * 0.3 / 0.7), on top
    assert got == {"general": 0, "self": 64, "past": 27}


def test_the_anchor_budget_is_split_by_share_and_past_keeps_its_count() -> None:
    got = replay_counts(DAEMON_SHARES, {"general": True, "self": True, "past": True}, 70)
    assert (got["general"], got["self"]) == (30, 40)
    assert got["past"] == 21  # 70 * 0.3 / 1.0


def test_a_first_cycle_has_no_past_and_the_budget_stays_whole() -> None:
    got = replay_counts(DAEMON_SHARES, {"general": True, "self": True, "past": False}, 10)
    assert got == {"general": 4, "self": 6, "past": 0}  # 4.29 / 5.71, largest remainder


def test_without_an_anchor_the_budget_goes_to_earlier_examples() -> None:
    got = replay_counts(DAEMON_SHARES, {"general": False, "self": False, "past": True}, 64)
    assert got == {"general": 0, "self": 0, "past": 64}


def test_no_source_or_no_budget_replays_nothing() -> None:
    assert sum(replay_counts(DAEMON_SHARES, dict.fromkeys(DAEMON_SHARES, False), 64).values()) == 0
    assert sum(replay_counts(DAEMON_SHARES, dict.fromkeys(DAEMON_SHARES, True), 0).values()) == 0


def test_replay_counts_refuses_bad_shares_and_totals() -> None:
    with pytest.raises(ValueError, match="shares"):
        replay_counts({"self": -1.0}, {"self": True}, 4)
    with pytest.raises(ValueError, match="total"):
        replay_counts(DAEMON_SHARES, {"self": True}, -1)
