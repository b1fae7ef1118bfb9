"""The project itself: public surface, README vs CI, typing and lint."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "module", ["threadline.actors", "threadline.runtime", "threadline.persistence"]
)
def test_public_surface_is_declared(module: str) -> None:
    mod = importlib.import_module(module)
    exported = mod.__all__
    assert isinstance(exported, tuple)
    assert sorted(exported) == sorted(set(exported))
    for name in exported:
        assert hasattr(mod, name), f"{module}.{name} is in __all__ but missing"
    public = {n for n in vars(mod) if not n.startswith("_")} - {"annotations"}
    undeclared = {n for n in public if not isinstance(getattr(mod, n), type(sys))} - set(exported)
    assert not undeclared, f"{module} exposes names outside __all__: {sorted(undeclared)}"


def test_one_exception_root() -> None:
    actors = importlib.import_module("threadline.actors")
    errors = [getattr(actors, n) for n in actors.__all__ if n.endswith("Error")]
    assert errors
    for error in errors:
        assert issubclass(error, actors.ThreadlineError)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (pip install .*)$", readme, re.MULTILINE)
    assert len(commands) == 2, commands
    test_command = commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


@pytest.mark.slow
def test_mypy_strict_is_clean() -> None:
    if shutil.which("mypy") is None:
        pytest.skip("mypy is not installed")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "-p",
            "threadline.actors",
            "-p",
            "threadline.runtime",
            "-p",
            "threadline.persistence",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_ruff_is_clean() -> None:
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed")
    out = subprocess.run(
        ["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
