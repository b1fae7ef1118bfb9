"""The ``ThreadClient`` contract, written once against the protocol.

Every way of reaching threads (in process today; over Redis next) runs this
suite through the ``client`` fixture. The envelope that a client hands to a
thread is plain data: it survives an encode/decode round trip.
"""

from __future__ import annotations

from collections import Counter
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
    Command,
    HumanMessage,
    Interrupt,
    InvalidInputError,
    InvalidThreadIdError,
    InvalidUpdateError,
    LocalClient,
    ModelRequest,
    ScriptedModel,
    ThreadClient,
    ThreadExistsError,
    ThreadInterruptedError,
    ThreadNotFoundError,
    ToolCall,
    TurnFailedError,
    VersionNotFoundError,
    Worker,
    interrupt,
    tool,
)
from threadline.actors import Envelope, coerce_messages, normalize_update

pytestmark = pytest.mark.anyio

CLIENT_KINDS = ("local", pytest.param("redis", marks=pytest.mark.redis))


class Notes(AgentState):
    topic: str = ""


RUNS: Counter[str] = Counter()


@tool
def shout(text: str) -> str:
    """Shout the text."""
    RUNS["shout"] += 1
    return text.upper()


@tool
async def approve(text: str) -> str:
    """Ask a human to approve the text."""
    RUNS["approve"] += 1
    answer = interrupt({"approve": text})
    return f"{text}: {answer}"


def model(request: ModelRequest[Any]) -> str | AIMessage:
    last = request.messages[-1]
    if isinstance(last, HumanMessage) and last.content.startswith("shout "):
        return AIMessage(
            "", tool_calls=[ToolCall(id="c1", name="shout", args={"text": last.content[6:]})]
        )
    if isinstance(last, HumanMessage) and last.content.startswith("approve "):
        text = last.content[8:]
        return AIMessage(
            "",
            tool_calls=[
                ToolCall(id="c1", name="shout", args={"text": text}),
                ToolCall(id="c2", name="approve", args={"text": text}),
            ],
        )
    if isinstance(last, HumanMessage) and last.content == "fail":
        raise RuntimeError("the model broke")
    return f"echo: {last.content}"


@pytest.fixture(params=CLIENT_KINDS)
async def client(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ThreadClient[Any]]:
    agent: Agent[Notes] = Agent(
        model=ScriptedModel(model), tools=[shout, approve], state_schema=Notes
    )
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


# -- time travel ---------------------------------------------------------------------


async def test_get_state_at_every_version_and_out_of_range(client: ThreadClient[Any]) -> None:
    seen = {}
    for text in ("one", "shout two", "three"):
        async for part in client.stream("tt", text, mode="values"):
            seen[part.version] = part.data
    updated = await client.update_state("tt", {"topic": "dogs"})
    seen[updated.version] = updated.state
    assert sorted(seen) == list(range(1, 10))
    for version, state in seen.items():
        snapshot = await client.get_state("tt", version=version)
        assert (snapshot.version, snapshot.state) == (version, state)
    assert (await client.get_state("tt", version=4)).next == "tools"  # mid-turn
    for bad in (0, -1, 10, 1 << 62):
        with pytest.raises(VersionNotFoundError):
            await client.get_state("tt", version=bad)
    with pytest.raises(ThreadNotFoundError):
        await client.get_state("nobody", version=1)
    with pytest.raises(InvalidInputError):
        await client.get_state("tt", version="2")  # type: ignore[arg-type]


async def test_history_pages_backwards(client: ThreadClient[Any]) -> None:
    for text in ("a", "b", "c", "d"):
        await client.ask("h", text)
    everything = await client.history("h")
    assert [s.version for s in everything] == list(range(1, 9))
    page = await client.history("h", limit=3)
    assert [s.version for s in page] == [8, 7, 6]  # newest first, as LangGraph's
    pages, before = [], None
    while True:
        page = await client.history("h", limit=3, before=before)
        if not page:
            break
        pages.extend(page)
        before = page[-1].version
    assert pages == everything[::-1]
    assert [s.version for s in await client.history("h", before=3)] == [2, 1]
    assert await client.history("nobody", limit=5) == []
    for bad in (
        {"limit": 0},
        {"limit": True},
        {"limit": 2, "start": 3},
        {"before": 4, "stop": 5},
        {"before": "x"},
    ):
        with pytest.raises(InvalidInputError):
            await client.history("h", **bad)


