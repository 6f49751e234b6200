"""Raft paper §6 / thesis chapter 4: single-server membership changes and learners."""

from __future__ import annotations

import pytest
from raft_helpers import (
    Network,
    config_of,
    make_cfg,
    member,
    new_core,
    nid,
)

from dlog.errors import NotLeaderError
from dlog.raft.codec import decode_configuration
from dlog.raft.core import ConfChangeInProgressError
from dlog.raft.messages import (
    AppendEntries,
    ConfChange,
    ConfChangeType,
    Configuration,
    EntryType,
    InvalidConfChangeError,
    Role,
)
from dlog.raft.storage import MemoryStorage


def add(kind: ConfChangeType, i: int, generation: int = 0) -> ConfChange:
    m = member(i, generation)
    return ConfChange(type=kind, node_id=m.node_id, directory_id=m.directory_id, address=m.address)


def remove(i: int) -> ConfChange:
    return ConfChange(type=ConfChangeType.REMOVE_NODE, node_id=nid(i))


def promote(i: int) -> ConfChange:
    return ConfChange(type=ConfChangeType.PROMOTE_LEARNER, node_id=nid(i))


def join(net: Network, i: int) -> None:
    """A brand-new node with an empty disk (not bootstrapped)."""
    st = MemoryStorage()
    net.add(i, new_core(i, st, net.core(1).cfg), st)


def change(net: Network, leader: int, cc: ConfChange) -> int:
    index = net.core(leader).propose_conf_change(cc)
    net.settle()
    return index


# --- the configuration algebra --------------------------------------------------------


def test_configuration_changes_apply_one_server_at_a_time() -> None:
    c = config_of([1, 2, 3])
    c = c.apply(add(ConfChangeType.ADD_LEARNER, 4))
    assert c.voter_ids == (1, 2, 3)
    assert c.learner_ids == (4,)
    c = c.apply(promote(4))
    assert c.voter_ids == (1, 2, 3, 4)
    assert c.learner_ids == ()
    c = c.apply(remove(2))
    assert c.voter_ids == (1, 3, 4)
    c = c.apply(add(ConfChangeType.ADD_VOTER, 9))
    assert c.voter_ids == (1, 3, 4, 9)
    assert c.member(nid(9)) == member(9)


@pytest.mark.parametrize(
    "cc",
    [
        add(ConfChangeType.ADD_VOTER, 1),  # already a member
        add(ConfChangeType.ADD_LEARNER, 2),
        promote(3),  # not a learner
        remove(7),  # not a member
        ConfChange(type=ConfChangeType.ADD_VOTER, node_id=nid(8)),  # no directory/address
    ],
)
def test_invalid_changes_are_refused(cc: ConfChange) -> None:
    with pytest.raises(InvalidConfChangeError):
        config_of([1, 2, 3]).apply(cc)


def test_the_last_voter_cannot_be_removed() -> None:
    with pytest.raises(InvalidConfChangeError):
        config_of([1]).apply(remove(1))


# --- the leader's rules ---------------------------------------------------------------


def test_only_the_leader_takes_changes() -> None:
    net = Network.of(3)
    net.elect(1)
    with pytest.raises(NotLeaderError) as err:
        net.core(2).propose_conf_change(remove(3))
    assert err.value.details["leader"] == 1


def test_no_change_before_an_entry_of_the_current_term_is_committed() -> None:
    # The fix for single-server changes (Ongaro, raft-dev 2015): a new leader may not
    # append a configuration entry until its own term has a committed entry.
    net = Network.of(3)
    net.isolate(1)
    leader = net.core(1)
    net.recover()
    net.cut(1, 3)
    net.filter = lambda m: not isinstance(m, AppendEntries)
    net.elect(1)  # won, but its no-op has not reached anyone
    with pytest.raises(ConfChangeInProgressError, match="no entry of the leader's term"):
        leader.propose_conf_change(remove(3))
    net.filter = None
    net.tick(1)
    assert leader.committed_in_current_term()
    change(net, 1, remove(3))
    assert leader.config.voter_ids == (1, 2)


def test_one_change_at_a_time() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    net.isolate(1)
    index = change(net, 1, add(ConfChangeType.ADD_LEARNER, 4))
    with pytest.raises(ConfChangeInProgressError, match=f"change at index {index}"):
        leader.propose_conf_change(add(ConfChangeType.ADD_LEARNER, 5))
    net.recover()
    net.tick(1)
    change(net, 1, add(ConfChangeType.ADD_LEARNER, 5))
    assert leader.config.learner_ids == (4, 5)


def test_a_configuration_takes_effect_when_appended_not_when_committed() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    net.isolate(1)
    index = change(net, 1, add(ConfChangeType.ADD_VOTER, 4))
    assert leader.log.committed < index
    assert leader.config.voter_ids == (1, 2, 3, 4)
    assert leader.config_index == index


def test_a_new_voter_counts_toward_the_quorum_at_once() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    join(net, 4)
    change(net, 1, add(ConfChangeType.ADD_VOTER, 4))
    assert net.core(4).config.voter_ids == (1, 2, 3, 4)
    # With four voters, 1 + 2 are no longer a majority.
    net.isolate(3)
    net.isolate(4)
    index = net.propose(1, b"x")
    assert leader.log.committed < index
    net.recover()
    net.isolate(4)
    net.tick(1)
    assert leader.log.committed >= index


