"""Messages, coercion at the door, the add_messages reducer and state updates."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadline.actors import (
    REMOVE_ALL_MESSAGES,
    AgentState,
    AIMessage,
    HumanMessage,
    InvalidMessageError,
    InvalidUpdateError,
    MessageLike,
    RemoveMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
    add_messages,
    apply_update,
    coerce_message,
    coerce_messages,
    normalize_update,
    to_openai,
)
from threadline.actors._state import merge_updates


def test_plain_string_becomes_human_message() -> None:
    message = coerce_message("hello")
    assert isinstance(message, HumanMessage)
    assert message.content == "hello"


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        ({"role": "user", "content": "a"}, HumanMessage),
        ({"role": "system", "content": "a"}, SystemMessage),
        ({"role": "assistant", "content": "a"}, AIMessage),
        ({"role": "tool", "content": "a", "tool_call_id": "c1"}, ToolMessage),
    ],
)
def test_openai_dicts(data: dict[str, Any], cls: type) -> None:
    message = coerce_message(data)
    assert type(message) is cls
    assert message.content == "a"


def test_openai_tool_calls_round_trip() -> None:
    data = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
        ],
    }
    message = coerce_message(data)
    assert isinstance(message, AIMessage)
    assert message.tool_calls == [ToolCall(id="c1", name="f", args={"x": 1})]
    assert message.tool_calls[0]["args"] == {"x": 1}
    assert to_openai(message)["tool_calls"][0]["function"]["arguments"] == '{"x":1}'
    assert coerce_message(to_openai(message)) == message


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (42, "got int"),
        ({"content": "no role"}, "'role'"),
        ({"role": "wizard", "content": "x"}, "'wizard'"),
        ({"role": "user", "content": 3}, "'content' must be a string"),
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        (
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}],
            },
            "not valid JSON",
        ),
        (None, "got NoneType"),
    ],
)
def test_bad_messages_raise_typed_errors(bad: object, needle: str) -> None:
    with pytest.raises(InvalidMessageError, match=needle):
        coerce_message(bad)


def test_ids_are_assigned_on_entry_and_kept() -> None:
    fresh, kept = coerce_messages(["a", HumanMessage("b", id="mine")])
    assert fresh.id and fresh.id != "mine"
    assert kept.id == "mine"


def test_messages_are_tagged_and_round_trip_msgpack() -> None:
    messages = coerce_messages(
        ["hi", AIMessage("x", tool_calls=[ToolCall(id="1", name="f", args={"a": [1]})])]
    )
    raw = msgspec.msgpack.encode(messages)
    assert msgspec.msgpack.decode(raw, type=list[HumanMessage | AIMessage]) == messages


def _ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def test_add_messages_appends_and_replaces_by_id() -> None:
    left = coerce_messages(["a", "b"])
    replacement = HumanMessage("B!", id=left[1].id)
    merged = add_messages(left, [replacement, *coerce_messages(["c"])])
    assert [m.content for m in merged] == ["a", "B!", "c"]
    assert merged[1].id == left[1].id


def test_add_messages_removes_by_id() -> None:
    left = coerce_messages(["a", "b", "c"])
    merged = add_messages(left, [RemoveMessage(id=left[0].id), RemoveMessage(id=left[2].id)])
    assert _ids(merged) == [left[1].id]


def test_removing_an_unknown_id_is_an_error() -> None:
    left = coerce_messages(["a"])
    with pytest.raises(InvalidUpdateError, match="nope"):
        add_messages(left, [RemoveMessage(id="nope")])


def test_remove_all_replaces_everything_before_it() -> None:
    left = coerce_messages(["a", "b", "c"])
    kept = coerce_messages(["x", "y"])
    merged = add_messages(
        left, [*coerce_messages(["lost"]), RemoveMessage(id=REMOVE_ALL_MESSAGES), *kept]
    )
    assert merged == kept
    assert add_messages(left, [RemoveMessage(id=REMOVE_ALL_MESSAGES)]) == []


def test_remove_then_re_add_same_id_in_one_update() -> None:
    left = coerce_messages(["a", "b"])
    again = HumanMessage("b again", id=left[1].id)
    merged = add_messages(left, [RemoveMessage(id=left[1].id), again])
    assert [m.content for m in merged] == ["a", "b again"]


class Profile(AgentState):
    user_id: str
    preferences: dict[str, str] = {}
    visits: int = 0


def test_state_reads_by_attribute_and_key() -> None:
    state = Profile(user_id="u1")
    assert state["user_id"] == "u1" == state.user_id
    assert state.get("nope", 3) == 3
    assert "messages" in state
    with pytest.raises(KeyError):
        state["nope"]


def test_updates_are_validated_against_the_schema() -> None:
    with pytest.raises(InvalidUpdateError, match="unknown state key 'nope'"):
        normalize_update(Profile, {"nope": 1})
    with pytest.raises(InvalidUpdateError, match="'visits'"):
        normalize_update(Profile, {"visits": "many"})
    with pytest.raises(InvalidUpdateError, match="must be a dict"):
        normalize_update(Profile, ["messages"])


def test_other_fields_are_overwritten_and_messages_reduced() -> None:
    state = Profile(user_id="u1", preferences={"theme": "dark"})
    update = normalize_update(
        Profile, {"preferences": {"theme": "light"}, "visits": 2, "messages": "hi"}
    )
    new = apply_update(state, update)
    assert new.preferences == {"theme": "light"}
    assert new.visits == 2
    assert [m.content for m in new.messages] == ["hi"]
    assert state.visits == 0 and state.messages == []  # the old state is untouched


# -- merging updates (replay applies a whole log at once) ------------------------

_IDS = [f"m{i}" for i in range(6)]


@st.composite
def _update_sequences(draw: st.DrawFn) -> list[list[Any]]:
    """Sequences of valid messages-updates over a small id space."""
    present: list[str] = []
    sequence = []
    for _ in range(draw(st.integers(1, 6))):
        right: list[Any] = []
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["add", "replace", "remove", "remove_all"]))
            if kind == "remove" and present:
                victim = draw(st.sampled_from(present))
                present.remove(victim)
                right.append(RemoveMessage(id=victim))
            elif kind == "remove_all" and draw(st.booleans()):
                present.clear()
                right.append(RemoveMessage(id=REMOVE_ALL_MESSAGES))
            elif kind == "replace" and present:
                right.append(HumanMessage("replaced", id=draw(st.sampled_from(present))))
            else:
                new = draw(st.sampled_from(_IDS))
                if new not in present:
                    present.append(new)
                right.append(HumanMessage(f"text {new}", id=new))
        sequence.append(right)
    return sequence


@settings(max_examples=300, deadline=None)
@given(_update_sequences())
def test_merged_updates_equal_step_by_step_application(sequence: list[list[Any]]) -> None:
    state: list[Any] = []
    for right in sequence:
        state = add_messages(state, right)
    merged = merge_updates({"messages": right} for right in sequence)
    assert add_messages([], merged.get("messages", [])) == state


def test_merge_updates_last_value_wins() -> None:
    merged = merge_updates([{"visits": 1, "messages": ["a"]}, {"visits": 2}, {"messages": ["b"]}])
    assert merged["visits"] == 2
    assert merged["messages"] == ["a", "b"]


def test_same_id_twice_in_one_update_replaces() -> None:
    first, second = HumanMessage("v1", id="x"), HumanMessage("v2", id="x")
    assert add_messages([], [first, second]) == [second]


def test_long_histories_keep_their_ids_and_stay_exact() -> None:
    history: list[Any] = []
    for i in range(100):
        history = add_messages(history, coerce_messages([f"q{i}", f"a{i}"]))
    assert len(history) == 200
    branch = add_messages(history, coerce_messages(["fresh"]))
    # Replacing by id still works through the remembered ids, on either list.
    same_id = HumanMessage("edited", id=history[5].id)
    edited = add_messages(history, [same_id])
    assert len(edited) == 200 and edited[5].content == "edited"
    assert [m.content for m in add_messages(branch, [same_id])][5] == "edited"
    # A removal goes the exact way and later appends stay correct.
    trimmed = add_messages(branch, [RemoveMessage(id=history[0].id)])
    assert len(trimmed) == 200
    again = add_messages(trimmed, [HumanMessage("back", id=history[0].id)])
    assert again[-1].content == "back" and len(again) == 201
    assert history == [m for m in branch[:-1]]


def _reference_add_messages(left: list[Any], right: list[Any]) -> list[Any]:
    """LangGraph's add_messages, written plainly (no fast paths, no caches)."""
    cut = max((i for i, m in enumerate(right) if m.id == REMOVE_ALL_MESSAGES), default=-1)
    if cut >= 0:
        return [m for m in right[cut + 1 :] if not isinstance(m, RemoveMessage)]
    merged = list(left)
    for m in right:
        positions = [i for i, x in enumerate(merged) if x is not None and x.id == m.id]
        if isinstance(m, RemoveMessage):
            merged[positions[0]] = None
        elif positions:
            merged[positions[0]] = m
        else:
            merged.append(m)
    return [m for m in merged if m is not None]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_add_messages_on_long_histories_matches_the_reference(data: st.DataObject) -> None:
    base = [HumanMessage(f"m{i}", id=f"m{i}") for i in range(70)]
    ours: list[Any] = add_messages([], base)
    reference: list[Any] = list(base)
    for step in range(data.draw(st.integers(1, 8))):
        present = [m.id for m in reference]
        right: list[Any] = []
        for _ in range(data.draw(st.integers(1, 3))):
            kind = data.draw(st.sampled_from(["new", "replace", "remove"]))
            if kind == "remove" and present:
                victim = data.draw(st.sampled_from(present))
                present.remove(victim)
                right.append(RemoveMessage(id=victim))
            elif kind == "replace" and present:
                right.append(HumanMessage(f"v{step}", id=data.draw(st.sampled_from(present))))
            else:
                new = f"n{step}-{len(right)}-{data.draw(st.integers(0, 2))}"
                if new not in present:
                    present.append(new)
                right.append(HumanMessage("new", id=new))
        ours = add_messages(ours, right)
        reference = _reference_add_messages(reference, right)
        assert ours == reference


