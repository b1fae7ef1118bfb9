"""The cross-conversation Store: one conformance suite for memory, SQLite and Redis."""

from __future__ import annotations

import datetime
import math
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import pytest
import redis

from threadline.actors import (
    InvalidInputError,
    SnapshotFormatError,
    StoreUnavailableError,
    ThreadlineError,
)
from threadline.persistence import Item, MemoryStore, RedisStore, SqliteStore, Store

pytestmark = pytest.mark.anyio

OpenStore = Callable[[], Store]

TTL = 0.3
AFTER_TTL = 0.6


@pytest.fixture
def kind(store_kind: str) -> str:
    """memory, sqlite, redis: conftest's ``store_kind`` (which starts redis-server or skips)."""
    return store_kind


@pytest.fixture
def kv_prefix() -> str:
    return f"kv{uuid4().hex}"


@pytest.fixture
def open_kv(kind: str, tmp_path: Path, kv_prefix: str, request: pytest.FixtureRequest) -> OpenStore:
    """A new, not yet entered store on this test's backend (same data every time)."""
    memory = MemoryStore()

    def _open() -> Store:
        if kind == "memory":
            return memory
        if kind == "sqlite":
            return SqliteStore(tmp_path / "store.db")
        server = request.getfixturevalue("redis_server")
        return RedisStore.from_url(server.url, prefix=kv_prefix)

    return _open


@pytest.fixture
async def store(open_kv: OpenStore) -> AsyncIterator[Store]:
    async with open_kv() as s:
        yield s


async def keys_of(store: Store, prefix: tuple[str, ...] = (), **kw: Any) -> list[Any]:
    return [(i.namespace, i.key) for i in await store.search(prefix, limit=1000, **kw)]


# -- basics ------------------------------------------------------------------------


async def test_is_a_store(store: Store) -> None:
    assert isinstance(store, Store)


async def test_put_get_round_trip(store: Store) -> None:
    value = {
        "name": "Ada",
        "age": 36,
        "score": 1.5,
        "whole": 2.0,
        "ok": True,
        "none": None,
        "tags": ["x", "y"],
        "pair": ("p", 1),
        "nested": {"deep": {"list": [1, {"k": "v"}]}},
        "big": 2**70,
        "unicode": "café 😀",
    }
    before = time.time()
    await store.put(("users", "u1"), "profile", value)
    after = time.time()
    item = await store.get(("users", "u1"), "profile")
    assert isinstance(item, Item)
    assert item.namespace == ("users", "u1")
    assert isinstance(item.namespace, tuple)
    assert item.key == "profile"
    assert item.value == {**value, "pair": ["p", 1]}  # JSON: tuples read back as lists
    assert isinstance(item.value["whole"], float)
    assert isinstance(item.value["ok"], bool)
    assert before - 1 <= item.created_at == item.updated_at <= after + 1
    assert item.expires_at is None
    assert await store.get(("users", "u1"), "other") is None
    assert await store.get(("users", "u2"), "profile") is None
    assert await store.get(("users",), "profile") is None


async def test_overwrite_keeps_created_at(store: Store) -> None:
    await store.put(("n",), "k", {"v": 1})
    first = await store.get(("n",), "k")
    assert first is not None
    await anyio.sleep(0.02)
    await store.put(("n",), "k", {"w": 2})
    second = await store.get(("n",), "k")
    assert second is not None
    assert second.value == {"w": 2}  # replaced, not merged
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at
    assert await keys_of(store) == [(("n",), "k")]


async def test_delete(store: Store) -> None:
    await store.put(("n",), "a", {"v": 1})
    await store.put(("n",), "b", {"v": 2})
    await store.delete(("n",), "a")
    assert await store.get(("n",), "a") is None
    assert (await store.get(("n",), "b")) is not None
    assert await keys_of(store) == [(("n",), "b")]
    await store.delete(("n",), "a")  # again: no error
    await store.delete(("nope",), "x")
    await store.delete(("n",), "b")
    assert await keys_of(store) == []
    assert await store.list_namespaces() == []
    await store.put(("n",), "a", {"v": 3})  # a deleted key can be put again
    item = await store.get(("n",), "a")
    assert item is not None
    assert item.value == {"v": 3}


