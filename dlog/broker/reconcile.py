"""The controller's decisions, as pure functions of the metadata and a liveness view.

The controller is level-triggered: on activation and after every change it calls
:func:`reconcile` with the whole current picture, and proposes whatever records come
back. Nothing here remembers events, so an event missed during an election is not
lost -- the next reconcile sees its effect.

Rules, as DESIGN.md "Liveness, fencing and failover" and "Replication" fix them:

- A broker that is not live is fenced. A fenced broker that is live, caught up with
  the metadata log, and not shutting down is unfenced -- once it leads nothing and is
  in no ISR it could leave (a restarted process registers fenced: its leaderships
  move, with a new leader epoch, and it leaves the ISRs before it is unfenced, for it
  may have lost its unflushed tail).
- A partition's leader must be an unfenced ISR member. When it is not, the first
  replica (in preference order) that is an unfenced ISR member leads; with none, the
  partition is offline (leader None) unless ``unclean_leader_election`` lets any
  unfenced replica lead (its ISR becomes just itself).
- Fenced brokers leave ISRs, but an ISR never becomes empty: when every member is
  fenced the ISR is kept as it was, so whichever member returns first can lead.
- Preferred-leader rebalance (when asked): a partition whose first replica is an
  unfenced ISR member but not the leader moves leadership to it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from dlog.broker.metadata import MetadataImage, PartitionInfo
from dlog.broker.records import FenceBroker, PartitionChange, Record, UnfenceBroker


@dataclass(frozen=True, slots=True)
class Liveness:
    #: Brokers gossip considers alive and whose Raft session has not lapsed.
    live: frozenset[int]
    #: Brokers whose copy of the metadata log has reached the controller's commit index.
    caught_up: frozenset[int]
    #: Brokers in a controlled shutdown: they get no leaderships and are not unfenced.
    shutting_down: frozenset[int] = frozenset()


def reconcile(
    image: MetadataImage,
    liveness: Liveness,
    *,
    unclean_allowed: Callable[[str], bool],
    rebalance_preferred: bool = False,
) -> list[Record]:
    """Every record needed to bring the metadata in line with ``liveness``."""
    records: list[Record] = []
    usable: set[int] = set()
    returning = []
    for broker in image.brokers.values():
        node = broker.node_id
        is_live = node in liveness.live and node not in liveness.shutting_down
        if not broker.fenced and not is_live:
            records.append(FenceBroker(node_id=node, incarnation=broker.incarnation))
        elif broker.fenced and is_live and node in liveness.caught_up:
            returning.append(broker)
        elif not broker.fenced and is_live:
            usable.add(node)
    #: Live, caught-up brokers kept fenced for this pass only (see below).
    held: set[int] = set()
    for broker in sorted(returning, key=lambda b: b.node_id):
        # A fenced broker (e.g. a restarted process: it registers fenced) is unfenced
        # only once it leads nothing and has left every ISR it can leave. Until then
        # the elections below move its leaderships (a new leader epoch) and drop it from
        # ISRs: a process that crashed may have lost its unflushed tail, so it must not
        # go on leading, or count toward the HW, at its old epochs.
        if _holds_anything(image, broker.node_id, usable):
            held.add(broker.node_id)
        else:
            records.append(UnfenceBroker(node_id=broker.node_id, incarnation=broker.incarnation))
            usable.add(broker.node_id)
    for partition in image.partitions():
        change = elect(
            partition,
            usable,
            # An ISR member held back for a pass is as good as back: no unclean
            # election past it (the partition is offline for that pass instead).
            unclean=unclean_allowed(partition.topic) and not held.intersection(partition.isr),
            preferred=rebalance_preferred,
        )
        if change is not None:
            records.append(change)
    return records


def _holds_anything(image: MetadataImage, node: int, usable: Collection[int]) -> bool:
    """Does fenced ``node`` still lead a partition, or sit in an ISR that a usable
    broker is also in (one it would be dropped from)? An ISR whose members are all
    fenced keeps them (see :func:`elect`), so that does not count."""
    for p in image.partitions():
        if p.leader == node:
            return True
        if node in p.isr and any(r != node and r in usable for r in p.isr):
            return True
    return False


def elect(
    p: PartitionInfo, usable: Collection[int], *, unclean: bool, preferred: bool
) -> PartitionChange | None:
    """The change that gives ``p`` a usable leader and a usable ISR, if one is needed."""
    live_isr = [r for r in p.isr if r in usable]
    isr = live_isr if live_isr else list(p.isr)
    leader = p.leader
    if leader is None or leader not in live_isr:
        leader = next((r for r in p.replicas if r in live_isr), None)
        if leader is None and unclean:
            leader = next((r for r in p.replicas if r in usable), None)
            if leader is not None:
                isr = [leader]
    if preferred and p.replicas and p.replicas[0] in live_isr:
        leader = p.replicas[0]
    if leader == p.leader and tuple(isr) == p.isr:
        return None
    return PartitionChange(
        topic_id=p.topic_id,
        partition=p.partition,
        partition_epoch=p.partition_epoch,
        leader=leader,
        isr=isr,
    )


def move_leaderships_off(
    image: MetadataImage, node: int, usable: Collection[int]
) -> tuple[list[PartitionChange], int]:
    """Controlled shutdown of ``node``: hand its leaderships to other ISR members and
    leave the ISRs it can leave. Returns the changes and how many leaderships could
    not move (no other usable ISR member)."""
    others = [b for b in usable if b != node]
    changes: list[PartitionChange] = []
    stuck = 0
    for p in image.partitions():
        if node not in p.isr:
            continue
        rest = [r for r in p.isr if r != node]
        if p.leader == node:
            leader = next((r for r in p.replicas if r in rest and r in others), None)
            if leader is None:
                stuck += 1
                continue
            changes.append(
                PartitionChange(
                    topic_id=p.topic_id,
                    partition=p.partition,
                    partition_epoch=p.partition_epoch,
                    leader=leader,
                    isr=rest,
                )
            )
        elif rest:
            changes.append(
                PartitionChange(
                    topic_id=p.topic_id,
                    partition=p.partition,
                    partition_epoch=p.partition_epoch,
                    leader=p.leader,
                    isr=rest,
                )
            )
    return changes, stuck
