"""The stable storage the Raft core reads, and an in-memory implementation of it.

The core only *reads* :class:`Storage`. Its driver writes, after each Ready, exactly
what the Ready said to persist (snapshot, hard state, entries) and nothing else, so
what ``Storage`` shows the core is always durable. :class:`MemoryStorage` is both the
test double and the in-memory view :class:`dlog.raft.disk.DiskStorage` serves reads
from.

Layout (as in etcd): ``_entries[0]`` is a dummy entry standing for the last compacted
entry (index and term only); real entries follow it contiguously. The snapshot is
kept separately and covers at least everything up to the dummy.
"""

from __future__ import annotations

from typing import Protocol

from dlog.errors import OffsetOutOfRangeError, StorageError
from dlog.raft.messages import (
    EMPTY_HARD_STATE,
    EMPTY_SNAPSHOT,
    ENTRY_OVERHEAD,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)


class LogCompactedError(OffsetOutOfRangeError):
    """The requested index is covered by the snapshot and no longer in the log."""


class LogUnavailableError(OffsetOutOfRangeError):
    """The requested index is beyond the last entry in the log."""


class Storage(Protocol):
    """What the core reads. Every method is synchronous and cheap."""

    def initial_state(self) -> HardState: ...

    def first_index(self) -> int:
        """Index of the first entry still in the log (snapshot index + 1 when empty)."""
        ...

    def last_index(self) -> int: ...

    def term(self, index: int) -> int:
        """Term of entry ``index``; valid for ``first_index() - 1 <= index <= last_index()``.

        Raises LogCompactedError / LogUnavailableError outside that range.
        """
        ...

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries ``[lo, hi)``, at least one, stopping before ``max_bytes`` is exceeded."""
        ...

    def snapshot(self) -> Snapshot: ...


def limit_size(entries: list[Entry], max_bytes: int) -> list[Entry]:
    """The longest prefix within ``max_bytes``, but always at least one entry."""
    if not entries:
        return entries
    total = 0
    overhead = ENTRY_OVERHEAD
    for i, e in enumerate(entries):
        total += len(e.data) + overhead
        if total > max_bytes and i > 0:
            return entries[:i]
    return entries


class MemoryStorage:
    """Storage held in memory; also the write API a driver uses after each Ready."""

    def __init__(self) -> None:
        self._hard_state = EMPTY_HARD_STATE
        self._snapshot = EMPTY_SNAPSHOT
        self._entries: list[Entry] = [Entry(0, 0, EntryType.NOOP, b"")]

    # -- Storage ------------------------------------------------------------------------

    def initial_state(self) -> HardState:
        return self._hard_state

    def first_index(self) -> int:
        return self._entries[0].index + 1

    def last_index(self) -> int:
        return self._entries[0].index + len(self._entries) - 1

    def term(self, index: int) -> int:
        offset = self._entries[0].index
        if index < offset:
            raise LogCompactedError(f"index {index} is compacted (log starts after {offset})")
        if index - offset >= len(self._entries):
            raise LogUnavailableError(f"index {index} is past the last index {self.last_index()}")
        return self._entries[index - offset].term

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        offset = self._entries[0].index
        if lo <= offset:
            raise LogCompactedError(f"index {lo} is compacted (log starts after {offset})")
        if hi > self.last_index() + 1:
            raise LogUnavailableError(f"index {hi - 1} is past the last index {self.last_index()}")
        return limit_size(self._entries[lo - offset : hi - offset], max_bytes)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- writes (the driver's side) -------------------------------------------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        self._hard_state = hard_state

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append, first removing any stored entries from ``entries[0].index`` on."""
        if not entries:
            return
        first = entries[0].index
        offset = self._entries[0].index
        if first <= offset:
            # Everything up to the dummy is compacted (and so committed): skip that part.
            entries = entries[offset + 1 - first :]
            if not entries:
                return
            first = entries[0].index
        if first > self.last_index() + 1:
            raise StorageError(f"append at {first} leaves a gap after {self.last_index()}")
        del self._entries[first - offset :]
        self._entries.extend(entries)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Install a snapshot received from a leader: the log restarts after it."""
        meta = snapshot.meta
        if meta.index < self._snapshot.meta.index:
            raise StorageError(
                f"snapshot at {meta.index} is older than the stored one at "
                f"{self._snapshot.meta.index}"
            )
        self._snapshot = snapshot
        self._entries = [Entry(meta.index, meta.term, EntryType.NOOP, b"")]
        if self._hard_state.commit < meta.index:
            self._hard_state = HardState(
                term=self._hard_state.term, vote=self._hard_state.vote, commit=meta.index
            )

    def create_snapshot(self, meta: SnapshotMeta, data: bytes) -> Snapshot:
        """Record a snapshot the local state machine took at ``meta.index`` (applied)."""
        self.check_snapshot(meta)
        self._snapshot = Snapshot(meta=meta, data=data)
        return self._snapshot

    def check_snapshot(self, meta: SnapshotMeta) -> None:
        """Raise StorageError unless a local snapshot at ``meta`` may be recorded."""
        if meta.index <= self._snapshot.meta.index:
            raise StorageError(
                f"snapshot at {meta.index} is not newer than {self._snapshot.meta.index}"
            )
        if meta.index > self.last_index():
            raise StorageError(f"snapshot at {meta.index} is past the last index")
        if self.term(meta.index) != meta.term:
            raise StorageError(f"snapshot term {meta.term} does not match the log")

    def compact(self, index: int) -> None:
        """Drop entries before ``index``, which becomes the dummy entry.

        ``index`` must not exceed the snapshot's index: entries the snapshot does not
        cover are never discarded.
        """
        offset = self._entries[0].index
        if index <= offset:
            return
        if index > self._snapshot.meta.index:
            raise StorageError(
                f"compacting to {index} would drop entries past the snapshot at "
                f"{self._snapshot.meta.index}"
            )
        dummy = self._entries[index - offset]
        self._entries = [
            Entry(dummy.index, dummy.term, EntryType.NOOP, b""),
            *self._entries[index - offset + 1 :],
        ]

    def all_entries(self) -> list[Entry]:
        """Every stored entry after the dummy (tests and the disk rewrite use this)."""
        return self._entries[1:]

    def dummy(self) -> tuple[int, int]:
        """(index, term) of the last compacted entry."""
        return self._entries[0].index, self._entries[0].term
