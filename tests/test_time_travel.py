"""Time travel: past versions, history pages, revert, update_state(at=), fork.

The store-level part runs on every snapshot store (memory, SQLite, Redis and
a 3-node Redis Cluster); the thread-level part through an ``ActorSystem`` on
memory, SQLite and Redis (``tests/test_client.py`` runs the same features
through a ``Client`` and a ``Worker``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import threadline.persistence._journal as journal_module
from threadline import (
    ActorSystem,
    Agent,
    AgentState,
    AIMessage,
    HumanMessage,
    ModelRequest,
    RemoveMessage,
    ScriptedModel,
    SnapshotCorruptError,
    ToolCall,
    ToolMessage,
    VersionNotFoundError,
    tool,
)
from threadline.actors._api import FullRecord, StepRecord, TurnCursor
from threadline.persistence import (
    Codec,
    CommitRequest,
    MemorySnapshotStore,
    SnapshotStore,
    StoredVersion,
    load_version,
)
from threadline.persistence._codec import FULL, frame

from .conftest import CLUSTER_KIND, STORE_KINDS, OpenStore, start_backend, store_kind_params

pytestmark = pytest.mark.anyio


class Notes(AgentState):
    topic: str = ""


@tool
def shout(text: str) -> str:
    """Shout the text."""
    return text.upper()


def model(request: ModelRequest[Any]) -> str | AIMessage:
    last = request.messages[-1]
    if isinstance(last, HumanMessage) and last.content.startswith("shout "):
        n = len(request.messages)
        return AIMessage(
            "", tool_calls=[ToolCall(id=f"c{n}", name="shout", args={"text": last.content[6:]})]
        )
    return f"echo: {last.content}"


def agent() -> Agent[Notes]:
    return Agent(model=ScriptedModel(model), tools=[shout], state_schema=Notes)


# -- the stores: checkpoints, load_at, pages --------------------------------------


@pytest.fixture(params=store_kind_params(*STORE_KINDS, CLUSTER_KIND))
def any_store_kind(request: pytest.FixtureRequest) -> str:
    return start_backend(request, str(request.param))


@pytest.fixture
async def store(any_store_kind: str, open_store: OpenStore) -> AsyncIterator[SnapshotStore]:
    async with open_store(any_store_kind) as opened:
        yield opened


def commit(
    thread_id: str, expected: int, epoch: int, full: bytes | None = None, keep: bool = False
) -> CommitRequest:
    return CommitRequest(
        thread_id=thread_id,
        expected_version=expected,
        epoch=epoch,
        step=f"{thread_id}/{expected + 1}".encode(),
        full=full,
        keep_full=keep,
    )


def steps(thread_id: str, *versions: int) -> list[bytes]:
    return [f"{thread_id}/{v}".encode() for v in versions]


async def test_load_at_uses_the_newest_full_record_kept_at_or_before(
    store: SnapshotStore,
) -> None:
    epoch = await store.acquire("t")
    await store.commit(commit("t", 0, epoch))
    await store.commit(commit("t", 1, epoch, full=b"F2"))
    await store.commit(commit("t", 2, epoch))
    await store.commit(commit("t", 3, epoch, full=b"F4", keep=True))  # F2 stays
    await store.commit(commit("t", 4, epoch))
    await store.commit(commit("t", 5, epoch, full=b"F6"))  # F4 goes, F2 stays
    await store.commit(commit("t", 6, epoch))
    expected = {
        1: (None, 0, [1]),
        2: (b"F2", 2, [2]),
        3: (b"F2", 2, [2, 3]),
        4: (b"F2", 2, [2, 3, 4]),  # F4 was dropped
        5: (b"F2", 2, [2, 3, 4, 5]),
        6: (b"F6", 6, [6]),
        7: (b"F6", 6, [6, 7]),
    }
    for version, (full, full_version, wanted) in expected.items():
        assert await store.load_at("t", version) == StoredVersion(
            head=7, full=full, full_version=full_version, steps=steps("t", *wanted)
        ), version
    for outside in (0, -3, 8, 1 << 62):
        assert await store.load_at("t", outside) == StoredVersion(
            head=7, full=None, full_version=0, steps=[]
        )
    assert await store.load_at("nobody", 1) is None
    # The latest full record is what load uses, as before.
    loaded = await store.load("t")
    assert loaded is not None and (loaded.full, loaded.full_version) == (b"F6", 6)

    # A deleted thread's checkpoints go with it: the next thread of that id
    # never sees them.
    assert await store.delete("t", epoch=epoch) is True
    epoch = await store.acquire("t")
    await store.commit(commit("t", 0, epoch))
    await store.commit(commit("t", 1, epoch))
    assert await store.load_at("t", 2) == StoredVersion(
        head=2, full=None, full_version=0, steps=steps("t", 1, 2)
    )


async def test_read_steps_before_pages_backwards(store: SnapshotStore) -> None:
    epoch = await store.acquire("p")
    for v in range(7):
        await store.commit(commit("p", v, epoch))
    assert await store.read_steps_before("p", None, 3) == steps("p", 5, 6, 7)
    assert await store.read_steps_before("p", 5, 3) == steps("p", 2, 3, 4)
    assert await store.read_steps_before("p", 3, 10) == steps("p", 1, 2)
    assert await store.read_steps_before("p", 100, 2) == steps("p", 6, 7)
    assert await store.read_steps_before("p", 1, 5) == []
    assert await store.read_steps_before("p", 0, 5) == []
    assert await store.read_steps_before("nobody", None, 5) == []


# -- threads: every version, exactly ------------------------------------------------


THREAD_STORE_KINDS = store_kind_params(*STORE_KINDS)


@pytest.fixture(params=THREAD_STORE_KINDS)
def thread_store_kind(request: pytest.FixtureRequest) -> str:
    return start_backend(request, str(request.param))


_word = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=12)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("ask"), _word, st.integers(0, 400)),
        st.tuples(st.just("shout"), _word, st.integers(0, 400)),
        st.tuples(st.just("topic"), _word, st.just(0)),
        st.tuples(st.just("remove"), st.just(""), st.integers(0, 1000)),
        st.tuples(st.just("revert"), st.just(""), st.integers(0, 1000)),
        st.tuples(st.just("update_at"), _word, st.integers(0, 1000)),
    ),
    min_size=10,
    max_size=60,
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_ops)
async def test_every_version_is_the_state_observed_live(
    thread_store_kind: str,
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
    ops: list[tuple[str, str, int]],
) -> None:
    # Small full records, so a short conversation writes many and keeps some
    # as checkpoints: get_state(version=) then starts from all kinds of places.
    monkeypatch.setattr(journal_module, "FULL_RECORD_FLOOR", 600)
    thread_id = f"prop-{time.time_ns()}"
    observed: dict[int, Notes] = {}
    boundaries: list[int] = []  # versions where no turn is in flight
    async with ActorSystem(agent(), snapshots=open_store(thread_store_kind)) as system:
        for op, text, n in ops:
            if op in ("ask", "shout"):
                message = ("shout " if op == "shout" else "") + text + "." * n
                async for part in system.stream(thread_id, message, mode="values"):
                    observed[part.version] = part.data
                boundaries.append(max(observed))
                continue
            if not boundaries:
                continue
            if op == "topic":
                snapshot = await system.update_state(thread_id, {"topic": text})
            elif op == "remove":
                humans = [
                    m for m in observed[max(observed)].messages if isinstance(m, HumanMessage)
                ]
                if not humans:
                    continue
                gone = humans[n % len(humans)].id
                snapshot = await system.update_state(
                    thread_id, {"messages": [RemoveMessage(id=gone)]}
                )
            elif op == "revert":
                snapshot = await system.revert(thread_id, to=boundaries[n % len(boundaries)])
            else:
                at = boundaries[n % len(boundaries)]
                snapshot = await system.update_state(thread_id, {"topic": text}, at=at)
            observed[snapshot.version] = snapshot.state
            boundaries.append(snapshot.version)
        if not observed:
            return
        head = max(observed)
        assert sorted(observed) == list(range(1, head + 1))
        for version, state in observed.items():
            past = await system.get_state(thread_id, version=version)
            assert past.state == state, version
        assert (await system.get_state(thread_id)).state == observed[head]
        with pytest.raises(VersionNotFoundError):
            await system.get_state(thread_id, version=head + 1)
    # A cold start replays the revert/update(at=) steps to the same state.
    async with ActorSystem(agent(), snapshots=open_store(thread_store_kind)) as system:
        assert (await system.get_state(thread_id)).state == observed[head]
        again = await system.ask(thread_id, "after")
        assert again.messages[: len(observed[head].messages)] == observed[head].messages


async def test_past_versions_cost_a_few_states_not_the_history(
    thread_store_kind: str, open_store: OpenStore
) -> None:
    """A thread whose state stays small while its history grows (the old
    messages are removed): load_at(v) reads a bounded number of bytes, and
    checkpoints are kept (some, not every full record)."""
    store = open_store(thread_store_kind)
    async with ActorSystem(agent(), snapshots=store) as system:
        for turn in range(450):
            result = await system.ask("long", f"turn {turn} " + "x" * 300)
            if len(result.messages) > 20:
                old = [RemoveMessage(id=m.id) for m in result.messages[:2]]
                await system.update_state("long", {"messages": old})
        head = (await system.get_state("long")).version
        history_bytes = sum(map(len, await store.read_steps("long")))
        state_bytes = 0
        worst = 0
        kept = set()
        for version in [*range(1, head + 1, 5), head]:
            stored = await store.load_at("long", version)
            assert stored is not None
            read = sum(map(len, stored.steps)) + len(stored.full or b"")
            worst = max(worst, read)
            kept.add(stored.full_version)
            state = (await system.get_state("long", version=version)).state
            state_bytes = max(state_bytes, len(msgspec.msgpack.encode(state)))
    floor = max(state_bytes, journal_module.FULL_RECORD_FLOOR)
    assert worst <= (journal_module.CHECKPOINT_RATIO + 2) * floor, (worst, floor)
    assert worst * 8 < history_bytes  # far from reading the whole history
    assert len(kept - {0}) >= 3  # several full records serve the past


async def test_a_revert_queued_behind_a_running_turn_runs_after_it(tmp_path: Path) -> None:
    """Every write goes through the thread's actor in mailbox order: a revert
    sent while a turn runs is applied once that turn has committed, and
    reverts it too (history stays linear)."""
    entered, release = anyio.Event(), anyio.Event()

    async def slow(request: ModelRequest[Any]) -> str:
        if request.messages[-1].content == "slow":
            entered.set()
            await release.wait()
        return "ok"

    slow_agent: Agent[Notes] = Agent(model=ScriptedModel(slow), state_schema=Notes)
    async with (
        ActorSystem(slow_agent, snapshots=tmp_path / "t.db") as system,
        anyio.create_task_group() as tg,
    ):
        first = await system.ask("t", "fast")
        tg.start_soon(system.ask, "t", "slow")
        await entered.wait()
        reverted: list[Any] = []

        async def revert() -> None:
            reverted.append(await system.revert("t", to=first.version))

        tg.start_soon(revert)
        await anyio.sleep(0.05)
        assert not reverted  # waiting behind the turn
        release.set()
    (snapshot,) = reverted
    assert snapshot.state == first.state and snapshot.version == 5
    async with ActorSystem(slow_agent, snapshots=tmp_path / "t.db") as system:
        assert [s.kind for s in await system.history("t")] == [
            "input",
            "model",
            "input",
            "model",
            "revert",
        ]


async def test_revert_keeps_tool_call_pairs_whole(tmp_path: Path) -> None:
    async with ActorSystem(agent(), snapshots=tmp_path / "t.db") as system:
        await system.ask("t", "shout one")
        boundary = (await system.get_state("t")).version
        await system.ask("t", "shout two")
        reverted = await system.revert("t", to=boundary)
        calls = {
            c.id for m in reverted.state.messages if isinstance(m, AIMessage) for c in m.tool_calls
        }
        answers = {m.tool_call_id for m in reverted.state.messages if isinstance(m, ToolMessage)}
        assert calls == answers and len(calls) == 1
        result = await system.ask("t", "shout three")
        assert result.text == "echo: THREE"


# -- stores written before checkpoints existed ---------------------------------------


class _OldFullRecord(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A full record as threadline wrote it before ``span`` existed."""

    version: int
    state: Notes
    consumed: list[str]
    ts: float
    turn: TurnCursor | None = None


