"""The ``ThreadClient`` contract, written once against the protocol.

Every way of reaching threads (in process today; over Redis next) runs this
suite through the ``client`` fixture. The envelope that a client hands to a
thread is plain data: it survives an encode/decode round trip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from threadline import (
    ActorSystem,
    Agent,
    AgentState,
    AIMessage,
    Client,
    HumanMessage,
    InvalidThreadIdError,
    LocalClient,
    ModelRequest,
    ScriptedModel,
    ThreadClient,
    ThreadNotFoundError,
    ToolCall,
    TurnFailedError,
    Worker,
    tool,
)
from threadline.actors import Envelope, coerce_messages, normalize_update

pytestmark = pytest.mark.anyio

CLIENT_KINDS = ("local", pytest.param("redis", marks=pytest.mark.redis))


class Notes(AgentState):
    topic: str = ""


@tool
def shout(text: str) -> str:
    """Shout the text."""
    return text.upper()


def model(request: ModelRequest[Any]) -> str | AIMessage:
    last = request.messages[-1]
    if isinstance(last, HumanMessage) and last.content.startswith("shout "):
        return AIMessage(
            "", tool_calls=[ToolCall(id="c1", name="shout", args={"text": last.content[6:]})]
        )
    if isinstance(last, HumanMessage) and last.content == "fail":
        raise RuntimeError("the model broke")
    return f"echo: {last.content}"


@pytest.fixture(params=CLIENT_KINDS)
async def client(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ThreadClient[Any]]:
    agent: Agent[Notes] = Agent(model=ScriptedModel(model), tools=[shout], state_schema=Notes)
    if request.param == "local":
        async with ActorSystem(agent, snapshots=tmp_path / "threads.db") as system:
            yield system.client
        return
    # Over Redis: a worker serving the agent and a client, sharing only Redis.
    server = request.getfixturevalue("redis_server")
    prefix = request.getfixturevalue("redis_prefix")
    async with (
        Worker(agent, server.url, prefix=prefix, partitions=8, lease_ttl=1.0) as worker,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(worker.serve)
        async with Client(server.url, state_schema=Notes, prefix=prefix) as remote:
            yield remote
        tg.cancel_scope.cancel()


async def test_the_client_satisfies_the_protocol(client: ThreadClient[Any]) -> None:
    assert isinstance(client, ThreadClient)


async def test_ask_replies_with_durable_state(client: ThreadClient[Any]) -> None:
    result = await client.ask("t", "hi", message_id="m1")
    assert result.text == "echo: hi" and result.version == 2 and result.message_id == "m1"
    snapshot = await client.get_state("t")
    assert snapshot.version == 2 and snapshot.state.messages == result.messages


async def test_tell_returns_the_message_id_and_the_message_is_applied(
    client: ThreadClient[Any],
) -> None:
    told = await client.tell("t", "first", message_id="told-1")
    assert told == "told-1"
    result = await client.ask("t", "second")  # mailbox order: after the told one
    assert [m.content for m in result.messages] == [
        "first",
        "echo: first",
        "second",
        "echo: second",
    ]


async def test_the_same_message_id_is_applied_once(client: ThreadClient[Any]) -> None:
    await client.tell("t", "once", message_id="same")
    again = await client.ask("t", "once", message_id="same")
    assert again.duplicate
    inputs = [s for s in await client.history("t") if s.kind == "input"]
    assert [s.consumed for s in inputs] == ["same"]


async def test_stream_yields_each_committed_step_then_ends(client: ThreadClient[Any]) -> None:
    parts = [p async for p in client.stream("t", "shout hey", mode=["updates", "values"])]
    updates = [next(iter(p.data)) for p in parts if p.mode == "updates"]
    assert updates == ["input", "model", "tools", "model"]
    values = [p for p in parts if p.mode == "values"]
    assert [p.version for p in values] == [1, 2, 3, 4]
    assert values[-1].data.messages[-2].content == "HEY"


async def test_stream_raises_the_turn_error(client: ThreadClient[Any]) -> None:
    with pytest.raises(TurnFailedError, match="the model broke"):
        async for _ in client.stream("t", "fail"):
            pass


async def test_state_update_history_threads_delete(client: ThreadClient[Any]) -> None:
    with pytest.raises(ThreadNotFoundError):
        await client.get_state("nobody")
    await client.ask("a", "hi")
    updated = await client.update_state("a", {"topic": "cats"})
    assert updated.state.topic == "cats" and updated.version == 3
    history = await client.history("a")
    assert [s.kind for s in history] == ["input", "model", "update"]
    assert [s.version for s in await client.history("a", start=2, stop=3)] == [2, 3]
    await client.ask("b", "hi")
    assert sorted(await client.threads()) == ["a", "b"]
    assert await client.delete("a") is True
    assert await client.threads() == ["b"]
    assert await client.delete("a") is False


async def test_bad_thread_ids_are_refused_by_every_call(client: ThreadClient[Any]) -> None:
    for call in (
        lambda: client.ask(" ", "hi"),
        lambda: client.tell("", "hi"),
        lambda: client.get_state("\n"),
        lambda: client.update_state("a\x00", {"topic": "x"}),
        lambda: client.history(""),
        lambda: client.delete(" "),
    ):
        with pytest.raises(InvalidThreadIdError):
            await call()
    assert await client.threads() == []


async def test_local_client_is_what_the_system_delegates_to(tmp_path: Path) -> None:
    agent: Agent[Notes] = Agent(model=ScriptedModel(model), state_schema=Notes)
    async with ActorSystem(agent, snapshots=tmp_path / "t.db") as system:
        assert isinstance(system.client, LocalClient)
        await system.client.tell("t", "via the client")
        assert (await system.ask("t", "via the system")).version == 4


def test_an_envelope_is_plain_data_that_survives_a_round_trip() -> None:
    update = {"messages": coerce_messages("hello", first_id="m1"), "topic": "cats"}
    envelope = Envelope(
        kind="input",
        message_id="m1",
        thread_id="t",
        update=update,
        context={"user": "ann"},
        run_id="run-1",
        modes=("updates", "values"),
        reply_to="replies:run-1",
    )
    for encode, decode in (
        (msgspec.msgpack.encode, msgspec.msgpack.decode),
        (msgspec.json.encode, msgspec.json.decode),
    ):
        back = decode(encode(envelope), type=Envelope)
        # The update travels as builtins; the receiver validates it again at its door.
        assert normalize_update(Notes, back.update, source="inbox") == normalize_update(
            Notes, update, source="inbox"
        )
        assert msgspec.structs.replace(back, update=update) == envelope
