"""The sans-I/O Raft core: a state machine of messages, ticks and proposals.

No I/O, no clock, no threads: the driver calls :meth:`RaftCore.tick` at a fixed
interval, :meth:`RaftCore.step` with each message received, :meth:`RaftCore.propose`
and friends for local requests, and then handles :meth:`RaftCore.ready` (persist,
send, apply) and calls :meth:`RaftCore.advance`. Randomness comes from the injected
``random.Random``. The rules, with the paper's section numbers:

Terms and roles (§5.1)
- A message with a higher term makes us a follower of that term first, except a
  (pre-)vote request received within the leader lease (check-quorum: we heard from a
  leader less than an election timeout ago) which is ignored outright, a pre-vote
  request (never changes our term) and a granted pre-vote response.
- A message with a lower term is dropped; a stale leader's AppendEntries/Heartbeat is
  answered with our term so it steps down, a stale pre-vote is rejected.

Election (§5.2, thesis §9.6 pre-vote, §6.2 check-quorum)
- A voter whose election timer (randomized in [T, 2T) ticks) fires first runs a
  pre-vote at term+1 without changing its term; only with a quorum of pre-votes does
  it become a candidate (term+1, votes for itself) and ask for real votes.
- A node grants a vote when it has not voted for another this term (or, for a
  pre-vote, the term is newer) and the candidate's log is at least as up to date as
  its own (§5.4.1). A granted real vote resets its election timer.
- Votes count only from voters of the candidate's configuration whose directory id
  matches: a node whose disk was wiped has a new directory id and no vote.
- A leader that has not heard from a quorum within an election timeout steps down.

Log replication (§5.3)
- The leader appends a no-op at the start of its term and replicates with
  AppendEntries(prev_index, prev_term, entries, commit). A follower rejects when it
  has no entry at prev_index with prev_term, hinting where the logs may match so the
  leader skips back a term at a time; otherwise it deletes a conflicting suffix,
  appends, and advances its commit index to min(commit, last new entry).
- The leader commits an index once a quorum of voters has it and its entry is from
  the leader's current term (§5.4.2); earlier entries commit with it.
- Followers in REPLICATE are streamed to (bounded inflight messages); see progress.py.

Snapshots (§7)
- When a follower needs compacted entries, the leader streams the storage snapshot
  in chunks; the follower installs it unless its log already has the snapshot's last
  entry (then it only advances its commit index).

Membership (thesis §4, single-server changes)
- A configuration entry takes effect on a node as soon as it is in its log
  (committed or not) and is undone if that entry is truncated away.
- The leader accepts a change only when an entry of its current term is committed
  (the fix to the single-server change bug) and no configuration entry is uncommitted:
  one change at a time. A leader not in its newest configuration leads until that
  entry commits, then steps down (handing over to the most up-to-date voter).
- Learners receive the log but never vote, campaign or count toward a quorum.

Leadership transfer (thesis §3.10): the leader stops taking proposals, catches the
target up, sends it TimeoutNow; the target campaigns at once, bypassing pre-vote and
the leader lease. Aborted after an election timeout.

ReadIndex (thesis §6.4): once an entry of its term is committed, the leader records
its commit index for a read, confirms it is still leader with a heartbeat round
acknowledged by a quorum, then hands out ReadState(index); the read may be served
once the state machine has applied that index. Followers forward reads to the leader.

Identity: every message carries ``cluster_id``; a mismatch raises
InconsistentClusterIdError (and is counted) and changes nothing.
"""

from __future__ import annotations

import collections
import enum
import random
from dataclasses import dataclass
from typing import TypedDict

from dlog.errors import InconsistentClusterIdError, InvalidRequestError, NotLeaderError
from dlog.raft.codec import decode_configuration, encode_configuration
from dlog.raft.log import RaftLog
from dlog.raft.messages import (
    EMPTY_CONFIGURATION,
    AnyMessage,
    AppendEntries,
    AppendResponse,
    ConfChange,
    Configuration,
    Entry,
    EntryType,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Ready,
    RequestVote,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    SoftState,
    TimeoutNow,
    VoteResponse,
)
from dlog.raft.progress import Progress, ProgressState
from dlog.raft.storage import LogCompactedError, Storage
from dlog.types import NodeId


class ConfChangeInProgressError(InvalidRequestError):
    """The leader cannot take a membership change yet: its term has no committed entry
    or an earlier change is not committed. Retry once the log has moved on."""