async def test_values_are_copies(store: Store) -> None:
    value: dict[str, Any] = {"list": [1], "d": {"x": 1}}
    await store.put(("n",), "k", value)
    value["list"].append(2)
    value["d"]["x"] = 99
    item = await store.get(("n",), "k")
    assert item is not None
    assert item.value == {"list": [1], "d": {"x": 1}}
    item.value["list"].append(3)
    again = await store.get(("n",), "k")
    assert again is not None
    assert again.value == {"list": [1], "d": {"x": 1}}


# -- search: prefix, order, filter, paging --------------------------------------------

TRICKY = [
    ("a",),
    ("a", "a"),
    ("a", "b"),
    ("a", "b", "c"),
    ("a", "b c"),
    ("a", "b/c"),
    ("a", "b.c"),
    ("a", "bc"),
    ("a b",),
    ("a.b",),
    ("a/b",),
    ("ab",),
    ("ab", "x"),
    ("a%",),
    ("a_",),
    ("%",),
    ("_",),
    ("b",),
    ("A",),
    ("é",),
    ("😀",),
]


async def fill_tricky(store: Store) -> list[tuple[tuple[str, ...], str]]:
    pairs = [(ns, k) for ns in TRICKY for k in ("k2", "k1", "K")]
    # Insert in an order unrelated to the sorted one.
    for ns, k in sorted(pairs, key=lambda p: (p[1], repr(p[0])[::-1])):
        await store.put(ns, k, {"ns": list(ns), "key": k})
    return sorted(pairs)


async def test_search_order_is_namespace_then_key(store: Store) -> None:
    expected = await fill_tricky(store)
    got = await keys_of(store)
    assert got == expected  # Python (namespace, key) tuple order, code point by code point
    # spot checks of what that order means
    assert got.index((("a",), "k1")) < got.index(
        (("a", "a"), "K")
    )  # a namespace before its children
    assert got.index((("a", "bc"), "K")) < got.index((("a b",), "K"))  # ("a", ...) before ("a b",)
    for item in await store.search((), limit=1000):
        assert item.value == {"ns": list(item.namespace), "key": item.key}


@pytest.mark.parametrize(
    "prefix",
    [
        ("a",),
        ("a", "b"),
        ("a", "b c"),
        ("a", "b/c"),
        ("a.b",),
        ("ab",),
        ("a%",),
        ("%",),
        ("_",),
        ("a", "b", "c"),
        ("a", "b", "c", "d"),
        ("zzz",),
        (),  # everything
    ],
    ids=repr,
)
async def test_prefix_matching_is_exact_per_segment(store: Store, prefix: tuple[str, ...]) -> None:
    everything = await fill_tricky(store)
    expected = [(ns, k) for ns, k in everything if ns[: len(prefix)] == prefix]
    assert await keys_of(store, prefix) == expected
    expected_ns = sorted({ns for ns, _ in expected})
    assert await store.list_namespaces(prefix=prefix, limit=1000) == expected_ns


async def test_tenant_isolation(store: Store) -> None:
    await store.put(("a",), "k", {"t": "a"})
    await store.put(("ab",), "k", {"t": "ab"})
    await store.put(("ab", "x"), "k", {"t": "ab/x"})
    await store.put(("a.b",), "k", {"t": "a.b"})
    await store.put(("a", "b"), "k", {"t": "a/b"})
    await store.put(("a", "b c"), "k", {"t": "a/b c"})
    await store.put(("a", "b/c"), "k", {"t": "a/b/c"})
    assert [i.value["t"] for i in await store.search(("a",))] == ["a", "a/b", "a/b c", "a/b/c"]
    assert [i.value["t"] for i in await store.search(("a", "b"))] == ["a/b"]
    assert [i.value["t"] for i in await store.search(("ab",))] == ["ab", "ab/x"]
    assert [i.value["t"] for i in await store.search(("a.b",))] == ["a.b"]
    assert await store.list_namespaces(prefix=("a",)) == [
        ("a",),
        ("a", "b"),
        ("a", "b c"),
        ("a", "b/c"),
    ]
    assert await store.get(("a", "b"), "k") != await store.get(("a", "b c"), "k")


