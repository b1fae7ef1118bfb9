"""Token counting and trimming that keeps a history valid for chat providers.

``trim_messages`` follows LangChain's semantics (``strategy``, ``start_on``,
``end_on``, ``include_system``, ``allow_partial``, ``text_splitter``) with one
addition: the result is always a valid provider history. An ``AIMessage`` with
tool calls and the ``ToolMessage`` answers to those calls are one unit, kept or
dropped together; a unit that is already incomplete in the input (a tool call
without an answer, an answer without its call) is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol, TypeAlias

import msgspec

from threadline.actors import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    InvalidUpdateError,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)

TokenCounter: TypeAlias = Callable[[list[AnyMessage]], int]
"""Counts the tokens of a list of messages (plug a real tokenizer in here)."""

MessageTypeSpec: TypeAlias = str | type[AnyMessage] | Sequence[str | type[AnyMessage]]
"""A message type by name (``"human"``, ``"ai"``, ``"system"``, ``"tool"``; also
``"user"``/``"assistant"``), by class, or a sequence of those."""


class _SplitsText(Protocol):
    def split_text(self, text: str) -> list[str]: ...


TextSplitter: TypeAlias = Callable[[str], list[str]] | _SplitsText

_ROLE_LENGTH = {
    SystemMessage: len("system"),
    HumanMessage: len("user"),
    AIMessage: len("assistant"),
    ToolMessage: len("tool"),
}

_TYPE_NAMES: dict[str, type[AnyMessage]] = {
    "human": HumanMessage,
    "user": HumanMessage,
    "ai": AIMessage,
    "assistant": AIMessage,
    "system": SystemMessage,
    "developer": SystemMessage,
    "tool": ToolMessage,
}

_MESSAGE_TYPES = (SystemMessage, HumanMessage, AIMessage, ToolMessage)


def count_tokens_approximately(
    messages: Iterable[AnyMessage],
    *,
    chars_per_token: float = 4.0,
    extra_tokens_per_message: float = 3.0,
    count_name: bool = True,
) -> int:
    """An estimate of the tokens of ``messages`` without a tokenizer.

    Like LangChain's: per message, the characters of its content, role, name,
    tool calls (as JSON) and tool call id, divided by ``chars_per_token`` and
    rounded up, plus ``extra_tokens_per_message``. Rounding per message makes
    the count of a list the sum of the counts of its messages.
    """
    if not chars_per_token > 0:
        raise ValueError("chars_per_token must be > 0")
    if extra_tokens_per_message < 0:
        raise ValueError("extra_tokens_per_message must be >= 0")
    total = 0.0
    for message in messages:
        chars = len(message.content) + _ROLE_LENGTH.get(type(message), len(message.type))
        if isinstance(message, AIMessage) and message.tool_calls:
            chars += len(msgspec.json.encode(message.tool_calls))
        elif isinstance(message, ToolMessage):
            chars += len(message.tool_call_id)
        if count_name and message.name:
            chars += len(message.name)
        total += math.ceil(chars / chars_per_token) + extra_tokens_per_message
    return math.ceil(total)


# -- tool-call groups ----------------------------------------------------------------


def _groups(messages: Sequence[AnyMessage]) -> tuple[dict[int, list[int]], set[int]]:
    """Tool-call groups, and the indices that cannot be in a valid history.

    Returns ``{index of an AIMessage with tool calls: [indices of its answers]}``
    and the indices of orphan ToolMessages and of every member of an
    incomplete group (a call without an answer).
    """
    owner: dict[str, int] = {}
    groups: dict[int, list[int]] = {}
    answered: dict[int, set[str]] = {}
    broken: set[int] = set()
    for i, m in enumerate(messages):
        if isinstance(m, AIMessage) and m.tool_calls:
            for call in m.tool_calls:
                owner[call.id] = i
            groups[i] = []
            answered[i] = set()
        elif isinstance(m, ToolMessage):
            a = owner.get(m.tool_call_id)
            if a is None:
                broken.add(i)
            else:
                groups[a].append(i)
                answered[a].add(m.tool_call_id)
    for a, tools in groups.items():
        ai = messages[a]
        assert isinstance(ai, AIMessage)
        if not {c.id for c in ai.tool_calls} <= answered[a]:
            broken.add(a)
            broken.update(tools)
    return groups, broken


def _spans(messages: Sequence[AnyMessage]) -> list[tuple[int, int]]:
    """``(first, last)`` index ranges a cut must not go through, merged and sorted."""
    groups, _ = _groups(messages)
    merged: list[tuple[int, int]] = []
    for start, end in sorted((a, max(tools, default=a)) for a, tools in groups.items()):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def safe_cut(messages: Sequence[AnyMessage], index: int) -> int:
    """The largest index ``<= index`` at which ``messages`` can be split in two
    without separating an AIMessage with tool calls from its ToolMessages."""
    index = max(0, min(index, len(messages)))
    for start, end in reversed(_spans(messages)):
        if start < index <= end:
            return start  # spans are merged: no other span contains ``start``
    return index


def _units(messages: Sequence[AnyMessage]) -> list[list[AnyMessage]]:
    """The messages in atomic units (a message, or a whole tool-call group),
    without orphan tool messages and incomplete groups."""
    _, broken = _groups(messages)
    ends = dict(_spans(messages))
    units: list[list[AnyMessage]] = []
    i = 0
    while i < len(messages):
        end = ends.get(i, i)
        unit = [messages[k] for k in range(i, end + 1) if k not in broken]
        if unit:
            units.append(unit)
        i = end + 1
    return units


def remove_messages(messages: Sequence[AnyMessage], ids: Iterable[str]) -> list[RemoveMessage]:
    """``RemoveMessage`` updates deleting ``ids`` from ``messages``, widened so
    that a tool-call group goes as a whole.

    Removing an AIMessage with tool calls removes the ToolMessages answering
    them; removing a ToolMessage removes its AIMessage and the other answers.
    The removals come in history order. Unknown ids raise ``InvalidUpdateError``.
    """
    position = {m.id: i for i, m in enumerate(messages)}
    wanted: set[int] = set()
    for msg_id in ids:
        if msg_id not in position:
            raise InvalidUpdateError(f"no message with id {msg_id!r}")
        wanted.add(position[msg_id])
    groups, _ = _groups(messages)
    members = {a: [a, *tools] for a, tools in groups.items()}
    group_of = {j: a for a, group in members.items() for j in group}
    chosen: set[int] = set()
    for i in wanted:
        chosen.update(members[group_of[i]] if i in group_of else [i])
    return [RemoveMessage(id=messages[i].id) for i in sorted(chosen)]


# -- trimming ----------------------------------------------------------------------


def _type_matcher(spec: MessageTypeSpec | None, what: str) -> tuple[type[AnyMessage], ...] | None:
    if spec is None:
        return None
    items: Sequence[str | type[AnyMessage]] = (
        [spec] if isinstance(spec, (str, type)) else list(spec)
    )
    if not items:
        raise ValueError(f"{what} must name at least one message type")
    out: list[type[AnyMessage]] = []
    for item in items:
        if isinstance(item, str):
            if item not in _TYPE_NAMES:
                raise ValueError(
                    f"{what}: unknown message type {item!r} (use one of {sorted(_TYPE_NAMES)})"
                )
            out.append(_TYPE_NAMES[item])
        elif isinstance(item, type) and issubclass(item, _MESSAGE_TYPES):
            out.append(item)
        else:
            raise TypeError(f"{what}: {item!r} is not a message type")
    return tuple(out)


def _default_splitter(text: str) -> list[str]:
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + parts[-1:]


def _splitter(text_splitter: TextSplitter | None) -> Callable[[str], list[str]]:
    if text_splitter is None:
        return _default_splitter
    split_text = getattr(text_splitter, "split_text", None)
    if callable(split_text):
        return split_text  # type: ignore[no-any-return]
    if callable(text_splitter):
        return text_splitter
    raise TypeError("text_splitter must be a callable or have a split_text method")


def _flat(units: Sequence[list[AnyMessage]]) -> list[AnyMessage]:
    return [m for unit in units for m in unit]


def _splittable(unit: list[AnyMessage]) -> bool:
    return len(unit) == 1 and not isinstance(unit[0], ToolMessage) and bool(unit[0].content)


def trim_messages(
    messages: Sequence[AnyMessage],
    *,
    max_tokens: int,
    token_counter: TokenCounter = count_tokens_approximately,
    strategy: Literal["first", "last"] = "last",
    allow_partial: bool = False,
    end_on: MessageTypeSpec | None = None,
    start_on: MessageTypeSpec | None = None,
    include_system: bool = False,
    text_splitter: TextSplitter | None = None,
) -> list[AnyMessage]:
    """The first or last messages that fit in ``max_tokens``, as LangChain's
    ``trim_messages``, and always a valid provider history.

    - ``strategy="last"`` keeps the most recent messages; ``include_system``
      keeps a leading SystemMessage too (it is kept even if it alone is over
      the budget); ``start_on`` drops messages from the front of the kept ones
      until one of that type (``start_on="human"`` makes the history start on a
      user message); ``end_on`` first drops trailing messages until one of that type.
    - ``strategy="first"`` keeps the oldest messages; ``end_on`` drops messages
      from the end of the kept ones until one of that type.
    - ``allow_partial`` keeps part of the content of the message at the budget
      boundary (its last parts for ``"last"``, its first for ``"first"``),
      split by ``text_splitter`` (default: on newlines). Only single text
      messages are split, never a tool-call group.
    - An AIMessage with tool calls and its ToolMessages are kept or dropped
      together; orphan ToolMessages and incomplete groups are dropped.

    ``token_counter`` counts a list of messages.
    """
    if strategy not in ("first", "last"):
        raise ValueError(f"strategy must be 'first' or 'last', got {strategy!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
    if strategy == "first" and start_on is not None:
        raise ValueError("start_on is only supported with strategy='last'")
    if strategy == "first" and include_system:
        raise ValueError("include_system is only supported with strategy='last'")
    if not callable(token_counter):
        raise TypeError("token_counter must be a callable taking a list of messages")
    starts = _type_matcher(start_on, "start_on")
    ends = _type_matcher(end_on, "end_on")
    split = _splitter(text_splitter)
    msgs = list(messages)
    if not msgs:
        return []

    def fits(candidate: list[AnyMessage]) -> bool:
        return token_counter(candidate) <= max_tokens

    if strategy == "first":
        units = _units(msgs)
        lo, hi = 0, len(units)  # the largest k with units[:k] fitting
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(_flat(units[:mid])):
                lo = mid
            else:
                hi = mid - 1
        kept = units[:lo]
        if allow_partial and lo < len(units) and _splittable(units[lo]):
            message = units[lo][0]
            parts = split(message.content)
            for n in range(len(parts) - 1, 0, -1):
                content = "".join(parts[:n])
                partial = msgspec.structs.replace(message, content=content)
                if content and fits([*_flat(kept), partial]):
                    kept = [*kept, [partial]]
                    break
        if ends is not None:
            while kept and not isinstance(kept[-1][-1], ends):
                kept.pop()
        return _flat(kept)

    head: list[AnyMessage] = []
    if include_system and isinstance(msgs[0], SystemMessage):
        head, msgs = [msgs[0]], msgs[1:]
    units = _units(msgs)
    if ends is not None:
        while units and not isinstance(units[-1][-1], ends):
            units.pop()
    lo, hi = 0, len(units)  # the smallest s with head + units[s:] fitting
    while lo < hi:
        mid = (lo + hi) // 2
        if fits([*head, *_flat(units[mid:])]):
            hi = mid
        else:
            lo = mid + 1
    kept = units[lo:]
    if allow_partial and lo > 0 and _splittable(units[lo - 1]):
        message = units[lo - 1][0]
        parts = split(message.content)
        for n in range(1, len(parts)):
            content = "".join(parts[n:])
            partial = msgspec.structs.replace(message, content=content)
            if content and fits([*head, partial, *_flat(kept)]):
                kept = [[partial], *kept]
                break
    if starts is not None:
        while kept and not isinstance(kept[0][0], starts):
            kept.pop(0)
    return [*head, *_flat(kept)]
