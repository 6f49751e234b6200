"""Raft paper §7: log compaction, snapshots and InstallSnapshot (chunked)."""

from __future__ import annotations

from raft_helpers import (
    CLUSTER,
    Network,
    config_of,
    drain,
    make_cfg,
    new_core,
    nid,
    storage_with,
)

from dlog.raft.messages import (
    AppendResponse,
    InstallSnapshot,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
)
from dlog.raft.progress import ProgressState


def snapshot_and_compact(net: Network, i: int, data: bytes = b"state") -> SnapshotMeta:
    """Node ``i`` snapshots its applied state and drops the log it covers."""
    core = net.core(i)
    st = net.storages[nid(i)]
    index = core.log.applied
    meta = SnapshotMeta(index=index, term=st.term(index), config=core.config)
    st.create_snapshot(meta, data)
    st.compact(index)
    return meta


def lagging_follower_net(chunk: int = 4, **cfg: object) -> Network:
    net = Network.of(3, make_cfg(snapshot_chunk_bytes=chunk, **cfg))
    net.elect(1)
    net.isolate(3)
    for i in range(5):
        net.propose(1, b"x%d" % i)
    return net


def test_a_follower_behind_the_leader_log_start_gets_the_snapshot_in_chunks() -> None:
    net = lagging_follower_net(chunk=4)
    data = b"0123456789abcdefghij"  # 20 bytes: 5 chunks
    meta = snapshot_and_compact(net, 1, data)
    assert net.storages[nid(1)].first_index() == meta.index + 1
    net.recover()
    net.tick(1)
    chunks = [m for m in net.delivered if isinstance(m, InstallSnapshot) and m.to == 3]
    assert [c.offset for c in chunks] == [0, 4, 8, 12, 16]
    assert [c.done for c in chunks] == [False] * 4 + [True]
    follower = net.storages[nid(3)]
    assert follower.snapshot() == Snapshot(meta=meta, data=data)
    assert net.core(3).log.committed >= meta.index
    assert net.core(1).stats["snapshot_sent"] == 1
    assert net.core(3).stats["snapshot_installed"] == 1
    # Replication carries on from the log after the snapshot.
    net.propose(1, b"after")
    assert net.applied_data(3)[-1:] == [b"after"]
    pr = net.core(1).progress(nid(3))
    assert pr is not None
    assert pr.state is ProgressState.REPLICATE


def test_the_installed_snapshot_carries_the_configuration() -> None:
    net = lagging_follower_net()
    meta = snapshot_and_compact(net, 1)
    net.recover()
    net.tick(1)
    assert net.core(3).config == meta.config
    assert net.storages[nid(3)].snapshot().meta.config == config_of([1, 2, 3])


def test_a_lost_chunk_is_sent_again_from_the_last_acknowledged_byte() -> None:
    net = lagging_follower_net(chunk=4)
    snapshot_and_compact(net, 1, b"0123456789")
    net.recover()
    lost = []

    def lose_offset_4_once(m: object) -> bool:
        if isinstance(m, InstallSnapshot) and m.offset == 4 and not lost:
            lost.append(m)
            return False
        return True

    net.filter = lose_offset_4_once
    net.tick(1)
    assert lost
    assert net.storages[nid(3)].snapshot().meta.index == 0  # not complete yet
    net.tick(1)  # the next heartbeat interval goes back to the acknowledged offset
    assert net.storages[nid(3)].snapshot().data == b"0123456789"


def test_a_follower_that_restarts_mid_transfer_gets_the_snapshot_from_the_start() -> None:
    net = lagging_follower_net(chunk=4, max_inflight_snapshot_chunks=1)
    snapshot_and_compact(net, 1, b"0123456789abcdef")
    net.recover()
    seen = []

    def crash_3_after_two_chunks(m: object) -> bool:
        if isinstance(m, InstallSnapshot):
            seen.append(m.offset)
            return len(seen) <= 2
        return True

    net.filter = crash_3_after_two_chunks
    net.tick(1)
    assert seen[:2] == [0, 4]
    net.crash_and_restart(3)  # its partial buffer was only in memory
    net.filter = None
    for _ in range(3):
        net.tick(1)
    assert net.storages[nid(3)].snapshot().data == b"0123456789abcdef"
    responses = [m for m in net.delivered if isinstance(m, SnapshotResponse) and m.from_id == 3]
    assert any(r.next_offset == 0 for r in responses)  # asked to start over


def test_a_snapshot_older_than_the_commit_index_is_ignored() -> None:
    st = storage_with(config_of([1, 2, 3]), (1, 1, 1))  # indexes 1..4
    core = new_core(2, st)
    drain(core, st)
    core.log.commit_to(4)
    meta = SnapshotMeta(index=3, term=1, config=config_of([1, 2, 3]))
    core.step(
        InstallSnapshot(
            cluster_id=CLUSTER,
            term=2,
            from_id=nid(1),
            from_dir="dir1.0",
            to=nid(2),
            meta=meta,
            offset=0,
            total=1,
            data=b"s",
            done=True,
        )
    )
    msgs = drain(core, st)
    assert [(type(m), m.index) for m in msgs] == [(AppendResponse, 4)]
    assert st.snapshot().meta.index == 0
    assert st.last_index() == 4


