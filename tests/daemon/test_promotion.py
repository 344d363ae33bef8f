"""Promotion and rollback around fakes of vLLM and the gateway (the real ones run in
tests/integration/test_cycle.py): admission, the probe, the flip, the drain, the history."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from daemon.promotion import Promoter, PromotionError, UnknownVersion, judge_probe, sha256_of
from feedback.store import Store
from feedback.writer import Writer

CANDIDATE = "please see the manual page one"
BASE = "zebra quartz lantern"
PROBE = {
    "items": [{"messages": [{"role": "user", "content": "hi"}], "candidate": CANDIDATE,
               "base": BASE}],
    "max_tokens": 8,
}  # fmt: skip


@dataclass
class Gen:
    text: str


class FakeEngine:
    """Greedy answers per model name; records every load and unload."""

    def __init__(self) -> None:
        self.lp = {"base": BASE}  # what each model answers; unknown models answer as the base
        self.calls: list[tuple[str, str]] = []
        self.loaded: set[str] = set()
        self.paths: dict[str, str] = {}
        self.asked: list[str] = []  # the models generate() was asked of

    async def load_adapter(self, name: str, path: str) -> None:
        self.calls.append(("load", name))
        self.loaded.add(name)
        self.paths[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.calls.append(("unload", name))
        self.loaded.discard(name)
        self.paths.pop(name, None)

    @property
    def loaded_adapters(self) -> dict[str, str]:
        return dict(self.paths)

    async def generate(self, messages: object, *, model: str = "base", **kw: object) -> Gen:
        assert kw["temperature"] == 0.0 and kw["max_tokens"] == 8
        self.asked.append(model)
        return Gen(self.lp.get(model, self.lp["base"]))  # an ignored adapter answers as the base


class FakeGateway:
    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}

    async def drained(self, upstream: str, *, timeout: float, poll: float = 0.01) -> bool:
        while self.inflight.get(upstream, 0) > 0:
            await asyncio.sleep(poll)
        return True


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[tuple[Path, Store, Writer]]:
    store = Store(tmp_path / "adaptd.db")
    store.migrate()
    writer = Writer(store)
    reader = Store(tmp_path / "adaptd.db", readonly=True)
    yield tmp_path, reader, writer
    writer.close()
    store.close()
    reader.close()


def make_version(
    data: Path, writer: Writer, name: str, *, value: float = 0.1, probe: dict | None = None
) -> Path:
    path = data / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    save_file({"w": torch.full((2, 3), value)}, str(path / "adapter_model.safetensors"))
    rec = probe if probe is not None else PROBE
    manifest = {"version": name, "metrics": {"probe": rec}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    writer.call_sync(
        lambda s: s.register_version(
            {"name": name, "created_at": 1.0, "parent": None, "path": f"adapters/{name}",
             "sha256": sha256_of(path / "adapter_model.safetensors"),
             "manifest": json.dumps(manifest)}
        )
    )  # fmt: skip
    return path


def promoter(env: tuple[Path, Store, Writer], engine: FakeEngine, gw: FakeGateway) -> Promoter:
    data, reader, writer = env
    return Promoter(
        engine=engine, gateway=gw, writer=writer, reader=reader, data_dir=data,
        drain_timeout_s=5,
    )  # fmt: skip


def two_versions(env: tuple[Path, Store, Writer]) -> tuple[FakeEngine, Promoter]:
    """v0001 and v0002, both answering as their evaluated candidate did."""
    data, _reader, writer = env
    for v in ("v0001", "v0002"):
        make_version(data, writer, v)
    eng = FakeEngine()
    eng.lp.update(v0001=CANDIDATE, v0002=CANDIDATE)
    return eng, promoter(env, eng, FakeGateway())


@pytest.mark.parametrize(
    ("answer", "passed"),
    [
        (CANDIDATE, True),  # applied exactly as at evaluation
        ("please see the manual page two", True),  # numerics moved a token, clearly applied
        (BASE, False),  # vLLM ignored the adapter
        ("zebra quartz lantern manual", False),  # nearer the base model than the candidate
    ],
)
def test_judge_probe(answer: str, passed: bool) -> None:
    assert judge_probe([answer], [CANDIDATE], [BASE]).passed is passed


def test_a_version_without_probe_is_not_promoted(env: tuple[Path, Store, Writer]) -> None:
    data, _reader, writer = env
    make_version(data, writer, "v0001", probe={})
    p = promoter(env, FakeEngine(), FakeGateway())
    with pytest.raises(PromotionError, match="no probe"):
        asyncio.run(p.promote("v0001", actor="t", reason=""))


def test_promote_flips_the_alias_in_one_recorded_step(env: tuple[Path, Store, Writer]) -> None:
    data, reader, writer = env
    make_version(data, writer, "v0001")
    eng = FakeEngine()
    eng.lp["v0001"] = CANDIDATE
    p = promoter(env, eng, FakeGateway())
    done = asyncio.run(p.promote("v0001", actor="test", reason="passed"))
    assert p.promoted == "v0001" == reader.promoted_version()
    assert done.probe is not None and done.probe.passed
    assert [(h.action, h.version, h.previous) for h in reader.promotions()] == [
        ("promote", "v0001", None)
    ]


def test_an_adapter_vllm_ignores_is_not_promoted(env: tuple[Path, Store, Writer]) -> None:
    data, reader, writer = env
    make_version(data, writer, "v0001")
    eng = FakeEngine()  # no entry for v0001: it scores like the base model
    p = promoter(env, eng, FakeGateway())
    with pytest.raises(PromotionError, match=r"failed its probe.*NOT applied"):
        asyncio.run(p.promote("v0001", actor="test", reason=""))
    assert p.promoted is None and reader.promotions() == []
    assert eng.calls == [("load", "v0001"), ("unload", "v0001")]


def test_admission_refuses_changed_or_non_finite_files(env: tuple[Path, Store, Writer]) -> None:
    data, reader, writer = env
    path = make_version(data, writer, "v0001")
    save_file({"w": torch.zeros(2, 3)}, str(path / "adapter_model.safetensors"))  # tampered
    nan = make_version(data, writer, "v0002", value=math.nan)
    eng = FakeEngine()
    p = promoter(env, eng, FakeGateway())
    with pytest.raises(PromotionError, match="sha256 differs"):
        asyncio.run(p.promote("v0001", actor="t", reason=""))
    with pytest.raises(PromotionError, match="non-finite values in w"):
        asyncio.run(p.promote("v0002", actor="t", reason=""))
    with pytest.raises(UnknownVersion):
        asyncio.run(p.promote("v0099", actor="t", reason=""))
    assert eng.calls == [] and reader.promotions() == []  # nothing reached vLLM
    assert nan.exists()


def test_the_replaced_version_stays_as_standby_and_the_one_before_goes_once_drained(
    env: tuple[Path, Store, Writer],
) -> None:
    data, _reader, writer = env
    for v in ("v0001", "v0002", "v0003"):
        make_version(data, writer, v)
    eng = FakeEngine()
    eng.lp.update(v0001=CANDIDATE, v0002=CANDIDATE, v0003=CANDIDATE)
    gw = FakeGateway()
    p = promoter(env, eng, gw)

    async def scenario() -> None:
        await p.promote("v0001", actor="t", reason="")
        await p.promote("v0002", actor="t", reason="")
        await p.wait_drained()
        assert p.standby == "v0001" and eng.loaded == {"v0001", "v0002"}
        gw.inflight["v0001"] = 2  # two requests still streaming from v0001
        await p.promote("v0003", actor="t", reason="")
        await asyncio.sleep(0.1)
        assert p.standby == "v0002" and "v0001" in eng.loaded  # not before its requests end
        gw.inflight["v0001"] = 0
        await p.wait_drained()
        assert eng.loaded == {"v0002", "v0003"}

    asyncio.run(scenario())


def test_a_rollback_to_the_standby_neither_loads_nor_probes_again(
    env: tuple[Path, Store, Writer],
) -> None:
    _data, reader, _writer = env
    eng, p = two_versions(env)

    async def scenario() -> None:
        await p.promote("v0001", actor="t", reason="")
        await p.promote("v0002", actor="t", reason="")
        assert eng.asked == ["v0001", "v0002"]
        eng.calls.clear()
        back = await p.rollback(None, actor="t", reason="")
        again = await p.promote("v0002", actor="t", reason="")
        await p.wait_drained()
        assert p.promoted == "v0002" and p.standby == "v0001"
        assert eng.calls == [] and eng.asked == ["v0001", "v0002"]  # no load, no probe
        assert back.probe is not None and back.probe.passed and "passed before" in back.probe.detail
        assert again.probe is not None and again.probe.passed
        # a restarted vLLM holds nothing that was probed: the next swap loads and probes again
        eng.paths.clear()
        eng.loaded.clear()
        await p.reconcile(restarted=True)
        assert p.standby is None
        await p.rollback(None, actor="t", reason="")
        assert ("load", "v0001") in eng.calls and eng.asked[-1] == "v0001"

    asyncio.run(scenario())
    assert [h.action for h in reader.promotions()] == [
        "promote",
        "promote",
        "rollback",
        "promote",
        "rollback",
    ]


def test_an_admitted_file_that_changed_is_refused_even_for_the_standby(
    env: tuple[Path, Store, Writer],
) -> None:
    data, _reader, _writer = env
    _eng, p = two_versions(env)

    async def scenario() -> None:
        await p.promote("v0001", actor="t", reason="")
        await p.promote("v0002", actor="t", reason="")
        save_file(
            {"w": torch.full((2, 3), 0.7)}, str(data / "adapters/v0001/adapter_model.safetensors")
        )
        with pytest.raises(PromotionError, match="sha256"):
            await p.rollback(None, actor="t", reason="")
        assert p.promoted == "v0002"

    asyncio.run(scenario())


def test_rollback_goes_back_through_the_append_only_history(
    env: tuple[Path, Store, Writer],
) -> None:
    _data, reader, writer = env
    _eng, p = two_versions(env)

    async def scenario() -> None:
        await p.promote("v0001", actor="t", reason="")
        await p.promote("v0002", actor="t", reason="")
        await p.rollback(None, actor="t", reason="bad answers")
        assert p.promoted == "v0001"
        await p.rollback("base", actor="t", reason="")
        assert p.promoted is None
        with pytest.raises(PromotionError, match="already served"):
            await p.rollback("base", actor="t", reason="")
        await p.rollback("v0002", actor="t", reason="")
        await p.wait_drained()

    asyncio.run(scenario())
    hist = [(h.action, h.version, h.previous) for h in reader.promotions()]
    assert hist == [
        ("promote", "v0001", None),
        ("promote", "v0002", "v0001"),
        ("rollback", "v0001", "v0002"),
        ("rollback", None, "v0001"),
        ("rollback", "v0002", None),
    ]
    with pytest.raises(Exception, match="append-only"):
        writer.call_sync(lambda s: s.db.execute("DELETE FROM promotions"))


def test_nothing_to_roll_back(env: tuple[Path, Store, Writer]) -> None:
    p = promoter(env, FakeEngine(), FakeGateway())
    with pytest.raises(PromotionError, match="nothing to roll back"):
        asyncio.run(p.rollback(None, actor="t", reason=""))


def test_one_daemon_per_data_directory(tmp_path: Path) -> None:
    import os

    from daemon.app import DataDirBusy, lock_data_dir

    fd = lock_data_dir(tmp_path)
    try:
        with pytest.raises(DataDirBusy, match="one daemon per data directory"):
            lock_data_dir(tmp_path)
    finally:
        os.close(fd)
    os.close(lock_data_dir(tmp_path))  # free again once the holder is gone


def test_a_fresh_adapter_is_not_anchored_to_its_parent(tmp_path: Path) -> None:
    # A cold-started candidate once trained under the parent's EWC anchor and relearned the
    # parent's style instead of the new feedback (seen in benchmarks/hotswap.py).
    from daemon.candidate import parent_ewc_state

    (tmp_path / "ewc.safetensors").write_bytes(b"x")
    assert parent_ewc_state(tmp_path, warm_start=True) == tmp_path / "ewc.safetensors"
    assert parent_ewc_state(tmp_path, warm_start=False) is None
    assert parent_ewc_state(None, warm_start=True) is None


class DyingEngine(FakeEngine):
    """vLLM dies once the version is loaded: every answer fails as the real engine's does."""

    async def generate(self, messages: object, *, model: str = "base", **kw: object) -> Gen:
        from serving.engine import EngineError

        raise EngineError("vLLM is unreachable: connection refused")


