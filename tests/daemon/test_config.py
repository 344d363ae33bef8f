"""`daemon.config`: defaults, TOML, environment, all errors at once, the example file."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from daemon.config import (
    ConfigError,
    CurationConfig,
    EvaluationSettings,
    GateSettings,
    LimitSettings,
    ReplaySettings,
    ScheduleSettings,
    ServingSettings,
    Settings,
    StoreSettings,
    TrainingSettings,
    example_toml,
    load_settings,
)

SECTIONS: dict[str, type[BaseModel]] = {
    "serving": ServingSettings,
    "limits": LimitSettings,
    "store": StoreSettings,
    "training": TrainingSettings,
    "replay": ReplaySettings,
    "curation": CurationConfig,
    "evaluation": EvaluationSettings,
    "gate": GateSettings,
    "schedule": ScheduleSettings,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ADAPTD_ variable and no adaptd.toml of the machine running the tests."""
    for key in list(os.environ):
        if key.startswith("ADAPTD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def write_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "conf" / "my.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("ADAPTD_CONFIG", str(path))
    return path


def test_defaults() -> None:
    s = load_settings()
    assert s.data_dir == Path("adaptd-data")
    assert s.db_path == Path("adaptd-data") / "adaptd.db"
    assert (s.host, s.port, s.model) == ("127.0.0.1", 8000, None)
    assert (s.api_keys, s.admin_keys, s.auth_enabled) == ([], [], False)
    assert (s.log_level, s.log_format, s.shutdown_timeout_s) == ("info", "text", 30)
    assert s.serving == ServingSettings.model_validate({})
    assert s.serving.vllm_url is None
    assert (s.serving.max_model_len, s.serving.max_loras) == (2048, 2)
    assert s.serving.max_lora_rank is None
    assert s.max_lora_rank == 16  # the smallest of vLLM's ranks that holds training.rank
    assert s.limits.max_body_bytes == 1_048_576
    assert s.store.log_queue_size == 10_000


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValueError):
        s.port = 1


def test_adaptd_toml_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "adaptd.toml").write_text("port = 8123\n", encoding="utf-8")
    assert load_settings().port == 8123


def test_env_overrides_top_level_and_section_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTD_PORT", "9001")
    monkeypatch.setenv("ADAPTD_SERVING__MAX_LORAS", "2")
    monkeypatch.setenv("ADAPTD_LIMITS__MAX_N", "3")
    monkeypatch.setenv("ADAPTD_API_KEYS", "a,b")
    monkeypatch.setenv("ADAPTD_ADMIN_KEYS", " root ")
    monkeypatch.setenv("ADAPTD_SERVING__EXTRA_ARGS", "--enforce-eager --seed 1")
    s = load_settings()
    assert s.port == 9001
    assert s.serving.max_loras == 2
    assert s.limits.max_n == 3
    assert s.api_keys == ["a", "b"]
    assert s.admin_keys == ["root"]
    assert s.auth_enabled
    assert s.serving.extra_args == ["--enforce-eager", "--seed", "1"]
    assert s.serving.max_lora_rank is None  # untouched keys of the section keep their default


def test_toml_file_named_by_adaptd_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(
        tmp_path,
        monkeypatch,
        'log_level = "debug"\napi_keys = ["k1"]\n\n'
        '[serving]\nmax_loras = 3\ndtype = "float16"\nextra_args = ["--enforce-eager"]\n\n'
        "[store]\nlog_queue_size = 64\n",
    )
    s = load_settings()
    assert s.log_level == "debug"
    assert s.api_keys == ["k1"]
    assert (s.serving.max_loras, s.serving.dtype) == (3, "float16")
    assert s.serving.extra_args == ["--enforce-eager"]
    assert s.store.log_queue_size == 64


def test_env_beats_toml_and_overrides_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(tmp_path, monkeypatch, 'port = 7000\n[serving]\nmax_loras = 3\ndtype = "half"\n')
    monkeypatch.setenv("ADAPTD_PORT", "7001")
    monkeypatch.setenv("ADAPTD_SERVING__MAX_LORAS", "5")
    s = load_settings()
    assert s.port == 7001
    assert s.serving.max_loras == 5
    assert s.serving.dtype == "half"  # the rest of the TOML section still applies
    assert load_settings(port=7002).port == 7002
    assert load_settings(port=None).port == 7001  # None means "not given"


@pytest.mark.parametrize(("rank", "served"), [(4, 8), (16, 16), (20, 32), (256, 256)])
def test_vllm_s_lora_rank_follows_training_rank(
    monkeypatch: pytest.MonkeyPatch, rank: int, served: int
) -> None:
    monkeypatch.setenv("ADAPTD_TRAINING__RANK", str(rank))
    assert load_settings().max_lora_rank == served


def test_a_lora_rank_below_the_training_rank_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADAPTD_TRAINING__RANK", "32")
    monkeypatch.setenv("ADAPTD_SERVING__MAX_LORA_RANK", "16")
    with pytest.raises(ConfigError, match=r"serving.max_lora_rank 16 is below training.rank 32"):
        load_settings()
    monkeypatch.setenv("ADAPTD_SERVING__MAX_LORA_RANK", "64")
    assert load_settings().max_lora_rank == 64


