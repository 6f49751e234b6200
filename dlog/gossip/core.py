"""SWIM membership with Lifeguard, as a sans-I/O state machine.

The core does no I/O and reads no clock: the driver calls :meth:`GossipCore.tick`
every ``config.tick_ms``, hands it every datagram with :meth:`GossipCore.receive`,
sends what :meth:`GossipCore.datagrams_to_send` returns and forwards what
:meth:`GossipCore.events` returns. Randomness comes from the injected
``random.Random``, so a seeded simulation replays exactly.

Rules (SWIM §4-5, Lifeguard, memberlist's state.go):

1. Failure detection. Each protocol period the node pings the next member of a
   shuffled round-robin list of live members. No ack within the probe timeout ->
   ping-req through ``indirect_checks`` random live members, who ping the target and
   relay its ack, or send a nack if it does not answer. No ack by the end of the
   period -> the target is suspect. Lifeguard local health: a successful probe
   lowers the score by one; a failed one raises it by the number of nacks that did
   not arrive (by one without intermediaries); refuting a suspicion raises it by
   one. Probe interval and probe timeout are scaled by ``score + 1``.
2. Suspicion. A suspect is declared dead when its :class:`Suspicion` timer runs out.
   Every node that hears a suspicion starts its own timer; each distinct accuser
   shortens it. Pinging a suspect carries the suspicion (Lifeguard's buddy system)
   so the target learns of it and can refute at once.
3. Incarnations order everything said about a member: ``alive(i)`` overrides
   ``suspect/dead(j)`` only when ``i > j``; ``suspect(i)`` overrides ``alive(j)``
   when ``i >= j``; ``dead(i)``/``left(i)`` override alive and suspect when
   ``i >= j``. Only a member itself raises its incarnation: to refute a suspicion,
   death or stale alive about it, and to publish new metadata.
4. Dissemination. Every change accepted is queued for piggybacking (one update per
   member, newest wins) and sent on every outgoing datagram as space allows, and
   every gossip interval to a few random live (and recently dead) members, each
   update at most ``retransmit_mult * ceil(log10(n + 1))`` times.
5. Push-pull. A sync datagram carries member entries; ``want_reply`` asks for the
   receiver's full state in return. Merging treats a remote "dead" as "suspect"
   (the member gets a chance to refute) and a remote "left" as left. When the
   remote lists as alive a member this node holds dead at the same incarnation,
   this node tells that member directly, so a member on the far side of a healed
   partition refutes at once and replies to the teller.
6. Joining: until some other member is live, a join sync goes to every seed each
   ``join_retry_interval``, forever. Afterwards, every ``push_pull_interval`` a full
   sync with one random live member, and every ``reconnect_interval`` a sync with one
   random dead member or a seed not currently live, so partitions heal. With
   ``stream_push_pull`` those two go to the driver, which exchanges full state over
   TCP (:meth:`GossipCore.push_pull_state`, :meth:`GossipCore.merge_push_pull`).
7. Dead and left members are kept (for refutation, reconnects and the view) for
   ``dead_retention`` and then forgotten.
8. Leaving: the node marks itself left, tells every live member directly and keeps
   gossiping the leave; it no longer probes, joins or refutes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import cbor2

from dlog.gossip.broadcast import BroadcastQueue
from dlog.gossip.config import GossipConfig
from dlog.gossip.events import (
    Member,
    MemberAlive,
    MemberDead,
    MemberEvent,
    MemberJoined,
    MemberLeft,
    MemberState,
    MemberSuspect,
    MemberUpdated,
)
from dlog.gossip.lifeguard import Awareness, Suspicion
from dlog.gossip.messages import (
    STATE_ALIVE,
    STATE_DEAD,
    STATE_LEFT,
    STATE_SUSPECT,
    Ack,
    Address,
    Alive,
    Dead,
    Left,
    MalformedDatagram,
    Nack,
    Ping,
    PingReq,
    Primary,
    Suspect,
    Sync,
    SyncEntry,
    Update,
    assemble_datagram,
    datagram_overhead,
    datagram_prefix,
    decode_datagram,
    decode_state,
    encode_entry,
    encode_message,
    encode_state,
    sync_datagram,
    sync_overhead,
)
from dlog.types import NodeId

_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)
_STATE_TO_WIRE = {
    MemberState.ALIVE: STATE_ALIVE,
    MemberState.SUSPECT: STATE_SUSPECT,
    MemberState.DEAD: STATE_DEAD,
    MemberState.LEFT: STATE_LEFT,
}
_SEQ_MODULUS = 2**32
# Room for the CBOR header of the update array (up to 65535 updates).
_UPDATE_HEADER_RESERVE = 3


@dataclass(slots=True)
class GossipStats:
    """Counters; read them, never write them."""

    datagrams_sent: int = 0
    bytes_sent: int = 0
    datagrams_received: int = 0
    bytes_received: int = 0
    #: Dropped: not a valid gossip datagram.
    malformed_dropped: int = 0
    #: Dropped: larger than ``max_datagram_size``.
    oversize_dropped: int = 0
    #: Pings meant for another node id (a restarted address); not answered.
    misdirected_pings: int = 0
    probes: int = 0
    indirect_probes: int = 0
    probe_failures: int = 0
    suspicions_raised: int = 0
    deaths_declared: int = 0
    refutations: int = 0
    join_requests: int = 0
    syncs_sent: int = 0


def validate_metadata(metadata: Mapping[str, str], max_bytes: int) -> dict[str, str]:
    """A copy of ``metadata`` if it is a small str -> str map; ``ValueError`` otherwise."""
    copy = dict(metadata)
    for key, value in copy.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("metadata keys and values must be str")
        if len(key) > 256 or len(value) > 256:
            raise ValueError("metadata keys and values are limited to 256 characters")
    if len(copy) > 32:
        raise ValueError("metadata is limited to 32 items")
    if len(cbor2.dumps(copy)) > max_bytes:
        raise ValueError(f"metadata encodes to more than {max_bytes} bytes")
    return copy


class _Record:
    __slots__ = ("address", "incarnation", "metadata", "node_id", "state", "state_tick")

    def __init__(
        self,
        node_id: NodeId,
        address: Address,
        incarnation: int,
        metadata: Mapping[str, str],
        state: MemberState,
        state_tick: int,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.incarnation = incarnation
        self.metadata = metadata
        self.state = state
        self.state_tick = state_tick

    def snapshot(self) -> Member:
        return Member(
            node_id=self.node_id,
            address=self.address,
            state=self.state,
            incarnation=self.incarnation,
            metadata=self.metadata,
        )

    def alive_message(self) -> Alive:
        return Alive(
            node_id=self.node_id,
            incarnation=self.incarnation,
            address=self.address,
            metadata=self.metadata,
        )

    def entry(self) -> SyncEntry:
        return SyncEntry(
            node_id=self.node_id,
            incarnation=self.incarnation,
            state=_STATE_TO_WIRE[self.state],
            address=self.address,
            metadata=self.metadata,
        )


class _Probe:
    __slots__ = (
        "ack_deadline",
        "acked",
        "expected_nacks",
        "indirect_sent",
        "nacks",
        "period_end",
        "seq",
        "target",
    )

    def __init__(self, seq: int, target: NodeId, ack_deadline: int, period_end: int) -> None:
        self.seq = seq
        self.target = target
        self.ack_deadline = ack_deadline
        self.period_end = period_end
        self.acked = False
        self.indirect_sent = False
        self.expected_nacks = 0
        self.nacks = 0


class _Relay:
    """A ping sent on behalf of a ping-req: relay the ack, or nack at the deadline."""

    __slots__ = ("deadline", "nack", "requester", "seq")

    def __init__(self, requester: Address, seq: int, deadline: int, nack: bool) -> None:
        self.requester = requester
        self.seq = seq
        self.deadline = deadline
        self.nack = nack


def _frozen(metadata: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(metadata))


class GossipCore:
    """One node's SWIM membership state machine (see the module docstring)."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        address: Address,
        rng: random.Random,
        metadata: Mapping[str, str] | None = None,
        seeds: Iterable[Address] = (),
        config: GossipConfig | None = None,
        incarnation: int = 0,
        stream_push_pull: bool = False,
    ) -> None:
        self.config = cfg = config or GossipConfig()
        # Periodic and reconnect push-pulls go to the driver (push_pulls_to_start) for a
        # stream transport instead of out as UDP sync datagrams.
        self._stream_push_pull = stream_push_pull
        self._push_pull_targets: list[Address] = []
        self._rng = rng
        self._id = node_id
        self._seeds = [s for s in dict.fromkeys(seeds) if s != address]
        meta = _frozen(validate_metadata(metadata or {}, cfg.max_metadata_bytes))
        self._self = _Record(node_id, address, incarnation, meta, MemberState.ALIVE, 0)
        self._members: dict[NodeId, _Record] = {node_id: self._self}
        self._live_count = 1

        self._probe_interval = cfg.ticks(cfg.probe_interval_ms)
        self._probe_timeout = cfg.ticks(cfg.probe_timeout_ms)
        # An intermediary nacks a little before the requester's period ends, so the
        # nack arrives in time to count as "the target is down, not me".
        self._nack_timeout = max(1, self._probe_timeout * 4 // 5)
        self._gossip_interval = cfg.ticks(cfg.gossip_interval_ms)
        self._gossip_to_the_dead = cfg.ticks(cfg.gossip_to_the_dead_ms)
        self._dead_retention = cfg.ticks(cfg.dead_retention_ms)
        self._join_retry = cfg.ticks(cfg.join_retry_interval_ms)
        self._push_pull_interval = cfg.ticks(cfg.push_pull_interval_ms)
        self._reconnect_interval = cfg.ticks(cfg.reconnect_interval_ms)
        self._reap_interval = self._probe_interval * 5

        self._awareness = Awareness(cfg.awareness_max_multiplier)
        self._broadcasts = BroadcastQueue()
        self._suspicions: dict[NodeId, Suspicion] = {}
        self._probe: _Probe | None = None
        self._probe_order: list[NodeId] = []
        self._probe_index = 0
        self._relays: dict[int, _Relay] = {}
        self._seq = rng.randrange(_SEQ_MODULUS)
        self._outbox: list[tuple[Address, bytes]] = []
        self._events: list[MemberEvent] = []
        # Newer news for the sender of the datagram being handled, who spread stale news.
        self._corrections: dict[NodeId, bytes] = {}
        self._corrected: dict[Address, int] = {}
        self._left = False
        self._prefix_incarnation = -1
        self._prefix_bytes = b""

        self._now = 0
        # Timers start spread out so nodes started together do not probe in step.
        self._next_probe = 1 + rng.randrange(self._probe_interval)
        self._next_gossip = 1 + rng.randrange(self._gossip_interval)
        self._next_join = 1
        self._next_push_pull = self._push_pull_interval + rng.randrange(self._push_pull_interval)
        self._next_reconnect = self._reconnect_interval + rng.randrange(self._reconnect_interval)
        self._next_reap = self._reap_interval
        self._next_due = 1
        self.stats = GossipStats()

    # -- what the driver and the rest of the node read ---------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._id

    @property
    def address(self) -> Address:
        return self._self.address

    @property
    def incarnation(self) -> int:
        return self._self.incarnation

    @property
    def now(self) -> int:
        """Ticks since this core was created."""
        return self._now

    @property
    def next_due(self) -> int:
        """The tick at which a timer is next due. Ticks before it do nothing but count,
        so a driver may sleep until then (and tick the skipped ticks on waking);
        anything handed to the core meanwhile may move it earlier."""
        return self._next_due

    @property
    def health_score(self) -> int:
        """Lifeguard local-health score: 0 is healthy."""
        return self._awareness.score

    @property
    def has_left(self) -> bool:
        return self._left

    @property
    def leave_complete(self) -> bool:
        """After :meth:`leave`: the leave has been sent as often as gossip sends updates."""
        return self._left and self._broadcasts.transmits(self._id) is None

    def members(self) -> list[Member]:
        """Every member this node knows, itself included, by node id."""
        return [self._members[node_id].snapshot() for node_id in sorted(self._members)]

    def member(self, node_id: NodeId) -> Member | None:
        record = self._members.get(node_id)
        return None if record is None else record.snapshot()

    def live_members(self) -> list[Member]:
        return [m for m in self.members() if m.state in _LIVE]

    @property
    def has_output(self) -> bool:
        """Whether datagrams, events or push-pulls wait to be taken."""
        return bool(self._outbox or self._events or self._push_pull_targets)

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        """Datagrams produced since the last call, in order."""
        out, self._outbox = self._outbox, []
        return out

    def push_pulls_to_start(self) -> list[Address]:
        """With ``stream_push_pull``: peers to exchange full state with now (the driver
        sends :meth:`push_pull_state` and merges the answer with :meth:`merge_push_pull`).
        """
        out, self._push_pull_targets = self._push_pull_targets, []
        return out

    def events(self) -> list[MemberEvent]:
        """Membership events produced since the last call, in order."""
        out, self._events = self._events, []
        return out

    # -- inputs ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance time by one tick (``config.tick_ms``)."""
        self._now += 1
        if self._now >= self._next_due:
            self._run_timers()

    def receive(self, datagram: bytes, from_addr: Address) -> None:
        """Handle one datagram. Malformed or oversize ones are counted and dropped."""
        self.stats.datagrams_received += 1
        self.stats.bytes_received += len(datagram)
        if len(datagram) > self.config.max_datagram_size:
            self.stats.oversize_dropped += 1
            return
        try:
            decoded = decode_datagram(datagram)
        except MalformedDatagram:
            self.stats.malformed_dropped += 1
            return
        self._corrections = {}
        refutations = self.stats.refutations
        for update in decoded.updates:
            self._apply(update)
        self._check_sender(decoded.sender, decoded.incarnation)
        if self.stats.refutations != refutations:
            # Whoever told us we are suspect or dead hears the refutation first.
            self._corrections[self._id] = encode_message(self._self.alive_message())
        if self._corrections and self.stats.refutations == refutations:
            # Plain corrections of stale news: at most one batch per peer per gossip
            # interval, so a flapping member's stale rumours cannot start a storm.
            last = self._corrected.get(from_addr)
            if last is not None and self._now - last < self._gossip_interval:
                self._corrections = {}
            else:
                self._corrected[from_addr] = self._now
        primary = decoded.primary
        if primary is not None:
            self._handle(primary, from_addr)
        if self._corrections:
            self._send(from_addr, None, first=self._take_corrections())

    def _check_sender(self, sender: NodeId, incarnation: int) -> None:
        """The sender speaks at ``incarnation``: tell it if we hold it suspect or dead."""
        record = self._members.get(sender)
        if record is None or record is self._self or record.state is MemberState.ALIVE:
            return
        message: Update
        if record.state is MemberState.SUSPECT:
            if incarnation < record.incarnation:
                return
            message = Suspect(node_id=sender, incarnation=record.incarnation, accuser=self._id)
        elif record.state is MemberState.DEAD:
            # It talks, so it lives: it refutes once it hears (a healed partition).
            message = Dead(node_id=sender, incarnation=record.incarnation, accuser=self._id)
        elif incarnation != record.incarnation:
            # A new life of a node that left (a leaving node still gossips at its own).
            message = Left(node_id=sender, incarnation=record.incarnation)
        else:
            return
        self._corrections.setdefault(sender, encode_message(message))

    def update_metadata(self, metadata: Mapping[str, str]) -> None:
        """Publish new metadata (with a new incarnation)."""
        meta = validate_metadata(metadata, self.config.max_metadata_bytes)
        if self._left:
            raise ValueError("a node that left cannot change its metadata")
        self._self.metadata = _frozen(meta)
        self._self.incarnation += 1
        self._broadcast(self._self.alive_message())

    def leave(self) -> None:
        """Leave gracefully: tell every live member now and keep gossiping the leave."""
        if self._left:
            return
        self._left = True
        self._set_state(self._self, MemberState.LEFT)
        self._suspicions.clear()
        self._probe = None
        payload = encode_message(Left(node_id=self._id, incarnation=self._self.incarnation))
        self._broadcasts.queue(self._id, payload)
        for record in list(self._members.values()):
            if record is not self._self and record.state in _LIVE:
                self._send(record.address, None, first=[payload])

    def push_pull_state(self) -> bytes:
        """This node's full membership state, for a push-pull over a stream transport."""
        return encode_state(self._full_state())

    def merge_push_pull(self, blob: bytes) -> None:
        """Merge a peer's :meth:`push_pull_state`; a malformed blob is counted, dropped."""
        try:
            entries = decode_state(blob)
        except MalformedDatagram:
            self.stats.malformed_dropped += 1
            return
        self._merge(entries)

    # -- timers --------------------------------------------------------------------------

    def _schedule(self, tick: int) -> None:
        if tick < self._next_due:
            self._next_due = tick

    def _run_timers(self) -> None:
        now = self._now
        probe = self._probe
        if probe is not None:
            if not probe.acked and not probe.indirect_sent and now >= probe.ack_deadline:
                self._probe_indirect(probe)
            if now >= probe.period_end:
                self._finish_probe(probe)
                self._start_probe()
        elif now >= self._next_probe:
            self._start_probe()

        if self._relays:
            for seq, relay in list(self._relays.items()):
                if now >= relay.deadline:
                    del self._relays[seq]
                    if relay.nack:
                        self._send(relay.requester, encode_message(Nack(seq=relay.seq)))

        if self._suspicions:
            for node_id, suspicion in list(self._suspicions.items()):
                if now >= suspicion.deadline:
                    self._suspicion_expired(node_id)

        if now >= self._next_gossip:
            self._next_gossip = now + self._gossip_interval
            self._gossip()
        if now >= self._next_join:
            self._next_join = now + self._join_retry
            if not self._left and self._live_count == 1:
                self._join_seeds()
        if now >= self._next_push_pull:
            self._next_push_pull = now + self._push_pull_interval
            self._push_pull()
        if now >= self._next_reconnect:
            self._next_reconnect = now + self._reconnect_interval
            self._reconnect()
        if now >= self._next_reap:
            self._next_reap = now + self._reap_interval
            self._reap()

        due = min(
            self._next_gossip,
            self._next_join,
            self._next_push_pull,
            self._next_reconnect,
            self._next_reap,
        )
        probe = self._probe
        if probe is None:
            due = min(due, self._next_probe)
        else:
            due = min(due, probe.period_end)
            if not probe.acked and not probe.indirect_sent:
                due = min(due, probe.ack_deadline)
        for relay in self._relays.values():
            due = min(due, relay.deadline)
        for suspicion in self._suspicions.values():
            due = min(due, suspicion.deadline)
        self._next_due = max(due, now + 1)

    # -- probing ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % _SEQ_MODULUS
        return self._seq

    def _probe_target(self) -> _Record | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                node_id = self._probe_order[self._probe_index]
                self._probe_index += 1
                record = self._members.get(node_id)
                if record is not None and record is not self._self and record.state in _LIVE:
                    return record
            self._probe_order = [
                r.node_id
                for r in self._members.values()
                if r is not self._self and r.state in _LIVE
            ]
            self._rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _start_probe(self) -> None:
        self._probe = None
        interval = self._awareness.scale(self._probe_interval)
        self._next_probe = self._now + interval
        if self._left:
            return
        target = self._probe_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(
            seq,
            target.node_id,
            ack_deadline=self._now + self._awareness.scale(self._probe_timeout),
            period_end=self._now + interval,
        )
        self.stats.probes += 1
        first = []
        if target.state is MemberState.SUSPECT:
            # Lifeguard's buddy system: tell the suspect, so it can refute right away.
            first.append(
                encode_message(
                    Suspect(
                        node_id=target.node_id, incarnation=target.incarnation, accuser=self._id
                    )
                )
            )
        self._send(target.address, encode_message(Ping(seq=seq, target=target.node_id)), first)

    def _probe_indirect(self, probe: _Probe) -> None:
        probe.indirect_sent = True
        target = self._members.get(probe.target)
        if target is None or target.state not in _LIVE:
            return
        helpers = [
            r
            for r in self._members.values()
            if r.state is MemberState.ALIVE and r is not self._self and r is not target
        ]
        helpers = self._rng.sample(helpers, min(self.config.indirect_checks, len(helpers)))
        request = encode_message(
            PingReq(seq=probe.seq, target=target.node_id, target_address=target.address, nack=True)
        )
        for helper in helpers:
            self._send(helper.address, request)
        probe.expected_nacks = len(helpers)
        self.stats.indirect_probes += len(helpers)

    def _finish_probe(self, probe: _Probe) -> None:
        if probe.acked:
            return
        self.stats.probe_failures += 1
        if probe.expected_nacks:
            self._awareness.apply(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._awareness.apply(1)
        target = self._members.get(probe.target)
        if target is not None and target.state in _LIVE:
            self._on_suspect(
                Suspect(node_id=target.node_id, incarnation=target.incarnation, accuser=self._id)
            )

    # -- handling what arrives -------------------------------------------------------------

    def _handle(self, primary: Primary, from_addr: Address) -> None:
        match primary:
            case Ping(seq=seq, target=target):
                if target != self._id:
                    self.stats.misdirected_pings += 1
                    return
                self._send(from_addr, encode_message(Ack(seq=seq)), self._take_corrections())
            case Ack(seq=seq):
                probe = self._probe
                if probe is not None and probe.seq == seq:
                    if not probe.acked:
                        probe.acked = True
                        self._awareness.apply(-1)
                    return
                relay = self._relays.pop(seq, None)
                if relay is not None:
                    self._send(relay.requester, encode_message(Ack(seq=relay.seq)))
            case Nack(seq=seq):
                probe = self._probe
                if probe is not None and probe.seq == seq:
                    probe.nacks += 1
            case PingReq(seq=seq, target=target, target_address=address, nack=nack):
                if target == self._id:
                    self._send(from_addr, encode_message(Ack(seq=seq)))
                    return
                relay_seq = self._next_seq()
                relay = _Relay(from_addr, seq, self._now + self._nack_timeout, nack)
                self._relays[relay_seq] = relay
                self._schedule(relay.deadline)
                self._send(address, encode_message(Ping(seq=relay_seq, target=target)))
            case Sync(want_reply=want_reply, entries=entries):
                self._merge(entries)
                if want_reply:
                    self._send_state(from_addr, want_reply=False)

    def _apply(self, update: Update) -> None:
        match update:
            case Alive():
                self._on_alive(update)
            case Suspect():
                self._on_suspect(update)
            case Dead():
                self._on_dead(update)
            case Left():
                self._on_left(update)

    def _on_alive(self, msg: Alive) -> None:
        if msg.node_id == self._id:
            me = self._self
            stale = msg.incarnation == me.incarnation and (
                msg.address != me.address or dict(msg.metadata) != dict(me.metadata)
            )
            if not self._left and (msg.incarnation > me.incarnation or stale):
                # Someone repeats what a previous life of this node said: outbid it.
                self._refute(msg.incarnation)
            return
        record = self._members.get(msg.node_id)
        if record is None:
            record = _Record(
                msg.node_id,
                msg.address,
                msg.incarnation,
                _frozen(msg.metadata),
                MemberState.ALIVE,
                self._now,
            )
            self._members[msg.node_id] = record
            self._live_count += 1
            self._add_to_probe_order(msg.node_id)
            self._events.append(MemberJoined(member=record.snapshot()))
            self._broadcast(msg)
            return
        if msg.incarnation <= record.incarnation:
            return
        changed = record.address != msg.address or dict(record.metadata) != dict(msg.metadata)
        record.incarnation = msg.incarnation
        record.address = msg.address
        if changed:
            record.metadata = _frozen(msg.metadata)
        self._suspicions.pop(msg.node_id, None)
        previous = record.state
        if previous is MemberState.ALIVE:
            if changed:
                self._events.append(MemberUpdated(member=record.snapshot()))
        elif previous is MemberState.SUSPECT:
            self._set_state(record, MemberState.ALIVE)
            self._events.append(MemberAlive(member=record.snapshot()))
        else:
            self._set_state(record, MemberState.ALIVE)
            self._add_to_probe_order(msg.node_id)
            self._events.append(MemberJoined(member=record.snapshot()))
        self._broadcast(msg)

    def _on_suspect(self, msg: Suspect) -> None:
        if msg.node_id == self._id:
            if not self._left:
                if msg.incarnation >= self._self.incarnation:
                    self._awareness.apply(1)
                    self._refute(msg.incarnation)
                else:
                    self._correct(self._self)
            return
        record = self._members.get(msg.node_id)
        if record is None:
            return
        if msg.incarnation < record.incarnation:
            self._correct(record)
            return
        if record.state is MemberState.SUSPECT:
            suspicion = self._suspicions.get(msg.node_id)
            if suspicion is not None and suspicion.confirm(msg.accuser):
                self._schedule(suspicion.deadline)
                self._broadcast(msg)
            return
        if record.state is not MemberState.ALIVE:
            return
        record.incarnation = msg.incarnation
        self._set_state(record, MemberState.SUSPECT)
        n = self._live_count
        k = self.config.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        min_ticks = math.ceil(
            self.config.suspicion_mult * max(1.0, math.log10(max(1, n))) * self._probe_interval
        )
        suspicion = Suspicion(
            start=self._now,
            accuser=msg.accuser,
            k=k,
            min_ticks=min_ticks,
            max_ticks=self.config.suspicion_max_timeout_mult * min_ticks,
        )
        self._suspicions[msg.node_id] = suspicion
        self._schedule(suspicion.deadline)
        if msg.accuser != self._id:
            # Probe it next: our ping carries the suspicion to it (buddy system) and its
            # ack carries back a refutation we may have missed.
            self._probe_order.insert(self._probe_index, msg.node_id)
        self.stats.suspicions_raised += 1
        self._events.append(MemberSuspect(member=record.snapshot()))
        self._broadcast(msg)

    def _suspicion_expired(self, node_id: NodeId) -> None:
        del self._suspicions[node_id]
        record = self._members.get(node_id)
        if record is None or record.state is not MemberState.SUSPECT:
            return
        self.stats.deaths_declared += 1
        self._on_dead(Dead(node_id=node_id, incarnation=record.incarnation, accuser=self._id))

    def _on_dead(self, msg: Dead) -> None:
        if msg.node_id == self._id:
            if not self._left:
                if msg.incarnation >= self._self.incarnation:
                    self._refute(msg.incarnation)
                else:
                    self._correct(self._self)
            return
        record = self._members.get(msg.node_id)
        if record is None:
            return
        if msg.incarnation < record.incarnation:
            self._correct(record)
            return
        if record.state not in _LIVE:
            return
        record.incarnation = msg.incarnation
        self._suspicions.pop(msg.node_id, None)
        self._set_state(record, MemberState.DEAD)
        self._events.append(MemberDead(member=record.snapshot()))
        self._broadcast(msg)

    def _on_left(self, msg: Left) -> None:
        if msg.node_id == self._id:
            if not self._left and msg.incarnation >= self._self.incarnation:
                self._refute(msg.incarnation)
            return
        record = self._members.get(msg.node_id)
        if record is None or msg.incarnation < record.incarnation:
            return
        if record.state is MemberState.LEFT:
            return
        record.incarnation = msg.incarnation
        self._suspicions.pop(msg.node_id, None)
        self._set_state(record, MemberState.LEFT)
        self._events.append(MemberLeft(member=record.snapshot()))
        self._broadcast(msg)

    def _refute(self, accused_incarnation: int) -> None:
        me = self._self
        me.incarnation = max(me.incarnation, accused_incarnation) + 1
        self.stats.refutations += 1
        self._broadcast(me.alive_message())

    # -- push-pull and joining -------------------------------------------------------------

    def _full_state(self) -> list[SyncEntry]:
        entries = [self._self.entry()]
        entries.extend(r.entry() for r in self._members.values() if r is not self._self)
        return entries

    def _merge(self, entries: Iterable[SyncEntry]) -> None:
        for entry in entries:
            if entry.state == STATE_ALIVE:
                record = self._members.get(entry.node_id)
                if (
                    record is not None
                    and record is not self._self
                    and record.state is MemberState.DEAD
                    and entry.incarnation <= record.incarnation
                ):
                    # The peer still sees it alive. If it really is, it refutes now.
                    self._send(
                        entry.address,
                        None,
                        first=[
                            encode_message(
                                Dead(
                                    node_id=record.node_id,
                                    incarnation=record.incarnation,
                                    accuser=self._id,
                                )
                            )
                        ],
                    )
                self._on_alive(
                    Alive(
                        node_id=entry.node_id,
                        incarnation=entry.incarnation,
                        address=entry.address,
                        metadata=entry.metadata,
                    )
                )
            elif entry.state == STATE_LEFT:
                self._on_left(Left(node_id=entry.node_id, incarnation=entry.incarnation))
            else:
                # A remote "dead" only makes us suspect: the member may refute.
                self._on_suspect(
                    Suspect(node_id=entry.node_id, incarnation=entry.incarnation, accuser=self._id)
                )

    def _send_state(self, address: Address, *, want_reply: bool) -> None:
        budget = self.config.max_datagram_size - sync_overhead(self._prefix(), 65535)
        chunk: list[bytes] = []
        used = 0
        for entry in self._full_state():
            encoded = encode_entry(entry)
            if chunk and used + len(encoded) > budget:
                self._emit(address, sync_datagram(self._prefix(), want_reply, chunk))
                want_reply = False
                chunk, used = [], 0
            chunk.append(encoded)
            used += len(encoded)
        self._emit(address, sync_datagram(self._prefix(), want_reply, chunk))
        self.stats.syncs_sent += 1

    def _join_seeds(self) -> None:
        hello = [encode_entry(self._self.entry())]
        for seed in self._seeds:
            self._emit(seed, sync_datagram(self._prefix(), True, hello))
            self.stats.join_requests += 1

    def _push_pull(self) -> None:
        if self._left:
            return
        peers = [r for r in self._members.values() if r is not self._self and r.state in _LIVE]
        if not peers:
            return
        address = self._rng.choice(peers).address
        if self._stream_push_pull:
            self._push_pull_targets.append(address)
        else:
            self._send_state(address, want_reply=True)

    def _reconnect(self) -> None:
        if self._left or self._live_count == 1:
            return
        live = {r.address for r in self._members.values() if r.state in _LIVE}
        candidates = [r.address for r in self._members.values() if r.state is MemberState.DEAD]
        candidates.extend(seed for seed in self._seeds if seed not in live)
        if not candidates:
            return
        address = self._rng.choice(candidates)
        if self._stream_push_pull:
            self._push_pull_targets.append(address)
        else:
            hello = [encode_entry(self._self.entry())]
            self._emit(address, sync_datagram(self._prefix(), True, hello))
            self.stats.syncs_sent += 1

    def _reap(self) -> None:
        self._corrected = {
            a: t for a, t in self._corrected.items() if self._now - t < self._gossip_interval
        }
        horizon = self._now - self._dead_retention
        for node_id, record in list(self._members.items()):
            stale = record.state not in _LIVE and record.state_tick <= horizon
            if stale and record is not self._self:
                del self._members[node_id]

    # -- sending -------------------------------------------------------------------------

    def _retransmit_limit(self) -> int:
        return self.config.retransmit_mult * math.ceil(math.log10(self._live_count + 1))

    def _broadcast(self, msg: Update) -> None:
        self._broadcasts.queue(msg.node_id, encode_message(msg))

    def _gossip(self) -> None:
        if not self._broadcasts:
            return
        horizon = self._now - self._gossip_to_the_dead
        candidates = [
            r
            for r in self._members.values()
            if r is not self._self
            and (r.state in _LIVE or (r.state is MemberState.DEAD and r.state_tick >= horizon))
        ]
        for record in self._rng.sample(candidates, min(self.config.gossip_nodes, len(candidates))):
            self._send(record.address, None)

    def _send(self, address: Address, primary: bytes | None, first: Iterable[bytes] = ()) -> None:
        """Queue a datagram: ``primary`` (if any), ``first``, then as many updates as fit."""
        budget = (
            self.config.max_datagram_size
            - datagram_overhead(self._prefix(), primary, 0)
            - _UPDATE_HEADER_RESERVE
        )
        updates = []
        for update in first:
            if len(update) <= budget:
                updates.append(update)
                budget -= len(update)
        updates.extend(self._broadcasts.take(budget, self._retransmit_limit()))
        if primary is None and not updates:
            return
        self._emit(address, assemble_datagram(self._prefix(), primary, updates))

    def _prefix(self) -> bytes:
        me = self._self
        if self._prefix_incarnation != me.incarnation:
            self._prefix_bytes = datagram_prefix(self._id, me.incarnation)
            self._prefix_incarnation = me.incarnation
        return self._prefix_bytes

    def _take_corrections(self) -> list[bytes]:
        out = list(self._corrections.values())
        self._corrections = {}
        return out

    def _correct(self, record: _Record) -> None:
        """The sender spread older news about ``record``: answer with ours."""
        if record.state is MemberState.ALIVE:
            message: Update = record.alive_message()
        elif record.state is MemberState.DEAD:
            message = Dead(node_id=record.node_id, incarnation=record.incarnation, accuser=self._id)
        elif record.state is MemberState.LEFT:
            message = Left(node_id=record.node_id, incarnation=record.incarnation)
        else:
            return
        self._corrections[record.node_id] = encode_message(message)

    def _emit(self, address: Address, datagram: bytes) -> None:
        self._outbox.append((address, datagram))
        self.stats.datagrams_sent += 1
        self.stats.bytes_sent += len(datagram)

    # -- bookkeeping ---------------------------------------------------------------------

    def _set_state(self, record: _Record, state: MemberState) -> None:
        was_live = record.state in _LIVE
        is_live = state in _LIVE
        record.state = state
        record.state_tick = self._now
        self._live_count += int(is_live) - int(was_live)

    def _add_to_probe_order(self, node_id: NodeId) -> None:
        # A new member is probed in the current round, at a random place in what is left.
        position = self._rng.randint(self._probe_index, len(self._probe_order))
        self._probe_order.insert(position, node_id)
