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
from ._deployment import DEPLOYMENT_PARTITIONS as DEPLOYMENT_PARTITIONS
from ._deployment import LAYOUT_FORMAT as LAYOUT_FORMAT
from ._deployment import deployment_layout as deployment_layout
from ._deployment import open_redis as open_redis
from ._inbox import decode_envelope as decode_envelope
from ._inbox import encode_envelope as encode_envelope
from ._inbox import read_envelope as read_envelope
from ._inbox_redis import RedisInbox as RedisInbox
from ._inbox_redis import StreamEntry as StreamEntry
from ._items import Item as Item
from ._items import MemoryStore as MemoryStore
from ._items import Namespace as Namespace
from ._items import Store as Store
from ._items_redis import RedisStore as RedisStore
from ._items_sqlite import SqliteStore as SqliteStore
from ._journal import ThreadJournal as ThreadJournal
from ._journal import load_thread as load_thread
from ._journal import load_version as load_version
from ._journal import read_history as read_history
from ._leases import FENCE_CHECK_LUA as FENCE_CHECK_LUA
from ._leases import Lease as Lease
from ._leases import PartitionLeases as PartitionLeases
from ._leases import fenced_script as fenced_script
from ._membership import Membership as Membership
from ._migrate import MigrationReport as MigrationReport
from ._migrate import migrate_layout as migrate_layout
from ._open import open_snapshot_store as open_snapshot_store
from ._partitions import DEFAULT_PARTITIONS as DEFAULT_PARTITIONS
from ._partitions import KeyLayout as KeyLayout
from ._partitions import PartitionKeys as PartitionKeys
from ._partitions import partition_of as partition_of
from ._placement import PartitionPlan as PartitionPlan
from ._placement import assign_partitions as assign_partitions
from ._placement import partition_owner as partition_owner
from ._placement import plan_partitions as plan_partitions
from ._snapshots import CommitRequest as CommitRequest
from ._snapshots import DeadLetter as DeadLetter
from ._snapshots import InboxEntry as InboxEntry
from ._snapshots import MemorySnapshotStore as MemorySnapshotStore
from ._snapshots import RecoverableThread as RecoverableThread
from ._snapshots import SnapshotStore as SnapshotStore
from ._snapshots import StoredThread as StoredThread
from ._snapshots import StoredVersion as StoredVersion
from ._snapshots_redis import RedisSnapshotStore as RedisSnapshotStore
from ._snapshots_sqlite import SqliteSnapshotStore as SqliteSnapshotStore

__all__ = (
    "Codec",
    "CommitRequest",
    "ConflictError",
    "DEFAULT_PARTITIONS",
    "DEPLOYMENT_PARTITIONS",
    "DeadLetter",
    "FENCE_CHECK_LUA",
    "FORMAT_VERSION",
    "FencedError",
    "InboxEntry",
    "Item",
    "ItemCorruptError",
    "KeyLayout",
    "LAYOUT_FORMAT",
    "Lease",
    "Membership",
    "MemorySnapshotStore",
    "MemoryStore",
    "MigrationReport",
    "Namespace",
    "PartitionKeys",
    "PartitionLeases",
    "PartitionPlan",
    "PersistenceError",
    "RecoverableThread",
    "RedisInbox",
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
    "StoredVersion",
    "StreamEntry",
    "ThreadJournal",
    "assign_partitions",
    "decode_envelope",
    "deployment_layout",
    "encode_envelope",
    "fenced_script",
    "load_thread",
    "load_version",
    "migrate_layout",
    "open_redis",
    "open_snapshot_store",
    "partition_of",
    "partition_owner",
    "plan_partitions",
    "read_envelope",
    "read_history",
)
