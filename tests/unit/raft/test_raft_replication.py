"""Raft paper §5.3 (log replication) and §5.4 (safety), plus batching and pipelining."""

from __future__ import annotations

import pytest
from raft_helpers import (
    CLUSTER,
    Network,
    config_of,
    drain,
    entries,
    make_cfg,
    new_core,
    nid,
    storage_with,
)

from dlog.raft.messages import (
    AppendEntries,
    AppendResponse,
    EntryType,
    HardState,
    RequestVote,
    Role,
    VoteResponse,
)
from dlog.raft.progress import ProgressState


def hdr(frm: int, to: int, term: int) -> dict[str, object]:
    return {
        "cluster_id": CLUSTER,
        "term": term,
        "from_id": nid(frm),
        "from_dir": f"dir{frm}.0",
        "to": nid(to),
    }


def follower(log_terms: tuple[int, ...] = (), term: int = 1, **cfg: object):
    st = storage_with(config_of([1, 2, 3]), log_terms, term=term)
    core = new_core(2, st, make_cfg(**cfg))
    drain(core, st)
    return core, st


def log_terms(st) -> list[int]:
    return [e.term for e in st.all_entries()]


# --- §5.3 -------------------------------------------------------------------------


def test_a_new_leader_appends_a_no_op_of_its_term_and_commits_it() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    last = leader.log.last_index()
    noop = net.storages[nid(1)].entries(last, last + 1, 1 << 20)[0]
    assert noop.type is EntryType.NOOP
    assert noop.term == leader.term
    assert leader.log.committed == last
    for i in (1, 2, 3):
        assert net.applied[nid(i)][-1] == noop


def test_a_proposal_commits_once_a_majority_stores_it_and_is_applied_everywhere() -> None:
    net = Network.of(5)
    net.elect(1)
    net.isolate(4)
    net.isolate(5)
    net.propose(1, b"x")
    assert net.applied_data(1) == [b"x"]
    assert net.applied_data(2) == [b"x"]
    net.recover()
    net.tick(1)  # heartbeats find 4 and 5 behind; they catch up
    assert net.applied_data(4) == [b"x"]
    assert net.applied_data(5) == [b"x"]


def test_a_proposal_without_a_majority_does_not_commit() -> None:
    net = Network.of(5)
    leader = net.elect(1)
    net.isolate(1)
    index = net.propose(1, b"x")
    assert leader.log.committed < index
    assert net.applied_data(1) == []


def test_committed_entries_are_applied_once_in_log_order() -> None:
    net = Network.of(3)
    net.elect(1)
    for i in range(20):
        net.propose(1, b"%d" % i)
    net.tick_all()
    for i in (1, 2, 3):
        applied = net.applied[nid(i)]
        assert [e.index for e in applied] == list(range(1, len(applied) + 1))
        assert net.applied_data(i) == [b"%d" % i for i in range(20)]


def test_a_follower_rejects_entries_whose_predecessor_it_lacks() -> None:
    # AppendEntries rule 2: reply false if the log has no entry at prevLogIndex whose
    # term matches prevLogTerm; the reply hints where to look next.
    core, st = follower((1, 2, 2), term=2)  # indexes 2..4
    core.step(AppendEntries(**hdr(1, 2, 3), prev_index=4, prev_term=3, entries=(), commit=1))
    (resp,) = drain(core, st)
    assert isinstance(resp, AppendResponse)
    assert resp.reject
    assert resp.index == 4
    # Our term at 4 is 2 <= 3: the leader should look at index 4 for term 2.
    assert (resp.reject_hint, resp.log_term) == (4, 2)
    core.step(AppendEntries(**hdr(1, 2, 3), prev_index=9, prev_term=3, entries=(), commit=1))
    (resp,) = drain(core, st)
    assert resp.reject
    assert resp.reject_hint == 4


