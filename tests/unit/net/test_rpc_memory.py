"""Server and client connection over trio's in-memory streams, on virtual time."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from dlog.errors import (
    BrokerNotAvailableError,
    InvalidRequestError,
    NetworkError,
    NotLeaderError,
    RequestTimedOutError,
    UnknownServerError,
    UnsupportedVersionError,
)
from dlog.net.client import ClientConfig, RpcConnection
from dlog.net.framing import (
    DEFAULT_MAX_HEADER_BYTES,
    NEED_DATA,
    Frame,
    FrameDecoder,
    encode_frame,
    encode_header,
)
from dlog.net.messages import EchoRequest, EchoResponse, Message, payload_bytes
from dlog.net.server import Route, RpcServer, ServerConfig
from tests.unit.net.rpc_fixtures import (
    ChunksRequest,
    FailRequest,
    Gates,
    ManyNamesRequest,
    ManyNamesResponse,
    WaitRequest,
    WaitResponse,
    make_server,
)


@asynccontextmanager
async def connected(
    server: RpcServer, config: ClientConfig | None = None
) -> AsyncIterator[RpcConnection]:
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        conn = RpcConnection(client_side, "memory", config or ClientConfig())
        await nursery.start(conn.run)
        try:
            yield conn
        finally:
            nursery.cancel_scope.cancel()


async def test_echo_with_payload() -> None:
    async with connected(make_server(Gates())) as conn:
        resp = await conn.call(EchoRequest(data={"x": [1, 2]}, payload=b"hello"))
        assert isinstance(resp, EchoResponse)
        assert resp.data == {"x": [1, 2]}
        assert payload_bytes(resp.payload) == b"hello"


async def test_pipelined_requests_complete_out_of_order() -> None:
    gates = Gates()
    async with connected(make_server(gates)) as conn:
        slow = await conn.start_call(WaitRequest(gate="slow"))
        fast = await conn.start_call(WaitRequest(gate="fast"))
        gates.open("fast")
        resp = await fast.result()
        assert isinstance(resp, WaitResponse) and resp.gate == "fast"
        assert not slow.done
        gates.open("slow")
        assert (await slow.result()) == WaitResponse(gate="slow")


async def test_many_concurrent_calls_on_one_connection() -> None:
    results: list[object] = []
    async with connected(make_server(Gates())) as conn, trio.open_nursery() as nursery:
        for i in range(200):

            async def one(i: int = i) -> None:
                resp = await conn.call(EchoRequest(data=i))
                assert isinstance(resp, EchoResponse)
                results.append(resp.data)

            nursery.start_soon(one)
    assert sorted(results) == list(range(200))  # type: ignore[type-var]


async def test_server_errors_arrive_as_the_same_exception() -> None:
    async with connected(make_server(Gates())) as conn:
        with pytest.raises(NotLeaderError) as info:
            await conn.call(FailRequest(kind="not_leader"))
        assert info.value.details == {"leader": 3, "leader_epoch": 7}
        assert info.value.retriable
        with pytest.raises(UnknownServerError, match="ZeroDivisionError"):
            await conn.call(FailRequest(kind="crash"))
        # The connection survives handler failures.
        assert isinstance(await conn.call(EchoRequest(data=1)), EchoResponse)


async def test_timeout_and_late_response_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    gates = Gates()
    async with connected(make_server(gates)) as conn:
        start = trio.current_time()
        with pytest.raises(RequestTimedOutError):
            await conn.call(WaitRequest(gate="never-in-time"), timeout=2.0)
        assert trio.current_time() - start == pytest.approx(2.0)
        assert conn.in_flight == 0
        gates.open("never-in-time")
        assert isinstance(await conn.call(EchoRequest(data="after")), EchoResponse)


async def test_payload_chunks_are_sent_in_order() -> None:
    async with connected(make_server(Gates())) as conn:
        resp = await conn.call(ChunksRequest(count=5, size=100_000))
        data = payload_bytes(resp.payload)
        assert data == b"".join(bytes([i]) * 100_000 for i in range(5))


async def test_drain_finishes_in_flight_and_refuses_new(autojump_clock: trio.abc.Clock) -> None:
    gates = Gates()
    server = make_server(gates)
    async with connected(server) as conn:
        pending = await conn.start_call(WaitRequest(gate="g"))
        await trio.testing.wait_all_tasks_blocked()
        assert server.in_flight == 1
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                assert await server.drain(10.0)

            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(BrokerNotAvailableError):
                await conn.call(EchoRequest(data=1))
            gates.open("g")
            assert await pending.result() == WaitResponse(gate="g")


async def test_drain_gives_up_after_timeout(autojump_clock: trio.abc.Clock) -> None:
    server = make_server(Gates())
    async with connected(server) as conn:
        await conn.start_call(WaitRequest(gate="stuck"))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        assert not await server.drain(3.0)
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_version_too_new_is_an_error_but_keeps_the_connection() -> None:
    server = make_server(Gates())
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        await client_side.send_all(encode_frame({"i": 1, "o": "echo", "v": 9, "b": {}}))
        await client_side.send_all(encode_frame({"i": 2, "o": "echo", "b": {"data": 5}}))
        frames = await read_frames(client_side, 2)
        assert frames[0].header["e"]["code"] == UnsupportedVersionError.code
        assert frames[1].header["b"]["data"] == 5
        nursery.cancel_scope.cancel()


async def read_frames(stream: trio.abc.ReceiveStream, n: int) -> list[Frame]:
    """Up to ``n`` frames, fewer if the stream ends first."""
    decoder = FrameDecoder()
    frames: list[Frame] = []
    while len(frames) < n:
        data = await stream.receive_some(65536)
        if not data:
            break
        decoder.receive_data(data)
        while (frame := decoder.next_frame()) is not NEED_DATA:
            assert isinstance(frame, Frame)
            frames.append(frame)
    return frames


@pytest.mark.parametrize(
    ("wire", "expect_reply"),
    [
        (encode_frame({"i": 5, "o": "no.such.op"}), True),
        (encode_frame({"i": 6, "o": "test.fail", "b": {"wrong": 1}}), True),
        (encode_header({"i": 7, "o": "echo"}, 10**9), True),  # oversize
        (struct.pack(">I", 3) + b"\xff\xff\xff", False),  # garbage header
        (encode_frame({"o": "echo"}), False),  # no correlation id
        (encode_frame({"o": "echo", "n": False}), False),  # nor one-way
        (encode_frame({"o": "no.such.op", "n": True}), False),  # one-way: no answer
    ],
)
async def test_bad_input_gets_an_answer_where_possible_then_close(
    wire: bytes, expect_reply: bool
) -> None:
    server = make_server(Gates(), ServerConfig(max_frame_bytes=1 << 20))
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        await client_side.send_all(wire)
        frames = await read_frames(client_side, 1)
        if expect_reply:
            assert len(frames) == 1
            assert frames[0].header["e"]["code"] == InvalidRequestError.code
        # The server closed the connection: the next read sees EOF.
        with trio.fail_after(5):
            assert await client_side.receive_some(100) == b""
        assert server.stats.protocol_errors == 1
        nursery.cancel_scope.cancel()


async def test_connection_loss_fails_in_flight_calls() -> None:
    server = make_server(Gates())
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def serve() -> None:
            with server_scope:
                await server.serve_stream(server_side)

        nursery.start_soon(serve)
        conn = RpcConnection(client_side, "memory", ClientConfig())
        await nursery.start(conn.run)
        pending = await conn.start_call(WaitRequest(gate="forever"))
        await trio.testing.wait_all_tasks_blocked()
        server_scope.cancel()  # the server goes away mid-request
        with pytest.raises(NetworkError) as info:
            await pending.result()
        assert info.value.retriable
        with pytest.raises(NetworkError):
            await conn.call(EchoRequest())
        nursery.cancel_scope.cancel()


async def test_idle_connection_is_closed(autojump_clock: trio.abc.Clock) -> None:
    server = make_server(Gates(), ServerConfig(idle_timeout_s=30))
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        conn = RpcConnection(client_side, "memory", ClientConfig())
        await nursery.start(conn.run)
        await conn.call(EchoRequest())
        start = trio.current_time()
        with trio.fail_after(100):
            await conn.closed.wait()
        assert trio.current_time() - start == pytest.approx(30, abs=0.1)


async def test_busy_connection_is_not_idle(autojump_clock: trio.abc.Clock) -> None:
    gates = Gates()
    server = make_server(gates, ServerConfig(idle_timeout_s=30))
    async with connected(server) as conn:
        pending = await conn.start_call(WaitRequest(gate="long"), timeout=1000)
        await trio.sleep(100)
        assert not conn.is_closed
        gates.open("long")
        await pending.result()


async def test_in_flight_limit_applies_backpressure() -> None:
    gates = Gates()
    server = make_server(gates, ServerConfig(max_in_flight=4))
    async with connected(server) as conn:
        calls = [await conn.start_call(WaitRequest(gate=f"g{i}")) for i in range(10)]
        await trio.testing.wait_all_tasks_blocked()
        assert server.in_flight == 4  # the rest wait unread in the stream
        for i in range(10):
            gates.open(f"g{i}")
        for call in calls:
            await call.result()


async def test_start_call_deadlines_expire_in_order(autojump_clock: trio.abc.Clock) -> None:
    gates = Gates()
    async with connected(make_server(gates)) as conn:
        start = trio.current_time()
        long = await conn.start_call(WaitRequest(gate="a"), timeout=50)
        short = await conn.start_call(WaitRequest(gate="b"), timeout=5)
        with pytest.raises(RequestTimedOutError):
            await short.result()
        assert trio.current_time() - start == pytest.approx(5)
        assert not long.done
        with pytest.raises(RequestTimedOutError):
            await long.result()
        assert trio.current_time() - start == pytest.approx(50)
        assert conn.in_flight == 0


async def test_finished_calls_are_not_kept_until_their_deadline() -> None:
    """A finished call (and its response, e.g. a fetch's megabytes) is freed at once,
    not held by the timeout machinery until its deadline passes."""
    import gc

    from dlog.net.client import PendingCall

    def live_calls() -> int:
        gc.collect()
        return sum(type(o) is PendingCall for o in gc.get_objects())

    async with connected(make_server(Gates())) as conn:
        before = live_calls()
        for i in range(50):
            # Distinct timeouts, as the pool passes what is left of each caller's budget.
            response = await conn.call(EchoRequest(data="x", payload=b"y" * 1000), timeout=30 + i)
            assert isinstance(response, EchoResponse)
        del response
        assert live_calls() - before == 0
        assert conn.in_flight == 0


async def test_unencodable_response_is_an_error_not_a_crash() -> None:
    from dlog.net.messages import register
    from dlog.net.server import RpcServer

    @dataclass(frozen=True, slots=True, kw_only=True)
    class OddRequest(Message):
        pass

    @dataclass(frozen=True, slots=True, kw_only=True)
    class OddResponse(Message):
        value: object = None

    register("test.odd", OddRequest, OddResponse)

    async def odd(req: OddRequest) -> OddResponse:
        return OddResponse(value=object())  # cbor2 cannot encode this

    server = RpcServer({"test.odd": odd})
    async with connected(server) as conn:
        with pytest.raises(UnknownServerError, match="encode"):
            await conn.call(OddRequest())
        assert isinstance(await conn.call(EchoRequest(data=1)), EchoResponse)
        assert server.stats.handler_crashes == 1


def test_a_connection_can_be_made_before_trio_runs_and_then_run() -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    conn = RpcConnection(client_side, "memory", ClientConfig())  # no trio run yet

    async def main() -> None:
        server = RpcServer({})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, server_side)
            await nursery.start(conn.run)
            response = await conn.call(EchoRequest(data="hi"), timeout=5)
            assert isinstance(response, EchoResponse) and response.data == "hi"
            conn.close()

    trio.run(main)


async def test_a_response_header_may_be_larger_than_a_request_header() -> None:
    """A metadata answer for thousands of partitions is one header of several MiB: the
    server's cap on request headers (1 MiB by default) does not bound what it answers,
    so a client takes response headers up to its whole frame limit."""

    def many(req: ManyNamesRequest) -> ManyNamesResponse:
        return ManyNamesResponse(names=[f"topic-{i:093d}" for i in range(req.count)])

    server = RpcServer({"test.many_names": Route(many, inline=True)}, name="test")
    assert DEFAULT_MAX_HEADER_BYTES < 30_000 * 100
    async with connected(server) as conn:
        resp = await conn.call(ManyNamesRequest(count=30_000))
        assert isinstance(resp, ManyNamesResponse)
        assert len(resp.names) == 30_000 and resp.names[-1].endswith("29999")
