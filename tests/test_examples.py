"""Every seed pattern runs as an example under examples/ and does what the seed shows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.anyio


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def run(name: str) -> Any:
    return await load(name).main()


async def test_persistence_across_invocations_and_systems() -> None:
    out = await run("persistence")
    assert out == ["Nice to meet you, Bob!", "Your name is Bob.", "4 messages, version 4"]


async def test_custom_state_passed_at_invocation() -> None:
    out = await run("custom_state")
    assert out == [
        "User is John Smith (theme: dark).",
        "user_id=user_123 preferences={'theme': 'dark'}",
    ]


async def test_trim_keeps_first_and_recent_messages() -> None:
    text, kept = await run("trim_messages")
    # The first message (with the name) survives every trim, so the model still knows it.
    assert text == "Your name is Bob."
    assert kept == "6 messages kept"  # 8 without trimming: first + last 4 + the answer


async def test_delete_earliest_messages_and_remove_all() -> None:
    out = await run("delete_messages")
    assert out == [
        "[('human', \"hi! I'm bob\")]",
        "[('human', \"hi! I'm bob\"), ('ai', 'Nice to meet you, Bob!')]",
        "[('human', \"hi! I'm bob\"), ('ai', 'Nice to meet you, Bob!'), "
        "('human', \"what's my name?\")]",
        "[('human', \"what's my name?\"), ('ai', 'Your name is Bob.')]",
        "after removing all: 0 messages",
    ]


async def test_tools_read_and_write_state() -> None:
    out = await run("tools_state")
    assert out[:3] == [
        "Please call the 'update_user_info' tool it will get and update the user's name.",
        "Successfully looked up user information",
        "Hello John Smith!",
    ]
    assert out[-1] == "user_name=John Smith"


async def test_dynamic_prompt_from_static_context() -> None:
    out = await run("dynamic_prompt")
    assert out[0] == "What is the weather in SF?"
    assert out[2] == "The weather in San Francisco is always sunny!"
    assert out[-1] == "Hi John Smith, the weather in San Francisco is always sunny!"


async def test_after_model_validation_removes_stop_words() -> None:
    first, second, steps = await run("validate_response")
    assert first == "[('human', \"what's the admin password?\")]"  # the answer was removed
    assert second.endswith("('ai', 'Happy to help with anything else!')]")
    assert steps == "steps: ['input', 'model', 'input', 'model']"


async def test_store_remembers_across_threads_per_user() -> None:
    first, other_thread, other_user = await run("store")
    assert first == "Noted (saved language=French)."
    assert other_thread == (
        "[You are a helpful assistant. Known preferences: language: French.] Hello!"
    )
    assert other_user == "[You are a helpful assistant. Known preferences: none.] Hello!"


async def test_summarization_replaces_older_messages_with_a_summary() -> None:
    text, count, summary = await run("summarization")
    # The name was only in the summarized part: the summary carried it over.
    assert text == "Your name is Bob!"
    assert count == "4 messages in the thread"  # summary + the 2 kept + the answer
    assert summary.startswith("Here is a summary of the conversation to date:")
    assert summary.endswith("The user's name is Bob.")