# -- nothing that cannot be read back gets in (issue 9, defects 2 and 3) ---------


def _nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def unchecked(value: object) -> Any:
    """``value``, hidden from the type checker (msgspec does not check field
    types when a message is built, so callers can send these)."""
    return value


def _call(**args: Any) -> AIMessage:
    return AIMessage("", tool_calls=[ToolCall(id="c1", name="f", args=args)])


_STORED = msgspec.msgpack.Decoder(list[MessageLike])


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (HumanMessage("hi", id=unchecked(123)), "field 'id': Expected `str`, got `int`"),
        (SystemMessage("hi", name=unchecked(5)), "field 'name'"),
        (ToolMessage("x", tool_call_id=unchecked(None)), "field 'tool_call_id'"),
        (ToolMessage("x", tool_call_id="c", status=unchecked("meh")), "field 'status'"),
        (AIMessage("x", tool_calls=unchecked(["junk"])), "field 'tool_calls\\[0\\]'"),
        (
            AIMessage("x", tool_calls=[ToolCall(id="c", name=unchecked(None))]),
            "'tool_calls\\[0\\].name'",
        ),
        (AIMessage("x", usage=unchecked({"tokens": "many"})), "field 'usage"),
        (AIMessage("x", response_metadata=unchecked({1: "x"})), "a key of 'response_metadata'"),
        (_call(x=object()), "cannot be stored: Encoding objects of type object"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "name": "f", "args": {1: 2}}]},
            "a key of 'tool_calls\\[0\\].args'",
        ),
        ("lone \ud800 surrogate", "cannot be stored"),
        (RemoveMessage(id=unchecked(7)), "field 'id'"),
        (_call(x=_nest(64)), "'tool_calls\\[0\\].args' nests deeper than 64 levels"),
        (_call(x=_nest(100_000)), "nests deeper than 64 levels"),
        (AIMessage("x", response_metadata={"x": _nest(100_000)}), "'response_metadata' nests"),
        (HumanMessage("x", name=unchecked(_nest(100_000))), "nests deeper"),
    ],
    ids=[
        "id-int",
        "name-int",
        "tool-call-id-none",
        "status-unknown",
        "tool-calls-junk",
        "tool-call-name-none",
        "usage-str",
        "metadata-int-key",
        "args-object",
        "dict-args-int-key",
        "surrogate",
        "remove-id-int",
        "args-nest-65",
        "args-nest-100k",
        "metadata-nest-100k",
        "name-nest-100k",
    ],
)
def test_messages_that_could_not_be_read_back_are_refused(bad: Any, needle: str) -> None:
    with pytest.raises(InvalidMessageError, match=needle):
        coerce_messages(bad)
    with pytest.raises(InvalidUpdateError, match=needle):
        normalize_update(AgentState, {"messages": [bad]}, source="update_state")


