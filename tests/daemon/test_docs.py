"""Docs that are checked (datasette's test_docs.py): every config key, CLI command and HTTP
route is in README.md, and the README's configuration table lists nothing that is not a key.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Route

from daemon.app import Daemon
from daemon.cli import build_parser
from daemon.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README text under ``## title`` up to the next level-2 heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def config_keys() -> set[str]:
    keys = set()
    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= {f"{name}.{sub}" for sub in ann.model_fields}
        else:
            keys.add(name)
    return keys


def documented_keys() -> set[str]:
    return set(re.findall(r"^\| `([a-z_.]+)` \|", section("Configuration"), re.M))


def test_every_config_key_is_documented() -> None:
    missing = config_keys() - documented_keys()
    assert not missing, f"README.md's configuration table lacks {sorted(missing)}"


def test_the_config_table_lists_only_real_keys() -> None:
    stale = documented_keys() - config_keys()
    assert not stale, f"README.md documents keys that do not exist: {sorted(stale)}"


# --------------------------------------------------------------------------- CLI


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                has_children = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if has_children:
                    yield from subcommands(sub, f"{prefix}{name} ")
                else:
                    yield f"{prefix}{name}"


def test_the_subcommand_walker_finds_nested_commands() -> None:
    found = set(subcommands(build_parser()))
    assert {"serve", "feedback export", "feedback import"} <= found


def test_every_cli_command_is_documented() -> None:
    cli = section("CLI")
    missing = [c for c in subcommands(build_parser()) if f"`adaptd {c}" not in cli]
    assert not missing, f"README.md's CLI section lacks {missing}"


def test_every_cli_option_is_documented() -> None:
    options: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            options.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    options.discard("--help")
    missing = sorted(o for o in options if f"`{o}`" not in README)
    assert not missing, f"README.md does not mention {missing}"


# --------------------------------------------------------------------------- HTTP routes


@pytest.fixture()
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """The real app, built without starting vLLM or serving (no lifespan runs)."""
    for key in list(os.environ):
        if key.startswith("ADAPTD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    d = Daemon(load_settings(data_dir=tmp_path / "data"), model_source="/nonexistent")
    yield d
    d.writer.close()
    d.reader.close()
    d.store.close()


def routes(d: Daemon) -> set[str]:
    found = set()
    for route in d.app.routes:
        if isinstance(route, APIRoute | Route):
            for method in sorted((route.methods or set()) - {"HEAD"}):
                found.add(f"{method} {route.path}")
    return found


def test_the_app_has_the_routes_we_expect(daemon: Daemon) -> None:
    assert {"POST /v1/chat/completions", "POST /v1/feedback", "GET /admin/status"} <= routes(daemon)


def test_every_route_is_documented(daemon: Daemon) -> None:
    api = section("HTTP API")
    missing = sorted(r for r in routes(daemon) if f"`{r}`" not in api)
    assert not missing, f"README.md's HTTP API section lacks {missing}"