async def test_revert_appends_a_step_with_the_old_state(client: ThreadClient[Any]) -> None:
    await client.ask("r", "first")
    at_two = await client.get_state("r", version=2)
    await client.update_state("r", {"topic": "cats"})
    await client.ask("r", "shout later")
    before = await client.history("r")
    reverted = await client.revert("r", to=2)
    assert reverted.version == len(before) + 1
    assert reverted.state == at_two.state  # the messages added since are gone
    after = await client.history("r")
    assert after[:-1] == before  # nothing rewritten
    assert (after[-1].kind, after[-1].at, after[-1].version) == ("revert", 2, len(before) + 1)
    assert (await client.get_state("r")).state == at_two.state
    again = await client.ask("r", "on from there")
    assert [m.content for m in again.messages] == [
        "first",
        "echo: first",
        "on from there",
        "echo: on from there",
    ]
    with pytest.raises(InvalidUpdateError, match="middle of a turn"):
        await client.revert("r", to=1)  # the input step of a turn
    with pytest.raises(VersionNotFoundError):
        await client.revert("r", to=99)
    with pytest.raises(ThreadNotFoundError):
        await client.revert("nobody", to=1)


async def test_update_state_at_a_past_version(client: ThreadClient[Any]) -> None:
    await client.ask("u", "first")
    await client.ask("u", "second")
    updated = await client.update_state("u", {"topic": "birds"}, at=2)
    assert updated.version == 5 and updated.state.topic == "birds"
    assert [m.content for m in updated.state.messages] == ["first", "echo: first"]
    last = (await client.history("u", limit=1))[0]
    assert (last.kind, last.at) == ("update", 2)


async def test_fork_is_cheap_and_independent(client: ThreadClient[Any]) -> None:
    await client.ask("parent", "one")
    await client.ask("parent", "two")
    forked = await client.fork("parent", "child", at=2)
    assert forked.version == 1
    assert forked.state == (await client.get_state("parent", version=2)).state
    (first,) = await client.history("child")
    assert (first.kind, first.at, first.parent) == ("fork", 2, "parent")
    child = await client.ask("child", "child only")
    parent = await client.ask("parent", "parent only")
    assert "parent only" not in [m.content for m in child.messages]
    assert "child only" not in [m.content for m in parent.messages]
    assert [m.content for m in (await client.get_state("child")).state.messages] == [
        "one",
        "echo: one",
        "child only",
        "echo: child only",
    ]
    latest = await client.fork("parent", "child-2")  # at=None: the latest version
    assert latest.state == parent.state
    with pytest.raises(ThreadExistsError):
        await client.fork("parent", "child", at=2)
    with pytest.raises(ThreadNotFoundError):
        await client.fork("nobody", "child-3")
    with pytest.raises(VersionNotFoundError):
        await client.fork("parent", "child-3", at=99)
    with pytest.raises(InvalidUpdateError, match="middle of a turn"):
        await client.fork("parent", "child-3", at=1)
    with pytest.raises(ThreadNotFoundError):
        await client.get_state("child-3")
    assert sorted(await client.threads()) == ["child", "child-2", "parent"]


async def test_an_interrupt_parks_the_turn_and_a_resume_finishes_it(
    client: ThreadClient[Any],
) -> None:
    RUNS.clear()
    result = await client.ask("t", "approve go")
    assert result.interrupts == (Interrupt(id="c2:0", value={"approve": "go"}, tool_call_id="c2"),)
    assert [m.content for m in result.messages if m.type == "tool"] == ["GO"]
    snapshot = await client.get_state("t")
    assert snapshot.status == "interrupted" and snapshot.interrupts == result.interrupts
    with pytest.raises(ThreadInterruptedError):
        await client.ask("t", "a plain message")
    assert (await client.get_state("t")).version == result.version
    with pytest.raises(InvalidInputError, match="answers interrupts"):
        await client.ask("t", Command(goto="end"))
    final = await client.ask("t", Command(resume="yes"))
    assert final.interrupts == () and final.text == "echo: go: yes"
    assert RUNS == {"shout": 1, "approve": 2}  # only the interrupted call ran again
    assert (await client.get_state("t")).status == "idle"
    kinds = [s.kind for s in await client.history("t")]
    assert kinds == ["input", "model", "tools", "answer", "tools", "model"]


async def test_stream_yields_the_interrupt_and_resumes(client: ThreadClient[Any]) -> None:
    RUNS.clear()
    parts = [p async for p in client.stream("s", "approve it")]
    assert [next(iter(p.data)) for p in parts] == ["input", "model", "tools", "__interrupt__"]
    (pending,) = parts[-1].data["__interrupt__"]
    assert pending == Interrupt(id="c2:0", value={"approve": "it"}, tool_call_id="c2")
    parts = [p async for p in client.stream("s", Command(resume={"c2:0": "fine"}))]
    assert [next(iter(p.data)) for p in parts] == ["answer", "tools", "model"]
    assert parts[-1].data["model"][0]["messages"][0].content == "echo: it: fine"
    assert RUNS == {"shout": 1, "approve": 2}
