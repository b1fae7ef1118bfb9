"""Human review of tool calls before they run, built on ``interrupt``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from threadline.actors import Command, ToolMessage

from .._middleware import AgentMiddleware, ToolHandler
from .._requests import ToolCallRequest

DECISIONS: Final = ("approve", "edit", "reject")


class HumanInTheLoopMiddleware(AgentMiddleware):
    """Ask a human to approve, edit or reject chosen tool calls before they run.

    ``interrupt_on`` maps a tool name to ``True`` (all three decisions),
    ``False`` (no review) or ``{"allowed_decisions": [...], "description":
    "..."}``. A reviewed call interrupts the turn with::

        {"action_request": {"name": ..., "args": ..., "description": ...},
         "allowed_decisions": ["approve", "edit", "reject"]}

    and the answer (``Command(resume=decision)``, or ``{interrupt_id:
    decision}`` when several calls wait) is ``{"type": "approve"}``,
    ``{"type": "edit", "args": {...}}`` (the call runs with these arguments)
    or ``{"type": "reject", "message": "..."}`` (the call does not run; the
    model gets the message as an error tool result). A decision that is not
    one of these, or not allowed for the tool, asks again with an ``error``
    key saying why. Only the reviewed call waits: its siblings run and are
    committed, and never run again.
    """

    def __init__(
        self,
        interrupt_on: Mapping[str, bool | Mapping[str, Any]],
        *,
        description_prefix: str = "Tool execution requires approval",
    ) -> None:
        if not isinstance(interrupt_on, Mapping):
            raise TypeError("interrupt_on must map tool names to True, False or a config dict")
        self.description_prefix = str(description_prefix)
        self.configs: dict[str, tuple[tuple[str, ...], str | None]] = {}
        for name, config in interrupt_on.items():
            if config is False:
                continue
            if config is True:
                self.configs[name] = (DECISIONS, None)
                continue
            if not isinstance(config, Mapping) or set(config) - {
                "allowed_decisions",
                "description",
            }:
                raise ValueError(
                    f"interrupt_on[{name!r}] must be True, False or a dict with "
                    f"'allowed_decisions' and/or 'description', got {config!r}"
                )
            allowed = tuple(config.get("allowed_decisions", DECISIONS))
            if not allowed or any(d not in DECISIONS for d in allowed):
                raise ValueError(
                    f"interrupt_on[{name!r}]: allowed_decisions must be among {DECISIONS}, "
                    f"got {list(allowed)}"
                )
            description = config.get("description")
            if description is not None and not isinstance(description, str):
                raise ValueError(f"interrupt_on[{name!r}]: description must be a str")
            self.configs[name] = (allowed, description)

    async def wrap_tool_call(
        self, request: ToolCallRequest[Any], handler: ToolHandler
    ) -> ToolMessage | Command:
        call = request.tool_call
        config = self.configs.get(call.name)
        if config is None:
            return await handler(request)
        allowed, description = config
        question: dict[str, Any] = {
            "action_request": {
                "name": call.name,
                "args": call.args,
                "description": description
                or f"{self.description_prefix}\n\nTool: {call.name}\nArgs: {call.args}",
            },
            "allowed_decisions": list(allowed),
        }
        while True:
            decision = request.runtime.interrupt(question)
            problem = _problem(decision, allowed)
            if problem is None:
                break
            question = {**question, "error": problem}
        kind = decision["type"]
        if kind == "approve":
            return await handler(request)
        if kind == "edit":
            edited = msgspec.structs.replace(call, args=dict(decision["args"]))
            return await handler(request.override(tool_call=edited))
        message = decision.get("message")
        return ToolMessage(
            message
            if isinstance(message, str) and message
            else f"The user rejected the call of {call.name!r}.",
            tool_call_id=call.id,
            name=call.name,
            status="error",
        )


def _problem(decision: Any, allowed: tuple[str, ...]) -> str | None:
    """Why ``decision`` cannot be taken (None: it can)."""
    if not isinstance(decision, dict) or decision.get("type") not in DECISIONS:
        return f"a decision is a dict with 'type' among {list(allowed)}, got {decision!r}"[:500]
    if decision["type"] not in allowed:
        return f"{decision['type']!r} is not allowed here (allowed: {list(allowed)})"
    if decision["type"] == "edit" and not isinstance(decision.get("args"), dict):
        return "an 'edit' decision needs 'args', a dict of the new arguments"
    return None
