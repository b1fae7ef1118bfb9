"""The cross-conversation ``Store``: namespaced JSON documents shared by all threads.

A thread's state is its short-term memory; the store is long-term memory that
outlives one conversation (user profiles, preferences, facts learned). Every
item lives under a *namespace* (a tuple of strings, e.g. ``("users", "u42",
"prefs")``) and a *key*; its value is a JSON object.

Rules shared by every implementation (memory, SQLite, Redis):

- A namespace is a non-empty ``tuple`` of non-empty ``str`` segments. A bare
  string is refused (``"users"`` is not ``("users",)``). Segments may hold any
  character (dots, slashes, spaces, ``%``, braces, any Unicode) except control
  characters (U+0000..U+001F, U+007F..U+009F) and lone surrogates.
- A key is a non-empty ``str`` under the same character rules.
- A value is a ``dict`` with ``str`` keys whose leaves are ``None``, ``bool``,
  ``int``, finite ``float``, ``str``, ``list``/``tuple`` or nested such dicts.
  It is stored as JSON, so it reads back as plain JSON types (tuples come back
  as lists). Anything else (a set, a datetime, an object, NaN) is refused.
- Prefix matching is exact per segment: the prefix ``("a",)`` matches
  ``("a",)`` and ``("a", "x")``, never ``("ab",)`` or ``("a.b",)``.
- Results are ordered by namespace, then key: namespaces compare segment by
  segment (a namespace sorts before its extensions) and strings compare by
  Unicode code point, i.e. Python's own ``(namespace, key)`` tuple order.
- ``filter`` is an exact match on top-level value keys, applied *before*
  ``offset`` and ``limit``. JSON equality: ``1 == 1.0``, but ``True != 1``.
- An item put with ``ttl`` (seconds) expires ``ttl`` seconds later; expired
  items are invisible to ``get``, ``search`` and ``list_namespaces`` and are
  purged lazily.

Bad arguments raise :class:`~threadline.actors.InvalidInputError` naming the
problem (nothing is stored); backend failures raise
:class:`~threadline.actors.StoreUnavailableError`.
"""

from __future__ import annotations

import bisect
import heapq
import math
import re
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Protocol, Self, runtime_checkable

import msgspec

from threadline.actors import InvalidInputError

from ._lifecycle import Reentrant

__all__ = ["Item", "MemoryStore", "Namespace", "Store"]

Namespace = tuple[str, ...]

MAX_VALUE_DEPTH: Final = 100
"""How deeply a value may nest (dicts and lists); deeper values are refused."""

_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


class Item(msgspec.Struct, frozen=True, kw_only=True):
    """One stored document, as ``get`` and ``search`` return it.

    ``value`` is a fresh dict on every read: changing it changes nothing stored.
    Times are seconds since the epoch (``time.time()``); ``created_at`` is kept
    when an item is overwritten, ``updated_at`` is the last ``put``.
    ``expires_at`` is None for an item without ttl.
    """

    namespace: Namespace
    key: str
    value: dict[str, Any]
    created_at: float
    updated_at: float
    expires_at: float | None = None


