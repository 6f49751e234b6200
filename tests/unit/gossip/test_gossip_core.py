"""The sans-I/O gossip core, driven by hand: one rule per test."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlog.gossip.broadcast import BroadcastQueue
from dlog.gossip.config import GossipConfig
from dlog.gossip.core import GossipCore
from dlog.gossip.events import (
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberState,
    MemberSuspect,
)
from dlog.gossip.lifeguard import Awareness, Suspicion
from dlog.gossip.messages import (
    Ack,
    Address,
    Alive,
    Dead,
    Left,
    Nack,
    Ping,
    PingReq,
    Primary,
    Suspect,
    Sync,
    Update,
    assemble_datagram,
    datagram_prefix,
    decode_datagram,
    encode_message,
)
from dlog.types import NodeId

A: Address = ("10.0.0.1", 7946)
B: Address = ("10.0.0.2", 7946)
C: Address = ("10.0.0.3", 7946)
D: Address = ("10.0.0.4", 7946)


def make_core(node_id: int = 1, address: Address = A, **kwargs: object) -> GossipCore:
    return GossipCore(
        node_id=NodeId(node_id),
        address=address,
        rng=random.Random(node_id),
        **kwargs,  # type: ignore[arg-type]
    )


def datagram(
    sender: int, primary: Primary | None = None, *updates: Update, incarnation: int = 0
) -> bytes:
    return assemble_datagram(
        datagram_prefix(NodeId(sender), incarnation),
        None if primary is None else encode_message(primary),
        [encode_message(u) for u in updates],
    )


def alive(node_id: int, address: Address, incarnation: int = 0, **meta: str) -> Alive:
    return Alive(node_id=NodeId(node_id), incarnation=incarnation, address=address, metadata=meta)


def sent(core: GossipCore) -> list[tuple[Address, Primary | None, tuple[Update, ...]]]:
    out = []
    for address, data in core.datagrams_to_send():
        decoded = decode_datagram(data)
        out.append((address, decoded.primary, decoded.updates))
    return out


def with_peers(core: GossipCore, *peers: tuple[int, Address]) -> None:
    core.receive(datagram(peers[0][0], None, *(alive(n, a) for n, a in peers)), peers[0][1])
    core.datagrams_to_send()
    core.events()


def run_ticks(core: GossipCore, ticks: int) -> None:
    for _ in range(ticks):
        core.tick()


# -- codec-level safety -----------------------------------------------------------------


@given(st.binary(max_size=2000))
def test_garbage_is_counted_and_dropped(data: bytes) -> None:
    core = make_core()
    core.receive(data, B)
    assert core.stats.malformed_dropped + core.stats.oversize_dropped <= 1
    assert core.members()[0].node_id == 1


def test_oversize_datagram_is_dropped_and_counted() -> None:
    core = make_core()
    big = datagram(2, None, alive(2, B, **{f"k{i}": "v" * 50 for i in range(30)}))
    assert len(big) > core.config.max_datagram_size
    core.receive(big, B)
    assert core.stats.oversize_dropped == 1
    assert core.member(NodeId(2)) is None
    core.receive(b"\xff\x00garbage", B)
    assert core.stats.malformed_dropped == 1


# -- probing ----------------------------------------------------------------------------


def test_ping_is_acked_with_piggybacked_updates() -> None:
    core = make_core()
    with_peers(core, (2, B))
    core.receive(datagram(3, Ping(seq=7, target=NodeId(1)), alive(3, C)), C)
    [(address, primary, updates)] = sent(core)
    assert address == C
    assert primary == Ack(seq=7)
    assert alive(3, C) in updates  # the news it just heard rides on the ack


def test_ping_for_another_node_id_is_ignored() -> None:
    core = make_core()
    core.receive(datagram(2, Ping(seq=7, target=NodeId(9))), B)
    assert sent(core) == []
    assert core.stats.misdirected_pings == 1


def probe_of(core: GossipCore, target: Address) -> int:
    """Tick until the core pings ``target``; the ping's seq."""
    for _ in range(1000):
        core.tick()
        for address, primary, _ in sent(core):
            if address == target and isinstance(primary, Ping):
                return primary.seq
    raise AssertionError("no probe")