SPECIAL = [
    "%",
    "%25",
    "%2F",
    "%%",
    "/",
    "a/b",
    ".",
    "..",
    ":",
    "a:b",
    "{",
    "}",
    "{tag}",
    "*",
    "?",
    "[",
    "]",
    "\\",
    "'",
    '"',
    " ",
    " lead",
    "trail ",
    "-",
    "+",
    "(",
    "ü",
    "日本語",
    "😀",
    "\u2028",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "x" * 300,
]


async def test_special_characters_round_trip(store: Store) -> None:
    stored: list[tuple[tuple[str, ...], str]] = []
    for i, seg in enumerate(SPECIAL):
        ns: tuple[str, ...] = ("t", seg, f"n{i}")
        key = seg
        await store.put(ns, key, {"seg": seg})
        stored.append((ns, key))
        await store.put((seg,), key, {"seg": seg})
        stored.append(((seg,), key))
    for ns, key in stored:
        item = await store.get(ns, key)
        assert item is not None, (ns, key)
        assert item.namespace == ns
        assert item.key == key
        assert item.value == {"seg": key}
    assert await keys_of(store) == sorted(stored)
    assert await store.list_namespaces(limit=1000) == sorted({ns for ns, _ in stored})
    for seg in SPECIAL:  # each single-segment namespace sees only itself
        assert await keys_of(store, (seg,)) == [((seg,), seg)]


