"""The main job: ``threadline chat`` continues a conversation across runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    exe = shutil.which("threadline")
    command = [exe] if exe else [sys.executable, "-m", "threadline.runtime.cli"]
    return subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_chat_continues_after_quitting_and_inspect_shows_steps(tmp_path: Path) -> None:
    db = str(tmp_path / "chat.db")
    first = cli("chat", "--thread", "demo", "--db", db, stdin="hi, my name is ann\n/quit\n")
    assert first.returncode == 0, first.stderr
    assert "new thread 'demo'" in first.stdout
    assert "ai> Nice to meet you, Ann!" in first.stdout

    second = cli(
        "chat",
        "--thread",
        "demo",
        "--db",
        db,
        stdin="count words in one two three\nwhat's my name?\n",
    )
    assert second.returncode == 0, second.stderr
    assert "continues: 2 messages, version 2" in second.stdout
    assert "ai> The tool says: 3." in second.stdout
    assert "ai> Your name is Ann." in second.stdout

    inspect = cli("inspect", "demo", "--db", db)
    assert inspect.returncode == 0, inspect.stderr
    assert "version 8, 8 messages" in inspect.stdout
    assert "calls word_count" in inspect.stdout
    kinds = [line.split()[1] for line in inspect.stdout.splitlines() if line.startswith("  v")]
    assert kinds == ["input", "model", "input", "model", "tools", "model", "input", "model"]

    listing = cli("threads", "--db", db)
    assert listing.stdout.split() == ["demo"]


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    db = str(tmp_path / "chat.db")
    missing = cli("inspect", "nobody", "--db", db)
    assert missing.returncode == 1
    assert "no thread 'nobody'" in missing.stdout
    bad = cli("chat", "--thread", "bad\tid", "--db", db, stdin="hi\n")
    assert bad.returncode == 2
    assert "control characters" in bad.stderr