class TransferError(InvalidRequestError):
    """A leadership transfer to a node that is not a voter."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreConfig:
    """Knobs of the sans-I/O core. Times are in ticks."""

    #: Election timeout T: followers campaign after a random [T, 2T) ticks of silence.
    election_ticks: int = 10
    #: Leader heartbeat interval.
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    #: Byte budget of the entries in one AppendEntries.
    max_msg_bytes: int = 1 << 20
    #: Unacknowledged AppendEntries per follower in REPLICATE state.
    max_inflight_msgs: int = 256
    #: Byte budget of committed entries handed out in one Ready.
    max_committed_bytes_per_ready: int = 16 << 20
    snapshot_chunk_bytes: int = 256 << 10
    max_inflight_snapshot_chunks: int = 4

    def __post_init__(self) -> None:
        if self.heartbeat_ticks < 1:
            raise ValueError("heartbeat_ticks must be >= 1")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("election_ticks must be greater than heartbeat_ticks")
        for name in (
            "max_msg_bytes",
            "max_inflight_msgs",
            "max_committed_bytes_per_ready",
            "snapshot_chunk_bytes",
            "max_inflight_snapshot_chunks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


class _Header(TypedDict):
    cluster_id: str
    term: int
    from_id: NodeId
    from_dir: str
    to: NodeId


class _Campaign(enum.Enum):
    PRE_ELECTION = "pre_election"
    ELECTION = "election"
    TRANSFER = "transfer"


class _VoteResult(enum.Enum):
    PENDING = 0
    WON = 1
    LOST = 2


class _IncomingSnapshot:
    __slots__ = ("buf", "meta", "total")

    def __init__(self, meta: SnapshotMeta, total: int) -> None:
        self.meta = meta
        self.total = total
        self.buf = bytearray()


class _ReadRequest:
    __slots__ = ("acks", "context", "index", "requester")

    def __init__(self, index: int, context: bytes, requester: NodeId) -> None:
        self.index = index
        self.context = context
        self.requester = requester
        self.acks: set[NodeId] = set()


class RaftCore:
    """One Raft node's protocol state. Not thread-safe; call it from one task."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        directory_id: str,
        cluster_id: str,
        storage: Storage,
        config: CoreConfig,
        rng: random.Random,
    ) -> None:
        if not directory_id:
            raise ValueError("directory_id must be non-empty")
        self.node_id = node_id
        self.directory_id = directory_id
        self.cluster_id = cluster_id
        self.cfg = config
        self._rng = rng
        self.log = RaftLog(storage)
        #: Counters of things worth watching (rejected messages and the like).
        self.stats: collections.Counter[str] = collections.Counter()

        self.term = 0
        self.vote: NodeId | None = None
        self.leader: NodeId | None = None
        self.role = Role.FOLLOWER

        # Every configuration in the log, oldest first, each with the index of the
        # entry (or snapshot) it came from; the last one is in force.
        snap = storage.snapshot()
        self._configs: list[tuple[int, Configuration]] = [(snap.meta.index, snap.meta.config)]
        first, last = storage.first_index(), storage.last_index()
        lo = first
        while lo <= last:
            batch = storage.entries(lo, last + 1, 64 << 20)
            for e in batch:
                if e.type is EntryType.CONFIG:
                    self._configs.append((e.index, decode_configuration(e.data)))
            lo += len(batch)
        self.config = EMPTY_CONFIGURATION
        self._voters: dict[NodeId, str] = {}
        self._promotable = False

        self._progress: dict[NodeId, Progress] = {}
        self._votes: dict[NodeId, bool] = {}
        self.lead_transferee: NodeId | None = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_ticks
        self._incoming_snapshot: _IncomingSnapshot | None = None

        self._read_queue: collections.OrderedDict[bytes, _ReadRequest] = collections.OrderedDict()
        # Reads that arrived before an entry of this leader's term was committed.
        self._reads_waiting_for_commit: list[tuple[bytes, NodeId]] = []

        self._msgs: list[AnyMessage] = []
        self._read_states: list[ReadState] = []

        hs = storage.initial_state()
        self._apply_config_change()
        self._become_follower(hs.term, None)
        self.vote = hs.vote
        self.log.commit_to(min(max(hs.commit, self.log.committed), self.log.last_index()))
        self._prev_hard = hs
        self._prev_soft = self.soft_state()

    # --- introspection ---------------------------------------------------------------

    def soft_state(self) -> SoftState:
        return SoftState(role=self.role, leader=self.leader, term=self.term)

    def hard_state(self) -> HardState:
        return HardState(term=self.term, vote=self.vote, commit=self.log.committed)

    @property
    def is_voter(self) -> bool:
        return self._promotable

    @property
    def is_learner(self) -> bool:
        return self.node_id in self.config.learner_ids

    @property
    def config_index(self) -> int:
        """Index of the entry (or snapshot) the configuration in force came from."""
        return self._configs[-1][0]

    def committed_config(self) -> Configuration:
        """The newest configuration whose entry is committed (it can no longer change)."""
        committed = self.log.committed
        for index, config in reversed(self._configs):
            if index <= committed:
                return config
        return self._configs[0][1]

    def address_of(self, node_id: NodeId) -> str | None:
        """Where to reach ``node_id``: from the newest configuration in the log that
        lists it (a removed member is still reachable while its removal is replicated)."""
        for _, config in reversed(self._configs):
            member = config.member(node_id)
            if member is not None:
                return member.address
        return None

    def progress(self, node_id: NodeId) -> Progress | None:
        """The leader's replication progress for a peer (None if not leader/unknown)."""
        return self._progress.get(node_id)

    def committed_in_current_term(self) -> bool:
        return self.log.term(self.log.committed) == self.term

    # --- local requests ----------------------------------------------------------------

    def bootstrap(self, config: Configuration) -> bool:
        """Start a new cluster with ``config`` as the first entry. A no-op (False) if any
        Raft state exists, so every node of a new cluster may call it on every start."""
        if self.term > 0 or self.vote is not None or self.log.last_index() > 0:
            return False
        if not config.voters:
            raise InvalidRequestError("the initial configuration needs a voter")
        self._become_follower(1, None)
        self._append([Entry(1, 1, EntryType.CONFIG, encode_configuration(config))])
        self.log.commit_to(1)
        return True

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeaderError(leader=self.leader)
        if self.lead_transferee is not None:
            raise NotLeaderError("leadership transfer in progress", leader=None)

    def propose(self, data: bytes) -> int:
        """Append ``data`` to the log; returns its index. Raises NotLeaderError."""
        return self.propose_batch([data])

    def propose_batch(self, datas: list[bytes]) -> int:
        """Append several entries at once (one message per follower); returns the first
        index (they occupy consecutive indexes, all in the current term)."""
        self._check_can_propose()
        first = self.log.last_index() + 1
        term = self.term
        normal = EntryType.NORMAL
        self._append([Entry(first + i, term, normal, d) for i, d in enumerate(datas)])
        self._bcast_append()
        self._maybe_commit()
        return first

    def propose_conf_change(self, change: ConfChange) -> int:
        """Propose a single-server membership change; returns the entry's index.

        Raises NotLeaderError, ConfChangeInProgressError (retry later) or
        InvalidConfChangeError (the change makes no sense for this configuration).
        """
        self._check_can_propose()
        if not self.committed_in_current_term():
            raise ConfChangeInProgressError("no entry of the leader's term is committed yet")
        if self.config_index > self.log.committed:
            raise ConfChangeInProgressError(
                f"the change at index {self.config_index} is not committed yet"
            )
        new_config = self.config.apply(change)
        index = self.log.last_index() + 1
        self._append([Entry(index, self.term, EntryType.CONFIG, encode_configuration(new_config))])
        self._bcast_append()
        self._maybe_commit()
        return index

    def transfer_leadership(self, target: NodeId) -> None:
        """Hand leadership to voter ``target`` (thesis §3.10)."""
        if self.role is not Role.LEADER:
            raise NotLeaderError(leader=self.leader)
        if target == self.node_id:
            return
        if target not in self._voters or target not in self._progress:
            raise TransferError(f"node {target} is not a voter")
        if self.lead_transferee == target:
            return
        self.lead_transferee = target
        # The transfer must finish within an election timeout or it is aborted.
        self._election_elapsed = 0
        pr = self._progress[target]
        if pr.match == self.log.last_index():
            self._send_timeout_now(target)
        else:
            self._send_append(target)

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read index; a ReadState with ``context`` arrives in a
        later Ready. ``context`` must be unique among outstanding reads."""
        if self.role is Role.LEADER:
            self._leader_read(context, self.node_id)
        elif self.leader is not None:
            self._send(ReadIndexRequest(**self._hdr(self.leader), context=context))
        else:
            raise NotLeaderError(leader=None)

    def campaign(self) -> None:
        """Start an election now, as if the election timer had fired (pre-vote first if
        enabled). Does nothing on a leader or a node that may not campaign."""
        if self.role is not Role.LEADER:
            self._campaign(_Campaign.PRE_ELECTION if self.cfg.pre_vote else _Campaign.ELECTION)

    # --- time ----------------------------------------------------------------------------

    def tick(self) -> None:
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def _can_campaign(self) -> bool:
        """A voter of our newest configuration may campaign; so may a voter of the one
        before while the newest (which removes it) is not known to be committed, as it
        may still be needed to elect a leader that commits it (thesis §4.2.2). Such a
        node does not count its own vote."""
        if self._promotable:
            return True
        configs = self._configs
        return (
            len(configs) > 1
            and configs[-1][0] > self.log.committed
            and configs[-2][1].is_voter(self.node_id, self.directory_id)
        )

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._election_elapsed >= self._randomized_timeout and self._can_campaign():
            self._election_elapsed = 0
            self._campaign(_Campaign.PRE_ELECTION if self.cfg.pre_vote else _Campaign.ELECTION)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.cfg.election_ticks:
            self._election_elapsed = 0
            if self.cfg.check_quorum and not self._quorum_active():
                self.stats["check_quorum_step_down"] += 1
                self._become_follower(self.term, None)
                return
            if self.lead_transferee is not None:
                self.stats["transfer_aborted"] += 1
                self.lead_transferee = None
        if self._heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()
            for node_id, pr in self._progress.items():
                if pr.state is ProgressState.SNAPSHOT:
                    # Go back to the last acknowledged chunk: anything later may be lost.
                    pr.snap_sent = pr.snap_acked
                    pr.snap_done_sent = False
                    self._send_snapshot_chunks(node_id, pr)

    def _quorum_active(self) -> bool:
        active = 0
        for node_id in self._voters:
            if node_id == self.node_id:
                active += 1
                continue
            pr = self._progress.get(node_id)
            if pr is not None and pr.recent_active:
                active += 1
        for node_id, pr in self._progress.items():
            if node_id != self.node_id:
                pr.recent_active = False
        return active >= len(self._voters) // 2 + 1

    # --- messages in ----------------------------------------------------------------------

    def step(self, m: AnyMessage) -> None:
        """Process one message from a peer."""
        if m.cluster_id != self.cluster_id:
            self.stats["cluster_id_mismatch"] += 1
            raise InconsistentClusterIdError(
                f"message from node {m.from_id} is for cluster {m.cluster_id!r}, "
                f"this node is in {self.cluster_id!r}"
            )
        if m.to != self.node_id:
            self.stats["misaddressed"] += 1
            return
        if m.term > self.term:
            if isinstance(m, RequestVote):
                in_lease = (
                    self.cfg.check_quorum
                    and self.leader is not None
                    and self._election_elapsed < self.cfg.election_ticks
                )
                if in_lease and not m.transfer:
                    self.stats["vote_ignored_in_lease"] += 1
                    return
            if isinstance(m, RequestVote) and m.pre_vote:
                pass  # never change term for a pre-vote
            elif isinstance(m, VoteResponse) and m.pre_vote and not m.reject:
                pass  # granted pre-votes carry the term we will campaign at
            else:
                leader = (
                    m.from_id
                    if isinstance(m, AppendEntries | Heartbeat | InstallSnapshot)
                    else None
                )
                self._become_follower(m.term, leader)
        elif m.term < self.term:
            if isinstance(m, AppendEntries | Heartbeat):
                # A leader from an older term (perhaps cut off and unable to win again):
                # tell it our term so it steps down (Figure 2: reply false, with term).
                self._send(AppendResponse(**self._hdr(m.from_id), index=0))
            elif isinstance(m, RequestVote) and m.pre_vote:
                self._send(VoteResponse(**self._hdr(m.from_id), pre_vote=True, reject=True))
            self.stats["stale_term"] += 1
            return

        if isinstance(m, RequestVote):
            self._handle_vote_request(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _handle_vote_request(self, m: RequestVote) -> None:
        can_vote = (
            self.vote == m.from_id
            or (self.vote is None and self.leader is None)
            or (m.pre_vote and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.last_index, m.last_term):
            self._send(
                VoteResponse(**self._hdr(m.from_id, term=m.term), pre_vote=m.pre_vote, reject=False)
            )
            if not m.pre_vote:
                self._election_elapsed = 0
                self.vote = m.from_id
        else:
            self._send(VoteResponse(**self._hdr(m.from_id), pre_vote=m.pre_vote, reject=True))

    def _step_follower(self, m: AnyMessage) -> None:
        match m:
            case AppendEntries():
                self._election_elapsed = 0
                self.leader = m.from_id
                self._handle_append(m)
            case Heartbeat():
                self._election_elapsed = 0
                self.leader = m.from_id
                self._handle_heartbeat(m)
            case InstallSnapshot():
                self._election_elapsed = 0
                self.leader = m.from_id
                self._handle_install_snapshot(m)
            case TimeoutNow():
                if self._can_campaign():
                    self.stats["timeout_now"] += 1
                    self._campaign(_Campaign.TRANSFER)
            case ReadIndexResponse():
                self._read_states.append(ReadState(index=m.index, context=m.context))
            case (
                AppendResponse()
                | HeartbeatResponse()
                | VoteResponse()
                | SnapshotResponse()
                | ReadIndexRequest()
                | RequestVote()
            ):
                pass

    def _step_candidate(self, m: AnyMessage) -> None:
        match m:
            case AppendEntries():
                self._become_follower(m.term, m.from_id)
                self._handle_append(m)
            case Heartbeat():
                self._become_follower(m.term, m.from_id)
                self._handle_heartbeat(m)
            case InstallSnapshot():
                self._become_follower(m.term, m.from_id)
                self._handle_install_snapshot(m)
            case VoteResponse():
                if m.pre_vote != (self.role is Role.PRE_CANDIDATE):
                    return
                if not self.config.is_voter(m.from_id, m.from_dir):
                    self.stats["vote_from_non_voter"] += 1
                    return
                result = self._record_vote(m.from_id, not m.reject)
                if result is _VoteResult.WON:
                    if self.role is Role.PRE_CANDIDATE:
                        self._campaign(_Campaign.ELECTION)
                    else:
                        self._become_leader()
                elif result is _VoteResult.LOST:
                    self._become_follower(self.term, None)
            case ReadIndexResponse():
                self._read_states.append(ReadState(index=m.index, context=m.context))
            case (
                AppendResponse()
                | HeartbeatResponse()
                | SnapshotResponse()
                | TimeoutNow()
                | ReadIndexRequest()
                | RequestVote()
            ):
                pass

    def _step_leader(self, m: AnyMessage) -> None:
        match m:
            case AppendResponse():
                self._handle_append_response(m)
            case HeartbeatResponse():
                self._handle_heartbeat_response(m)
            case SnapshotResponse():
                self._handle_snapshot_response(m)
            case ReadIndexRequest():
                self._leader_read(m.context, m.from_id)
            case (
                AppendEntries()
                | Heartbeat()
                | InstallSnapshot()
                | VoteResponse()
                | TimeoutNow()
                | ReadIndexResponse()
                | RequestVote()
            ):
                pass

    # --- follower side of replication ----------------------------------------------------

    def _handle_append(self, m: AppendEntries) -> None:
        log = self.log
        if m.prev_index < log.committed:
            self._send(AppendResponse(**self._hdr(m.from_id), index=log.committed))
            return
        if log.match_term(m.prev_index, m.prev_term):
            entries = m.entries
            last_new = m.prev_index + len(entries)
            conflict = log.find_conflict(entries)
            if conflict:
                if conflict <= log.committed:
                    raise AssertionError(
                        f"entry {conflict} conflicts with committed entries to {log.committed}"
                    )
                self._append(entries[conflict - (m.prev_index + 1) :])
            log.commit_to(min(m.commit, last_new))
            if m.ack or entries:
                self._send(AppendResponse(**self._hdr(m.from_id), index=last_new))
            return
        hint_index = min(m.prev_index, log.last_index())
        hint_index, hint_term = log.find_conflict_by_term(hint_index, m.prev_term)
        self.stats["append_rejected"] += 1
        self._send(
            AppendResponse(
                **self._hdr(m.from_id),
                index=m.prev_index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_heartbeat(self, m: Heartbeat) -> None:
        # The leader sends min(its commit, our match), so this never passes our log;
        # clamp anyway for a node whose disk lost acknowledged entries.
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self._send(HeartbeatResponse(**self._hdr(m.from_id), context=m.context))

    def _handle_install_snapshot(self, m: InstallSnapshot) -> None:
        meta = m.meta
        if meta.index <= self.log.committed:
            self._incoming_snapshot = None
            self._send(AppendResponse(**self._hdr(m.from_id), index=self.log.committed))
            return
        inc = self._incoming_snapshot
        same = (
            inc is not None
            and inc.meta.index == meta.index
            and inc.meta.term == meta.term
            and inc.total == m.total
        )
        if m.offset == 0:
            inc = self._incoming_snapshot = _IncomingSnapshot(meta, m.total)
        elif inc is None or not same or m.offset != len(inc.buf):
            expected = len(inc.buf) if inc is not None and same else 0
            self._send(
                SnapshotResponse(
                    **self._hdr(m.from_id),
                    snapshot_index=meta.index,
                    snapshot_term=meta.term,
                    next_offset=expected,
                )
            )
            return
        inc.buf += m.data
        if len(inc.buf) > inc.total or (m.done and len(inc.buf) != inc.total):
            self.stats["snapshot_chunk_invalid"] += 1
            self._incoming_snapshot = None
            self._send(
                SnapshotResponse(
                    **self._hdr(m.from_id),
                    snapshot_index=meta.index,
                    snapshot_term=meta.term,
                    next_offset=0,
                )
            )
            return
        if not m.done:
            self._send(
                SnapshotResponse(
                    **self._hdr(m.from_id),
                    snapshot_index=meta.index,
                    snapshot_term=meta.term,
                    next_offset=len(inc.buf),
                )
            )
            return
        self._incoming_snapshot = None
        snapshot = Snapshot(meta=meta, data=bytes(inc.buf))
        if self._restore(snapshot):
            self.stats["snapshot_installed"] += 1
            self._send(AppendResponse(**self._hdr(m.from_id), index=self.log.last_index()))
        else:
            self._send(AppendResponse(**self._hdr(m.from_id), index=self.log.committed))

    def _restore(self, snapshot: Snapshot) -> bool:
        meta = snapshot.meta
        if meta.index <= self.log.committed:
            return False
        if self.log.match_term(meta.index, meta.term):
            # Our log already has the snapshot's last entry, so (log matching) every
            # entry before it: keep the log and just learn that it is committed.
            self.log.commit_to(meta.index)
            return False
        self.log.restore(snapshot)
        self._configs = [(meta.index, meta.config)]
        self._apply_config_change()
        return True

    # --- leader side of replication -------------------------------------------------------

    def _handle_append_response(self, m: AppendResponse) -> None:
        pr = self._peer_progress(m)
        if pr is None:
            return
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.from_id)
            return
        updated = pr.maybe_update(m.index)
        if pr.state is ProgressState.PROBE:
            if not (updated or pr.match == m.index):
                return
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            snap = pr.snapshot
            if pr.match + 1 >= self.log.first_index():
                pr.become_probe()
                pr.become_replicate()
            elif snap is None or pr.match >= snap.meta.index:
                # It has the snapshot, but we compacted past it since: probe again,
                # which starts a newer snapshot.
                pr.become_probe()
            elif not updated:
                return
        elif updated:
            pr.free_inflights_to(m.index)
        else:
            return
        if self._maybe_commit():
            self._bcast_append()
        elif pr.can_bump_commit(self.log.committed):
            # This follower may not know the commit index yet.
            self._send_append(m.from_id)
        if self.role is not Role.LEADER:
            return  # stepped down on its own removal
        while self._maybe_send_append(m.from_id, send_if_empty=False):
            pass
        if m.from_id == self.lead_transferee and pr.match == self.log.last_index():
            self._send_timeout_now(m.from_id)

    def _handle_heartbeat_response(self, m: HeartbeatResponse) -> None:
        pr = self._peer_progress(m)
        if pr is None:
            return
        pr.recent_active = True
        pr.paused = False
        if pr.match < self.log.last_index() or pr.state is ProgressState.PROBE:
            self._send_append(m.from_id)
        if m.context and m.from_id in self._voters:
            self._ack_read(m.context, m.from_id)
        self._maybe_forget_departed(m.from_id, pr)

    def _handle_snapshot_response(self, m: SnapshotResponse) -> None:
        pr = self._peer_progress(m)
        if pr is None:
            return
        pr.recent_active = True
        snap = pr.snapshot
        if (
            pr.state is not ProgressState.SNAPSHOT
            or snap is None
            or snap.meta.index != m.snapshot_index
            or snap.meta.term != m.snapshot_term
        ):
            return
        if m.next_offset < pr.snap_acked:
            # The follower lost what it had (restarted), or this answer is older than
            # one we already had: either way, resending from there is correct.
            pr.snap_acked = pr.snap_sent = m.next_offset
            pr.snap_done_sent = False
        else:
            # Chunks past next_offset may still be in flight; the heartbeat timer
            # goes back to snap_acked if they were lost.
            pr.snap_acked = m.next_offset
            pr.snap_sent = max(pr.snap_sent, m.next_offset)
        self._send_snapshot_chunks(m.from_id, pr)

    def _peer_progress(
        self, m: AppendResponse | HeartbeatResponse | SnapshotResponse
    ) -> Progress | None:
        pr = self._progress.get(m.from_id)
        if pr is None:
            self.stats["response_from_non_member"] += 1
            return None
        if pr.directory_id != m.from_dir:
            # Same node id, different disk: not the member we replicate to.
            self.stats["directory_id_mismatch"] += 1
            return None
        return pr

    def _maybe_commit(self) -> bool:
        voters = self._voters
        if self.role is not Role.LEADER or not voters:
            return False
        # We count ourselves only for entries already durable here: our appends may
        # go out before our own write (thesis 10.2.1, Ready.send_before_persist).
        durable = min(self.log.last_index(), self.log.unstable.offset - 1)
        matches = []
        for node_id in voters:
            if node_id == self.node_id:
                matches.append(durable)
            else:
                pr = self._progress.get(node_id)
                matches.append(pr.match if pr is not None else 0)
        matches.sort(reverse=True)
        quorum_index = matches[len(matches) // 2]
        if not self.log.maybe_commit(quorum_index, self.term):
            return False
        self._on_commit_advanced()
        return True

    def _on_commit_advanced(self) -> None:
        if self._reads_waiting_for_commit and self.committed_in_current_term():
            waiting, self._reads_waiting_for_commit = self._reads_waiting_for_commit, []
            for context, requester in waiting:
                self._leader_read(context, requester)
        if not self._promotable and self.log.committed >= self.config_index:
            # Our own removal is committed: hand over to the most up-to-date voter.
            self.stats["removed_step_down"] += 1
            best: NodeId | None = None
            best_match = -1
            for node_id in self._voters:
                pr = self._progress.get(node_id)
                if pr is not None and pr.match > best_match:
                    best, best_match = node_id, pr.match
            if best is not None and best_match == self.log.last_index():
                self._send_timeout_now(best)
            self._become_follower(self.term, None)

    def _bcast_append(self) -> None:
        for node_id in self._progress:
            if node_id != self.node_id:
                self._send_append(node_id)

    def _send_append(self, to: NodeId) -> None:
        """Send what the follower lacks (an empty append if nothing, to carry the commit
        index), then more messages while the flow-control window allows."""
        if self._maybe_send_append(to, send_if_empty=True):
            while self._maybe_send_append(to, send_if_empty=False):
                pass

    def _maybe_send_append(self, to: NodeId, *, send_if_empty: bool) -> bool:
        pr = self._progress[to]
        if pr.is_paused():
            return False
        log = self.log
        prev_index = pr.next - 1
        prev_term = log.term(prev_index)
        if prev_term is None:
            return self._start_snapshot(to, pr)
        try:
            entries = log.entries_from(pr.next, self.cfg.max_msg_bytes)
        except LogCompactedError:
            return self._start_snapshot(to, pr)
        if not entries and not send_if_empty:
            return False
        self._send(
            AppendEntries(
                **self._hdr(to),
                prev_index=prev_index,
                prev_term=prev_term,
                entries=tuple(entries),
                commit=log.committed,
                # Only the commit index, to a follower known to have all of our log:
                # its success answer would say nothing new (half the messages of a
                # lone proposal).
                ack=bool(entries)
                or pr.state is not ProgressState.REPLICATE
                or pr.match != prev_index,
            )
        )
        pr.sent_entries(len(entries))
        pr.sent_commit = max(pr.sent_commit, min(log.committed, prev_index + len(entries)))
        return True

    def _start_snapshot(self, to: NodeId, pr: Progress) -> bool:
        if not pr.recent_active:
            # Do not stream a snapshot to a node we have not heard from lately.
            return False
        snapshot = self.log.snapshot()
        if snapshot.meta.index == 0:
            raise AssertionError("entries are compacted but there is no snapshot")
        self.stats["snapshot_sent"] += 1
        pr.become_snapshot(snapshot)
        self._send_snapshot_chunks(to, pr)
        return False

    def _send_snapshot_chunks(self, to: NodeId, pr: Progress) -> None:
        snapshot = pr.snapshot
        if snapshot is None:
            return
        data = snapshot.data
        total = len(data)
        chunk = self.cfg.snapshot_chunk_bytes
        window = chunk * self.cfg.max_inflight_snapshot_chunks
        while not pr.snap_done_sent and pr.snap_sent - pr.snap_acked < window:
            offset = pr.snap_sent
            end = min(offset + chunk, total)
            done = end == total
            self._send(
                InstallSnapshot(
                    **self._hdr(to),
                    meta=snapshot.meta,
                    offset=offset,
                    total=total,
                    data=data[offset:end],
                    done=done,
                )
            )
            pr.snap_sent = end
            pr.snap_done_sent = done

    def _bcast_heartbeat(self) -> None:
        context = next(reversed(self._read_queue)) if self._read_queue else b""
        committed = self.log.committed
        for node_id, pr in self._progress.items():
            if node_id != self.node_id:
                commit = min(pr.match, committed)
                pr.sent_commit = max(pr.sent_commit, commit)
                self._send(Heartbeat(**self._hdr(node_id), commit=commit, context=context))

    def _send_timeout_now(self, to: NodeId) -> None:
        self._send(TimeoutNow(**self._hdr(to)))

    # --- ReadIndex -------------------------------------------------------------------------

    def _leader_read(self, context: bytes, requester: NodeId) -> None:
        if not self.committed_in_current_term():
            # Our commit index may lag the previous leader's until our no-op commits.
            self._reads_waiting_for_commit.append((context, requester))
            return
        index = self.log.committed
        if len(self._voters) == 1 and self.node_id in self._voters:
            self._release_read(_ReadRequest(index, context, requester))
            return
        req = _ReadRequest(index, context, requester)
        if self._promotable:
            req.acks.add(self.node_id)
        self._read_queue[context] = req
        self._bcast_heartbeat()

    def _ack_read(self, context: bytes, voter: NodeId) -> None:
        req = self._read_queue.get(context)
        if req is None:
            return
        req.acks.add(voter)
        if len(req.acks) < len(self._voters) // 2 + 1:
            return
        # A quorum still follows us after ``context`` arrived, so also after every
        # earlier read: release them all, in order.
        while self._read_queue:
            ctx, r = self._read_queue.popitem(last=False)
            self._release_read(r)
            if ctx == context:
                break

    def _release_read(self, req: _ReadRequest) -> None:
        if req.requester == self.node_id:
            self._read_states.append(ReadState(index=req.index, context=req.context))
        else:
            self._send(
                ReadIndexResponse(**self._hdr(req.requester), context=req.context, index=req.index)
            )

    # --- roles -------------------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self.cfg.election_ticks + self._rng.randrange(
            self.cfg.election_ticks
        )
        self.lead_transferee = None
        self._votes = {}
        self._progress = {}
        self._read_queue.clear()
        self._reads_waiting_for_commit = []

    def _become_follower(self, term: int, leader: NodeId | None) -> None:
        if term != self.term:
            self._incoming_snapshot = None
        self._reset(term)
        self.leader = leader
        self.role = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        self._votes = {}
        self.leader = None
        self.role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.node_id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.leader = self.node_id
        self.role = Role.LEADER
        self.stats["became_leader"] += 1
        self._rebuild_progress()
        self._append([Entry(self.log.last_index() + 1, self.term, EntryType.NOOP, b"")])
        self._maybe_commit()
        self._bcast_append()

    def _rebuild_progress(self) -> None:
        """Progress for every member but us; new members start probing at our end.

        Members the newest configuration removes stay (as non-voting) while that
        configuration is uncommitted, so they receive the entry that removes them and
        learn it is committed; otherwise a removed voter never hears of its removal
        and keeps campaigning.
        """
        old = self._progress
        self._progress = {}
        next_index = self.log.last_index() + 1
        members = [*self.config.voters, *self.config.learners]
        if len(self._configs) > 1 and self.config_index > self.log.committed:
            current = {m.node_id for m in members}
            prev = self._configs[-2][1]
            members += [m for m in (*prev.voters, *prev.learners) if m.node_id not in current]
        for m in members:
            if m.node_id == self.node_id:
                continue
            pr = old.get(m.node_id)
            if pr is None or pr.directory_id != m.directory_id:
                pr = Progress(
                    directory_id=m.directory_id,
                    next_index=next_index,
                    max_inflight=self.cfg.max_inflight_msgs,
                )
                # Give a new member a chance before check-quorum counts it as silent.
                pr.recent_active = True
            self._progress[m.node_id] = pr

    def _maybe_forget_departed(self, node_id: NodeId, pr: Progress) -> None:
        """Stop replicating to a removed member once it knows its removal committed."""
        if (
            self.config.member(node_id) is None
            and pr.match >= self.config_index
            and pr.sent_commit >= self.config_index
        ):
            del self._progress[node_id]

    def _campaign(self, kind: _Campaign) -> None:
        if not self._can_campaign():
            return
        if kind is _Campaign.PRE_ELECTION:
            self._become_pre_candidate()
            term = self.term + 1
        else:
            self._become_candidate()
            term = self.term
        if self._record_vote(self.node_id, True) is _VoteResult.WON:
            if kind is _Campaign.PRE_ELECTION:
                self._campaign(_Campaign.ELECTION)
            else:
                self._become_leader()
            return
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        for node_id in self._voters:
            if node_id == self.node_id:
                continue
            self._send(
                RequestVote(
                    **self._hdr(node_id, term=term),
                    pre_vote=kind is _Campaign.PRE_ELECTION,
                    last_index=last_index,
                    last_term=last_term,
                    transfer=kind is _Campaign.TRANSFER,
                )
            )

    def _record_vote(self, node_id: NodeId, granted: bool) -> _VoteResult:
        self._votes.setdefault(node_id, granted)
        yes = no = 0
        for voter in self._voters:
            v = self._votes.get(voter)
            if v is True:
                yes += 1
            elif v is False:
                no += 1
        quorum = len(self._voters) // 2 + 1
        if yes >= quorum:
            return _VoteResult.WON
        if no > len(self._voters) - quorum:
            return _VoteResult.LOST
        return _VoteResult.PENDING

    # --- configuration ------------------------------------------------------------------------

    def _append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append to our log (truncating a conflicting suffix), tracking configurations."""
        first = entries[0].index
        changed = False
        configs = self._configs
        while len(configs) > 1 and configs[-1][0] >= first:
            configs.pop()
            changed = True
        self.log.append(entries)
        for e in entries:
            if e.type is EntryType.CONFIG:
                configs.append((e.index, decode_configuration(e.data)))
                changed = True
        if changed:
            self._apply_config_change()

    def _apply_config_change(self) -> None:
        self.config = self._configs[-1][1]
        self._voters = {m.node_id: m.directory_id for m in self.config.voters}
        self._promotable = self._voters.get(self.node_id) == self.directory_id
        if self.role is Role.LEADER:
            self._rebuild_progress()
            if self.lead_transferee is not None and self.lead_transferee not in self._voters:
                self.lead_transferee = None
            for node_id, pr in self._progress.items():
                if pr.match == 0 and pr.state is ProgressState.PROBE and not pr.paused:
                    self._send_append(node_id)
            # A smaller quorum may already have what is needed to commit.
            self._maybe_commit()
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE) and not self._can_campaign():
            self._become_follower(self.term, None)

    # --- messages out -------------------------------------------------------------------------

    def _hdr(self, to: NodeId, *, term: int | None = None) -> _Header:
        return {
            "cluster_id": self.cluster_id,
            "term": self.term if term is None else term,
            "from_id": self.node_id,
            "from_dir": self.directory_id,
            "to": to,
        }

    def _send(self, msg: AnyMessage) -> None:
        self._msgs.append(msg)

    # --- the Ready contract ---------------------------------------------------------------------

    def has_ready(self) -> bool:
        if self._msgs or self._read_states:
            return True
        log = self.log
        unstable = log.unstable
        if unstable.entries or unstable.snapshot is not None or log.committed > log.applied:
            return True
        # The same comparisons as hard_state() != prev and soft_state() != prev, without
        # building either (this runs after every event).
        hard = self._prev_hard
        if self.term != hard.term or self.vote != hard.vote or log.committed != hard.commit:
            return True
        soft = self._prev_soft
        return self.role is not soft.role or self.leader != soft.leader or self.term != soft.term

    def ready(self) -> Ready | None:
        """What to persist, send and apply now, or None. Call :meth:`advance` with it
        before the next ``ready()``; steps and ticks may happen in between."""
        if not self.has_ready():
            return None
        log = self.log
        soft = self.soft_state()
        hard = self.hard_state()
        entries = tuple(log.unstable.entries)
        prev = self._prev_hard
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != prev else None,
            entries=entries,
            snapshot=log.unstable.snapshot,
            messages=tuple(self._msgs),
            committed_entries=tuple(
                log.next_committed_entries(self.cfg.max_committed_bytes_per_ready)
            ),
            read_states=tuple(self._read_states),
            must_sync=bool(entries) or hard.term != prev.term or hard.vote != prev.vote,
            # A leader whose term and vote are already durable sends nothing that
            # depends on this Ready's writes: it counts itself only once they are done.
            send_before_persist=(
                self.role is Role.LEADER
                and hard.term == prev.term
                and hard.vote == prev.vote
                and log.unstable.snapshot is None
            ),
        )
        self._msgs = []
        self._read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver has persisted, sent and applied ``rd``."""
        if rd.soft_state is not None:
            self._prev_soft = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
        if rd.snapshot is not None:
            self.log.stable_snap_to(rd.snapshot.meta.index)
            if rd.snapshot.meta.index > self.log.applied:
                self.log.applied = rd.snapshot.meta.index
        if rd.committed_entries:
            self.log.applied_to(rd.committed_entries[-1].index)
        if rd.entries and self.role is Role.LEADER and self._maybe_commit():
            # Our own copy just became durable and completed a quorum.
            self._bcast_append()