def test_an_accepted_append_that_asks_for_no_answer_gets_none() -> None:
    # A commit-only append to a follower the leader knows is caught up (ack=False):
    # the follower commits, and answers only if it has to reject.
    core, st = follower((1, 2, 2), term=2)  # indexes 2..4
    core.step(
        AppendEntries(**hdr(1, 2, 2), prev_index=4, prev_term=2, entries=(), commit=4, ack=False)
    )
    assert drain(core, st) == []
    assert core.log.committed == 4
    core.step(
        AppendEntries(**hdr(1, 2, 3), prev_index=4, prev_term=3, entries=(), commit=4, ack=False)
    )
    (resp,) = drain(core, st)
    assert isinstance(resp, AppendResponse) and resp.reject


def test_only_commit_only_appends_to_caught_up_followers_skip_the_answer() -> None:
    net = Network.of(3)
    net.elect(1)
    net.delivered.clear()
    net.propose(1, b"x")
    appends = [m for m in net.delivered if isinstance(m, AppendEntries)]
    with_entries = [m for m in appends if m.entries]
    commit_only = [m for m in appends if not m.entries]
    assert len(with_entries) == 2 and all(m.ack for m in with_entries)
    # The commit goes out when the first answer makes a majority: the follower that
    # answered is asked for nothing; the other's answer is still due, so it is asked.
    assert len(commit_only) == 2
    assert [m.ack for m in sorted(commit_only, key=lambda m: m.to)] == [False, True]
    answers = [m for m in net.delivered if isinstance(m, AppendResponse)]
    assert len(answers) == len(with_entries) + 1
    assert net.applied_data(2) == net.applied_data(3) == [b"x"]
    # A follower that has not acknowledged everything is still asked to answer.
    net.isolate(3)
    net.propose(1, b"y")
    pr = net.core(1)._progress[nid(3)]
    assert pr.match < net.core(1).log.last_index()
    net.delivered.clear()
    net.recover()
    net.tick(1)
    to_3 = [m for m in net.delivered if isinstance(m, AppendEntries) and m.to == nid(3)]
    assert to_3 and all(m.ack for m in to_3 if m.entries or m.prev_index > pr.match)
    assert net.applied_data(3) == [b"x", b"y"]


def test_a_follower_deletes_a_conflicting_suffix_and_appends_the_new_entries() -> None:
    # AppendEntries rules 3 and 4.
    core, st = follower((1, 2, 2), term=2)  # indexes 2..4 terms 1,2,2
    new = tuple(entries(3, 3, start=3))
    core.step(AppendEntries(**hdr(1, 2, 3), prev_index=2, prev_term=1, entries=new, commit=1))
    (resp,) = drain(core, st)
    assert isinstance(resp, AppendResponse)
    assert not resp.reject
    assert resp.index == 4
    assert log_terms(st) == [1, 1, 3, 3]


def test_a_follower_keeps_entries_it_already_has_when_a_message_repeats() -> None:
    core, st = follower((1, 2, 2), term=2)
    # A delayed copy of an old message must not truncate the log behind it.
    core.step(
        AppendEntries(
            **hdr(1, 2, 2), prev_index=1, prev_term=1, entries=tuple(entries(1, start=2)), commit=1
        )
    )
    drain(core, st)
    assert log_terms(st) == [1, 1, 2, 2]


def test_a_follower_commits_only_up_to_the_last_entry_the_message_vouches_for() -> None:
    # AppendEntries rule 5: commitIndex = min(leaderCommit, index of last new entry).
    # Our entries 4 and 5 (term 2) may differ from the leader's: the message only
    # proves index 3 matches.
    core, st = follower((1, 1, 2, 2), term=2)  # indexes 2..5
    core.step(
        AppendEntries(
            **hdr(1, 2, 3), prev_index=2, prev_term=1, entries=tuple(entries(1, start=3)), commit=9
        )
    )
    drain(core, st)
    assert core.log.committed == 3


def test_a_follower_commits_from_heartbeats() -> None:
    net = Network.of(3)
    net.elect(1)
    net.drop(1, 2, 1.0)
    index = net.propose(1, b"x")
    assert net.core(2).log.committed < index
    net.recover()
    net.tick(1)
    assert net.core(2).log.committed == index