async def test_filter(store: Store) -> None:
    for i in range(10):
        await store.put(("docs",), f"d{i}", {"i": i, "even": i % 2 == 0, "meta": {"g": i // 5}})
    await store.put(("docs", "sub"), "x", {"even": True, "i": 100})
    await store.put(("other",), "y", {"even": True})

    def ids(items: list[Item]) -> list[str]:
        return [i.key for i in items]

    assert ids(await store.search(("docs",), filter={"even": True}, limit=100)) == [
        "d0",
        "d2",
        "d4",
        "d6",
        "d8",
        "x",
    ]
    # filter before offset/limit
    assert ids(await store.search(("docs",), filter={"even": True}, limit=2, offset=1)) == [
        "d2",
        "d4",
    ]
    assert ids(await store.search(("docs",), filter={"even": True}, limit=3, offset=4)) == [
        "d8",
        "x",
    ]
    assert ids(await store.search(("docs",), filter={"i": 3, "even": False})) == ["d3"]
    assert ids(await store.search(("docs",), filter={"i": 3, "even": True})) == []
    assert ids(await store.search(("docs",), filter={"meta": {"g": 1}}, limit=100)) == [
        "d5",
        "d6",
        "d7",
        "d8",
        "d9",
    ]
    assert ids(await store.search(("docs",), filter={"missing": None})) == []
    assert ids(await store.search(("docs",), filter={})) == ids(await store.search(("docs",)))
    assert ids(await store.search((), filter={"even": True}, limit=100))[-1] == "y"


async def test_filter_json_equality(store: Store) -> None:
    await store.put(("f",), "bool", {"v": True})
    await store.put(("f",), "int", {"v": 1})
    await store.put(("f",), "float", {"v": 1.0})
    await store.put(("f",), "str", {"v": "1"})
    await store.put(("f",), "null", {"v": None})
    await store.put(("f",), "list", {"v": [1, 2]})
    await store.put(("f",), "absent", {"w": 1})

    async def matching(v: Any) -> set[str]:
        return {i.key for i in await store.search(("f",), filter={"v": v})}

    assert await matching(True) == {"bool"}
    assert await matching(1) == {"int", "float"}
    assert await matching(1.0) == {"int", "float"}
    assert await matching("1") == {"str"}
    assert await matching(None) == {"null"}
    assert await matching([1, 2]) == {"list"}
    assert await matching((1, 2)) == {"list"}
    assert await matching([2, 1]) == set()
    assert await matching(False) == set()


async def test_limit_and_offset(store: Store) -> None:
    for i in range(25):
        await store.put(("p", f"g{i % 3}"), f"k{i:02d}", {"i": i})
    everything = await keys_of(store)
    assert len(everything) == 25
    assert [(i.namespace, i.key) for i in await store.search(("p",))] == everything[:10]
    pages: list[tuple[tuple[str, ...], str]] = []
    for offset in range(0, 30, 7):
        pages.extend(
            (i.namespace, i.key) for i in await store.search(("p",), limit=7, offset=offset)
        )
    assert pages == everything
    assert await store.search(("p",), limit=0) == []
    assert await store.search(("p",), offset=25) == []
    assert [(i.namespace, i.key) for i in await store.search(("p",), offset=24)] == everything[24:]


async def test_list_namespaces(store: Store) -> None:
    for ns in [
        ("users", "u1", "prefs"),
        ("users", "u1", "facts"),
        ("users", "u2", "prefs"),
        ("users", "u10"),
        ("users",),
        ("orgs", "o1"),
        ("usersx", "u1"),
    ]:
        await store.put(ns, "k1", {})
        await store.put(ns, "k2", {})
    assert await store.list_namespaces() == [
        ("orgs", "o1"),
        ("users",),
        ("users", "u1", "facts"),
        ("users", "u1", "prefs"),
        ("users", "u10"),
        ("users", "u2", "prefs"),
        ("usersx", "u1"),
    ]
    assert await store.list_namespaces(max_depth=1) == [("orgs",), ("users",), ("usersx",)]
    assert await store.list_namespaces(prefix=("users",), max_depth=2) == [
        ("users",),
        ("users", "u1"),
        ("users", "u10"),
        ("users", "u2"),
    ]
    assert await store.list_namespaces(prefix=("users", "u1")) == [
        ("users", "u1", "facts"),
        ("users", "u1", "prefs"),
    ]
    assert await store.list_namespaces(prefix=("users",), max_depth=2, limit=2, offset=1) == [
        ("users", "u1"),
        ("users", "u10"),
    ]
    assert await store.list_namespaces(max_depth=1, offset=2) == [("usersx",)]
    assert await store.list_namespaces(max_depth=1, limit=0) == []
    assert await store.list_namespaces(prefix=("nothing",)) == []
    assert await store.list_namespaces(prefix=()) == await store.list_namespaces()


async def test_list_namespaces_pages_over_many(store: Store) -> None:
    namespaces = [("many", f"n{i:04d}") for i in range(120)]
    for ns in namespaces:
        await store.put(ns, "k", {})
    assert await store.list_namespaces(prefix=("many",), limit=1000) == namespaces
    assert await store.list_namespaces(prefix=("many",)) == namespaces[:100]
    assert await store.list_namespaces(prefix=("many",), offset=110) == namespaces[110:]
    assert await store.list_namespaces(max_depth=1) == [("many",)]


# -- ttl ---------------------------------------------------------------------------------


async def test_ttl_expiry(store: Store) -> None:
    before = time.time()
    await store.put(("t",), "short", {"v": 1}, ttl=TTL)
    await store.put(("t",), "long", {"v": 2})
    await store.put(("t", "only-short"), "k", {"v": 3}, ttl=TTL)
    item = await store.get(("t",), "short")
    assert item is not None
    assert item.expires_at is not None
    assert before + TTL - 0.05 <= item.expires_at <= time.time() + TTL + 0.05
    assert await keys_of(store) == [(("t",), "long"), (("t",), "short"), (("t", "only-short"), "k")]

    await anyio.sleep(AFTER_TTL)
    assert await store.get(("t",), "short") is None
    assert await store.get(("t", "only-short"), "k") is None
    assert await keys_of(store) == [(("t",), "long")]
    assert await keys_of(store, ("t", "only-short")) == []
    assert await store.list_namespaces() == [("t",)]
    assert await store.list_namespaces(max_depth=1) == [("t",)]
    assert await store.search(("t",), filter={"v": 1}) == []

    # Putting an expired key again starts a new item.
    await store.put(("t",), "short", {"v": 4})
    again = await store.get(("t",), "short")
    assert again is not None
    assert again.value == {"v": 4}
    assert again.expires_at is None
    assert again.created_at > item.created_at


async def test_overwrite_without_ttl_removes_expiry(store: Store) -> None:
    await store.put(("t",), "k", {"v": 1}, ttl=TTL)
    await store.put(("t",), "k", {"v": 2})
    await store.put(("t",), "k2", {"v": 1})
    await store.put(("t",), "k2", {"v": 2}, ttl=TTL)  # and a ttl can be added
    await anyio.sleep(AFTER_TTL)
    item = await store.get(("t",), "k")
    assert item is not None
    assert item.value == {"v": 2}
    assert item.expires_at is None
    assert await store.get(("t",), "k2") is None


async def test_ttl_renewed_by_put(store: Store) -> None:
    await store.put(("t",), "k", {"v": 1}, ttl=TTL)
    await anyio.sleep(TTL / 2)
    await store.put(("t",), "k", {"v": 2}, ttl=10)
    await anyio.sleep(AFTER_TTL)
    item = await store.get(("t",), "k")
    assert item is not None
    assert item.value == {"v": 2}


async def count_stored(kind: str, store: Store, tmp_path: Path, prefix: str) -> int:
    """Items physically kept by the backend, expired or not."""
    if kind == "memory":
        assert isinstance(store, MemoryStore)
        return len(store._items)
    if kind == "sqlite":
        with sqlite3.connect(tmp_path / "store.db") as conn:
            return int(conn.execute("SELECT count(*) FROM store_items").fetchone()[0])
    assert isinstance(store, RedisStore)
    return int(await store._client.zcard(f"{{{prefix}}}:index"))


async def test_expired_items_are_purged(
    kind: str, store: Store, tmp_path: Path, kv_prefix: str
) -> None:
    for i in range(5):
        await store.put(("t",), f"k{i}", {"v": i}, ttl=TTL)
    await store.put(("t",), "keep", {"v": 0})
    assert await count_stored(kind, store, tmp_path, kv_prefix) == 6
    await anyio.sleep(AFTER_TTL)
    # a write (memory, sqlite) or a scan (redis) purges what expired
    await store.put(("u",), "x", {})
    assert len(await store.search(("t",))) == 1
    assert await count_stored(kind, store, tmp_path, kv_prefix) == 2


# -- bad input ---------------------------------------------------------------------------


class Obj:
    pass


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"d": value}
    return value


def cyclic() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


BAD_NAMESPACES = [
    pytest.param("users", "tuple", id="str"),
    pytest.param(["users"], "tuple", id="list"),
    pytest.param(None, "tuple", id="None"),
    pytest.param((), "empty", id="empty"),
    pytest.param(("a", ""), "segment 1", id="empty-segment"),
    pytest.param(("a", 1), "segment 1", id="int-segment"),
    pytest.param(("a", None), "segment 1", id="None-segment"),
    pytest.param(("a\x00",), "control", id="NUL"),
    pytest.param(("a\x01b",), "control", id="SOH"),
    pytest.param(("a\x02",), "control", id="STX"),
    pytest.param(("a\nb",), "control", id="newline"),
    pytest.param(("\x7f",), "control", id="DEL"),
    pytest.param(("\x85",), "control", id="NEL"),
    pytest.param(("\ud800",), "surrogate", id="surrogate"),
]

BAD_KEYS = [
    pytest.param("", "empty", id="empty"),
    pytest.param(1, "str", id="int"),
    pytest.param(None, "str", id="None"),
    pytest.param(b"k", "str", id="bytes"),
    pytest.param("k\x00", "control", id="NUL"),
    pytest.param("k\x01", "control", id="SOH"),
    pytest.param("\udfff", "surrogate", id="surrogate"),
]

BAD_VALUES = [
    pytest.param("text", "dict", id="str"),
    pytest.param(["a"], "dict", id="list"),
    pytest.param(None, "dict", id="None"),
    pytest.param(42, "dict", id="int"),
    pytest.param({"s": {1, 2}}, "set", id="set"),
    pytest.param({"o": Obj()}, "Obj", id="object"),
    pytest.param({"d": datetime.datetime(2024, 1, 1)}, "datetime", id="datetime"),
    pytest.param({"b": b"bytes"}, "bytes", id="bytes"),
    pytest.param({1: "x"}, "key", id="int-key"),
    pytest.param({"deep": {(1, 2): "x"}}, "key", id="tuple-key"),
    pytest.param({"f": math.nan}, "nan", id="nan"),
    pytest.param({"f": [math.inf]}, "inf", id="inf"),
    pytest.param({"s": "\ud800"}, "surrogate", id="surrogate"),
    pytest.param(nested(200), "deeper", id="too-deep"),
    pytest.param(cyclic(), "deeper", id="cyclic"),
]


async def assert_still_works(store: Store) -> None:
    assert await keys_of(store) == [(("ok",), "k")]
    await store.put(("ok",), "k2", {"fine": True})
    item = await store.get(("ok",), "k2")
    assert item is not None
    assert item.value == {"fine": True}
    await store.delete(("ok",), "k2")


@pytest.mark.parametrize(("namespace", "words"), BAD_NAMESPACES)
async def test_bad_namespace(store: Store, namespace: Any, words: str) -> None:
    await store.put(("ok",), "k", {})
    with pytest.raises(InvalidInputError, match=words) as info:
        await store.put(namespace, "k", {"v": 1})
    assert "namespace" in str(info.value)
    with pytest.raises(InvalidInputError, match=words):
        await store.get(namespace, "k")
    with pytest.raises(InvalidInputError, match=words):
        await store.delete(namespace, "k")
    if namespace != ():  # () is the "everything" prefix of search and list_namespaces
        with pytest.raises(InvalidInputError, match=words):
            await store.search(namespace)
    if namespace not in ((), None):  # None: list_namespaces' "no prefix"
        with pytest.raises(InvalidInputError, match=words):
            await store.list_namespaces(prefix=namespace)
    await assert_still_works(store)


@pytest.mark.parametrize(("key", "words"), BAD_KEYS)
async def test_bad_key(store: Store, key: Any, words: str) -> None:
    await store.put(("ok",), "k", {})
    with pytest.raises(InvalidInputError, match=words) as info:
        await store.put(("ok",), key, {"v": 1})
    assert "key" in str(info.value)
    with pytest.raises(InvalidInputError, match=words):
        await store.get(("ok",), key)
    with pytest.raises(InvalidInputError, match=words):
        await store.delete(("ok",), key)
    await assert_still_works(store)


@pytest.mark.parametrize(("value", "words"), BAD_VALUES)
async def test_bad_value(store: Store, value: Any, words: str) -> None:
    await store.put(("ok",), "k", {})
    with pytest.raises(InvalidInputError, match=words) as info:
        await store.put(("ok",), "bad", value)
    assert isinstance(info.value, ThreadlineError)
    assert isinstance(info.value, ValueError)
    assert await store.get(("ok",), "bad") is None
    # A rejected overwrite leaves the old value alone.
    with pytest.raises(InvalidInputError):
        await store.put(("ok",), "k", value)
    item = await store.get(("ok",), "k")
    assert item is not None
    assert item.value == {}
    await assert_still_works(store)


@pytest.mark.parametrize(
    ("ttl", "words"),
    [
        (0, "positive"),
        (-1, "positive"),
        (math.nan, "positive"),
        (math.inf, "positive"),
        ("1", "number"),
        (True, "number"),
    ],
    ids=["zero", "negative", "nan", "inf", "str", "bool"],
)
async def test_bad_ttl(store: Store, ttl: Any, words: str) -> None:
    await store.put(("ok",), "k", {})
    with pytest.raises(InvalidInputError, match=words):
        await store.put(("ok",), "t", {"v": 1}, ttl=ttl)
    assert await store.get(("ok",), "t") is None
    await assert_still_works(store)


async def test_bad_search_and_list_arguments(store: Store) -> None:
    await store.put(("ok",), "k", {})
    with pytest.raises(InvalidInputError, match="limit"):
        await store.search(("ok",), limit=-1)
    with pytest.raises(InvalidInputError, match="limit"):
        await store.search(("ok",), limit="3")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="offset"):
        await store.search(("ok",), offset=-1)
    with pytest.raises(InvalidInputError, match="offset"):
        await store.search(("ok",), offset=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="filter"):
        await store.search(("ok",), filter=["a"])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="filter"):
        await store.search(("ok",), filter={"s": {1}})
    with pytest.raises(InvalidInputError, match="max_depth"):
        await store.list_namespaces(max_depth=0)
    with pytest.raises(InvalidInputError, match="limit"):
        await store.list_namespaces(limit=-5)
    with pytest.raises(InvalidInputError, match="offset"):
        await store.list_namespaces(offset=True)
    await assert_still_works(store)


