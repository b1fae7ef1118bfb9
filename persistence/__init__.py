"""What makes threads durable: snapshot stores, the record codec, the journal, and the
cross-conversation store."""

from threadline.actors import ConflictError as ConflictError
from threadline.actors import FencedError as FencedError
from threadline.actors import ItemCorruptError as ItemCorruptError
from threadline.actors import PersistenceError as PersistenceError
from threadline.actors import SnapshotCorruptError as SnapshotCorruptError
from threadline.actors import SnapshotFormatError as SnapshotFormatError
from threadline.actors import StoreUnavailableError as StoreUnavailableError

from ._codec import FORMAT_VERSION as FORMAT_VERSION
from ._codec import Codec as Codec
from ._inbox import decode_envelope as decode_envelope
from ._inbox import encode_envelope as encode_envelope
from ._items import Item as Item
from ._items import MemoryStore as MemoryStore
from ._items import Namespace as Namespace
from ._items import Store as Store
from ._items_redis import RedisStore as RedisStore
from ._items_sqlite import SqliteStore as SqliteStore
from ._journal import ThreadJournal as ThreadJournal
from ._journal import load_thread as load_thread
from ._journal import read_history as read_history
from ._open import open_snapshot_store as open_snapshot_store
from ._snapshots import CommitRequest as CommitRequest
from ._snapshots import DeadLetter as DeadLetter
from ._snapshots import InboxEntry as InboxEntry
from ._snapshots import MemorySnapshotStore as MemorySnapshotStore
from ._snapshots import RecoverableThread as RecoverableThread
from ._snapshots import SnapshotStore as SnapshotStore
from ._snapshots import StoredThread as StoredThread
from ._snapshots_redis import RedisSnapshotStore as RedisSnapshotStore
from ._snapshots_sqlite import SqliteSnapshotStore as SqliteSnapshotStore

__all__ = (
    "Codec",
    "CommitRequest",
    "ConflictError",
    "DeadLetter",
    "FORMAT_VERSION",
    "FencedError",
    "InboxEntry",
    "Item",
    "ItemCorruptError",
    "MemorySnapshotStore",
    "MemoryStore",
    "Namespace",
    "PersistenceError",
    "RecoverableThread",
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
    "decode_envelope",
    "encode_envelope",
    "load_thread",
    "open_snapshot_store",
    "read_history",
)
