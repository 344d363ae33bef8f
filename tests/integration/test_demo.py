"""`adaptd demo --short` as a user runs it: through the entry point, on a tiny model, with its
own daemon and vLLM. It must end with a decision, its reasons and a report on disk, and leave
no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from tinymodel import build_tiny_model

pytestmark = pytest.mark.vllm


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


@pytest.mark.timeout(900)
def test_the_short_demo_ends_with_a_decision_a_report_and_no_process_left(
    tmp_path: Path,
) -> None:
    # A model folder of its own, so that its vLLM server is told apart by its command line.
    model = build_tiny_model(tmp_path / "model")
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    started = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "demo", "--short", "--model", str(model),
         "--data-dir", str(data)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    took = time.monotonic() - started
    out = p.stdout
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-4000:]}\n{p.stderr[-2000:]}"

    decision = re.search(r"^Decision: (promoted|rejected): (v\d{4})", out, re.M)
    assert decision, out
    version = decision.group(2)
    reasons = re.findall(r"^  - ((?:pass|FAIL) [a-z_]+: .+)$", out, re.M)
    # the shop's facts carry content: the gate judges what the candidate learned of them
    assert any(r.startswith(("pass taught", "FAIL taught")) for r in reasons), out
    assert any(r.startswith(("pass held_out", "FAIL held_out")) for r in reasons), out
    report = re.search(r"^Report: (\S+)$", out, re.M)
    assert report, out
    path = Path(report.group(1))
    assert path == data / "reports" / version / "report.html" and path.is_file()
    assert f"/reports/{version}" in out
    assert "before (base model):" in out and f"after ({version}):" in out
    for state in ("training", "evaluating"):  # the others may pass between two polls
        assert re.search(rf"\]\s+{state}\b", out), f"{state} not shown:\n{out}"
    assert (data / "adaptd.toml").is_file() and (data / "adapters" / version).is_dir()

    # The daemon, its vLLM server and the training child are all gone.
    deadline = time.monotonic() + 15
    while (left := processes_mentioning(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
    print(f"short demo: {took:.0f} s")