def test_a_swap_that_fails_after_loading_keeps_the_alias_and_unloads(
    env: tuple[Path, Store, Writer],
) -> None:
    from serving.engine import EngineError

    data, reader, writer = env
    make_version(data, writer, "v0001")
    eng = DyingEngine()
    p = promoter(env, eng, FakeGateway())
    with pytest.raises(EngineError, match="unreachable"):
        asyncio.run(p.promote("v0001", actor="t", reason=""))
    assert p.promoted is None and reader.promotions() == []
    assert eng.calls == [("load", "v0001"), ("unload", "v0001")]  # it used to stay loaded


def flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-4:] = bytes(b ^ 0xFF for b in raw[-4:])  # in the tensor data: still parses
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("restarted", "actor", "when"), [
    (False, "startup", "at start-up"), (True, "restart", "after vLLM restarted")])  # fmt: skip
def test_reconcile_rolls_back_past_a_corrupted_version_and_records_why(
    env: tuple[Path, Store, Writer], restarted: bool, actor: str, when: str
) -> None:
    data, reader, writer = env
    make_version(data, writer, "v0001")
    v2 = make_version(data, writer, "v0002")
    eng = FakeEngine()
    eng.lp.update(v0001=CANDIDATE, v0002=CANDIDATE)

    async def before() -> None:
        p = promoter(env, eng, FakeGateway())
        await p.promote("v0001", actor="t", reason="")
        await p.promote("v0002", actor="t", reason="")
        await p.wait_drained()

    asyncio.run(before())
    flip_bytes(v2 / "adapter_model.safetensors")
    eng2 = FakeEngine()  # a fresh vLLM: it holds nothing
    p = promoter(env, eng2, FakeGateway())  # a fresh daemon reads the alias from the history
    assert p.promoted == "v0002"
    with pytest.raises(PromotionError, match="sha256 differs"):
        asyncio.run(p.recheck("v0002"))  # a restarted vLLM does not get it back
    asyncio.run(p.recheck("v0001"))
    asyncio.run(p.recheck("v0099-candidate"))  # not registered: a candidate in evaluation
    assert asyncio.run(p.reconcile(restarted=restarted)) == "v0001"
    assert eng2.loaded == {"v0001"} and p.promoted == "v0001" == reader.promoted_version()
    last = reader.promotions()[-1]
    assert (last.action, last.version, last.previous, last.actor) == (
        "rollback", "v0001", "v0002", actor)  # fmt: skip
    assert last.reason is not None and last.reason.startswith(when)
    assert "v0002" in last.reason and "sha256 differs" in last.reason
