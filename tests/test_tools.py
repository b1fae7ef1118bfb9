"""Tools from functions whose annotations do not all resolve.

This module uses ``from __future__ import annotations`` and imports
``ToolRuntime`` only inside the test functions, so that the tools' annotations
are strings the module's globals cannot resolve, as in user code that imports
inside a factory function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import threadline
from threadline import AIMessage, InvalidToolError, ThreadlineError, ToolCall

pytestmark = pytest.mark.anyio


async def test_tool_runtime_imported_inside_a_function_is_injected() -> None:
    from threadline import ActorSystem, Agent, ScriptedModel, ToolRuntime

    seen: list[tuple[str, str]] = []

    def lookup(query: str, runtime: ToolRuntime, limit: int = 3) -> str:
        """Look something up.

        Args:
            query: what to look for.
        """
        seen.append((query, runtime.thread_id))
        return f"{query} x{limit}"

    call = ToolCall(id="c1", name="lookup", args={"query": "cats"})
    model = ScriptedModel([AIMessage("", tool_calls=[call]), "done"])
    agent: Agent[Any] = Agent(model=model, tools=[lookup])
    tool = agent.tools["lookup"]
    assert tool.runtime_param == "runtime"
    assert tool.parameters["properties"] == {
        "query": {"type": "string", "description": "what to look for."},
        "limit": {"type": "integer", "default": 3},
    }
    assert tool.parameters["required"] == ["query"]
    async with ActorSystem(agent) as system:
        result = await system.ask("t", "find cats")
    assert seen == [("cats", "t")]
    assert [m.content for m in result.messages][-2:] == ["cats x3", "done"]


@pytest.mark.parametrize(
    "annotation",
    [
        "ToolRuntime",
        "ToolRuntime[Ctx, State]",
        "threadline.ToolRuntime",
        "tl.runtime.ToolRuntime[Ctx, State]",
        "ToolRuntime | None",
        "None | ToolRuntime[Ctx, State]",
        "Optional[ToolRuntime]",
        "typing.Optional[tl.ToolRuntime[Ctx, dict[str, int]]]",
    ],
)
def test_tool_runtime_is_recognised_by_its_text(annotation: str) -> None:
    def helper(text: str, rt: Any) -> str:
        """Help."""
        return text

    helper.__annotations__ = {"text": "str", "rt": annotation, "return": "Missing"}
    tool = threadline.tool(helper)
    assert tool.runtime_param == "rt"
    assert list(tool.parameters["properties"]) == ["text"]


@pytest.mark.parametrize("annotation", ["Runtimes", "ToolRuntimeX", "list[ToolRuntime]"])
def test_a_lookalike_is_not_the_runtime(annotation: str) -> None:
    def helper(text: str, rt: Any) -> str:
        """Help."""
        return text

    helper.__annotations__ = {"text": "str", "rt": annotation}
    with pytest.raises(InvalidToolError, match="'rt'"):
        threadline.tool(helper)


def test_an_unresolvable_annotation_names_the_tool_and_the_parameter() -> None:
    from threadline import Agent, ScriptedModel

    @dataclasses.dataclass
    class Query:  # local: the module's globals cannot see it
        text: str

    def search(query: Query, page: int = 1) -> str:
        """Search."""
        return query.text

    with pytest.raises(InvalidToolError) as caught:
        Agent(model=ScriptedModel(["x"]), tools=[search])
    message = str(caught.value)
    assert "tool 'search'" in message and "parameter 'query'" in message
    assert "'Query'" in message and "NameError" in message
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ThreadlineError)
    assert isinstance(caught.value.__cause__, NameError)


def test_a_type_without_a_json_schema_names_the_parameter() -> None:
    class Opaque:
        pass

    def use(thing: Opaque) -> str:
        """Use it."""
        return ""

    use.__annotations__ = {"thing": Opaque}  # resolved, but msgspec has no schema for it
    with pytest.raises(InvalidToolError, match=r"tool 'use': parameter 'thing'"):
        threadline.tool(use)


def test_varargs_are_refused_with_the_typed_error() -> None:
    def many(*texts: str) -> str:
        """Many."""
        return ""

    with pytest.raises(InvalidToolError, match=r"tool 'many'.*\*args"):
        threadline.tool(many)


def test_an_unresolvable_return_annotation_does_not_matter() -> None:
    class Answer:
        pass

    def answer(question: str) -> Answer:
        """Answer."""
        return Answer()

    tool = threadline.tool(answer)
    assert tool.parameters["properties"] == {"question": {"type": "string"}}