def test_missed_ack_leads_to_ping_req_then_suspicion() -> None:
    cfg = GossipConfig()
    core = make_core(config=cfg)
    with_peers(core, (2, B), (3, C), (4, D))
    # Find a probe of node 2 and let it go unanswered.
    seq = probe_of(core, B)
    run_ticks(core, cfg.ticks(cfg.probe_timeout_ms))
    requests = [(a, p) for a, p, _ in sent(core) if isinstance(p, PingReq)]
    assert {a for a, _ in requests} == {C, D}
    assert all(
        p == PingReq(seq=seq, target=NodeId(2), target_address=B, nack=True) for _, p in requests
    )
    # Both helpers nack: the target is down, not us, so local health stays at 0.
    core.receive(datagram(3, Nack(seq=seq)), C)
    core.receive(datagram(4, Nack(seq=seq)), D)
    run_ticks(core, cfg.ticks(cfg.probe_interval_ms - cfg.probe_timeout_ms))
    assert core.member(NodeId(2)).state is MemberState.SUSPECT  # type: ignore[union-attr]
    assert [type(e) for e in core.events()] == [MemberSuspect]
    assert core.health_score == 0


def test_missing_nacks_raise_local_health_score_and_stretch_timeouts() -> None:
    cfg = GossipConfig()
    core = make_core(config=cfg)
    with_peers(core, (2, B), (3, C), (4, D))
    seq = probe_of(core, B)
    run_ticks(core, cfg.ticks(cfg.probe_interval_ms))
    assert core.health_score == 2  # two helpers, no nacks: we are the slow one
    # The period ended and the next probe went out; it waits three times as long.
    [next_ping] = [p for _, p, _ in sent(core) if isinstance(p, Ping)]
    assert next_ping.seq != seq
    ping_time = core.now
    while not any(isinstance(p, PingReq) for _, p, _ in sent(core)):
        core.tick()
    assert core.now - ping_time == 3 * cfg.ticks(cfg.probe_timeout_ms)


def test_ack_clears_the_probe_and_lowers_health_score() -> None:
    cfg = GossipConfig()
    core = make_core(config=cfg)
    with_peers(core, (2, B))
    probe_of(core, B)
    run_ticks(core, cfg.ticks(cfg.probe_interval_ms))  # unanswered, no helpers: +1
    assert core.health_score == 1
    assert core.member(NodeId(2)).state is MemberState.SUSPECT  # type: ignore[union-attr]
    seq = probe_of(core, B)
    core.receive(datagram(2, Ack(seq=seq)), B)
    assert core.health_score == 0
    run_ticks(core, cfg.ticks(cfg.probe_interval_ms))
    assert core.stats.probe_failures == 1


def test_ping_req_is_relayed_and_nacked_when_target_is_silent() -> None:
    cfg = GossipConfig()
    core = make_core(config=cfg)
    core.receive(datagram(2, PingReq(seq=5, target=NodeId(3), target_address=C, nack=True)), B)
    [(address, ping, _)] = sent(core)
    assert address == C
    assert isinstance(ping, Ping)
    assert ping.target == 3
    # The target answers: the ack goes back to the requester under the requester's seq.
    core.receive(datagram(3, Ack(seq=ping.seq)), C)
    assert [(a, p) for a, p, _ in sent(core)] == [(B, Ack(seq=5))]
    # Second request; this time the target stays silent: a nack before the deadline.
    core.receive(datagram(2, PingReq(seq=6, target=NodeId(3), target_address=C, nack=True)), B)
    sent(core)
    run_ticks(core, cfg.ticks(cfg.probe_timeout_ms))
    assert [(a, p) for a, p, _ in sent(core)] == [(B, Nack(seq=6))]


# -- incarnations, suspicion, refutation ------------------------------------------------