FIGURE_7_LEADER = (1, 1, 4, 4, 5, 5, 6, 6, 6)  # indexes 2..10 (index 1 is the config, term 1)
FIGURE_7_FOLLOWERS = {
    "a": (1, 1, 4, 4, 5, 5, 6, 6),
    "b": (1, 1, 4),
    "c": (1, 1, 4, 4, 5, 5, 6, 6, 6, 6),
    "d": (1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7),
    "e": (1, 1, 4, 4, 4, 4),
    "f": (1, 1, 2, 2, 2, 3, 3, 3, 3, 3),
}


@pytest.mark.parametrize("case", sorted(FIGURE_7_FOLLOWERS))
def test_figure_7_a_new_leader_brings_any_follower_log_into_agreement(case: str) -> None:
    # §5.3: the leader finds the latest point where the logs agree, the follower
    # deletes everything after it and takes the leader's entries. With the reject
    # hints the leader skips whole terms, so a few round trips suffice.
    config = config_of([1, 2, 3])
    storages = {
        1: storage_with(config, FIGURE_7_LEADER, term=7),
        2: storage_with(config, FIGURE_7_FOLLOWERS[case], term=7),
        3: storage_with(config, FIGURE_7_LEADER, term=7),
    }
    cores = {i: new_core(i, st) for i, st in storages.items()}
    net = Network(cores, storages)
    leader = net.elect(1)
    assert leader.term == 8
    leader_before = net.storages[nid(1)].all_entries()[: len(FIGURE_7_LEADER) + 1]
    net.tick(1, 3)
    assert net.storages[nid(2)].all_entries() == net.storages[nid(1)].all_entries()
    # Leader Append-Only: the leader never rewrote its own entries.
    assert net.storages[nid(1)].all_entries()[: len(leader_before)] == leader_before
    rejections = [
        m for m in net.delivered if isinstance(m, AppendResponse) and m.reject and m.from_id == 2
    ]
    assert len(rejections) <= 3


def test_replication_is_pipelined_up_to_the_inflight_limit() -> None:
    net = Network.of(3, make_cfg(max_inflight_msgs=3))
    leader = net.elect(1)
    net.filter = lambda m: not (isinstance(m, AppendResponse) and m.from_id == 2)
    st = net.storages[nid(1)]
    sent = []
    for i in range(6):
        leader.propose(b"%d" % i)
        sent += [
            m for m in drain(leader, st) if isinstance(m, AppendEntries) and m.to == 2 and m.entries
        ]
    # Three unacknowledged messages, then the follower's window is full.
    assert len(sent) == 3
    pr = leader.progress(nid(2))
    assert pr is not None
    assert pr.state is ProgressState.REPLICATE
    assert pr.is_paused()


def test_a_batch_of_proposals_travels_in_one_message_within_the_byte_budget() -> None:
    net = Network.of(3, make_cfg(max_msg_bytes=10 * (24 + 100)))
    leader = net.elect(1)
    st = net.storages[nid(1)]
    leader.propose_batch([bytes(100)] * 25)
    msgs = [m for m in drain(leader, st) if isinstance(m, AppendEntries) and m.to == 2]
    assert [len(m.entries) for m in msgs] == [10, 10, 5]


def test_lost_appends_are_recovered_after_the_next_heartbeat() -> None:
    net = Network.of(3)
    net.elect(1)
    net.filter = lambda m: not (isinstance(m, AppendEntries) and m.to == 3 and m.entries)
    net.propose(1, b"a", b"b")
    net.filter = None
    net.tick(1)
    assert net.applied_data(3) == [b"a", b"b"]


