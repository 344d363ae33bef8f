"""Promotion reports: one cycle's evidence, rendered for the person who reviews it.

Rendering only. A report is a plain JSON-serialisable dict (schema 1, written by the cycle);
this module turns it into Markdown and into one self-contained HTML page, renders the index of
all reports, and writes and reads ``reports/<version>/report.{json,md,html}``.

Every field of a report may be missing or ``None`` (a failed cycle has a decision and little
else): each section then says so instead of failing. The HTML page loads nothing from anywhere:
its CSS, its SVG plots and its one small script are inline, and a ``Content-Security-Policy``
meta tag allows only that style sheet and that script (by hash) plus ``fetch`` to the page's own
server, so text that slipped past escaping still could not run. Text from users (prompts,
answers, corrections) is escaped everywhere.

Links in the pages are server paths: ``/reports/<version>`` (this page),
``/reports/<version>.json`` and ``/reports/<version>.md``, ``/reports`` (the index); the
approval box of a version awaiting approval posts to ``/admin/versions/<version>/promote`` or
``/reject`` with the admin key typed into the page.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = 1
VERSION_RE = re.compile(r"^v\d{4,}$", re.ASCII)
FILES = {"json": "report.json", "md": "report.md", "html": "report.html"}
EXAMPLE_CHARS = 400  # an example's text is cut here (the HTML page can unfold the rest)
FULL_TEXT_CHARS = 20_000  # and never shows more than this
MAX_EXAMPLES = 10  # per kind (gains, regressions)
CELL_CHARS = 160  # a text in a table cell is cut here (the HTML page can unfold the rest)
DASH = "\u2013"  # en dash: a missing value
TIMES = "\u00d7"

OUTCOMES = {
    "promoted": "Promoted",
    "rejected": "Rejected",
    "awaiting_approval": "Awaiting approval",
    "failed": "Failed",
}
SECTION_ORDER = ("task", "retention", "general", "golden", "canary", "triggers")
TRIGGER_COLUMNS = [
    "phrase",
    "payload",
    "examples",
    "users",
    "dropped",
    "current",
    "candidate",
    "lift",
]


def _trigger_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """One row per suspected trigger: what curation found, and what the probe measured."""
    probed = {_text(_dict(t).get("phrase")): _dict(t) for t in _list(report.get("triggers"))}
    rows = []
    for t in (_dict(x) for x in _list(report.get("suspected_triggers"))):
        phrase = _text(t.get("phrase"))
        p = probed.get(phrase, {})
        rows.append(
            [
                phrase,
                _text(t.get("answer"))[:60],
                str(len(_list(t.get("keys")))),
                str(len(_dict(t.get("users")))),
                "yes" if t.get("dropped") else "no",
                _fmt(p.get("current_with")) if p else DASH,
                _fmt(p.get("candidate_with")) if p else DASH,
                _fmt(p.get("lift"), signed=True) if p else DASH,
            ]
        )
    return rows


# -- reading the dict defensively --------------------------------------------------------------
def _dict(x: Any) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}


def _list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, list | tuple) else []


def _num(x: Any) -> float | None:
    """A finite number, or None (bools, strings, NaN and infinities are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _text(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    return json.dumps(x, ensure_ascii=False, default=str)


def _valid_version(x: Any) -> str | None:
    return x if isinstance(x, str) and VERSION_RE.fullmatch(x) else None


def check_version(version: Any) -> str:
    """``version`` if it is a version name (``v0001``), else ValueError: names become paths."""
    v = _valid_version(version)
    if v is None:
        raise ValueError(f"not a version name: {version!r} (expected v followed by 4+ digits)")
    return v


# -- formatting --------------------------------------------------------------------------------
def _fmt(x: Any, *, signed: bool = False) -> str:
    """A number as a person reads it: 3 decimals below 1, fewer above; None as a dash."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    v = _num(x)
    if v is None:
        return DASH
    sign = "+" if signed else ""
    if isinstance(x, int):
        return f"{x:{sign},d}"
    a = abs(v)
    if a == 0:
        return "0"
    if a < 1e-3:
        return f"{v:{sign}.2e}"
    if a < 1:
        return f"{v:{sign}.3f}"
    if a < 100:
        return f"{v:{sign}.2f}"
    if a < 1000:
        return f"{v:{sign}.1f}"
    return f"{v:{sign},.0f}"


def _pct(x: Any) -> str:
    v = _num(x)
    return DASH if v is None else f"{v * 100:+.1f}%"


def _ci(x: Any) -> str:
    ci = _list(x)
    if len(ci) != 2 or _num(ci[0]) is None or _num(ci[1]) is None:
        return DASH
    return f"{_fmt(ci[0], signed=True)} … {_fmt(ci[1], signed=True)}"


def _date(x: Any) -> str:
    v = _num(x)
    if v is None:
        return x if isinstance(x, str) and x else DASH
    try:
        return datetime.fromtimestamp(v, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return DASH


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _outcome(report: Mapping[str, Any]) -> tuple[str, str]:
    """(css key, label) of the decision's outcome; others (a cycle's state while it runs, say
    ``evaluating``) are shown by their name, in grey."""
    raw = _dict(report.get("decision")).get("outcome")
    if isinstance(raw, str) and raw in OUTCOMES:
        return raw, OUTCOMES[raw]
    if isinstance(raw, str) and raw.strip():
        return "unknown", " ".join(raw.replace("_", " ").split()).capitalize()
    return "unknown", "Outcome unknown"


def _ref(report: Mapping[str, Any], key: str) -> str:
    """``parent`` or ``current``: a version name; null means none / the base model; a dash
    when the report does not say (a cycle that failed early)."""
    x = report.get(key)
    if isinstance(x, str) and x:
        return x
    if key not in report:
        return DASH
    return "the base model" if key == "current" else "none (a fresh adapter)"


def _metrics(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows = [_dict(m) for m in _list(report.get("metrics")) if isinstance(m, Mapping)]

    def order(m: Mapping[str, Any]) -> int:
        s = m.get("section")
        return SECTION_ORDER.index(s) if s in SECTION_ORDER else len(SECTION_ORDER)

    return sorted(rows, key=order)  # stable: the producer's order within a section


def _metric_label(m: Mapping[str, Any]) -> str:
    name = _text(m.get("label") or m.get("name")) or "?"
    hib = m.get("higher_is_better")
    return name + (" ↑" if hib is True else " ↓" if hib is False else "")


def _last_ewc(curve: list[Any]) -> float | None:
    for point in reversed(curve):
        v = _num(_dict(point).get("ewc_penalty"))
        if v is not None:
            return v
    return None


# -- what it learned (the ``learning`` block: absent or None in older reports) -----------------
def _learning(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    x = report.get("learning")
    return x if isinstance(x, Mapping) else None


def _k_of_n(learn: Mapping[str, Any], split: str, model: str, sep: str = " of ") -> str | None:
    """How many of a split's items ``model`` learned ("11 of 12"); None when the split had no
    correction with new content (or the report does not say)."""
    g = _dict(learn.get(split))
    n = _num(g.get("n"))
    if not n or n < 0:
        return None
    k = _num(_dict(g.get("learned")).get(model))
    return f"{int(k) if k is not None else DASH}{sep}{int(n)}"


def _split_phrase(learn: Mapping[str, Any], split: str, phrase: str) -> str:
    """``phrase`` with the candidate's count of ``split``, or what stands in for it."""
    k_of_n = _k_of_n(learn, split, "candidate")
    if k_of_n:
        return phrase.format(k_of_n)
    head = phrase.split(":")[0]
    if _num(_dict(learn.get(split)).get("n")) is None:
        return f"{head}: not recorded"
    return f"{head}: no correction with new content this cycle"


def _learning_headline(report: Mapping[str, Any]) -> list[str]:
    """The headline's phrases, plain text: the candidate's taught and held-out counts, then the
    current version's for comparison (left out when neither split had content). Empty without
    a ``learning`` block."""
    learn = _learning(report)
    if learn is None:
        return []
    out = [
        _split_phrase(learn, "taught", "taught: {} learned"),
        _split_phrase(learn, "held_out", "held out: {} answered with their content"),
    ]
    cur = [
        f"{s} {label}"
        for s, label in (
            (_k_of_n(learn, "taught", "current"), "taught"),
            (_k_of_n(learn, "held_out", "current"), "held out"),
        )
        if s
    ]
    ref = _ref(report, "current")
    if cur:
        who = "current version" + (f" ({ref})" if ref != DASH else "")
        out.append(f"{who}: {', '.join(cur)}")
    return out


def _learning_items(learn: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [_dict(i) for i in _list(learn.get("items")) if isinstance(i, Mapping)]


def _split_label(item: Mapping[str, Any]) -> str:
    split = item.get("split")
    if split == "taught":
        return "taught (held out last cycle)" if item.get("carried") is True else "taught"
    if split == "held_out":
        return "held out"
    return _text(split) or DASH


def _learned_text(item: Mapping[str, Any], model: str) -> str:
    """``yes`` / ``no`` with the content recall in brackets: ``no (0.50)``."""
    ok = _dict(item.get("learned")).get(model)
    recall = _num(_dict(item.get("recall")).get(model))
    word = "yes" if ok is True else "no" if ok is False else DASH
    return word + (f" ({recall:.2f})" if recall is not None else "")


def _learning_intro(learn: Mapping[str, Any]) -> str:
    carried = _num(learn.get("carried"))
    if not carried:
        return ""
    k = int(carried)
    return (
        f"{k} of the taught {'item was' if k == 1 else 'items were'} held out last cycle "
        "and trained on in this one."
    )


def _learning_note(learn: Mapping[str, Any]) -> str:
    t = _num(learn.get("threshold"))
    share = f"at least {t:.0%}" if t is not None else "enough"
    return (
        f"Learned: the answer contains {share} of the correction's content words (the share it "
        "contains is in brackets): the words of the correction that were in neither the prompt "
        "nor the served answer, nor function words, nor common to most corrections of the cycle "
        "(their template). Held-out items were never trained on: they are for evaluation only."
    )


def index_entry(report: Mapping[str, Any]) -> dict[str, Any]:
    """The row `render_index` shows for one report: task delta is the first task metric's
    (ROUGE-L preferred), the general change the ``general`` section's ``nll`` delta relative to
    the base model's NLL when both are known; ``taught`` how many of the corrections trained on
    the candidate learned ("11/12", "none" when none had new content, None when not known)."""
    metrics = _metrics(report)
    task = [m for m in metrics if m.get("section") == "task"]
    task.sort(key=lambda m: m.get("name") != "rouge_l")
    nll = next(
        (m for m in metrics if m.get("section") == "general" and m.get("name") == "nll"), None
    )
    change = None
    if nll is not None:
        base, cand = _num(nll.get("base")), _num(nll.get("candidate"))
        change = cand / base - 1 if base and cand is not None else None
    learn = _learning(report)
    taught = None if learn is None else _k_of_n(learn, "taught", "candidate", "/") or "none"
    return {
        "version": report.get("version"),
        "created_at": report.get("created_at"),
        "outcome": _dict(report.get("decision")).get("outcome"),
        "task_delta": _num(task[0].get("delta")) if task else None,
        "general_nll_change": change,
        "taught": taught,
        "cycle_id": report.get("cycle_id"),
    }


# -- Markdown ----------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*\[\]|])")


def _md(x: Any) -> str:
    """Inline Markdown text: one line, no HTML, no table breaks, no emphasis or links."""
    s = " ".join(_text(x).split())
    s = s.replace("&", "&amp;").replace("<", "&lt;")
    return _MD_SPECIAL.sub(r"\\\1", s)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def _md_code(label: str, x: Any) -> list[str]:
    """A labelled text block; a fence longer than any backtick run keeps the text literal."""
    text = _truncate(_text(x), EXAMPLE_CHARS)
    if not text.strip():
        return [f"**{label}:** *(none)*", ""]
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, run + 1)
    return [f"**{label}:**", "", f"{fence}text", text, fence, ""]


def _md_pairs(pairs: Sequence[tuple[str, Any]]) -> str:
    return ", ".join(f"{_md(k)} {_fmt(v)}" for k, v in pairs)


_DATA_COUNTS = (
    ("feedback_in", "feedback items in"),
    ("kept", "kept for training"),
    ("holdout", "held out for evaluation"),
    ("eval_only", "evaluation only"),
)
_HISTORY_SCORES = (
    ("general_nll", "general NLL ↓"),
    ("general_agreement", "general agreement ↑"),
    ("retention_rouge_l", "retention ROUGE-L ↑"),
    ("task_rouge_l", "task ROUGE-L ↑"),
)


def _pass(x: Any) -> str:
    return "✓ pass" if x is True else "✗ fail" if x is False else DASH


def _warn_schema(report: Mapping[str, Any]) -> None:
    schema = report.get("schema")
    if schema != SCHEMA:
        log.warning("report schema %r is not %d; rendering what is recognisable", schema, SCHEMA)


def _md_learning(report: Mapping[str, Any]) -> list[str]:
    """The "What it learned" section: one row per correction with new content."""
    learn = _learning(report)
    if learn is None:
        return []
    out = ["## What it learned", ""]
    intro = _learning_intro(learn)
    out += [intro, ""] if intro else []
    items = _learning_items(learn)
    if not items:
        return [*out, "*No correction with new content this cycle.*", ""]
    rows = [
        [_md(_split_label(i))]
        + [_md(_truncate(_text(i.get(k)), CELL_CHARS)) or DASH for k in ("prompt", "correction")]
        + [_md(", ".join(_text(w) for w in _list(i.get("content")))) or DASH]
        + [_md(_truncate(_text(_dict(i.get("answers")).get("candidate")), CELL_CHARS)) or DASH]
        + [_md(_learned_text(i, "candidate")), _md(_learned_text(i, "current"))]
        for i in items
    ]
    heads = ["split", "prompt", "correction", "content words", "candidate answer"]
    out += _md_table([*heads, "learned?", "current learned?"], rows, set())
    return [*out, _md(_learning_note(learn)), ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the decision and its reasons first, then the evidence."""
    _warn_schema(report)
    version = _text(report.get("version")) or "unknown version"
    decision = _dict(report.get("decision"))
    _, label = _outcome(report)
    out = [f"# Promotion report {_md(version)}", ""]
    headline = [_md(p) for p in _learning_headline(report)]
    if headline:
        out += [" · ".join([f"**{headline[0]}**", *headline[1:]]), ""]

    extra = [v for v in (decision.get("mode"),) if isinstance(v, str) and v]
    passed = decision.get("passed")
    if isinstance(passed, bool):
        extra.append("gate passed" if passed else "gate failed")
    out += [f"**Decision: {_md(label)}**" + (f" ({_md(', '.join(extra))})" if extra else ""), ""]

    reasons = [_text(r) for r in _list(decision.get("reasons"))]
    checks = [_dict(c) for c in _list(decision.get("checks"))]
    for r in reasons:
        failed = r.startswith("FAIL")
        out.append(f"- {'**✗** ' if failed else ''}{_md(r)}")
    if reasons:
        out.append("")
    if checks:
        rows = []
        for c in checks:
            ok = c.get("passed")
            result = "✓ pass" if ok is True else "**✗ FAIL**" if ok is False else DASH
            row = [_md(c.get("name")), result, _fmt(c.get("value")), _fmt(c.get("limit"))]
            rows.append(row + ([] if reasons else [_md(c.get("detail"))]))
        heads = ["check", "result", "value", "limit"] + ([] if reasons else ["detail"])
        out += _md_table(heads, rows, {2, 3})
    if not reasons and not checks:
        out += ["*No reasons were recorded.*", ""]

    meta = [
        ("cycle", _md(report.get("cycle_id")) or DASH),
        ("created", _date(report.get("created_at"))),
        ("base model", _md(report.get("base_model")) or DASH),
        ("parent", _md(_ref(report, "parent"))),
        ("evaluated against", _md(_ref(report, "current"))),
        ("adapter", _md(_dict(report.get("links")).get("adapter")) or DASH),
    ]
    out += [f"- {k}: {v}" for k, v in meta] + [""]
    out += _md_learning(report)

    out += ["## Data", ""]
    data = _dict(report.get("data"))
    if not data:
        out += ["*No data recorded.*", ""]
    else:
        out += [f"- {k}: {_fmt(data.get(key))}" for key, k in _DATA_COUNTS]
        for key, k in (("dropped", "dropped"), ("replay", "replayed")):
            pairs = list(_dict(data.get(key)).items())
            out.append(f"- {k}: {_md_pairs(pairs) if pairs else DASH}")
        out.append("")

    out += ["## Training", ""]
    tr = _dict(report.get("training"))
    if not tr:
        out += ["*No training recorded.*", ""]
    else:
        row = [_fmt(tr.get(k)) for k in ("steps", "seconds", "first_loss", "final_loss")]
        row.append(_fmt(_last_ewc(_list(tr.get("curve")))))
        out += _md_table(
            ["steps", "seconds", "first loss", "final loss", "last EWC penalty"],
            [row],
            set(range(5)),
        )
        if line := stop_line(tr):
            out += [_md(line), ""]

    out += ["## Metrics", ""]
    metrics = _metrics(report)
    if not metrics:
        out += ["*No metrics recorded.*", ""]
    else:
        rows = [
            [_md(m.get("section")) or DASH, _md(_metric_label(m)), _fmt(m.get("n"))]
            + [_fmt(m.get(k)) for k in ("base", "current", "candidate")]
            + [_fmt(m.get("delta"), signed=True), _ci(m.get("ci"))]
            for m in metrics
        ]
        heads = ["section", "metric", "n", "base", "current", "candidate", "delta", "CI"]
        out += _md_table(heads, rows, {2, 3, 4, 5, 6, 7})
        out += ["↑ higher is better, ↓ lower is better; delta is candidate - current.", ""]

    out += ["## Forgetting across versions", ""]
    history = [_dict(h) for h in _list(report.get("history"))]
    if not history:
        out += ["*No earlier versions.*", ""]
    else:
        rows = [
            [_md(h.get("version")) or DASH, _date(h.get("created_at")), _fmt(h.get("promoted"))]
            + [_fmt(h.get(k)) for k, _ in _HISTORY_SCORES]
            for h in history
        ]
        heads = ["version", "created", "promoted", *(t for _, t in _HISTORY_SCORES)]
        out += _md_table(heads, rows, {3, 4, 5, 6})

    out += ["## Examples", ""]
    examples = _dict(report.get("examples"))
    current = _ref(report, "current")
    for key, title in (("gains", "Largest gains"), ("regressions", "Largest regressions")):
        out += [f"### {title}", ""]
        items = [_dict(e) for e in _list(examples.get(key))][:MAX_EXAMPLES]
        if not items:
            out += ["*None.*", ""]
        for i, e in enumerate(items, 1):
            out += [f"#### {i}. delta {_fmt(e.get('delta'), signed=True)}", ""]
            out += _md_code("Prompt", e.get("prompt"))
            out += _md_code(f"Current ({_md(current)})", e.get("current"))
            out += _md_code("Candidate", e.get("candidate"))
            out += _md_code("Correction", e.get("correction"))

    out += ["## Golden suite", ""]
    golden = [_dict(g) for g in _list(report.get("golden"))]
    if not golden:
        out += ["*No golden cases.*", ""]
    else:
        rows = []
        for g in golden:
            regressed = g.get("current") is True and g.get("candidate") is False
            mark = " **✗ regression**" if regressed else ""
            rows.append(
                [_md(g.get("id")) + mark]
                + [_pass(g.get(k)) for k in ("current", "candidate")]
                + [_md(g.get("detail"))]
            )
        out += _md_table(["case", "current", "candidate", "detail"], rows, set())

    out += ["## Suspected triggers", ""]
    trig = _trigger_rows(report)
    if not trig:
        out += ["*None in this cycle's feedback.*", ""]
    else:
        out += [
            "Shares of unrelated prompts answered with the payload when the phrase is added; "
            "lift is the candidate's rise over the share without the phrase, less the current "
            "version's.",
            "",
        ]
        out += _md_table(TRIGGER_COLUMNS, [[_md(c) for c in r] for r in trig], set())

    out += ["## Serving cost", ""]
    cost = _dict(report.get("serving_cost"))
    if not cost:
        out += ["*Not measured.*", ""]
    else:
        row = [_fmt(cost.get(k)) for k in ("base_ms_per_token", "adapter_ms_per_token")]
        ratio = _num(cost.get("ratio"))
        row += [f"{ratio:.2f}{TIMES}" if ratio is not None else DASH, _fmt(cost.get("n"))]
        heads = ["base ms/token", "adapter ms/token", "ratio", "n"]
        out += _md_table(heads, [row], {0, 1, 2, 3})
    return "\n".join(out).rstrip() + "\n"


# -- SVG plots ---------------------------------------------------------------------------------
_W = 720.0
_E = html.escape


def _c(v: float) -> str:
    """An SVG coordinate."""
    return f"{v:.1f}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k apart) covering ``lo..hi``."""
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next((m * mag for m in (1, 2, 2.5, 5) if raw <= m * mag), 10 * mag)
    start, stop = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 12) for i in range(start, stop + 1)]


