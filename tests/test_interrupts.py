"""Human-in-the-loop interrupts: a tool asks, the turn parks, ``Command(resume=)`` answers.

Runs through an ``ActorSystem`` on memory, SQLite and Redis (``tests/test_client.py``
runs the same through a ``Client`` and a ``Worker``). The point proven
throughout: only the interrupted tool call runs again; its finished siblings
never do, not even across a restart between the interrupt and the resume.
"""

from __future__ import annotations

from collections import Counter
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
    ModelRequest,
    ScriptedModel,
    ThreadInterruptedError,
    ToolCall,
    ToolMessage,
    ToolRuntime,
    Worker,
    interrupt,
    tool,
)
from threadline.actors._api import TurnCursor
from threadline.runtime.agent.middleware import HumanInTheLoopMiddleware

from ._history import History, Op, check
from .conftest import STORE_KINDS, OpenStore, start_backend, store_kind_params

pytestmark = pytest.mark.anyio


@pytest.fixture(params=store_kind_params(*STORE_KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return start_backend(request, str(request.param))


def model(request: ModelRequest[Any]) -> str | AIMessage:
    """``book X``: a lookup and a booking in parallel; ``two X``: two bookings;
    ``twice X``: a tool that asks twice; ``sync X``: a sync tool that asks; once
    the tools answered, a summary of their results."""
    last = request.messages[-1]
    n = len(request.messages)
    if isinstance(last, HumanMessage):
        verb, _, arg = last.content.partition(" ")
        calls = {
            "book": [("lookup", f"lookup-{n}"), ("book", f"book-{n}")],
            "two": [("book", f"a-{n}"), ("book", f"b-{n}")],
            "twice": [("twice", f"twice-{n}")],
            "sync": [("lookup", f"lookup-{n}"), ("sync_book", f"sync-{n}")],
            "bad": [("bad", f"bad-{n}")],
        }.get(verb)
        if calls is None:
            return f"echo: {last.content}"
        return AIMessage(
            "", tool_calls=[ToolCall(id=i, name=name, args={"city": arg}) for name, i in calls]
        )
    results = []
    for message in reversed(request.messages):
        if not isinstance(message, ToolMessage):
            break
        results.append(message.content)
    return "done: " + ", ".join(sorted(results))


def make_agent(runs: Counter[str]) -> Agent[AgentState]:
    @tool
    async def lookup(city: str) -> str:
        """Look the city up."""
        runs["lookup"] += 1
        return f"{city} is sunny"

    @tool
    async def book(city: str, runtime: ToolRuntime) -> str:
        """Book a flight."""
        runs["book"] += 1
        answer = runtime.interrupt({"question": "book?", "city": city})
        return f"booked {city}" if answer == "yes" else f"not booked {city} ({answer})"

    @tool
    async def twice(city: str) -> str:
        """Ask two questions."""
        runs["twice"] += 1
        first = interrupt("first?")
        second = interrupt(f"second after {first}?")
        return f"{city}: {first} then {second}"

    @tool
    def sync_book(city: str) -> str:
        """A sync tool (runs in a worker thread) that asks."""
        runs["sync_book"] += 1
        return f"sync {city}: {interrupt({'sync': city})}"

    @tool
    async def bad(city: str) -> str:
        """Asks with a value that cannot be stored."""
        return str(interrupt(object()))

    return Agent(model=ScriptedModel(model), tools=[lookup, book, twice, sync_book, bad])


async def test_an_interrupt_parks_and_only_the_interrupted_call_runs_again(
    kind: str, open_store: OpenStore
) -> None:
    runs: Counter[str] = Counter()
    async with ActorSystem(make_agent(runs), snapshots=open_store(kind)) as system:
        result = await system.ask("t", "book paris")
        assert result.interrupts == (
            Interrupt(
                id="book-1:0", value={"question": "book?", "city": "paris"}, tool_call_id="book-1"
            ),
        )
        assert runs == {"lookup": 1, "book": 1}
        # The finished sibling's result is committed with the parking step.
        tool_messages = [m for m in result.messages if isinstance(m, ToolMessage)]
        assert [m.tool_call_id for m in tool_messages] == ["lookup-1"]
        snapshot = await system.get_state("t")
        assert snapshot.status == "interrupted"
        assert snapshot.next == "tools"
        assert snapshot.interrupts == result.interrupts

        # A plain message is refused; nothing is committed.
        with pytest.raises(ThreadInterruptedError):
            await system.ask("t", "hello")
        assert (await system.get_state("t")).version == result.version

        final = await system.ask("t", Command(resume="yes"))
        assert final.interrupts == ()
        assert final.text == "done: booked paris, paris is sunny"
        assert runs == {"lookup": 1, "book": 2}
        after = await system.get_state("t")
        assert after.status == "idle"
        assert after.interrupts == ()
        history = await system.history("t")
        assert [s.kind for s in history] == ["input", "model", "tools", "answer", "tools", "model"]
        assert history[2].turn is not None and history[2].turn.interrupts == result.interrupts
        assert history[3].consumed is not None
        # Not a word of the interrupt is left in the cursor once the step completed.
        assert history[4].turn is not None and history[4].turn.resumed == {}
        # The thread takes plain messages again.
        assert (await system.ask("t", "hi")).text == "echo: hi"


async def test_resume_after_a_restart_reruns_nothing_that_finished(
    kind: str, open_store: OpenStore
) -> None:
    """Interrupt, close the system, open a new one on the same store, resume."""
    runs: Counter[str] = Counter()
    async with ActorSystem(make_agent(runs), snapshots=open_store(kind)) as system:
        parked = await system.ask("t", "book rome")
    assert runs == {"lookup": 1, "book": 1}
    async with ActorSystem(make_agent(runs), snapshots=open_store(kind)) as system:
        snapshot = await system.get_state("t")
        assert snapshot.status == "interrupted"
        assert snapshot.interrupts == parked.interrupts
        # Recovery does not run a parked turn on its own.
        assert (await system.get_state("t")).version == parked.version
        final = await system.ask("t", Command(resume="no"))
    assert final.text == "done: not booked rome (no), rome is sunny"
    assert runs == {"lookup": 1, "book": 2}


async def test_several_interrupts_are_answered_by_id(kind: str, open_store: OpenStore) -> None:
    runs: Counter[str] = Counter()
    async with ActorSystem(make_agent(runs), snapshots=open_store(kind)) as system:
        result = await system.ask("t", "two oslo")
        ids = sorted(i.id for i in result.interrupts)
        assert ids == ["a-1:0", "b-1:0"]
        version = result.version
        with pytest.raises(InvalidInputError, match="2 interrupts are pending"):
            await system.ask("t", Command(resume="yes"))
        with pytest.raises(InvalidInputError, match="no value for the interrupts"):
            await system.ask("t", Command(resume={"a-1:0": "yes"}))
        assert (await system.get_state("t")).version == version
        final = await system.ask("t", Command(resume={"a-1:0": "yes", "b-1:0": "later"}))
        assert final.text == "done: booked oslo, not booked oslo (later)"
        assert runs == {"book": 4}


async def test_a_tool_that_asks_twice_parks_twice(kind: str, open_store: OpenStore) -> None:
    runs: Counter[str] = Counter()
    async with ActorSystem(make_agent(runs), snapshots=open_store(kind)) as system:
        first = await system.ask("t", "twice x")
        assert [(i.id, i.value) for i in first.interrupts] == [("twice-1:0", "first?")]
        second = await system.ask("t", Command(resume="A"))
        assert [(i.id, i.value) for i in second.interrupts] == [("twice-1:1", "second after A?")]
        final = await system.ask("t", Command(resume="B"))
        assert final.text == "done: x: A then B"
        assert runs == {"twice": 3}
        history = await system.history("t")
        assert [s.kind for s in history].count("answer") == 2
        report = check(
            [
                Op(op="reply", thread="t", id=first.message_id, sender="s", version=first.version),
            ],
            {"t": history},
            phantoms=False,  # (the answers were sent without a record)
        )
        assert report.ok, report


async def test_a_sync_tool_asks_through_the_module_level_interrupt(
    kind: str, open_store: OpenStore
) -> None:
    runs: Counter[str] = Counter()
    async with ActorSystem(make_agent(runs), snapshots=open_store(kind)) as system:
        result = await system.ask("t", "sync bern")
        assert [i.value for i in result.interrupts] == [{"sync": "bern"}]
        final = await system.ask("t", Command(resume="ok"))
        assert final.text == "done: bern is sunny, sync bern: ok"
        assert runs == {"lookup": 1, "sync_book": 2}


async def test_stream_yields_the_interrupt_then_resumes(kind: str, open_store: OpenStore) -> None:
    runs: Counter[str] = Counter()
    async with ActorSystem(make_agent(runs), snapshots=open_store(kind)) as system:
        parts = [p async for p in system.stream("t", "book kyiv")]
        kinds = [next(iter(p.data)) for p in parts]
        assert kinds == ["input", "model", "tools", "__interrupt__"]
        (pending,) = parts[-1].data["__interrupt__"]
        assert isinstance(pending, Interrupt) and pending.tool_call_id == "book-1"
        parts = [p async for p in system.stream("t", Command(resume="yes"))]
        assert [next(iter(p.data)) for p in parts] == ["answer", "tools", "model"]
        assert runs == {"lookup": 1, "book": 2}


async def test_bad_resumes_commit_nothing(tmp_path: Any) -> None:
    runs: Counter[str] = Counter()
    async with ActorSystem(make_agent(runs), snapshots=tmp_path / "t.db") as system:
        await system.ask("t", "plain")
        version = (await system.get_state("t")).version
        with pytest.raises(InvalidInputError, match="no pending interrupt"):
            await system.ask("t", Command(resume="yes"))
        with pytest.raises(InvalidInputError, match="answers interrupts"):
            await system.ask("t", Command(update={"messages": []}))
        with pytest.raises(InvalidInputError, match="answers interrupts"):
            await system.ask("t", Command())
        with pytest.raises(InvalidInputError, match="cannot be stored"):
            await system.ask("t", Command(resume=object()))
        parked = await system.ask("t", "book lima")
        with pytest.raises(InvalidInputError, match="ask or stream"):
            await system.client.tell("t", Command(resume="yes"))
        assert (await system.get_state("t")).version == parked.version
        assert version < parked.version
        # A resume sent twice with one message id is applied once.
        final = await system.ask("t", Command(resume="yes"), message_id="r1")
        again = await system.ask("t", Command(resume="yes"), message_id="r1")
        assert again.duplicate and again.version == final.version
        assert runs == {"lookup": 1, "book": 2}


async def test_an_interrupt_value_that_cannot_be_stored_is_the_tools_error(
    tmp_path: Any,
) -> None:
    async with ActorSystem(make_agent(Counter()), snapshots=tmp_path / "t.db") as system:
        result = await system.ask("t", "bad x")
        assert result.interrupts == ()
        (message,) = [m for m in result.messages if isinstance(m, ToolMessage)]
        assert message.status == "error" and "cannot be stored" in message.content


def test_interrupt_outside_a_tool_call_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="only while a tool call runs"):
        interrupt("no tool runs")


def test_a_cursor_without_interrupts_encodes_as_before() -> None:
    """The hot path writes the same bytes: the new fields are omitted when empty."""
    plain = TurnCursor(message_id="m", next="model", model_calls=1)
    encoded = msgspec.msgpack.encode(plain)
    assert b"interrupts" not in encoded and b"resumed" not in encoded
    assert encoded == msgspec.msgpack.encode(
        msgspec.structs.replace(plain, interrupts=(), resumed={})
    )


async def test_history_checker_accepts_an_interrupted_conversation(tmp_path: Any) -> None:
    history = History()
    async with ActorSystem(make_agent(Counter()), snapshots=tmp_path / "t.db") as system:
        for message, how in (("book a", "x"), (Command(resume="yes"), "r"), ("hi", "h")):
            history.add(Op(op="send", thread="t", id=how, sender="s"))
            result = await system.ask("t", message, message_id=how)
            history.add(Op(op="reply", thread="t", id=how, sender="s", version=result.version))
        steps = await system.history("t")
    report = check(history.ops, {"t": steps})
    assert report.ok, report


@pytest.mark.redis
async def test_resume_on_another_worker_reruns_nothing_that_finished(
    redis_server: Any, redis_prefix: str
) -> None:
    """Interrupt through a Client served by one Worker; stop it; a second Worker
    (a new process in production) takes the thread over and runs the resume."""
    runs: Counter[str] = Counter()
    url = redis_server.url
    async with Client(url, prefix=redis_prefix) as client:
        async with (
            Worker(make_agent(runs), url, prefix=redis_prefix, lease_ttl=1.0) as w,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(w.serve)
            parked = await client.ask("t", "book quito")
            tg.cancel_scope.cancel()
        assert [i.tool_call_id for i in parked.interrupts] == ["book-1"]
        assert runs == {"lookup": 1, "book": 1}
        async with (
            Worker(make_agent(runs), url, prefix=redis_prefix, lease_ttl=1.0) as w,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(w.serve)
            assert (await client.get_state("t")).status == "interrupted"
            with pytest.raises(ThreadInterruptedError):
                await client.ask("t", "hello")
            final = await client.ask("t", Command(resume="yes"), timeout=30)
            tg.cancel_scope.cancel()
    assert final.text == "done: booked quito, quito is sunny"
    assert runs == {"lookup": 1, "book": 2}


# -- HumanInTheLoopMiddleware -------------------------------------------------------


def review_agent(sent: list[str]) -> Agent[AgentState]:
    @tool
    async def weather(city: str) -> str:
        """The weather."""
        sent.append(f"weather {city}")
        return f"{city} is sunny"

    @tool
    async def email(to: str, body: str) -> str:
        """Send an email."""
        sent.append(f"email {to}: {body}")
        return f"sent to {to}"

    @tool
    async def delete(path: str) -> str:
        """Delete a file."""
        sent.append(f"delete {path}")
        return f"deleted {path}"

    def reviewing_model(request: ModelRequest[Any]) -> str | AIMessage:
        last = request.messages[-1]
        if isinstance(last, HumanMessage):
            verb, _, arg = last.content.partition(" ")
            calls = [ToolCall(id="w", name="weather", args={"city": arg})]
            if verb == "email":
                calls.append(ToolCall(id="e", name="email", args={"to": arg, "body": "hi"}))
            else:
                calls.append(ToolCall(id="d", name="delete", args={"path": arg}))
            return AIMessage("", tool_calls=calls)
        return "done: " + ", ".join(
            sorted(m.content for m in request.messages if isinstance(m, ToolMessage))
        )

    hitl = HumanInTheLoopMiddleware(
        {
            "email": True,
            "delete": {"allowed_decisions": ["approve", "reject"], "description": "Delete?"},
            "weather": False,
        }
    )
    return Agent(
        model=ScriptedModel(reviewing_model), tools=[weather, email, delete], middleware=[hitl]
    )


async def test_human_review_approve_edit_reject(kind: str, open_store: OpenStore) -> None:
    sent: list[str] = []
    async with ActorSystem(review_agent(sent), snapshots=open_store(kind)) as system:
        asked = await system.ask("approve", "email ann")
        (pending,) = asked.interrupts
        assert pending.tool_call_id == "e"
        assert pending.value["action_request"]["name"] == "email"
        assert pending.value["action_request"]["args"] == {"to": "ann", "body": "hi"}
        assert pending.value["allowed_decisions"] == ["approve", "edit", "reject"]
        assert sent == ["weather ann"]  # the unreviewed sibling ran; the email waits
        done = await system.ask("approve", Command(resume={"type": "approve"}))
        assert done.text == "done: ann is sunny, sent to ann"
        assert sent == ["weather ann", "email ann: hi"]

        sent.clear()
        await system.ask("edit", "email bob")
        edit = {"type": "edit", "args": {"to": "bob", "body": "hello there"}}
        done = await system.ask("edit", Command(resume=edit))
        assert sent == ["weather bob", "email bob: hello there"]

        sent.clear()
        asked = await system.ask("reject", "delete /etc")
        assert asked.interrupts[0].value["action_request"]["description"] == "Delete?"
        # Not allowed for this tool: asked again, with the reason.
        again = await system.ask("reject", Command(resume={"type": "edit", "args": {}}))
        (pending,) = again.interrupts
        assert "not allowed" in pending.value["error"]
        assert pending.id != asked.interrupts[0].id
        done = await system.ask("reject", Command(resume={"type": "reject", "message": "no!"}))
        assert sent == ["weather /etc"]  # never deleted
        (answer,) = [
            m for m in done.messages if isinstance(m, ToolMessage) and m.tool_call_id == "d"
        ]
        assert answer.status == "error" and answer.content == "no!"


def test_human_review_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="allowed_decisions"):
        HumanInTheLoopMiddleware({"t": {"allowed_decisions": ["maybe"]}})
    with pytest.raises(ValueError, match="must be True, False or a dict"):
        HumanInTheLoopMiddleware({"t": {"allowed": ["approve"]}})
    with pytest.raises(TypeError):
        HumanInTheLoopMiddleware(["t"])  # type: ignore[arg-type]
