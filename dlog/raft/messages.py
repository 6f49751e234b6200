"""Values the Raft core consumes and produces: entries, configurations, snapshots, messages.

All are frozen dataclasses; the core never mutates one after creating it. Messages
carry a common header (``cluster_id``, ``term``, sender id and directory id,
recipient id) and are dispatched by class with ``match``.

A configuration entry's data is the *whole* new configuration (voters and learners,
each with node id, directory id and address), encoded by :mod:`dlog.raft.codec`, so a
node learns its peers' addresses from the log and a configuration at any index is
simply the last configuration entry at or before it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dlog.errors import InvalidRequestError
from dlog.types import NodeId

#: Bytes an entry is charged beyond its data when sizing messages and Ready batches.
ENTRY_OVERHEAD = 24


class EntryType(enum.IntEnum):
    NORMAL = 0
    #: The empty entry a new leader appends at the start of its term.
    NOOP = 1
    #: Data is an encoded :class:`Configuration` that takes effect when appended.
    CONFIG = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. Positional fields keep construction cheap on the hot path."""

    index: int
    term: int
    type: EntryType
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data) + ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """A voter or learner: which node, which incarnation of its disk, where to reach it."""

    node_id: NodeId
    directory_id: str
    address: str


class ConfChangeType(enum.Enum):
    ADD_VOTER = "add_voter"
    ADD_LEARNER = "add_learner"
    PROMOTE_LEARNER = "promote_learner"
    #: Removes a voter or a learner.
    REMOVE_NODE = "remove_node"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfChange:
    """A single-server membership change as a caller asks for it."""

    type: ConfChangeType
    node_id: NodeId
    #: Required for ADD_VOTER and ADD_LEARNER.
    directory_id: str = ""
    #: Required for ADD_VOTER and ADD_LEARNER.
    address: str = ""


class InvalidConfChangeError(InvalidRequestError):
    """The change does not apply to the configuration (see :meth:`Configuration.apply`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Configuration:
    """Voters and learners, each sorted by node id. A node is never both."""

    voters: tuple[Member, ...] = ()
    learners: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        # Canonical order, so equal configurations compare (and encode) equal.
        object.__setattr__(self, "voters", tuple(sorted(self.voters, key=lambda m: m.node_id)))
        object.__setattr__(self, "learners", tuple(sorted(self.learners, key=lambda m: m.node_id)))
        ids = [m.node_id for m in self.voters] + [m.node_id for m in self.learners]
        if len(ids) != len(set(ids)):
            raise InvalidConfChangeError(f"a node appears twice in {ids}")

    @property
    def voter_ids(self) -> tuple[NodeId, ...]:
        return tuple(m.node_id for m in self.voters)

    @property
    def learner_ids(self) -> tuple[NodeId, ...]:
        return tuple(m.node_id for m in self.learners)

    def member(self, node_id: NodeId) -> Member | None:
        for m in self.voters:
            if m.node_id == node_id:
                return m
        for m in self.learners:
            if m.node_id == node_id:
                return m
        return None

    def is_voter(self, node_id: NodeId, directory_id: str) -> bool:
        for m in self.voters:
            if m.node_id == node_id:
                return m.directory_id == directory_id
        return False

    def apply(self, change: ConfChange) -> Configuration:
        """The configuration after ``change``; raises :class:`InvalidConfChangeError`."""
        existing = self.member(change.node_id)
        voters = list(self.voters)
        learners = list(self.learners)
        match change.type:
            case ConfChangeType.ADD_VOTER | ConfChangeType.ADD_LEARNER:
                if existing is not None:
                    raise InvalidConfChangeError(f"node {change.node_id} is already a member")
                if not change.directory_id or not change.address:
                    raise InvalidConfChangeError("adding a node needs its directory id and address")
                new = Member(
                    node_id=change.node_id,
                    directory_id=change.directory_id,
                    address=change.address,
                )
                (voters if change.type is ConfChangeType.ADD_VOTER else learners).append(new)
            case ConfChangeType.PROMOTE_LEARNER:
                if existing is None or existing not in learners:
                    raise InvalidConfChangeError(f"node {change.node_id} is not a learner")
                learners.remove(existing)
                voters.append(existing)
            case ConfChangeType.REMOVE_NODE:
                if existing is None:
                    raise InvalidConfChangeError(f"node {change.node_id} is not a member")
                if existing in voters:
                    if len(voters) == 1:
                        raise InvalidConfChangeError("cannot remove the last voter")
                    voters.remove(existing)
                else:
                    learners.remove(existing)
        return Configuration(
            voters=tuple(sorted(voters, key=lambda m: m.node_id)),
            learners=tuple(sorted(learners, key=lambda m: m.node_id)),
        )


EMPTY_CONFIGURATION = Configuration()


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotMeta:
    """What a snapshot covers: every entry up to ``index`` (whose term is ``term``)."""

    index: int
    term: int
    config: Configuration


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes


EMPTY_SNAPSHOT = Snapshot(meta=SnapshotMeta(index=0, term=0, config=EMPTY_CONFIGURATION), data=b"")


@dataclass(frozen=True, slots=True, kw_only=True)
class HardState:
    """What must survive a crash besides the log: Figure 2's currentTerm and votedFor,
    plus the commit index (an optimisation: it can always be relearnt)."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


