"""Raft messages over dlog.net: batched, pipelined, one-way.

Raft's messages are one-way (an answer is just another message), so a node sends
each peer batches of messages as one-way ``raft_batch`` requests
(:meth:`dlog.net.client.RpcConnection.send_oneway`): the receiver answers nothing, so
a lone proposal costs six frames on the wire (an append to each follower, an answer
from each, then a commit-only append to each that asks for no answer), not twelve.

One batch carries many messages: their CBOR-ready headers in the body, and their raw
parts (entries, snapshot chunks) concatenated as the frame's payload, so entries never
pass through cbor2.

The receiving server handles ``raft_batch`` *inline* (stepping the core never blocks),
so messages from one peer are stepped in the order they were sent.

:class:`PeerSender` owns the sending side for one peer: a bounded queue the driver
fills, and a task that drains it into batches written to the peer's pooled connection.
Raft tolerates lost messages, so a message that cannot be delivered (peer down,
connection lost, queue full, or the connection's bounded outgoing buffer full because
the peer reads slower than we write) is dropped and counted; heartbeats and retries
repair the gap.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from dlog.errors import DlogError, NetworkError, ProtocolError
from dlog.net.client import RpcPool
from dlog.net.messages import Message, payload_bytes, register
from dlog.raft.codec import message_from_wire, message_to_wire
from dlog.raft.messages import ENTRY_OVERHEAD, AnyMessage
from dlog.types import NodeId

log = logging.getLogger(__name__)

RAFT_BATCH = "raft_batch"


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftBatchRequest(Message):
    #: One header list per message (see :func:`dlog.raft.codec.message_to_wire`).
    messages: list[Any] = field(default_factory=list)
    #: Bytes of the payload belonging to each message, in order.
    sizes: list[int] = field(default_factory=list)
    #: Where the sender can be reached: how a node not yet in any configuration it
    #: knows of (a new learner, empty log) learns where to answer the leader.
    sender_address: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftBatchResponse(Message):
    """What a receiver's handler returns; never sent, since batches go one-way."""


register(RAFT_BATCH, RaftBatchRequest, RaftBatchResponse)


def encode_batch(msgs: list[AnyMessage], sender_address: str = "") -> RaftBatchRequest:
    heads: list[Any] = []
    sizes: list[int] = []
    parts: list[bytes] = []
    for m in msgs:
        head, payload = message_to_wire(m)
        heads.append(head)
        sizes.append(len(payload))
        if payload:
            parts.append(payload)
    return RaftBatchRequest(
        messages=heads, sizes=sizes, payload=parts, sender_address=sender_address
    )


def decode_batch(req: RaftBatchRequest) -> list[AnyMessage]:
    """The messages of a batch; ProtocolError if it is malformed."""
    heads, sizes = req.messages, req.sizes
    if len(heads) != len(sizes) or any(type(s) is not int or s < 0 for s in sizes):
        raise ProtocolError("raft batch: one payload size per message expected")
    payload = memoryview(payload_bytes(req.payload))
    if sum(sizes) != len(payload):
        raise ProtocolError("raft batch: payload sizes do not add up")
    out: list[AnyMessage] = []
    pos = 0
    for head, size in zip(heads, sizes, strict=True):
        out.append(message_from_wire(head, payload[pos : pos + size]))
        pos += size
    return out


@dataclass(slots=True)
class SenderStats:
    sent_messages: int = 0
    sent_batches: int = 0
    dropped_messages: int = 0
    failed_batches: int = 0


class PeerSender:
    """Sends one peer's Raft messages. Run :meth:`run` in the driver's nursery."""

    def __init__(
        self,
        peer: NodeId,
        pool: RpcPool,
        *,
        max_queue: int,
        max_batch_bytes: int,
        timeout_s: float,
        own_address: str = "",
    ) -> None:
        self.peer = peer
        self.own_address = own_address
        self.address: str | None = None
        self._pool = pool
        self._queue: collections.deque[AnyMessage] = collections.deque()
        self._max_queue = max_queue
        self._max_batch_bytes = max_batch_bytes
        self._timeout_s = timeout_s
        self._wake = trio.Event()
        self.stats = SenderStats()

    @property
    def queued(self) -> int:
        """Messages waiting to be sent."""
        return len(self._queue)

    def send(self, msg: AnyMessage, address: str | None) -> None:
        """Queue ``msg`` (never blocks; drops it when the queue is full)."""
        if address is not None:
            self.address = address
        if len(self._queue) >= self._max_queue:
            self.stats.dropped_messages += 1
            return
        self._queue.append(msg)
        self._wake.set()

    def _take_batch(self) -> list[AnyMessage]:
        batch: list[AnyMessage] = []
        size = 0
        queue = self._queue
        while queue and (not batch or size < self._max_batch_bytes):
            m = queue.popleft()
            batch.append(m)
            size += 64 + _payload_size(m)
        return batch

    async def run(self) -> None:
        """Drain the queue forever (until cancelled)."""
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            batch = self._take_batch()
            address = self.address
            if address is None:
                self.stats.dropped_messages += len(batch)
                continue
            await self._send_batch(address, batch)

    async def _send_batch(self, address: str, batch: list[AnyMessage]) -> None:
        try:
            conn = await self._pool.connection(
                address, deadline=trio.current_time() + self._timeout_s
            )
            if not conn.has_room:
                # The peer reads slower than we write (or not at all): drop rather
                # than queue without bound or wait; Raft sends again what matters.
                raise NetworkError(f"send buffer to {address} is full", address=address)
            await conn.send_oneway(encode_batch(batch, self.own_address))
        except DlogError as exc:
            self.stats.failed_batches += 1
            self.stats.dropped_messages += len(batch)
            log.debug("cannot send to node %d (%s): %s", self.peer, address, exc)
            return
        self.stats.sent_batches += 1
        self.stats.sent_messages += len(batch)


def _payload_size(m: AnyMessage) -> int:
    entries = getattr(m, "entries", None)
    if entries:
        return sum([len(e.data) for e in entries]) + ENTRY_OVERHEAD * len(entries)
    data = getattr(m, "data", None)
    return len(data) if isinstance(data, bytes) else 0
