from __future__ import annotations

from dlog.broker.metadata import MetadataImage
from dlog.broker.reconcile import Liveness, move_leaderships_off, reconcile
from dlog.broker.records import (
    CreateTopic,
    FenceBroker,
    PartitionAssignment,
    PartitionChange,
    RegisterBroker,
    UnfenceBroker,
    encode_batch,
)


def cluster(n_partitions: int = 3) -> MetadataImage:
    image = MetadataImage()
    records: list = []
    for node in (1, 2, 3):
        records.append(
            RegisterBroker(
                node_id=node, directory_id="d", incarnation="i", rpc="", gossip="", raft=""
            )
        )
        records.append(UnfenceBroker(node_id=node, incarnation="i"))
    records.append(
        CreateTopic(
            name="t",
            topic_id="tid",
            configs={},
            partitions=[
                PartitionAssignment(
                    partition=i,
                    replicas=[1 + (i + k) % 3 for k in range(3)],
                    isr=[1 + (i + k) % 3 for k in range(3)],
                    leader=1 + i % 3,
                )
                for i in range(n_partitions)
            ],
        )
    )
    image.apply_entry(1, encode_batch(records))
    return image


def run(image: MetadataImage, live: set[int], **kw: object) -> list:
    records = reconcile(
        image,
        Liveness(live=frozenset(live), caught_up=frozenset(live)),
        unclean_allowed=lambda topic: bool(kw.get("unclean", False)),
        rebalance_preferred=bool(kw.get("preferred", False)),
    )
    image.apply_entry(image.applied_index + 1, encode_batch(records))
    return records


def test_nothing_to_do_when_all_live() -> None:
    image = cluster()
    assert run(image, {1, 2, 3}) == []


def test_dead_broker_is_fenced_and_its_leaderships_move_within_isr() -> None:
    image = cluster()
    records = run(image, {2, 3})
    assert records[0] == FenceBroker(node_id=1, incarnation="i")
    assert image.brokers[1].fenced
    for p in image.partitions():
        assert p.leader in (2, 3)
        assert 1 not in p.isr
    p0 = image.partition("t", 0)
    assert p0 is not None
    assert p0.leader == 2  # next in preference order (replicas [1, 2, 3])
    assert p0.leader_epoch == 1
    # Level-triggered: running again changes nothing.
    assert run(image, {2, 3}) == []


def test_last_isr_member_dies_partition_goes_offline_isr_kept() -> None:
    image = cluster(1)
    run(image, {1})  # 2 and 3 fenced: ISR [1]
    p = image.partition("t", 0)
    assert p is not None
    assert p.isr == (1,)
    run(image, set())
    p = image.partition("t", 0)
    assert p is not None
    assert p.leader is None
    assert p.isr == (1,)
    # Replica 2 returns: not in ISR, so no clean leader.
    run(image, {2})
    p = image.partition("t", 0)
    assert p is not None
    assert p.leader is None
    # 1 returns: it leads again.
    run(image, {1, 2})
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.isr) == (1, (1,))


def test_unclean_election_when_allowed() -> None:
    image = cluster(1)
    run(image, {1})
    run(image, set())
    run(image, {2}, unclean=True)
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.isr) == (2, (2,))


def test_returning_broker_is_unfenced_only_when_caught_up() -> None:
    image = cluster()
    run(image, {2, 3})
    records = reconcile(
        image,
        Liveness(live=frozenset({1, 2, 3}), caught_up=frozenset({2, 3})),
        unclean_allowed=lambda t: False,
    )
    assert records == []
    records = reconcile(
        image,
        Liveness(live=frozenset({1, 2, 3}), caught_up=frozenset({1, 2, 3})),
        unclean_allowed=lambda t: False,
    )
    assert records == [UnfenceBroker(node_id=1, incarnation="i")]


def test_preferred_leader_rebalance() -> None:
    image = cluster()
    run(image, {2, 3})
    # 1 returns and rejoins the ISR of partition 0 (the leader adds it).
    run(image, {1, 2, 3})
    p = image.partition("t", 0)
    assert p is not None
    image.apply_entry(
        image.applied_index + 1,
        encode_batch(
            [
                PartitionChange(
                    topic_id="tid",
                    partition=0,
                    partition_epoch=p.partition_epoch,
                    leader=p.leader,
                    isr=[2, 3, 1],
                )
            ]
        ),
    )
    assert run(image, {1, 2, 3}) == []  # no rebalance unless asked
    run(image, {1, 2, 3}, preferred=True)
    p = image.partition("t", 0)
    assert p is not None
    assert p.leader == 1


