"""One partition replica on this broker: its log, plus leader or follower state.

Owned by the ReplicaManager, which creates it, feeds it metadata, and drives it from
request handlers and fetcher loops. Everything here runs in one trio thread; nothing
awaits except the explicit ``wait_*`` methods, so state changes are atomic.

Leader rules (Kafka's Partition, with KIP-497):

- The leader tracks each follower's log end offset from the offsets it fetches, and
  the last time it was caught up (fetched up to the leader's LEO, or up to the LEO the
  leader had at its previous fetch).
- The high watermark is the minimum LEO over the *maximal* ISR: the committed ISR plus
  members being added; a member being removed still counts until the removal commits.
  So the HW never advances on fewer copies than the controller may elect from.
- The HW only moves forward, and never past an ISR member whose LEO is unknown (just
  after becoming leader, until every member has fetched).
- One ISR change (AlterPartition) at a time; its result arrives through metadata.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from dlog.broker.metadata import PartitionInfo
from dlog.broker.topic_config import TopicConfig
from dlog.storage import LogAppendInfo, PartitionLog


class Role(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"
    #: A replica whose partition has no leader right now (offline), or which was
    #: just created and has not seen its first metadata.
    NONE = "none"


class Parked(Protocol):
    """Something waiting for a partition to change (a parked long-polling fetch)."""

    def poke(self) -> None: ...


@dataclass(slots=True)
class FollowerState:
    log_end_offset: int = -1
    last_caught_up: float = -math.inf
    last_fetch_time: float = -math.inf
    #: The leader's LEO when this follower last fetched.
    last_fetch_leader_leo: int = -1


class Partition:
    def __init__(
        self,
        *,
        node_id: int,
        info: PartitionInfo,
        log: PartitionLog,
        config: TopicConfig,
    ) -> None:
        self.node_id = node_id
        self.topic = info.topic
        self.partition = info.partition
        self.topic_id = info.topic_id
        self.log = log
        self.config = config
        self.info = info
        self.role = Role.NONE
        self.leader_epoch = -1
        self.followers: dict[int, FollowerState] = {}
        #: The ISR proposed to the controller and not yet seen in metadata.
        self.pending_isr: tuple[int, ...] | None = None
        self._changed = trio.Event()
        #: Long-polling fetches parked on this partition: poked at every change.
        self._parked: set[Parked] = set()

    def __repr__(self) -> str:
        return f"<Partition {self.topic}-{self.partition} {self.role.value} e{self.leader_epoch}>"

    # --- change notification ------------------------------------------------------

    def notify(self) -> None:
        """Wake everyone waiting on this partition (new data, new HW, new role); parked
        fetches are poked at once, so one that now has enough is answered from here."""
        self._changed.set()
        self._changed = trio.Event()
        if self._parked:
            for parked in list(self._parked):
                parked.poke()

    def park(self, parked: Parked) -> None:
        """Poke ``parked`` at every change until :meth:`unpark`."""
        self._parked.add(parked)

    def unpark(self, parked: Parked) -> None:
        self._parked.discard(parked)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    # --- metadata ----------------------------------------------------------------

    @property
    def high_watermark(self) -> int:
        return self.log.high_watermark

    @property
    def log_end_offset(self) -> int:
        return self.log.log_end_offset

    @property
    def isr(self) -> tuple[int, ...]:
        return self.info.isr

    def become_leader(self, info: PartitionInfo, now: float) -> None:
        """Take leadership at ``info.leader_epoch``; follower positions start unknown."""
        new_epoch = info.leader_epoch != self.leader_epoch or self.role is not Role.LEADER
        self.info = info
        self.leader_epoch = info.leader_epoch
        self.role = Role.LEADER
        self.pending_isr = None
        if new_epoch:
            self.followers = {
                r: FollowerState(last_caught_up=now) for r in info.replicas if r != self.node_id
            }
            self.log.leader_epoch_cache.assign(info.leader_epoch, self.log.log_end_offset)
        # A leader alone in its ISR has everything committed (as Kafka's makeLeader);
        # with followers, the HW waits for their first fetches.
        self.maybe_advance_high_watermark()
        self.notify()

    def become_follower(self, info: PartitionInfo) -> None:
        self.info = info
        self.leader_epoch = info.leader_epoch
        self.role = Role.FOLLOWER if info.leader is not None else Role.NONE
        self.followers = {}
        self.pending_isr = None
        self.notify()

    def update_info(self, info: PartitionInfo) -> None:
        """Same role and epoch, new ISR or partition epoch (e.g. our ISR change landed)."""
        self.info = info
        if self.pending_isr is not None and tuple(self.pending_isr) == info.isr:
            self.pending_isr = None
        for r in info.replicas:
            if r != self.node_id and self.role is Role.LEADER:
                self.followers.setdefault(r, FollowerState())
        if self.role is Role.LEADER:
            self.maybe_advance_high_watermark()
        self.notify()

    def update_config(self, config: TopicConfig) -> None:
        self.config = config

    # --- leader: ISR and high watermark ---------------------------------------------

    def maximal_isr(self) -> set[int]:
        isr = set(self.info.isr)
        if self.pending_isr is not None:
            isr |= set(self.pending_isr)
        return isr

    def maybe_advance_high_watermark(self) -> bool:
        """Leader: move the HW to the min LEO over the maximal ISR, if that is higher."""
        if self.role is not Role.LEADER:
            return False
        candidate: int = self.log.log_end_offset
        for replica in self.maximal_isr():
            if replica == self.node_id:
                continue
            state = self.followers.get(replica)
            if state is None or state.log_end_offset < 0:
                return False  # an ISR member we have not heard from yet holds the HW
            candidate = min(candidate, state.log_end_offset)
        if candidate > self.log.high_watermark:
            self.log.update_high_watermark(candidate)
            return True
        return False

    def record_follower_fetch(self, replica_id: int, fetch_offset: int, now: float) -> bool:
        """A follower fetched at ``fetch_offset``: it has everything below it.

        Returns whether the HW advanced.
        """
        state = self.followers.get(replica_id)
        if state is None:
            state = self.followers[replica_id] = FollowerState()
        leo = self.log.log_end_offset
        if fetch_offset >= leo:
            state.last_caught_up = now
        elif fetch_offset >= state.last_fetch_leader_leo >= 0:
            state.last_caught_up = max(state.last_caught_up, state.last_fetch_time)
        state.log_end_offset = fetch_offset
        state.last_fetch_time = now
        state.last_fetch_leader_leo = leo
        advanced = self.maybe_advance_high_watermark()
        if advanced:
            self.notify()
        return advanced

    def isr_change_wanted(
        self, now: float, lag_max_s: float, usable: Iterable[int]
    ) -> tuple[int, ...] | None:
        """The ISR this leader should propose now, or None.

        Adds followers that caught up to the HW (and to the start of this leader's
        epoch) and are usable (unfenced); drops followers not caught up for
        ``lag_max_s``. Never proposes while a change is in flight; never drops itself.
        """
        if self.role is not Role.LEADER or self.pending_isr is not None:
            return None
        usable_set = set(usable)
        isr = list(self.info.isr)
        epoch_start = self._epoch_start_offset()
        for replica, state in sorted(self.followers.items()):
            in_isr = replica in isr
            caught_up = (
                state.log_end_offset >= self.log.high_watermark
                and state.log_end_offset >= epoch_start
            )
            if not in_isr and caught_up and replica in usable_set:
                isr.append(replica)
            elif in_isr and now - state.last_caught_up > lag_max_s:
                isr.remove(replica)
        if self.node_id not in isr:
            isr.insert(0, self.node_id)
        if tuple(isr) == self.info.isr or set(isr) == set(self.info.isr):
            return None
        return tuple(isr)

    def _epoch_start_offset(self) -> int:
        for entry in reversed(self.log.leader_epoch_cache.entries()):
            if entry.epoch == self.leader_epoch:
                return int(entry.start_offset)
        return int(self.log.log_end_offset)

    # --- leader: appends and waits ---------------------------------------------------

    def append_as_leader(self, batches: bytearray) -> LogAppendInfo:
        info = self.log.append(batches, self.leader_epoch)
        # A leader alone in its ISR commits at once.
        self.maybe_advance_high_watermark()
        self.notify()
        return info

    async def wait_for_high_watermark(self, offset: int) -> None:
        """Until the HW passes ``offset`` or this replica stops leading this epoch."""
        epoch = self.leader_epoch
        while self.log.high_watermark <= offset and self.role is Role.LEADER:
            if self.leader_epoch != epoch:
                return
            await self._changed.wait()

    # --- follower ----------------------------------------------------------------------

    def append_as_follower(self, batches: bytes, leader_high_watermark: int) -> None:
        if batches:
            self.log.append_as_follower(batches)
        self.update_follower_high_watermark(leader_high_watermark)
        self.notify()

    def update_follower_high_watermark(self, leader_high_watermark: int) -> None:
        hw = min(leader_high_watermark, self.log.log_end_offset)
        if hw > self.log.high_watermark:
            self.log.update_high_watermark(hw)