async def test_an_old_store_with_one_full_record_answers_every_version(
    thread_store_kind: str, open_store: OpenStore
) -> None:
    """What earlier versions left: every step, one full record (the latest,
    without ``span``), older ones dropped. get_state(version=) replays from
    the start before that record and from it after; the next full record the
    journal writes keeps the old one as a checkpoint."""
    codec = Codec(Notes)
    encoder = msgspec.msgpack.Encoder()
    states: dict[int, Notes] = {}
    state = Notes()
    store = open_store(thread_store_kind)
    async with store:
        epoch = await store.acquire("old")
        for version in range(1, 61):
            message = HumanMessage(f"message {version} " + "y" * 400, id=f"m{version}")
            update = {"messages": [message]}
            if version == 30:
                update = {"messages": [RemoveMessage(id="m3")], "topic": "late"}
            state = msgspec.structs.replace(
                state,
                topic=update.get("topic", state.topic),
                messages=[
                    *(m for m in state.messages if not (version == 30 and m.id == "m3")),
                    *([] if version == 30 else [message]),
                ],
            )
            states[version] = state
            now = float(version)
            full = None
            if version in (20, 40):  # the old policy: a new full record drops the older one
                full = frame(
                    FULL,
                    encoder.encode(
                        _OldFullRecord(version=version, state=state, consumed=[], ts=now)
                    ),
                )
            step = codec.encode_step(
                StepRecord(
                    version=version,
                    kind="update",
                    updates=[codec.to_patch(update)],
                    ts=now,
                )
            )
            await store.commit(
                CommitRequest(
                    thread_id="old", expected_version=version - 1, epoch=epoch, step=step, full=full
                )
            )
        for version, expected in states.items():
            got = await load_version(store, codec, "old", version)
            assert got.state == expected, version
        picked = {v: (await store.load_at("old", v)) for v in (19, 20, 39, 40, 60)}
        assert {v: p.full_version for v, p in picked.items() if p} == {
            19: 0,
            20: 0,  # the full record of 20 was dropped by the one of 40
            39: 0,
            40: 40,
            60: 40,
        }
    async with ActorSystem(agent(), snapshots=open_store(thread_store_kind)) as system:
        for turn in range(40):
            await system.ask("old", f"new {turn} " + "z" * 400)
        for version, expected in states.items():
            assert (await system.get_state("old", version=version)).state == expected
        # The old record (span unknown) was kept when the next one was written.
        stored = await system.snapshots.load_at("old", 41)
        assert stored is not None and stored.full_version == 40
        latest = await system.snapshots.load("old")
        assert latest is not None and latest.full_version > 60