def test_every_accepted_message_reads_back_as_the_journal_reads_it() -> None:
    accepted = coerce_messages(
        [
            "plain",
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "name": "f"}]},
            AIMessage(
                "x",
                tool_calls=[ToolCall(id="c", name="f", args={"deep": _nest(63), "n": 2**63})],
                usage={"input_tokens": 3},
                response_metadata={"model": "m", "ids": (1, 2)},
            ),
            ToolMessage("done", tool_call_id="c", status="error"),
            SystemMessage("be brief", name="setup"),
            RemoveMessage(id="gone"),
        ]
    )
    assert len(_STORED.decode(msgspec.msgpack.encode(accepted))) == 6


def test_message_dicts_name_what_is_missing_or_unknown() -> None:
    with pytest.raises(InvalidMessageError, match="'user' message needs 'content'"):
        coerce_message({"role": "user"})
    with pytest.raises(InvalidMessageError, match="unknown key 'conten'"):
        coerce_message({"role": "user", "conten": "typo"})
    with pytest.raises(InvalidMessageError, match="'refusal' is not supported"):
        coerce_message({"role": "assistant", "content": "", "refusal": "I can't"})
    # What an OpenAI SDK message dumps with (empty extras), and an assistant
    # that only calls tools, are fine.
    sdk: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    assert coerce_message({**sdk, "tool_calls": None}) == AIMessage("")
    assert coerce_message({"role": "remove", "id": "x"}) == RemoveMessage(id="x")