# -- durability, concurrency, backends ---------------------------------------------


async def test_survives_reopen(kind: str, open_kv: OpenStore) -> None:
    if kind == "memory":
        pytest.skip("a memory store is gone with its process")
    async with open_kv() as first:
        await first.put(("users", "u/1"), "profile", {"name": "Ada", "n": [1, 2.5]})
        await first.put(("users", "u/1"), "gone", {"x": 1})
        await first.delete(("users", "u/1"), "gone")
        await first.put(("users", "u/1"), "temp", {"x": 1}, ttl=TTL)
        original = await first.get(("users", "u/1"), "profile")
    async with open_kv() as second:
        item = await second.get(("users", "u/1"), "profile")
        assert item == original
        assert await second.get(("users", "u/1"), "gone") is None
        assert await keys_of(second) == [
            (("users", "u/1"), "profile"),
            (("users", "u/1"), "temp"),
        ]
        await anyio.sleep(AFTER_TTL)
        assert await keys_of(second) == [(("users", "u/1"), "profile")]
        assert await second.list_namespaces() == [("users", "u/1")]


async def test_nested_enter(open_kv: OpenStore) -> None:
    store = open_kv()
    async with store:
        async with store:
            await store.put(("n",), "k", {"v": 1})
        # still open after the inner exit
        item = await store.get(("n",), "k")
        assert item is not None