def test_controlled_shutdown_moves_leaderships_and_leaves_isrs() -> None:
    image = cluster()
    changes, stuck = move_leaderships_off(image, 1, {1, 2, 3})
    assert stuck == 0
    image.apply_entry(2, encode_batch(list(changes)))
    for p in image.partitions():
        assert p.leader != 1
        assert 1 not in p.isr


def test_controlled_shutdown_of_sole_isr_member_is_stuck() -> None:
    image = cluster(1)
    run(image, {1})
    changes, stuck = move_leaderships_off(image, 1, {1})
    assert (changes, stuck) == ([], 1)


def restart(image: MetadataImage, node: int, incarnation: str) -> None:
    """``node``'s process restarted and registered again (before anyone fenced it)."""
    record = RegisterBroker(
        node_id=node, directory_id="d", incarnation=incarnation, rpc="", gossip="", raft=""
    )
    image.apply_entry(image.applied_index + 1, encode_batch([record]))


def test_a_restarted_leader_loses_its_leaderships_and_isrs_before_it_is_unfenced() -> None:
    image = cluster()
    before = {p.partition: p for p in image.partitions()}
    restart(image, 1, "i2")
    assert image.brokers[1].fenced
    # First pass: it is live and caught up, but still leads t-0 and is in every ISR.
    records = run(image, {1, 2, 3})
    assert UnfenceBroker(node_id=1, incarnation="i2") not in records
    for p in image.partitions():
        assert p.leader != 1 and 1 not in p.isr
    p0 = image.partition("t", 0)
    assert p0 is not None
    assert (p0.leader, p0.leader_epoch) == (2, before[0].leader_epoch + 1)
    # Second pass: it holds nothing now, so it is unfenced; it rejoins ISRs as a
    # follower once it has caught up (the leader proposes that), not here.
    assert run(image, {1, 2, 3}) == [UnfenceBroker(node_id=1, incarnation="i2")]
    assert not image.brokers[1].fenced
    assert run(image, {1, 2, 3}) == []


def test_a_restarted_sole_isr_member_leads_again_at_a_new_epoch() -> None:
    image = cluster(1)
    run(image, {1})  # 2 and 3 fenced: ISR [1], 1 leads
    p = image.partition("t", 0)
    assert p is not None
    epoch = p.leader_epoch
    restart(image, 1, "i2")
    run(image, {1})  # nobody else can lead: offline while 1 is fenced
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.isr) == (None, (1,))
    run(image, {1})  # unfenced, and elected again: never at its pre-restart epoch
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.isr) == (1, (1,)) and p.leader_epoch > epoch
    assert not image.brokers[1].fenced


def test_whole_cluster_restart_unfences_brokers_in_all_fenced_isrs() -> None:
    image = cluster()
    run(image, set())  # everyone down: fenced, partitions offline, ISRs kept
    for node in (1, 2, 3):
        restart(image, node, "i2")
    run(image, {1, 2, 3})
    run(image, {1, 2, 3})
    assert not any(b.fenced for b in image.brokers.values())
    for p in image.partitions():
        assert p.leader is not None


def test_a_restarted_sole_isr_member_is_not_passed_over_by_an_unclean_election() -> None:
    image = cluster(1)
    run(image, {1})  # 2 and 3 fenced: ISR [1]
    run(image, {1, 2, 3})  # 2 and 3 back (unfenced); only their leader adds them to the ISR
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.isr) == (1, (1,))
    assert not any(b.fenced for b in image.brokers.values())
    restart(image, 1, "i2")
    # 1 is held fenced for a pass (it still leads); 2 and 3 may not lead in its place,
    # even with unclean election allowed: they lack what only 1 has.
    run(image, {1, 2, 3}, unclean=True)
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.isr) == (None, (1,))
    run(image, {1, 2, 3}, unclean=True)
    p = image.partition("t", 0)
    assert p is not None
    assert (p.leader, p.isr) == (1, (1,))


def test_whole_cluster_restart_before_anyone_was_fenced_moves_every_epoch() -> None:
    """Every process restarts at once, before the controller fenced any: each registers
    fenced with its leaderships and ISRs still in place. They come back one pass at a
    time, and no partition is led again at an epoch from before the restart."""
    image = cluster()
    before = {p.partition: p.leader_epoch for p in image.partitions()}
    for node in (1, 2, 3):
        restart(image, node, "i2")
    for _ in range(6):
        run(image, {1, 2, 3})
    assert not any(b.fenced for b in image.brokers.values())
    for p in image.partitions():
        assert p.leader is not None and p.leader_epoch > before[p.partition]
    assert run(image, {1, 2, 3}) == []
