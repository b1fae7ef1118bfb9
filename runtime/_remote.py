"""``Client``: the ``ThreadClient`` protocol over Redis, for threads that workers run.

Any process can send: ``tell`` appends the envelope to its thread's partition
inbox (idempotent per message id) and returns once Redis has it, durable as
the server's ``appendfsync`` makes it. ``ask`` and ``stream`` name a reply
stream in the envelope and read it: the worker writes a step's events and the
final reply only after the step is committed, so a reply means durable, and
a client that lost its connection re-reads the stream from the last event id
it saw (``join``). Reads (``get_state``, ``history``, ``threads``) go straight
to the snapshot store; writes to a thread (``update_state``, ``revert``,
``fork``, ``delete``) go through the inbox, in order with its messages (a fork
through the new thread's).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar

import anyio
import msgspec

from threadline.actors import AgentState, Interrupt
from threadline.actors._api import (
    Envelope,
    StepInfo,
    StreamPart,
    ThreadSnapshot,
    TurnResult,
    new_id,
    stream_modes,
)
from threadline.persistence import (
    Codec,
    KeyLayout,
    RedisInbox,
    RedisSnapshotStore,
    deployment_layout,
    encode_envelope,
    open_redis,
    read_history,
)

from ._client import stored_state
from ._door import Door, Input, check_page, check_version
from ._wire import decode_event, raise_error
from .agent._requests import ContextCodec

S = TypeVar("S", bound=AgentState)

DEFAULT_MAX_QUEUED: Final = 1000
"""A thread's messages in the inbox not yet processed, past which a send is refused."""
DEFAULT_MAX_BACKLOG: Final = 100_000
"""A partition's inbox entries, past which a send is refused."""
DEFAULT_REDIS_TIMEOUT: Final = 10.0
"""Seconds an inbox call may take before it raises ``StoreUnavailableError``."""