def _tick_label(v: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    if abs(v) >= 1e6 or step < 1e-6:
        return f"{v:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step * 10 ** (decimals + 1)) % 10:  # 2.5, 0.25: one decimal more
        decimals += 1
    s = f"{v:.{decimals}f}"
    return "0" if float(s) == 0 else s


@dataclass(frozen=True)
class _Series:
    label: str
    points: list[tuple[float, float | None]]
    cls: str  # colour class: s1, s2, s3
    right: bool = False  # on the right-hand axis
    dashed: bool = False
    markers: bool = False
    tips: list[str] = field(default_factory=list)  # one tooltip per point, when markers


def _no_plot(title: str, caption: str, note: str) -> str:
    return (
        f'<figure class="empty"><p class="nodata">No data: {_E(note)}</p>'
        f"<figcaption><strong>{_E(title)}.</strong> {_E(caption)}</figcaption></figure>"
    )


def _figure(pid: str, title: str, caption: str, height: float, body: list[str]) -> str:
    return (
        f'<figure><svg class="plot" id="{pid}" viewBox="0 0 {_c(_W)} {_c(height)}" '
        f'role="img" aria-labelledby="{pid}-title">'
        f'<title id="{pid}-title">{_E(title)}</title>' + "".join(body) + "</svg>"
        f"<figcaption><strong>{_E(title)}.</strong> {_E(caption)}</figcaption></figure>"
    )


def _legend(series: Sequence[_Series], y: float, x0: float) -> list[str]:
    out, x = [], x0
    for s in series:
        dash = " dashed" if s.dashed else ""
        out.append(
            f'<line class="line {s.cls}{dash}" x1="{_c(x)}" x2="{_c(x + 22)}" '
            f'y1="{_c(y)}" y2="{_c(y)}"/>'
            f'<text class="legend" x="{_c(x + 28)}" y="{_c(y)}" dominant-baseline="middle">'
            f"{_E(s.label)}</text>"
        )
        x += 28 + 7 * len(s.label) + 24
    return out


def _line_chart(
    pid: str,
    title: str,
    caption: str,
    series: Sequence[_Series],
    *,
    x_label: str,
    y_label: str,
    y2_label: str = "",
    categories: Sequence[str] = (),
    hollow: frozenset[float] = frozenset(),
    empty: str,
) -> str:
    """A line chart with a left and optionally a right axis; x is numeric or categorical."""
    series = [s for s in series if any(y is not None for _, y in s.points)]
    xs = sorted({x for s in series for x, y in s.points if y is not None})
    if len(xs) < 2:
        return _no_plot(title, caption, empty)
    if all(s.right for s in series):  # only right-hand series: draw them on the left
        series = [
            _Series(s.label, s.points, s.cls, False, s.dashed, s.markers, s.tips) for s in series
        ]
    has_right = any(s.right for s in series)
    left, right, top, bottom, height = 64.0, 68.0 if has_right else 24.0, 40.0, 52.0, 300.0
    pw, ph = _W - left - right, height - top - bottom

    if categories:
        x_lo, x_hi = -0.4, len(categories) - 0.6
        every = max(1, math.ceil(len(categories) / 12))
        x_ticks = [(float(i), c) for i, c in enumerate(categories) if i % every == 0]
    else:
        xt = _ticks(xs[0], xs[-1], 6)
        x_lo, x_hi = xt[0], xt[-1]
        x_ticks = [(t, _tick_label(t, xt)) for t in xt]

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def scale(side: bool) -> tuple[list[float], Callable[[float], float]]:
        ys = [y for s in series if s.right == side for _, y in s.points if y is not None]
        t = _ticks(min(ys), max(ys))
        return t, lambda y: top + ph - (y - t[0]) / (t[-1] - t[0]) * ph

    body: list[str] = []
    yt, sy = scale(False)
    for t in yt:
        y = sy(t)
        body.append(
            f'<line class="grid" x1="{_c(left)}" x2="{_c(left + pw)}" y1="{_c(y)}" y2="{_c(y)}"/>'
            f'<text class="tick" x="{_c(left - 6)}" y="{_c(y)}" text-anchor="end" '
            f'dominant-baseline="middle">{_tick_label(t, yt)}</text>'
        )
    sy2 = sy
    if has_right:
        yt2, sy2 = scale(True)
        for t in yt2:
            y = sy2(t)
            body.append(
                f'<line class="tickmark" x1="{_c(left + pw)}" x2="{_c(left + pw + 4)}" '
                f'y1="{_c(y)}" y2="{_c(y)}"/>'
                f'<text class="tick" x="{_c(left + pw + 7)}" y="{_c(y)}" '
                f'dominant-baseline="middle">{_tick_label(t, yt2)}</text>'
            )
    base = top + ph
    for x, lab in x_ticks:
        px = sx(x)
        body.append(
            f'<line class="tickmark" x1="{_c(px)}" x2="{_c(px)}" y1="{_c(base)}" '
            f'y2="{_c(base + 4)}"/>'
            f'<text class="tick" x="{_c(px)}" y="{_c(base + 17)}" text-anchor="middle">'
            f"{_E(lab)}</text>"
        )
    body.append(
        f'<line class="axis" x1="{_c(left)}" x2="{_c(left + pw)}" y1="{_c(base)}" y2="{_c(base)}"/>'
        f'<line class="axis" x1="{_c(left)}" x2="{_c(left)}" y1="{_c(top)}" y2="{_c(base)}"/>'
        f'<text class="label" x="{_c(left + pw / 2)}" y="{_c(height - 8)}" '
        f'text-anchor="middle">{_E(x_label)}</text>'
        f'<text class="label" transform="translate(16 {_c(top + ph / 2)}) rotate(-90)" '
        f'text-anchor="middle">{_E(y_label)}</text>'
    )
    if has_right:
        body.append(
            f'<line class="axis" x1="{_c(left + pw)}" x2="{_c(left + pw)}" y1="{_c(top)}" '
            f'y2="{_c(base)}"/>'
            f'<text class="label" transform="translate({_c(_W - 12)} {_c(top + ph / 2)}) '
            f'rotate(90)" text-anchor="middle">{_E(y2_label)}</text>'
        )
    for s in series:
        ymap = sy2 if s.right else sy
        d, pen = [], "M"
        for px, py in s.points:
            if py is None:
                pen = "M"
                continue
            d.append(f"{pen}{_c(sx(px))} {_c(ymap(py))}")
            pen = "L"
        dash = " dashed" if s.dashed else ""
        body.append(f'<path class="line {s.cls}{dash}" d="{" ".join(d)}"/>')
        if s.markers:
            for i, (px, py) in enumerate(s.points):
                if py is None:
                    continue
                tip = s.tips[i] if i < len(s.tips) else f"{px:g}: {py:g}"
                fill = " hollow" if px in hollow else ""
                body.append(
                    f'<circle class="pt {s.cls}{fill}" cx="{_c(sx(px))}" cy="{_c(ymap(py))}" '
                    f'r="4"><title>{_E(tip)}</title></circle>'
                )
    body += _legend(series, 16.0, left)
    return _figure(pid, title, caption, height, body)


def _thin(points: list[tuple[float, float | None]], most: int) -> list[tuple[float, float | None]]:
    """At most ``most`` points, evenly spaced, the last one kept."""
    if len(points) <= most:
        return points
    step = math.ceil(len(points) / most)
    kept = points[::step]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def stop_line(tr: Mapping[str, Any]) -> str:
    """Why training ended, in words, with how well the taught answers were learned at the last
    check (plain text; both renderers escape it)."""
    stop, checks = tr.get("stop"), [_dict(c) for c in _list(tr.get("taught_checks"))]
    passes, steps, planned = tr.get("epochs"), tr.get("steps"), tr.get("planned_steps")
    why = {
        "learned": "the taught answers were learned",
        "budget": "the budget ran out before the taught answers were learned",
        "steps": "the configured number of steps ran",
    }.get(str(stop))
    if why is None:
        return ""
    text = f"Training stopped because {why}: {_fmt(steps)} steps"
    if planned:
        text += f" of at most {_fmt(planned)}"
    if isinstance(passes, int | float):
        text += f", {passes:g} passes over the data"
    if checks:
        last = checks[-1]
        exact, tokens = last.get("exact"), last.get("token_accuracy")
        if isinstance(exact, int | float):
            text += f"; {100 * exact:.0f} % of the taught answers learned whole"
            if isinstance(tokens, int | float):
                text += f" ({100 * tokens:.0f} % of their tokens)"
    kept = _dict(tr.get("kept_check"))
    if kept and isinstance(kept.get("exact"), int | float):
        text += (f"; the adapter kept is the one after {_fmt(kept.get('epoch'))} passes, its best"
                 f" check ({100 * kept['exact']:.0f} % learned whole)")  # fmt: skip
    return text + "."


def _training_plot(report: Mapping[str, Any]) -> str:
    curve = [_dict(p) for p in _list(_dict(report.get("training")).get("curve"))]
    steps = [(_num(p.get("step")), p) for p in curve]
    pts = [(x, p) for x, p in steps if x is not None]
    loss = _thin([(x, _num(p.get("loss"))) for x, p in pts], 500)
    ewc = _thin([(x, _num(p.get("ewc_penalty"))) for x, p in pts], 500)
    series = [_Series("training loss", loss, "s1")]
    if any(y for _, y in ewc):  # all zero or missing: EWC was off, nothing to show
        series.append(_Series("EWC penalty", ewc, "s2", right=True, dashed=True))
    return _line_chart(
        "plot-training",
        "Training curves",
        "Loss per optimizer step (left axis) and the EWC penalty (right axis, dashed).",
        series,
        x_label="optimizer step",
        y_label="loss",
        y2_label="EWC penalty",
        empty="fewer than two logged training steps",
    )


def _forgetting_plot(report: Mapping[str, Any]) -> str:
    history = [_dict(h) for h in _list(report.get("history"))]
    names = [_text(h.get("version")) or "?" for h in history]
    hollow = frozenset(float(i) for i, h in enumerate(history) if h.get("promoted") is not True)

    def series(key: str, label: str, cls: str, **kw: Any) -> _Series:
        ys = [_num(h.get(key)) for h in history]
        tips = [f"{n}: {label} {_fmt(y)}" for n, y in zip(names, ys, strict=True)]
        pts = [(float(i), y) for i, y in enumerate(ys)]
        return _Series(label, pts, cls, markers=True, tips=tips, **kw)

    return _line_chart(
        "plot-forgetting",
        "Forgetting across versions",
        "General agreement with the base model and ROUGE-L on earlier cycles' held-out "
        "feedback (left axis, higher is better); general NLL (right axis, dashed, lower is "
        "better). Hollow points: versions not promoted.",
        [
            series("general_agreement", "general agreement", "s1"),
            series("retention_rouge_l", "retention ROUGE-L", "s3"),
            series("general_nll", "general NLL", "s2", right=True, dashed=True),
        ],
        x_label="version",
        y_label="score",
        y2_label="NLL",
        categories=names,
        hollow=hollow,
        empty="fewer than two versions with scores",
    )


def _delta_plot(report: Mapping[str, Any]) -> str:
    title = "Metric deltas"
    caption = (
        "Candidate minus current per metric, with the confidence interval as whiskers. "
        "Green: better, red: worse (by each metric's direction); hollow: the interval "
        "includes zero. Metrics have their own units, so compare signs more than lengths."
    )
    rows = [m for m in _metrics(report) if _num(m.get("delta")) is not None]
    if not rows:
        return _no_plot(title, caption, "no metric has a delta")
    label_w, value_w, top, row_h, bottom = 232.0, 72.0, 12.0, 24.0, 40.0
    x0, x1 = label_w, _W - value_w
    height = top + row_h * len(rows) + bottom
    values = [0.0]
    for m in rows:
        values.append(_num(m.get("delta")) or 0.0)
        ci = _list(m.get("ci"))
        values += [v for v in (_num(c) for c in ci[:2]) if v is not None]
    xt = _ticks(min(values), max(values), 6)

    def sx(v: float) -> float:
        return x0 + (v - xt[0]) / (xt[-1] - xt[0]) * (x1 - x0)

    base = top + row_h * len(rows)
    body = []
    for t in xt:
        body.append(
            f'<line class="grid" x1="{_c(sx(t))}" x2="{_c(sx(t))}" y1="{_c(top)}" '
            f'y2="{_c(base)}"/>'
            f'<text class="tick" x="{_c(sx(t))}" y="{_c(base + 16)}" text-anchor="middle">'
            f"{_tick_label(t, xt)}</text>"
        )
    body.append(
        f'<line class="zero" x1="{_c(sx(0))}" x2="{_c(sx(0))}" y1="{_c(top)}" y2="{_c(base)}"/>'
        f'<text class="label" x="{_c((x0 + x1) / 2)}" y="{_c(height - 6)}" '
        f'text-anchor="middle">delta (candidate - current)</text>'
    )
    for i, m in enumerate(rows):
        y = top + row_h * (i + 0.5)
        delta = _num(m.get("delta")) or 0.0
        ci = [_num(c) for c in _list(m.get("ci"))[:2]]
        lo, hi = (ci[0], ci[1]) if len(ci) == 2 and None not in ci else (None, None)
        hib = m.get("higher_is_better") is not False
        tone = "neutral" if delta == 0 else "good" if (delta > 0) == hib else "bad"
        unsure = " hollow" if lo is not None and hi is not None and lo <= 0 <= hi else ""
        name = _truncate(f"{_text(m.get('section')) or '?'} · {_metric_label(m)}", 34)
        tip = (
            f"{name}: delta {_fmt(delta, signed=True)}, CI {_ci(m.get('ci'))}, n {_fmt(m.get('n'))}"
        )
        body.append(
            f'<text class="tick" x="{_c(label_w - 10)}" y="{_c(y)}" text-anchor="end" '
            f'dominant-baseline="middle">{_E(name)}</text>'
        )
        if lo is not None and hi is not None:
            a, b = sx(lo), sx(hi)
            body.append(
                f'<path class="whisker {tone}" d="M{_c(a)} {_c(y)} H{_c(b)} '
                f'M{_c(a)} {_c(y - 5)} V{_c(y + 5)} M{_c(b)} {_c(y - 5)} V{_c(y + 5)}"/>'
            )
        body.append(
            f'<circle class="dot {tone}{unsure}" cx="{_c(sx(delta))}" cy="{_c(y)}" r="5">'
            f"<title>{_E(tip)}</title></circle>"
            f'<text class="tick" x="{_c(x1 + 10)}" y="{_c(y)}" dominant-baseline="middle">'
            f"{_fmt(delta, signed=True)}</text>"
        )
    return _figure("plot-deltas", title, caption, height, body)


# -- HTML --------------------------------------------------------------------------------------
_CSS = """
:root{--bg:#fff;--fg:#1f2328;--fg2:#59636e;--line:#d1d9e0;--grid:#eef1f4;--panel:#f6f8fa;
--good:#1a7f37;--good-bg:#dafbe1;--bad:#cf222e;--bad-bg:#ffebe9;--wait:#9a6700;--wait-bg:#fff8c5;
--fail:#57606a;--fail-bg:#eaeef2;--c1:#0969da;--c2:#bf3989;--c3:#1a7f37;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--fg2:#9198a1;
--line:#3d444d;--grid:#21262d;--panel:#151b23;--good:#3fb950;--good-bg:#12261e;--bad:#f85149;
--bad-bg:#2d1517;--wait:#d29922;--wait-bg:#272115;--fail:#9198a1;--fail-bg:#21262d;
--c1:#4493f8;--c2:#db61a2;--c3:#3fb950}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1000px;margin:0 auto;padding:24px 20px 64px}
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.25rem;margin:36px 0 12px;
padding-bottom:4px;border-bottom:1px solid var(--line)}h3{font-size:1.05rem;margin:20px 0 8px}
a{color:var(--c1)}code,pre{font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
nav{font-size:.9rem;margin:8px 0 0;color:var(--fg2)}nav a{margin-right:12px}
.banner{border-radius:10px;padding:16px 20px;margin:12px 0 16px;border:1px solid var(--line);
border-left:8px solid var(--fail);background:var(--fail-bg)}
.banner .outcome{font-size:1.5rem;font-weight:700;margin:0}
.banner .sub{color:var(--fg2);margin:2px 0 8px}.banner ul{margin:8px 0 0;padding-left:20px}
.banner li.fail{font-weight:600}
.banner .learned{font-size:1.15rem;margin:4px 0 0}.banner .learned strong{font-weight:700}
.o-promoted{border-left-color:var(--good);background:var(--good-bg)}
.o-promoted .outcome{color:var(--good)}
.o-rejected{border-left-color:var(--bad);background:var(--bad-bg)}
.o-rejected .outcome{color:var(--bad)}
.o-awaiting_approval{border-left-color:var(--wait);background:var(--wait-bg)}
.o-awaiting_approval .outcome{color:var(--wait)}
.o-failed .outcome,.o-unknown .outcome{color:var(--fail)}
table{border-collapse:collapse;width:100%;margin:8px 0 12px;font-size:.92rem}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{color:var(--fg2);font-weight:600;background:var(--panel)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.regressed td{background:var(--bad-bg)}
.pass{color:var(--good);font-weight:600}.fail{color:var(--bad);font-weight:600}
.good{color:var(--good)}.bad{color:var(--bad)}
.badge{display:inline-block;padding:1px 9px;border-radius:999px;font-size:.82rem;
font-weight:600;border:1px solid currentColor;white-space:nowrap}
.badge.o-promoted{color:var(--good);background:var(--good-bg)}
.badge.o-rejected{color:var(--bad);background:var(--bad-bg)}
.badge.o-awaiting_approval{color:var(--wait);background:var(--wait-bg)}
.badge.o-failed,.badge.o-unknown{color:var(--fail);background:var(--fail-bg)}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:8px 0}
dl.meta dt{color:var(--fg2)}dl.meta dd{margin:0;overflow-wrap:anywhere}
.muted,.nodata{color:var(--fg2)}.nodata{font-style:italic;margin:6px 0}
figure{margin:16px 0 20px}figure.empty{padding:12px 16px;border:1px dashed var(--line);
border-radius:8px}figcaption{font-size:.85rem;color:var(--fg2);margin-top:4px}
svg.plot{display:block;width:100%;max-width:760px;height:auto;font:12px system-ui,sans-serif}
svg.plot text{fill:var(--fg2)}svg.plot text.legend,svg.plot text.label{fill:var(--fg)}
svg.plot .grid{stroke:var(--grid)}svg.plot .axis{stroke:var(--fg2)}
svg.plot .tickmark{stroke:var(--fg2)}svg.plot .zero{stroke:var(--fg2);stroke-dasharray:3 3}
svg.plot .line{fill:none;stroke-width:2}svg.plot .dashed{stroke-dasharray:6 4}
svg.plot .s1{stroke:var(--c1)}svg.plot .s2{stroke:var(--c2)}svg.plot .s3{stroke:var(--c3)}
svg.plot .pt{stroke-width:2}svg.plot .pt.s1{fill:var(--c1)}svg.plot .pt.s2{fill:var(--c2)}
svg.plot .pt.s3{fill:var(--c3)}svg.plot .hollow{fill:var(--bg)}
svg.plot .whisker{fill:none;stroke-width:1.5}svg.plot .dot{stroke-width:2}
svg.plot .good{stroke:var(--good);fill:var(--good)}svg.plot .bad{stroke:var(--bad);fill:var(--bad)}
svg.plot .neutral{stroke:var(--fail);fill:var(--fail)}svg.plot .whisker.good,
svg.plot .whisker.bad,svg.plot .whisker.neutral{fill:none}svg.plot .dot.hollow{fill:var(--bg)}
.example{border:1px solid var(--line);border-radius:8px;padding:10px 14px;margin:12px 0}
.example .head{font-weight:600;margin-bottom:6px}
.example .pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
@media (max-width:700px){.example .pair{grid-template-columns:1fr}}
.example h4{margin:8px 0 2px;font-size:.8rem;text-transform:uppercase;letter-spacing:.04em;
color:var(--fg2)}
pre.text{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;padding:8px 10px;
background:var(--panel);border-radius:6px;max-height:24em;overflow:auto}
details summary{cursor:pointer;color:var(--c1);font-size:.85rem}
.approval{border:2px solid var(--wait);border-radius:10px;padding:14px 18px;margin:0 0 20px}
.approval h2{margin:0 0 6px;border:0;padding:0}
.approval form{display:flex;flex-wrap:wrap;gap:8px;align-items:center}
.approval input{font:inherit;padding:6px 8px;min-width:13em;border:1px solid var(--line);
border-radius:6px;background:var(--bg);color:var(--fg)}
.approval button{font:inherit;font-weight:600;padding:6px 14px;border-radius:6px;
border:1px solid var(--line);cursor:pointer;color:#fff}
.approval button:disabled{opacity:.55;cursor:default}
button.approve{background:var(--good)}button.reject{background:var(--bad)}
pre.result{white-space:pre-wrap;margin:10px 0 0;padding:8px 10px;border-radius:6px;
background:var(--panel)}pre.result:empty{display:none}
pre.result.ok{border-left:4px solid var(--good)}pre.result.err{border-left:4px solid var(--bad)}
footer{margin-top:40px;font-size:.85rem;color:var(--fg2)}
""".strip()

# The approval box's script. It runs on every report page and does nothing without the box;
# it marks <html data-report-js="ready"> when set up (the browser test reads that).
_JS = """
(function () {
  "use strict";
  var root = document.documentElement;
  var box = document.getElementById("approval");
  if (box) {
    var version = box.getAttribute("data-version") || "";
    var key = document.getElementById("admin-key");
    var reason = document.getElementById("approval-reason");
    var out = document.getElementById("approval-result");
    var buttons = Array.prototype.slice.call(box.querySelectorAll("button[data-action]"));
    var show = function (text, ok) {
      out.textContent = text;
      out.className = "result " + (ok ? "ok" : "err");
    };
    var busy = function (on) {
      buttons.forEach(function (b) { b.disabled = on; });
    };
    var send = function (action) {
      var k = key.value.trim();
      if (!k) {
        show("Enter an admin key first.", false);
        key.focus();
        return;
      }
      busy(true);
      show(action + ": sending…", true);
      var url = "/admin/versions/" + encodeURIComponent(version) + "/" + action;
      var why = reason.value.trim();
      fetch(url, {
        method: "POST",
        headers: {
          "Authorization": "Bearer " + k,
          "Content-Type": "application/json",
          "Accept": "application/json"
        },
        body: JSON.stringify(why ? {"reason": why} : {}),
        credentials: "omit",
        cache: "no-store"
      }).then(function (r) {
        return r.text().then(function (t) {
          var body = t;
          try { body = JSON.stringify(JSON.parse(t), null, 2); } catch (e) { /* not JSON */ }
          var done = r.ok ? "\\nDone: reload the page to see the updated report." : "";
          show(action + ": HTTP " + r.status + "\\n" + body + done, r.ok);
          if (!r.ok) { busy(false); }
        });
      }).catch(function (e) {
        show(action + ": request failed: " + e, false);
        busy(false);
      });
    };
    buttons.forEach(function (b) {
      b.addEventListener("click", function () { send(b.getAttribute("data-action")); });
    });
    box.querySelector("form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      show("Choose Approve or Reject.", false);
    });
  }
  root.setAttribute("data-report-js", "ready");
})();
""".strip()


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _page(title: str, body: str, *, script: bool) -> str:
    csp = (
        f"default-src 'none'; style-src {_sha256(_CSS)}; "
        f"script-src {_sha256(_JS) if script else chr(39) + 'none' + chr(39)}; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'"
    )
    tail = f"<script>{_JS}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{_E(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n{tail}\n</body>\n</html>\n"
    )