async def test_closed_store_raises(kind: str, open_kv: OpenStore) -> None:
    if kind == "memory":
        pytest.skip("a memory store has nothing to close")
    store = open_kv()
    with pytest.raises(StoreUnavailableError):
        await store.get(("n",), "k")
    async with store:
        await store.put(("n",), "k", {})
    with pytest.raises(StoreUnavailableError):
        await store.put(("n",), "k", {})
    with pytest.raises(StoreUnavailableError):
        await store.search(("n",))


async def test_concurrent_puts(store: Store) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(store.put, ("c", f"g{i % 5}"), f"k{i:02d}", {"i": i})
    items = await store.search(("c",), limit=100)
    assert len(items) == 50
    assert sorted(i.value["i"] for i in items) == list(range(50))
    assert await store.list_namespaces(prefix=("c",)) == [("c", f"g{i}") for i in range(5)]


async def test_sqlite_uses_a_range_not_like(tmp_path: Path) -> None:
    path = tmp_path / "plan.db"
    async with SqliteStore(path) as store:
        await store.put(("a", "b"), "k", {})
    with sqlite3.connect(path) as conn:
        stored = conn.execute("SELECT ns, key FROM store_items").fetchall()
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT ns FROM store_items WHERE ns >= ? AND ns < ?"
                " ORDER BY ns, key",
                ("a\x02", "a\x03"),
            )
        )
    assert stored == [("a\x02b\x02", "k")]
    assert "SEARCH" in plan and "ns>? AND ns<?" in plan.replace("=", "")


