"""A synchronous test network of Raft cores (in the spirit of etcd's raft_test.go).

Messages are delivered at once, in order, until nothing is left to deliver; each core's
Ready is handled exactly as a driver would (persist to its MemoryStorage, send, apply,
advance). ``cut``, ``isolate``, ``drop`` and ``recover`` shape the network.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable

from dlog.raft.core import CoreConfig, RaftCore
from dlog.raft.messages import (
    AnyMessage,
    Configuration,
    Entry,
    EntryType,
    HardState,
    Member,
    ReadState,
    Role,
)
from dlog.raft.storage import MemoryStorage
from dlog.types import NodeId

CLUSTER = "test-cluster"


def nid(i: int) -> NodeId:
    return NodeId(i)


def member(i: int, generation: int = 0) -> Member:
    return Member(node_id=NodeId(i), directory_id=f"dir{i}.{generation}", address=f"h{i}:9600")


def config_of(voters: Iterable[int], learners: Iterable[int] = ()) -> Configuration:
    return Configuration(
        voters=tuple(member(i) for i in voters), learners=tuple(member(i) for i in learners)
    )


def make_cfg(**overrides: object) -> CoreConfig:
    base: dict[str, object] = {
        "election_ticks": 10,
        "heartbeat_ticks": 1,
        "pre_vote": False,
        "check_quorum": False,
    }
    base.update(overrides)
    return CoreConfig(**base)  # type: ignore[arg-type]


def entries(*terms: int, start: int = 1) -> list[Entry]:
    """Normal entries with the given terms at consecutive indexes from ``start``."""
    return [
        Entry(start + i, t, EntryType.NORMAL, b"e%d" % (start + i)) for i, t in enumerate(terms)
    ]


def storage_with(
    config: Configuration, log_terms: Iterable[int] = (), *, term: int = 0, vote: int | None = None
) -> MemoryStorage:
    """A storage holding a config entry at index 1 (term 1), then entries of the given
    terms, and a hard state (term defaults to the last entry's)."""
    from dlog.raft.codec import encode_configuration

    st = MemoryStorage()
    log = [Entry(1, 1, EntryType.CONFIG, encode_configuration(config))]
    log += entries(*log_terms, start=2)
    st.append(log)
    last_term = log[-1].term
    st.set_hard_state(
        HardState(term=max(term, last_term), vote=None if vote is None else NodeId(vote), commit=1)
    )
    return st


def new_core(
    i: int,
    storage: MemoryStorage,
    cfg: CoreConfig | None = None,
    *,
    seed: int = 0,
    generation: int = 0,
    cluster_id: str = CLUSTER,
) -> RaftCore:
    return RaftCore(
        node_id=NodeId(i),
        directory_id=f"dir{i}.{generation}",
        cluster_id=cluster_id,
        storage=storage,
        config=cfg or make_cfg(),
        rng=random.Random(seed * 1000 + i),
    )


class Network:
    def __init__(self, cores: dict[int, RaftCore], storages: dict[int, MemoryStorage]) -> None:
        self.cores = {NodeId(k): v for k, v in cores.items()}
        self.storages = {NodeId(k): v for k, v in storages.items()}
        self.applied: dict[NodeId, list[Entry]] = {k: [] for k in self.cores}
        self.read_states: dict[NodeId, list[ReadState]] = {k: [] for k in self.cores}
        self.cuts: set[tuple[NodeId, NodeId]] = set()
        self.drop_rates: dict[tuple[NodeId, NodeId], float] = {}
        self.down: set[NodeId] = set()
        self.rng = random.Random(0)
        self.delivered: list[AnyMessage] = []
        #: Called for each message before delivery; return False to drop it.
        self.filter: Callable[[AnyMessage], bool] | None = None

    @classmethod
    def of(
        cls,
        n: int,
        cfg: CoreConfig | None = None,
        *,
        learners: Iterable[int] = (),
        seed: int = 0,
    ) -> Network:
        learners = list(learners)
        voters = [i for i in range(1, n + 1) if i not in learners]
        config = config_of(voters, learners)
        storages = {i: storage_with(config) for i in range(1, n + 1)}
        cores = {i: new_core(i, storages[i], cfg, seed=seed) for i in range(1, n + 1)}
        net = cls(cores, storages)
        net.settle()
        return net

    def core(self, i: int) -> RaftCore:
        return self.cores[NodeId(i)]

    def add(self, i: int, core: RaftCore, storage: MemoryStorage) -> None:
        self.cores[NodeId(i)] = core
        self.storages[NodeId(i)] = storage
        self.applied.setdefault(NodeId(i), [])
        self.read_states.setdefault(NodeId(i), [])

    # --- shaping the network -------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        self.cuts.add((NodeId(a), NodeId(b)))
        self.cuts.add((NodeId(b), NodeId(a)))

    def isolate(self, i: int) -> None:
        for other in self.cores:
            if other != i:
                self.cut(i, other)

    def drop(self, a: int, b: int, rate: float) -> None:
        self.drop_rates[(NodeId(a), NodeId(b))] = rate

    def recover(self) -> None:
        self.cuts.clear()
        self.drop_rates.clear()

    # --- driving -------------------------------------------------------------------

    def handle_ready(self, i: NodeId) -> list[AnyMessage]:
        """Do what a driver does with core ``i``'s Ready; returns the messages sent."""
        core = self.cores[i]
        rd = core.ready()
        if rd is None:
            return []
        st = self.storages[i]
        if rd.snapshot is not None:
            st.apply_snapshot(rd.snapshot)
        st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        self.applied[i].extend(rd.committed_entries)
        self.read_states[i].extend(rd.read_states)
        core.advance(rd)
        return list(rd.messages)

    def _passes(self, m: AnyMessage) -> bool:
        if m.to in self.down or m.from_id in self.down or m.to not in self.cores:
            return False
        if (m.from_id, m.to) in self.cuts:
            return False
        rate = self.drop_rates.get((m.from_id, m.to), 0.0)
        if rate and self.rng.random() < rate:
            return False
        return self.filter is None or self.filter(m)

    def settle(self, extra: Iterable[AnyMessage] = ()) -> None:
        """Deliver messages (and the ones they cause) until the network is quiet."""
        queue: deque[AnyMessage] = deque(extra)
        for i in self.cores:
            if i not in self.down:
                queue.extend(self.handle_ready(i))
        steps = 0
        while queue:
            steps += 1
            assert steps < 100_000, "the network does not settle"
            m = queue.popleft()
            if not self._passes(m):
                continue
            self.delivered.append(m)
            self.cores[m.to].step(m)
            queue.extend(self.handle_ready(m.to))
            # A step may also have made work for nobody else; keep draining.
            for i in self.cores:
                if i not in self.down and self.cores[i].has_ready():
                    queue.extend(self.handle_ready(i))

    def tick(self, i: int, n: int = 1) -> None:
        for _ in range(n):
            self.cores[NodeId(i)].tick()
            self.settle()

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for i in self.cores:
                if i not in self.down:
                    self.cores[i].tick()
            self.settle()

    def elect(self, i: int) -> RaftCore:
        core = self.cores[NodeId(i)]
        core.campaign()
        self.settle()
        assert core.role is Role.LEADER, f"node {i} did not win: {core.role}"
        return core

    def propose(self, i: int, *datas: bytes) -> int:
        index = self.cores[NodeId(i)].propose_batch(list(datas))
        self.settle()
        return index

    def applied_data(self, i: int) -> list[bytes]:
        return [e.data for e in self.applied[NodeId(i)] if e.type is EntryType.NORMAL]

    def crash_and_restart(self, i: int, cfg: CoreConfig | None = None) -> RaftCore:
        """Lose the core's memory; keep what its storage holds."""
        old = self.cores[NodeId(i)]
        core = RaftCore(
            node_id=old.node_id,
            directory_id=old.directory_id,
            cluster_id=old.cluster_id,
            storage=self.storages[NodeId(i)],
            config=cfg or old.cfg,
            rng=random.Random(i),
        )
        self.cores[NodeId(i)] = core
        self.applied[NodeId(i)] = []
        return core


def drain(core: RaftCore, storage: MemoryStorage) -> list[AnyMessage]:
    """Handle one core's Ready alone (no network): persist, advance, return messages."""
    msgs: list[AnyMessage] = []
    while True:
        rd = core.ready()
        if rd is None:
            return msgs
        if rd.snapshot is not None:
            storage.apply_snapshot(rd.snapshot)
        storage.append(rd.entries)
        if rd.hard_state is not None:
            storage.set_hard_state(rd.hard_state)
        msgs.extend(rd.messages)
        core.advance(rd)
