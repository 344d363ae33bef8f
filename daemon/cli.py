"""The `adaptd` command line.

Exit status 0 on success; otherwise non-zero with a one-line reason on stderr.
`status` and `versions` talk to a running daemon (``--url``, admin key from
``ADAPTD_ADMIN_KEY``); `feedback import/export` and `init` work on files; `demo` starts its
own daemon (`daemon.demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, load_settings
from daemon.logs import setup_logging

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    pass


# -- talking to a running daemon ------------------------------------------------
def _request(
    url: str, path: str, *, method: str = "GET", body: Any = None, raw: bool = False
) -> Any:
    headers = {"Accept": "application/json"}
    key = os.environ.get("ADAPTD_ADMIN_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            payload = resp.read()
            return payload.decode() if raw else json.loads(payload or b"null")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except Exception:
            msg = e.reason
        raise CliError(f"{method} {path}: {e.code} {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"cannot reach the daemon at {url}: {getattr(e, 'reason', e)}") from None


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def cmd_status(args: argparse.Namespace) -> int:
    st = _request(args.url, "/admin/status")
    if args.json:
        print(json.dumps(st))
        return 0
    eng, fb = st["engine"], st["feedback"]
    rows = [
        ["serving", f"adaptd -> {st['serving']['version']}"],
        ["base model", st["base_model"]],
        [
            "engine",
            f"{'ready' if eng['ready'] else 'NOT READY'} (pid {eng['pid']}, restarts {eng['restarts']})"
            + (f": {eng['last_error']}" if eng.get("last_error") else ""),
        ],
        ["interactions", str(st["interactions"])],
        [
            "feedback",
            f"{fb['total']} (+{fb['positive']} / -{fb['negative']}, {fb['corrections']} corrections)",
        ],
        ["log drops", str(st["interaction_log"]["dropped"])],
        ["next cycle", _next_cycle(st.get("next_cycle"))],
        ["running cycle", _running_cycle(st.get("cycle_progress"), st["running_cycle"])],
    ]
    print(_table(rows, ["", ""]).split("\n", 2)[2])
    return 0


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _running_cycle(p: dict[str, Any] | None, running: str | None) -> str:
    """``c-... (v0004): training, 7 min in; step 24 of 50, at most 8 min left (...)``."""
    if not p:
        return str(running or "none")
    head = f"{p['id']}" + (f" ({p['version']})" if p.get("version") else "")
    text = f"{head}: {p['state']}, {_minutes(p['running_s'])} in"
    t = p.get("training")
    if t:
        text += f"; step {t['step']} of {t['of']}"
        if t.get("left_at_most_s") is not None:
            text += f", at most {_minutes(t['left_at_most_s'])} left (the stopping rule may end it sooner)"
    return text


def _next_cycle(nc: dict[str, Any] | None) -> str:
    if not nc:
        return "not scheduled"
    if nc.get("at") is None:
        return str(nc.get("reason"))
    verdict = "would start" if nc.get("would_start") else "would not start"
    return f"{nc['at']} ({nc['schedule']}): {verdict}: {nc['reason']}"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts)) if ts else "-"


def cmd_versions(args: argparse.Namespace) -> int:
    data = _request(args.url, "/admin/versions")
    if args.json:
        print(json.dumps(data))
        return 0
    rows = []
    for v in data["versions"]:
        m = v.get("manifest") or {}
        decision = m.get("decision") or {}
        table = {(r["section"], r["name"]): r for r in (m.get("metrics") or {}).get("table") or []}
        gain = (table.get(("task", "rouge_l")) or {}).get("delta")
        rows.append(
            [
                ("* " if v["promoted"] else "  ") + v["name"],
                v.get("parent") or "-",
                _when(v.get("created_at")),
                str(decision.get("outcome") or "-"),
                f"{gain:+.3f}" if isinstance(gain, int | float) else "-",
            ]
        )
    header = ["version", "parent", "created", "gate", "ROUGE-L gain"]
    print(_table(rows, header) if rows else "no adapter versions yet")
    if rows:
        print(f"\n* = served by `adaptd` (now: {data['promoted'] or 'base'})")
    return 0


def _print_cycle(c: dict[str, Any]) -> None:
    print(f"cycle {c['id']}: {c['state']}" + (f" ({c['version']})" if c.get("version") else ""))
    if c.get("decision"):
        print(f"decision: {c['decision']}")
    for r in c.get("reasons") or []:
        print(f"  - {r}")
    report = (c.get("detail") or {}).get("report")
    if report:
        print(f"report: {report}")


def cmd_cycle(args: argparse.Namespace) -> int:
    cycle = _request(args.url, "/admin/cycles", method="POST", body={})
    if args.wait:
        deadline = time.monotonic() + args.timeout
        last = None
        while cycle["decision"] is None:
            if time.monotonic() > deadline:
                raise CliError(f"cycle {cycle['id']} still {cycle['state']} after {args.timeout} s")
            if cycle["state"] != last and not args.json:
                print(f"{cycle['id']}: {cycle['state']}", file=sys.stderr)
                last = cycle["state"]
            time.sleep(1.0)
            cycle = _request(args.url, f"/admin/cycles/{cycle['id']}")
    if args.json:
        print(json.dumps(cycle))
    else:
        _print_cycle(cycle)
    return 0 if cycle["decision"] != "failed" else 1


def _print_alias(data: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(data))
    else:
        print(f"adaptd now serves {data['version']}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    body = {"reason": args.reason, "force": args.force}
    return _print_alias(
        _request(args.url, f"/admin/versions/{args.version}/promote", method="POST", body=body),
        args,
    )


def cmd_reject(args: argparse.Namespace) -> int:
    data = _request(
        args.url,
        f"/admin/versions/{args.version}/reject",
        method="POST",
        body={"reason": args.reason},
    )
    if args.json:
        print(json.dumps(data))
    else:
        print(f"{args.version} rejected; adaptd serves {data['version']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    body = {"version": args.version, "reason": args.reason}
    return _print_alias(_request(args.url, "/admin/rollback", method="POST", body=body), args)


def cmd_report(args: argparse.Namespace) -> int:
    version = args.version
    if version is None:
        cycles = _request(args.url, "/admin/cycles")["cycles"]
        version = next((c["version"] for c in cycles if c.get("version")), None)
        if version is None:
            raise CliError("no report yet: no cycle has produced a version")
    fmt = "json" if args.json else args.format
    text = _request(args.url, f"/reports/{version}.{fmt}", raw=True)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# -- files ----------------------------------------------------------------------
def _open_store(data_dir: str | None) -> Any:
    from feedback.store import Store

    settings = load_settings(data_dir=Path(data_dir) if data_dir else None)
    store = Store(settings.db_path)
    store.migrate()
    return store


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from feedback.jsonl import export_jsonl

    store = _open_store(args.data_dir)
    if args.file and args.file != "-":
        with open(args.file, "w", encoding="utf-8") as out:
            n = export_jsonl(store, out)
        print(f"exported {n} feedback items to {args.file}", file=sys.stderr)
    else:
        n = export_jsonl(store, sys.stdout)
    if args.json:
        print(json.dumps({"exported": n, "file": args.file}), file=sys.stderr)
    return 0


def cmd_feedback_import(args: argparse.Namespace) -> int:
    from feedback.errors import FeedbackError
    from feedback.jsonl import import_jsonl

    store = _open_store(args.data_dir)
    try:
        with open(args.file, encoding="utf-8") as f:
            result = import_jsonl(store, f)
    except OSError as e:
        raise CliError(f"cannot read {args.file}: {e.strerror}") from None
    except FeedbackError as e:
        raise CliError(f"{args.file}: {e} (nothing was imported)") from None
    if args.json:
        print(json.dumps({"added": result.added, "skipped": result.skipped}))
    else:
        print(f"imported {result.added} feedback items ({result.skipped} already present)")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from daemon.backup import BackupError, backup

    settings = load_settings(data_dir=Path(args.data_dir) if args.data_dir else None)
    try:
        result = backup(settings.data_dir, Path(args.dest))
    except BackupError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        rows = ", ".join(f"{v} {k}" for k, v in result.rows.items())
        print(f"backed up {settings.data_dir} to {result.path} in {result.seconds:.1f} s: {rows}; "
              f"{len(result.versions)} versions, {result.reports} reports")  # fmt: skip
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from daemon.config import example_toml

    path = Path(args.path)
    if path.exists() and not args.force:
        raise CliError(f"{path} exists; pass --force to overwrite it")
    path.write_text(example_toml(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "model": args.model,
        "host": args.host,
        "port": args.port,
    }
    if args.vllm_url:
        overrides["serving"] = {"vllm_url": args.vllm_url}
    settings = load_settings(**overrides)
    setup_logging(settings.log_level, settings.log_format)
    from daemon.app import run

    run(settings)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import DemoError, run_demo

    try:
        return run_demo(
            short=args.short,
            model=args.model,
            data_dir=Path(args.data_dir) if args.data_dir else None,
            port=args.port,
            keep=args.keep,
        )
    except DemoError as e:
        raise CliError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaptd", description="A continual-learning adaptation daemon."
    )
    sub = p.add_subparsers(dest="command", required=True)

    def remote(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--url", default=os.environ.get("ADAPTD_URL", DEFAULT_URL))
        sp.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--data-dir")
    s.add_argument("--model", help="a local model folder or a hub id")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--vllm-url", help="use a running vLLM server instead of starting one")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("status", help="what the daemon is doing")
    remote(s)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("versions", help="adapter versions")
    remote(s)
    s.set_defaults(fn=cmd_versions)

    s = sub.add_parser("cycle", help="start an adaptation cycle now")
    remote(s)
    s.add_argument("--wait", action="store_true", help="block until it ends; print its decision")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    s.set_defaults(fn=cmd_cycle)

    s = sub.add_parser("promote", help="serve VERSION (approves one awaiting approval)")
    remote(s)
    s.add_argument("version")
    s.add_argument("--reason", default="")
    s.add_argument("--force", action="store_true", help="promote a version the gate rejected")
    s.set_defaults(fn=cmd_promote)

    s = sub.add_parser("reject", help="reject a version awaiting approval")
    remote(s)
    s.add_argument("version")
    s.add_argument("--reason", default="")
    s.set_defaults(fn=cmd_reject)

    s = sub.add_parser("rollback", help="serve the previous version again (or VERSION, or base)")
    remote(s)
    s.add_argument("version", nargs="?")
    s.add_argument("--reason", default="")
    s.set_defaults(fn=cmd_rollback)

    s = sub.add_parser("report", help="print a cycle's promotion report (default: the latest)")
    remote(s)
    s.add_argument("version", nargs="?")
    s.add_argument("--format", choices=("md", "html", "json"), default="md")
    s.set_defaults(fn=cmd_report)

    fb = sub.add_parser("feedback", help="import or export feedback as JSONL").add_subparsers(
        dest="feedback_command", required=True
    )
    s = fb.add_parser("export", help="write feedback as JSONL (HF chat format)")
    s.add_argument("file", nargs="?", default="-")
    s.add_argument("--data-dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_feedback_export)
    s = fb.add_parser("import", help="read feedback from JSONL (all or nothing)")
    s.add_argument("file")
    s.add_argument("--data-dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_feedback_import)

    s = sub.add_parser("demo", help="the whole loop on the default model, offline, in minutes")
    s.add_argument("--short", action="store_true", help="a smaller run (what the tests run)")
    s.add_argument("--model", help="a local model folder or a hub id instead of SmolLM2")
    s.add_argument("--data-dir", help="an empty or new folder (default: a new temporary one)")
    s.add_argument("--port", type=int, help="the daemon's port (default: a free one)")
    s.add_argument("--keep", action="store_true", help="keep serving until Ctrl-C")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("backup", help="copy the data directory consistently (daemon may run)")
    s.add_argument("dest", help="a new folder for the copy")
    s.add_argument("--data-dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_backup)

    s = sub.add_parser("init", help="write a commented adaptd.toml")
    s.add_argument("--path", default="adaptd.toml")
    s.add_argument("--force", action="store_true")
    s.set_defaults(fn=cmd_init)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(f"adaptd: {e}", file=sys.stderr)
        return 2
    except CliError as e:
        print(f"adaptd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the one-line reason promised by the contract
        print(f"adaptd: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
