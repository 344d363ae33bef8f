"""The `adaptd` command line.

Exit status 0 on success; otherwise non-zero with a one-line reason on stderr.
`status` and `versions` talk to a running daemon (``--url``, admin key from
``ADAPTD_ADMIN_KEY``); `feedback import/export` and `init` work on files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
def _request(url: str, path: str, *, method: str = "GET", body: Any = None) -> Any:
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
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
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
            f"{'ready' if eng['ready'] else 'NOT READY'} (pid {eng['pid']}, restarts {eng['restarts']})",
        ],
        ["interactions", str(st["interactions"])],
        [
            "feedback",
            f"{fb['total']} (+{fb['positive']} / -{fb['negative']}, {fb['corrections']} corrections)",
        ],
        ["log drops", str(st["interaction_log"]["dropped"])],
        ["next cycle", str(st["next_cycle"] or "not scheduled")],
        ["running cycle", str(st["running_cycle"] or "none")],
    ]
    print(_table(rows, ["", ""]).split("\n", 2)[2])
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    data = _request(args.url, "/admin/versions")
    if args.json:
        print(json.dumps(data))
        return 0
    rows = [
        [
            ("* " if v["promoted"] else "  ") + v["name"],
            v.get("parent") or "-",
            str(v.get("created_at")),
        ]
        for v in data["versions"]
    ]
    print(_table(rows, ["version", "parent", "created"]) if rows else "no adapter versions yet")
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
