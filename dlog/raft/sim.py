"""Deterministic simulation of a Raft cluster: many cores, one process, one seed.

Everything random (network delays, drops, duplicates, partitions, crashes, disk
wipes, proposals, membership changes, snapshots, transfers, reads, and each core's
election timer) comes from ``random.Random(seed)``, so a seed replays exactly::

    python -m dlog.raft.sim --seeds 100000 --jobs 2     # many seeds
    python -m dlog.raft.sim --seed 1234 --trace         # replay one, printing events

Each node's driver is simulated the way :class:`dlog.raft.node.RaftNode` works: it
takes a Ready, persists its snapshot, persists hard state and entries, sends the
messages, applies committed entries and advances, each stage a separate event so a
crash can fall between any two. A node's :class:`MemoryStorage` is its disk: it only
holds what a Ready said to persist and the driver wrote, and survives a crash; the core
and everything in memory do not.

Checked after every event (raising :class:`SafetyViolation`):

- election safety: at most one leader per term;
- log matching: every persisted (index, term) has one content and one predecessor
  term across all nodes (so equal entries imply equal prefixes), plus a full pairwise
  comparison of logs at the end;
- leader completeness: a new leader's log holds the highest committed entry;
- state machine safety: no two nodes apply different entries at one index, and every
  node applies indexes in order (snapshot digests agree too);
- ReadIndex: a read index is at least the highest index applied anywhere when the
  read was asked for;
- liveness at the end: once every node is up and the network heals, a leader is
  elected and a new proposal is applied.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import random
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dlog.errors import DlogError, NotLeaderError
from dlog.raft.codec import decode_configuration, message_from_wire, message_to_wire
from dlog.raft.core import CoreConfig, RaftCore
from dlog.raft.messages import (
    AnyMessage,
    ConfChange,
    ConfChangeType,
    Configuration,
    Entry,
    EntryType,
    Member,
    Ready,
    Role,
    SnapshotMeta,
)
from dlog.raft.storage import LogCompactedError, MemoryStorage
from dlog.types import NodeId

CLUSTER_ID = "sim-cluster"
#: Simulated time units per tick.
TICK = 10


class SafetyViolation(AssertionError):
    """A Raft safety property failed; the message names the seed that reproduces it."""


# --- the state machine -------------------------------------------------------------------


class SimStateMachine:
    """A running CRC of every applied entry: equal digests at an index mean equal
    histories up to it (with overwhelming likelihood)."""

    __slots__ = ("digest", "index")

    _SNAP = struct.Struct(">QI")

    def __init__(self) -> None:
        self.index = 0
        self.digest = 0

    def apply(self, entry: Entry) -> int:
        self.index = entry.index
        self.digest = zlib.crc32(entry.data, zlib.crc32(bytes((entry.type,)), self.digest))
        return self.digest

    def snapshot(self) -> bytes:
        return self._SNAP.pack(self.index, self.digest)

    def restore(self, data: bytes) -> None:
        self.index, self.digest = self._SNAP.unpack(data)


# --- nodes ---------------------------------------------------------------------------


class SimNode:
    def __init__(self, node_id: NodeId, generation: int) -> None:
        self.node_id = node_id
        self.generation = generation
        self.directory_id = f"dir-{node_id}-{generation}"
        self.address = f"node{node_id}:9600"
        self.storage = MemoryStorage()
        self.core: RaftCore | None = None
        self.sm = SimStateMachine()
        #: Configuration at the applied index (what a snapshot of the state machine covers).
        self.applied_config = Configuration()
        #: Bumped on every crash: stale pipeline events of a dead incarnation are ignored.
        self.incarnation = 0
        self.ready: Ready | None = None
        self.pipeline_scheduled = False
        #: The last term this node was seen leading with its term persisted.
        self.led_term = -1
        #: A snapshot taken but not yet followed by compaction (crash window).
        self.pending_compact: int | None = None

    @property
    def alive(self) -> bool:
        return self.core is not None

    def member(self) -> Member:
        return Member(node_id=self.node_id, directory_id=self.directory_id, address=self.address)


@dataclass
class SimParams:
    """Shape of one run; drawn from the seed by :meth:`SimParams.draw`."""

    initial_voters: int = 3
    drop_rate: float = 0.02
    dup_rate: float = 0.01
    min_delay: int = 1
    max_delay: int = 15
    long_delay_rate: float = 0.01
    duration: int = 6000
    storm_every: tuple[int, int] = (5, 30)
    calm_every: tuple[int, int] = (15, 60)
    max_nodes: int = 7
    core: CoreConfig = field(default_factory=CoreConfig)
    wire: bool = True

    @classmethod
    def draw(cls, rng: random.Random) -> SimParams:
        return cls(
            initial_voters=rng.choice((1, 3, 3, 3, 5, 5)),
            drop_rate=rng.choice((0.0, 0.01, 0.05, 0.1)),
            dup_rate=rng.choice((0.0, 0.01, 0.05)),
            max_delay=rng.choice((5, 15, 30)),
            long_delay_rate=rng.choice((0.0, 0.01, 0.03)),
            core=CoreConfig(
                election_ticks=rng.choice((4, 6, 10)),
                heartbeat_ticks=rng.choice((1, 2, 3)),
                pre_vote=rng.random() < 0.85,
                check_quorum=rng.random() < 0.85,
                max_msg_bytes=rng.choice((1, 64, 300, 1 << 20)),
                max_inflight_msgs=rng.choice((1, 2, 8, 256)),
                max_committed_bytes_per_ready=rng.choice((64, 1 << 20)),
                snapshot_chunk_bytes=rng.choice((3, 7, 64)),
                max_inflight_snapshot_chunks=rng.choice((1, 2, 4)),
            ),
        )


@dataclass
class SimResult:
    seed: int
    events: int
    leaders: int
    applied: int
    sim_time: int
    stats: dict[str, int]


# event kinds
_TICK, _DELIVER, _STAGE, _CHAOS, _FAULT = 0, 1, 2, 3, 4

# chaos actions and their weights in storms and in calm spells
_ACTIONS = (
    "propose",
    "propose_then_fault",
    "heal",
    "isolate",
    "partition",
    "crash",
    "restart",
    "membership",
    "snapshot",
    "compact",
    "transfer",
    "read",
    "wipe",
)
_STORM = (20, 10, 5, 8, 6, 8, 6, 6, 5, 3, 4, 8, 1)
_CALM = (35, 3, 10, 1, 1, 1, 10, 8, 6, 3, 4, 8, 1)
# pipeline stages
_TAKE, _PERSIST_SNAPSHOT, _PERSIST, _SEND, _APPLY = 0, 1, 2, 3, 4


class Simulation:
    def __init__(
        self,
        seed: int,
        params: SimParams | None = None,
        *,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.params = (
            dataclasses.replace(params) if params is not None else SimParams.draw(self.rng)
        )
        self.trace = trace
        self.now = 0
        self._seq = 0
        self._queue: list[tuple[int, int, int, Any]] = []
        self.nodes: dict[NodeId, SimNode] = {}
        self.cut: set[tuple[NodeId, NodeId]] = set()
        self.events = 0
        self.stats: dict[str, int] = {}
        self.chaos_enabled = True
        self.storm = False
        self._phase_end = 0
        # checker state
        self.leader_of_term: dict[int, NodeId] = {}
        self.entry_facts: dict[tuple[int, int], tuple[int, bytes, int]] = {}
        self.applied: dict[int, tuple[int, int]] = {}  # index -> (term, digest)
        self.max_applied = 0
        self.committed_terms: dict[int, int] = {}
        self.max_committed = (0, 0)
        self.read_floor: dict[tuple[NodeId, bytes], int] = {}
        self._read_seq = 0
        self._proposal_seq = 0

        initial = [self._new_node() for _ in range(self.params.initial_voters)]
        config = Configuration(voters=tuple(n.member() for n in initial))
        for n in initial:
            self._start(n)
            assert n.core is not None
            n.core.bootstrap(config)
            self._kick(n)
        self._schedule(self.rng.randrange(10, 60), _CHAOS, None)

    # --- plumbing ----------------------------------------------------------------------

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def _log(self, text: str) -> None:
        if self.trace is not None:
            self.trace(f"[{self.now:6d}] {text}")

    def _schedule(self, delay: int, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self.now + delay, self._seq, kind, payload))

    def _new_node(self) -> SimNode:
        node_id = NodeId(len(self.nodes) + 1)
        node = SimNode(node_id, 0)
        self.nodes[node_id] = node
        return node

    def _start(self, node: SimNode) -> None:
        node.core = RaftCore(
            node_id=node.node_id,
            directory_id=node.directory_id,
            cluster_id=CLUSTER_ID,
            storage=node.storage,
            config=self.params.core,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        snap = node.storage.snapshot()
        node.sm = SimStateMachine()
        node.applied_config = snap.meta.config
        if snap.meta.index:
            node.sm.restore(snap.data)
            self._check_snapshot_digest(node, snap.meta.index)
        node.ready = None
        node.pipeline_scheduled = False
        # Ticks are per node with a random phase, so nodes do not tick in lockstep.
        self._schedule(self.rng.randrange(1, TICK + 1), _TICK, (node.node_id, node.incarnation))

    def _crash(self, node: SimNode) -> None:
        self._log(f"crash {node.node_id}")
        node.core = None
        node.ready = None
        node.incarnation += 1
        node.pipeline_scheduled = False
        node.pending_compact = None

    def _kick(self, node: SimNode) -> None:
        """Start the driver pipeline if the core has work and none is running."""
        if node.core is None or node.ready is not None or node.pipeline_scheduled:
            return
        if node.core.has_ready():
            node.pipeline_scheduled = True
            self._schedule(
                self.rng.randrange(0, 3), _STAGE, (node.node_id, node.incarnation, _TAKE)
            )

    def violation(self, text: str) -> SafetyViolation:
        return SafetyViolation(
            f"seed {self.seed} at t={self.now} event {self.events}: {text}\n"
            f"  reproduce: python -m dlog.raft.sim --seed {self.seed} --trace"
        )

    # --- network ---------------------------------------------------------------------

    def _send(self, msg: AnyMessage) -> None:
        p = self.params
        src, dst = msg.from_id, msg.to
        if (src, dst) in self.cut:
            self._count("net_cut")
            return
        if self.rng.random() < p.drop_rate:
            self._count("net_drop")
            return
        if p.wire:
            head, payload = message_to_wire(msg)
            msg = message_from_wire(head, payload)
        copies = 2 if self.rng.random() < p.dup_rate else 1
        for _ in range(copies):
            delay = self.rng.randint(p.min_delay, p.max_delay)
            if self.rng.random() < p.long_delay_rate:
                delay += self.rng.randint(50, 300)
            self._schedule(delay, _DELIVER, msg)

    def isolate(self, node_id: NodeId) -> None:
        for other in self.nodes:
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def partition(self, groups: Iterable[Iterable[NodeId]]) -> None:
        group_of: dict[NodeId, int] = {}
        for gi, group in enumerate(groups):
            for n in group:
                group_of[n] = gi
        for a in self.nodes:
            for b in self.nodes:
                if a != b and group_of.get(a, -1) != group_of.get(b, -2):
                    self.cut.add((a, b))

    def heal(self) -> None:
        self.cut.clear()

    # --- the event loop ------------------------------------------------------------------

    def run_until(self, end: int) -> None:
        while self._queue and self._queue[0][0] <= end:
            when, _, kind, payload = heapq.heappop(self._queue)
            self.now = when
            self.events += 1
            if kind == _TICK:
                node_id, incarnation = payload
                node = self.nodes[node_id]
                if node.core is None or node.incarnation != incarnation:
                    continue
                node.core.tick()
                self._schedule(TICK, _TICK, payload)
                self._after(node)
            elif kind == _DELIVER:
                msg: AnyMessage = payload
                node = self.nodes[msg.to]
                if node.core is None or (msg.from_id, msg.to) in self.cut:
                    continue
                node.core.step(msg)
                self._after(node)
            elif kind == _STAGE:
                node_id, incarnation, stage = payload
                node = self.nodes[node_id]
                if node.core is None or node.incarnation != incarnation:
                    continue
                self._stage(node, stage)
                self._after(node)
            elif kind == _CHAOS:
                if self.chaos_enabled:
                    self._chaos()
                    lo, hi = self.params.storm_every if self.storm else self.params.calm_every
                    self._schedule(self.rng.randint(lo, hi), _CHAOS, None)
            elif self.chaos_enabled:
                self._fault(*payload)
        self.now = max(self.now, end)

    def _after(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        # A leader counts once its term is durable: before that it has sent nothing and
        # applied nothing, and a crash erases it (a lone voter can win in memory).
        if (
            core.role is Role.LEADER
            and node.led_term != core.term
            and node.storage.initial_state().term == core.term
        ):
            node.led_term = core.term
            self._on_new_leader(node, core)
        self._kick(node)

    # --- the simulated driver --------------------------------------------------------------

    def _stage(self, node: SimNode, stage: int) -> None:
        core = node.core
        assert core is not None
        nxt = stage + 1
        if stage == _TAKE:
            node.pipeline_scheduled = False
            rd = core.ready()
            if rd is None:
                return
            node.ready = rd
            if rd.send_before_persist:
                # A leader replicating while it writes (thesis 10.2.1): a crash before
                # the persist stage loses its own copy of what it already sent.
                for msg in rd.messages:
                    self._send(msg)
            if rd.snapshot is None:
                nxt = _PERSIST
        else:
            rd = node.ready
            assert rd is not None
            if stage == _PERSIST_SNAPSHOT:
                assert rd.snapshot is not None
                self._check_snapshot_meta(rd.snapshot.meta.index, rd.snapshot.meta.term)
                node.storage.apply_snapshot(rd.snapshot)
            elif stage == _PERSIST:
                self._persist(node, rd)
            elif stage == _SEND:
                if not rd.send_before_persist:
                    for msg in rd.messages:
                        self._send(msg)
            else:
                self._apply(node, rd)
                core.advance(rd)
                node.ready = None
                return
        node.pipeline_scheduled = False
        self._schedule(self.rng.randrange(0, 3), _STAGE, (node.node_id, node.incarnation, nxt))

    def _persist(self, node: SimNode, rd: Ready) -> None:
        storage = node.storage
        if rd.entries:
            storage.append(rd.entries)
            facts = self.entry_facts
            for e in rd.entries:
                try:
                    prev_term = storage.term(e.index - 1)
                except LogCompactedError:
                    prev_term = -1
                key = (e.index, e.term)
                fact = facts.get(key)
                mine = (int(e.type), e.data, prev_term)
                if fact is None:
                    facts[key] = mine
                elif (
                    fact[0] != mine[0]
                    or fact[1] != mine[1]
                    or (prev_term != -1 and fact[2] != -1 and fact[2] != prev_term)
                ):
                    raise self.violation(
                        f"log matching: node {node.node_id} persisted entry {key} as {mine}, "
                        f"another node has {fact}"
                    )
        if rd.hard_state is not None:
            storage.set_hard_state(rd.hard_state)
            commit = rd.hard_state.commit
            if commit > 0:
                try:
                    term = storage.term(commit)
                except LogCompactedError:
                    term = -1
                if term >= 0:
                    known = self.committed_terms.get(commit)
                    if known is not None and known != term:
                        raise self.violation(
                            f"node {node.node_id} committed index {commit} at term {term}, "
                            f"another node at term {known}"
                        )
                    self.committed_terms[commit] = term
                    if commit > self.max_committed[0]:
                        self.max_committed = (commit, term)

    def _apply(self, node: SimNode, rd: Ready) -> None:
        sm = node.sm
        if rd.snapshot is not None:
            sm.restore(rd.snapshot.data)
            node.applied_config = rd.snapshot.meta.config
            self._check_snapshot_digest(node, rd.snapshot.meta.index)
        for e in rd.committed_entries:
            if e.index != sm.index + 1:
                raise self.violation(
                    f"node {node.node_id} applied {e.index} after {sm.index} (out of order)"
                )
            digest = sm.apply(e)
            known = self.applied.get(e.index)
            if known is None:
                self.applied[e.index] = (e.term, digest)
                if e.index > self.max_applied:
                    self.max_applied = e.index
            elif known != (e.term, digest):
                raise self.violation(
                    f"state machine safety: node {node.node_id} applied index {e.index} "
                    f"(term {e.term}, digest {digest:#x}); another node applied "
                    f"term {known[0]}, digest {known[1]:#x}"
                )
            if e.type is EntryType.CONFIG:
                node.applied_config = decode_configuration(e.data)
        for rs in rd.read_states:
            floor = self.read_floor.pop((node.node_id, rs.context), None)
            if floor is not None and rs.index < floor:
                raise self.violation(
                    f"read index {rs.index} on node {node.node_id} is below {floor}, "
                    f"already applied when the read began"
                )
            self._count("read_served")

    def _check_snapshot_digest(self, node: SimNode, index: int) -> None:
        known = self.applied.get(index)
        if known is not None and known[1] != node.sm.digest:
            raise self.violation(
                f"node {node.node_id} restored a snapshot at {index} with digest "
                f"{node.sm.digest:#x}; entries applied elsewhere give {known[1]:#x}"
            )

    def _check_snapshot_meta(self, index: int, term: int) -> None:
        known = self.applied.get(index)
        if known is not None and known[0] != term:
            raise self.violation(f"snapshot at {index} has term {term}, applied term {known[0]}")

    def _on_new_leader(self, node: SimNode, core: RaftCore) -> None:
        term = core.term
        other = self.leader_of_term.get(term)
        if other is not None and other != node.node_id:
            raise self.violation(
                f"election safety: nodes {other} and {node.node_id} lead term {term}"
            )
        self.leader_of_term[term] = node.node_id
        self._count("elections")
        self._log(f"node {node.node_id} leads term {term}")
        if self.storm and self.chaos_enabled and self.rng.random() < 0.25:
            # A leader that dies moments after winning leaves its no-op (and maybe a
            # few old entries) on a minority: the Figure 8 situation.
            fault = self.rng.choice(("crash", "isolate"))
            self._schedule(self.rng.randint(0, 12), _FAULT, (fault, node.node_id, node.incarnation))
        index, cterm = self.max_committed
        if index == 0:
            return
        log = core.log
        if index < log.first_index():
            return  # covered by its snapshot, whose term was checked against the applied log
        if log.term(index) != cterm:
            raise self.violation(
                f"leader completeness: new leader {node.node_id} (term {term}) has term "
                f"{log.term(index)} at committed index {index} (committed at term {cterm})"
            )

    # --- chaos ---------------------------------------------------------------------------

    def leader(self) -> SimNode | None:
        best: SimNode | None = None
        for n in self.nodes.values():
            if (
                n.core is not None
                and n.core.role is Role.LEADER
                and (best is None or n.core.term > (best.core.term if best.core else -1))
            ):
                best = n
        return best

    def _alive(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.core is not None]

    def propose(self, node: SimNode, count: int = 1) -> int | None:
        core = node.core
        assert core is not None
        datas = []
        for _ in range(count):
            self._proposal_seq += 1
            datas.append(b"p%d" % self._proposal_seq)
        try:
            index = core.propose_batch(datas)
        except NotLeaderError:
            self._count("propose_not_leader")
            return None
        self._count("proposals")
        self._after(node)
        return index

    def _chaos(self) -> None:
        rng = self.rng
        if self.now >= self._phase_end:
            # Alternate storms (frequent faults) with calm spells (heal, restart,
            # make progress), so faults keep landing on a cluster that is doing work.
            self.storm = not self.storm
            self._phase_end = self.now + rng.randint(200, 900)
            if not self.storm:
                self._log("calm: heal")
                self.heal()
        table = _STORM if self.storm else _CALM
        action = rng.choices(_ACTIONS, weights=table)[0]
        getattr(self, f"_act_{action}")()

    def _act_propose(self) -> None:
        leader = self.leader()
        alive = self._alive()
        if leader is not None and (self.rng.random() < 0.9 or not alive):
            self.propose(leader, self.rng.randint(1, 6))
        elif alive:
            self.propose(self.rng.choice(alive), self.rng.randint(1, 6))

    def _act_propose_then_fault(self) -> None:
        """Propose, then crash or cut off the leader while the entries are in flight."""
        leader = self.leader()
        if leader is None:
            return
        self.propose(leader, self.rng.randint(1, 3))
        fault = self.rng.choice(("crash", "isolate"))
        self._schedule(self.rng.randint(0, 15), _FAULT, (fault, leader.node_id, leader.incarnation))

    def _fault(self, fault: str, node_id: NodeId, incarnation: int) -> None:
        node = self.nodes[node_id]
        if node.core is None or node.incarnation != incarnation:
            return
        if fault == "crash":
            self._crash(node)
        else:
            self._log(f"isolate {node_id}")
            self.isolate(node_id)

    def _act_heal(self) -> None:
        self._log("heal")
        self.heal()

    def _act_isolate(self) -> None:
        victim = self.rng.choice(list(self.nodes.values()))
        self._log(f"isolate {victim.node_id}")
        self.isolate(victim.node_id)

    def _act_partition(self) -> None:
        ids = list(self.nodes)
        self.rng.shuffle(ids)
        cut_at = self.rng.randint(1, len(ids))
        self._log(f"partition {ids[:cut_at]} | {ids[cut_at:]}")
        self.partition([ids[:cut_at], ids[cut_at:]])

    def _act_crash(self) -> None:
        alive = self._alive()
        if alive:
            self._crash(self.rng.choice(alive))

    def _act_restart(self) -> None:
        dead = [n for n in self.nodes.values() if n.core is None]
        if dead:
            node = self.rng.choice(dead)
            self._log(f"restart {node.node_id}")
            self._start(node)

    def _act_membership(self) -> None:
        leader = self.leader()
        if leader is not None:
            self._membership_change(leader)

    def _act_snapshot(self) -> None:
        alive = self._alive()
        if alive:
            self._take_snapshot(self.rng.choice(alive))

    def _act_compact(self) -> None:
        pending = [n for n in self._alive() if n.pending_compact is not None]
        if pending:
            self._compact(self.rng.choice(pending))

    def _act_transfer(self) -> None:
        leader = self.leader()
        if leader is None or leader.core is None:
            return
        voters = [v for v in leader.core.config.voter_ids if v != leader.node_id]
        if voters:
            target_id = self.rng.choice(voters)
            self._log(f"transfer {leader.node_id} -> {target_id}")
            try:
                leader.core.transfer_leadership(target_id)
            except DlogError:
                self._count("transfer_refused")
            self._after(leader)

    def _act_read(self) -> None:
        alive = self._alive()
        if not alive:
            return
        # Half the time ask a node that believes it leads (perhaps a stale one).
        leaders = [n for n in alive if n.core is not None and n.core.role is Role.LEADER]
        if leaders and self.rng.random() < 0.5:
            self._read(self.rng.choice(leaders))
        else:
            self._read(self.rng.choice(alive))

    def _act_wipe(self) -> None:
        self._maybe_wipe()

    def _read(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        self._read_seq += 1
        context = b"r%d" % self._read_seq
        try:
            core.read_index(context)
        except NotLeaderError:
            self._count("read_no_leader")
            return
        self.read_floor[(node.node_id, context)] = self.max_applied
        self._after(node)

    def _take_snapshot(self, node: SimNode) -> None:
        sm = node.sm
        storage = node.storage
        if sm.index <= storage.snapshot().meta.index or node.ready is not None:
            return
        try:
            term = storage.term(sm.index)
        except (LogCompactedError, DlogError):
            return
        meta = SnapshotMeta(index=sm.index, term=term, config=node.applied_config)
        storage.create_snapshot(meta, sm.snapshot())
        self._count("snapshots")
        self._log(f"node {node.node_id} snapshot at {sm.index}")
        # Compaction is a separate event: a crash may fall in between.
        node.pending_compact = max(storage.first_index() - 1, sm.index - self.rng.randint(0, 5))

    def _compact(self, node: SimNode) -> None:
        index = node.pending_compact
        node.pending_compact = None
        if index is not None and node.core is not None:
            node.storage.compact(min(index, node.storage.snapshot().meta.index))
            self._count("compactions")

    def _intact_voters_ok(self, config: Configuration) -> bool:
        """Enough voters of ``config`` still have the disk they joined with."""
        intact = sum(
            1
            for m in config.voters
            if m.node_id in self.nodes and self.nodes[m.node_id].directory_id == m.directory_id
        )
        return intact >= len(config.voters) // 2 + 1

    def _membership_change(self, leader: SimNode) -> None:
        core = leader.core
        assert core is not None
        rng = self.rng
        config = core.config
        choices: list[ConfChange] = []
        # Replace members whose disk was wiped: remove the stale identity first.
        for m in (*config.voters, *config.learners):
            node = self.nodes[m.node_id]
            if node.directory_id != m.directory_id and node.node_id != leader.node_id:
                choices.append(ConfChange(type=ConfChangeType.REMOVE_NODE, node_id=m.node_id))
        outsiders = [n for n in self.nodes.values() if config.member(n.node_id) is None]
        for n in outsiders:
            choices.append(
                ConfChange(
                    type=ConfChangeType.ADD_LEARNER,
                    node_id=n.node_id,
                    directory_id=n.directory_id,
                    address=n.address,
                )
            )
            if rng.random() < 0.2:
                choices.append(
                    ConfChange(
                        type=ConfChangeType.ADD_VOTER,
                        node_id=n.node_id,
                        directory_id=n.directory_id,
                        address=n.address,
                    )
                )
        for m in config.learners:
            if self.nodes[m.node_id].directory_id == m.directory_id:
                choices.append(ConfChange(type=ConfChangeType.PROMOTE_LEARNER, node_id=m.node_id))
        if len(config.voters) > 1:
            victim = rng.choice(config.voters)
            choices.append(ConfChange(type=ConfChangeType.REMOVE_NODE, node_id=victim.node_id))
        if config.learners:
            victim = rng.choice(config.learners)
            choices.append(ConfChange(type=ConfChangeType.REMOVE_NODE, node_id=victim.node_id))
        if len(self.nodes) < self.params.max_nodes and rng.random() < 0.5:
            node = self._new_node()
            self._start(node)
            self._log(f"new node {node.node_id}")
            choices.append(
                ConfChange(
                    type=ConfChangeType.ADD_LEARNER,
                    node_id=node.node_id,
                    directory_id=node.directory_id,
                    address=node.address,
                )
            )
        if not choices:
            return
        change = rng.choice(choices)
        try:
            new_config = config.apply(change)
        except DlogError:
            return
        if not self._intact_voters_ok(new_config) or len(new_config.voters) > 5:
            return
        try:
            core.propose_conf_change(change)
        except DlogError as exc:
            self._count(f"conf_change_refused_{type(exc).__name__}")
            return
        self._count("conf_changes")
        self._log(f"conf change {change.type.value} {change.node_id}")
        self._after(leader)

    @staticmethod
    def _stored_config(storage: MemoryStorage) -> Configuration:
        for e in reversed(storage.all_entries()):
            if e.type is EntryType.CONFIG:
                return decode_configuration(e.data)
        return storage.snapshot().meta.config

    def _maybe_wipe(self) -> None:
        """Lose a node's disk: it comes back with a new directory id and no state."""
        node = self.rng.choice(list(self.nodes.values()))
        new_dir = f"dir-{node.node_id}-{node.generation + 1}"
        for other in self.nodes.values():
            config = (
                other.core.config if other.core is not None else self._stored_config(other.storage)
            )
            patched = Configuration(
                voters=tuple(
                    Member(node_id=m.node_id, directory_id="wiped", address=m.address)
                    if m.node_id == node.node_id
                    else m
                    for m in config.voters
                ),
                learners=config.learners,
            )
            if not self._intact_voters_ok(patched):
                return
        self._log(f"wipe {node.node_id}")
        self._count("wipes")
        if node.core is not None:
            self._crash(node)
        node.generation += 1
        node.directory_id = new_dir
        node.storage = MemoryStorage()
        self._start(node)

    # --- the end -------------------------------------------------------------------------

    def check_logs_match(self) -> None:
        """Full pairwise log matching over the persisted logs."""
        nodes = list(self.nodes.values())
        for i, a in enumerate(nodes):
            ents_a = {e.index: e for e in a.storage.all_entries()}
            for b in nodes[i + 1 :]:
                ents_b = {e.index: e for e in b.storage.all_entries()}
                common = sorted(set(ents_a) & set(ents_b), reverse=True)
                agreed = False
                for idx in common:
                    ea, eb = ents_a[idx], ents_b[idx]
                    if agreed and ea != eb:
                        raise self.violation(
                            f"log matching: nodes {a.node_id} and {b.node_id} agree on a later "
                            f"entry but differ at {idx}"
                        )
                    if ea.term == eb.term:
                        if ea != eb:
                            raise self.violation(
                                f"log matching: nodes {a.node_id}, {b.node_id} differ at {idx} "
                                f"in term {ea.term}"
                            )
                        agreed = True

    def finish(self, max_ticks: int = 400) -> None:
        """Heal everything and require progress: a leader and an applied new proposal."""
        self.chaos_enabled = False
        self.heal()
        self.params.drop_rate = 0.0
        self.params.long_delay_rate = 0.0
        # Raft promises liveness only when messages are much faster than the election
        # timeout (5.6: broadcastTime << electionTimeout); safety was checked under
        # any delays. Without pre-vote, delays near the timeout can starve the one
        # node able to win (a stale candidate keeps resetting its timer).
        self.params.max_delay = min(self.params.max_delay, TICK)
        for node in self.nodes.values():
            if node.core is None:
                self._start(node)
            if node.pending_compact is not None:
                self._compact(node)
        if not (self.params.core.pre_vote or self.params.core.check_quorum):
            self._decommission_removed()
        deadline = self.now + max_ticks * TICK
        target: tuple[SimNode, int, int] | None = None
        while self.now < deadline:
            self.run_until(self.now + TICK)
            leader = self.leader()
            if leader is None or leader.core is None:
                continue
            if target is not None:
                node, index, term = target
                if node is leader and node.core is not None and node.core.term == term:
                    if node.sm.index >= index:
                        self.check_logs_match()
                        return
                    continue
            if leader.core.committed_in_current_term():
                index_or_none = self.propose(leader)
                if index_or_none is not None:
                    target = (leader, index_or_none, leader.core.term)
        raise self.violation(f"liveness: no proposal applied after healing:\n{self.describe()}")

    def _decommission_removed(self) -> None:
        """An operator stops removed nodes ("dlogctl node remove" is for good).

        Needed only with neither pre-vote nor check-quorum: then a node that never
        learnt of its removal forces elections forever (thesis 4.2.3). A node counts as
        removed when the most advanced log has committed a configuration without it
        and holds no later one with it.
        """
        ahead = max(
            (n for n in self.nodes.values() if n.core is not None),
            key=lambda n: n.core.log.committed if n.core is not None else -1,
        )
        core = ahead.core
        assert core is not None
        committed_config = core.committed_config()
        for node in self.nodes.values():
            if (
                node.core is not None
                and committed_config.member(node.node_id) is None
                and core.config.member(node.node_id) is None
            ):
                self._log(f"decommission {node.node_id}")
                self._crash(node)

    def describe(self) -> str:
        lines = []
        for n in self.nodes.values():
            core = n.core
            if core is None:
                lines.append(f"  node {n.node_id}: down")
                continue
            lines.append(
                f"  node {n.node_id} ({n.directory_id}): {core.role.value} term {core.term} "
                f"vote {core.vote} leader {core.leader} voter {core.is_voter} "
                f"last {core.log.last_index()}/{core.log.last_term()} commit {core.log.committed} "
                f"applied {n.sm.index} config@{core.config_index} "
                f"voters {[(m.node_id, m.directory_id) for m in core.config.voters]} "
                f"learners {list(core.config.learner_ids)}"
            )
        return "\n".join(lines)