def test_suspicion_about_self_is_refuted_with_higher_incarnation() -> None:
    core = make_core()
    with_peers(core, (2, B))
    core.receive(datagram(2, None, Suspect(node_id=NodeId(1), incarnation=0, accuser=NodeId(2))), B)
    assert core.incarnation == 1
    [(address, primary, updates)] = sent(core)
    assert address == B
    assert primary is None
    assert Alive(node_id=NodeId(1), incarnation=1, address=A, metadata={}) in updates
    assert core.health_score == 1
    # An older suspicion is answered with the current incarnation, not a new one.
    core.receive(datagram(2, None, Suspect(node_id=NodeId(1), incarnation=0, accuser=NodeId(2))), B)
    assert core.incarnation == 1
    [(_, _, updates)] = sent(core)
    assert Alive(node_id=NodeId(1), incarnation=1, address=A, metadata={}) in updates


def test_incarnation_ordering() -> None:
    core = make_core()
    with_peers(core, (2, B))
    receive = lambda *u: core.receive(datagram(3, None, *u), C)  # noqa: E731
    receive(Suspect(node_id=NodeId(2), incarnation=0, accuser=NodeId(3)))
    assert core.member(NodeId(2)).state is MemberState.SUSPECT  # type: ignore[union-attr]
    receive(alive(2, B, 0))  # same incarnation: suspicion wins
    assert core.member(NodeId(2)).state is MemberState.SUSPECT  # type: ignore[union-attr]
    receive(alive(2, B, 1))  # refuted
    assert core.member(NodeId(2)).state is MemberState.ALIVE  # type: ignore[union-attr]
    receive(Dead(node_id=NodeId(2), incarnation=0, accuser=NodeId(3)))  # stale
    assert core.member(NodeId(2)).state is MemberState.ALIVE  # type: ignore[union-attr]
    receive(Dead(node_id=NodeId(2), incarnation=1, accuser=NodeId(3)))
    assert core.member(NodeId(2)).state is MemberState.DEAD  # type: ignore[union-attr]
    receive(alive(2, B, 1))  # dead at 1 beats alive at 1
    assert core.member(NodeId(2)).state is MemberState.DEAD  # type: ignore[union-attr]
    receive(alive(2, B, 2, rpc="x:1"))  # back, with new metadata
    member = core.member(NodeId(2))
    assert member is not None
    assert member.state is MemberState.ALIVE
    assert member.metadata == {"rpc": "x:1"}
    receive(Left(node_id=NodeId(2), incarnation=2))
    assert core.member(NodeId(2)).state is MemberState.LEFT  # type: ignore[union-attr]
    assert [type(e) for e in core.events()] == [
        MemberSuspect,
        MemberAlive,
        MemberDead,
        MemberJoined,
        MemberLeft,
    ]


def test_suspicion_times_out_to_dead_and_confirmations_shorten_it() -> None:
    cfg = GossipConfig()
    peers = [(n, (f"10.0.0.{n}", 7946)) for n in range(2, 12)]  # 11 members: k = 1

    def time_to_dead(confirm: bool) -> int:
        core = make_core(config=cfg)
        with_peers(core, *peers)
        core.receive(
            datagram(3, None, Suspect(node_id=NodeId(2), incarnation=0, accuser=NodeId(3))),
            peers[1][1],
        )
        if confirm:
            core.receive(
                datagram(4, None, Suspect(node_id=NodeId(2), incarnation=0, accuser=NodeId(4))),
                peers[2][1],
            )
        start = core.now
        while core.member(NodeId(2)).state is not MemberState.DEAD:  # type: ignore[union-attr]
            core.tick()
            for _, primary, _ in sent(core):
                # Every member answers its pings; an ack does not lift a suspicion.
                if isinstance(primary, Ping):
                    target = primary.target
                    core.receive(datagram(target, Ack(seq=primary.seq)), peers[target - 2][1])
        return core.now - start

    # min = 3 * log10(11) * 20 ticks = 63 ticks; max = 6 * min.
    assert time_to_dead(confirm=True) == 63
    assert time_to_dead(confirm=False) == 6 * 63


def test_suspicion_arithmetic() -> None:
    s = Suspicion(start=100, accuser=NodeId(1), k=3, min_ticks=10, max_ticks=60)
    assert s.deadline == 160
    assert not s.confirm(NodeId(1))  # the first accuser does not count twice
    assert s.confirm(NodeId(2))
    assert s.deadline == 100 + 35
    assert s.confirm(NodeId(3))
    assert s.deadline == 100 + 20
    assert s.confirm(NodeId(4))
    assert s.deadline == 110
    assert not s.confirm(NodeId(5))
    assert Suspicion(start=0, accuser=NodeId(1), k=0, min_ticks=10, max_ticks=60).deadline == 10


