"""Tools from plain functions: schema from the signature and docstring."""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any, overload

import anyio
import anyio.from_thread
import anyio.to_thread
import msgspec

from threadline.actors import InvalidInputError

from ._requests import ToolRuntime

_ARGS_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters):\s*$", re.MULTILINE)
_ARG_LINE = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Description (text before an ``Args:`` section) and per-argument help."""
    doc = inspect.cleandoc(doc)
    match = _ARGS_SECTION.search(doc)
    if match is None:
        return doc.strip(), {}
    description = doc[: match.start()].strip()
    args: dict[str, str] = {}
    current = None
    for line in doc[match.end() :].splitlines():
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")):
            break  # the next section
        if (arg := _ARG_LINE.match(line)) is not None and line[
            : len(line) - len(line.lstrip())
        ].count(" ") <= 4:
            current = arg[1].lstrip("*")
            args[current] = arg[2].strip()
        elif current is not None:
            args[current] += " " + line.strip()
    return description, args


def _is_tool_runtime(annotation: Any) -> bool:
    if annotation is ToolRuntime or typing.get_origin(annotation) is ToolRuntime:
        return True
    # ``ToolRuntime | None`` and ``Optional[ToolRuntime[...]]``
    return any(
        _is_tool_runtime(arg) for arg in typing.get_args(annotation) if arg is not type(None)
    ) and (typing.get_origin(annotation) in (typing.Union, types.UnionType))


class Tool:
    """A callable the model may request, with a JSON schema for its arguments."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        return_direct: bool = False,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.is_async = inspect.iscoroutinefunction(fn)
        self.return_direct = return_direct
        doc_description, arg_help = _parse_docstring(fn.__doc__ or "")
        self.description = description or doc_description or self.name
        hints = typing.get_type_hints(fn, include_extras=True)
        self.runtime_param: str | None = None
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for param in inspect.signature(fn).parameters.values():
            annotation = hints.get(param.name, Any)
            if _is_tool_runtime(annotation) or (param.name == "runtime" and annotation is Any):
                self.runtime_param = param.name
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"tool {self.name!r}: *args/**kwargs are not supported")
            if param.default is param.empty:
                fields.append((param.name, annotation))
            else:
                fields.append((param.name, annotation, param.default))
        self.args_type: Any = msgspec.defstruct(
            f"{self.name}_args", fields, kw_only=True, forbid_unknown_fields=True
        )
        (ref,), components = msgspec.json.schema_components(
            [self.args_type], ref_template="#/$defs/{name}"
        )
        key = ref["$ref"].rsplit("/", 1)[-1]
        parameters = dict(components.pop(key))
        parameters.pop("title", None)
        properties = parameters.setdefault("properties", {})
        for arg, text in arg_help.items():
            if arg in properties:
                properties[arg] = {**properties[arg], "description": text}
        if components:
            parameters["$defs"] = components
        self.parameters: dict[str, Any] = parameters

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI function-tool schema."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def validate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Arguments converted to their annotated types (InvalidInputError if they don't fit)."""
        try:
            parsed = msgspec.convert(args, self.args_type, strict=False)
        except msgspec.ValidationError as exc:
            raise InvalidInputError(f"invalid arguments for tool {self.name!r}: {exc}") from exc
        return {f: getattr(parsed, f) for f in self.args_type.__struct_fields__}

    async def ainvoke(self, args: dict[str, Any], runtime: ToolRuntime[Any, Any] | None) -> Any:
        kwargs = self.validate(args)
        if self.is_async:
            if self.runtime_param is not None:
                kwargs[self.runtime_param] = runtime
            return await self.fn(**kwargs)
        if self.runtime_param is not None and runtime is not None:
            # Sync tools run in a worker thread; their stream writer hops back.
            emit = runtime.emit
            kwargs[self.runtime_param] = ToolRuntime(
                state=runtime.state,
                context=runtime.context,
                store=runtime.store,
                tool_call_id=runtime.tool_call_id,
                thread_id=runtime.thread_id,
                resources=runtime.resources,
                emit=lambda mode, data: anyio.from_thread.run_sync(emit, mode, data),
            )
        return await anyio.to_thread.run_sync(functools.partial(self.fn, **kwargs))


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, return_direct: bool = False
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    return_direct: bool = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a ``Tool`` from a sync or async function (``@tool`` or ``@tool(name=...)``)."""
    if fn is not None:
        return Tool(fn)

    def decorate(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, description=description, return_direct=return_direct)

    return decorate


def as_tool(value: Tool | Callable[..., Any]) -> Tool:
    return value if isinstance(value, Tool) else Tool(value)
