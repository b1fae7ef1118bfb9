"""The bad-input catalogue: whatever a caller sends, the door refuses it with a
typed error, writes nothing, and leaves every thread working, across a restart
on the same store. And what the door accepts always reads back.

Each case runs against a real SQLite file (``synchronous="OFF"``: nothing here
kills the process, and a clean close is as durable as FULL); a subset runs
against a real redis-server too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest

from threadline.actors import (
    AgentState,
    AIMessage,
    HumanMessage,
    InvalidContextError,
    InvalidInputError,
    InvalidMessageError,
    InvalidThreadIdError,
    InvalidUpdateError,
    MessageTooLargeError,
    SnapshotCorruptError,
    ThreadlineError,
    ToolCall,
    ToolMessage,
    TurnFailedError,
)
from threadline.actors._api import MAX_NESTING, FullRecord, StepRecord, TurnCursor
from threadline.persistence import Codec, CommitRequest
from threadline.persistence._codec import FULL, STEP, frame
from threadline.runtime import ActorSystem, Agent, ModelRequest, ScriptedModel

from .conftest import OpenStore

pytestmark = pytest.mark.anyio

MAX_BYTES = 4096


class Profile(AgentState):
    user_id: str = ""
    extra: Any = None


def nest(depth: int) -> Any:
    """A list ``depth`` levels deep (built without recursion)."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def unchecked(value: object) -> Any:
    """``value``, hidden from the type checker: msgspec does not check field
    types when a message is built, so callers can send these."""
    return value


def echo(request: ModelRequest[Any]) -> str:
    return f"echo: {request.messages[-1].content}"


def call(**args: Any) -> AIMessage:
    return AIMessage("", tool_calls=[ToolCall(id="c1", name="f", args=args)])


def agent() -> Agent[Profile]:
    return Agent(model=ScriptedModel(echo), state_schema=Profile)


Call = Callable[[ActorSystem[Profile]], Awaitable[Any]]


def ask(input: Any, **kw: Any) -> Call:
    return lambda system: system.ask("victim", input, **kw)


def update(values: Any) -> Call:
    return lambda system: system.update_state("victim", values)


def ask_thread(thread_id: Any) -> Call:
    return lambda system: system.ask(thread_id, "hi")


