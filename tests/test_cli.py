"""The ``threadline`` command: a conversation continues across runs, errors read
one way, and the process behaves (Ctrl-C, missing files, a failing model)."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from threadline.runtime.cli import main

pytestmark = pytest.mark.slow

DB_HELP = "a SQLite path or a redis:// URL"


def command() -> list[str]:
    exe = shutil.which("threadline")
    return [exe] if exe else [sys.executable, "-m", "threadline.runtime.cli"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """``main(argv)`` in this process: (exit code, stdout, stderr)."""
    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    logger = logging.getLogger("threadline")
    saved = (logger.level, list(logger.handlers), logger.propagate)

    def _run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    yield _run
    logger.level, logger.handlers[:], logger.propagate = saved


def test_chat_continues_after_quitting_and_inspect_shows_steps(tmp_path: Path, run) -> None:
    db = str(tmp_path / "chat.db")
    first = cli("chat", "--thread", "demo", "--db", db, stdin="hi, my name is ann\n/quit\n")
    assert first.returncode == 0, first.stderr
    assert "new thread 'demo'" in first.stdout
    assert "ai> Nice to meet you, Ann!" in first.stdout
    assert first.stderr == ""  # no log lines

    second = cli(
        "chat",
        "--thread",
        "demo",
        "--db",
        db,
        "-v",  # threadline's info logs, on stderr
        stdin="count words in one two three\nwhat's my name?\n",
    )
    assert second.returncode == 0, second.stderr
    assert second.stderr.splitlines() == [
        "INFO threadline: thread.activated thread_id=demo version=2 resume=False"
    ]
    assert "continues: 2 messages, version 2" in second.stdout
    # An AI message that only calls tools shows its calls, then the answer follows.
    assert "ai> [calls word_count(text='one two three')]\nai> The tool says: 3." in second.stdout
    assert "ai> Your name is Ann." in second.stdout

    code, out, _ = run("inspect", "demo", "--db", db)
    assert code == 0
    assert "version 8, 8 messages" in out
    assert "[ai] [calls word_count(text='one two three')]" in out
    assert "calls word_count(text='one two three')" in out.split("steps:")[1]
    kinds = [line.split()[1] for line in out.splitlines() if line.startswith("  v")]
    assert kinds == ["input", "model", "input", "model", "tools", "model", "input", "model"]

    code, out, _ = run("threads", "--db", db)
    assert (code, out.split()) == (0, ["demo"])

    code, out, err = run("inspect", "nobody", "--db", db)
    assert (code, out) == (1, "")  # a runtime failure, not a usage error
    assert err == f"threadline: error: no thread 'nobody' in {db}\n"


_READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())


def wait_until_reading_stdin(pid: int) -> None:
    """Until a thread of the process is blocked in ``read(0, ...)`` (Linux; elsewhere
    returns at once). Ctrl-C then finds the chat waiting for a line, as a user does."""
    tasks = Path(f"/proc/{pid}/task")
    if _READ_SYSCALL is None or not tasks.is_dir():
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):
                if (task / "syscall").read_text().split()[:2] == [_READ_SYSCALL, "0x0"]:
                    return
        time.sleep(0.01)  # nothing to wait on: /proc is polled
    pytest.fail("the chat never read its input")


def test_ctrl_c_leaves_the_chat_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*command(), "chat", "--thread", "t", "--db", str(tmp_path / "c.db")],
        stdin=subprocess.PIPE,  # stays open: the chat is waiting for a line
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stdin and proc.stdout and proc.stderr
    try:
        seen = b""
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while b"you> " not in seen:
                assert selector.select(timeout=30), f"no prompt: {seen!r}"
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"exited early: {seen!r}"
                seen += chunk
        wait_until_reading_stdin(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C did not end the chat")
        assert code == 130
        assert proc.stderr.read() == b""  # no traceback, no "Exception ignored in threading"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        body = json.dumps({"error": {"message": "Incorrect API key provided"}}).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def unauthorized_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_model_failure_is_reported_once(tmp_path: Path, unauthorized_server: str, run) -> None:
    db = str(tmp_path / "m.db")
    out = cli(
        "chat",
        "--thread",
        "m",
        "--db",
        db,
        "--model",
        "openai:test-model",
        "--base-url",
        unauthorized_server,
        stdin="hello\n",
    )
    assert out.returncode == 0, out.stderr
    both = out.stdout + out.stderr
    assert both.count("Incorrect API key provided") == 1, both
    assert "turn.failed" not in both
    assert out.stderr == (
        f"error: the model failed: HTTP 401 from {unauthorized_server}/chat/completions: "
        "Incorrect API key provided\n"
    )
    # The input step stays committed: one message ("1 message", not "1 messages").
    code, text, _ = run("inspect", "m", "--db", db)
    assert code == 0
    assert text.startswith("thread 'm': version 2, 1 message\n")


def test_inspect_and_threads_do_not_create_a_missing_database(tmp_path: Path, run) -> None:
    missing = tmp_path / "typo.db"
    for argv in (
        ["inspect", "t", "--db", str(missing)],
        ["threads", "--db", str(missing)],
        ["threads", "--db", f"sqlite://{missing}"],
    ):
        code, out, err = run(*argv)
        assert (code, out) == (2, ""), argv
        assert err.splitlines()[-1] == f"threadline: error: no such database: {argv[-1]}"
        assert err.startswith(f"usage: threadline {argv[0]} ")
        assert not missing.exists()


@pytest.mark.redis
def test_a_redis_url_is_not_a_file(run, redis_server) -> None:
    code, _, err = run("threads", "--db", redis_server.url)
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "--thread", "t", "--model", "gpt-4o"], "--model must look like openai:"),
        (["chat", "--thread", "t", "--base-url", "http://x/v1"], "--base-url needs --model"),
        (["chat", "--thread", "t", "--model", "openai:gpt-4o-mini"], "OPENAI_API_KEY is not set"),
        (["chat", "--thread", "bad\tid"], "control characters"),
        (["chat"], "the following arguments are required: --thread"),
        (["talk"], "invalid choice: 'talk'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_read_one_way(tmp_path: Path, run, argv: list[str], message: str) -> None:
    db = tmp_path / "u.db"
    if argv[:1] == ["chat"]:
        argv = [*argv, "--db", str(db)]
    code, out, err = run(*argv)
    assert code == 2
    assert out == ""
    assert err.startswith("usage: threadline")
    last = err.splitlines()[-1]
    assert last.startswith("threadline: error: ") and message in last, err
    assert not db.exists()  # reported before anything was opened (or called)


def test_version(run) -> None:
    assert run("--version") == (0, f"threadline {version('threadline')}\n", "")


@pytest.mark.parametrize("argv", [[], ["chat"], ["inspect"], ["threads"]])
def test_help_reads_as_plain_text(run, argv: list[str]) -> None:
    code, out, _ = run(*argv, "--help")
    assert code == 0
    assert "``" not in out
    if argv:
        assert DB_HELP in " ".join(out.split())  # argparse wraps lines
