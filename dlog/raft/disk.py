"""Durable Raft storage: a write-ahead log of CRC-checked records plus a snapshot file.

A directory holds::

    identity      cluster id, node id and this disk's random directory id (format)
    wal           append-only records (below)
    snapshot      the latest snapshot: metadata and state machine bytes
    lock          held with flock while open

A WAL record is ``length u32 | crc32c u32 | type u8 | body`` (big-endian; length and
CRC-32C cover type and body). Types:

- STATE (one per Ready): optional hard state, then entries in the codec's binary
  layout. An entry at index i replaces any earlier entry at i and everything after it
  (a follower's conflicting suffix), exactly as in memory.
- START: the log starts after (prev_index, prev_term); first record of a rewritten WAL.

The WAL is preallocated (``posix_fallocate``) in large steps and written with
``pwrite`` at its logical end, so an append does not change the file's size and
``fdatasync`` only flushes data (no journal commit per record on ext4).

Recovery reads records until the first one that is short or fails its CRC (or the
preallocated zeros begin), truncates the file there (a torn tail: a write the driver
never acknowledged, since it fsyncs before sending anything that depends on it) and
rebuilds the in-memory view. Snapshot and WAL rewrites (compaction, installing a
leader's snapshot) are written to a temp file, fsynced, renamed over the old one, and
the directory is fsynced; the snapshot is always written before the WAL that depends
on it, so any crash leaves a readable pair.

Reads are served from memory (:class:`MemoryStorage`); the metadata log is small and
compacted after snapshots. Writes are async: a small record is written into reserved
page cache from the caller's thread, and its fsync runs there too while the device is
fast (:data:`INLINE_FSYNC_MAX_S`), else in a worker thread (``trio.to_thread``); big
records, snapshots and rewrites are written in a worker thread. The
in-memory view changes only once the write is durable, so the core never sees an entry
before that. Writes are serialized by a lock. ``open`` and ``close`` are synchronous
(start-up and shutdown).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import crc32c
import trio

from dlog.errors import InconsistentClusterIdError, StorageError
from dlog.raft.codec import (
    decode_entries,
    encode_entries,
    snapshot_meta_from_obj,
    snapshot_meta_to_obj,
)
from dlog.raft.messages import Entry, EntryType, HardState, Snapshot, SnapshotMeta
from dlog.raft.storage import MemoryStorage
from dlog.types import NodeId

logger = logging.getLogger(__name__)

_REC_HEADER = struct.Struct(">II")
_STATE = 1
_START = 2
_HAS_HARD_STATE = 1
_HARD_STATE = struct.Struct(">QQQ")  # term, vote + 1 (0: none), commit
_START_BODY = struct.Struct(">QQ")
_SNAP_HEADER = struct.Struct(">4sII")  # magic, metadata length, crc32c(metadata + data)
_SNAP_MAGIC = b"RSN1"
#: A record longer than this is treated as garbage (a torn length field).
MAX_RECORD_BYTES = 1 << 30
#: Records up to this size are written from the calling thread (then fsynced as
#: :meth:`DiskStorage._fdatasync` decides); larger ones are written by a worker thread.
INLINE_WRITE_BYTES = 256 << 10
#: A WAL fdatasync is made in the event loop's own thread while the device has been
#: answering within this (a fast disk: the worker-thread hop costs more than the
#: fsync, ~0.13 ms median and over 1 ms at p99 on a busy 2-core machine); once one
#: takes longer, fsyncs go to a worker thread until :data:`FAST_FSYNCS_TO_RETURN`
#: in a row are fast again, so a slow disk never stalls the loop for long.
INLINE_FSYNC_MAX_S = 0.002
FAST_FSYNCS_TO_RETURN = 32
#: WAL space reserved at a time.
DEFAULT_PREALLOCATE_BYTES = 16 << 20
#: fallocate errors that mean the filesystem cannot preallocate (not a full disk).
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
#: fallocate errors that mean no room for that much (a full disk, a quota, a size
#: limit): the record alone may still fit.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: How far past the last valid record recovery looks for non-zero (torn) bytes.
TAIL_WINDOW_BYTES = 4 << 20


def _timed_fdatasync(fd: int) -> float:
    start = time.perf_counter()
    os.fdatasync(fd)
    return time.perf_counter() - start


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who this disk belongs to; written once when the directory is formatted."""

    cluster_id: str
    node_id: NodeId
    directory_id: str


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """tmp + fsync + rename + fsync(dir): after a crash, the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def encode_record(rtype: int, body: bytes) -> bytes:
    payload = bytes((rtype,)) + body
    return _REC_HEADER.pack(len(payload), crc32c.crc32c(payload)) + payload


def encode_state(hard_state: HardState | None, entries: tuple[Entry, ...] | list[Entry]) -> bytes:
    if hard_state is None:
        body = b"\x00" + encode_entries(entries)
    else:
        vote = 0 if hard_state.vote is None else hard_state.vote + 1
        body = (
            bytes((_HAS_HARD_STATE,))
            + _HARD_STATE.pack(hard_state.term, vote, hard_state.commit)
            + encode_entries(entries)
        )
    return encode_record(_STATE, body)


def iter_records(data: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(end offset, type, body) of each valid record; stops at the first bad one."""
    view = memoryview(data)
    pos = 0
    end = len(data)
    hsize = _REC_HEADER.size
    while pos + hsize <= end:
        length, crc = _REC_HEADER.unpack_from(view, pos)
        if length < 1 or length > MAX_RECORD_BYTES or pos + hsize + length > end:
            return
        payload = view[pos + hsize : pos + hsize + length]
        if crc32c.crc32c(payload) != crc:
            return
        pos += hsize + length
        yield pos, payload[0], payload[1:]