def test_all_errors_are_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTD_PORT", "not-a-port")
    monkeypatch.setenv("ADAPTD_LOG_LEVEL", "loud")
    monkeypatch.setenv("ADAPTD_SERVING__MAX_LORA_RANK", "7")
    monkeypatch.setenv("ADAPTD_LIMITS__MAX_N", "0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    for key, env in [
        ("port", "ADAPTD_PORT"),
        ("log_level", "ADAPTD_LOG_LEVEL"),
        ("serving.max_lora_rank", "ADAPTD_SERVING__MAX_LORA_RANK"),
        ("limits.max_n", "ADAPTD_LIMITS__MAX_N"),
    ]:
        assert f"{key} [{env}]" in text, key
    assert "'not-a-port'" in text and "'loud'" in text


def test_unknown_keys_in_toml_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(tmp_path, monkeypatch, "prot = 8000\n[serving]\nmax_lora = 2\n")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "prot" in str(err.value)
    assert "serving.max_lora" in str(err.value)


def test_malformed_toml_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, monkeypatch, "port = = 1\n")
    with pytest.raises(ConfigError, match="configuration"):
        load_settings()
    assert path.exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.org"])
def test_non_loopback_host_needs_keys(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("ADAPTD_HOST", host)
    with pytest.raises(ConfigError, match="host"):
        load_settings()
    monkeypatch.setenv("ADAPTD_API_KEYS", "k")
    assert load_settings().host == host
    monkeypatch.delenv("ADAPTD_API_KEYS")
    monkeypatch.setenv("ADAPTD_ADMIN_KEYS", "admin")
    assert load_settings().host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_keys(host: str) -> None:
    assert load_settings(host=host).host == host


# --------------------------------------------------------------------------- example file


def all_keys() -> list[tuple[str | None, str]]:
    keys: list[tuple[str | None, str]] = [
        (None, n) for n in Settings.model_fields if n not in SECTIONS
    ]
    for section, model in SECTIONS.items():
        keys += [(section, n) for n in model.model_fields]
    return keys


def test_every_section_is_listed_here() -> None:
    """This test's SECTIONS must follow Settings (else the checks below miss a section)."""
    sections = {
        name
        for name, f in Settings.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }
    assert sections == set(SECTIONS)


def test_example_toml_mentions_every_key_with_its_variable() -> None:
    text = example_toml()
    missing = []
    for section, name in all_keys():
        env = "ADAPTD_" + (f"{section.upper()}__" if section else "") + name.upper()
        if f"[{env}]" not in text:
            missing.append(env)
        if not re.search(rf"^# {name} = ", text, re.M):
            missing.append(f"{section}.{name}" if section else name)
    assert not missing, f"example_toml() lacks {missing}"


def test_example_toml_is_valid_toml_and_loads_to_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = load_settings()
    text = example_toml()
    assert tomllib.loads(text) == {s: {} for s in SECTIONS}
    write_toml(tmp_path, monkeypatch, text)
    assert load_settings() == defaults


def test_example_toml_uncommented_gives_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uncommenting every key that has a default must change nothing."""
    defaults = load_settings()
    lines = []
    for line in example_toml().splitlines():
        m = re.match(r"^# ([a-z_]+ = .*)$", line)
        if m and "# unset" not in line:
            lines.append(m.group(1))
        else:
            lines.append(line)
    text = "\n".join(lines)
    parsed = tomllib.loads(text)
    uncommented = set(parsed) - set(SECTIONS)
    for section in SECTIONS:
        uncommented |= {f"{section}.{k}" for k in parsed[section]}
    assert "port" in uncommented and "serving.max_loras" in uncommented
    write_toml(tmp_path, monkeypatch, text)
    assert load_settings() == defaults


def test_the_shipped_training_recipe_reaches_the_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.candidate import train_settings

    s = load_settings()
    t = train_settings(s.training, s.replay)
    assert (t.replay_loss, t.stop_learned, t.learning_rate) == ("kl", 0.9, 1e-3)
    assert (s.replay.ratio, s.replay.min_examples) == (1.0, 64)
    monkeypatch.setenv("ADAPTD_REPLAY__LOSS", "ce")
    monkeypatch.setenv("ADAPTD_TRAINING__STOP_LEARNED", "0.75")
    s = load_settings()
    t = train_settings(s.training, s.replay)
    assert (t.replay_loss, t.stop_learned) == ("ce", 0.75)
    monkeypatch.setenv("ADAPTD_REPLAY__LOSS", "mse")
    with pytest.raises(ConfigError, match=r"replay\.loss \[ADAPTD_REPLAY__LOSS\]"):
        load_settings()
    monkeypatch.setenv("ADAPTD_REPLAY__LOSS", "kl")
    for bad in ("inf", "nan", "-1"):  # refused at start, not when a cycle mixes its replay
        monkeypatch.setenv("ADAPTD_REPLAY__RATIO", bad)
        with pytest.raises(ConfigError, match=r"replay\.ratio \[ADAPTD_REPLAY__RATIO\]"):
            load_settings()


def test_the_served_context_and_training_length_follow_a_short_context_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from daemon.app import fit_to_model

    for k in [k for k in os.environ if k.startswith("ADAPTD_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("ADAPTD_CONFIG", str(tmp_path / "none.toml"))
    model = tmp_path / "model"
    model.mkdir()
    config = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 128}
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    s = load_settings()
    assert (s.serving.max_model_len, s.training.max_len) == (2048, 1024)  # the shipped values
    fitted = fit_to_model(s, str(model))
    assert (fitted.serving.max_model_len, fitted.training.max_len) == (512, 512)
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    assert fit_to_model(s, str(model)) == s  # a longer context changes nothing
