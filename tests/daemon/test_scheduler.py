"""The trigger rule with a frozen clock, table-driven; the APScheduler job's single flight."""

from __future__ import annotations

import asyncio

import pytest

from daemon.config import ScheduleSettings
from daemon.scheduler import CycleScheduler, should_start

NOW = 1_800_000_000.0
MIN = 60.0

CASES = [
    ("enough feedback, long ago", dict(new_feedback=25, last_cycle_at=NOW - 120 * MIN), True,
     "25 new feedback items"),
    ("first cycle ever", dict(new_feedback=20, last_cycle_at=None), True, "20 new"),
    ("too little feedback", dict(new_feedback=19, last_cycle_at=None), False, "waiting for 20"),
    ("too soon after the last", dict(new_feedback=50, last_cycle_at=NOW - 10 * MIN), False,
     "waiting 20 more min"),
    ("exactly at the spacing", dict(new_feedback=50, last_cycle_at=NOW - 30 * MIN), True, "50"),
    ("one running", dict(new_feedback=50, last_cycle_at=None, running="c-1"), False,
     "c-1 is running"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kw", "start", "why"), CASES, ids=[c[0] for c in CASES])
def test_should_start(name: str, kw: dict[str, object], start: bool, why: str) -> None:
    args: dict[str, object] = {"running": None, "min_new_feedback": 20, "min_minutes_between": 30}
    args.update(kw)
    v = should_start(NOW, **args)  # type: ignore[arg-type]
    assert v.start is start
    assert why in v.reason


def test_zero_thresholds_always_start_when_idle() -> None:
    v = should_start(NOW, running=None, new_feedback=0, last_cycle_at=NOW, min_new_feedback=0,
                     min_minutes_between=0)  # fmt: skip
    assert v.start


def test_a_slow_tick_never_runs_twice_at_once() -> None:
    cfg = ScheduleSettings(interval_minutes=0.2 / 60)  # every 0.2 s
    active = 0
    most = 0
    ticks = 0

    async def tick() -> None:
        nonlocal active, most, ticks
        active += 1
        ticks += 1
        most = max(most, active)
        await asyncio.sleep(0.7)  # slower than the interval
        active -= 1

    async def scenario() -> None:
        s = CycleScheduler(cfg, tick)
        s.start()
        assert s.next_run() is not None and "every" in s.describe()
        await asyncio.sleep(2.0)
        s.shutdown()

    asyncio.run(scenario())
    assert ticks >= 2 and most == 1


def test_next_run_is_none_before_start_and_after_shutdown() -> None:
    async def tick() -> None:
        return None

    async def scenario() -> None:
        s = CycleScheduler(ScheduleSettings(interval_minutes=5), tick)
        assert s.next_run() is None  # a pending job has no next_run_time before start
        s.start()
        assert s.next_run() is not None
        s.shutdown()
        await asyncio.sleep(0)
        assert s.next_run() is None

    asyncio.run(scenario())


def test_cron_schedule() -> None:
    async def tick() -> None:
        return None

    async def scenario() -> None:
        s = CycleScheduler(ScheduleSettings(cron="30 2 * * *"), tick)
        s.start()
        nxt = s.next_run()
        assert nxt is not None and (nxt.hour, nxt.minute) == (2, 30)
        assert "cron '30 2 * * *'" in s.describe()
        s.shutdown()

    asyncio.run(scenario())


def test_bad_cron_is_a_config_error() -> None:
    from daemon.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"schedule.cron .*five fields"):
        load_settings(schedule={"cron": "every day"})
