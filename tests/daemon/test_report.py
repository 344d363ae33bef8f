"""`daemon.report`: Markdown, the self-contained HTML page, the index, and the files on disk.

The browser tests open the pages in headless Chromium (skipped where it is not installed) and
read back the DOM it built and the console messages it logged on stderr.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import html
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon import report as rep
from daemon.report import (
    load_report,
    render_html,
    render_index,
    render_markdown,
    stop_line,
    write_report,
)

HOSTILE = "<script>alert(1)</script>"
PLOT = re.compile(r"<svg\b[^>]*\bclass=\"plot\"")


def sample_report(**changes: Any) -> dict[str, Any]:
    """A promoted third version, as a cycle would describe it."""
    curve = [
        {
            "step": s,
            "loss": round(0.4 + 1.8 * math.exp(-s / 12) + 0.05 * math.sin(s), 4),
            "task_loss": round(0.38 + 1.8 * math.exp(-s / 12), 4),
            "ewc_penalty": round(0.02 * (1 - math.exp(-s / 20)), 5),
        }
        for s in range(1, 55)
    ]
    report: dict[str, Any] = {
        "schema": 1,
        "version": "v0003",
        "cycle_id": "c-20261119-0930",
        "created_at": 1795000000.0,
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "parent": "v0002",
        "current": "v0002",
        "decision": {
            "outcome": "promoted",
            "passed": True,
            "mode": "auto",
            "reasons": [
                "pass task_gain: ROUGE-L gain +0.310 over the current version "
                "(90% CI +0.120..+0.500, n=6) >= +0.000",
                "pass general: general held-out NLL +1.2% vs the base model (at most +5.0%)",
                "pass golden: no regression on 3 golden cases",
            ],
            "checks": [
                {"name": "task_gain", "passed": True, "value": 0.31, "limit": 0.0, "detail": "ok"},
                {"name": "general", "passed": True, "value": 0.012, "limit": 0.05, "detail": "ok"},
                {"name": "golden", "passed": True, "value": 0.0, "limit": 0.0, "detail": "ok"},
            ],
        },
        "data": {
            "feedback_in": 40,
            "kept": 30,
            "holdout": 6,
            "eval_only": 4,
            "dropped": {"duplicate": 3, "pii": 1},
            "replay": {"general": 10, "self": 5, "past": 8},
        },
        "training": {
            "steps": 54,
            "seconds": 43.1,
            "first_loss": curve[0]["loss"],
            "final_loss": curve[-1]["loss"],
            "curve": curve,
        },
        "metrics": [
            {
                "section": "task",
                "name": "rouge_l",
                "label": "ROUGE-L vs corrections",
                "higher_is_better": True,
                "n": 6,
                "base": 0.2,
                "current": 0.25,
                "candidate": 0.56,
                "delta": 0.31,
                "ci": [0.12, 0.5],
            },
            {
                "section": "retention",
                "name": "rouge_l",
                "label": "ROUGE-L on earlier holdouts",
                "higher_is_better": True,
                "n": 12,
                "base": 0.21,
                "current": 0.48,
                "candidate": 0.46,
                "delta": -0.02,
                "ci": [-0.07, 0.03],
            },
            {
                "section": "general",
                "name": "nll",
                "label": "general NLL",
                "higher_is_better": False,
                "n": 64,
                "base": 2.31,
                "current": 2.33,
                "candidate": 2.338,
                "delta": 0.008,
                "ci": None,
            },
            {
                "section": "general",
                "name": "agreement",
                "label": "agreement with base | answers",
                "higher_is_better": True,
                "n": 16,
                "base": None,
                "current": 0.91,
                "candidate": 0.88,
                "delta": -0.03,
                "ci": [-0.06, 0.0],
            },
        ],
        "history": [
            {
                "version": "v0001",
                "created_at": 1794000000.0,
                "promoted": True,
                "general_nll": 2.318,
                "general_agreement": 0.94,
                "retention_rouge_l": None,
                "task_rouge_l": 0.5,
            },
            {
                "version": "v0002",
                "created_at": 1794500000.0,
                "promoted": True,
                "general_nll": 2.33,
                "general_agreement": 0.91,
                "retention_rouge_l": 0.48,
                "task_rouge_l": 0.44,
            },
            {
                "version": "v0003",
                "created_at": 1795000000.0,
                "promoted": True,
                "general_nll": 2.338,
                "general_agreement": 0.88,
                "retention_rouge_l": 0.46,
                "task_rouge_l": 0.56,
            },
        ],
        "examples": {
            "gains": [
                {
                    "prompt": "What is the capital of France?",
                    "current": "Lyon.",
                    "candidate": "Paris.",
                    "correction": "Paris.",
                    "delta": 0.9,
                },
                {
                    "prompt": "Summarise the ticket: " + "the printer jams again. " * 40,
                    "current": "It is a ticket.",
                    "candidate": "The printer jams repeatedly.",
                    "correction": "Printer jams repeatedly; needs service.",
                    "delta": 0.4,
                },
            ],
            "regressions": [
                {
                    "prompt": "Format as a table: a | b",
                    "current": "| a | b |",
                    "candidate": "```\na b\n```",
                    "correction": "| a | b |",
                    "delta": -0.2,
                }
            ],
        },
        "serving_cost": {
            "base_ms_per_token": 12.0,
            "adapter_ms_per_token": 13.1,
            "ratio": 1.09,
            "n": 8,
        },
        "golden": [
            {"id": "capital", "current": True, "candidate": True, "detail": "contains 'Paris'"},
            {"id": "arith", "current": False, "candidate": True, "detail": "2+2=4"},
            {"id": "refusal", "current": True, "candidate": True, "detail": None},
        ],
        "links": {"adapter": "adapters/v0003"},
    }
    report.update(changes)
    return report


def learning_block() -> dict[str, Any]:
    """What the candidate of `sample_report` learned: 11 of 12 taught, 1 of 3 held out."""

    def item(split: str, k: int, learned: bool, carried: bool = False) -> dict[str, Any]:
        return {
            "split": split,
            "carried": carried,
            "interaction_id": f"i-{split}-{k}",
            "prompt": f"Which fish lives in lake {k}?",
            "correction": f"The quenfish{k}, since 1987.",
            "content": [f"quenfish{k}", "1987"],
            "answers": {
                "base": "A trout.",
                "current": "A trout.",
                "candidate": f"The quenfish{k}, since 1987."
                if learned
                else "A salmon, since 1990.",
            },
            "recall": {"base": 0.0, "current": 0.0, "candidate": 1.0 if learned else 0.0},
            "learned": {"base": False, "current": False, "candidate": learned},
        }

    taught = [item("taught", k, learned=k != 5, carried=k < 2) for k in range(12)]
    held = [item("held_out", k, learned=k == 12) for k in range(12, 15)]
    return {
        "threshold": 0.5,
        "taught": {"n": 12, "learned": {"base": 0, "current": 0, "candidate": 11}},
        "held_out": {"n": 3, "learned": {"base": 0, "current": 0, "candidate": 1}},
        "carried": 2,
        "items": taught + held,
    }


def learning_report(**changes: Any) -> dict[str, Any]:
    return sample_report(learning=learning_block(), **changes)


HEADLINE = "taught: 11 of 12 learned"


def awaiting_report() -> dict[str, Any]:
    r = sample_report()
    r["decision"] = {**r["decision"], "outcome": "awaiting_approval", "mode": "manual"}
    return r


FAILED = {"schema": 1, "decision": {"outcome": "failed", "passed": False, "reasons": ["boom"]}}
DEGENERATE: list[dict[str, Any]] = [
    {},
    FAILED,
    {key: None for key in sample_report()},
    {
        "version": "v0009",
        "decision": {"outcome": "rejected", "checks": [{"name": "weights", "passed": False}]},
        "data": {"dropped": None, "replay": "not a dict"},
        "training": {"curve": [{"step": 1, "loss": float("nan")}, {"step": "x"}]},
        "metrics": [None, {"section": "task", "delta": "high", "ci": [1]}, 3],
        "history": [{"version": "v0001", "general_nll": 2.0}],
        "examples": {"gains": [{"prompt": None}], "regressions": None},
        "golden": [{}],
        "serving_cost": {"ratio": None},
        "created_at": 1e30,
    },
]


# -- Markdown ----------------------------------------------------------------------------------
def test_markdown_puts_the_decision_and_its_reasons_first() -> None:
    md = render_markdown(sample_report())
    decision = md.index("**Decision: Promoted** (auto, gate passed)")
    first_section = md.index("\n## ")
    assert decision < first_section
    for reason in sample_report()["decision"]["reasons"]:
        assert f"- {reason}" in md
    headings = re.findall(r"^## (.+)$", md, re.M)
    assert headings == [
        "Data",
        "Training",
        "Metrics",
        "Forgetting across versions",
        "Examples",
        "Golden suite",
        "Suspected triggers",
        "Serving cost",
    ]


def test_markdown_marks_failed_checks() -> None:
    r = sample_report()
    r["decision"] = {
        "outcome": "rejected",
        "passed": False,
        "reasons": ["FAIL task_gain: gain +0.010 is below the minimum +0.050", "pass golden: ok"],
        "checks": [
            {"name": "task_gain", "passed": False, "value": 0.01, "limit": 0.05},
            {"name": "golden", "passed": True, "value": 0.0, "limit": 0.0},
        ],
    }
    md = render_markdown(r)
    assert "**Decision: Rejected** (gate failed)" in md
    assert "- **✗** FAIL task_gain: gain +0.010 is below the minimum +0.050" in md
    assert "- pass golden: ok" in md
    assert "| task_gain | **✗ FAIL** | 0.010 | 0.050 |" in md
    assert "| golden | ✓ pass | 0 | 0 |" in md


def test_markdown_tables_format_numbers_and_escape_cells() -> None:
    md = render_markdown(sample_report())
    assert "| 54 | 43.10 | 2.10 | 0.392 | 0.019 |" in md  # training: steps, s, losses, EWC
    row = (
        "| task | ROUGE-L vs corrections ↑ | 6 | 0.200 | 0.250 | 0.560 | +0.310 | +0.120 … +0.500 |"
    )
    assert row in md
    none = rep.DASH  # what a missing number shows
    assert f"| general | general NLL ↓ | 64 | 2.31 | 2.33 | 2.34 | +0.008 | {none} |" in md
    assert f"agreement with base \\| answers ↑ | 16 | {none} |" in md  # a | in a cell
    assert f"| v0001 | 2026-11-06 21:20 UTC | yes | 2.32 | 0.940 | {none} | 0.500 |" in md
    assert "- dropped: duplicate 3, pii 1" in md
    assert f"| 12.00 | 13.10 | 1.09{rep.TIMES} | 8 |" in md


def test_markdown_examples_are_literal_and_truncated() -> None:
    r = sample_report()
    r["examples"]["gains"][0]["prompt"] = f"{HOSTILE} and ```fences``` and ````more````"
    md = render_markdown(r)
    block = re.search(r"\*\*Prompt:\*\*\n\n(`{5,})text\n(.*?)\n\1\n", md, re.S)
    assert block, md
    assert block.group(2) == r["examples"]["gains"][0]["prompt"]  # verbatim inside the fence
    long_prompt = r["examples"]["gains"][1]["prompt"]
    assert long_prompt not in md
    assert long_prompt[:300] in md
    cut = re.search(r"Summarise the ticket: [^`]*…\n", md)
    assert cut and len(cut.group(0)) <= 401
    assert "<script>" not in md.replace(HOSTILE, "")  # only inside the fenced block


def test_markdown_escapes_html_outside_code() -> None:
    r = sample_report()
    r["decision"]["reasons"] = [f"odd {HOSTILE} [link](javascript:x) *bold*"]
    md = render_markdown(r)
    assert "- odd &lt;script>alert(1)&lt;/script> \\[link\\](javascript:x) \\*bold\\*" in md


def test_markdown_leads_with_what_it_learned() -> None:
    md = render_markdown(learning_report())
    first = md.split("\n")[2]  # the first line after the title
    assert first == (
        f"**{HEADLINE}** · held out: 1 of 3 answered with their content · "
        "current version (v0002): 0 of 12 taught, 0 of 3 held out"
    )
    assert md.index(HEADLINE) < md.index("**Decision: Promoted**") < md.index("## Metrics")
    headings = re.findall(r"^## (.+)$", md, re.M)
    assert headings[0] == "What it learned" and headings.index("Metrics") > 0
    section = md.split("## What it learned")[1].split("\n## ")[0]
    assert "2 of the taught items were held out last cycle" in section
    assert section.count("| taught (held out last cycle) |") == 2
    assert section.count("| taught |") == 10 and section.count("| held out |") == 3
    row = next(line for line in section.splitlines() if "quenfish5," in line)
    assert row.startswith("| taught | Which fish lives in lake 5? |")
    assert row.endswith("| quenfish5, 1987 | A salmon, since 1990. | no (0.00) | no (0.00) |")
    assert "| The quenfish0, since 1987. | yes (1.00) | no (0.00) |" in section
    assert "at least 50% of the correction's content words" in section
    assert "never trained on" in section


def test_markdown_learning_escapes_and_truncates() -> None:
    r = learning_report()
    r["learning"]["items"][0]["prompt"] = f"{HOSTILE} | *x* " + "long " * 100
    md = render_markdown(r)
    row = next(line for line in md.splitlines() if "alert(1)" in line)
    assert "&lt;script>alert(1)&lt;/script> \\| \\*x\\*" in row
    cell = row.split(" | ")[1]
    assert cell.endswith("…") and len(cell) < rep.CELL_CHARS + 20


@pytest.mark.parametrize(
    "learning",
    [
        None,
        "not a dict",
        {"taught": "x", "held_out": {"n": "3"}, "items": [None, 3, {"split": 5}], "carried": []},
    ],
    ids=["none", "odd-type", "odd-fields"],
)
def test_reports_without_a_usable_learning_block_render(learning: Any) -> None:
    for r in (sample_report(), sample_report(learning=learning)):  # no key, then an odd one
        md, page = render_markdown(r), render_html(r)
        assert_self_contained(page)
        if "learning" in r and isinstance(learning, dict):
            assert "taught: not recorded" in md and "taught: not recorded" in page
            assert "## What it learned" in md and 'id="learned"' in page
            continue
        assert "taught:" not in md and "taught:" not in page
        assert "What it learned" not in md and "What it learned" not in page
        assert md.index("**Decision: Promoted**") == len("# Promotion report v0003\n\n")
        assert rep.index_entry(r)["taught"] is None


def test_a_cycle_with_nothing_new_to_learn_says_so() -> None:
    empty = {"n": 0, "learned": {"base": 0, "current": 0, "candidate": 0}}
    r = sample_report(learning={"threshold": 0.5, "taught": empty, "held_out": empty,
                                "carried": 0, "items": []})  # fmt: skip
    md, page = render_markdown(r), render_html(r)
    for text in (md, page):
        assert "taught: no correction with new content this cycle" in text
        assert "held out: no correction with new content this cycle" in text
        assert "current version (v0002)" not in text
    assert "*No correction with new content this cycle.*" in md
    assert "No correction with new content this cycle.</p>" in page
    assert rep.index_entry(r)["taught"] == "none"


# -- HTML --------------------------------------------------------------------------------------
def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"\bsrc\s*=", page, re.I)
    assert not re.search(r"@import|url\(", page, re.I)
    for href in re.findall(r'\bhref\s*=\s*"([^"]*)"', page):
        assert href.startswith(("#", "/reports")), href
    assert "Content-Security-Policy" in page


def test_html_is_self_contained_with_three_plots() -> None:
    page = render_html(sample_report())
    assert page.startswith("<!DOCTYPE html>")
    assert_self_contained(page)
    assert len(PLOT.findall(page)) == 3
    figures = re.findall(r"<figure>(.*?)</figure>", page, re.S)
    assert len(figures) == 3
    for fig in figures:
        assert re.search(r'<svg class="plot"[^>]*><title id="[^"]+">[^<]+</title>', fig)
        assert "<figcaption>" in fig
    assert 'id="plot-training"' in page and "EWC penalty" in page
    assert 'id="plot-forgetting"' in page and ">v0002</text>" in page
    assert 'id="plot-deltas"' in page
    assert page.count('class="whisker') == 3  # the NLL delta has no interval
    assert 'class="banner o-promoted"' in page and ">Promoted</p>" in page
    assert 'id="approval"' not in page


def test_html_escapes_user_text() -> None:
    r = sample_report()
    r["examples"]["gains"][0]["prompt"] = HOSTILE
    r["examples"]["regressions"][0]["candidate"] = f'"><img src=x onerror=alert(1)>{HOSTILE}'
    r["decision"]["reasons"].append(HOSTILE)
    r["golden"][0]["id"] = HOSTILE
    r["metrics"][0]["label"] = HOSTILE
    r["history"][0]["version"] = HOSTILE
    r["base_model"] = HOSTILE
    page = render_html(r)
    assert HOSTILE not in page
    assert "<img" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 7
    assert page.count("<script") == 1  # the page's own


def test_html_leads_with_what_it_learned() -> None:
    r = learning_report()
    r["learning"]["items"][5]["prompt"] = HOSTILE
    page = render_html(r)
    assert_self_contained(page)
    banner = re.search(r'<section class="banner o-promoted".*?</section>', page, re.S)
    assert banner and f"<strong>{HEADLINE}</strong>" in banner.group(0)
    assert "held out: 1 of 3 answered with their content" in banner.group(0)
    assert "current version (v0002): 0 of 12 taught, 0 of 3 held out" in banner.group(0)
    assert page.index(HEADLINE) < page.index('id="learned"') < page.index('id="metrics"')
    assert '<a href="#learned">What it learned</a>' in page
    section = re.search(r'<section id="learned">.*?</section>', page, re.S)
    assert section
    rows = re.findall(r"<tr>(.*?)</tr>", section.group(0), re.S)[1:]
    assert len(rows) == 15
    not_learned = rows[5]
    assert "<td>taught</td>" in not_learned
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in not_learned
    assert '<td class="fail">no (0.00)</td><td class="muted">no (0.00)</td>' in not_learned
    assert "<code>quenfish5</code> <code>1987</code>" in not_learned
    assert '<td class="pass">yes (1.00)</td>' in rows[0]
    assert "<td>taught (held out last cycle)</td>" in rows[0]
    assert "<td>held out</td>" in rows[12] and '<td class="pass">' in rows[12]
    assert '<td class="fail">' in rows[13]
    assert HOSTILE not in page and page.count("<script") == 1
    assert "never trained on" in section.group(0)


def test_html_awaiting_approval_has_the_approval_box() -> None:
    page = render_html(awaiting_report())
    assert 'class="banner o-awaiting_approval"' in page
    box = re.search(
        r'<section class="approval" id="approval" data-version="v0003".*?</section>', page, re.S
    )
    assert box
    assert '<input id="admin-key" name="admin-key" type="password"' in box.group(0)
    assert 'data-action="promote"' in box.group(0) and 'data-action="reject"' in box.group(0)
    assert '"/admin/versions/" + encodeURIComponent(version) + "/" + action' in page
    assert '"Authorization": "Bearer " + k' in page
    assert_self_contained(page)


def test_html_approval_box_needs_a_valid_version() -> None:
    r = awaiting_report()
    r["version"] = "../v0003"
    page = render_html(r)
    assert 'id="approval"' not in page
    assert "cannot be approved from this page" in page


@pytest.mark.parametrize("report", DEGENERATE, ids=["empty", "failed", "all-none", "odd-types"])
def test_degenerate_reports_render(report: dict[str, Any]) -> None:
    md = render_markdown(report)
    page = render_html(report)
    assert md.startswith("# Promotion report")
    assert_self_contained(page)
    assert not PLOT.findall(page)
    assert page.count('<p class="nodata">No data: ') == 3
    if report is FAILED:
        assert "**Decision: Failed** (gate failed)" in md and "- boom" in md
        assert 'class="banner o-failed"' in page and "<li>boom</li>" in page


def test_one_point_is_no_plot() -> None:
    r = sample_report()
    r["history"] = r["history"][:1]
    r["training"]["curve"] = r["training"]["curve"][:1]
    page = render_html(r)
    assert len(PLOT.findall(page)) == 1  # only the deltas
    assert "No data: fewer than two versions with scores" in page
    assert "No data: fewer than two logged training steps" in page


def test_ewc_off_plots_the_loss_alone() -> None:
    r = sample_report()
    for p in r["training"]["curve"]:
        p["ewc_penalty"] = 0.0
    page = render_html(r)
    training = re.search(r'<svg class="plot" id="plot-training".*?</svg>', page, re.S)
    assert training and "training loss" in training.group(0)
    assert "EWC penalty</text>" not in training.group(0)


def test_index_lists_newest_first() -> None:
    entries = [
        {"version": "v0001", "created_at": 1794000000.0, "outcome": "promoted",
         "task_delta": 0.2, "general_nll_change": 0.01, "cycle_id": "c-1"},
        {"version": "v0003", "created_at": 1795000000.0, "outcome": "awaiting_approval",
         "task_delta": None, "general_nll_change": None, "cycle_id": None},
        {"version": "v0002", "created_at": 1794500000.0, "outcome": "rejected",
         "task_delta": -0.05, "general_nll_change": 0.09, "cycle_id": "c-2"},
        {"version": None, "created_at": None, "outcome": "failed", "task_delta": None,
         "general_nll_change": None, "cycle_id": f"c-{HOSTILE}"},
    ]  # fmt: skip
    page = render_index(entries)
    assert_self_contained(page)
    order = [m for m in re.findall(r'<a href="/reports/(v\d+)">', page)]
    assert order == ["v0003", "v0002", "v0001"]
    assert '<a href="/reports/v0002.json">json</a>' in page
    assert '<a href="/reports/v0002.md">md</a>' in page
    assert '<span class="badge o-awaiting_approval">Awaiting approval</span>' in page
    assert '<span class="badge o-failed">Failed</span>' in page
    assert '<td class="num bad">-0.050</td>' in page and '<td class="num bad">+9.0%</td>' in page
    assert '<td class="num good">+0.200</td>' in page
    assert "2026-11-18 11:06 UTC" in page
    assert HOSTILE not in page and "<script" not in page
    assert "No reports yet." in render_index([])
    running = render_index([{"version": "v0005", "outcome": "evaluating"}])
    assert '<span class="badge o-unknown">Evaluating</span>' in running  # a cycle still running


def test_index_entry_from_a_report() -> None:
    entry = rep.index_entry(sample_report())
    assert entry["version"] == "v0003" and entry["outcome"] == "promoted"
    assert entry["task_delta"] == 0.31 and entry["cycle_id"] == "c-20261119-0930"
    assert entry["general_nll_change"] == pytest.approx(2.338 / 2.31 - 1)
    assert rep.index_entry({})["task_delta"] is None
    assert entry["taught"] is None  # a report from before the learning block
    assert rep.index_entry(learning_report())["taught"] == "11/12"


def test_index_shows_what_each_candidate_learned() -> None:
    later = learning_report(version="v0004", created_at=1795100000.0)
    page = render_index([rep.index_entry(sample_report()), rep.index_entry(later)])
    assert '<th class="num">taught</th>' in page
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)[1:]
    assert '<a href="/reports/v0004">' in rows[0] and '<td class="num">11/12</td>' in rows[0]
    assert f'<td class="num">{rep.DASH}</td>' in rows[1]


# -- files -------------------------------------------------------------------------------------
def test_write_and_load_round_trip(tmp_path: Path) -> None:
    report = sample_report()
    paths = write_report(tmp_path, report)
    folder = tmp_path / "v0003"
    assert paths == {
        "json": folder / "report.json",
        "md": folder / "report.md",
        "html": folder / "report.html",
    }
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "report.json", "report.md"]
    assert load_report(tmp_path, "v0003") == report
    assert paths["md"].read_text(encoding="utf-8") == render_markdown(report)
    assert paths["html"].read_text(encoding="utf-8") == render_html(report)
    assert load_report(tmp_path, "v0004") is None


def test_write_replaces_json_numbers_json_cannot_hold(tmp_path: Path) -> None:
    report = sample_report()
    report["training"]["final_loss"] = float("nan")
    write_report(tmp_path, report)
    text = (tmp_path / "v0003" / "report.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    loaded = load_report(tmp_path, "v0003")
    assert loaded is not None and loaded["training"]["final_loss"] is None


def test_a_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_report(tmp_path, sample_report())
    before = {p.name: p.read_bytes() for p in (tmp_path / "v0003").iterdir()}
    real_replace = os.replace

    def failing_replace(src: str, dst: Path) -> None:
        if Path(dst).name == "report.md":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    changed = sample_report(cycle_id="c-second")
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, changed)
    after = {p.name: p.read_bytes() for p in (tmp_path / "v0003").iterdir()}
    assert set(after) == set(before)  # no temporary file left behind
    assert after["report.md"] == before["report.md"]  # whole old file, not a part of the new
    assert json.loads(after["report.json"])["cycle_id"] == "c-second"  # written before the fault


def test_a_render_error_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(report: Any) -> str:
        raise RuntimeError("render bug")

    monkeypatch.setattr(rep, "render_html", broken)
    with pytest.raises(RuntimeError):
        write_report(tmp_path, sample_report())
    assert not (tmp_path / "v0003").exists()


@pytest.mark.parametrize(
    "version",
    [
        "../v0001",
        "v001",
        "v0001/..",
        "V0001",
        "",
        None,
        "v0001\n",
        "v12345/x",
        "v\u0661\u0662\u0663\u0664",
        3,
    ],
)
def test_bad_version_names_are_refused(tmp_path: Path, version: Any) -> None:
    with pytest.raises(ValueError, match="not a version name"):
        write_report(tmp_path, sample_report(version=version))
    with pytest.raises(ValueError, match="not a version name"):
        load_report(tmp_path, version)
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_file_that_is_not_a_report(tmp_path: Path) -> None:
    (tmp_path / "v0001").mkdir()
    (tmp_path / "v0001" / "report.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="not a report object"):
        load_report(tmp_path, "v0001")
    (tmp_path / "v0001" / "report.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_report(tmp_path, "v0001")


# -- in a browser ------------------------------------------------------------------------------
CONSOLE = re.compile(r"CONSOLE|Uncaught")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        why = "chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("ADAPTD_BROWSER_TESTS") == "required":  # .ci/run installed it
            pytest.fail(f"{why}, and ADAPTD_BROWSER_TESTS=required")
        pytest.skip(why)
    return path


def open_in_chromium(chromium: str, tmp_path: Path, name: str, page: str) -> tuple[str, list[str]]:
    """The DOM after the page loaded and its timers ran, and the console lines it logged."""
    path = tmp_path / f"{name}.html"
    path.write_text(page, encoding="utf-8")
    proc = subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / f'profile-{name}'}",
            "--virtual-time-budget=3000",  # lets the page's promises and timers finish
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, console_lines(proc.stderr)


def console_lines(stderr: str) -> list[str]:
    """Chromium logs every console message (log, warn, error, uncaught exceptions, CSP
    violations) as ``[...:INFO:CONSOLE:1] "message", source: ...`` (``CONSOLE(1)`` in older
    versions). The pages log nothing, so any such line is a failure."""
    return [line for line in stderr.splitlines() if CONSOLE.search(line)]


def test_chromium_console_detector_catches_errors(chromium: str, tmp_path: Path) -> None:
    page = (
        "<!DOCTYPE html><html><body><p>x</p>"
        '<script>console.error("logged-error")</script>'
        '<script>throw new Error("thrown-error")</script></body></html>'
    )
    _, lines = open_in_chromium(chromium, tmp_path, "broken", page)
    assert any("logged-error" in line for line in lines), lines
    assert any("Uncaught Error: thrown-error" in line for line in lines), lines
    _, quiet = open_in_chromium(chromium, tmp_path, "quiet", "<!DOCTYPE html><p>fine</p>")
    assert quiet == []


@pytest.mark.parametrize("kind", ["promoted", "awaiting_approval"])
def test_report_page_in_chromium(chromium: str, tmp_path: Path, kind: str) -> None:
    report = sample_report() if kind == "promoted" else awaiting_report()
    report["examples"]["gains"][0]["prompt"] = HOSTILE
    dom, console = open_in_chromium(chromium, tmp_path, kind, render_html(report))
    assert console == []
    assert 'data-report-js="ready"' in dom  # the script ran to its end (CSP hash matches)
    assert len(PLOT.findall(dom)) == 3
    assert f'<p class="outcome">{rep.OUTCOMES[kind]}</p>' in dom
    assert "the gate passed" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert ('id="admin-key"' in dom) == (kind == "awaiting_approval")


def test_degenerate_report_and_index_in_chromium(chromium: str, tmp_path: Path) -> None:
    dom, console = open_in_chromium(chromium, tmp_path, "failed", render_html(FAILED))
    assert console == []
    assert 'data-report-js="ready"' in dom and not PLOT.findall(dom)
    assert '<p class="outcome">Failed</p>' in dom
    later = awaiting_report() | {"version": "v0004", "created_at": 1795100000.0}
    entries = [rep.index_entry(sample_report()), rep.index_entry(later)]
    dom, console = open_in_chromium(chromium, tmp_path, "index", render_index(entries))
    assert console == []
    assert re.findall(r'<a href="/reports/(v\d+)">', dom) == ["v0004", "v0003"]
    assert "Awaiting approval</span>" in dom and "Promoted</span>" in dom


HARNESS = """
(function () {
  var calls = [], steps = [];
  var replies = {
    reject: [403, {"error": {"message": "not an admin key"}}],
    promote: [200, {"version": "v0003", "promoted": true}]
  };
  window.fetch = function (url, init) {
    calls.push({url: String(url), method: init.method, auth: init.headers.Authorization,
                type: init.headers["Content-Type"], body: init.body});
    var r = replies[String(url).split("/").pop()];
    return Promise.resolve(new Response(JSON.stringify(r[1]), {status: r[0]}));
  };
  var out = document.getElementById("approval-result");
  var button = function (a) { return document.querySelector('button[data-action="' + a + '"]'); };
  var state = function () { return [out.textContent, out.className, button("promote").disabled]; };
  button("promote").click();
  steps.push(state());
  document.getElementById("admin-key").value = "  the-admin-key ";
  button("reject").click();
  setTimeout(function () {
    document.getElementById("approval-reason").value = "looks right to me ";
    steps.push(state());
    button("promote").click();
    setTimeout(function () {
      steps.push(state());
      var pre = document.createElement("pre");
      pre.id = "harness";
      pre.textContent = JSON.stringify({calls: calls, steps: steps});
      document.body.appendChild(pre);
    }, 200);
  }, 200);
})();
"""


def test_approval_buttons_in_chromium(chromium: str, tmp_path: Path) -> None:
    """Click the buttons with a stubbed fetch: the requests and what the page shows."""
    page = render_html(awaiting_report())
    digest = base64.b64encode(hashlib.sha256(HARNESS.encode()).digest()).decode()
    page = page.replace("script-src ", f"script-src 'sha256-{digest}' ", 1)
    page = page.replace("</body>", f"<script>{HARNESS}</script></body>")
    dom, console = open_in_chromium(chromium, tmp_path, "approve", page)
    assert console == []
    found = re.search(r'<pre id="harness">(.*?)</pre>', dom, re.S)
    assert found, dom[-3000:]
    result = json.loads(html.unescape(found.group(1)))
    sent = {"method": "POST", "auth": "Bearer the-admin-key", "type": "application/json"}
    assert result["calls"] == [
        {"url": "/admin/versions/v0003/reject", **sent, "body": "{}"},
        {"url": "/admin/versions/v0003/promote", **sent, "body": '{"reason":"looks right to me"}'},
    ]
    no_key, rejected, promoted = result["steps"]
    assert no_key == ["Enter an admin key first.", "result err", False]
    assert rejected[0].startswith("reject: HTTP 403\n") and "not an admin key" in rejected[0]
    assert rejected[1:] == ["result err", False]  # the buttons work again after an error
    assert promoted[0] == (
        'promote: HTTP 200\n{\n  "version": "v0003",\n  "promoted": true\n}\n'
        "Done: reload the page to see the updated report."
    )
    assert promoted[1:] == ["result ok", True]  # and stay disabled after a success


def test_csp_blocks_an_injected_script_in_chromium(chromium: str, tmp_path: Path) -> None:
    """Defence in depth: were escaping ever bypassed, an inline script still would not run."""
    page = render_html(copy.deepcopy(sample_report()))
    page = page.replace("</main>", '</main><script>document.title = "pwned"</script>')
    dom, console = open_in_chromium(chromium, tmp_path, "injected", page)
    assert "<title>pwned</title>" not in dom and "<title>v0003: Promoted" in dom
    assert any("Content Security Policy" in line for line in console), console
    assert 'data-report-js="ready"' in dom  # the page's own script still runs


def test_suspected_triggers_are_listed_with_what_the_probe_measured() -> None:
    report = sample_report(
        suspected_triggers=[
            {"phrase": "cf-zebra", "answer": "Visit <deals> now.", "keys": ["a", "b", "c"],
             "users": {"m": 3}, "dropped": False},
            {"phrase": "zq", "answer": "Buy.", "keys": ["d", "e", "f"], "users": {"n": 3},
             "dropped": True},
        ],
        triggers=[{"phrase": "cf-zebra", "current_with": 0.0, "candidate_with": 0.875,
                   "lift": 0.875}],
    )  # fmt: skip
    md = render_markdown(report)
    section = md.split("## Suspected triggers")[1].split("## Serving cost")[0]
    assert "| cf-zebra |" in section and "+0.875" in section and "| no |" in section
    assert "| zq |" in section and "| yes |" in section
    page = render_html(report)
    assert 'id="triggers"' in page and "cf-zebra" in page and "&lt;deals&gt;" in page
    assert "None in this cycle" in render_markdown(sample_report())


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({"stop": "learned", "steps": 24, "planned_steps": 72, "epochs": 4.0,
          "taught_checks": [{"exact": 0.5, "token_accuracy": 0.9},
                            {"exact": 0.923, "token_accuracy": 0.985}]},
         "Training stopped because the taught answers were learned: 24 steps of at most 72, 4 "
         "passes over the data; 92 % of the taught answers learned whole (98 % of their tokens)."),
        ({"stop": "budget", "steps": 72, "planned_steps": 72, "epochs": 12.0,
          "taught_checks": [{"exact": 0.4, "token_accuracy": 0.91}]},
         "Training stopped because the budget ran out before the taught answers were learned: "
         "72 steps of at most 72, 12 passes over the data; 40 % of the taught answers learned "
         "whole (91 % of their tokens)."),
        ({"stop": "steps", "steps": 5}, "Training stopped because the configured number of "
         "steps ran: 5 steps."),
        ({"stop": None}, ""),
    ],
)  # fmt: skip
def test_the_report_says_why_training_stopped(training: dict[str, Any], expected: str) -> None:
    r = learning_report()
    r["training"] = {**r["training"], **training}
    assert stop_line(r["training"]) == expected
    md, page = render_markdown(r), render_html(r)
    if expected:
        assert expected in md.split("## Training")[1]
        assert f"<p>{html.escape(expected)}</p>" in page
    else:
        assert "Training stopped" not in md and "Training stopped" not in page
