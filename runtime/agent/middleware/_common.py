"""Argument checks and message helpers the built-in middleware share."""

from __future__ import annotations

from collections.abc import Sequence

from threadline.actors import AIMessage, AnyMessage


def _check_int(name: str, value: object, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
    return float(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _answered_by(messages: Sequence[AnyMessage], index: int, call_id: str) -> int | None:
    """The index of the AIMessage before ``index`` that made the call ``call_id``."""
    for j in range(index - 1, -1, -1):
        m = messages[j]
        if isinstance(m, AIMessage) and any(c.id == call_id for c in m.tool_calls):
            return j
    return None
