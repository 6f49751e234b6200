"""Leadership transfer (thesis §3.10) and ReadIndex (thesis §6.4)."""

from __future__ import annotations

import pytest
from raft_helpers import Network, make_cfg, nid

from dlog.errors import NotLeaderError
from dlog.raft.core import TransferError
from dlog.raft.messages import AppendEntries, HeartbeatResponse, Role, TimeoutNow

# --- transfer ----------------------------------------------------------------------


def test_transfer_to_an_up_to_date_follower_is_immediate() -> None:
    net = Network.of(3, make_cfg(check_quorum=True, pre_vote=True))
    old = net.elect(1)
    term = old.term
    old.transfer_leadership(nid(2))
    net.settle()
    assert net.core(2).role is Role.LEADER
    assert net.core(2).term == term + 1
    assert old.role is Role.FOLLOWER
    assert old.leader == 2
    # TimeoutNow bypassed the followers' leader lease (check-quorum is on).
    assert net.core(3).stats["vote_ignored_in_lease"] == 0


def test_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    net = Network.of(3)
    old = net.elect(1)
    net.isolate(3)
    net.propose(1, b"a", b"b")
    net.recover()
    net.delivered.clear()
    old.transfer_leadership(nid(3))
    net.settle()
    kinds = [type(m) for m in net.delivered if m.to == 3 and m.from_id == 1]
    assert kinds.index(AppendEntries) < kinds.index(TimeoutNow)
    assert net.core(3).role is Role.LEADER
    assert net.applied_data(3) == [b"a", b"b"]


def test_proposals_are_refused_while_a_transfer_is_pending() -> None:
    net = Network.of(3)
    old = net.elect(1)
    net.isolate(2)
    old.transfer_leadership(nid(2))
    with pytest.raises(NotLeaderError, match="transfer"):
        old.propose(b"x")


def test_a_transfer_that_does_not_finish_in_an_election_timeout_is_aborted() -> None:
    net = Network.of(3)
    old = net.elect(1)
    net.isolate(2)
    old.transfer_leadership(nid(2))
    net.tick(1, 10)
    assert old.lead_transferee is None
    assert old.stats["transfer_aborted"] == 1
    assert old.role is Role.LEADER
    net.propose(1, b"x")
    assert net.applied_data(1) == [b"x"]


def test_transfer_only_to_a_voter() -> None:
    net = Network.of(3, learners=[3])
    old = net.elect(1)
    with pytest.raises(TransferError):
        old.transfer_leadership(nid(3))
    with pytest.raises(NotLeaderError):
        net.core(2).transfer_leadership(nid(1))


# --- ReadIndex -----------------------------------------------------------------------


def test_a_read_on_the_leader_is_released_after_a_quorum_acknowledges_a_heartbeat() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    net.propose(1, b"x")
    net.isolate(1)
    leader.read_index(b"r1")
    net.settle()
    assert net.read_states[nid(1)] == []  # nobody confirmed the leadership yet
    net.recover()
    net.tick(1)  # the next heartbeat carries the read's context
    (rs,) = net.read_states[nid(1)]
    assert rs.context == b"r1"
    assert rs.index == leader.log.committed


def test_a_read_is_confirmed_with_the_reads_own_heartbeat_round() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    leader.read_index(b"r1")
    net.settle()
    (rs,) = net.read_states[nid(1)]
    assert rs.context == b"r1"
    acks = [m for m in net.delivered if isinstance(m, HeartbeatResponse) and m.context == b"r1"]
    assert len(acks) >= 1


def test_a_deposed_leader_never_answers_a_read() -> None:
    net = Network.of(3)
    old = net.elect(1)
    net.isolate(1)
    old.read_index(b"stale")
    net.elect(2)
    net.propose(2, b"newer")
    for _ in range(30):
        old.tick()
        net.settle()
    assert net.read_states[nid(1)] == []


def test_reads_wait_until_the_new_leader_commits_an_entry_of_its_term() -> None:
    net = Network.of(3)
    net.filter = lambda m: not isinstance(m, AppendEntries)
    leader = net.elect(1)
    leader.read_index(b"r")
    net.settle()
    assert net.read_states[nid(1)] == []
    net.filter = None
    net.tick(1, 2)
    (rs,) = net.read_states[nid(1)]
    assert rs.index >= leader.log.last_index()


def test_a_follower_read_is_forwarded_to_the_leader() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    net.propose(1, b"x")
    net.core(3).read_index(b"f")
    net.settle()
    (rs,) = net.read_states[nid(3)]
    assert rs.context == b"f"
    assert rs.index == leader.log.committed
    assert net.read_states[nid(1)] == []


def test_a_read_without_a_known_leader_fails_fast() -> None:
    net = Network.of(3)
    with pytest.raises(NotLeaderError):
        net.core(2).read_index(b"x")


def test_a_single_voter_answers_reads_at_once() -> None:
    net = Network.of(1)
    net.elect(1)
    net.core(1).read_index(b"solo")
    net.settle()
    (rs,) = net.read_states[nid(1)]
    assert rs.context == b"solo"


def test_reads_are_released_in_order_by_a_later_confirmation() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    net.isolate(1)
    for ctx in (b"a", b"b", b"c"):
        leader.read_index(ctx)
    net.settle()
    net.recover()
    net.tick(1)
    assert [rs.context for rs in net.read_states[nid(1)]] == [b"a", b"b", b"c"]