async def test_sqlite_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with SqliteStore(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE store_meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(SnapshotFormatError):
        async with SqliteStore(path):
            pass


@pytest.mark.redis
async def test_redis_prefixes_are_isolated(redis_server: Any) -> None:
    a, b = f"kv{uuid4().hex}", f"kv{uuid4().hex}"
    async with (
        RedisStore.from_url(redis_server.url, prefix=a) as sa,
        RedisStore.from_url(redis_server.url, prefix=b) as sb,
        RedisStore.from_url(redis_server.url, prefix=a + "x") as sax,
    ):
        await sa.put(("n",), "k", {"who": "a"})
        await sb.put(("n",), "k", {"who": "b"})
        assert (await sa.get(("n",), "k")) is not None
        assert [i.value for i in await sa.search(())] == [{"who": "a"}]
        assert [i.value for i in await sb.search(())] == [{"who": "b"}]
        assert await sax.search(()) == []
        assert await sax.list_namespaces() == []


@pytest.mark.redis
async def test_redis_keys_share_one_hash_tag(redis_server: Any, kv_prefix: str) -> None:
    async with RedisStore.from_url(redis_server.url, prefix=kv_prefix) as store:
        await store.put(("a{b}", "c}"), "{k}", {}, ttl=60)
        await store.put(("x",), "y", {})
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k for k in client.scan_iter(match=f"{{{kv_prefix}}}:*")]
        assert len(keys) == 3
        for k in keys:
            assert k.startswith(f"{{{kv_prefix}}}:".encode())
        ttl = [client.pttl(k) for k in keys if b"a{b}" in k]
        assert len(ttl) == 1 and 0 < ttl[0] <= 60_000
    finally:
        client.close()


