"""Raft paper §5.1 (terms) and §5.2 (leader election), plus pre-vote and check-quorum."""

from __future__ import annotations

import pytest
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
    AppendEntries,
    AppendResponse,
    Heartbeat,
    RequestVote,
    Role,
    VoteResponse,
)


def hdr(frm: int, to: int, term: int, frm_dir: str | None = None) -> dict[str, object]:
    return {
        "cluster_id": CLUSTER,
        "term": term,
        "from_id": nid(frm),
        "from_dir": frm_dir or f"dir{frm}.0",
        "to": nid(to),
    }


def three_node_core(i: int = 1, **cfg: object):
    st = storage_with(config_of([1, 2, 3]))
    core = new_core(i, st, make_cfg(**cfg))
    drain(core, st)
    return core, st


# --- §5.1 terms -------------------------------------------------------------------


@pytest.mark.parametrize("role", ["follower", "candidate", "leader"])
def test_a_higher_term_makes_any_role_a_follower_of_that_term(role: str) -> None:
    # "If RPC request or response contains term T > currentTerm: set currentTerm = T,
    # convert to follower."
    net = Network.of(3)
    core = net.core(1)
    if role == "candidate":
        core.campaign()
        assert core.role is Role.CANDIDATE
    elif role == "leader":
        net.elect(1)
    term = core.term
    core.step(Heartbeat(**hdr(2, 1, term + 5), commit=0))
    assert core.role is Role.FOLLOWER
    assert core.term == term + 5
    assert core.leader == 2


def test_a_message_from_an_older_term_is_rejected() -> None:
    # "Reply false if term < currentTerm"; a stale leader learns the newer term.
    core, st = three_node_core(check_quorum=True)
    core.step(Heartbeat(**hdr(2, 1, 7), commit=0))
    drain(core, st)
    core.step(AppendEntries(**hdr(3, 1, 5), prev_index=1, prev_term=1, entries=(), commit=1))
    msgs = drain(core, st)
    assert core.term == 7
    assert core.leader == 2
    assert [(type(m), m.to, m.term) for m in msgs] == [(AppendResponse, 3, 7)]
    assert core.stats["stale_term"] == 1


def test_a_stale_leader_steps_down_when_told_the_newer_term() -> None:
    net = Network.of(3)
    old = net.elect(1)
    net.isolate(1)
    net.elect(2)
    net.recover()
    net.tick(1)  # its heartbeat is answered with the newer term
    assert old.role is Role.FOLLOWER
    assert old.term == net.core(2).term


# --- §5.2 election ----------------------------------------------------------------


def test_a_follower_that_hears_nothing_becomes_a_candidate_and_asks_for_votes() -> None:
    # "If election timeout elapses without receiving AppendEntries from current leader
    # or granting vote to candidate: convert to candidate"; "On conversion to candidate:
    # increment currentTerm, vote for self, send RequestVote RPCs to all other servers".
    core, st = three_node_core()
    term = core.term
    for _ in range(20):
        core.tick()
    assert core.role is Role.CANDIDATE
    assert core.term == term + 1
    assert core.vote == 1
    msgs = drain(core, st)
    votes = [m for m in msgs if isinstance(m, RequestVote)]
    assert sorted(m.to for m in votes) == [2, 3]
    assert all(not m.pre_vote and m.term == term + 1 for m in votes)
    assert st.initial_state().vote == 1  # persisted with the requests


def test_election_timeouts_are_randomized_within_t_to_2t() -> None:
    seen = set()
    for seed in range(60):
        st = storage_with(config_of([1, 2, 3]))
        core = new_core(1, st, make_cfg(election_ticks=10), seed=seed)
        ticks = 0
        while core.role is Role.FOLLOWER:
            core.tick()
            ticks += 1
            assert ticks < 20
        seen.add(ticks)
    assert min(seen) >= 10
    assert max(seen) <= 19
    assert len(seen) > 5


def test_a_candidate_with_a_majority_of_votes_becomes_leader() -> None:
    net = Network.of(5)
    net.isolate(4)
    net.isolate(5)
    leader = net.elect(1)  # 1, 2, 3 make a majority of 5
    assert leader.leader == 1
    assert net.core(2).leader == 1


def test_a_candidate_rejected_by_a_majority_returns_to_follower() -> None:
    net = Network.of(3)
    net.elect(1)
    net.propose(1, b"x")
    net.isolate(3)
    net.propose(1, b"y")  # node 3's log falls behind
    net.recover()
    net.core(3).campaign()
    net.settle()
    assert net.core(3).role is Role.FOLLOWER


def test_a_split_vote_starts_a_new_election_with_a_new_term() -> None:
    # "If election timeout elapses: start new election".
    net = Network.of(3)
    net.isolate(1)
    net.isolate(2)
    net.isolate(3)
    c1 = net.core(1)
    c1.campaign()
    net.settle()
    term = c1.term
    assert c1.role is Role.CANDIDATE
    net.tick(1, 20)
    assert c1.role is Role.CANDIDATE
    assert c1.term > term


def test_a_voter_grants_at_most_one_vote_per_term_first_come_first_served() -> None:
    core, st = three_node_core()
    core.step(RequestVote(**hdr(2, 1, 2), pre_vote=False, last_index=1, last_term=1))
    core.step(RequestVote(**hdr(3, 1, 2), pre_vote=False, last_index=1, last_term=1))
    core.step(RequestVote(**hdr(2, 1, 2), pre_vote=False, last_index=1, last_term=1))
    msgs = drain(core, st)
    answers = [(m.to, m.reject) for m in msgs if isinstance(m, VoteResponse)]
    assert answers == [(2, False), (3, True), (2, False)]
    assert st.initial_state().vote == 2