class Client(Generic[S]):
    """Reach threads served by workers on the Redis at ``url``.

    ``async with Client.from_url("redis://...") as client: await client.ask(...)``.
    ``state_schema`` is the agents' state class (to decode states; default
    ``AgentState``); ``prefix`` names the deployment (as the workers').
    Context is validated by the worker that runs the agent. Options:

    * ``max_queued`` (default 1000): a send to a thread that already has this
      many messages in the inbox not yet processed raises ``MailboxFullError``
      (0: no cap).
    * ``max_backlog`` (default 100,000): a send to a partition whose inbox holds
      this many entries raises ``OverloadedError`` (0: no cap). Either refusal
      appends nothing: try again later.
    * ``redis_timeout`` (seconds, default 10; ``None``: as long as the
      connection waits): how long each inbox call (a send, a read of the reply
      stream beyond its own blocking wait) may take before it raises
      ``StoreUnavailableError``.

    The caps are checked by whoever sends, so every client of a deployment
    should use the same. ``ask`` and ``update_state`` wait for their reply as
    long as it takes unless given a ``timeout`` (``stream`` and ``delete``
    take none). Other keyword arguments are redis connection options
    (``max_connections``, ...). A bad value raises ``ValueError``.
    """

    def __init__(
        self,
        url: str,
        *,
        state_schema: type[S] = AgentState,  # type: ignore[assignment]
        prefix: str = "tl",
        max_message_bytes: int = 1 << 20,
        max_thread_id_length: int = 256,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        redis_timeout: float | None = DEFAULT_REDIS_TIMEOUT,
        **redis_options: Any,
    ) -> None:
        for name, cap in (("max_queued", max_queued), ("max_backlog", max_backlog)):
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: no cap), got {cap!r}")
        if redis_timeout is not None and (
            isinstance(redis_timeout, bool)
            or not isinstance(redis_timeout, (int, float))
            or not redis_timeout > 0
        ):
            raise ValueError(f"redis_timeout must be positive or None, got {redis_timeout!r}")
        self.max_queued = max_queued
        self.max_backlog = max_backlog
        self.redis_timeout = redis_timeout
        self.url = url
        self.prefix = prefix
        self.state_schema = state_schema
        self.codec: Codec[S] = Codec(state_schema)
        self.door: Door[S] = Door(
            state_schema,
            ContextCodec(None),
            max_message_bytes=max_message_bytes,
            max_thread_id_length=max_thread_id_length,
        )
        self._result_type: Any = TurnResult[state_schema]  # type: ignore[valid-type]
        self._snapshot_type: Any = ThreadSnapshot[state_schema]  # type: ignore[valid-type]
        # Every waiting ask holds a connection for its blocking read of the reply
        # stream: the pool must not be what limits requests in flight.
        redis_options.setdefault("max_connections", 512)
        self._options = redis_options
        self._stack: contextlib.AsyncExitStack | None = None
        self.layout: KeyLayout | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        redis_timeout: float | None = DEFAULT_REDIS_TIMEOUT,
        **options: Any,
    ) -> Client[Any]:
        """A client of the deployment at ``url``; the options are the constructor's."""
        return cls(
            url,
            max_queued=max_queued,
            max_backlog=max_backlog,
            redis_timeout=redis_timeout,
            **options,
        )

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                open_redis(self.url, "Client", **self._options)
            )
            self.layout = await deployment_layout(client, self.prefix)
            self._inbox = RedisInbox(
                client,
                self.layout,
                max_queued=self.max_queued,
                max_backlog=self.max_backlog,
                timeout=self.redis_timeout,
            )
            self.snapshots = await stack.enter_async_context(
                RedisSnapshotStore(client, prefix=self.prefix)
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        await stack.__aexit__(exc_type, exc, tb)

    # -- sending ---------------------------------------------------------------

    def _reply_key(self, thread_id: str, run_id: str) -> str:
        assert self.layout is not None, "use 'async with Client(...)' first"
        return self.layout.for_thread(thread_id).reply(run_id)

    async def _send(self, envelope: Envelope) -> None:
        payload = encode_envelope(envelope)
        # A sender waiting for a reply needs its envelope consumed even if the
        # id was sent before: the thread answers a repeated id as a duplicate.
        always = envelope.reply_to is not None
        await self._inbox.enqueue(envelope.thread_id, envelope.message_id, payload, always=always)

    async def tell(
        self, thread_id: str, input: Input, *, context: Any = None, message_id: str | None = None
    ) -> str:
        """Append the message to its thread's inbox; returns its message id once durable."""
        envelope = self.door.input(thread_id, input, context=context, message_id=message_id)
        await self._send(envelope)
        return envelope.message_id

    async def _request(self, envelope: Envelope, modes: tuple[str, ...] = ()) -> tuple[str, str]:
        run_id = envelope.message_id if envelope.kind in ("input", "resume") else new_id()
        key = self._reply_key(envelope.thread_id, run_id)
        await self._send(
            msgspec.structs.replace(envelope, run_id=run_id, reply_to=key, modes=modes)
        )
        return run_id, key

    async def join(
        self, thread_id: str, run_id: str, *, after: str = "0-0"
    ) -> AsyncIterator[tuple[str, str, Any, int]]:
        """The events of a run from the event id ``after``: (event id, event, data, version).

        Ends after the ``end`` event; raises the run's error. Re-reading from the
        last id seen after a disconnect loses and repeats nothing.
        """
        key = self._reply_key(thread_id, run_id)
        last = after
        while True:
            for event_id, payload in await self._inbox.replies(key, last):
                last = event_id
                event = decode_event(payload)
                if event.event == "error":
                    raise_error(event.data)
                yield event_id, event.event, event.data, event.version
                if event.event == "end":
                    return

    async def ask(
        self,
        thread_id: str,
        input: Input,
        *,
        context: Any = None,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> TurnResult[S]:
        """A timeout stops the waiting, never the accepted message."""
        envelope = self.door.input(thread_id, input, context=context, message_id=message_id)
        with anyio.fail_after(timeout):
            run_id, _ = await self._request(envelope)
            async for _, event, data, _ in self.join(thread_id, run_id):
                if event == "end":
                    result: TurnResult[S] = msgspec.convert(data, self._result_type)
                    return result
        raise AssertionError("unreachable: join ends with 'end' or raises")

    async def stream(
        self,
        thread_id: str,
        input: Input,
        *,
        context: Any = None,
        message_id: str | None = None,
        mode: str | Sequence[str] = "updates",
    ) -> AsyncIterator[StreamPart]:
        modes = stream_modes(mode)
        envelope = self.door.input(thread_id, input, context=context, message_id=message_id)
        run_id, _ = await self._request(envelope, tuple(sorted(modes)))
        async for _, event, data, version in self.join(thread_id, run_id):
            if event == "end":
                return
            if event == "values":
                data = msgspec.convert(data, self.state_schema)
            elif event == "updates":  # as in process: message objects, not dicts
                data = {
                    kind: (
                        msgspec.convert(updates, list[Interrupt])
                        if kind == "__interrupt__"
                        else [self._update(u) for u in updates]
                    )
                    for kind, updates in data.items()
                }
            yield StreamPart(mode=event, data=data, thread_id=thread_id, version=version)

    def _update(self, raw: Any) -> dict[str, Any]:
        return self.codec.from_patch(msgspec.convert(raw, self.codec.patch_type))

    async def _call(self, envelope: Envelope, timeout: float | None) -> Any:
        with anyio.fail_after(timeout):
            run_id, _ = await self._request(envelope)
            async for _, event, data, _ in self.join(envelope.thread_id, run_id):
                if event == "end":
                    return data
        raise AssertionError("unreachable")

    async def update_state(
        self,
        thread_id: str,
        update: Mapping[str, Any],
        *,
        at: int | None = None,
        timeout: float | None = None,
    ) -> ThreadSnapshot[S]:
        return await self._write(self.door.update(thread_id, update, at=at), timeout)

    async def revert(
        self, thread_id: str, *, to: int, timeout: float | None = None
    ) -> ThreadSnapshot[S]:
        return await self._write(self.door.revert(thread_id, to), timeout)

    async def fork(
        self,
        thread_id: str,
        new_thread_id: str,
        *,
        at: int | None = None,
        timeout: float | None = None,
    ) -> ThreadSnapshot[S]:
        """Through the new thread's inbox: its owner writes it."""
        return await self._write(self.door.fork(thread_id, new_thread_id, at), timeout)

    async def _write(self, envelope: Envelope, timeout: float | None) -> ThreadSnapshot[S]:
        data = await self._call(envelope, timeout)
        snapshot: ThreadSnapshot[S] = msgspec.convert(data, self._snapshot_type)
        return snapshot

    async def delete(self, thread_id: str) -> bool:
        return bool(await self._call(self.door.delete(thread_id), None))

    # -- reading ---------------------------------------------------------------

    async def get_state(self, thread_id: str, *, version: int | None = None) -> ThreadSnapshot[S]:
        self.door.thread_id(thread_id)
        if version is not None:
            check_version(version)
        return await stored_state(self.snapshots, self.codec, thread_id, version)

    async def history(
        self,
        thread_id: str,
        *,
        start: int = 1,
        stop: int | None = None,
        limit: int | None = None,
        before: int | None = None,
    ) -> list[StepInfo]:
        self.door.thread_id(thread_id)
        limit, before = check_page(start, stop, limit, before)
        return await read_history(
            self.snapshots, self.codec, thread_id, start, stop, limit=limit, before=before
        )

    async def threads(self) -> list[str]:
        return await self.snapshots.threads()
