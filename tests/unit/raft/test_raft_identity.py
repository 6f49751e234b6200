"""Identity (cluster id, directory id), bootstrap, and the Ready contract."""

from __future__ import annotations

import random

import pytest
from raft_helpers import (
    CLUSTER,
    Network,
    config_of,
    drain,
    make_cfg,
    member,
    new_core,
    nid,
    storage_with,
)

from dlog.errors import InconsistentClusterIdError
from dlog.raft.core import CoreConfig, RaftCore
from dlog.raft.messages import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    EntryType,
    Heartbeat,
    RequestVote,
    Role,
    VoteResponse,
)
from dlog.raft.storage import MemoryStorage

# --- cluster id ----------------------------------------------------------------------


def test_a_message_from_another_cluster_is_rejected_counted_and_changes_nothing() -> None:
    st = storage_with(config_of([1, 2, 3]))
    core = new_core(1, st)
    drain(core, st)
    term = core.term
    with pytest.raises(InconsistentClusterIdError):
        core.step(
            Heartbeat(
                cluster_id="other-cluster",
                term=term + 10,
                from_id=nid(2),
                from_dir="dir2.0",
                to=nid(1),
                commit=0,
            )
        )
    assert core.term == term
    assert core.leader is None
    assert core.stats["cluster_id_mismatch"] == 1
    assert drain(core, st) == []


def test_two_clusters_on_one_network_never_mix() -> None:
    a = storage_with(config_of([1, 2, 3]))
    cores = {1: new_core(1, a, cluster_id="A")}
    for i in (2, 3):
        cores[i] = new_core(i, storage_with(config_of([1, 2, 3])), cluster_id="B")
    net = Network(cores, {1: a, **{i: cores[i].log.storage for i in (2, 3)}})  # type: ignore[dict-item]
    cores[1].campaign()
    with pytest.raises(InconsistentClusterIdError):
        net.settle()
    assert cores[1].role is not Role.LEADER


def test_a_misaddressed_message_is_dropped() -> None:
    st = storage_with(config_of([1, 2, 3]))
    core = new_core(1, st)
    core.step(
        Heartbeat(
            cluster_id=CLUSTER, term=9, from_id=nid(2), from_dir="dir2.0", to=nid(3), commit=0
        )
    )
    assert core.term != 9
    assert core.stats["misaddressed"] == 1


# --- directory id: a wiped disk is a different voter ------------------------------------------


def wiped(net: Network, i: int) -> RaftCore:
    """Node ``i`` lost its disk: empty storage, new directory id, same node id."""
    st = MemoryStorage()
    core = new_core(i, st, net.core(1).cfg, generation=1)
    net.add(i, core, st)
    return core


def test_a_wiped_voter_cannot_vote_as_its_old_self() -> None:
    # Node 3 lost its disk. It would grant any vote (empty log, no memory of having
    # voted): its vote must not count, or one term could get two leaders.
    net = Network.of(3)
    net.elect(2)
    net.propose(2, b"x")
    net.down.add(nid(2))
    fresh = wiped(net, 3)
    fresh.campaign()  # cannot: not a voter with this directory id
    assert fresh.role is Role.FOLLOWER
    c1 = net.core(1)
    c1.campaign()  # only wiped 3 can answer
    net.settle()
    grants = [m for m in net.delivered if isinstance(m, VoteResponse) and m.from_id == 3]
    assert grants
    assert not grants[-1].reject
    assert c1.role is Role.CANDIDATE
    assert c1.stats["vote_from_non_voter"] >= 1


def test_a_wiped_node_cannot_lose_committed_entries() -> None:
    # The danger the directory id prevents: 1 and 2 hold a committed entry; 2 is
    # wiped; 3 (which lacks the entry) must not win with wiped 2's vote.
    net = Network.of(3)
    net.elect(1)
    net.isolate(3)
    net.propose(1, b"x")
    net.recover()
    net.down.add(nid(1))
    wiped(net, 2)
    net.core(3).campaign()
    net.settle()
    assert net.core(3).role is not Role.LEADER


def test_the_leader_ignores_a_wiped_member_s_answers() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    wiped(net, 3)
    net.propose(1, b"x")
    net.tick(1)
    assert leader.stats["directory_id_mismatch"] >= 1
    pr = leader.progress(nid(3))
    assert pr is not None
    assert pr.match < leader.log.last_index()