@pytest.mark.redis
async def test_redis_expired_member_is_not_lost_by_a_racing_put(
    redis_server: Any, kv_prefix: str
) -> None:
    async with RedisStore.from_url(redis_server.url, prefix=kv_prefix) as store:
        await store.put(("t",), "k", {"v": 1}, ttl=TTL)
        await anyio.sleep(AFTER_TTL)
        await store.put(("t",), "k", {"v": 2})  # before any reader purged the old member
        assert [i.value for i in await store.search(("t",))] == [{"v": 2}]
        assert await store.list_namespaces() == [("t",)]


def test_redis_bad_prefix() -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisStore(redis.asyncio.Redis(), prefix="a{b}")
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(redis.asyncio.Redis(), prefix="")
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(redis.asyncio.Redis(decode_responses=True))


@pytest.mark.redis
async def test_redis_down_is_store_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    async with RedisStore.from_url(f"redis://127.0.0.1:{port}/0", prefix="down") as store:
        with pytest.raises(StoreUnavailableError) as info:
            await store.put(("n",), "k", {})
        assert isinstance(info.value.__cause__, redis.RedisError)
        with pytest.raises(StoreUnavailableError):
            await store.get(("n",), "k")
        with pytest.raises(StoreUnavailableError):
            await store.search(("n",))
        with pytest.raises(StoreUnavailableError):
            await store.list_namespaces()
