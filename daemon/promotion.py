"""Promotion and rollback: load, prove, flip, drain, unload.

1. Admission: the version is registered, its folder is directly under ``adapters/`` (links
   out refused), the adapter file's sha256 is the one recorded when it was written, and
   `learners.lora.admission_problems` finds nothing: no pickle, rank and target modules and
   every tensor's shape fit the base model, every value finite.
2. Load it into vLLM under its own name (a no-op if it is loaded already).
3. Probe: ask the version, greedy, the prompts on which evaluation saw the candidate's answer
   differ most from the base model's. Its answers must be nearer (ROUGE-L) to what the
   candidate answered at evaluation than to what the base model answered: an adapter that vLLM
   silently ignores answers like the base model and fails here, before any user sees it. A
   version that passed its probe and has stayed loaded since, from the same admitted file,
   in the same vLLM (a restart forgets every probe), is not asked again: the answer would be
   the same, and a rollback should not wait on generation under live traffic.
4. Flip: one transaction appends the promotion to the history (append-only); the in-memory
   alias changes in the same event-loop step, so every request resolves to the old or the
   new version, never to nothing.
5. Standby and drain: the replaced version stays loaded as the standby, so that rolling back
   to it is steps 1 and 4 alone. The version it replaces as the standby is unloaded once the
   requests that started on it finish (or ``drain_timeout_s`` passes). Version folders are
   never deleted.

Rollback is the same path with the target taken from the history. A promotion that fails at
any step (refused, probe failed, vLLM gone, the history not written) leaves the alias where it
was and unloads the version it loaded.

Whenever vLLM (re)starts, `recheck` vets each adapter before it is loaded again and
`reconcile` makes the alias name a version vLLM holds, before requests reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from daemon.evaluation import Backend
from daemon.versions import Manifest, sha256_of
from feedback.store import Promotion, Store
from learners.lora import admission_problems, check_finite
from learners.metrics import mean, text_scores

log = logging.getLogger(__name__)


PROBE_TOKENS = 16


def _swap_pause() -> float:
    """Fault injection for the fault tests (beside `daemon.cycle.FAULT_PAUSE`):
    ``ADAPTD_FAULT_PAUSE="swap=3"`` holds every promotion that long once its version is
    loaded, before the probe and the flip, so a test can kill vLLM in the middle of a swap."""
    for part in os.environ.get("ADAPTD_FAULT_PAUSE", "").split(","):
        key, _, seconds = part.partition("=")
        if key.strip() == "swap" and seconds.strip():
            return float(seconds)
    return 0.0


SWAP_PAUSE = _swap_pause()


class PromotionError(Exception):
    status = 409
    type = "invalid_request_error"
    code = "promotion_refused"


class UnknownVersion(PromotionError):
    status = 404
    code = "version_not_found"


class Engine(Backend, Protocol):
    """What promotion needs from the serving side: evaluation's generation, plus loading."""

    async def load_adapter(self, name: str, path: str) -> None: ...
    async def unload_adapter(self, name: str) -> None: ...
    @property
    def loaded_adapters(self) -> dict[str, str]: ...


class Drainer(Protocol):
    async def drained(self, upstream: str, *, timeout: float, poll: float = ...) -> bool: ...


class Writer(Protocol):
    async def call(self, fn: Any) -> Any: ...


@dataclass(frozen=True)
class ProbeResult:
    passed: bool
    detail: str
    to_candidate: float | None = None  # mean ROUGE-L of the answers to evaluation's
    to_base: float | None = None  # ... and to the base model's


@dataclass(frozen=True)
class Promoted:
    promotion: Promotion
    probe: ProbeResult | None
    seconds: float


def judge_probe(answers: list[str], candidate: list[str], base: list[str]) -> ProbeResult:
    """Is the adapter applied as evaluation saw it? Pure: compares greedy answers."""
    if not answers:
        return ProbeResult(False, "no probe answers")
    to_cand = mean(text_scores(answers, candidate).rouge_l) or 0.0
    to_base = mean(text_scores(answers, base).rouge_l) or 0.0
    ok = to_cand > to_base
    verdict = "applied" if ok else "NOT applied (it answers like the base model)"
    return ProbeResult(
        ok,
        f"{len(answers)} probe answers match the evaluated candidate {to_cand:.2f} and the base "
        f"model {to_base:.2f} (ROUGE-L): adapter {verdict}",
        to_cand,
        to_base,
    )


