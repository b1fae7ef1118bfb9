"""The project itself: public surface, README vs CI, typing and lint."""

from __future__ import annotations

import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


FACES = [
    "threadline",
    "threadline.actors",
    "threadline.runtime",
    "threadline.runtime.agent",
    "threadline.runtime.agent.middleware",
    "threadline.runtime.models",
    "threadline.persistence",
]
PACKAGES = {
    "actors": ROOT / "actors",
    "runtime": ROOT / "runtime",
    "persistence": ROOT / "persistence",
}

EXPECTED_FACE = (
    "AIMessage",
    "ActorSystem",
    "Agent",
    "AgentMiddleware",
    "AgentState",
    "AnyMessage",
    "BaseMessage",
    "CallLimitExceededError",
    "ChatModel",
    "Client",
    "Command",
    "ConflictError",
    "FencedError",
    "HumanMessage",
    "Interrupt",
    "InvalidContextError",
    "InvalidInputError",
    "InvalidMessageError",
    "InvalidThreadIdError",
    "InvalidToolError",
    "InvalidUpdateError",
    "ItemCorruptError",
    "LocalClient",
    "MailboxFullError",
    "MemorySnapshotStore",
    "MemoryStore",
    "MessageTooLargeError",
    "ModelCallLimitExceededError",
    "ModelConnectionError",
    "ModelError",
    "ModelHTTPError",
    "ModelRequest",
    "ModelResponseError",
    "ModelTimeoutError",
    "OpenAIChatModel",
    "OverloadedError",
    "PersistenceError",
    "REMOVE_ALL_MESSAGES",
    "RedisSnapshotStore",
    "RedisStore",
    "RemoveMessage",
    "Runtime",
    "ScriptedModel",
    "SnapshotCorruptError",
    "SnapshotFormatError",
    "SnapshotStore",
    "SqliteSnapshotStore",
    "SqliteStore",
    "StepInfo",
    "Store",
    "StoreUnavailableError",
    "StreamPart",
    "SummarizationMiddleware",
    "SystemClosedError",
    "SystemMessage",
    "ThreadClient",
    "ThreadExistsError",
    "ThreadInterruptedError",
    "ThreadNotFoundError",
    "ThreadSnapshot",
    "ThreadlineError",
    "ToolCall",
    "ToolCallLimitExceededError",
    "ToolCallRequest",
    "ToolMessage",
    "ToolRuntime",
    "TurnFailedError",
    "TurnResult",
    "VersionNotFoundError",
    "Worker",
    "add_messages",
    "after_agent",
    "after_model",
    "before_agent",
    "before_model",
    "count_tokens_approximately",
    "dynamic_prompt",
    "interrupt",
    "open_snapshot_store",
    "tool",
    "trim_messages",
    "wrap_model_call",
    "wrap_tool_call",
)


@pytest.mark.parametrize("module", FACES)
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


def test_the_face_pins_its_names() -> None:
    import threadline

    assert threadline.__all__ == EXPECTED_FACE
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", threadline.__version__)
    assert (ROOT / "threadline" / "py.typed").exists()


def _all_error_classes() -> set[type[BaseException]]:
    import threadline

    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [threadline.ThreadlineError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("threadline.") and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def test_one_exception_root_one_home() -> None:
    import threadline

    # Import every module so that every error class is defined.
    for package in ("threadline.actors", "threadline.runtime", "threadline.persistence"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    errors = _all_error_classes()
    assert len(errors) > 20
    for error in errors:
        assert error.__module__ == "threadline.actors._errors", error
        assert getattr(threadline, error.__name__) is error, f"{error.__name__} not in the face"
    exported = [getattr(threadline, n) for n in threadline.__all__ if n.endswith("Error")]
    for error in exported:
        assert issubclass(error, threadline.ThreadlineError)
    # Every member of the tree is drawn in the home's docstring.
    doc = importlib.import_module("threadline.actors._errors").__doc__ or ""
    for error in errors:
        assert error.__name__ in doc, error.__name__


def test_no_package_reaches_into_another_packages_private_modules() -> None:
    allowed = {"threadline.actors._api"}
    offenders = []
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            for line_no, line in enumerate(path.read_text().splitlines(), 1):
                for match in re.finditer(r"threadline\.(\w+)\.(_\w+)", line):
                    target = f"threadline.{match[1]}.{match[2]}"
                    if match[1] != name and target not in allowed:
                        offenders.append(f"{path.relative_to(ROOT)}:{line_no}: {target}")
    assert not offenders, "\n".join(offenders)


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
            "threadline",
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