def _td(text: str, *, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    return f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>"


def _table(heads: Sequence[str], rows: Sequence[Sequence[str]], num: set[int]) -> str:
    """A table; ``heads`` are plain text, cells are HTML already escaped by the caller."""
    th = "".join(
        f'<th class="num">{_E(h)}</th>' if i in num else f"<th>{_E(h)}</th>"
        for i, h in enumerate(heads)
    )
    body = []
    for r in rows:
        cells = "".join(c if c.startswith("<td") else _td(c, num=i in num) for i, c in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _signed_cell(x: Any, higher_is_better: Any = True, *, pct: bool = False) -> str:
    v = _num(x)
    text = _pct(x) if pct else _fmt(x, signed=True)
    if v is None or v == 0 or not isinstance(higher_is_better, bool):
        return _td(_E(text), num=True)
    good = (v > 0) == higher_is_better
    return _td(_E(text), num=True, cls="good" if good else "bad")


def _banner(report: Mapping[str, Any]) -> str:
    decision = _dict(report.get("decision"))
    key, label = _outcome(report)
    sub = []
    mode = decision.get("mode")
    if isinstance(mode, str) and mode:
        sub.append(f"{mode} mode")
    passed = decision.get("passed")
    if isinstance(passed, bool):
        sub.append("the gate passed" if passed else "the gate failed")
    if "current" in report:
        sub.append(f"evaluated against {_ref(report, 'current')}")
    reasons = [_text(r) for r in _list(decision.get("reasons"))]
    items = "".join(
        f'<li class="fail">✗ {_E(r)}</li>' if r.startswith("FAIL") else f"<li>{_E(r)}</li>"
        for r in reasons
    )
    checks = [_dict(c) for c in _list(decision.get("checks"))]
    check_rows = []
    for c in checks:
        ok = c.get("passed")
        result = (
            '<td class="pass">✓ pass</td>'
            if ok is True
            else '<td class="fail">✗ fail</td>'
            if ok is False
            else _td(DASH)
        )
        check_rows.append(
            [_E(_text(c.get("name"))), result, _E(_fmt(c.get("value"))), _E(_fmt(c.get("limit")))]
            + ([] if reasons else [_E(_text(c.get("detail")))])
        )
    heads = ["check", "result", "value", "limit"] + ([] if reasons else ["detail"])
    return (
        f'<section class="banner o-{key}" id="decision" aria-label="Decision">'
        f'<p class="outcome">{_E(label)}</p>{_headline_html(report)}'
        f'<p class="sub">{_E(", ".join(sub))}</p>'
        + (f"<ul>{items}</ul>" if items else "")
        + (_table(heads, check_rows, {2, 3}) if checks else "")
        + ("" if items or checks else '<p class="nodata">No reasons were recorded.</p>')
        + "</section>"
    )


def _headline_html(report: Mapping[str, Any]) -> str:
    """What the candidate learned, under the outcome; nothing without a ``learning`` block."""
    phrases = _learning_headline(report)
    if not phrases:
        return ""
    taught, held, *current = phrases
    return (
        f'<p class="learned" id="learned-headline"><strong>{_E(taught)}</strong> · {_E(held)}'
        + "".join(f'<br><span class="muted">{_E(c)}</span>' for c in current)
        + "</p>"
    )


def _approval(report: Mapping[str, Any]) -> str:
    if _outcome(report)[0] != "awaiting_approval":
        return ""
    version = _valid_version(report.get("version"))
    if version is None:
        return (
            '<section class="approval"><p class="nodata">This report awaits approval but has '
            "no valid version name, so it cannot be approved from this page.</p></section>"
        )
    v = _E(version)
    return (
        f'<section class="approval" id="approval" data-version="{v}" aria-labelledby="approval-h">'
        f'<h2 id="approval-h">Approve or reject {v}</h2>'
        "<p>This candidate waits for a person. The admin key is sent only to this server, "
        "with the request, and is not stored by the page; the reason, if any, is kept with "
        "the decision.</p>"
        '<form id="approval-form" autocomplete="off">'
        '<label for="admin-key">Admin key</label>'
        '<input id="admin-key" name="admin-key" type="password" autocomplete="off" '
        'spellcheck="false" required>'
        '<label for="approval-reason">Reason</label>'
        '<input id="approval-reason" name="reason" type="text" autocomplete="off" '
        'placeholder="optional, kept with the decision" maxlength="500">'
        '<button type="button" class="approve" data-action="promote">Approve and promote</button>'
        '<button type="button" class="reject" data-action="reject">Reject</button>'
        "</form>"
        '<pre class="result" id="approval-result" role="status" aria-live="polite"></pre>'
        "</section>"
    )


def _section(sid: str, title: str, inner: str) -> str:
    return f'<section id="{sid}"><h2>{_E(title)}</h2>{inner}</section>'


def _html_text(x: Any, limit: int = EXAMPLE_CHARS) -> str:
    text = _text(x)
    if not text.strip():
        return '<p class="nodata">(none)</p>'
    short = _truncate(text, limit)
    if short == text:
        return f'<pre class="text">{_E(text)}</pre>'
    full = _truncate(text, FULL_TEXT_CHARS)
    return (
        f'<pre class="text">{_E(short)}</pre><details><summary>show more '
        f'({len(text):,} characters in all)</summary><pre class="text">{_E(full)}</pre></details>'
    )


def _examples_html(report: Mapping[str, Any]) -> str:
    examples = _dict(report.get("examples"))
    current = _ref(report, "current")
    out = []
    for key, title in (("gains", "Largest gains"), ("regressions", "Largest regressions")):
        out.append(f"<h3>{title}</h3>")
        items = [_dict(e) for e in _list(examples.get(key))][:MAX_EXAMPLES]
        if not items:
            out.append('<p class="nodata">None.</p>')
        for i, e in enumerate(items, 1):
            delta = _fmt(e.get("delta"), signed=True)
            out.append(
                f'<div class="example"><div class="head">{i}. delta {_E(delta)}</div>'
                f"<h4>Prompt</h4>{_html_text(e.get('prompt'))}"
                f'<div class="pair"><div><h4>Current ({_E(current)})</h4>'
                f"{_html_text(e.get('current'))}</div>"
                f"<div><h4>Candidate</h4>{_html_text(e.get('candidate'))}</div></div>"
                f"<h4>Correction</h4>{_html_text(e.get('correction'))}</div>"
            )
    return "".join(out)


def _learned_td(item: Mapping[str, Any], model: str) -> str:
    """The candidate's yes / no in colour; the current version's greyed, for comparison."""
    text = _E(_learned_text(item, model))
    if model != "candidate":
        return _td(text, cls="muted")
    ok = _dict(item.get("learned")).get(model)
    return _td(text, cls="pass" if ok is True else "fail" if ok is False else "")


def _learning_html(report: Mapping[str, Any]) -> str:
    """The "What it learned" section: one row per correction with new content."""
    learn = _learning(report)
    if learn is None:
        return ""
    intro = _learning_intro(learn)
    inner = f'<p class="muted">{_E(intro)}</p>' if intro else ""
    items = _learning_items(learn)
    if not items:
        inner += '<p class="nodata">No correction with new content this cycle.</p>'
        return _section("learned", "What it learned", inner)
    rows = [
        [_E(_split_label(i))]
        + [_html_text(i.get(k), CELL_CHARS) for k in ("prompt", "correction")]
        + [" ".join(f"<code>{_E(_text(w))}</code>" for w in _list(i.get("content"))) or DASH]
        + [_html_text(_dict(i.get("answers")).get("candidate"), CELL_CHARS)]
        + [_learned_td(i, "candidate"), _learned_td(i, "current")]
        for i in items
    ]
    heads = ["split", "prompt", "correction", "content words", "candidate answer"]
    inner += _table([*heads, "learned?", "current learned?"], rows, set())
    inner += f'<p class="muted">{_E(_learning_note(learn))}</p>'
    return _section("learned", "What it learned", inner)


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS, SVG and script)."""
    _warn_schema(report)
    version = _text(report.get("version")) or "unknown version"
    valid = _valid_version(report.get("version"))
    _, label = _outcome(report)
    links = ['<a href="/reports">all reports</a>']
    if valid:
        links += [
            f'<a href="/reports/{valid}.json">JSON</a>',
            f'<a href="/reports/{valid}.md">Markdown</a>',
        ]
    sections = [("learned", "What it learned")] if _learning(report) is not None else []
    sections += [
        ("data", "Data"),
        ("training", "Training"),
        ("metrics", "Metrics"),
        ("forgetting", "Forgetting across versions"),
        ("examples", "Examples"),
        ("golden", "Golden suite"),
        ("triggers", "Suspected triggers"),
        ("cost", "Serving cost"),
    ]
    nav = "".join(f'<a href="#{sid}">{_E(t)}</a>' for sid, t in sections)
    head = (
        f"<header><h1>Promotion report {_E(version)}</h1>"
        f"<nav>{' '.join(links)} · {nav}</nav></header>"
    )
    meta_items = [
        ("Cycle", _text(report.get("cycle_id")) or DASH),
        ("Created", _date(report.get("created_at"))),
        ("Base model", _text(report.get("base_model")) or DASH),
        ("Parent", _ref(report, "parent")),
        ("Evaluated against", _ref(report, "current")),
        ("Adapter folder", _text(_dict(report.get("links")).get("adapter")) or DASH),
    ]
    meta = (
        '<dl class="meta">'
        + "".join(f"<dt>{_E(k)}</dt><dd>{_E(v)}</dd>" for k, v in meta_items)
        + "</dl>"
    )

    parts = [head, _banner(report), _approval(report), meta]
    if learned := _learning_html(report):
        parts.append(learned)

    data = _dict(report.get("data"))
    if not data:
        inner = '<p class="nodata">No data recorded.</p>'
    else:
        rows = [[_E(k), _E(_fmt(data.get(key)))] for key, k in _DATA_COUNTS]
        for key, k in (("dropped", "dropped"), ("replay", "replayed")):
            pairs = list(_dict(data.get(key)).items())
            text = ", ".join(f"{_text(a)} {_fmt(b)}" for a, b in pairs) if pairs else DASH
            rows.append([_E(k), _E(text)])
        inner = _table(["", "count"], rows, set())
    parts.append(_section("data", "Data", inner))

    tr = _dict(report.get("training"))
    if not tr:
        inner = '<p class="nodata">No training recorded.</p>'
    else:
        row = [_E(_fmt(tr.get(k))) for k in ("steps", "seconds", "first_loss", "final_loss")]
        row.append(_E(_fmt(_last_ewc(_list(tr.get("curve"))))))
        heads = ["steps", "seconds", "first loss", "final loss", "last EWC penalty"]
        inner = _table(heads, [row], set(range(5)))
        if line := stop_line(tr):
            inner += f"<p>{_E(line)}</p>"
    parts.append(_section("training", "Training", inner + _training_plot(report)))

    metrics = _metrics(report)
    if not metrics:
        inner = '<p class="nodata">No metrics recorded.</p>'
    else:
        rows = [
            [_E(_text(m.get("section")) or DASH), _E(_metric_label(m)), _E(_fmt(m.get("n")))]
            + [_E(_fmt(m.get(k))) for k in ("base", "current", "candidate")]
            + [_signed_cell(m.get("delta"), m.get("higher_is_better")), _E(_ci(m.get("ci")))]
            for m in metrics
        ]
        heads = ["section", "metric", "n", "base", "current", "candidate", "delta", "CI"]
        inner = _table(heads, rows, {2, 3, 4, 5, 6, 7}) + (
            '<p class="muted">↑ higher is better, ↓ lower is better; delta is candidate - '
            "current.</p>"
        )
    parts.append(_section("metrics", "Metrics", inner + _delta_plot(report)))

    history = [_dict(h) for h in _list(report.get("history"))]
    if not history:
        inner = '<p class="nodata">No earlier versions.</p>'
    else:
        rows = [
            [_E(_text(h.get("version")) or DASH), _E(_date(h.get("created_at")))]
            + [_E(_fmt(h.get("promoted")))]
            + [_E(_fmt(h.get(k))) for k, _ in _HISTORY_SCORES]
            for h in history
        ]
        heads = ["version", "created", "promoted", *(t for _, t in _HISTORY_SCORES)]
        inner = _table(heads, rows, {3, 4, 5, 6})
    parts.append(
        _section("forgetting", "Forgetting across versions", _forgetting_plot(report) + inner)
    )

    parts.append(_section("examples", "Examples", _examples_html(report)))

    golden = [_dict(g) for g in _list(report.get("golden"))]
    if not golden:
        inner = '<p class="nodata">No golden cases.</p>'
    else:
        rows = []
        for g in golden:
            regressed = g.get("current") is True and g.get("candidate") is False
            cells = [
                _E(_text(g.get("id")) or DASH)
                + (' <span class="fail">regression</span>' if regressed else "")
            ]
            for k in ("current", "candidate"):
                v = g.get(k)
                cls = "pass" if v is True else "fail" if v is False else ""
                cells.append(_td(_E(_pass(v)), cls=cls))
            cells.append(_E(_text(g.get("detail"))))
            rows.append(cells)
        inner = _table(["case", "current", "candidate", "detail"], rows, set())
    parts.append(_section("golden", "Golden suite", inner))

    trig = _trigger_rows(report)
    inner = (
        _table(TRIGGER_COLUMNS, [[_E(c) for c in r] for r in trig], set())
        if trig
        else '<p class="nodata">None in this cycle\'s feedback.</p>'
    )
    parts.append(_section("triggers", "Suspected triggers", inner))

    cost = _dict(report.get("serving_cost"))
    if not cost:
        inner = '<p class="nodata">Not measured.</p>'
    else:
        ratio = _num(cost.get("ratio"))
        row = [_E(_fmt(cost.get(k))) for k in ("base_ms_per_token", "adapter_ms_per_token")]
        row += [_E(f"{ratio:.2f}{TIMES}" if ratio is not None else DASH), _E(_fmt(cost.get("n")))]
        inner = _table(["base ms/token", "adapter ms/token", "ratio", "n"], [row], {0, 1, 2, 3})
    parts.append(_section("cost", "Serving cost", inner))
    parts.append(
        f"<footer>adaptd promotion report, schema {_E(_text(report.get('schema')))}</footer>"
    )
    return _page(f"{version}: {label} · adaptd", "\n".join(parts), script=True)


def render_index(entries: Sequence[Mapping[str, Any]]) -> str:
    """All reports, newest first, as one self-contained HTML page."""
    rows = [_dict(e) for e in entries]
    rows.sort(key=lambda e: _num(e.get("created_at")) or float("-inf"), reverse=True)
    body = []
    for e in rows:
        version = _valid_version(e.get("version"))
        if version:
            name = f'<a href="/reports/{version}">{version}</a>'
            files = f'<a href="/reports/{version}.json">json</a> · <a href="/reports/{version}.md">md</a>'
        else:
            name, files = _E(_text(e.get("version")) or DASH), DASH
        key, label = _outcome({"decision": {"outcome": e.get("outcome")}})
        body.append(
            [
                name,
                _E(_date(e.get("created_at"))),
                f'<span class="badge o-{key}">{_E(label)}</span>',
                _signed_cell(e.get("task_delta"), True),
                _signed_cell(e.get("general_nll_change"), False, pct=True),
                _td(_E(_text(e.get("taught")) or DASH), num=True),
                f"<code>{_E(_text(e.get('cycle_id')) or DASH)}</code>",
                files,
            ]
        )
    heads = ["version", "created", "outcome", "task Δ", "general NLL", "taught", "cycle", "files"]
    table = _table(heads, body, {3, 4, 5}) if body else '<p class="nodata">No reports yet.</p>'
    inner = (
        "<header><h1>Promotion reports</h1>"
        '<p class="muted">Newest first. Task Δ: ROUGE-L gain over the version serving at the '
        "time; general NLL: change relative to the base model (lower is better); taught: "
        "corrections trained on whose content the candidate learned.</p></header>" + table
    )
    return _page("Promotion reports · adaptd", inner, script=False)


# -- files -------------------------------------------------------------------------------------
def _json_safe(x: Any) -> Any:
    """``x`` with NaN and infinities as None: JSON has no such numbers."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_report(reports_dir: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``reports_dir/<version>/report.{json,md,html}``, each atomically (a temporary
    file in the same folder, then ``os.replace``). Everything is rendered before the first
    file is written. Returns the paths by kind: ``json``, ``md``, ``html``."""
    version = check_version(report.get("version"))
    texts = {
        "json": json.dumps(_json_safe(report), indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        "md": render_markdown(report),
        "html": render_html(report),
    }
    folder = Path(reports_dir) / version
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / name for kind, name in FILES.items()}
    for kind, path in paths.items():
        _write_atomic(path, texts[kind])
    with contextlib.suppress(OSError):  # make the renames durable where the OS allows it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    log.info("wrote report %s to %s", version, folder)
    return paths


def load_report(reports_dir: Path, version: str) -> dict[str, Any] | None:
    """The stored report of ``version``, or None when there is none. ValueError for a bad
    version name or a file that is not a report."""
    path = Path(reports_dir) / check_version(version) / FILES["json"]
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a report object")
    return data
