"""One-way requests: handled like any other, answered with nothing."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dlog.errors import NetworkError, NotLeaderError
from dlog.net.client import ClientConfig, RpcConnection
from dlog.net.framing import encode_frame
from dlog.net.messages import EchoRequest, EchoResponse
from dlog.net.server import Deferred, Route, RpcServer
from tests.unit.net.rpc_fixtures import (
    FailRequest,
    Gates,
    RecordRequest,
    RecordResponse,
    WaitRequest,
    make_server,
)
from tests.unit.net.test_rpc_memory import connected, read_frames


async def test_oneway_request_is_handled_and_not_answered() -> None:
    gates = Gates()
    server = make_server(gates)
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        # A one-way request in a task of its own, then one inline, then a normal call:
        # the only frame that comes back is the normal call's answer.
        await client_side.send_all(encode_frame({"o": "test.wait", "b": {"gate": "g"}, "n": True}))
        await client_side.send_all(encode_frame({"o": "echo", "b": {"data": 1}, "n": True}))
        await trio.testing.wait_all_tasks_blocked()
        assert gates.entered == ["g"]
        gates.open("g")
        await trio.testing.wait_all_tasks_blocked()
        await client_side.send_all(encode_frame({"i": 9, "o": "echo", "b": {"data": 2}}))
        frames = await read_frames(client_side, 1)
        assert [f.header for f in frames] == [{"i": 9, "b": {"data": 2}}]
        assert server.stats.requests == 3
        assert server.stats.oneway_requests == 2
        assert server.stats.error_responses == 0
        assert server.in_flight == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["not_leader", "crash"])
async def test_oneway_errors_are_counted_not_sent_and_the_connection_lives(kind: str) -> None:
    server = make_server(Gates())
    async with connected(server) as conn:
        await conn.send_oneway(FailRequest(kind=kind))
        resp = await conn.call(EchoRequest(data="after"))
        assert isinstance(resp, EchoResponse) and resp.data == "after"
        assert server.stats.oneway_errors == 1
        assert server.stats.error_responses == 0
        assert server.stats.handler_crashes == (1 if kind == "crash" else 0)
        assert server.in_flight == 0


async def test_oneway_requests_keep_their_order_with_calls() -> None:
    seen: list[int] = []

    async def record(req: RecordRequest) -> RecordResponse:
        seen.append(req.n)
        return RecordResponse()

    server = RpcServer({"test.record": Route(record, inline=True)}, name="t")
    async with connected(server) as conn:
        for i in range(5):
            await conn.send_oneway(RecordRequest(n=i))
        await conn.call(RecordRequest(n=5))
    assert seen == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("fails", [False, True])
async def test_oneway_request_whose_inline_handler_defers_finishes_and_answers_nothing(
    fails: bool,
) -> None:
    finished = trio.Event()
    release = trio.Event()

    async def finish() -> RecordResponse:
        await release.wait()
        finished.set()
        if fails:
            raise NotLeaderError("moved", leader=2)
        return RecordResponse()

    async def deferring(req: RecordRequest) -> Deferred:
        return Deferred(finish)

    server = RpcServer({"test.record": Route(deferring, inline=True)}, name="t")
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        await client_side.send_all(encode_frame({"o": "test.record", "b": {"n": 1}, "n": True}))
        await trio.testing.wait_all_tasks_blocked()
        assert server.in_flight == 1  # the waiting part holds its slot like any request
        release.set()
        with trio.fail_after(5):
            await finished.wait()
        assert await server.drain(1.0)
        assert server.in_flight == 0
        assert server.stats.oneway_errors == (1 if fails else 0)
        # Nothing was written back: the next bytes the client sees are an answer to
        # a normal call.
        await client_side.send_all(encode_frame({"i": 3, "o": "echo", "b": {"data": 0}}))
        frames = await read_frames(client_side, 1)
        assert [f.header.get("i") for f in frames] == [3]
        nursery.cancel_scope.cancel()


async def test_send_oneway_on_a_closed_connection_raises() -> None:
    async with connected(make_server(Gates())) as conn:
        conn.close("test")
        with pytest.raises(NetworkError):
            await conn.send_oneway(EchoRequest())


async def test_send_oneway_waits_for_room_and_has_room_says_so(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The server never reads: the client's outgoing buffer fills up.
    client_side, _server_side = trio.testing.lockstep_stream_pair()
    config = ClientConfig(max_outbox_bytes=1000)
    async with trio.open_nursery() as nursery:
        conn = RpcConnection(client_side, "memory", config)
        await nursery.start(conn.run)
        assert conn.has_room
        while conn.has_room:
            await conn.send_oneway(WaitRequest(gate="x" * 100))
        with trio.testing.assert_checkpoints(), trio.move_on_after(1) as waited:
            await conn.send_oneway(WaitRequest(gate="y"))
        assert waited.cancelled_caught
        nursery.cancel_scope.cancel()