# --- §5.4 safety ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cand_last_index", "cand_last_term", "granted"),
    [
        (3, 2, True),  # same last term, same length
        (5, 2, True),  # same last term, longer
        (2, 2, False),  # same last term, shorter
        (9, 1, False),  # older last term, however long
        (2, 3, True),  # newer last term, however short
    ],
)
def test_a_vote_is_granted_only_to_a_candidate_at_least_as_up_to_date(
    cand_last_index: int, cand_last_term: int, granted: bool
) -> None:
    # §5.4.1: compare the terms of the last entries, then the lengths.
    core, st = follower((2, 2), term=2)  # last index 3, last term 2
    core.step(
        RequestVote(
            **hdr(3, 2, 5), pre_vote=False, last_index=cand_last_index, last_term=cand_last_term
        )
    )
    (resp,) = drain(core, st)
    assert isinstance(resp, VoteResponse)
    assert resp.reject is (not granted)


def test_figure_8_an_entry_from_an_older_term_is_not_committed_by_counting() -> None:
    # §5.4.2. Node 1 led term 2 and wrote index 3 only to itself and node 2 ... then
    # leads again in term 4 and gets index 3 (term 2) onto node 3 too: a majority
    # holds it, yet it is not committed until an entry of term 4 is also on a majority.
    config = config_of([1, 2, 3, 4, 5])
    storages = {
        1: storage_with(config, (1, 2), term=3),  # indexes 2 (t1), 3 (t2)
        2: storage_with(config, (1, 2), term=3),
        3: storage_with(config, (1,), term=3),
        4: storage_with(config, (1,), term=3),
        5: storage_with(config, (1, 3), term=3),  # index 3 from term 3, never replicated
    }
    cores = {i: new_core(i, st, make_cfg(max_msg_bytes=1)) for i, st in storages.items()}
    net = Network(cores, storages)
    net.isolate(5)
    net.cut(1, 4)
    # Node 3 gets the term-2 entry (one entry per message) but never the term-4 no-op;
    # the leader's first probe (which node 3 rejects: it lacks index 3) goes through.
    probed = []

    def hold_back_the_no_op(m: object) -> bool:
        if isinstance(m, AppendEntries) and m.to == 3 and any(e.term == 4 for e in m.entries):
            probed.append(m)
            return len(probed) == 1
        return True

    net.filter = hold_back_the_no_op
    leader = net.elect(1)
    assert leader.term == 4
    pr3 = leader.progress(nid(3))
    assert pr3 is not None
    assert pr3.match == 3
    assert leader.log.committed < 3
    # Had it committed, node 5 could still win (last term 3 beats 2) and erase index 3.
    net.filter = None
    net.recover()
    net.tick(1, 2)
    assert leader.log.committed == 4  # index 3 commits with the term-4 no-op
    assert [e.term for e in net.applied[nid(3)]][-2:] == [2, 4]


def test_a_committed_entry_survives_the_leader_and_a_stale_node_cannot_win() -> None:
    # Leader Completeness: 1 and 2 hold "x" (committed); 3 does not.
    net = Network.of(3)
    net.elect(1)
    net.isolate(3)
    net.propose(1, b"x")
    net.recover()
    net.down.add(nid(1))
    net.core(3).campaign()
    net.settle()
    assert net.core(3).role is not Role.LEADER
    net.elect(2)
    net.propose(2, b"y")
    assert net.applied_data(3) == [b"x", b"y"]


def test_a_restarted_node_keeps_its_term_vote_and_log() -> None:
    net = Network.of(3)
    net.elect(1)
    net.propose(1, b"x")
    before = net.core(2)
    core = net.crash_and_restart(2)
    assert core.term == before.term
    assert core.vote == before.vote
    assert core.log.last_index() == before.log.last_index()
    assert core.log.committed == before.log.committed
    # It re-applies what it had committed (the state machine is rebuilt from the log).
    net.settle()
    assert net.applied_data(2) == [b"x"]


def test_hard_state_commit_is_clamped_to_the_log_on_restart() -> None:
    st = storage_with(config_of([1, 2, 3]), (1,))
    st.set_hard_state(HardState(term=1, vote=None, commit=99))
    core = new_core(2, st)
    assert core.log.committed == 2