async def test_a_full_record_that_does_not_belong_to_its_step_is_corrupt() -> None:
    """A full record is trusted only with the step written in the same commit
    (same timestamp): anything else is an error, never a wrong state."""
    codec = Codec(Notes)
    store = MemorySnapshotStore()
    epoch = await store.acquire("t")
    for version in (1, 2):
        step = codec.encode_step(
            StepRecord(version=version, kind="update", updates=[codec.to_patch({})], ts=1.0)
        )
        full = None
        if version == 2:
            full = codec.encode_full(
                FullRecord(version=2, state=Notes(topic="stale"), consumed=[], ts=9.0)
            )
        await store.commit(
            CommitRequest(
                thread_id="t", expected_version=version - 1, epoch=epoch, step=step, full=full
            )
        )
    with pytest.raises(SnapshotCorruptError, match="does not belong"):
        await load_version(store, codec, "t", 2)


async def test_the_benchmark_workload_runs_at_a_tiny_size() -> None:
    from benchmarks import _timetravel
    from benchmarks._common import remove_temp_dirs

    try:
        results = await _timetravel.run("sqlite", 50, 1)
    finally:
        remove_temp_dirs()
    assert [r["shape"] for r in results] == ["growing", "trimmed"]
    for r in results:
        assert r["steps"] >= 50 and r["steps_bytes"] > 0 and r["full_bytes"] > 0
    headers, rows = _timetravel.table(results)
    assert len(rows) == 2 and all(len(row) == len(headers) for row in rows)