def test_awareness_is_bounded() -> None:
    awareness = Awareness(4)
    awareness.apply(-1)
    assert awareness.score == 0
    assert awareness.scale(10) == 10
    awareness.apply(10)
    assert awareness.score == 3
    assert awareness.scale(10) == 40


# -- dissemination ----------------------------------------------------------------------


def test_broadcasts_fill_the_budget_least_sent_first_and_retire() -> None:
    queue = BroadcastQueue()
    for i in range(5):
        queue.queue(NodeId(i), bytes([i]) * 10)
    queue.queue(NodeId(0), b"new" * 3)  # replaces the older update about node 0
    first = queue.take(budget=35, limit=2)
    assert first == [b"new" * 3, bytes([4]) * 10, bytes([3]) * 10]
    second = queue.take(budget=100, limit=2)
    assert second[:2] == [bytes([2]) * 10, bytes([1]) * 10]  # never sent before
    assert len(queue) == 2  # node 0 and 4's updates went out twice: retired
    assert queue.transmits(NodeId(3)) is None
    assert queue.transmits(NodeId(2)) == 1


def test_datagrams_never_exceed_the_size_bound() -> None:
    cfg = GossipConfig(max_datagram_size=600, max_metadata_bytes=256)
    core = make_core(config=cfg)
    news = [alive(n, (f"10.1.{n // 200}.{n % 200}", 7946), rpc="r" * 30) for n in range(2, 80)]
    for chunk in range(0, len(news), 5):
        core.receive(datagram(2, None, *news[chunk : chunk + 5]), B)
    core.receive(datagram(2, Ping(seq=1, target=NodeId(1))), B)
    core.receive(datagram(2, Sync(want_reply=True, entries=())), B)
    out = core.datagrams_to_send()
    assert len(out) > 5
    assert all(len(data) <= 600 for _, data in out)
    assert len({n.node_id for n in news}) == len(core.members()) - 1


def test_metadata_is_validated() -> None:
    with pytest.raises(ValueError, match="bytes"):
        make_core(metadata={"k": "v" * 250, "l": "w" * 250, "m": "x" * 250})
    core = make_core(metadata={"rpc": "a:1"})
    with pytest.raises(ValueError, match="str"):
        core.update_metadata({"rpc": 1})  # type: ignore[dict-item]
    core.update_metadata({"rpc": "b:2"})
    assert core.incarnation == 1
    assert core.member(NodeId(1)).metadata == {"rpc": "b:2"}  # type: ignore[union-attr]


# -- joining, push-pull, leaving --------------------------------------------------------


def test_join_retries_seeds_until_a_peer_is_known() -> None:
    cfg = GossipConfig()
    core = make_core(seeds=[B, C, A], config=cfg)
    attempts = []
    for _ in range(3 * cfg.ticks(cfg.join_retry_interval_ms)):
        core.tick()
        attempts += [a for a, p, _ in sent(core) if isinstance(p, Sync) and p.want_reply]
    assert attempts == [B, C] * 3  # never itself
    # A seed answers with its state: joined, and no more join requests.
    core.receive(datagram(2, Sync(want_reply=False, entries=()), alive(2, B)), B)
    assert [type(e) for e in core.events()] == [MemberJoined]
    requests = core.stats.join_requests
    for _ in range(3 * cfg.ticks(cfg.join_retry_interval_ms)):
        core.tick()
        for _, primary, _ in sent(core):
            if isinstance(primary, Ping):
                core.receive(datagram(2, Ack(seq=primary.seq)), B)
    assert core.stats.join_requests == requests == 6
    assert core.member(NodeId(2)).state is MemberState.ALIVE  # type: ignore[union-attr]