def encode_snapshot(snapshot: Snapshot) -> bytes:
    meta = cbor2.dumps(snapshot_meta_to_obj(snapshot.meta))
    crc = crc32c.crc32c(snapshot.data, crc32c.crc32c(meta))
    return _SNAP_HEADER.pack(_SNAP_MAGIC, len(meta), crc) + meta + snapshot.data


def decode_snapshot(blob: bytes) -> Snapshot:
    try:
        magic, meta_len, crc = _SNAP_HEADER.unpack_from(blob, 0)
    except struct.error:
        raise StorageError("snapshot file is truncated") from None
    start = _SNAP_HEADER.size
    if magic != _SNAP_MAGIC or start + meta_len > len(blob):
        raise StorageError("snapshot file is malformed")
    meta_bytes = blob[start : start + meta_len]
    data = blob[start + meta_len :]
    if crc32c.crc32c(data, crc32c.crc32c(meta_bytes)) != crc:
        raise StorageError("snapshot file fails its checksum")
    try:
        meta = snapshot_meta_from_obj(cbor2.loads(meta_bytes))
    except Exception as exc:  # ProtocolError or a CBOR error: the file is bad either way
        raise StorageError(f"snapshot metadata is malformed: {exc}") from None
    return Snapshot(meta=meta, data=data)