def test_a_wiped_node_rejoins_by_removal_then_re_adding() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    fresh = wiped(net, 3)
    leader.propose_conf_change(ConfChange(type=ConfChangeType.REMOVE_NODE, node_id=nid(3)))
    net.settle()
    m = member(3, generation=1)
    leader.propose_conf_change(
        ConfChange(
            type=ConfChangeType.ADD_LEARNER,
            node_id=m.node_id,
            directory_id=m.directory_id,
            address=m.address,
        )
    )
    net.settle()
    leader.propose_conf_change(ConfChange(type=ConfChangeType.PROMOTE_LEARNER, node_id=nid(3)))
    net.settle()
    assert fresh.is_voter
    assert fresh.log.last_index() == leader.log.last_index()


# --- bootstrap ---------------------------------------------------------------------------


def test_bootstrap_writes_the_initial_configuration_as_entry_one() -> None:
    st = MemoryStorage()
    core = RaftCore(
        node_id=nid(1),
        directory_id="dir1.0",
        cluster_id=CLUSTER,
        storage=st,
        config=make_cfg(),
        rng=random.Random(1),
    )
    assert core.bootstrap(config_of([1, 2, 3]))
    rd = core.ready()
    assert rd is not None
    (entry,) = rd.entries
    assert (entry.index, entry.term, entry.type) == (1, 1, EntryType.CONFIG)
    assert rd.hard_state is not None
    assert rd.hard_state.commit == 1
    assert rd.committed_entries == (entry,)
    assert core.config == config_of([1, 2, 3])
    assert core.is_voter


def test_bootstrap_is_a_no_op_when_raft_state_exists() -> None:
    st = storage_with(config_of([1, 2, 3]), (1, 1))
    core = new_core(1, st)
    assert not core.bootstrap(config_of([1, 9]))
    assert core.config == config_of([1, 2, 3])
    assert core.log.last_index() == 3


def test_a_bootstrapped_single_node_elects_itself() -> None:
    st = MemoryStorage()
    core = RaftCore(
        node_id=nid(1),
        directory_id="dir1.0",
        cluster_id=CLUSTER,
        storage=st,
        config=CoreConfig(),
        rng=random.Random(1),
    )
    core.bootstrap(config_of([1]))
    drain(core, st)
    for _ in range(20):
        core.tick()
    assert core.role is Role.LEADER


def test_a_node_that_never_bootstrapped_waits_to_be_added() -> None:
    st = MemoryStorage()
    core = new_core(4, st)
    for _ in range(100):
        core.tick()
    assert core.role is Role.FOLLOWER
    assert drain(core, st) == []


# --- the Ready contract ---------------------------------------------------------------------


def test_entries_are_handed_over_for_persisting_with_the_messages_that_need_them() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    leader.propose(b"x")
    rd = leader.ready()
    assert rd is not None
    assert rd.must_sync
    assert [e.data for e in rd.entries] == [b"x"]
    appends = [m for m in rd.messages if isinstance(m, AppendEntries)]
    assert appends
    assert all(m.entries[-1].data == b"x" for m in appends)


def test_a_follower_acknowledges_only_in_the_ready_that_persists_the_entries() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    leader.propose(b"x")
    rd = leader.ready()
    assert rd is not None
    (to_2,) = [m for m in rd.messages if isinstance(m, AppendEntries) and m.to == 2]
    follower = net.core(2)
    follower.step(to_2)
    frd = follower.ready()
    assert frd is not None
    assert [e.data for e in frd.entries] == [b"x"]
    assert frd.must_sync
    (ack,) = frd.messages
    assert isinstance(ack, AppendResponse)
    assert ack.index == to_2.entries[-1].index


def test_steps_between_ready_and_advance_are_kept_for_the_next_ready() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    leader.propose(b"a")
    rd1 = leader.ready()
    leader.propose(b"b")  # while the driver persists rd1
    assert rd1 is not None
    net.storages[nid(1)].append(rd1.entries)
    leader.advance(rd1)
    rd2 = leader.ready()
    assert rd2 is not None
    assert [e.data for e in rd1.entries] == [b"a"]
    assert [e.data for e in rd2.entries] == [b"b"]


def test_a_vote_is_persisted_before_the_vote_request_goes_out() -> None:
    st = storage_with(config_of([1, 2, 3]))
    core = new_core(1, st, make_cfg(pre_vote=False))
    drain(core, st)
    core.campaign()
    rd = core.ready()
    assert rd is not None
    assert any(isinstance(m, RequestVote) for m in rd.messages)
    assert rd.hard_state is not None
    assert rd.hard_state.vote == 1
    assert rd.must_sync