def test_push_pull_state_blob_merges_and_remote_dead_becomes_suspect() -> None:
    a = make_core(1, A)
    b = make_core(2, B)
    with_peers(a, (4, D))
    with_peers(b, (3, C), (4, D))
    b.receive(datagram(5, None, Dead(node_id=NodeId(4), incarnation=0, accuser=NodeId(5))), C)
    a.merge_push_pull(b.push_pull_state())
    view = {m.node_id: m.state for m in a.members()}
    assert view == {
        1: MemberState.ALIVE,
        2: MemberState.ALIVE,
        3: MemberState.ALIVE,
        4: MemberState.SUSPECT,
    }
    a.merge_push_pull(b"not cbor at all")
    assert a.stats.malformed_dropped == 1


def test_sync_tells_a_member_we_hold_dead_that_a_peer_sees_alive() -> None:
    core = make_core()
    with_peers(core, (2, B), (3, C))
    core.receive(datagram(2, None, Dead(node_id=NodeId(3), incarnation=0, accuser=NodeId(2))), B)
    sent(core)
    entry = Sync(want_reply=False, entries=())
    core.receive(datagram(4, entry, alive(4, D)), D)
    sent(core)
    from dlog.gossip.messages import STATE_ALIVE, SyncEntry

    core.receive(
        datagram(
            4,
            Sync(
                want_reply=False,
                entries=(
                    SyncEntry(
                        node_id=NodeId(3), incarnation=0, state=STATE_ALIVE, address=C, metadata={}
                    ),
                ),
            ),
        ),
        D,
    )
    told = [(a, u) for a, _, u in sent(core) if a == C]
    assert told
    assert Dead(node_id=NodeId(3), incarnation=0, accuser=NodeId(1)) in told[0][1]


def test_datagram_from_a_member_held_dead_tells_it() -> None:
    core = make_core()
    with_peers(core, (2, B), (3, C))
    core.receive(datagram(2, None, Dead(node_id=NodeId(3), incarnation=0, accuser=NodeId(2))), B)
    sent(core)
    core.receive(datagram(3, Ping(seq=1, target=NodeId(1))), C)
    [(address, primary, updates)] = sent(core)
    assert address == C
    assert primary == Ack(seq=1)
    assert Dead(node_id=NodeId(3), incarnation=0, accuser=NodeId(1)) in updates


def test_leave_tells_every_live_member_and_stops_probing() -> None:
    core = make_core()
    with_peers(core, (2, B), (3, C))
    core.leave()
    out = sent(core)
    assert {a for a, _, _ in out} == {B, C}
    assert all(Left(node_id=NodeId(1), incarnation=0) in u for _, _, u in out)
    assert core.member(NodeId(1)).state is MemberState.LEFT  # type: ignore[union-attr]
    for _ in range(500):
        core.tick()
        assert not any(isinstance(p, Ping) for _, p, _ in sent(core))
    assert core.leave_complete
    # A node that left does not refute its own leave.
    core.receive(datagram(2, None, Left(node_id=NodeId(1), incarnation=0)), B)
    assert core.incarnation == 0


def test_restarted_node_outbids_its_previous_life() -> None:
    core = make_core()
    core.receive(
        datagram(
            2,
            Sync(want_reply=False, entries=()),
            alive(2, B),
            Dead(node_id=NodeId(1), incarnation=7, accuser=NodeId(2)),
        ),
        B,
    )
    assert core.incarnation == 8


def test_core_modules_do_no_io() -> None:
    import ast
    import pathlib
    import subprocess
    import sys

    import dlog.gossip

    package = pathlib.Path(dlog.gossip.__file__).parent
    for name in ("core", "messages", "events", "config", "lifeguard", "broadcast", "sim"):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (
                node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
            )
        }
        assert not imported & {"trio", "socket", "os", "time"}, (name, imported)
    probe = "import sys, dlog.gossip.core, dlog.gossip.sim; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "bad",
    [
        {"tick_ms": 0},
        {"probe_timeout_ms": 200},  # not shorter than the probe interval
        {"probe_timeout_ms": 10},  # less than two ticks
        {"indirect_checks": -1},
        {"max_datagram_size": 100},
        {"max_metadata_bytes": 1000},
        {"suspicion_mult": 0},
    ],
)
def test_config_is_validated(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        GossipConfig(**bad)
    assert GossipConfig().ticks(95) == 10
