"""The leader-epoch cache: for each leader epoch, the first offset written in it.

Kafka's LeaderEpochFileCache, without the file (the log checkpoints it). A follower
that becomes follower asks the leader, for its latest epoch E, "where does E end in
your log?" (:meth:`LeaderEpochCache.end_offset_for`, Kafka's OffsetsForLeaderEpoch)
and truncates there before fetching, so replicas never diverge.

Rules (Kafka's):

* Entries have strictly increasing epochs and strictly increasing start offsets.
* ``assign(e, o)`` is a no-op when ``e`` is the latest epoch and ``o`` is not before
  its start; otherwise it drops every entry with epoch >= e or start >= o and
  appends (e, o), so the cache stays monotonic whatever order it is fed.
* ``truncate_from_end(o)`` (log truncated to ``o``) drops entries starting at or
  after ``o``; ``truncate_from_start(o)`` (log start moved to ``o``) drops entries
  wholly before ``o`` and moves the one covering ``o`` to start at ``o``.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from dlog.types import Epoch, Offset

#: Kafka's UNDEFINED_EPOCH and UNDEFINED_EPOCH_OFFSET.
UNDEFINED_EPOCH: Final = Epoch(-1)
UNDEFINED_EPOCH_OFFSET: Final = Offset(-1)


class EpochEntry(NamedTuple):
    epoch: Epoch
    start_offset: Offset


class LeaderEpochCache:
    def __init__(self, entries: list[EpochEntry] | None = None) -> None:
        self._entries: list[EpochEntry] = []
        #: Bumped on every change; the log checkpoints when it moved.
        self.version = 0
        for entry in entries or []:
            self.assign(entry.epoch, entry.start_offset)

    def entries(self) -> list[EpochEntry]:
        return list(self._entries)

    @property
    def latest_epoch(self) -> Epoch | None:
        return self._entries[-1].epoch if self._entries else None

    def assign(self, epoch: int, start_offset: int) -> bool:
        """Record that ``epoch`` starts at ``start_offset``; True if the cache changed."""
        if epoch < 0 or start_offset < 0:
            raise ValueError(f"epoch {epoch} / start offset {start_offset} must be >= 0")
        if self._entries:
            latest = self._entries[-1]
            if epoch == latest.epoch and start_offset >= latest.start_offset:
                return False
        while self._entries and (
            self._entries[-1].epoch >= epoch or self._entries[-1].start_offset >= start_offset
        ):
            self._entries.pop()
        self._entries.append(EpochEntry(Epoch(epoch), Offset(start_offset)))
        self.version += 1
        return True

    def end_offset_for(self, requested_epoch: int, log_end_offset: int) -> tuple[Epoch, Offset]:
        """(epoch, end offset) for OffsetsForLeaderEpoch, exactly as Kafka answers.

        * the latest epoch: (it, log end offset);
        * an older epoch: (the greatest known epoch <= requested, the start offset of
          the first epoch above requested); below every known epoch: (requested, start
          of the first known epoch);
        * unknown (newer than all, negative, or an empty cache): (-1, -1).
        """
        if requested_epoch < 0 or not self._entries:
            return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET
        if requested_epoch == self._entries[-1].epoch:
            return Epoch(requested_epoch), Offset(log_end_offset)
        floor: EpochEntry | None = None
        for entry in self._entries:
            if entry.epoch > requested_epoch:
                if floor is None:
                    return Epoch(requested_epoch), entry.start_offset
                return floor.epoch, entry.start_offset
            floor = entry
        return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET

    def epoch_for_offset(self, offset: int) -> Epoch | None:
        """The epoch the record at ``offset`` was written in, if the cache knows."""
        found: Epoch | None = None
        for entry in self._entries:
            if entry.start_offset > offset:
                break
            found = entry.epoch
        return found

    def truncate_from_end(self, end_offset: int) -> None:
        """The log now ends at ``end_offset``: drop epochs starting at or after it."""
        before = len(self._entries)
        while self._entries and self._entries[-1].start_offset >= end_offset:
            self._entries.pop()
        if len(self._entries) != before:
            self.version += 1

    def truncate_from_start(self, start_offset: int) -> None:
        """The log now starts at ``start_offset``: drop what lies wholly before it."""
        keep = 0
        while (
            keep + 1 < len(self._entries) and self._entries[keep + 1].start_offset <= start_offset
        ):
            keep += 1
        changed = keep > 0
        del self._entries[:keep]
        if self._entries and self._entries[0].start_offset < start_offset:
            self._entries[0] = EpochEntry(self._entries[0].epoch, Offset(start_offset))
            changed = True
        if changed:
            self.version += 1

    def clear(self) -> None:
        if self._entries:
            self._entries.clear()
            self.version += 1