@runtime_checkable
class Store(Protocol):
    """Cross-conversation memory: JSON objects under (namespace, key).

    Stores are async context managers; entering an open store again is allowed
    and the last exit closes it.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def put(
        self, namespace: Namespace, key: str, value: dict[str, Any], *, ttl: float | None = None
    ) -> None:
        """Create or replace the item; with ``ttl`` it expires that many seconds from now."""
        ...

    async def get(self, namespace: Namespace, key: str) -> Item | None:
        """The live item, or None if there is none (or it expired)."""
        ...

    async def delete(self, namespace: Namespace, key: str) -> None:
        """Remove the item (nothing happens if there is none)."""
        ...

    async def search(
        self,
        namespace_prefix: Namespace,
        *,
        filter: dict[str, Any] | None = None,
        limit: int = 10,
        offset: int = 0,
    ) -> list[Item]:
        """Live items whose namespace starts with ``namespace_prefix`` (``()`` = all).

        Ordered by namespace, then key. ``filter`` keeps items whose value has
        every given top-level key with an equal value; ``offset`` and ``limit``
        apply to the filtered sequence.
        """
        ...

    async def list_namespaces(
        self,
        *,
        prefix: Namespace | None = None,
        max_depth: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Namespace]:
        """Distinct namespaces holding live items, sorted, optionally under ``prefix``.

        With ``max_depth``, longer namespaces are truncated to their first
        ``max_depth`` segments and duplicates removed (before offset/limit).
        """
        ...


# -- validation (shared by every implementation) ------------------------------


def _check_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a str, got {type(text).__name__}")
    if not text:
        raise InvalidInputError(f"{what} must not be empty")
    bad = _CONTROL.search(text)
    if bad is not None:
        raise InvalidInputError(
            f"{what} {text!r} contains a control character (U+{ord(bad.group()):04X})"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{what} {text!r} is not valid Unicode (lone surrogate)") from exc
    return text


def check_namespace(
    namespace: object, *, what: str = "namespace", empty_ok: bool = False
) -> Namespace:
    """``namespace`` if it is a valid namespace, else ``InvalidInputError``."""
    if isinstance(namespace, str):
        raise InvalidInputError(
            f"{what} must be a tuple of strings, got the str {namespace!r} "
            f"(did you mean ({namespace!r},)?)"
        )
    if not isinstance(namespace, tuple):
        raise InvalidInputError(
            f"{what} must be a tuple of strings, got {type(namespace).__name__}"
        )
    if not namespace and not empty_ok:
        raise InvalidInputError(f"{what} must not be empty")
    for i, segment in enumerate(namespace):
        _check_text(segment, f"{what} segment {i}")
    return tuple(namespace)


def check_key(key: object) -> str:
    """``key`` if it is a valid item key, else ``InvalidInputError``."""
    return _check_text(key, "key")


def check_ttl(ttl: object) -> float | None:
    """``ttl`` as float seconds (None = no expiry), else ``InvalidInputError``."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise InvalidInputError(
            f"ttl must be a number of seconds or None, got {type(ttl).__name__}"
        )
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidInputError(f"ttl must be a positive, finite number of seconds, got {ttl!r}")
    return float(ttl)


