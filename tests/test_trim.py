"""Token counting, trim_messages, safe cuts and group-preserving removals."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadline.actors import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    InvalidUpdateError,
    RemoveMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
    add_messages,
)
from threadline.runtime import (
    ScriptedModel,
    SummarizationMiddleware,
    count_tokens_approximately,
    remove_messages,
    safe_cut,
    trim_messages,
)

# -- helpers shared with the property tests -----------------------------------------------


def assert_valid_history(messages: Sequence[AnyMessage]) -> None:
    """Every AIMessage with tool calls is directly followed by exactly one
    ToolMessage per call, and every ToolMessage is part of such a block."""
    i = 0
    while i < len(messages):
        m = messages[i]
        if isinstance(m, ToolMessage):
            raise AssertionError(f"orphan ToolMessage {m.id} at {i}: {[x.id for x in messages]}")
        if isinstance(m, AIMessage) and m.tool_calls:
            k = len(m.tool_calls)
            answers = messages[i + 1 : i + 1 + k]
            assert len(answers) == k, f"AIMessage {m.id} lost tool messages"
            assert all(isinstance(a, ToolMessage) for a in answers), f"group of {m.id} broken"
            assert sorted(a.tool_call_id for a in answers) == sorted(  # type: ignore[union-attr]
                c.id for c in m.tool_calls
            )
            i += 1 + k
            continue
        i += 1


def ids(messages: Sequence[AnyMessage]) -> list[str]:
    return [m.id for m in messages]


_text = st.text(alphabet="abc xyz\n", max_size=40)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[AnyMessage], list[list[AnyMessage]]]:
    """A valid history and its blocks (a message, or an AI message with its tool results)."""
    counter = iter(range(10_000))

    def nid(prefix: str) -> str:
        return f"{prefix}{next(counter)}"

    blocks: list[list[AnyMessage]] = []
    if draw(st.booleans()):
        blocks.append([SystemMessage(draw(_text), id=nid("s"))])
    for kind in draw(st.lists(st.sampled_from(["human", "ai", "tools"]), max_size=14)):
        if kind == "human":
            blocks.append([HumanMessage(draw(_text), id=nid("h"))])
        elif kind == "ai":
            blocks.append([AIMessage(draw(_text), id=nid("a"))])
        else:
            n = draw(st.integers(1, 3))
            calls = [
                ToolCall(id=nid("c"), name=draw(st.sampled_from(["search", "calc"])), args={})
                for _ in range(n)
            ]
            block: list[AnyMessage] = [AIMessage(draw(_text), id=nid("a"), tool_calls=calls)]
            block += [ToolMessage(draw(_text), id=nid("t"), tool_call_id=c.id) for c in calls]
            blocks.append(block)
    return [m for b in blocks for m in b], blocks


def tokens(messages: Sequence[AnyMessage]) -> int:
    return count_tokens_approximately(list(messages))


# -- count_tokens_approximately ---------------------------------------------------------


def test_count_tokens_per_message_formula() -> None:
    # content 8 chars + role "user" 4 -> ceil(12 / 4) = 3, + 3 per message
    assert count_tokens_approximately([HumanMessage("abcdefgh")]) == 6
    # role "assistant" (9) + content 3 -> ceil(12/4) = 3 + 3
    assert count_tokens_approximately([AIMessage("abc")]) == 6
    # name counted: "user" + "x" + "bobby" = 10 chars -> 3 + 3; without the name 5 -> 2 + 3
    assert count_tokens_approximately([HumanMessage("x", name="bobby")]) == 6
    assert count_tokens_approximately([HumanMessage("x", name="bobby")], count_name=False) == 5
    assert count_tokens_approximately([], extra_tokens_per_message=10) == 0
    assert count_tokens_approximately([HumanMessage("abcdefgh")], chars_per_token=1.0) == 15


def test_count_tokens_includes_tool_calls_and_tool_call_ids() -> None:
    plain = AIMessage("")
    call = ToolCall(id="call_1", name="search", args={"query": "x" * 100})
    with_call = AIMessage("", tool_calls=[call])
    assert tokens([with_call]) - tokens([plain]) >= 100 / 4
    short = ToolMessage("r", tool_call_id="c")
    long = ToolMessage("r", tool_call_id="c" * 40)
    assert tokens([long]) - tokens([short]) == 10


def test_count_tokens_rejects_bad_ratio() -> None:
    with pytest.raises(ValueError, match="chars_per_token"):
        count_tokens_approximately([HumanMessage("x")], chars_per_token=0)


@given(histories())
def test_count_tokens_is_additive(history: tuple[list[AnyMessage], list[list[AnyMessage]]]) -> None:
    messages, _ = history
    assert tokens(messages) == sum(tokens([m]) for m in messages)


# -- trim_messages: LangChain semantics -----------------------------------------------


def _conversation() -> list[AnyMessage]:
    return [
        SystemMessage("you're a good assistant, you always respond with a joke.", id="s"),
        HumanMessage("i wonder why it's called langchain", id="h1"),
        AIMessage('Well, I guess they thought "WordRope" sounded too long', id="a1"),
        HumanMessage("and who is harrison chasing anyways", id="h2"),
        AIMessage(
            "Hmmm let me think.\n\nWhy, he's probably chasing the last cup of coffee!", id="a2"
        ),
        HumanMessage("what do you call a speechless parrot", id="h3"),
    ]


def count_messages(messages: list[AnyMessage]) -> int:
    return len(messages)


def test_last_with_message_counter_start_on_human_and_system() -> None:
    msgs = _conversation()
    out = trim_messages(
        msgs,
        max_tokens=4,
        token_counter=count_messages,
        strategy="last",
        start_on="human",
        include_system=True,
    )
    assert ids(out) == ["s", "h2", "a2", "h3"]
    out = trim_messages(msgs, max_tokens=3, token_counter=count_messages)
    assert ids(out) == ["h2", "a2", "h3"]
    # the last two are [a2, h3]; start_on="human" drops a2
    out = trim_messages(msgs, max_tokens=2, token_counter=count_messages, start_on="human")
    assert ids(out) == ["h3"]
    out = trim_messages(msgs, max_tokens=2, token_counter=count_messages)
    assert ids(out) == ["a2", "h3"]
    out = trim_messages(
        msgs, max_tokens=3, token_counter=count_messages, start_on="human", include_system=True
    )
    assert ids(out) == ["s", "h3"]


def test_first_strategy_and_end_on() -> None:
    msgs = _conversation()
    out = trim_messages(msgs, max_tokens=3, token_counter=count_messages, strategy="first")
    assert ids(out) == ["s", "h1", "a1"]
    out = trim_messages(
        msgs, max_tokens=3, token_counter=count_messages, strategy="first", end_on="human"
    )
    assert ids(out) == ["s", "h1"]
    out = trim_messages(
        msgs, max_tokens=5, token_counter=count_messages, strategy="first", end_on=[AIMessage]
    )
    assert ids(out) == ["s", "h1", "a1", "h2", "a2"]


def test_last_end_on_drops_trailing_messages_first() -> None:
    msgs = _conversation()
    out = trim_messages(msgs, max_tokens=2, token_counter=count_messages, end_on="ai")
    assert ids(out) == ["h2", "a2"]


def test_everything_fits_returns_everything() -> None:
    msgs = _conversation()
    assert trim_messages(msgs, max_tokens=10_000) == msgs
    assert trim_messages(msgs, max_tokens=10_000, strategy="first") == msgs
    assert trim_messages([], max_tokens=0) == []


def test_budget_is_respected_with_the_default_counter() -> None:
    msgs = _conversation()
    for budget in range(0, tokens(msgs) + 5):
        out = trim_messages(msgs, max_tokens=budget)
        assert tokens(out) <= budget
        assert out == msgs[len(msgs) - len(out) :]  # a suffix
        if len(out) < len(msgs):  # the next older message would not have fit
            assert tokens(msgs[len(msgs) - len(out) - 1 :]) > budget


def test_include_system_keeps_system_even_if_over_budget() -> None:
    msgs = _conversation()
    out = trim_messages(msgs, max_tokens=0, include_system=True)
    assert ids(out) == ["s"]


def test_allow_partial_last_keeps_the_end_of_the_boundary_message() -> None:
    msgs: list[AnyMessage] = [
        HumanMessage("line one\nline two\nline three", id="h"),
        AIMessage("ok", id="a"),
    ]
    budget = tokens([HumanMessage("line three"), msgs[1]])
    out = trim_messages(msgs, max_tokens=budget, allow_partial=True)
    assert [m.content for m in out] == ["line three", "ok"]
    assert out[0].id == "h"
    budget = tokens([HumanMessage("line two\nline three"), msgs[1]])
    out = trim_messages(msgs, max_tokens=budget, allow_partial=True)
    assert [m.content for m in out] == ["line two\nline three", "ok"]
    # without allow_partial the human message is dropped whole
    assert ids(trim_messages(msgs, max_tokens=budget)) == ["a"]


def test_allow_partial_first_keeps_the_start_and_custom_splitter() -> None:
    msgs: list[AnyMessage] = [AIMessage("ok", id="a"), HumanMessage("one two three four", id="h")]
    budget = tokens([msgs[0], HumanMessage("one two ")])

    def words(text: str) -> list[str]:
        parts = text.split(" ")
        return [p + " " for p in parts[:-1]] + parts[-1:]

    out = trim_messages(
        msgs, max_tokens=budget, strategy="first", allow_partial=True, text_splitter=words
    )
    assert [m.content for m in out] == ["ok", "one two "]

    class Splitter:
        def split_text(self, text: str) -> list[str]:
            return words(text)

    out = trim_messages(
        msgs, max_tokens=budget, strategy="first", allow_partial=True, text_splitter=Splitter()
    )
    assert [m.content for m in out] == ["ok", "one two "]


def test_validation_errors() -> None:
    msgs = _conversation()
    with pytest.raises(ValueError, match="start_on"):
        trim_messages(msgs, max_tokens=10, strategy="first", start_on="human")
    with pytest.raises(ValueError, match="include_system"):
        trim_messages(msgs, max_tokens=10, strategy="first", include_system=True)
    with pytest.raises(ValueError, match="strategy"):
        trim_messages(msgs, max_tokens=10, strategy="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tokens"):
        trim_messages(msgs, max_tokens=-1)
    with pytest.raises(ValueError, match="unknown message type"):
        trim_messages(msgs, max_tokens=10, start_on="person")
    with pytest.raises(TypeError):
        trim_messages(msgs, max_tokens=10, start_on=int)  # type: ignore[arg-type]


# -- trim_messages: tool-call groups ---------------------------------------------------


def _tool_history() -> list[AnyMessage]:
    calls = [ToolCall(id="c1", name="search", args={}), ToolCall(id="c2", name="calc", args={})]
    return [
        HumanMessage("q", id="h1"),
        AIMessage("", id="a1", tool_calls=calls),
        ToolMessage("r1", id="t1", tool_call_id="c1"),
        ToolMessage("r2", id="t2", tool_call_id="c2"),
        AIMessage("answer", id="a2"),
    ]


def test_last_never_keeps_tool_messages_without_their_ai_message() -> None:
    msgs = _tool_history()
    # room for 3 messages: a plain slice would keep [t1?] t2, a2 -- orphans
    out = trim_messages(msgs, max_tokens=3, token_counter=count_messages)
    assert ids(out) == ["a2"]
    out = trim_messages(msgs, max_tokens=4, token_counter=count_messages)
    assert ids(out) == ["a1", "t1", "t2", "a2"]


def test_first_never_keeps_an_ai_message_without_all_its_results() -> None:
    msgs = _tool_history()
    out = trim_messages(msgs, max_tokens=3, token_counter=count_messages, strategy="first")
    assert ids(out) == ["h1"]
    out = trim_messages(
        msgs, max_tokens=4, token_counter=count_messages, strategy="first", end_on="ai"
    )
    assert ids(out) == []  # a1 cannot be the end without its results; nothing else is an AI
    out = trim_messages(msgs, max_tokens=4, token_counter=count_messages, strategy="first")
    assert ids(out) == ["h1", "a1", "t1", "t2"]


def test_allow_partial_never_splits_a_tool_group() -> None:
    msgs = _tool_history()
    out = trim_messages(msgs, max_tokens=tokens(msgs[-2:]), allow_partial=True)
    assert ids(out) == ["a2"]


def test_incomplete_groups_and_orphans_in_the_input_are_dropped() -> None:
    msgs = _tool_history()
    orphan_first = [msgs[3], *msgs[4:]]  # t2 without a1
    assert ids(trim_messages(orphan_first, max_tokens=1000)) == ["a2"]
    missing_answer = [m for m in msgs if m.id != "t2"]
    assert ids(trim_messages(missing_answer, max_tokens=1000)) == ["h1", "a2"]


# -- safe_cut and remove_messages ------------------------------------------------------


def test_safe_cut_moves_before_a_group() -> None:
    msgs = _tool_history()
    assert [safe_cut(msgs, i) for i in range(6)] == [0, 1, 1, 1, 4, 5]
    assert safe_cut(msgs, 99) == 5
    assert safe_cut(msgs, -3) == 0


def test_remove_messages_widens_to_whole_groups() -> None:
    msgs = _tool_history()
    removals = remove_messages(msgs, ["t2"])
    assert removals == [RemoveMessage(id="a1"), RemoveMessage(id="t1"), RemoveMessage(id="t2")]
    assert ids(add_messages(msgs, removals)) == ["h1", "a2"]
    assert remove_messages(msgs, ["a1"]) == removals
    assert remove_messages(msgs, ["h1"]) == [RemoveMessage(id="h1")]
    with pytest.raises(InvalidUpdateError):
        remove_messages(msgs, ["nope"])


# -- properties over random valid histories ----------------------------------------------


def _reference_last(
    blocks: list[list[AnyMessage]], budget: int, include_system: bool, start_on_human: bool
) -> list[AnyMessage]:
    head: list[AnyMessage] = []
    rest = list(blocks)
    if include_system and rest and isinstance(rest[0][0], SystemMessage):
        head = rest.pop(0)
    kept: list[list[AnyMessage]] = []
    for block in reversed(rest):
        if tokens(head) + tokens([m for b in [block, *kept] for m in b]) > budget:
            break
        kept.insert(0, block)
    if start_on_human:
        while kept and not isinstance(kept[0][0], HumanMessage):
            kept.pop(0)
    return head + [m for b in kept for m in b]


def _reference_first(blocks: list[list[AnyMessage]], budget: int) -> list[AnyMessage]:
    kept: list[AnyMessage] = []
    for block in blocks:
        if tokens(kept + block) > budget:
            break
        kept += block
    return kept


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    histories(),
    st.integers(0, 400),
    st.booleans(),
    st.booleans(),
)
def test_trim_last_matches_reference_and_stays_valid(
    history: tuple[list[AnyMessage], list[list[AnyMessage]]],
    budget: int,
    include_system: bool,
    start_on_human: bool,
) -> None:
    messages, blocks = history
    out = trim_messages(
        messages,
        max_tokens=budget,
        include_system=include_system,
        start_on="human" if start_on_human else None,
    )
    assert_valid_history(out)
    assert ids(out) == ids(_reference_last(blocks, budget, include_system, start_on_human))
    body = out[1:] if out and isinstance(out[0], SystemMessage) else out
    if start_on_human and body:
        assert isinstance(body[0], HumanMessage)
    if not (include_system and out and isinstance(out[0], SystemMessage)):
        assert tokens(out) <= budget


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.integers(0, 400))
def test_trim_first_matches_reference_and_stays_valid(
    history: tuple[list[AnyMessage], list[list[AnyMessage]]], budget: int
) -> None:
    messages, blocks = history
    out = trim_messages(messages, max_tokens=budget, strategy="first")
    assert_valid_history(out)
    assert tokens(out) <= budget
    assert ids(out) == ids(_reference_first(blocks, budget))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    histories(),
    st.integers(0, 400),
    st.sampled_from(["first", "last"]),
    st.sampled_from([None, "human", "ai", ("ai", "human")]),
)
def test_trim_with_partial_and_end_on_stays_valid(
    history: tuple[list[AnyMessage], list[list[AnyMessage]]],
    budget: int,
    strategy: str,
    end_on: str | tuple[str, ...] | None,
) -> None:
    messages, _ = history
    out = trim_messages(
        messages,
        max_tokens=budget,
        strategy=strategy,  # type: ignore[arg-type]
        allow_partial=True,
        end_on=end_on,
        start_on="human" if strategy == "last" else None,
    )
    assert_valid_history(out)
    assert tokens(out) <= budget
    originals = {m.id: m for m in messages}
    positions = [ids(messages).index(m.id) for m in out]
    assert positions == sorted(positions)  # order kept, nothing invented
    changed = [m for m in out if m != originals[m.id]]
    assert len(changed) <= 1  # at most the boundary message is partial
    for m in changed:
        original = originals[m.id].content
        assert (
            original.endswith(m.content) if strategy == "last" else original.startswith(m.content)
        )
        assert not isinstance(m, ToolMessage) and not (isinstance(m, AIMessage) and m.tool_calls)
    if end_on is not None and out:
        wanted = (end_on,) if isinstance(end_on, str) else end_on
        assert out[-1].type in wanted


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.sampled_from(["messages", "tokens"]), st.integers(1, 120))
def test_summarization_cut_point_never_splits_a_group(
    history: tuple[list[AnyMessage], list[list[AnyMessage]]], kind: str, size: int
) -> None:
    messages, blocks = history
    middleware = SummarizationMiddleware(
        ScriptedModel(["summary"]),
        trigger=("messages", 1),
        keep=(kind, size),  # type: ignore[arg-type]
    )
    head, old, kept = middleware.partition(messages)
    assert head + old + kept == messages
    assert all(isinstance(m, SystemMessage) for m in head)
    assert_valid_history(old)
    assert_valid_history(kept)
    assert_valid_history([*head, HumanMessage("summary", id="sum"), *kept])
    # the cut is at a block boundary: the latest one at or before the target
    boundaries = {0}
    for block in blocks:
        boundaries.add(max(boundaries) + len(block))
    if kind == "messages":
        target = len(messages) - size
    else:  # the earliest start whose tail fits, but always keep the last message
        fits = next(i for i in range(len(head), len(messages) + 1) if tokens(messages[i:]) <= size)
        target = min(fits, len(messages) - 1)
    expected = max(b for b in boundaries if b <= max(target, len(head)))
    if expected <= len(head):
        assert old == []
        return
    assert len(head) + len(old) == expected
    if kind == "messages":
        assert len(kept) >= size
    elif expected == target and target == fits:
        assert tokens(kept) <= size


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.data())
def test_pair_preserving_removals_keep_history_valid(
    history: tuple[list[AnyMessage], list[list[AnyMessage]]], data: st.DataObject
) -> None:
    messages, blocks = history
    chosen = data.draw(st.sets(st.sampled_from(ids(messages))) if messages else st.just(set()))
    removals = remove_messages(messages, chosen)
    after = add_messages(messages, removals)
    assert_valid_history(after)
    removed = set(ids(messages)) - set(ids(after))
    assert removed == {r.id for r in removals}
    assert chosen <= removed
    for block in blocks:  # a block goes whole, and only if one of its messages was chosen
        block_ids = set(ids(block))
        assert block_ids <= removed or not (block_ids & removed)
        assert bool(block_ids & removed) == bool(block_ids & chosen)
    # a summarization-style rewrite (remove all, re-add the kept tail) stays valid too
    if messages:
        cut = safe_cut(messages, data.draw(st.integers(0, len(messages))))
        rewritten = add_messages(
            messages,
            [RemoveMessage(id="__remove_all__"), HumanMessage("summary", id="s!"), *messages[cut:]],
        )
        assert_valid_history(rewritten)
        assert len(rewritten) == 1 + len(messages) - cut
