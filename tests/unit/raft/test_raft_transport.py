"""Raft messages over dlog.net (dlog.raft.transport): batches, one-way, dropped when the
peer does not keep up."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from raft_helpers import entries, nid

from dlog.errors import ProtocolError
from dlog.net.client import ClientConfig, open_rpc_pool
from dlog.net.server import Route, RpcServer
from dlog.raft.messages import AnyMessage, AppendEntries, Entry, EntryType, Heartbeat
from dlog.raft.transport import (
    RAFT_BATCH,
    PeerSender,
    RaftBatchRequest,
    RaftBatchResponse,
    decode_batch,
    encode_batch,
)
from tests.unit.net.test_rpc_tcp import wait_until

H = {"cluster_id": "c", "term": 3, "from_id": nid(1), "from_dir": "d1", "to": nid(2)}


def appends(n: int, *, with_entries: bool = True) -> list[AnyMessage]:
    return [
        AppendEntries(
            **H,
            prev_index=i,
            prev_term=3,
            entries=tuple(entries(3, start=i + 1)) if with_entries else (),
            commit=i,
        )
        for i in range(n)
    ]


def test_batch_round_trip_keeps_every_message_and_its_payload() -> None:
    msgs = [*appends(3), Heartbeat(**H, commit=2, context=b"ctx"), *appends(2, with_entries=False)]
    req = encode_batch(msgs, "127.0.0.1:1")
    assert req.sender_address == "127.0.0.1:1"
    assert decode_batch(req) == msgs


@pytest.mark.parametrize(
    "req",
    [
        RaftBatchRequest(messages=[[0]], sizes=[]),
        RaftBatchRequest(messages=[], sizes=[-1]),
        RaftBatchRequest(messages=[[0]], sizes=[5], payload=b"abc"),
    ],
)
def test_malformed_batch_is_a_protocol_error(req: RaftBatchRequest) -> None:
    with pytest.raises(ProtocolError):
        decode_batch(req)


async def test_sender_delivers_batches_one_way_in_order() -> None:
    got: list[AnyMessage] = []
    all_in = trio.Event()
    msgs = appends(50)

    async def on_batch(req: RaftBatchRequest) -> RaftBatchResponse:
        got.extend(decode_batch(req))
        if len(got) >= len(msgs):
            all_in.set()
        return RaftBatchResponse()

    server = RpcServer({RAFT_BATCH: Route(on_batch, inline=True)}, name="peer")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run, "127.0.0.1", 0)
        async with open_rpc_pool() as pool:
            sender = PeerSender(nid(2), pool, max_queue=1000, max_batch_bytes=1000, timeout_s=5)
            nursery.start_soon(sender.run)
            for m in msgs:
                sender.send(m, f"127.0.0.1:{port}")
            with trio.fail_after(10):
                await all_in.wait()
        nursery.cancel_scope.cancel()
    assert got == msgs
    assert sender.stats.sent_messages == 50
    assert 1 < sender.stats.sent_batches < 50  # several messages per batch
    assert server.stats.oneway_requests == sender.stats.sent_batches
    assert server.stats.requests == server.stats.oneway_requests  # nothing was answered


async def test_sender_drops_instead_of_blocking_when_the_peer_does_not_read() -> None:
    # A peer that accepts and never reads: the socket buffers fill, then the
    # connection's small outgoing buffer; from then on batches are dropped.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def accept_and_ignore(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    big = AppendEntries(
        **H,
        prev_index=0,
        prev_term=0,
        entries=(Entry(1, 3, EntryType.NORMAL, b"x" * 60_000),),
        commit=0,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, accept_and_ignore, listeners)
        async with open_rpc_pool(ClientConfig(max_outbox_bytes=200_000)) as pool:
            sender = PeerSender(nid(2), pool, max_queue=10, max_batch_bytes=1, timeout_s=5)
            nursery.start_soon(sender.run)
            address = f"127.0.0.1:{port}"
            with trio.fail_after(10):
                while sender.stats.failed_batches == 0:
                    sender.send(big, address)  # never blocks
                    await trio.lowlevel.checkpoint()
                await wait_until(lambda: sender.queued == 0)
                # The buffer is full: each batch from now on is dropped by the sender
                # task (one message per batch here), which is not stuck.
                failed, sent = sender.stats.failed_batches, sender.stats.sent_batches
                for _ in range(5):
                    sender.send(big, address)
                await wait_until(lambda: sender.queued == 0)
        assert sender.stats.failed_batches == failed + 5
        assert sender.stats.sent_batches == sent > 0
        nursery.cancel_scope.cancel()