CATALOGUE = [
    # -- message objects whose fields have the wrong type (issue 9, defect 2) --
    pytest.param(ask(HumanMessage("hi", id=unchecked(123))), InvalidMessageError, id="id-int"),
    pytest.param(ask(HumanMessage("hi", name=unchecked(5))), InvalidMessageError, id="name-int"),
    pytest.param(ask(HumanMessage(unchecked(["hi"]))), InvalidMessageError, id="content-list"),
    pytest.param(ask(HumanMessage("bad \ud800")), InvalidMessageError, id="content-surrogate"),
    pytest.param(
        ask(ToolMessage("x", tool_call_id=unchecked(None))),
        InvalidMessageError,
        id="tool-call-id-none",
    ),
    pytest.param(
        ask(ToolMessage("x", tool_call_id="c", status=unchecked("meh"))),
        InvalidMessageError,
        id="status-unknown",
    ),
    pytest.param(
        ask(AIMessage("x", tool_calls=unchecked(["junk"]))),
        InvalidMessageError,
        id="tool-calls-junk",
    ),
    pytest.param(
        ask(AIMessage("x", tool_calls=[ToolCall(id=unchecked(1), name="f")])),
        InvalidMessageError,
        id="tool-call-id-int",
    ),
    pytest.param(
        ask(AIMessage("x", usage=unchecked({"tokens": "many"}))),
        InvalidMessageError,
        id="usage-str",
    ),
    pytest.param(ask(AIMessage("x", usage={"tokens": True})), InvalidMessageError, id="usage-bool"),
    pytest.param(
        ask(AIMessage("x", response_metadata={"x": object()})),
        InvalidMessageError,
        id="metadata-object",
    ),
    pytest.param(ask(call(x=object())), InvalidMessageError, id="args-object"),
    pytest.param(ask(call(x=2**70)), InvalidMessageError, id="args-huge-int"),
    pytest.param(
        ask(AIMessage("x", tool_calls=[ToolCall(id="c", name="f", args=unchecked({1: 2}))])),
        InvalidMessageError,
        id="args-int-key",
    ),
    pytest.param(
        ask(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c", "name": "f", "args": {1: 2}}],
            }
        ),
        InvalidMessageError,
        id="dict-args-int-key",
    ),
    pytest.param(
        ask([HumanMessage("fine"), HumanMessage("hi", id=unchecked(123))]),
        InvalidMessageError,
        id="list-one-bad",
    ),
    # -- malformed dicts, unknown roles and keys, wrong types in each field --
    pytest.param(ask({"role": "user"}), InvalidMessageError, id="dict-no-content"),
    pytest.param(
        ask({"role": "user", "content": None}), InvalidMessageError, id="dict-content-none"
    ),
    pytest.param(ask({"content": 5}), InvalidUpdateError, id="dict-no-role"),
    pytest.param(ask({"role": "user", "content": 5}), InvalidMessageError, id="dict-content-int"),
    pytest.param(
        ask({"role": "user", "content": [{"type": "image_url"}]}),
        InvalidMessageError,
        id="dict-content-image",
    ),
    pytest.param(
        ask({"role": "wizard", "content": "x"}), InvalidMessageError, id="dict-role-unknown"
    ),
    pytest.param(ask({"role": 5, "content": "x"}), InvalidMessageError, id="dict-role-int"),
    pytest.param(
        ask({"role": "user", "content": "x", "bogus": 1}),
        InvalidMessageError,
        id="dict-key-unknown",
    ),
    pytest.param(
        ask({"role": "assistant", "content": "x", "refusal": "no"}),
        InvalidMessageError,
        id="dict-refusal",
    ),
    pytest.param(
        ask({"role": "user", "content": "x", "id": 5}), InvalidMessageError, id="dict-id-int"
    ),
    pytest.param(
        ask({"role": "user", "content": "x", "name": 5}), InvalidMessageError, id="dict-name-int"
    ),
    pytest.param(
        ask({"role": "tool", "content": "x"}), InvalidMessageError, id="dict-tool-no-call-id"
    ),
    pytest.param(
        ask({"role": "tool", "content": "x", "tool_call_id": 7}),
        InvalidMessageError,
        id="dict-tool-call-id-int",
    ),
    pytest.param(
        ask({"role": "tool", "content": "x", "tool_call_id": "c", "status": "meh"}),
        InvalidMessageError,
        id="dict-status-unknown",
    ),
    pytest.param(
        ask({"role": "assistant", "content": "", "tool_calls": "junk"}),
        InvalidMessageError,
        id="dict-tool-calls-str",
    ),
    pytest.param(
        ask({"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]}),
        InvalidMessageError,
        id="dict-tool-call-no-name",
    ),
    pytest.param(
        ask(
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}],
            }
        ),
        InvalidMessageError,
        id="dict-arguments-bad-json",
    ),
    pytest.param(ask(42), InvalidUpdateError, id="input-int"),
    pytest.param(ask(None), InvalidUpdateError, id="input-none"),
    pytest.param(ask([object()]), InvalidMessageError, id="input-list-object"),
    # -- state values at the door (ask with a state dict, and update_state) --
    pytest.param(ask({"messages": "hi", "user_id": 5}), InvalidUpdateError, id="ask-field-int"),
    pytest.param(ask({"messages": "hi", "nope": 1}), InvalidUpdateError, id="ask-field-unknown"),
    pytest.param(
        update({"messages": [HumanMessage("hi", id=unchecked(123))]}),
        InvalidUpdateError,
        id="update-message-id-int",
    ),
    pytest.param(
        update({"messages": [call(x=object())]}), InvalidUpdateError, id="update-args-object"
    ),
    pytest.param(update({"user_id": 5}), InvalidUpdateError, id="update-field-int"),
    pytest.param(
        update({"user_id": "bad \ud800"}), InvalidUpdateError, id="update-field-surrogate"
    ),
    pytest.param(update({"extra": object()}), InvalidUpdateError, id="update-field-object"),
    pytest.param(
        update({"extra": {"x": {1, object()}}}), InvalidUpdateError, id="update-field-set-object"
    ),
    pytest.param(update({"nope": 1}), InvalidUpdateError, id="update-key-unknown"),
    pytest.param(update({5: 1}), InvalidUpdateError, id="update-key-int"),
    pytest.param(update(["messages"]), InvalidUpdateError, id="update-not-dict"),
    # -- oversized --
    pytest.param(ask("x" * (MAX_BYTES + 1)), MessageTooLargeError, id="oversized-text"),
    pytest.param(
        ask("hi", context={"blob": "x" * MAX_BYTES}), MessageTooLargeError, id="oversized-context"
    ),
    # -- deep nesting and unencodable values (issue 9, defect 3) --
    pytest.param(ask(call(x=nest(MAX_NESTING))), InvalidMessageError, id="args-nest-max+1"),
    pytest.param(ask(call(x=nest(1_000))), InvalidMessageError, id="args-nest-1k"),
    pytest.param(ask(call(x=nest(100_000))), InvalidMessageError, id="args-nest-100k"),
    pytest.param(
        ask(AIMessage("x", response_metadata={"x": nest(100_000)})),
        InvalidMessageError,
        id="metadata-nest-100k",
    ),
    pytest.param(
        ask(HumanMessage("hi", id=unchecked(nest(100_000)))), InvalidMessageError, id="id-nest-100k"
    ),
    pytest.param(
        ask("hi", context=nest(MAX_NESTING + 1)), InvalidContextError, id="context-nest-max+1"
    ),
    pytest.param(ask("hi", context={"x": nest(1_000)}), InvalidContextError, id="context-nest-1k"),
    pytest.param(
        ask("hi", context={"x": nest(100_000)}), InvalidContextError, id="context-nest-100k"
    ),
    pytest.param(ask("hi", context={"x": object()}), InvalidContextError, id="context-object"),
    pytest.param(ask("hi", context={"x": "\ud800"}), InvalidContextError, id="context-surrogate"),
    pytest.param(ask("hi", context={"x": 2**70}), InvalidContextError, id="context-huge-int"),
    pytest.param(
        update({"extra": nest(MAX_NESTING + 1)}), InvalidUpdateError, id="update-nest-max+1"
    ),
    pytest.param(update({"extra": nest(1_000)}), InvalidUpdateError, id="update-nest-1k"),
    pytest.param(update({"extra": nest(100_000)}), InvalidUpdateError, id="update-nest-100k"),
    pytest.param(
        ask({"messages": "hi", "extra": nest(100_000)}), InvalidUpdateError, id="ask-nest-100k"
    ),
    # -- hostile thread ids --
    pytest.param(ask_thread(""), InvalidThreadIdError, id="thread-empty"),
    pytest.param(ask_thread("   "), InvalidThreadIdError, id="thread-whitespace"),
    pytest.param(ask_thread("a\x00b"), InvalidThreadIdError, id="thread-nul"),
    pytest.param(ask_thread("line\nbreak"), InvalidThreadIdError, id="thread-newline"),
    pytest.param(ask_thread("bad\ud800"), InvalidThreadIdError, id="thread-surrogate"),
    pytest.param(ask_thread("x" * 10_000), InvalidThreadIdError, id="thread-10k"),
    pytest.param(ask_thread(42), InvalidThreadIdError, id="thread-int"),
    pytest.param(ask_thread(None), InvalidThreadIdError, id="thread-none"),
    pytest.param(ask_thread(b"victim"), InvalidThreadIdError, id="thread-bytes"),
]