def check_count(value: object, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidInputError(f"{what} must be at least {minimum}, got {value}")
    return value


def check_max_depth(max_depth: object) -> int | None:
    if max_depth is None:
        return None
    return check_count(max_depth, "max_depth", minimum=1)


def _check_json(value: object, path: str, depth: int) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{path} is {value!r}, which JSON cannot represent")
        return
    if depth >= MAX_VALUE_DEPTH:
        raise InvalidInputError(f"{path} nests deeper than {MAX_VALUE_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidInputError(
                    f"{path} has a {type(k).__name__} key {k!r}; JSON object keys are str"
                )
            _check_json(v, f"{path}[{k!r}]", depth + 1)
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{path}[{i}]", depth + 1)
        return
    raise InvalidInputError(
        f"{path} is a {type(value).__name__}, which is not JSON "
        "(allowed: dict, list, tuple, str, int, float, bool, None)"
    )


def encode_value(value: object, *, what: str = "value") -> bytes:
    """The JSON encoding of a store value (a dict), else ``InvalidInputError``."""
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a dict, got {type(value).__name__}")
    _check_json(value, what, 0)
    try:
        return msgspec.json.encode(value)
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise InvalidInputError(f"{what} cannot be encoded as JSON: {exc}") from exc


def decode_value(raw: bytes | str) -> dict[str, Any]:
    """A stored value back from JSON (a fresh dict)."""
    value = msgspec.json.decode(raw)
    if not isinstance(value, dict):
        raise msgspec.DecodeError(f"stored value is a {type(value).__name__}, not an object")
    return value


def check_filter(filter: object) -> dict[str, Any] | None:
    """The filter normalized to JSON types (None = no filter), else ``InvalidInputError``."""
    if filter is None:
        return None
    return decode_value(encode_value(filter, what="filter"))


def check_search(
    namespace_prefix: object, filter: object, limit: object, offset: object
) -> tuple[Namespace, dict[str, Any] | None, int, int]:
    """``search``'s arguments checked, in order: the prefix, filter, limit, offset."""
    return (
        check_namespace(namespace_prefix, what="namespace_prefix", empty_ok=True),
        check_filter(filter),
        check_count(limit, "limit"),
        check_count(offset, "offset"),
    )


def check_listing(
    prefix: object, max_depth: object, limit: object, offset: object
) -> tuple[Namespace, int | None, int, int]:
    """``list_namespaces``'s arguments checked, in order (no prefix = ``()``)."""
    return (
        () if prefix is None else check_namespace(prefix, what="prefix", empty_ok=True),
        check_max_depth(max_depth),
        check_count(limit, "limit"),
        check_count(offset, "offset"),
    )


def json_equal(a: object, b: object) -> bool:
    """Equality of decoded JSON values (numbers by value, booleans only to booleans)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def matches(value: Mapping[str, Any], filter: Mapping[str, Any] | None) -> bool:
    """Whether ``value`` has every top-level key of ``filter`` with an equal value."""
    if not filter:
        return True
    return all(k in value and json_equal(value[k], v) for k, v in filter.items())


class SearchPage:
    """``search``'s filter, offset and limit, applied to live items in store order.

    Every store feeds its items to :meth:`offer` until it returns True (or the
    items run out); :attr:`items` is then the answer. A store that already cut
    the offset itself (in its query) passes ``offset=0``.
    """

    __slots__ = ("_filter", "_limit", "_skip", "items")

    def __init__(self, filter: Mapping[str, Any] | None, limit: int, offset: int) -> None:
        self._filter = filter
        self._limit = limit
        self._skip = offset
        self.items: list[Item] = []

    @property
    def full(self) -> bool:
        """Whether no further item can join the page (true from the start for ``limit=0``)."""
        return len(self.items) >= self._limit

    def offer(self, item: Item) -> bool:
        """Take ``item`` if it matches the filter and the offset is spent; return :attr:`full`."""
        if matches(item.value, self._filter):
            if self._skip:
                self._skip -= 1
            else:
                self.items.append(item)
        return self.full


def ttl_ms(ttl: float) -> int:
    """A ttl in whole milliseconds, rounded up (never 0)."""
    return max(1, math.ceil(ttl * 1000))


# -- the encoded form used by the SQLite and Redis stores -----------------------
#
# Each segment is followed by NS_END; the key follows KEY_MARK. Neither can
# occur inside a segment or key (control characters are refused), so no
# escaping is needed, and because both sort below every allowed character the
# encoded strings (and their UTF-8 bytes) sort exactly like the Python tuples
# ``(namespace, key)``. The items under a prefix P are the strings in
# ``[encode_namespace(P), prefix_upper_bound(P))``: a range, not a pattern.

KEY_MARK: Final = "\x01"
NS_END: Final = "\x02"
_NS_END_NEXT: Final = "\x03"


def encode_namespace(namespace: Namespace) -> str:
    return "".join(segment + NS_END for segment in namespace)


def decode_namespace(encoded: str) -> Namespace:
    if not encoded.endswith(NS_END):
        raise ValueError(f"not an encoded namespace: {encoded!r}")
    return tuple(encoded[:-1].split(NS_END))


def prefix_upper_bound(prefix: Namespace) -> str | None:
    """The smallest string above every encoding under ``prefix`` (None for ``()``)."""
    if not prefix:
        return None
    return encode_namespace(prefix)[:-1] + _NS_END_NEXT


def truncate_namespaces(
    namespaces: list[Namespace], max_depth: int | None, limit: int, offset: int
) -> list[Namespace]:
    """Sorted distinct namespaces after truncation to ``max_depth``, then the page."""
    seen: set[Namespace] = set()
    out: list[Namespace] = []
    for ns in namespaces:
        t = ns if max_depth is None else ns[:max_depth]
        if t not in seen:
            seen.add(t)
            out.append(t)
    out.sort()
    return out[offset : offset + limit]


# -- in memory ------------------------------------------------------------------


class _Entry(msgspec.Struct):
    raw: bytes
    created_at: float
    updated_at: float
    expires_at: float | None


class MemoryStore(Reentrant):
    """Items in this process's memory: for tests and ephemeral deployments.

    Values are kept as JSON bytes, so reads return fresh dicts and a caller
    mutating a value it put or got changes nothing stored. Every method runs
    without awaiting, so each is atomic with respect to the event loop.
    Entering it opens nothing.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[Namespace, str], _Entry] = {}
        self._order: list[tuple[Namespace, str]] = []  # sorted keys of _items
        self._expiry: list[tuple[float, Namespace, str]] = []  # heap

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._items)} items)"

    def _purge(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, ns, key = heapq.heappop(self._expiry)
            entry = self._items.get((ns, key))
            if entry is not None and entry.expires_at == expires_at:
                self._remove((ns, key))

    def _remove(self, k: tuple[Namespace, str]) -> None:
        if self._items.pop(k, None) is not None:
            i = bisect.bisect_left(self._order, k)
            del self._order[i]

    @staticmethod
    def _item(k: tuple[Namespace, str], entry: _Entry) -> Item:
        return Item(
            namespace=k[0],
            key=k[1],
            value=decode_value(entry.raw),
            created_at=entry.created_at,
            updated_at=entry.updated_at,
            expires_at=entry.expires_at,
        )

    async def put(
        self, namespace: Namespace, key: str, value: dict[str, Any], *, ttl: float | None = None
    ) -> None:
        k = (check_namespace(namespace), check_key(key))
        raw = encode_value(value)
        seconds = check_ttl(ttl)
        now = time.time()
        self._purge(now)
        expires_at = None if seconds is None else now + seconds
        old = self._items.get(k)
        if old is None:
            self._items[k] = _Entry(raw, now, now, expires_at)
            bisect.insort(self._order, k)
        else:
            old.raw, old.updated_at, old.expires_at = raw, now, expires_at
        if expires_at is not None:
            heapq.heappush(self._expiry, (expires_at, k[0], k[1]))

    async def get(self, namespace: Namespace, key: str) -> Item | None:
        k = (check_namespace(namespace), check_key(key))
        self._purge(time.time())
        entry = self._items.get(k)
        return None if entry is None else self._item(k, entry)

    async def delete(self, namespace: Namespace, key: str) -> None:
        k = (check_namespace(namespace), check_key(key))
        self._purge(time.time())
        self._remove(k)

    def _under(self, prefix: Namespace) -> list[tuple[Namespace, str]]:
        start = bisect.bisect_left(self._order, (prefix, ""))
        n = len(prefix)
        out: list[tuple[Namespace, str]] = []
        for k in self._order[start:]:
            if k[0][:n] != prefix:
                break
            out.append(k)
        return out

    async def search(
        self,
        namespace_prefix: Namespace,
        *,
        filter: dict[str, Any] | None = None,
        limit: int = 10,
        offset: int = 0,
    ) -> list[Item]:
        prefix, wanted, limit, offset = check_search(namespace_prefix, filter, limit, offset)
        self._purge(time.time())
        page = SearchPage(wanted, limit, offset)
        if not page.full:
            for k in self._under(prefix):
                if page.offer(self._item(k, self._items[k])):
                    break
        return page.items

    async def list_namespaces(
        self,
        *,
        prefix: Namespace | None = None,
        max_depth: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Namespace]:
        p, depth, limit, offset = check_listing(prefix, max_depth, limit, offset)
        self._purge(time.time())
        return truncate_namespaces([ns for ns, _ in self._under(p)], depth, limit, offset)
