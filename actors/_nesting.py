"""How deep a value may nest before the door refuses it.

msgspec encodes and decodes nested values recursively, under the
interpreter's recursion limit *as it stands at the call*: a value nested a
few hundred levels deep can be encoded at the door (a shallow stack) and then
fail to decode on every activation (a deeper stack), which bricks the thread.
So the door refuses anything nested deeper than ``MAX_NESTING`` containers,
far below what any stack reaches, and measures depth without recursing (a
value nested 100,000 deep must not blow the stack of the check itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Final

import msgspec

MAX_NESTING: Final = 64
"""Containers (dicts, lists, tuples, sets, structs) nested deeper are refused."""

_LEAVES: Final = frozenset({str, int, float, bool, type(None), bytes})


def too_deep(value: object, limit: int = MAX_NESTING) -> bool:
    """True if ``value`` nests containers more than ``limit`` levels deep.

    A container counts as one level (``[1]`` is 1 deep, ``{"a": [1]}`` 2).
    Iterative, and it stops as soon as the limit is passed, so a cyclic value
    (a list holding itself) counts as too deep rather than looping.
    """
    if type(value) in _LEAVES:
        return False
    stack: list[tuple[object, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
            for key in item:
                if type(key) is not str and type(key) not in _LEAVES:
                    push((key, depth + 1))  # (a tuple key nests too)
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = item
        elif isinstance(item, msgspec.Struct):
            children = msgspec.structs.astuple(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            children = [getattr(item, f.name, None) for f in dataclasses.fields(item)]
        else:
            continue  # a leaf (or something msgspec cannot encode: the caller's round trip says so)
        if depth > limit:
            return True
        for child in children:
            if type(child) not in _LEAVES:
                push((child, depth + 1))
    return False
