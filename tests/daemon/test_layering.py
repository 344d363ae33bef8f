"""Imports flow one way: daemon -> {serving, feedback, learners}; heavy libraries stay in one
module each (STYLE.md, "The shape of the house"). Walks the source with `ast`, imports nothing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("daemon", "feedback", "learners", "serving")
LEAVES = ("feedback", "learners", "serving")  # they may not import each other or daemon


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    module: str  # top-level module name

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}"


def imports_of(source: str, file: str, package: str) -> list[Import]:
    """Top-level modules imported anywhere in ``source`` (functions and TYPE_CHECKING too)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=file)):
        if isinstance(node, ast.Import):
            found += [Import(file, node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: the same package
                found.append(Import(file, node.lineno, package))
            elif node.module:
                found.append(Import(file, node.lineno, node.module.split(".")[0]))
    return found


def all_imports() -> list[Import]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found += imports_of(path.read_text(encoding="utf-8"), rel, package)
    return found


def package_of(imp: Import) -> str:
    return imp.file.split("/", 1)[0]


def test_the_walker_sees_imports_of_every_kind() -> None:
    src = (
        "import os, serving.engine\n"
        "from feedback.store import Store\n"
        "from . import sibling\n"
        "def f():\n    import daemon.cli\n"
        "if TYPE_CHECKING:\n    from learners import ewc\n"
    )
    got = {(i.line, i.module) for i in imports_of(src, "serving/x.py", "serving")}
    assert got == {
        (1, "os"),
        (1, "serving"),
        (2, "feedback"),
        (3, "serving"),
        (5, "daemon"),
        (7, "learners"),
    }


def test_the_packages_are_found() -> None:
    imports = all_imports()
    assert {package_of(i) for i in imports} == set(PACKAGES)
    # daemon is the one that wires the others together.
    assert {"feedback", "serving"} <= {i.module for i in imports if package_of(i) == "daemon"}


def test_imports_flow_one_way() -> None:
    wrong = [
        str(i)
        for i in all_imports()
        if package_of(i) in LEAVES and i.module in PACKAGES and i.module != package_of(i)
    ]
    assert not wrong, "serving, feedback and learners import neither each other nor daemon:\n" + (
        "\n".join(wrong)
    )


def test_vllm_is_never_imported() -> None:
    """vLLM runs as a child process; importing it would pull CUDA into the daemon."""
    offenders = [str(i) for i in all_imports() if i.module == "vllm"]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(("library", "home"), [("peft", "learners"), ("apscheduler", "daemon")])
def test_heavy_library_lives_in_one_module(library: str, home: str) -> None:
    users = [i for i in all_imports() if i.module == library]
    outside = [str(i) for i in users if package_of(i) != home]
    assert not outside, f"{library} is imported outside {home}/:\n" + "\n".join(outside)
    files = sorted({i.file for i in users})
    assert len(files) <= 1, f"{library} is imported by more than one module: {files}"