def run_seed(seed: int, *, trace: Callable[[str], None] | None = None) -> SimResult:
    """Run one seed to the end; raises SafetyViolation naming the seed on failure."""
    sim = Simulation(seed, trace=trace)
    try:
        sim.run_until(sim.params.duration)
        sim.finish()
    except SafetyViolation:
        raise
    except Exception as exc:
        raise SafetyViolation(
            f"seed {seed} at t={sim.now}: {type(exc).__name__}: {exc}\n"
            f"  reproduce: python -m dlog.raft.sim --seed {seed} --trace"
        ) from exc
    return SimResult(
        seed=seed,
        events=sim.events,
        leaders=len(sim.leader_of_term),
        applied=sim.max_applied,
        sim_time=sim.now,
        stats=dict(sim.stats),
    )


def run_range(args: tuple[int, int]) -> tuple[int, list[str]]:
    start, stop = args
    failures = []
    for seed in range(start, stop):
        try:
            run_seed(seed)
        except SafetyViolation as exc:
            failures.append(str(exc))
    return stop - start, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlog.raft.sim", description=__doc__)
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", type=int, default=1000, help="run seeds [start, start+N)")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--trace", action="store_true", help="print every simulated event")
    args = parser.parse_args(argv)

    if args.seed is not None:
        trace = print if args.trace else None
        try:
            result = run_seed(args.seed, trace=trace)
        except SafetyViolation as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            return 1
        print(
            f"seed {result.seed}: ok ({result.events} events, {result.leaders} terms with a "
            f"leader, {result.applied} entries applied) {result.stats}"
        )
        return 0

    started = time.monotonic()
    chunk = 200
    ranges = [
        (s, min(s + chunk, args.start + args.seeds))
        for s in range(args.start, args.start + args.seeds, chunk)
    ]
    done = 0
    failures: list[str] = []
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.Pool(args.jobs) as pool:
            for count, failed in pool.imap_unordered(run_range, ranges):
                done += count
                failures.extend(failed)
                for f in failed:
                    print(f"FAILED {f}", file=sys.stderr, flush=True)
                print(f"{done}/{args.seeds} seeds, {len(failures)} failed", flush=True)
    else:
        for r in ranges:
            count, failed = run_range(r)
            done += count
            failures.extend(failed)
            for f in failed:
                print(f"FAILED {f}", file=sys.stderr, flush=True)
            print(f"{done}/{args.seeds} seeds, {len(failures)} failed", flush=True)
    elapsed = time.monotonic() - started
    print(f"{args.seeds} seeds from {args.start} in {elapsed:.1f} s: {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
