"""The core's view of its log: stable entries in :class:`Storage`, then unstable ones.

Unstable entries (and an unstable snapshot) are those the core has accepted but its
driver has not yet persisted; a Ready hands them over and ``advance`` marks them
stable. Reads look at the unstable part first, then at storage.

Indexes: ``committed`` never decreases; ``applied <= committed`` is what the state
machine has been given. A conflicting suffix may be replaced, but never below
``committed`` (that would lose a committed entry, so it raises).
"""

from __future__ import annotations

from dlog.raft.messages import Entry, Snapshot
from dlog.raft.storage import LogCompactedError, LogUnavailableError, Storage, limit_size


class RaftLogError(AssertionError):
    """An internal invariant of the log would be broken; a bug, never expected."""


class Unstable:
    __slots__ = ("entries", "offset", "snapshot")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        #: Index of ``entries[0]`` (where the next entry goes when empty).
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        if self.snapshot is not None:
            return self.snapshot.meta.index + 1
        return None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.meta.index
        return None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.meta.index == index:
                return self.snapshot.meta.term
            return None
        last = self.maybe_last_index()
        if last is None or index > last:
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        t = self.maybe_term(index)
        if t is None or t != term or index < self.offset:
            # The entries were replaced while the driver persisted them.
            return
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        self.offset = snapshot.meta.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        after = entries[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif after <= self.offset:
            # Replaces everything unstable (and some stable entries: the driver
            # overwrites them when it persists these).
            self.offset = after
            self.entries = list(entries)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(entries)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        # Entries may be kept behind the snapshot (for slow followers); the state
        # machine restarts from the snapshot, so that is what is applied.
        start = max(first - 1, storage.snapshot().meta.index)
        self.committed = start
        self.applied = start

    # -- positions ------------------------------------------------------------------------

    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        if i is not None:
            return i
        return self.storage.first_index()

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        if i is not None:
            return i
        return self.storage.last_index()

    def term(self, index: int) -> int | None:
        """Term at ``index``, or None if compacted away or beyond the last entry."""
        t = self.unstable.maybe_term(index)
        if t is not None:
            return t
        if index < self.first_index() - 1 or index > self.last_index():
            return None
        try:
            return self.storage.term(index)
        except (LogCompactedError, LogUnavailableError):
            return None

    def last_term(self) -> int:
        t = self.term(self.last_index())
        if t is None:
            raise RaftLogError("the last entry has no term")
        return t

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1: is a log ending at (last_index, last_term) at least as up to date?"""
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index())

    # -- reading entries ------------------------------------------------------------------

    def slice(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries [lo, hi) up to ``max_bytes`` (at least one); raises LogCompactedError."""
        if lo >= hi:
            return []
        if lo < self.first_index():
            raise LogCompactedError(f"index {lo} is compacted")
        if hi > self.last_index() + 1:
            raise LogUnavailableError(f"index {hi - 1} is past the last index")
        out: list[Entry] = []
        uoff = self.unstable.offset
        if lo < uoff:
            out = self.storage.entries(lo, min(hi, uoff), max_bytes)
            if len(out) < min(hi, uoff) - lo:
                return out  # the size limit cut it short
        if hi > uoff:
            out = out + self.unstable.slice(max(lo, uoff), hi)
        return limit_size(out, max_bytes)

    def entries_from(self, lo: int, max_bytes: int) -> list[Entry]:
        if lo > self.last_index():
            return []
        return self.slice(lo, self.last_index() + 1, max_bytes)

    def unstable_entries(self) -> list[Entry]:
        return list(self.unstable.entries)

    def has_next_committed_entries(self) -> bool:
        if self.unstable.snapshot is not None:
            return False
        return self.committed > self.applied

    def next_committed_entries(self, max_bytes: int) -> list[Entry]:
        if self.unstable.snapshot is not None:
            return []
        lo = self.applied + 1
        hi = min(self.committed, self.last_index()) + 1
        if lo >= hi:
            return []
        return self.slice(lo, hi, max_bytes)

    # -- changing the log -------------------------------------------------------------------

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> int:
        if not entries:
            return self.last_index()
        after = entries[0].index - 1
        if after < self.committed:
            raise RaftLogError(f"append after {after} would overwrite committed {self.committed}")
        self.unstable.truncate_and_append(entries)
        return self.last_index()

    def find_conflict(self, entries: tuple[Entry, ...] | list[Entry]) -> int:
        """Index of the first entry whose term differs from ours (or that we lack); 0 if none."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= ``index`` whose term is <= ``term``, and that term.

        Lets a rejection skip a whole run of entries from a term the leader never had.
        """
        while index > 0:
            t = self.term(index)
            if t is None:
                # Compacted: every compacted entry is committed, so it matches.
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def maybe_append(
        self, prev_index: int, prev_term: int, committed: int, entries: tuple[Entry, ...]
    ) -> int | None:
        """Figure 2's AppendEntries receiver rules 2-5. None if the consistency check fails,
        else the last index the leader's message vouches for."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            if conflict <= self.committed:
                raise RaftLogError(
                    f"entry {conflict} conflicts with committed entries up to {self.committed}"
                )
            self.append(entries[conflict - (prev_index + 1) :])
        self.commit_to(min(committed, last_new))
        return last_new

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise RaftLogError(f"commit {index} is past the last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        if index > self.committed and self.term(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index:
            if index > self.committed or index < self.applied:
                raise RaftLogError(f"applied {index} outside [{self.applied}, {self.committed}]")
            self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        self.unstable.stable_snap_to(index)

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.meta.index
        self.unstable.restore(snapshot)

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()
