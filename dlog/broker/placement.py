"""Where new partitions' replicas go, and which replica leads.

Least loaded first: each new partition's leader is the live broker leading the fewest
partitions (ties: fewest replicas, then lowest id); its followers are the live brokers
holding the fewest replicas. Counts include what was assigned earlier in the same call,
so 6 partitions with replication factor 3 on 3 brokers get leaders 2/2/2. The leader
is listed first: it is the preferred replica the controller moves leadership back to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dlog.broker.records import PartitionAssignment
from dlog.errors import InvalidReplicationFactorError


def assign_replicas(
    first_partition: int,
    count: int,
    replication_factor: int,
    live_brokers: Sequence[int],
    leader_counts: Mapping[int, int],
    replica_counts: Mapping[int, int],
) -> list[PartitionAssignment]:
    """Assignments for partitions ``first_partition .. first_partition+count-1``."""
    brokers = sorted(set(live_brokers))
    if replication_factor < 1:
        raise InvalidReplicationFactorError("replication factor must be at least 1")
    if replication_factor > len(brokers):
        raise InvalidReplicationFactorError(
            f"replication factor {replication_factor} is larger than the "
            f"{len(brokers)} live broker(s)",
            live_brokers=len(brokers),
        )
    leaders = {b: leader_counts.get(b, 0) for b in brokers}
    replicas = {b: replica_counts.get(b, 0) for b in brokers}
    out: list[PartitionAssignment] = []
    for i in range(count):
        partition = first_partition + i
        leader = min(brokers, key=lambda b: (leaders[b], replicas[b], b))
        # Rotate the tie-break by partition so followers spread when counts are equal.
        others = [b for b in brokers if b != leader]
        shift = partition % len(others) if others else 0
        rotated = others[shift:] + others[:shift]
        followers = sorted(rotated, key=lambda b: replicas[b])[: replication_factor - 1]
        chosen = [leader, *followers]
        leaders[leader] += 1
        for b in chosen:
            replicas[b] += 1
        out.append(
            PartitionAssignment(partition=partition, replicas=chosen, isr=chosen, leader=leader)
        )
    return out
