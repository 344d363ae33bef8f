"""The `adaptd` command line through `daemon.cli.main`, and once as a real process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import example_toml
from feedback.store import FeedbackInput, Interaction, Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("ADAPTD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line reason, got {text!r}"
    assert lines[0].startswith("adaptd: ")
    return lines[0]


def make_data_dir(path: Path) -> Path:
    store = Store(path / "adaptd.db")
    store.migrate()
    with store.db.atomic():
        store.insert_interactions(
            [
                Interaction(
                    id="chatcmpl-1", created_at=1.0, endpoint="chat", model="adaptd",
                    version="base", caller="anonymous",
                    request=[{"role": "user", "content": "Capital of France?"}],
                    params={}, output="Lyon.",
                )
            ]
        )  # fmt: skip
        store.add_feedback(
            FeedbackInput(interaction_id="chatcmpl-1", rating=-1, correction="Paris.", id="fb-1")
        )
        store.add_feedback(FeedbackInput(interaction_id="chatcmpl-1", comment="hm", id="fb-2"))
    store.close()
    return path


def feedback_ids(data_dir: Path) -> list[str]:
    store = Store(data_dir / "adaptd.db")
    try:
        store.migrate()
        return [f.id for f in store.feedback()]
    finally:
        store.close()


# --------------------------------------------------------------------------- init


def test_init_writes_the_example_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "adaptd.toml"
    assert main(["init", "--path", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == example_toml()

    path.write_text("port = 9000\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["init", "--path", str(path)]) != 0
    err = one_line(capsys.readouterr().err)
    assert "--force" in err
    assert path.read_text(encoding="utf-8") == "port = 9000\n"

    assert main(["init", "--path", str(path), "--force"]) == 0
    assert path.read_text(encoding="utf-8") == example_toml()


def test_init_default_path_is_the_working_directory(tmp_path: Path) -> None:
    assert main(["init"]) == 0
    assert (tmp_path / "adaptd.toml").is_file()


# --------------------------------------------------------------------------- feedback files


def test_feedback_export_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_data_dir(tmp_path / "src")
    out = tmp_path / "fb.jsonl"
    assert main(["feedback", "export", str(out), "--data-dir", str(src)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["fb-1", "fb-2"]
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "Lyon."}

    capsys.readouterr()
    assert main(["feedback", "export", "--data-dir", str(src)]) == 0
    assert capsys.readouterr().out == out.read_text(encoding="utf-8")

    dst = tmp_path / "dst"
    assert main(["feedback", "import", str(out), "--data-dir", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"added": 2, "skipped": 0}
    assert feedback_ids(dst) == ["fb-1", "fb-2"]

    assert main(["feedback", "import", str(out), "--data-dir", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"added": 0, "skipped": 2}


def test_feedback_commands_use_adaptd_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_data_dir(tmp_path / "elsewhere")
    monkeypatch.setenv("ADAPTD_DATA_DIR", str(src))
    assert main(["feedback", "export"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],'
         ' "id": "fb-ok", "rating": 1}\n{oops\n', "line 2"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],'
         ' "id": "fb-ok", "rating": 1}\n{"interaction_id": "nope", "rating": 1}\n', "line 2"),
    ],
    ids=["not json", "no conversation"],
)  # fmt: skip
def test_import_of_a_malformed_file_imports_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, reason: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    dst = tmp_path / "dst"
    assert main(["feedback", "import", str(bad), "--data-dir", str(dst)]) != 0
    captured = capsys.readouterr()
    err = one_line(captured.err)
    assert reason in err and "nothing was imported" in err
    assert captured.out == ""
    assert feedback_ids(dst) == []


def test_import_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["feedback", "import", str(tmp_path / "nope.jsonl"), "--data-dir",
                 str(tmp_path / "d")]) == 1  # fmt: skip
    assert "nope.jsonl" in one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- remote commands


@pytest.mark.parametrize("command", ["status", "versions"])
def test_remote_command_without_a_daemon(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    assert main([command, "--url", url]) == 1
    assert time.monotonic() - t0 < 20
    err = one_line(capsys.readouterr().err)
    assert url in err


def test_status_url_from_adaptd_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("ADAPTD_URL", url)
    assert main(["status", "--json"]) == 1
    assert url in one_line(capsys.readouterr().err)


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_serve_with_a_bad_setting_exits_2_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ADAPTD_SERVING__MAX_LORA_RANK", "7")
    assert main(["serve"]) == 2
    assert "serving.max_lora_rank" in capsys.readouterr().err


# --------------------------------------------------------------------------- as a process


def test_init_as_a_process(tmp_path: Path) -> None:
    path = tmp_path / "sub.toml"
    cmd = [sys.executable, "-m", "daemon.cli", "init", "--path", str(path)]
    ok = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True,
                        timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert path.read_text(encoding="utf-8") == example_toml()
    again = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert again.returncode != 0
    assert "--force" in one_line(again.stderr)


def test_serve_on_a_public_address_without_keys_exits_2(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "serve", "--host", "0.0.0.0",
         "--data-dir", str(tmp_path / "data")],
        env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - t0 < 30
    assert "host" in proc.stderr and "0.0.0.0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything
