"""The judging half of a cycle around a fake vLLM: a candidate with non-finite weights is
rejected with its reason, finalized, reported, and never loaded into the server."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tinymodel import make_random_adapter

from daemon.candidate import Candidate
from daemon.config import load_settings
from daemon.cycle import CycleDeps, judge, new_cycle, served_generator
from daemon.promotion import Promoter
from daemon.versions import Manifest, staging_dir
from feedback.store import Store
from feedback.writer import Writer
from serving.engine import Generation


class NeverLoad:
    """A serving backend that must not be touched."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"vLLM was asked to {name} a non-finite candidate")


class NoDrain:
    async def drained(self, upstream: str, *, timeout: float, poll: float = 0.05) -> bool:
        return True


def staged_candidate(adapters: Path, version: str, value: float, tiny_model: Path) -> Candidate:
    path = staging_dir(adapters, version)
    make_random_adapter(tiny_model, path)
    (path / "README.md").unlink(missing_ok=True)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = value
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "state").mkdir()
    manifest = {"version": version, "created_at": 1.0, "parent": None,
                "files": {"adapter_model.safetensors": "x"}, "metrics": {"training": {}}}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    return Candidate(version, path, Manifest.from_dict(manifest))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_candidate_is_rejected_without_touching_vllm(
    tmp_path: Path, tiny_model: Path, bad: float
) -> None:
    settings = load_settings(data_dir=tmp_path)
    store = Store(settings.db_path)
    store.migrate()
    writer = Writer(store)
    reader = Store(settings.db_path, readonly=True)
    engine = NeverLoad()
    promoter = Promoter(
        engine=engine, gateway=NoDrain(), writer=writer, reader=reader,  # type: ignore[arg-type]
        data_dir=tmp_path, drain_timeout_s=1,
    )  # fmt: skip
    deps = CycleDeps(settings, str(tiny_model), reader, writer, engine, promoter,  # type: ignore[arg-type]
                     tokenizer=lambda: None)  # fmt: skip
    cand = staged_candidate(deps.adapters, "v0001", bad, tiny_model)
    cycle = asyncio.run(deps.writer.call(lambda s: s.put_cycle(new_cycle("test"))))
    done = asyncio.run(judge(deps, cycle, cand, actor="test"))
    try:
        assert done.state == "rejected" and done.decision == "rejected"
        assert done.reasons[0].startswith("FAIL weights: non-finite values in"), done.reasons
        assert promoter.promoted is None and reader.promotions() == []
        final = deps.adapters / "v0001"
        assert final.is_dir() and not staging_dir(deps.adapters, "v0001").exists()
        manifest = json.loads((final / "manifest.json").read_text())
        assert manifest["decision"]["passed"] is False
        assert reader.get_version("v0001") is not None  # the name is spent
        report = json.loads((deps.reports / "v0001" / "report.json").read_text())
        assert report["decision"]["outcome"] == "rejected"
        assert (deps.reports / "v0001" / "report.html").is_file()
    finally:
        writer.close()
        store.close()
        reader.close()


class Answers:
    """A vLLM stand-in for self-replay: answers with the model's name; adapters as given."""

    def __init__(self, loaded: set[str]) -> None:
        self.loaded_adapters = {name: f"/adapters/{name}" for name in loaded}
        self.asked: list[tuple[str, float, int]] = []

    async def generate(
        self, messages: object, *, model: str, max_tokens: int, temperature: float
    ) -> object:
        self.asked.append((model, temperature, max_tokens))
        reason = "length" if model == "base" else "stop"
        return Generation(text=f"from {model}", tokens=3, seconds=0.0, finish_reason=reason)


@pytest.mark.parametrize(
    ("served", "loaded", "asked"),
    [
        ("v-0002", {"v-0001", "v-0002"}, "v-0002"),  # the served version answers
        ("base", set(), "base"),  # nothing promoted yet
        ("v-0002", {"v-0001"}, "base"),  # rolled back during the cycle: it left vLLM
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 0.0])  # self-replay; rewrites
def test_replay_and_rewrites_come_from_the_served_version(
    served: str, loaded: set[str], asked: str, temperature: float
) -> None:
    engine = Answers(loaded)
    generate = served_generator(engine, served, 16, temperature)  # type: ignore[arg-type]
    text, cut = asyncio.run(generate([{"role": "user", "content": "Hi"}]))
    assert text == f"from {asked}" and cut is (asked == "base")
    assert engine.asked == [(asked, temperature, 16)]
