"""Thread state, its reducers and validated updates."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import msgspec

from ._errors import InvalidUpdateError
from ._messages import (
    REMOVE_ALL_MESSAGES,
    AnyMessage,
    MessageLike,
    RemoveMessage,
    coerce_messages,
)
from ._nesting import MAX_NESTING, too_deep

_MISSING: Any = object()


class AgentState(msgspec.Struct, kw_only=True):
    """A thread's state: the conversation plus whatever fields a subclass adds.

    Subclass it to add fields (``user_id: str``, ``preferences: dict``). Fields
    are read as attributes or by key (``state["messages"]``), so LangGraph-shaped
    code reads naturally. Treat a state as immutable: every change goes through
    an update (a dict) and the reducers, which build a new state.
    """

    messages: list[AnyMessage] = msgspec.field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        if key in self.__struct_fields__:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, _MISSING) if key in self.__struct_fields__ else _MISSING
        return default if value is _MISSING or value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.__struct_fields__

    def keys(self) -> tuple[str, ...]:
        return self.__struct_fields__


S = TypeVar("S", bound=AgentState)


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """Returned by a tool or a hook: a state ``update`` and/or where to go next.

    ``goto`` is one of ``"model"``, ``"tools"``, ``"end"`` (hooks only).

    As the input of ``ask``/``tell``/``stream``, ``Command(resume=value)``
    answers a thread's pending interrupt (``{interrupt_id: value, ...}`` for
    several); ``update`` and ``goto`` are not taken there.
    """

    update: dict[str, Any] | None = None
    goto: Literal["model", "tools", "end"] | None = None
    resume: Any = msgspec.UNSET


_CACHE_IDS_FROM = 64


class _MessageList(list):  # type: ignore[type-arg]
    """A long history that remembers the ids in it, so appending to it does
    not rebuild a set of every id on each step (what made a step's cost grow
    with history).

    ``ids`` is shared by the lists appended from one another and only grows:
    it may hold ids a given list no longer has (that just sends a step down
    the exact slow path), never miss one it has. Short histories stay plain
    lists: a set per idle thread would cost more memory than it saves time.
    """

    __slots__ = ("ids",)
    ids: set[str]


def _appended(merged: list[AnyMessage], ids: set[str]) -> list[AnyMessage]:
    if len(merged) < _CACHE_IDS_FROM:
        return merged
    out = _MessageList(merged)
    out.ids = ids
    return out


def add_messages(left: Sequence[AnyMessage], right: Sequence[MessageLike]) -> list[AnyMessage]:
    """Merge ``right`` into ``left``: append; same id replaces; remove by id.

    A ``RemoveMessage(id=REMOVE_ALL_MESSAGES)`` in ``right`` discards everything
    before it (in ``left`` and in ``right``). Removing an id that does not exist
    raises ``InvalidUpdateError``. Messages must already carry ids.
    """
    cut = -1
    for i, m in enumerate(right):
        if isinstance(m, RemoveMessage) and m.id == REMOVE_ALL_MESSAGES:
            cut = i
    if cut >= 0:
        left, right = (), right[cut + 1 :]

    # Fast path: the usual step appends messages with fresh ids (new to the
    # thread and to each other).
    if not any(isinstance(m, RemoveMessage) for m in right):
        cached = getattr(left, "ids", None)
        ids = cached if cached is not None else {m.id for m in left}
        for m in right:
            if m.id in ids:
                break  # (ids added so far are in the result either way)
            ids.add(m.id)
        else:
            return _appended([*left, *right], ids)  # type: ignore[list-item]
    merged: list[AnyMessage | None] = list(left)
    index = {m.id: i for i, m in enumerate(left)}
    removed: set[str] = set()
    for m in right:
        pos = index.get(m.id)
        if isinstance(m, RemoveMessage):
            if pos is None or m.id in removed:
                raise InvalidUpdateError(
                    f"RemoveMessage: no message with id {m.id!r} in the thread"
                )
            removed.add(m.id)
            merged[pos] = None
        elif pos is not None and m.id not in removed:
            merged[pos] = m
        else:
            removed.discard(m.id)
            index[m.id] = len(merged)
            merged.append(m)
    return [m for m in merged if m is not None]


class _Schema:
    """What threadline knows about a state class: field types and decoders."""

    def __init__(self, cls: type[AgentState]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, AgentState)):
            raise TypeError(f"state_schema must subclass AgentState, got {cls!r}")
        self.cls = cls
        self.fields = {f.name: f for f in msgspec.structs.fields(cls)}
        if "messages" not in self.fields:
            raise TypeError("state_schema must keep the 'messages' field")
        # A patch holds only the fields an update set; UNSET fields are not encoded.
        self.patch = msgspec.defstruct(
            f"{cls.__name__}Patch",
            [
                (
                    name,
                    (list[MessageLike] if name == "messages" else f.type) | msgspec.UnsetType,
                    msgspec.UNSET,
                )
                for name, f in self.fields.items()
            ],
            kw_only=True,
            omit_defaults=True,
            module=__name__,
        )
        # A field's value is accepted only if it reads back as the journal
        # reads it (the patch and the full state decode fields by these types).
        self.decoders = {
            name: msgspec.msgpack.Decoder(f.type)
            for name, f in self.fields.items()
            if name != "messages"  # (messages are checked one by one: check_message)
        }


_ENCODER = msgspec.msgpack.Encoder()


def _storable(info: _Schema, key: str, value: Any, source: str) -> Any:
    """``value`` converted to the field's type, if it can be stored and read back.

    ``msgspec.convert`` checks the shape but passes through what a field typed
    ``Any`` (or a Struct instance) holds unchecked; the round trip through the
    field's decoder catches the rest (unencodable objects, lone surrogates,
    wrong types inside a Struct). Nesting is bounded first, without recursion.
    """
    if too_deep(value):
        raise InvalidUpdateError(
            f"{source}: state key {key!r} nests deeper than {MAX_NESTING} levels"
        )
    try:
        converted = msgspec.convert(value, info.fields[key].type)
        info.decoders[key].decode(_ENCODER.encode(converted))
    except msgspec.ValidationError as exc:
        raise InvalidUpdateError(f"{source}: state key {key!r}: {exc}") from exc
    except RecursionError as exc:  # (not reached below MAX_NESTING; a last guard)
        raise InvalidUpdateError(f"{source}: state key {key!r} nests too deep") from exc
    except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidUpdateError(f"{source}: state key {key!r} cannot be stored: {exc}") from exc
    return converted


@functools.cache
def schema_info(cls: type[AgentState]) -> _Schema:
    return _Schema(cls)


def normalize_update(
    cls: type[AgentState], update: object, *, source: str = "update", first_id: str | None = None
) -> dict[str, Any]:
    """Validate an update dict against the schema; coerce messages, give them ids.

    Raises ``InvalidUpdateError`` naming the key (and ``source``) that is wrong.
    """
    if isinstance(update, AgentState):
        update = {k: getattr(update, k) for k in update.__struct_fields__}
    if not isinstance(update, Mapping):
        raise InvalidUpdateError(
            f"{source}: a state update must be a dict, got {type(update).__name__}"
        )
    info = schema_info(cls)
    out: dict[str, Any] = {}
    for key, value in update.items():
        field = info.fields.get(key) if isinstance(key, str) else None
        if field is None:
            raise InvalidUpdateError(
                f"{source}: unknown state key {key!r} for {cls.__name__} "
                f"(fields: {', '.join(info.fields)})"
            )
        if key == "messages":
            try:
                out[key] = coerce_messages(value, first_id=first_id)
            except InvalidUpdateError:
                raise
            except Exception as exc:
                raise InvalidUpdateError(f"{source}: 'messages': {exc}") from exc
            continue
        out[key] = _storable(info, key, value, source)
    return out


def apply_update(state: S, update: Mapping[str, Any]) -> S:
    """A new state with a normalized update applied through the reducers."""
    if not update:
        return state
    changes = dict(update)
    right = changes.get("messages")
    if right is not None:
        changes["messages"] = add_messages(state.messages, right)
    return msgspec.structs.replace(state, **changes)


def merge_updates(updates: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One normalized update equivalent to applying ``updates`` in order.

    ``add_messages`` reduces ``right`` messages one at a time, so concatenating
    the ``messages`` of consecutive updates gives the same result (removals,
    replacements and ``REMOVE_ALL_MESSAGES`` included); other fields are
    overwritten, so the last value wins. Replay uses this to apply a long log
    with one pass over the history instead of one pass per step.
    """
    merged: dict[str, Any] = {}
    messages: list[MessageLike] = []
    for update in updates:
        for key, value in update.items():
            if key == "messages":
                messages.extend(value)
            else:
                merged[key] = value
    if messages:
        merged["messages"] = messages
    return merged


def initial_state(cls: type[S], update: Mapping[str, Any]) -> S:
    """The state of a new thread built from its first (normalized) update.

    Fields without defaults must be given by that update.
    """
    values = dict(update)
    right = values.pop("messages", None)
    try:
        state = msgspec.convert(values, cls)
    except msgspec.ValidationError as exc:
        raise InvalidUpdateError(f"a new thread's state: {exc}") from exc
    if right is not None:
        state = msgspec.structs.replace(state, messages=add_messages([], right))
    return state