# The cases also run on Redis: one of each kind of door.
REDIS_CASES = {
    "id-int",
    "dict-args-int-key",
    "dict-no-content",
    "update-field-object",
    "args-nest-100k",
    "context-nest-1k",
    "oversized-text",
    "thread-surrogate",
}


@asynccontextmanager
async def running(open_store: OpenStore, kind: str) -> AsyncIterator[ActorSystem[Profile]]:
    """A system on this test's store (a new one each time: a restart)."""
    options = {"synchronous": "OFF"} if kind == "sqlite" else {}
    async with ActorSystem(
        agent(), snapshots=open_store(kind, **options), max_message_bytes=MAX_BYTES
    ) as system:
        yield system


async def refused_then_everything_still_works(
    open_store: OpenStore, kind: str, bad: Call, error: type[ThreadlineError]
) -> None:
    async with running(open_store, kind) as system:
        await system.ask("victim", "hello")
        await system.ask("healthy", "hi")
        threads = sorted(await system.threads())
        history = await system.history("victim")

        with pytest.raises(error) as caught:
            await bad(system)
        assert isinstance(caught.value, InvalidInputError)

        # Nothing was written, and both threads carry on.
        assert sorted(await system.threads()) == threads
        assert await system.history("victim") == history
        assert (await system.ask("healthy", "still there?")).text == "echo: still there?"
        assert (await system.ask("victim", "and you?")).text == "echo: and you?"

    async with running(open_store, kind) as system:  # a restart on the same store
        state = (await system.get_state("victim")).state
        assert [m.content for m in state.messages][-2:] == ["and you?", "echo: and you?"]
        assert (await system.ask("victim", "after")).version == len(history) + 4
        assert len(await system.history("healthy")) == 4


