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

from threadline.actors import InvalidInputError, InvalidToolError

from ._requests import ToolRuntime

_ARGS_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters):\s*$", re.MULTILINE)
_ARG_LINE = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$")
# ``ToolRuntime``, ``ToolRuntime[Ctx, State]``, ``threadline.ToolRuntime``, ...
_RUNTIME_TEXT = re.compile(r"(?:[A-Za-z_]\w*\.)*ToolRuntime(?:\[.*\])?", re.DOTALL)
_OPTIONAL_TEXT = re.compile(r"(?:(?:typing|t)\.)?Optional\[(.*)\]", re.DOTALL)


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


def _check_schema(tool: str, param: str, annotation: Any) -> None:
    try:
        msgspec.json.schema(annotation)
    except (TypeError, ValueError) as exc:
        raise InvalidToolError(
            f"tool {tool!r}: parameter {param!r} has a type with no JSON schema "
            f"({annotation!r}): {exc}"
        ) from exc


def _is_tool_runtime(annotation: Any) -> bool:
    if annotation is ToolRuntime or typing.get_origin(annotation) is ToolRuntime:
        return True
    # ``ToolRuntime | None`` and ``Optional[ToolRuntime[...]]``
    return any(
        _is_tool_runtime(arg) for arg in typing.get_args(annotation) if arg is not type(None)
    ) and (typing.get_origin(annotation) in (typing.Union, types.UnionType))


class _Unresolved:
    """A string annotation that does not evaluate in the function's module."""

    def __init__(self, text: str, error: Exception) -> None:
        self.text = text
        self.error = error


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _is_tool_runtime_text(text: str) -> bool:
    """``ToolRuntime`` by its text (``"ToolRuntime[Ctx]"``, ``"ToolRuntime | None"``, ...)."""
    text = text.strip()
    if (optional := _OPTIONAL_TEXT.fullmatch(text)) is not None:
        text = optional[1]
    parts = [part for part in _split_top_level(text, "|") if part != "None"]
    return len(parts) == 1 and _RUNTIME_TEXT.fullmatch(parts[0]) is not None


class _Annotations:
    """Stands in for a function with one annotation, for ``typing.get_type_hints``."""

    def __init__(self, annotations: dict[str, Any]) -> None:
        self.__annotations__ = annotations


def _parameter_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Each parameter's annotation, evaluated where it can be.

    ``typing.get_type_hints`` fails as a whole when one string annotation
    names something the function's module does not define (say, a type
    imported inside a function under ``from __future__ import annotations``);
    then each annotation is evaluated on its own, and those that still fail
    come back as ``_Unresolved``.
    """
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: S110 - evaluated one by one below
        pass
    raw = getattr(fn, "__annotations__", None)
    if not isinstance(raw, dict):
        return {}
    globalns = getattr(inspect.unwrap(fn), "__globals__", {})
    hints: dict[str, Any] = {}
    for name, annotation in raw.items():
        if name == "return":
            continue  # not part of the schema
        try:
            hints[name] = typing.get_type_hints(
                _Annotations({name: annotation}), globalns=globalns, include_extras=True
            )[name]
        except Exception as exc:
            text = annotation if isinstance(annotation, str) else repr(annotation)
            hints[name] = _Unresolved(text, exc)
    return hints


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
        hints = _parameter_hints(fn)
        self.runtime_param: str | None = None
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for param in inspect.signature(fn).parameters.values():
            annotation = hints.get(param.name, Any)
            if isinstance(annotation, _Unresolved):
                if _is_tool_runtime_text(annotation.text):
                    self.runtime_param = param.name
                    continue
                module = getattr(fn, "__module__", None)
                raise InvalidToolError(
                    f"tool {self.name!r}: the annotation {annotation.text!r} of parameter "
                    f"{param.name!r} cannot be resolved in module {module!r} "
                    f"({type(annotation.error).__name__}: {annotation.error}); import or "
                    "define that name at the module level"
                ) from annotation.error
            if _is_tool_runtime(annotation) or (param.name == "runtime" and annotation is Any):
                self.runtime_param = param.name
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise InvalidToolError(
                    f"tool {self.name!r}: *args/**kwargs ({param.name!r}) are not supported"
                )
            _check_schema(self.name, param.name, annotation)
            if param.default is param.empty:
                fields.append((param.name, annotation))
            else:
                fields.append((param.name, annotation, param.default))
        self.args_type: Any = msgspec.defstruct(
            f"{self.name}_args", fields, kw_only=True, forbid_unknown_fields=True
        )
        try:
            (ref,), components = msgspec.json.schema_components(
                [self.args_type], ref_template="#/$defs/{name}"
            )
        except (TypeError, ValueError) as exc:
            raise InvalidToolError(f"tool {self.name!r}: {exc}") from exc
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
                interrupts=runtime.interrupts,
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