def test_a_follower_whose_log_has_the_snapshot_entry_keeps_its_log() -> None:
    # §7: "If the follower's log has an entry with the same index and term as the
    # snapshot's last entry, retain log entries following it".
    st = storage_with(config_of([1, 2, 3]), (1, 1, 1, 1))  # indexes 1..5
    core = new_core(2, st)
    drain(core, st)
    meta = SnapshotMeta(index=3, term=1, config=config_of([1, 2, 3]))
    core.step(
        InstallSnapshot(
            cluster_id=CLUSTER,
            term=2,
            from_id=nid(1),
            from_dir="dir1.0",
            to=nid(2),
            meta=meta,
            offset=0,
            total=1,
            data=b"s",
            done=True,
        )
    )
    msgs = drain(core, st)
    assert core.log.committed == 3
    assert st.last_index() == 5
    assert st.snapshot().meta.index == 0  # nothing to install
    assert isinstance(msgs[0], AppendResponse)


def test_a_follower_with_a_conflicting_log_discards_it_for_the_snapshot() -> None:
    st = storage_with(config_of([1, 2, 3]), (1, 1, 1, 1))
    core = new_core(2, st)
    drain(core, st)
    meta = SnapshotMeta(index=4, term=3, config=config_of([1, 2, 3]))
    core.step(
        InstallSnapshot(
            cluster_id=CLUSTER,
            term=3,
            from_id=nid(1),
            from_dir="dir1.0",
            to=nid(2),
            meta=meta,
            offset=0,
            total=5,
            data=b"state",
            done=True,
        )
    )
    rd = core.ready()
    assert rd is not None
    assert rd.snapshot == Snapshot(meta=meta, data=b"state")
    assert rd.committed_entries == ()  # the state machine restores from the snapshot
    drain_msgs = list(rd.messages)
    st.apply_snapshot(rd.snapshot)
    core.advance(rd)
    assert st.last_index() == 4
    assert st.first_index() == 5
    assert core.log.applied == 4
    assert [(type(m), m.index) for m in drain_msgs] == [(AppendResponse, 4)]


def test_a_restarted_node_applies_only_entries_after_its_snapshot() -> None:
    net = Network.of(3)
    net.elect(1)
    for i in range(4):
        net.propose(1, b"x%d" % i)
    meta = snapshot_and_compact(net, 2, b"snap")
    net.propose(1, b"y")
    core = net.crash_and_restart(2)
    assert core.log.applied == meta.index
    net.settle()
    assert net.applied_data(2) == [b"y"]


def test_entries_kept_behind_the_snapshot_are_not_applied_twice_on_restart() -> None:
    net = Network.of(3)
    net.elect(1)
    for i in range(4):
        net.propose(1, b"x%d" % i)
    core = net.core(2)
    st = net.storages[nid(2)]
    index = core.log.applied
    st.create_snapshot(SnapshotMeta(index=index, term=st.term(index), config=core.config), b"s")
    st.compact(index - 2)  # keep two entries for slow followers
    core = net.crash_and_restart(2)
    assert core.log.applied == index
    net.settle()
    assert net.applied[nid(2)] == []


def test_compaction_never_drops_entries_the_snapshot_does_not_cover() -> None:
    import pytest

    from dlog.errors import StorageError

    net = Network.of(3)
    net.elect(1)
    net.propose(1, b"x")
    st = net.storages[nid(1)]
    with pytest.raises(StorageError):
        st.compact(st.last_index())


def test_a_follower_that_installed_an_outdated_snapshot_gets_a_newer_one() -> None:
    # The leader compacts past the snapshot it is still streaming: once the follower
    # has installed the old one, the leader must move it on to the new one.
    net = lagging_follower_net(chunk=4, max_inflight_snapshot_chunks=1)
    old = snapshot_and_compact(net, 1, b"old-snapshot")
    net.recover()
    net.isolate(2)  # let only node 3 talk to the leader (no commits meanwhile)
    held = []

    def hold_the_last_chunk(m: object) -> bool:
        if isinstance(m, InstallSnapshot) and m.done and not held:
            held.append(m)
            return False
        return True

    net.filter = hold_the_last_chunk
    net.tick(1)
    assert held
    net.filter = None
    net.recover()
    net.isolate(3)
    for i in range(3):
        net.propose(1, b"more%d" % i)
    new = snapshot_and_compact(net, 1, b"new-snapshot")
    assert new.index > old.index
    net.recover()
    net.settle([held[0]])  # the old snapshot completes on node 3
    for _ in range(4):
        net.tick(1)
    assert net.storages[nid(3)].snapshot().meta == new
    assert net.core(3).log.committed == net.core(1).log.committed
    pr = net.core(1).progress(nid(3))
    assert pr is not None
    assert pr.state is ProgressState.REPLICATE
