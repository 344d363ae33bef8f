"""When cycles start: the trigger rule (a pure function) and the clock (APScheduler 3.x).

This is the one module that imports APScheduler. Its job fires on an interval or a cron
expression (`[schedule]`); each firing asks `should_start` whether a cycle may begin:

* not while another cycle runs (single flight; the job itself has ``max_instances=1`` and
  ``coalesce=True``, so a slow cycle never queues up firings);
* only with at least ``min_new_feedback`` feedback items since the last cycle began;
* not sooner than ``min_minutes_between`` after the last cycle began.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from daemon.config import ScheduleSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    start: bool
    reason: str


def should_start(
    now: float,
    *,
    running: str | None,
    new_feedback: int,
    last_cycle_at: float | None,
    min_new_feedback: int,
    min_minutes_between: float,
) -> Verdict:
    """Whether a scheduled cycle may start now, and why (not)."""
    if running:
        return Verdict(False, f"cycle {running} is running")
    if new_feedback < min_new_feedback:
        return Verdict(
            False,
            f"{new_feedback} new feedback items since the last cycle; waiting for "
            f"{min_new_feedback}",
        )
    if last_cycle_at is not None:
        wait = last_cycle_at + 60 * min_minutes_between - now
        if wait > 0:
            return Verdict(
                False,
                f"the last cycle began {(now - last_cycle_at) / 60:.0f} min ago; waiting "
                f"{wait / 60:.0f} more min (at least {min_minutes_between:g} min apart)",
            )
    return Verdict(True, f"{new_feedback} new feedback items since the last cycle")


class CycleScheduler:
    """Fires ``tick`` on the configured schedule, on the running event loop."""

    def __init__(self, cfg: ScheduleSettings, tick: Callable[[], Awaitable[None]]) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        self.cfg = cfg
        self._scheduler = AsyncIOScheduler(timezone=cfg.timezone)
        trigger = (
            CronTrigger.from_crontab(cfg.cron, timezone=cfg.timezone)
            if cfg.cron
            else IntervalTrigger(minutes=cfg.interval_minutes or 60, timezone=cfg.timezone)
        )
        self._scheduler.add_job(
            tick, trigger, id="cycle", max_instances=1, coalesce=True, misfire_grace_time=300
        )

    def start(self) -> None:
        self._scheduler.start()
        log.info("cycles scheduled %s; next check at %s", self.describe(), self.next_run())

    def describe(self) -> str:
        if self.cfg.cron:
            return f"by cron '{self.cfg.cron}' ({self.cfg.timezone})"
        return f"every {self.cfg.interval_minutes:g} min"

    def next_run(self) -> datetime | None:
        """When the job fires next; None before `start` (a pending job has no time yet) and
        after `shutdown`."""
        if not self._scheduler.running:
            return None
        job = self._scheduler.get_job("cycle")
        return job.next_run_time if job is not None else None

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