def test_a_granted_vote_is_persisted_in_the_same_ready_as_the_response() -> None:
    core, _ = three_node_core()
    core.step(RequestVote(**hdr(2, 1, 2), pre_vote=False, last_index=1, last_term=1))
    rd = core.ready()
    assert rd is not None
    assert rd.hard_state is not None
    assert rd.hard_state.vote == 2
    assert rd.hard_state.term == 2
    assert rd.must_sync
    assert any(isinstance(m, VoteResponse) and not m.reject for m in rd.messages)


def test_a_leader_sends_heartbeats_every_heartbeat_interval() -> None:
    net = Network.of(3, make_cfg(heartbeat_ticks=3))
    leader = net.elect(1)
    st = net.storages[nid(1)]
    drain(leader, st)
    beats = []
    for _ in range(6):
        leader.tick()
        beats.append(sum(isinstance(m, Heartbeat) for m in drain(leader, st)))
    assert beats == [0, 0, 2, 0, 0, 2]


def test_a_heartbeat_resets_the_follower_election_timer() -> None:
    net = Network.of(3)
    net.elect(1)
    for _ in range(100):
        net.tick_all()
    assert net.core(1).role is Role.LEADER
    assert net.core(2).role is Role.FOLLOWER
    assert net.core(3).role is Role.FOLLOWER


def test_a_candidate_that_hears_from_a_leader_of_its_term_becomes_follower() -> None:
    # "If AppendEntries RPC received from new leader: convert to follower".
    core, st = three_node_core()
    core.campaign()
    term = core.term
    core.step(AppendEntries(**hdr(2, 1, term), prev_index=1, prev_term=1, entries=(), commit=1))
    assert core.role is Role.FOLLOWER
    assert core.leader == 2
    assert core.term == term


# --- pre-vote (thesis §9.6) -------------------------------------------------------------


def test_pre_vote_does_not_change_terms() -> None:
    net = Network.of(3, make_cfg(pre_vote=True))
    net.isolate(1)
    c1 = net.core(1)
    term = c1.term
    for _ in range(100):
        c1.tick()
        net.settle()
    assert c1.role is Role.PRE_CANDIDATE
    assert c1.term == term
    assert net.core(2).term == term


def test_a_partitioned_node_rejoining_does_not_disrupt_the_leader() -> None:
    net = Network.of(3, make_cfg(pre_vote=True, check_quorum=True))
    leader = net.elect(1)
    term = leader.term
    net.isolate(3)
    for _ in range(200):
        net.tick_all()
    net.recover()
    for _ in range(50):
        net.tick_all()
    assert leader.role is Role.LEADER
    assert leader.term == term
    assert net.core(3).leader == 1
    assert net.core(3).term == term


def test_without_pre_vote_a_rejoining_node_does_disrupt() -> None:
    """The counterpart of the test above: it fails without pre-vote and check-quorum."""
    net = Network.of(3, make_cfg(pre_vote=False, check_quorum=False))
    leader = net.elect(1)
    term = leader.term
    net.isolate(3)
    for _ in range(200):
        net.tick(3)
    net.recover()
    for _ in range(50):
        net.tick_all()
    assert max(c.term for c in net.cores.values()) > term


def test_a_pre_vote_is_refused_to_a_node_with_a_stale_log() -> None:
    net = Network.of(3, make_cfg(pre_vote=True))
    net.elect(1)
    net.isolate(3)
    net.propose(1, b"a")  # 1 and 2 have it, 3 does not
    net.recover()
    net.isolate(1)
    c3 = net.core(3)
    term = c3.term
    c3.campaign()
    net.settle()
    assert c3.role is Role.PRE_CANDIDATE
    assert c3.term == term
    assert net.core(2).term == term


def test_a_granted_pre_vote_leads_to_a_real_election() -> None:
    net = Network.of(3, make_cfg(pre_vote=True))
    term = net.core(1).term
    leader = net.elect(1)
    assert leader.term == term + 1


# --- check-quorum (thesis §6.2) ----------------------------------------------------------


def test_a_leader_without_a_quorum_steps_down_within_an_election_timeout() -> None:
    net = Network.of(3, make_cfg(check_quorum=True))
    leader = net.elect(1)
    net.isolate(1)
    for _ in range(21):
        leader.tick()
        net.settle()
    assert leader.role is Role.FOLLOWER
    assert leader.stats["check_quorum_step_down"] == 1


def test_a_leader_with_a_quorum_stays() -> None:
    net = Network.of(3, make_cfg(check_quorum=True))
    leader = net.elect(1)
    net.isolate(3)
    for _ in range(100):
        net.tick_all()
    assert leader.role is Role.LEADER


def test_a_follower_ignores_votes_while_it_hears_from_a_leader() -> None:
    core, st = three_node_core(check_quorum=True)
    core.step(Heartbeat(**hdr(2, 1, 2), commit=1))
    drain(core, st)
    core.step(RequestVote(**hdr(3, 1, 3), pre_vote=False, last_index=5, last_term=2))
    assert drain(core, st) == []
    assert core.term == 2
    assert core.vote is None
    assert core.stats["vote_ignored_in_lease"] == 1
    for _ in range(10):
        core.tick()
    core.step(RequestVote(**hdr(3, 1, 3), pre_vote=False, last_index=5, last_term=2))
    assert core.term == 3
    assert core.vote == 3
