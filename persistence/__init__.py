"""What makes threads durable: snapshot stores, the record codec, the journal, and the
cross-conversation store."""

from threadline.actors import ConflictError as ConflictError
from threadline.actors import FencedError as FencedError
from threadline.actors import PersistenceError as PersistenceError
from threadline.actors import SnapshotCorruptError as SnapshotCorruptError
from threadline.actors import SnapshotFormatError as SnapshotFormatError
from threadline.actors import StoreUnavailableError as StoreUnavailableError

from ._codec import FORMAT_VERSION as FORMAT_VERSION
from ._codec import Codec as Codec
from ._journal import ThreadJournal as ThreadJournal
from ._journal import load_thread as load_thread
from ._journal import read_history as read_history
from ._kv import Item as Item
from ._kv import MemoryStore as MemoryStore
from ._kv import Namespace as Namespace
from ._kv import Store as Store
from ._kv_redis import RedisStore as RedisStore
from ._kv_sqlite import SqliteStore as SqliteStore
from ._redis import RedisSnapshotStore as RedisSnapshotStore
from ._sqlite import SqliteSnapshotStore as SqliteSnapshotStore
from ._store import CommitRequest as CommitRequest
from ._store import MemorySnapshotStore as MemorySnapshotStore
from ._store import SnapshotStore as SnapshotStore
from ._store import StoredThread as StoredThread

__all__ = (
    "Codec",
    "CommitRequest",
    "ConflictError",
    "FORMAT_VERSION",
    "FencedError",
    "Item",
    "MemorySnapshotStore",
    "MemoryStore",
    "Namespace",
    "PersistenceError",
    "RedisSnapshotStore",
    "RedisStore",
    "SnapshotCorruptError",
    "SnapshotFormatError",
    "SnapshotStore",
    "SqliteSnapshotStore",
    "SqliteStore",
    "Store",
    "StoreUnavailableError",
    "StoredThread",
    "ThreadJournal",
    "load_thread",
    "read_history",
)