class DiskStorage(MemoryStorage):
    """:class:`MemoryStorage` backed by files; see the module docstring.

    Use :meth:`open` (which formats an empty directory) rather than the constructor.
    """

    def __init__(
        self, path: Path, identity: Identity, lock_fd: int, preallocate_bytes: int
    ) -> None:
        super().__init__()
        self.path = path
        self.identity = identity
        self._lock_fd = lock_fd
        self._wal_fd = -1
        self._preallocate = preallocate_bytes
        self._low_on_space = False  # warned that the reserve did not fit (till it fits)
        #: Bytes of the WAL file reserved with fallocate (>= wal_bytes).
        self._allocated = 0
        self._write_lock = trio.Lock()
        # Fast fsyncs in a row; inline while it is at least FAST_FSYNCS_TO_RETURN.
        self._fast_fsyncs = FAST_FSYNCS_TO_RETURN
        #: Bytes of WAL appended since the last rewrite (for observers and tests).
        self.wal_bytes = 0
        self.truncated_bytes = 0
        #: STATE records appended (one per Ready with something to persist) and fsyncs.
        self.records_written = 0
        self.fsyncs = 0

    @property
    def directory_id(self) -> str:
        return self.identity.directory_id

    # --- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        cluster_id: str,
        node_id: NodeId,
        directory_id: str | None = None,
        preallocate_bytes: int = DEFAULT_PREALLOCATE_BYTES,
    ) -> DiskStorage:
        """Open (formatting if empty) the Raft directory ``path``.

        The WAL file is extended ``preallocate_bytes`` at a time (0: not at all), so
        appends do not change its size and ``fdatasync`` need not commit metadata.

        ``directory_id`` is the identity to format with (default: a new random one);
        pass the node's own (e.g. the broker's) so Raft and the node agree on it, and
        pass a fresh one whenever Raft state may have been lost: a voter is (node id,
        directory id), and an empty disk must never vote as its old self.

        Raises InconsistentClusterIdError if it belongs to another cluster,
        StorageError if to another node id or directory id, if locked by another
        process, or if its snapshot is unreadable.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StorageError(f"{root} is in use by another process") from None
        try:
            identity = cls._load_identity(root, cluster_id, node_id, directory_id)
            storage = cls(root, identity, lock_fd, preallocate_bytes)
            storage._recover()
        except BaseException:
            os.close(lock_fd)
            raise
        return storage

    @staticmethod
    def _load_identity(
        root: Path, cluster_id: str, node_id: NodeId, directory_id: str | None
    ) -> Identity:
        ident_path = root / "identity"
        if not ident_path.exists():
            identity = Identity(
                cluster_id=cluster_id,
                node_id=node_id,
                directory_id=directory_id or secrets.token_hex(16),
            )
            write_atomically(
                ident_path,
                cbor2.dumps([identity.cluster_id, identity.node_id, identity.directory_id]),
            )
            logger.info("formatted %s as node %d of cluster %s", root, node_id, cluster_id)
            return identity
        try:
            stored_cluster, stored_node, stored_dir = cbor2.loads(ident_path.read_bytes())
        except Exception as exc:
            raise StorageError(f"{ident_path} is unreadable: {exc}") from None
        if stored_cluster != cluster_id:
            raise InconsistentClusterIdError(
                f"{root} belongs to cluster {stored_cluster!r}, not {cluster_id!r}"
            )
        if stored_node != node_id:
            raise StorageError(f"{root} belongs to node {stored_node}, not {node_id}")
        if directory_id is not None and stored_dir != directory_id:
            raise StorageError(
                f"{root} was formatted with directory id {stored_dir}, not {directory_id}"
            )
        return Identity(cluster_id=cluster_id, node_id=node_id, directory_id=stored_dir)

    def _recover(self) -> None:
        snap_path = self.path / "snapshot"
        snapshot: Snapshot | None = None
        if snap_path.exists():
            snapshot = decode_snapshot(snap_path.read_bytes())
        wal_path = self.path / "wal"
        data = wal_path.read_bytes() if wal_path.exists() else b""

        # Replay: the log starts after (start_index, start_term); a record's entries
        # replace everything from their first index on.
        start_index = start_term = 0
        entries: list[Entry] = []
        hard_state = HardState()
        valid = 0
        for end, rtype, body in iter_records(data):
            if rtype == _START:
                start_index, start_term = _START_BODY.unpack(body)
                entries = []
            elif rtype == _STATE:
                skip = 1
                if body[0] & _HAS_HARD_STATE:
                    term, vote, commit = _HARD_STATE.unpack_from(body, 1)
                    hard_state = HardState(
                        term=term, vote=None if vote == 0 else NodeId(vote - 1), commit=commit
                    )
                    skip += _HARD_STATE.size
                new = decode_entries(body[skip:])
                if new:
                    pos = new[0].index - (start_index + 1)
                    if pos < 0 or pos > len(entries):
                        raise StorageError(
                            f"{wal_path}: entries at {new[0].index} do not follow the log "
                            f"({start_index + 1}..{start_index + len(entries)})"
                        )
                    del entries[pos:]
                    entries.extend(new)
            else:
                break  # an unknown record type: treat like corruption
            valid = end
        # Past the last valid record: preallocated zeros, or a torn/corrupt tail (at
        # most about one record; look at a bounded window, not all the zeros).
        window = data[valid : valid + TAIL_WINDOW_BYTES]
        self.truncated_bytes = len(window.rstrip(b"\x00"))
        if self.truncated_bytes:
            logger.warning(
                "%s: truncating a torn or corrupt WAL tail of %d bytes at offset %d",
                wal_path,
                self.truncated_bytes,
                valid,
            )
        fd = os.open(wal_path, os.O_RDWR | os.O_CREAT, 0o644)
        if len(data) != valid:
            # Cut everything after the last valid record (so no stale bytes can ever
            # be read as a record); fresh zeros are preallocated as needed.
            os.ftruncate(fd, valid)
            os.fsync(fd)
        self._wal_fd = fd
        self.wal_bytes = valid
        self._allocated = valid

        # The in-memory view: the snapshot, then whatever of the log follows it.
        start_entry = Entry(start_index, start_term, EntryType.NOOP, b"")
        if snapshot is not None and snapshot.meta.index > 0:
            s_index, s_term = snapshot.meta.index, snapshot.meta.term
            if start_index > s_index:
                raise StorageError(
                    f"the WAL starts after {start_index}, past the snapshot at {s_index}"
                )
            super().apply_snapshot(snapshot)
            connects = (start_index == s_index and start_term == s_term) or any(
                e.index == s_index and e.term == s_term for e in entries
            )
            if connects:
                # Keep the entries the snapshot covers too (for slow followers).
                self._entries = [start_entry, *entries]
            # Otherwise the log predates a snapshot installed from a leader: drop it.
        elif start_index > 0:
            raise StorageError(f"the WAL starts after {start_index} but there is no snapshot")
        else:
            self._entries = [start_entry, *entries]
        commit = max(min(hard_state.commit, self.last_index()), self._snapshot.meta.index)
        self._hard_state = HardState(term=hard_state.term, vote=hard_state.vote, commit=commit)

    def close(self) -> None:
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
            self._wal_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> DiskStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing -------------------------------------------------------------------

    def _reserve(self, size: int) -> None:
        """Make room for ``size`` more bytes at the end of the WAL (fallocate), with
        ``preallocate_bytes`` to spare where the disk has them.

        A full disk (or quota) is not taken for a filesystem without fallocate: the
        reserve is given up for this once, the record itself still gets its blocks if
        they are there, and preallocation is tried again next time. Raises OSError
        (naming the WAL) when not even the record fits."""
        need = self.wal_bytes + size
        if need <= self._allocated:
            return
        if self._preallocate:
            target = need + self._preallocate
            try:
                os.posix_fallocate(self._wal_fd, self._allocated, target - self._allocated)
                self._allocated = target
                self._low_on_space = False
                return
            except OSError as exc:
                if exc.errno in _NO_ROOM:
                    try:
                        os.posix_fallocate(self._wal_fd, self._allocated, need - self._allocated)
                    except OSError as again:
                        raise self._wal_error(again) from again
                    if not self._low_on_space:
                        logger.warning(
                            "%s: the disk is nearly full (no room for the WAL's %d-byte"
                            " reserve); the node stops once the WAL cannot grow",
                            self.path,
                            self._preallocate,
                        )
                        self._low_on_space = True
                    self._allocated = need
                    return
                if exc.errno not in _NO_FALLOCATE:
                    raise self._wal_error(exc) from exc
                # A filesystem without fallocate: just append.
                logger.info("%s: cannot preallocate the WAL (%s)", self.path, exc)
                self._preallocate = 0
        self._allocated = need

    def _wal_error(self, exc: OSError) -> OSError:
        """``exc`` naming the WAL file, so that the node's last words say which."""
        return OSError(exc.errno, exc.strerror, str(self.path / "wal"))

    def _write_at_end(self, record: bytes) -> None:
        view = memoryview(record)
        offset = self.wal_bytes
        try:
            while view:
                written = os.pwrite(self._wal_fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise self._wal_error(exc) from exc

    def _append_record(self, record: bytes, sync: bool) -> None:
        self._reserve(len(record))
        self._write_at_end(record)
        if sync:
            self._timed_fdatasync()

    def _timed_fdatasync(self) -> float:
        """fdatasync the WAL; returns how long it took (an OSError names the WAL)."""
        try:
            return _timed_fdatasync(self._wal_fd)
        except OSError as exc:
            raise self._wal_error(exc) from exc

    async def save(
        self,
        *,
        hard_state: HardState | None,
        entries: tuple[Entry, ...] | list[Entry],
        snapshot: Snapshot | None = None,
        sync: bool = True,
    ) -> None:
        """Persist one Ready's snapshot, hard state and entries; fsync if ``sync``.

        Returns once durable; only then does the in-memory view (what the core reads)
        change. A snapshot replaces the log: it is written first, then the WAL is
        rewritten to start after it.
        """
        async with self._write_lock:
            if snapshot is not None:
                await self._install_snapshot(snapshot)
            if hard_state is None and not entries:
                return
            record = encode_state(hard_state, entries)
            if (
                len(record) <= INLINE_WRITE_BYTES
                and self.wal_bytes + len(record) <= self._allocated
            ):
                # A small write into reserved page cache does not block for long; the
                # fsync may, so it goes to a worker thread unless the disk is fast.
                self._write_at_end(record)
                if sync:
                    await self._fdatasync()
            else:
                await trio.to_thread.run_sync(self._append_record, record, sync)
            self.wal_bytes += len(record)
            self.records_written += 1
            self.fsyncs += sync
            if entries:
                super().append(entries)
            if hard_state is not None:
                super().set_hard_state(hard_state)

    async def _fdatasync(self) -> None:
        """fdatasync the WAL: inline while the device is fast, else in a worker thread
        (see :data:`INLINE_FSYNC_MAX_S`)."""
        inline = self._fast_fsyncs >= FAST_FSYNCS_TO_RETURN
        if inline:
            took = self._timed_fdatasync()
            await trio.lowlevel.checkpoint()  # an await is a checkpoint, as with a thread
        else:
            took = await trio.to_thread.run_sync(self._timed_fdatasync)
        if took > INLINE_FSYNC_MAX_S:
            if inline:
                logger.info(
                    "%s: a WAL fsync took %.1f ms; fsyncing in a worker thread for now",
                    self.path,
                    took * 1000,
                )
            self._fast_fsyncs = 0
        else:
            self._fast_fsyncs += 1

    async def _install_snapshot(self, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        hs = self._hard_state
        hs = HardState(term=hs.term, vote=hs.vote, commit=max(hs.commit, meta.index))
        wal = encode_record(_START, _START_BODY.pack(meta.index, meta.term)) + encode_state(hs, ())

        def write() -> None:
            write_atomically(self.path / "snapshot", encode_snapshot(snapshot))
            self._replace_wal(wal)

        await trio.to_thread.run_sync(write)
        super().apply_snapshot(snapshot)

    def _replace_wal(self, content: bytes) -> None:
        path = self.path / "wal"
        write_atomically(path, content)
        fd = os.open(path, os.O_RDWR)
        os.close(self._wal_fd)
        self._wal_fd = fd
        self.wal_bytes = self._allocated = len(content)

    async def save_snapshot(self, meta: SnapshotMeta, data: bytes) -> Snapshot:
        """Durably record a snapshot the local state machine took at ``meta.index``."""
        async with self._write_lock:
            self.check_snapshot(meta)
            snapshot = Snapshot(meta=meta, data=data)
            await trio.to_thread.run_sync(
                write_atomically, self.path / "snapshot", encode_snapshot(snapshot)
            )
            self._snapshot = snapshot
            return snapshot

    async def compact_to(self, index: int) -> None:
        """Drop entries before ``index`` (at most the snapshot's), rewriting the WAL."""
        async with self._write_lock:
            offset = self._entries[0].index
            if index <= offset:
                return
            if index > self._snapshot.meta.index:
                raise StorageError(
                    f"compacting to {index} would drop entries past the snapshot at "
                    f"{self._snapshot.meta.index}"
                )
            term = self.term(index)
            kept = self._entries[index - offset + 1 :]
            wal = encode_record(_START, _START_BODY.pack(index, term)) + encode_state(
                self._hard_state, kept
            )
            await trio.to_thread.run_sync(self._replace_wal, wal)
            super().compact(index)

    # The synchronous writers of MemoryStorage would bypass the disk.

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        raise StorageError("DiskStorage is written with save()")

    def set_hard_state(self, hard_state: HardState) -> None:
        raise StorageError("DiskStorage is written with save()")

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        raise StorageError("DiskStorage is written with save(snapshot=...)")

    def create_snapshot(self, meta: SnapshotMeta, data: bytes) -> Snapshot:
        raise StorageError("DiskStorage snapshots are written with save_snapshot()")

    def compact(self, index: int) -> None:
        raise StorageError("DiskStorage is compacted with compact_to()")


@contextlib.contextmanager
def open_disk_storage(
    path: str | os.PathLike[str],
    *,
    cluster_id: str,
    node_id: NodeId,
    directory_id: str | None = None,
    preallocate_bytes: int = DEFAULT_PREALLOCATE_BYTES,
) -> Iterator[DiskStorage]:
    """:meth:`DiskStorage.open` as a context manager that closes it."""
    storage = DiskStorage.open(
        path,
        cluster_id=cluster_id,
        node_id=node_id,
        directory_id=directory_id,
        preallocate_bytes=preallocate_bytes,
    )
    try:
        yield storage
    finally:
        storage.close()