@pytest.mark.parametrize(("bad", "error"), CATALOGUE)
async def test_bad_input_is_refused_at_the_door(
    bad: Call, error: type[ThreadlineError], open_store: OpenStore
) -> None:
    await refused_then_everything_still_works(open_store, "sqlite", bad, error)


@pytest.mark.redis
@pytest.mark.parametrize(("bad", "error"), [case for case in CATALOGUE if case.id in REDIS_CASES])
async def test_bad_input_is_refused_at_the_door_redis(
    bad: Call, error: type[ThreadlineError], open_store: OpenStore
) -> None:
    await refused_then_everything_still_works(open_store, "redis", bad, error)


# -- what the door accepts reads back (issue 9, defect 3) -----------------------


async def test_values_nested_to_the_limit_are_accepted_and_load_after_a_restart(
    open_store: OpenStore,
) -> None:
    deepest = nest(MAX_NESTING)  # a context or state value at the limit
    args = {"x": nest(MAX_NESTING - 1)}  # the args dict is a level itself
    async with running(open_store, "sqlite") as system:
        await system.ask("deep", "hi", context=deepest)
        await system.ask("deep", call(**args))
        await system.update_state("deep", {"extra": deepest})
        await system.ask("deep", "bye", context={"x": nest(MAX_NESTING - 1)})
        before = await system.get_state("deep")

    async with running(open_store, "sqlite") as system:
        after = await system.get_state("deep")
        assert after.state == before.state
        assert after.state.extra == deepest
        history = await system.history("deep")
        assert history[0].turn is not None and history[0].turn.context == deepest
        assert (await system.ask("deep", "still here")).text == "echo: still here"


