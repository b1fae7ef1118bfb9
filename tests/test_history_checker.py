"""The history checker convicts crafted bad histories and acquits good ones.

Each bad history breaks exactly one rule; the test pins the verdict it must
get (and that no other verdict fires), so a checker that misses a rule or
sees violations that are not there fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from threadline import HumanMessage, Interrupt, StepInfo
from threadline.runtime import ActorSystem

from ._faults import make_agent
from ._history import (
    VERDICTS,
    History,
    check,
    decode_histories,
    encode_histories,
    read_histories,
    recorded_ask,
)


def step(
    version: int,
    kind: str,
    message: str | None = None,
    next: str | None = None,
    *,
    consumed: str | None = None,
    model_calls: int = 0,
    tool_calls: int = 0,
) -> StepInfo:
    turn = None
    if next is not None:
        turn = {
            "message_id": message,
            "next": next,
            "model_calls": model_calls,
            "tool_calls": tool_calls,
        }
    return msgspec.convert(
        {
            "version": version,
            "kind": kind,
            "updates": [],
            "ts": 0.0,
            "turn": turn,
            "consumed": consumed,
        },
        StepInfo,
    )


def turn(start: int, message: str, *, tools: bool = False) -> list[StepInfo]:
    """A finished turn from version ``start``: input, model[, tools, model]."""
    steps = [step(start, "input", message, "model", consumed=message)]
    if tools:
        steps += [
            step(start + 1, "model", message, "tools", model_calls=1),
            step(start + 2, "tools", message, "model", model_calls=1, tool_calls=1),
            step(start + 3, "model"),
        ]
    else:
        steps.append(step(start + 1, "model"))
    return steps


def renumber(steps: list[StepInfo], start: int = 1) -> list[StepInfo]:
    return [msgspec.structs.replace(s, version=start + i) for i, s in enumerate(steps)]


def asked(history: History, thread: str, message: str, version: int | None, **kw: Any) -> None:
    """A sequential ask: its send, then its reply (``version``) or, with None, an error."""
    history.record("send", "client", thread, message)
    if version is None:
        history.record("error", "client", thread, message, error="StoreUnavailableError")
    else:
        history.record("reply", "client", thread, message, version=version, **kw)


def verdicts(report: Any) -> dict[str, int]:
    return {kind: n for kind, n in report.counts().items() if n}


def good() -> tuple[History, dict[str, list[StepInfo]]]:
    """m1 (plain), m2 (tools), m3 (plain): versions 1-2, 3-6, 7-8."""
    h = History()
    asked(h, "t", "m1", 2)
    asked(h, "t", "m2", 6)
    asked(h, "t", "m3", 8)
    return h, {"t": turn(1, "m1") + turn(3, "m2", tools=True) + turn(7, "m3")}


def test_a_good_history_passes() -> None:
    h, histories = good()
    report = check(h.ops, histories)
    assert report.ok, report.summary()
    assert (report.threads, report.steps, report.inputs) == (1, 8, 3)
    assert (report.sent, report.acknowledged, report.errors) == (3, 3, 0)
    report.assert_ok()


def test_lost_an_acknowledged_message() -> None:
    h, histories = good()
    histories["t"] = histories["t"][:6]  # m3's turn never committed
    report = check(h.ops, histories)
    lost = [v for v in report.violations if v.kind == "lost"]
    assert [v.message_id for v in lost] == ["m3"]
    # Its reply also claimed a version the history does not hold.
    assert verdicts(report) == {"lost": 1, "unbacked": 1}
    with pytest.raises(AssertionError, match="lost: thread 't' message 'm3'"):
        report.assert_ok()


def test_lost_a_returned_tell_only_when_tells_acknowledge() -> None:
    h, histories = good()
    h.record("send", "client", "t", "m4", how="tell")
    h.record("ack", "client", "t", "m4", how="tell")
    assert verdicts(check(h.ops, histories)) == {"lost": 1}
    assert check(h.ops, histories, tells_acknowledge=False).ok


def test_lost_on_a_thread_with_no_history_at_all() -> None:
    h = History()
    asked(h, "other", "x1", 2)
    report = check(h.ops, {})
    assert verdicts(report) == {"lost": 1, "unbacked": 1}


def test_duplicated_message() -> None:
    h, histories = good()
    # m2 applied again after m3 (say, a retry whose first attempt had landed).
    histories["t"] = renumber(histories["t"] + turn(9, "m2", tools=True))
    report = check(h.ops, histories)
    assert verdicts(report) == {"duplicated": 1}
    (v,) = report.violations
    assert v.message_id == "m2" and "versions 3 and 9" in v.detail


def test_reordered_messages_of_one_sender() -> None:
    h = History()
    asked(h, "t", "m1", 4)  # acknowledged before m2 was sent...
    asked(h, "t", "m2", 2)
    histories = {"t": turn(1, "m2") + turn(3, "m1")}  # ...yet applied after it
    report = check(h.ops, histories)
    assert verdicts(report) == {"reordered": 1}
    (v,) = report.violations
    assert v.message_id == "m2" and "'m1'" in v.detail


def test_no_order_between_unacknowledged_or_other_senders_messages() -> None:
    # m1 failed (outcome unknown), the sender moved on to m2, then retried m1:
    # m1 may land before or after m2.
    h = History()
    asked(h, "t", "m1", None)
    asked(h, "t", "m2", 2)
    asked(h, "t", "m1", 4)
    assert check(h.ops, {"t": turn(1, "m2") + turn(3, "m1")}).ok
    assert check(h.ops, {"t": turn(1, "m1") + turn(3, "m2")}).ok is False  # m2's reply said 2
    # Two senders: no order between them.
    h = History()
    h.record("send", "a", "t", "a1")
    h.record("reply", "a", "t", "a1", version=4)
    h.record("send", "b", "t", "b1")
    h.record("reply", "b", "t", "b1", version=2)
    assert check(h.ops, {"t": turn(1, "b1") + turn(3, "a1")}).ok


def test_forked_same_version_twice() -> None:
    h, histories = good()
    steps = histories["t"]
    # Two writers both committed a version 2 for m1's turn.
    histories["t"] = [steps[0], steps[1], step(2, "model"), *steps[2:]]
    report = check(h.ops, histories)
    # The second version 2 is a fork twice over: a repeated version, and a
    # model step after the turn had ended.
    assert verdicts(report) == {"forked": 2}
    assert "version 2 appears again" in report.violations[0].detail
    assert "with no turn in flight" in report.violations[1].detail


def test_forked_input_while_a_turn_is_unfinished() -> None:
    h = History()
    asked(h, "t", "m1", None)
    asked(h, "t", "m2", None)
    # m2's input interleaved into m1's unfinished turn.
    steps = [
        step(1, "input", "m1", "model", consumed="m1"),
        step(2, "input", "m2", "model", consumed="m2"),
        step(3, "model"),
    ]
    report = check(h.ops, {"t": steps})
    assert verdicts(report) == {"forked": 1}
    assert "starts a turn while the turn of message 'm1'" in report.violations[0].detail


def test_forked_step_of_another_messages_turn() -> None:
    h, histories = good()
    steps = histories["t"]
    # m2's tools step hands the turn over to a message that is not in flight.
    steps[4] = step(5, "tools", "m9", "model", model_calls=1, tool_calls=1)
    report = check(h.ops, histories)
    assert verdicts(report) == {"forked": 1}
    assert "continues message 'm9'" in report.violations[0].detail


def test_forked_step_other_than_the_cursors_next() -> None:
    h, histories = good()
    steps = histories["t"]
    # m2's input said "model" next, but a "tools" step came (then the turn goes on).
    steps[3] = step(4, "tools", "m2", "tools", model_calls=1)
    report = check(h.ops, histories)
    assert verdicts(report) == {"forked": 1}
    assert "'tools' step 4 where the turn of message 'm2' is in flight (next 'model')" in str(
        report.violations[0]
    )


def test_forked_step_without_a_turn_and_counters_going_back() -> None:
    h, histories = good()
    steps = histories["t"]
    steps.insert(2, step(3, "model"))  # a model step after m1's turn had ended
    histories["t"] = renumber(steps)
    report = check(h.ops, histories)
    assert verdicts(report)["forked"] == 1
    assert "with no turn in flight" in str(report.violations[0])

    h, histories = good()
    steps = histories["t"]
    steps[4] = step(5, "tools", "m2", "model", model_calls=0, tool_calls=1)
    assert verdicts(check(h.ops, histories)) == {"forked": 1}


def test_skipped_versions() -> None:
    h, histories = good()
    steps = histories["t"]
    histories["t"] = steps[:3] + steps[4:]  # version 4 missing
    report = check(h.ops, histories)
    assert report.count("skipped") == 1
    assert "versions 4..4 are missing" in str(report)
    # (dropping the step also breaks m2's cursor chain: the checker says so)
    assert set(verdicts(report)) <= {"skipped", "forked"}

    h, histories = good()
    histories["t"] = renumber(histories["t"], start=3)  # versions 1 and 2 never written
    report = check(h.ops, histories)
    assert report.count("skipped") == 1 and "versions 1..2 are missing" in str(report)


def test_unbacked_reply() -> None:
    h = History()
    asked(h, "t", "m1", 3)  # version 3 is mid-turn: not the state after the turn
    report = check(h.ops, {"t": turn(1, "m1", tools=True)})
    assert verdicts(report) == {"unbacked": 1}
    assert "does not end a turn" in str(report)

    h = History()
    asked(h, "t", "m1", 2)
    asked(h, "t", "m2", 2)  # m2's reply reports m1's turn
    report = check(h.ops, {"t": turn(1, "m1") + turn(3, "m2")})
    assert verdicts(report) == {"unbacked": 1}
    assert "before its input step (version 3)" in str(report)

    h = History()
    asked(h, "t", "m1", 4)  # m1's reply reports the end of m2's turn
    asked(h, "t", "m2", 4)
    report = check(h.ops, {"t": turn(1, "m1") + turn(3, "m2")})
    assert verdicts(report) == {"unbacked": 1}
    assert "in the turn of 'm2'" in str(report)


def test_duplicate_reply_and_unknown_outcomes_are_fine() -> None:
    h = History()
    asked(h, "t", "m1", None)  # lost reply: it did land
    asked(h, "t", "m1", 2, duplicate=True)  # the retry is told it is a duplicate
    asked(h, "t", "m2", None)  # never landed, never acknowledged
    assert check(h.ops, {"t": turn(1, "m1")}).ok


def test_phantom_message() -> None:
    h, histories = good()
    histories["t"] = histories["t"] + turn(9, "zz")
    report = check(h.ops, histories)
    assert verdicts(report) == {"phantom": 1}
    assert check(h.ops, histories, phantoms=False).ok


def test_history_file_round_trip_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    with History(path) as h:
        asked(h, "t", "m1", 2)
        asked(h, "t", "m2", 4)
    with path.open("ab") as f:
        f.write(b'{"op":"send","thr')  # SIGKILL in the middle of a record
    ops = History.load(path, tmp_path / "absent.jsonl")
    assert ops == h.ops
    # The next process appending to the file first cuts the torn record off.
    with History(path) as again:
        asked(again, "t", "m3", 6)
    assert History.load(path) == h.ops + again.ops
    path.write_bytes(b'{"op":"se\n' + path.read_bytes())
    with pytest.raises(msgspec.DecodeError):
        History.load(path)
    histories = {"t": turn(1, "m1") + turn(3, "m2")}
    assert decode_histories(encode_histories(histories)) == histories


pytestmark = pytest.mark.anyio


async def test_real_history_passes_and_each_mutation_is_convicted(tmp_path: Path) -> None:
    h = History()
    async with ActorSystem(make_agent(), snapshots=tmp_path / "t.db") as system:
        for i in range(4):
            text = f"tool {i}" if i % 2 else f"say {i}"
            await recorded_ask(h, system, "client", "t", text, f"m{i}")
        histories = await read_histories(system, ["t"])
    steps = histories["t"]
    assert [s.kind for s in steps[:6]] == ["input", "model", "input", "model", "tools", "model"]
    report = check(h.ops, histories)
    assert report.ok, report.summary()
    assert report.inputs == 4 and report.steps == 12

    def judged(mutated: list[StepInfo]) -> set[str]:
        return set(verdicts(check(h.ops, {"t": mutated})))

    assert judged(steps[:8]) == {"lost", "unbacked"}  # the last turn vanished
    assert "duplicated" in judged(renumber(steps + steps[2:4]))
    assert "forked" in judged([*steps[:3], steps[3], *steps[3:]])
    assert "skipped" in judged(steps[:4] + steps[5:])
    swapped = renumber(steps[6:] + steps[:6])
    assert "reordered" in judged(swapped)
    assert set(VERDICTS) >= judged(swapped)
    # the history's messages really are the ones sent
    human = [u for s in steps if s.kind == "input" for u in s.updates]
    assert all(isinstance(u["messages"][0], HumanMessage) for u in human)


def test_a_resume_step_keeps_the_turn_where_it_was() -> None:
    h = History()
    asked(h, "t", "m1", 3)
    resumed = [
        step(1, "input", "m1", "model", consumed="m1"),
        step(2, "resumed", "m1", "model"),
        step(3, "model"),
    ]
    assert check(h.ops, {"t": resumed}).ok
    resumed[1] = step(2, "resumed", "m1", "tools")  # a resume that skipped the model step
    report = check(h.ops, {"t": resumed})
    # The resume, and the model step where the moved cursor said "tools".
    assert verdicts(report) == {"forked": 2}
    assert "resumed step 2 moved the turn" in report.violations[0].detail


def parked(step_info: StepInfo, *, interrupts: bool = True, resumed: bool = False) -> StepInfo:
    """``step_info`` with its cursor holding a pending interrupt (or its answer)."""
    assert step_info.turn is not None
    turn = step_info.turn
    if interrupts:
        turn = msgspec.structs.replace(
            turn, interrupts=(Interrupt(id="c:0", value="ok?", tool_call_id="c"),)
        )
    if resumed:
        turn = msgspec.structs.replace(turn, resumed={"c:0": "yes"})
    return msgspec.structs.replace(step_info, turn=turn)


def interrupted_turn() -> list[StepInfo]:
    """m1 parks on an interrupt at version 3; r1 answers it at version 4."""
    return [
        step(1, "input", "m1", "model", consumed="m1"),
        step(2, "model", "m1", "tools", model_calls=1),
        parked(step(3, "tools", "m1", "tools", model_calls=1)),
        parked(
            step(4, "answer", "m1", "tools", model_calls=1, consumed="r1"),
            interrupts=False,
            resumed=True,
        ),
        step(5, "tools", "m1", "model", model_calls=1, tool_calls=1),
        step(6, "model"),
    ]


def test_an_answered_interrupt_passes_and_its_replies_are_backed() -> None:
    h = History()
    asked(h, "t", "m1", 3)  # the reply that carried the interrupt
    asked(h, "t", "r1", 6)  # the resume's reply: the end of the turn
    report = check(h.ops, {"t": interrupted_turn()})
    assert report.ok, report.summary()
    assert report.inputs == 2  # the answer consumed its message id
    # An answer that is lost is lost like any acknowledged message.
    lost = [s for s in interrupted_turn() if s.kind != "answer"]
    assert verdicts(check(h.ops, {"t": renumber(lost)})).get("lost") == 1


def test_forked_a_step_of_a_parked_turn_before_its_answer() -> None:
    steps = interrupted_turn()
    del steps[3]  # the tools step ran again with nobody answering
    report = check([], {"t": renumber(steps)}, phantoms=False)
    assert verdicts(report) == {"forked": 1}
    assert "waited on interrupts" in report.violations[0].detail


def test_forked_an_answer_with_nothing_pending() -> None:
    steps = interrupted_turn()
    steps[2] = step(3, "tools", "m1", "tools", model_calls=1)  # it did not park
    report = check([], {"t": steps}, phantoms=False)
    assert verdicts(report) == {"forked": 1}
    assert "nothing pending" in report.violations[0].detail