class Address(msgspec.Struct):
    city: str


class Rich(AgentState):
    address: Address | None = None
    anything: Any = None
    tags: dict[str, int] = {}


@pytest.mark.parametrize(
    ("update", "needle"),
    [
        ({"address": Address(city=unchecked(5))}, "'address': Expected `str`, got `int`"),
        ({"anything": object()}, "'anything' cannot be stored"),
        ({"anything": {"x": "\ud800"}}, "'anything' cannot be stored"),
        ({"anything": 2**64}, "'anything' cannot be stored"),
        ({"anything": _nest(65)}, "'anything' nests deeper than 64 levels"),
        ({"anything": _nest(100_000)}, "'anything' nests deeper than 64 levels"),
        ({"tags": {"a": True}}, "'tags'"),
        ({"tags": {1: 1}}, "'tags'"),
    ],
    ids=[
        "struct-inner-type",
        "object",
        "surrogate",
        "int-2**64",
        "nest-65",
        "nest-100k",
        "bool-for-int",
        "int-key",
    ],
)
def test_state_values_that_could_not_be_read_back_are_refused(
    update: dict[str, Any], needle: str
) -> None:
    with pytest.raises(InvalidUpdateError, match=needle):
        normalize_update(Rich, update)


def test_state_values_at_the_nesting_limit_are_accepted() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert normalize_update(Rich, {"anything": _nest(64)}) == {"anything": _nest(64)}
    with pytest.raises(InvalidUpdateError, match="nests deeper"):
        normalize_update(Rich, {"anything": cyclic})


def test_nesting_is_measured_without_recursion() -> None:
    from threadline.actors._api import MAX_NESTING, too_deep

    assert MAX_NESTING == 64
    assert not too_deep(_nest(64)) and too_deep(_nest(65))
    assert not too_deep("x" * 10_000) and not too_deep({"a": 1}, limit=1)
    assert too_deep({"a": {"b": 1}}, limit=1)
    assert too_deep({(((),),): 1}, limit=3)  # keys count too
    assert too_deep(Address(city=unchecked(_nest(64))))
    assert too_deep(_nest(1_000_000))  # no RecursionError, however deep
