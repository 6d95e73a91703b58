"""The pure layers import neither ray nor torch, read no clock and touch no files.

Checked statically (AST) so that a violation is caught even on a code path no test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emulator"

PURE_FILES = sorted(
    [p for d in ("specs", "core", "cost") for p in (PACKAGE / d).glob("*.py")]
    + [PACKAGE / "trace" / "schema.py", PACKAGE / "trace" / "synth.py"]
)

# Whole modules the pure layers may not import (clock, files, processes, network, Ray, torch).
FORBIDDEN_MODULES = {"ray", "torch", "time", "datetime", "os", "pathlib", "io", "shutil",
                     "tempfile", "socket", "subprocess", "pyarrow.parquet", "pyarrow.ipc"}
# Functions that touch files.
FORBIDDEN_CALLS = {"open"}

# File I/O by design, each kept in one module: reading a local Hugging Face config.json, and
# loading/saving a communication profile.
ALLOWED = {("specs", "hf_config.py"), ("cost", "profile_io.py")}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if any(".".join(parts[: i + 1]) in FORBIDDEN_MODULES for i in range(len(parts))):
                found.append(f"{path.name}:{node.lineno} imports {name}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in FORBIDDEN_CALLS):
            found.append(f"{path.name}:{node.lineno} calls {node.func.id}()")
    return found


@pytest.mark.parametrize("path", [p for p in PURE_FILES if p.exists()
                                  and (p.parent.name, p.name) not in ALLOWED],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_module_has_no_io_clock_ray_or_torch(path: Path) -> None:
    assert _violations(path) == []


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom ray import util\nx = open('f')\n")
    assert _violations(bad) == ["bad.py:1 imports time", "bad.py:2 imports ray",
                                "bad.py:3 calls open()"]