def test_a_learner_gets_the_log_but_never_votes_campaigns_or_counts() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    join(net, 4)
    change(net, 1, add(ConfChangeType.ADD_LEARNER, 4))
    net.propose(1, b"x")
    learner = net.core(4)
    assert net.applied_data(4) == [b"x"]
    assert learner.is_learner
    assert not learner.is_voter
    for _ in range(100):
        learner.tick()
    assert learner.role is Role.FOLLOWER
    # It does not count: with 2 and 3 cut off nothing commits on 1 + 4.
    net.isolate(2)
    net.isolate(3)
    index = net.propose(1, b"y")
    assert leader.log.committed < index
    assert net.core(4).log.last_index() == index


def test_promoting_a_learner_makes_it_a_voter() -> None:
    net = Network.of(3)
    net.elect(1)
    join(net, 4)
    change(net, 1, add(ConfChangeType.ADD_LEARNER, 4))
    change(net, 1, promote(4))
    assert net.core(4).is_voter
    net.down.add(nid(1))
    net.down.add(nid(2))
    net.core(4).campaign()
    net.settle()
    assert net.core(4).role is not Role.LEADER  # 3 and 4 of 4: no majority
    net.down.discard(nid(2))
    net.elect(4)


def test_a_removed_voter_stops_campaigning_once_it_learns_of_its_removal() -> None:
    net = Network.of(3)
    net.elect(1)
    index = change(net, 1, remove(3))
    net.tick(1)
    removed = net.core(3)
    # The leader kept replicating to it until it had the entry and knew it committed.
    assert not removed.is_voter
    assert removed.log.committed >= index
    assert net.core(1).progress(nid(3)) is None
    for _ in range(100):
        removed.tick()
    assert removed.role is Role.FOLLOWER
    assert removed.term == net.core(1).term


def test_a_leader_removing_itself_leads_until_it_commits_then_hands_over() -> None:
    net = Network.of(3)
    leader = net.elect(1)
    index = change(net, 1, remove(1))
    assert leader.role is Role.FOLLOWER
    assert leader.log.committed >= index
    assert leader.stats["removed_step_down"] == 1
    # The most up-to-date voter got TimeoutNow and took over without an election timeout.
    assert {net.core(2).role, net.core(3).role} == {Role.LEADER, Role.FOLLOWER}


def test_a_server_removed_by_an_uncommitted_entry_still_campaigns() -> None:
    # Thesis §4.2.2: a server not in its latest configuration must still start
    # elections while that configuration is uncommitted, or the cluster can deadlock:
    # node 1 (which has the removal) would refuse node 2 its vote, and node 2 (which
    # lacks it) needs that vote. Node 1 does not count its own vote.
    config = config_of([1, 2])
    from raft_helpers import storage_with

    storages = {1: storage_with(config), 2: storage_with(config)}
    cores = {i: new_core(i, st) for i, st in storages.items()}
    net = Network(cores, storages)
    leader = net.elect(1)
    net.isolate(1)
    index = change(net, 1, remove(1))
    assert not leader.is_voter
    assert leader.log.committed < index
    net.crash_and_restart(1)
    net.recover()
    c1 = net.core(1)
    c1.campaign()
    net.settle()
    # Elected by node 2 alone (its configuration says voters {2}), it committed its
    # removal, stepped down and handed over to node 2.
    assert c1.stats["became_leader"] == 1
    assert c1.role is Role.FOLLOWER
    assert c1.log.committed >= index
    assert net.core(2).role is Role.LEADER
    assert net.core(2).config.voter_ids == (2,)


def test_truncating_a_configuration_entry_restores_the_previous_configuration() -> None:
    net = Network.of(3)
    net.elect(1)
    net.isolate(1)
    change(net, 1, add(ConfChangeType.ADD_LEARNER, 4))  # only on node 1
    old = net.core(1)
    assert old.config.learner_ids == (4,)
    net.recover()
    net.isolate(1)
    net.elect(2)
    net.propose(2, b"y")
    net.recover()
    net.tick(2)
    assert old.role is Role.FOLLOWER
    assert old.config.learner_ids == ()
    assert old.config == net.core(2).config


def test_configuration_entries_carry_every_member_address() -> None:
    net = Network.of(3)
    net.elect(1)
    change(net, 1, add(ConfChangeType.ADD_LEARNER, 4))
    conf_entries = [e for e in net.applied[nid(2)] if e.type is EntryType.CONFIG]
    latest = decode_configuration(conf_entries[-1].data)
    assert latest == Configuration(voters=(member(1), member(2), member(3)), learners=(member(4),))
    assert [m.address for m in latest.voters] == ["h1:9600", "h2:9600", "h3:9600"]


def test_a_config_change_with_check_quorum_does_not_depose_the_leader() -> None:
    net = Network.of(3, make_cfg(check_quorum=True, pre_vote=True))
    leader = net.elect(1)
    join(net, 4)
    change(net, 1, add(ConfChangeType.ADD_VOTER, 4))
    for _ in range(40):
        net.tick_all()
    assert leader.role is Role.LEADER
    assert net.core(4).log.last_index() == leader.log.last_index()
