"""Resolving the model to serve: local folders, hub ids, the default offline, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.models import (
    DEFAULT_MODEL_NAME,
    ModelError,
    ensure_default_model,
    find_default_gguf,
    hub_reachable,
    resolve_model,
)


def test_a_local_model_folder(tiny_model: Path, tmp_path: Path) -> None:
    r = resolve_model(str(tiny_model), cache_dir=tmp_path)
    assert r.local and r.source == str(tiny_model.resolve()) and r.name == tiny_model.name


def test_a_hub_id_is_passed_through(tmp_path: Path) -> None:
    r = resolve_model("Qwen/Qwen3-1.7B", cache_dir=tmp_path)
    assert not r.local and r.source == "Qwen/Qwen3-1.7B"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("not a model", "neither an existing directory nor a hub id"),
        ("../escape/model", "neither an existing directory nor a hub id"),
    ],
)
def test_bad_specs_are_refused_clearly(spec: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=match):
        resolve_model(spec, cache_dir=tmp_path)


def test_a_folder_without_config_and_a_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path / "empty"), cache_dir=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"), cache_dir=tmp_path)


def test_offline_means_no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


def test_the_shipped_gguf_is_found_without_importing_its_package() -> None:
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_an_existing_conversion_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A completed folder (marker present) is returned without converting again."""
    from serving import models

    done = tmp_path / DEFAULT_MODEL_NAME
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / models.COMPLETE_MARKER).write_text("{}")

    def no_conversion(*a: object, **k: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    assert ensure_default_model(tmp_path) == done
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = resolve_model(None, cache_dir=tmp_path)
    assert r.local and Path(r.source) == done


def test_the_default_model_gets_its_model_cards_sampling(tmp_path: Path) -> None:
    """A folder converted before the sampling defaults existed gets them (vLLM reads
    generation_config.json as the defaults of requests that set none); ids already there stay,
    and a setting a user put there is never overwritten."""
    from serving import models

    done = tmp_path / DEFAULT_MODEL_NAME
    done.mkdir()
    (done / models.COMPLETE_MARKER).write_text("{}")
    (done / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    ensure_default_model(tmp_path)
    got = json.loads((done / "generation_config.json").read_text())
    assert got == {"eos_token_id": 2, "do_sample": True, "temperature": 0.2, "top_p": 0.9}
    (done / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8})
    )
    ensure_default_model(tmp_path)
    assert json.loads((done / "generation_config.json").read_text())["temperature"] == 0.7