async def test_a_model_answer_that_cannot_be_stored_fails_its_turn_not_the_thread(
    open_store: OpenStore,
) -> None:
    def hostile(request: ModelRequest[Any]) -> AIMessage | str:
        if request.messages[-1].content == "go deep":
            return call(x=nest(1_000))
        return "fine"

    def make() -> ActorSystem[AgentState]:
        return ActorSystem(
            Agent(model=ScriptedModel(hostile)),
            snapshots=open_store("sqlite", synchronous="OFF"),
        )

    async with make() as system:
        with pytest.raises(TurnFailedError) as caught:
            await system.ask("t", "go deep")
        assert isinstance(caught.value.__cause__, InvalidUpdateError)
        assert "nests deeper" in str(caught.value)
        assert (await system.ask("t", "again")).text == "fine"
    async with make() as system:
        assert (await system.ask("t", "after a restart")).text == "fine"


async def test_a_tool_result_that_cannot_be_stored_is_an_error_for_the_model(
    open_store: OpenStore,
) -> None:
    def unstorable() -> Any:
        return {"x": object()}

    def surrogate() -> str:
        return "bad \ud800"

    def script(request: ModelRequest[Any]) -> AIMessage | str:
        last = request.messages[-1]
        if isinstance(last, HumanMessage):
            return AIMessage(
                "",
                tool_calls=[
                    ToolCall(id="a", name="unstorable"),
                    ToolCall(id="b", name="surrogate"),
                ],
            )
        return "done"

    def make() -> ActorSystem[AgentState]:
        return ActorSystem(
            Agent(model=ScriptedModel(script), tools=[unstorable, surrogate]),
            snapshots=open_store("sqlite", synchronous="OFF"),
        )

    async with make() as system:
        result = await system.ask("t", "use them")
        tools = [m for m in result.messages if isinstance(m, ToolMessage)]
        assert [m.status for m in tools] == ["error", "error"]
        assert result.text == "done"
    async with make() as system:
        assert (await system.get_state("t")).state.messages == result.messages


# -- a crafted record nested 100k deep reads as corrupt (issue 9, defect 5) -----

_PLACEHOLDER = "@@deep@@"


def _deep_cursor() -> TurnCursor:
    return TurnCursor(message_id="m", next="model", context=_PLACEHOLDER)


def _deepen(payload: bytes) -> bytes:
    """``payload`` with the placeholder string replaced by an array 100k deep."""
    placeholder = msgspec.msgpack.encode(_PLACEHOLDER)
    assert payload.count(placeholder) == 1
    return payload.replace(placeholder, b"\x91" * 100_000 + b"\xc0")


@pytest.mark.parametrize("where", ["step", "full"])
async def test_a_crafted_record_nested_100k_deep_is_a_corrupt_thread(
    where: str, open_store: OpenStore
) -> None:
    codec = Codec(Profile)
    async with running(open_store, "sqlite") as system:
        await system.ask("healthy", "hi")
    async with open_store("sqlite") as store:
        epoch = await store.acquire("crafted")
        if where == "step":
            record: Any = StepRecord(
                version=1, kind="input", updates=[], ts=0.0, turn=_deep_cursor()
            )
            step, full = frame(STEP, _deepen(msgspec.msgpack.encode(record))), None
        else:
            record = FullRecord(
                version=1, state=Profile(), consumed=[], ts=0.0, turn=_deep_cursor()
            )
            step = codec.encode_step(StepRecord(version=1, kind="input", updates=[], ts=0.0))
            full = frame(FULL, _deepen(msgspec.msgpack.encode(record)))
        await store.commit(
            CommitRequest(
                thread_id="crafted", expected_version=0, epoch=epoch, step=step, full=full
            )
        )

    async with running(open_store, "sqlite") as system:
        with pytest.raises(SnapshotCorruptError, match="nested too deep"):
            await system.get_state("crafted")
        with pytest.raises(SnapshotCorruptError):
            await system.ask("crafted", "hi")
        if where == "step":
            with pytest.raises(SnapshotCorruptError):
                await system.history("crafted")
        # Other threads are not affected.
        assert (await system.ask("healthy", "still?")).text == "echo: still?"
        assert sorted(await system.threads()) == ["crafted", "healthy"]