EMPTY_HARD_STATE = HardState()


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Header every Raft message carries."""

    cluster_id: str
    term: int
    from_id: NodeId
    #: The sender's directory id: a voter is (node id, directory id).
    from_dir: str
    to: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEntries(Message):
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int
    #: False: the leader needs no answer if this is accepted. Set on an empty append
    #: that only carries the commit index to a follower known to match the leader's
    #: whole log: its answer would tell the leader nothing (a rejection is still sent).
    ack: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendResponse(Message):
    #: On success the follower's last index known to match the leader's log; on
    #: rejection the ``prev_index`` that was rejected.
    index: int
    reject: bool = False
    #: On rejection: the follower's guess at the last index that may match, and its
    #: term there (the leader skips over whole terms with it).
    reject_hint: int = 0
    log_term: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    commit: int
    #: The latest pending ReadIndex context; acked back in the response.
    context: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatResponse(Message):
    context: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestVote(Message):
    pre_vote: bool
    last_index: int
    last_term: int
    #: Sent on behalf of a leadership transfer: voters ignore their leader lease.
    transfer: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteResponse(Message):
    pre_vote: bool
    reject: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshot(Message):
    """One chunk of a snapshot: ``data`` is bytes ``[offset, offset + len(data))`` of
    ``total`` bytes; ``done`` on the last chunk."""

    meta: SnapshotMeta
    offset: int
    total: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotResponse(Message):
    """Acknowledges contiguous snapshot bytes received so far (go-back-N on loss)."""

    snapshot_index: int
    snapshot_term: int
    next_offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutNow(Message):
    """Leadership transfer: the recipient campaigns at once."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadIndexRequest(Message):
    """A follower or learner asks the leader for a linearizable read index."""

    context: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadIndexResponse(Message):
    context: bytes
    index: int


AnyMessage = (
    AppendEntries
    | AppendResponse
    | Heartbeat
    | HeartbeatResponse
    | RequestVote
    | VoteResponse
    | InstallSnapshot
    | SnapshotResponse
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexResponse
)


# --- what the core hands its driver --------------------------------------------------


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True, kw_only=True)
class SoftState:
    """Volatile state a driver may want to observe; not persisted."""

    role: Role
    leader: NodeId | None
    term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadState:
    """A linearizable read may be served once the state machine has applied ``index``."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """One batch of work for the driver, in this order:

    1. persist ``snapshot`` (if any), then ``hard_state`` and ``entries`` (overwriting
       any stored entries from ``entries[0].index`` on), fsync if ``must_sync``;
    2. send ``messages`` -- or, if ``send_before_persist``, send them before step 1
       (a leader replicating while it writes its own copy, thesis 10.2.1);
    3. restore the state machine from ``snapshot`` (if any), then apply
       ``committed_entries`` in order; serve ``read_states`` once applied;
    4. call :meth:`RaftCore.advance` with this Ready.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    messages: tuple[AnyMessage, ...] = ()
    committed_entries: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False
    #: The messages do not depend on this Ready's writes and may be sent first.
    send_before_persist: bool = False
