"""Quiet by default: threadline's logs show only when the application asks."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from threadline.actors._api import get_logger
from threadline.runtime import ActorSystem, Agent, ScriptedModel

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
# A structlog console line ("2026-01-01 10:00:00 [info     ] thread.activated ...")
# or a logging line with one of threadline's events.
LOG_LINE = re.compile(r"\[(debug|info|warning|error)\s*\]|thread\.activated|step\.committed")


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.DOTALL)[1]  # type: ignore[index]


@pytest.fixture
def unconfigured_structlog() -> Iterator[None]:
    """structlog as an application that never configured it sees it (a test
    before may have configured it, e.g. with ``capture_logs``)."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()


@pytest.mark.slow
def test_readme_example_and_every_example_print_no_log_lines(tmp_path: Path) -> None:
    # One interpreter runs the README's example and every example as a user
    # would (``python examples/x.py``), then logs a warning the way the actor
    # does when its store fails: that one must show, on stderr.
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.py"))
    (tmp_path / "readme.py").write_text(readme_example())
    script = textwrap.dedent(
        f"""
        import runpy, structlog
        from threadline.actors._api import get_logger

        for path in {[str(tmp_path / "readme.py"), *examples]!r}:
            runpy.run_path(path, run_name="__main__")
        log = get_logger()
        log.info("quiet.info")
        with structlog.contextvars.bound_contextvars(thread_id="t9"):
            log.warning("thread.store_error", kind="StoreUnavailableError")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "Hello! 2" in out.stdout  # the README example ran
    assert "Your name is Bob." in out.stdout  # and the examples did
    assert not [line for line in out.stdout.splitlines() if LOG_LINE.search(line)], out.stdout
    assert out.stderr.splitlines() == [
        "thread.store_error thread_id=t9 kind=StoreUnavailableError"
    ], out.stderr


async def test_configured_logging_shows_events_with_thread_id(
    unconfigured_structlog: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="threadline")
    async with ActorSystem(Agent(model=ScriptedModel(["hello"]))) as system:
        await system.ask("t1", "hi")
    records = [r for r in caplog.records if r.name == "threadline"]
    messages = [(r.levelno, r.getMessage()) for r in records]
    assert (logging.INFO, "thread.activated thread_id=t1 version=0 resume=False") in messages
    assert (logging.DEBUG, "step.committed thread_id=t1 version=1 kind=input") in messages
    assert (logging.DEBUG, "step.committed thread_id=t1 version=2 kind=model") in messages


def test_levels_decide_and_nothing_is_built_for_a_silent_level(
    unconfigured_structlog: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="threadline")
    built = []

    class Costly:
        def __repr__(self) -> str:
            built.append(1)
            return "costly"

    log = get_logger()
    log.debug("not.shown", value=Costly())
    log.info("shown", value=Costly(), text="two words")
    assert [r.getMessage() for r in caplog.records] == ["shown value=costly text='two words'"]
    assert built == [1]


def test_exceptions_keep_their_traceback(
    unconfigured_structlog: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="threadline")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger().exception("thread.error")
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.getMessage() == "thread.error"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


async def test_capture_logs_sees_a_system_built_before_it(unconfigured_structlog: None) -> None:
    # The system resolves its logger while structlog is unconfigured; a test's
    # capture_logs (which configures structlog) still sees every event.
    async with ActorSystem(Agent(model=ScriptedModel(["hello"]))) as system:
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            await system.ask("t2", "hi")
    events = [(e["event"], e["log_level"], e.get("thread_id")) for e in logs]
    assert ("thread.activated", "info", "t2") in events
    assert ("step.committed", "debug", "t2") in events


async def test_a_configured_structlog_gets_the_events(unconfigured_structlog: None) -> None:
    seen: list[dict[str, object]] = []

    def keep(logger: object, method: str, event_dict: dict[str, object]) -> str:
        seen.append({"method": method, **event_dict})
        return ""

    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, keep],
        logger_factory=structlog.ReturnLoggerFactory(),
    )
    async with ActorSystem(Agent(model=ScriptedModel(["hello"]))) as system:
        await system.ask("t3", "hi")
    activated = [e for e in seen if e["event"] == "thread.activated"]
    assert activated and activated[0]["method"] == "info" and activated[0]["thread_id"] == "t3"