class Promoter:
    """Owns the `adaptd` alias: which version it serves, and every change to it."""

    def __init__(
        self,
        *,
        engine: Engine,
        gateway: Drainer,
        writer: Writer,
        reader: Store,
        data_dir: Path,
        drain_timeout_s: float,
        base_model: str | None = None,
        max_rank: int | None = None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.gateway = gateway
        self.writer = writer
        self.reader = reader
        self.data_dir = data_dir
        self.drain_timeout_s = drain_timeout_s
        self.on_change = on_change
        self.base_model = base_model
        self.max_rank = max_rank
        self.promoted: str | None = reader.promoted_version()
        # the replaced version, kept loaded for a rollback without a load or a probe
        self.standby: str | None = None
        # version -> the admitted folder its passed probe was asked of, while it stays loaded
        self._probed: dict[str, Path] = {}
        self._lock = asyncio.Lock()
        self._drains: set[asyncio.Task[None]] = set()

    def path_of(self, version: str) -> Path:
        row = self.reader.get_version(version)
        if row is None:
            raise UnknownVersion(f"unknown version {version!r}: see `adaptd versions`")
        path = (self.data_dir / row["path"]).resolve()
        adapters = (self.data_dir / "adapters").resolve()
        if path.parent != adapters or not path.is_dir():
            raise PromotionError(f"version {version}'s folder is missing or outside adapters/")
        return path

    def admit(self, version: str) -> Path:
        """Refuse a version whose files changed since they were written, or hold non-finite
        values; returns its folder."""
        path = self.path_of(version)
        row = self.reader.get_version(version) or {}
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise PromotionError(f"version {version} has no adapter_model.safetensors")
        if row.get("sha256") and sha256_of(weights) != row["sha256"]:
            raise PromotionError(
                f"version {version}'s adapter file changed since it was written (sha256 differs)"
            )
        if self.base_model is not None:
            problems = admission_problems(path, self.base_model, max_rank=self.max_rank)
        else:
            finite, detail = check_finite(path)
            problems = [] if finite else [detail]
        if problems:
            raise PromotionError(f"version {version} is refused: {'; '.join(problems)}")
        return path

    async def probe(self, version: str, path: Path) -> ProbeResult:
        manifest = Manifest.read(path)
        rec = manifest.metrics.probe if manifest else None
        if not rec or not rec.get("items"):
            return ProbeResult(
                False,
                f"version {version} has no probe: at evaluation it answered every prompt as "
                "the base model did, so nothing can show that it is applied",
            )
        items = rec["items"]
        # Short answers, asked at once: promotion waits on these under live traffic.
        gens = await asyncio.gather(
            *(
                self.engine.generate(
                    it["messages"],
                    model=version,
                    max_tokens=min(PROBE_TOKENS, int(rec.get("max_tokens") or PROBE_TOKENS)),
                    temperature=0.0,
                )
                for it in items
            )
        )
        answers = [str(g.text) for g in gens]

        def prefix(ref: str, like: str) -> str:  # the evaluated answer, cut to the probe's length
            return " ".join(ref.split()[: max(1, len(like.split()))])

        return judge_probe(
            answers,
            [prefix(it["candidate"], a) for it, a in zip(items, answers, strict=True)],
            [prefix(it["base"], a) for it, a in zip(items, answers, strict=True)],
        )

    async def promote(
        self, version: str | None, *, actor: str, reason: str, action: str = "promote"
    ) -> Promoted:
        """Serve ``version`` (None: the base model) under the `adaptd` alias."""
        t0 = time.perf_counter()
        async with self._lock:
            probe = None
            warm = False
            if version is not None:
                path = self.admit(version)
                warm = self._probed.get(version) == path and self.engine.loaded_adapters.get(
                    version
                ) == str(path)
                if not warm:
                    await self.engine.load_adapter(version, str(path))
            try:
                if version is not None:
                    if SWAP_PAUSE:
                        log.warning("fault injection: pausing %.1f s in a swap", SWAP_PAUSE)
                        await asyncio.sleep(SWAP_PAUSE)
                    if warm:
                        probe = ProbeResult(
                            True, "passed before and loaded since, from the same admitted file"
                        )
                    else:
                        probe = await self.probe(version, path)
                        if not probe.passed:
                            raise PromotionError(
                                f"version {version} failed its probe: {probe.detail}"
                            )
                        self._probed[version] = path
                promotion = await self.writer.call(
                    lambda s: s.record_promotion(action, version, actor=actor, reason=reason)
                )
            except BaseException:
                # Not promoted: the alias stays; the version loaded for this try goes (when
                # vLLM is down this fails, and its restart vets the version again).
                if version is not None and version not in (self.promoted, self.standby):
                    self._probed.pop(version, None)
                    with contextlib.suppress(Exception):
                        await self.engine.unload_adapter(version)
                raise
            old = self.promoted
            self.promoted = version
            if self.on_change is not None:
                self.on_change(action)
            log.info(
                "%s: adaptd now serves %s (was %s) by %s",
                action, version or "base", old or "base", actor,
            )  # fmt: skip
            # The replaced version becomes the standby; the standby it replaces goes, once
            # its requests (if any: it may have served before) have drained.
            gone, self.standby = self.standby, (old if old != version else self.standby)
            if gone is not None and gone not in (self.standby, version):
                task = asyncio.create_task(self._drain_and_unload(gone), name=f"drain-{gone}")
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
        return Promoted(promotion, probe, time.perf_counter() - t0)

    def rollback_target(self, version: str | None) -> str | None:
        """The version a rollback goes to: the one named, else the one before the current."""
        if version is not None:
            return None if version == "base" else version
        history = self.reader.promotions()
        if not history:
            raise PromotionError("nothing to roll back: no version was ever promoted")
        return history[-1].previous

    async def rollback(self, version: str | None, *, actor: str, reason: str) -> Promoted:
        target = self.rollback_target(version)
        if target == self.promoted:
            raise PromotionError(f"{target or 'base'} is already served")
        return await self.promote(target, actor=actor, reason=reason, action="rollback")

    async def recheck(self, name: str) -> None:
        """Before a restarted vLLM loads ``name`` again: a registered version must still pass
        admission (its file may have been corrupted since). Others are candidates under
        evaluation, checked moments ago."""
        if self.reader.get_version(name) is not None:
            await asyncio.to_thread(self.admit, name)

    async def reconcile(self, restarted: bool = False) -> str | None:
        """Whenever vLLM (re)starts, before requests reach it: make vLLM hold what the alias
        names.

        The alias is the last row of the history. If that version cannot be admitted or
        loaded, walk back through the history to the newest one that can (or the base model)
        and record that as a rollback, so the alias never names a version vLLM lacks.
        """
        when = "after vLLM restarted" if restarted else "at start-up"
        async with self._lock:
            # A (re)started vLLM holds none of the adapters that were probed, nor the standby.
            self._probed.clear()
            self.standby = None
            tried: list[str] = []
            candidates = [self.promoted] + [p.previous for p in reversed(self.reader.promotions())]
            for version in dict.fromkeys(candidates):  # in order, without repeats
                if version is None:
                    break
                try:
                    path = self.admit(version)
                    await self.engine.load_adapter(version, str(path))
                    break
                except Exception as e:
                    log.error("version %s cannot be served: %s", version, e)
                    tried.append(f"{version}: {e}")
            else:
                version = None
            if version != self.promoted:
                reason = f"{when} the promoted version could not be loaded: " + "; ".join(tried)
                await self.writer.call(
                    lambda s: s.record_promotion(
                        "rollback", version, actor="restart" if restarted else "startup",
                        reason=reason,
                    )
                )  # fmt: skip
                log.warning("adaptd serves %s: %s", version or "base", reason)
                self.promoted = version
            return self.promoted

    async def _drain_and_unload(self, version: str) -> None:
        drained = await self.gateway.drained(version, timeout=self.drain_timeout_s)
        if not drained:
            log.warning("version %s still had requests after %.0f s", version, self.drain_timeout_s)
        async with self._lock:
            if version in (self.promoted, self.standby):
                return  # promoted again meanwhile, or the standby again
            self._probed.pop(version, None)
            try:
                await self.engine.unload_adapter(version)
                log.info("version %s unloaded after its requests drained", version)
            except Exception as e:
                log.warning("could not unload %s: %s", version, e)

    async def wait_drained(self) -> None:
        """Wait for background drains (tests and shutdown)."""
        while self._drains:
            await asyncio.gather(*list(self._drains), return_exceptions=True)
