"""threadline's loggers: quiet until the application asks to see them.

The library never configures logging. ``get_logger()`` returns

* structlog's ``"threadline"`` logger when the application has configured
  structlog (``structlog.is_configured()``): its processors and its levels
  decide what shows;
* otherwise a structlog logger over the standard library's
  ``logging.getLogger("threadline")``, so ``logging`` decides: nothing shows
  until the application configures it (``logging.basicConfig(level=logging.INFO)``),
  except warnings and errors (a store that failed, a turn that failed), which
  Python's last-resort handler prints on stderr. The line it hands to
  ``logging`` is the event and its fields, ``thread_id`` included (merged from
  structlog's contextvars).

Loggers are made once (when a system is built), not per call. The standard
library one checks ``isEnabledFor`` before doing any work, so a debug event
nobody listens to costs a method call. If structlog gets configured after the
logger was made (``structlog.testing.capture_logs()`` in a test, or an
application that configures late), it hands its events to structlog instead.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog
from structlog.contextvars import merge_contextvars
from structlog.typing import EventDict, WrappedLogger

NAME = "threadline"

_configured = structlog.is_configured
_DEBUG, _INFO, _WARNING, _ERROR, _CRITICAL = (
    logging.DEBUG,
    logging.INFO,
    logging.WARNING,
    logging.ERROR,
    logging.CRITICAL,
)


def _value(value: Any) -> str:
    if (
        isinstance(value, str)
        and value.isprintable()
        and value
        and not any(c in value for c in " '\"=")
    ):
        return value
    return repr(value)


def render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
    """``event key=value ...``, the message of a ``logging`` record (``exc_info`` passes on)."""
    kwargs: dict[str, Any] = {}
    for key in ("exc_info", "stack_info"):
        if key in event_dict:
            kwargs[key] = event_dict.pop(key)
    event_dict.pop("positional_args", None)
    event = str(event_dict.pop("event", ""))
    if "thread_id" in event_dict:  # first: it is what one greps for
        event_dict = {"thread_id": event_dict.pop("thread_id"), **event_dict}
    fields = " ".join(f"{key}={_value(value)}" for key, value in event_dict.items())
    return ((f"{event} {fields}" if fields else event,), kwargs)


class StdlibLogger(structlog.stdlib.BoundLogger):
    """A structlog logger over ``logging.getLogger("threadline")`` (see the module doc).

    Each level method first asks whether anyone listens, so that an event
    nobody wants costs two attribute reads and a cached level check.
    """

    _structlog: Any = None

    def _proxy_to_logger(
        self, method_name: str, event: str | None = None, *event_args: str, **event_kw: Any
    ) -> Any:
        if _configured():
            if self._structlog is None:
                self._structlog = structlog.get_logger(NAME).bind(**self._context)
            return getattr(self._structlog, method_name)(event, *event_args, **event_kw)
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not (_configured() or self._logger.isEnabledFor(_DEBUG)):
            return None
        return self._proxy_to_logger("debug", event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not (_configured() or self._logger.isEnabledFor(_INFO)):
            return None
        return self._proxy_to_logger("info", event, *args, **kw)

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not (_configured() or self._logger.isEnabledFor(_WARNING)):
            return None
        return self._proxy_to_logger("warning", event, *args, **kw)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not (_configured() or self._logger.isEnabledFor(_ERROR)):
            return None
        return self._proxy_to_logger("error", event, *args, **kw)

    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not (_configured() or self._logger.isEnabledFor(_ERROR)):
            return None
        kw.setdefault("exc_info", True)
        return self._proxy_to_logger("exception", event, *args, **kw)

    def critical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not (_configured() or self._logger.isEnabledFor(_CRITICAL)):
            return None
        return self._proxy_to_logger("critical", event, *args, **kw)

    fatal = critical


def get_logger() -> Any:
    """The ``"threadline"`` logger; resolve it once (at construction), not per call."""
    if structlog.is_configured():
        return structlog.get_logger(NAME).bind()
    return StdlibLogger(logging.getLogger(NAME), [merge_contextvars, render], {})
