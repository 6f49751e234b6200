"""The leader's view of one follower's log, and the flow control of sending to it.

States (as in etcd):

- PROBE: the leader does not know where the follower's log matches; it sends one
  AppendEntries and waits for the answer (or the next heartbeat response) before the
  next, moving ``next`` back on each rejection.
- REPLICATE: the logs match up to ``match``; the leader streams entries optimistically
  (``next`` advances as it sends), at most ``max_inflight`` messages unacknowledged.
- SNAPSHOT: the follower needs entries the leader has compacted; the leader streams a
  snapshot in chunks and sends no entries until the follower reports it installed.
"""

from __future__ import annotations

import enum
from collections import deque

from dlog.raft.messages import Snapshot


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Progress:
    __slots__ = (
        "directory_id",
        "inflights",
        "match",
        "max_inflight",
        "next",
        "paused",
        "recent_active",
        "sent_commit",
        "snap_acked",
        "snap_done_sent",
        "snap_sent",
        "snapshot",
        "state",
    )

    def __init__(self, *, directory_id: str, next_index: int, max_inflight: int) -> None:
        #: The incarnation (disk) of the member this tracks; answers from another are ignored.
        self.directory_id = directory_id
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        #: PROBE: a probe is outstanding. REPLICATE: the inflight window is full.
        self.paused = False
        #: Heard from since the last check-quorum round.
        self.recent_active = False
        #: Highest commit index sent to the follower (so it can be told of a newer one).
        self.sent_commit = 0
        self.max_inflight = max_inflight
        #: Last index of each unacknowledged AppendEntries, oldest first.
        self.inflights: deque[int] = deque()
        # SNAPSHOT state: the snapshot being sent, bytes sent and acknowledged so far.
        self.snapshot: Snapshot | None = None
        self.snap_sent = 0
        self.snap_acked = 0
        self.snap_done_sent = False

    def __repr__(self) -> str:
        return (
            f"Progress(state={self.state.value}, match={self.match}, next={self.next}, "
            f"paused={self.paused}, inflight={len(self.inflights)})"
        )

    def _reset(self, state: ProgressState) -> None:
        self.state = state
        self.paused = False
        self.inflights.clear()
        self.snapshot = None
        self.snap_sent = self.snap_acked = 0
        self.snap_done_sent = False

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT and self.snapshot is not None:
            pending = self.snapshot.meta.index
            self._reset(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.snapshot = snapshot

    def is_paused(self) -> bool:
        if self.state is ProgressState.SNAPSHOT:
            return True
        return self.paused

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement that the follower's log matches through ``index``."""
        if index <= self.match:
            return False
        self.match = index
        if self.next < index + 1:
            self.next = index + 1
        self.paused = False
        return True

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of the AppendEntries whose prev_index was ``rejected``.

        Returns False when the rejection is stale (answers a message sent before
        the leader learnt something newer).
        """
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.paused = False
        return True

    def sent_entries(self, count: int) -> None:
        """Account for an AppendEntries carrying ``count`` entries from ``next``."""
        if self.state is ProgressState.REPLICATE:
            if count:
                self.next += count
                self.inflights.append(self.next - 1)
            self.paused = len(self.inflights) >= self.max_inflight
        elif self.state is ProgressState.PROBE:
            self.paused = True

    def can_bump_commit(self, committed: int) -> bool:
        """Would sending ``committed`` tell the follower something new?"""
        return self.state is not ProgressState.SNAPSHOT and self.sent_commit < committed

    def free_inflights_to(self, index: int) -> None:
        inflights = self.inflights
        while inflights and inflights[0] <= index:
            inflights.popleft()
        if self.state is ProgressState.REPLICATE:
            self.paused = len(inflights) >= self.max_inflight
