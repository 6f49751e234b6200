"""Server and pool over real loopback sockets."""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from dlog.errors import NetworkError, RequestTimedOutError
from dlog.net import client as client_module
from dlog.net.client import ClientConfig, RpcConnection, open_rpc_pool
from dlog.net.framing import encode_frame, encode_header
from dlog.net.messages import EchoRequest, EchoResponse, payload_bytes
from dlog.net.server import RpcServer, ServerConfig
from tests.unit.net.rpc_fixtures import Gates, WaitRequest, WaitResponse, make_server
from tests.unit.net.test_rpc_memory import read_frames


async def start_server(
    nursery: trio.Nursery, server: RpcServer, port: int = 0
) -> tuple[trio.CancelScope, int]:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await server.run("127.0.0.1", port, task_status=task_status)

    bound: int = await nursery.start(run)
    return scope, bound


async def test_pool_calls_and_reuses_one_connection() -> None:
    async with trio.open_nursery() as nursery:
        server = make_server(Gates())
        scope, port = await start_server(nursery, server)
        async with open_rpc_pool() as pool:
            addr = f"127.0.0.1:{port}"
            for i in range(20):
                resp = await pool.call(addr, EchoRequest(data=i, payload=b"p" * i))
                assert isinstance(resp, EchoResponse)
                assert resp.data == i and payload_bytes(resp.payload) == b"p" * i
            assert server.stats.connections_accepted == 1
        scope.cancel()


async def test_one_mebibyte_payloads() -> None:
    async with trio.open_nursery() as nursery:
        scope, port = await start_server(nursery, make_server(Gates()))
        blob = random.Random(1).randbytes(1 << 20)
        async with open_rpc_pool() as pool:
            for _ in range(5):
                resp = await pool.call(f"127.0.0.1:{port}", EchoRequest(payload=blob))
                assert payload_bytes(resp.payload) == blob
        scope.cancel()


async def test_server_crash_mid_request_then_reconnect() -> None:
    async with trio.open_nursery() as nursery:
        scope, port = await start_server(nursery, make_server(Gates()))
        addr = f"127.0.0.1:{port}"
        config = ClientConfig(reconnect_backoff_s=0.01, reconnect_backoff_max_s=0.05)
        async with open_rpc_pool(config) as pool:
            conn = await pool.connection(addr)
            pending = await conn.start_call(WaitRequest(gate="never"))
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # the server dies with the request in flight
            with pytest.raises(NetworkError):
                await pending.result()
            with pytest.raises(NetworkError):
                await pool.call(addr, EchoRequest(), timeout=5)
            # The server comes back on the same port; the pool reconnects.
            scope2, _ = await start_server(nursery, make_server(Gates()), port)
            with trio.fail_after(10):
                while True:
                    try:
                        resp = await pool.call(addr, EchoRequest(data="back"), timeout=5)
                        break
                    except NetworkError:
                        await trio.sleep(0.01)
            assert isinstance(resp, EchoResponse) and resp.data == "back"
            scope2.cancel()


async def test_connect_refused_is_a_network_error_and_backs_off() -> None:
    # A port nobody listens on: bind, note the port, close.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = ClientConfig(reconnect_backoff_s=0.2, reconnect_backoff_max_s=1.0)
    async with open_rpc_pool(config) as pool:
        with pytest.raises(NetworkError, match="cannot connect"):
            await pool.call(f"127.0.0.1:{port}", EchoRequest(), timeout=5)
        start = trio.current_time()
        with pytest.raises(NetworkError):
            await pool.call(f"127.0.0.1:{port}", EchoRequest(), timeout=5)
        # The second attempt waited out the backoff (0.2 s +- 20 % jitter).
        assert trio.current_time() - start >= 0.15
        # A call whose timeout is shorter than the backoff times out instead.
        with pytest.raises(RequestTimedOutError):
            await pool.call(f"127.0.0.1:{port}", EchoRequest(), timeout=0.01)


@pytest.mark.parametrize(
    "host", ["a" * 300, "..", "a..b", "ü" * 70], ids=["long", "dots", "empty-label", "unicode"]
)
async def test_a_host_name_that_cannot_be_encoded_is_a_network_error(host: str) -> None:
    # The resolver refuses these before any lookup (an IDNA label that is empty or
    # longer than 63 characters). Peers' addresses come from the network (a broker's
    # registration, a Raft configuration), so this must fail the call, not the caller.
    async with open_rpc_pool(ClientConfig(reconnect_backoff_s=0.01)) as pool:
        with pytest.raises(NetworkError, match="cannot connect"):
            await pool.call(f"{host}:1", EchoRequest(), timeout=5)


async def test_malformed_input_on_one_connection_leaves_others_alone() -> None:
    async with trio.open_nursery() as nursery:
        server = make_server(Gates(), ServerConfig(max_frame_bytes=1 << 20))
        scope, port = await start_server(nursery, server)
        addr = f"127.0.0.1:{port}"
        async with open_rpc_pool() as pool:
            assert isinstance(await pool.call(addr, EchoRequest(data=1)), EchoResponse)
            for garbage in [
                b"\x00\x00\x00\x05hello",
                struct.pack(">I", 1 << 30),
                encode_header({"i": 9, "o": "echo"}, 1 << 30),
                encode_frame({"i": 10, "o": "nope"}),
                bytes(random.Random(7).randbytes(4096)),
            ]:
                raw = await trio.open_tcp_stream("127.0.0.1", port)
                await raw.send_all(garbage)
                with trio.fail_after(5):
                    await read_frames(raw, 1)  # an answer or EOF, never a hang
                    assert await raw.receive_some(10) == b""
                await raw.aclose()
            # The pooled connection and the server are unaffected.
            for i in range(5):
                resp = await pool.call(addr, EchoRequest(data=i))
                assert isinstance(resp, EchoResponse) and resp.data == i
            assert server.stats.connections_open == 1
        scope.cancel()


async def test_fault_injector_cuts_and_heals() -> None:
    async with trio.open_nursery() as nursery:
        scope, port = await start_server(nursery, make_server(Gates()))
        addr = f"127.0.0.1:{port}"
        async with open_rpc_pool() as pool:
            conn = await pool.connection(addr)
            pending = await conn.start_call(WaitRequest(gate="x"))
            pool.faults.block(addr)
            with pytest.raises(NetworkError):
                await pending.result()
            with pytest.raises(NetworkError, match="blocked"):
                await pool.call(addr, EchoRequest())
            pool.faults.heal()
            assert isinstance(await pool.call(addr, EchoRequest()), EchoResponse)
        scope.cancel()


async def test_server_refusing_connections_looks_like_a_cut() -> None:
    async with trio.open_nursery() as nursery:
        server = make_server(Gates())
        scope, port = await start_server(nursery, server)
        addr = f"127.0.0.1:{port}"
        async with open_rpc_pool(ClientConfig(reconnect_backoff_s=0.01)) as pool:
            await pool.call(addr, EchoRequest())
            server.refuse_connections = True
            server.drop_connections()
            with pytest.raises((NetworkError, RequestTimedOutError)):
                await pool.call(addr, EchoRequest(), timeout=2)
            server.refuse_connections = False
            with trio.fail_after(10):
                while True:
                    try:
                        await pool.call(addr, EchoRequest(), timeout=2)
                        break
                    except NetworkError:
                        await trio.sleep(0.01)
        scope.cancel()


# -- a lone call reads its own response (RpcConnection._read_for) ----------------------


async def wait_until(predicate: object, timeout: float = 10) -> None:
    """Poll ``predicate()`` until true; fail after ``timeout`` seconds."""
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (connection state has no event to wait on)
            await trio.sleep(0.005)


@asynccontextmanager
async def tcp_connection() -> AsyncIterator[tuple[Gates, RpcServer, RpcConnection]]:
    """A test server on loopback and one pooled connection to it."""
    async with trio.open_nursery() as nursery:
        gates = Gates()
        server = make_server(gates)
        scope, port = await start_server(nursery, server)
        async with open_rpc_pool() as pool:
            yield gates, server, await pool.connection(f"127.0.0.1:{port}")
        scope.cancel()


async def test_lone_call_reads_itself_then_the_reader_task_takes_over() -> None:
    async with tcp_connection() as (_, server, conn):
        for i in range(3):
            resp = await conn.call(EchoRequest(data=i))
            assert isinstance(resp, EchoResponse) and resp.data == i
        assert conn._direct_call is None
        # Idle now: only the reader task can notice the server hanging up.
        server.drop_connections()
        await wait_until(lambda: conn.is_closed)


async def test_lone_call_reading_itself_times_out_and_the_connection_lives_on() -> None:
    async with tcp_connection() as (gates, _, conn):
        with pytest.raises(RequestTimedOutError):
            await conn.call(WaitRequest(gate="never"), timeout=0.2)
        assert conn.in_flight == 0 and not conn.is_closed
        gates.open("never")  # its late answer is dropped
        resp = await conn.call(EchoRequest(data="after"))
        assert isinstance(resp, EchoResponse) and resp.data == "after"


async def test_cancelled_lone_caller_leaves_the_connection_usable() -> None:
    async with tcp_connection() as (gates, _, conn):
        with trio.move_on_after(0.1) as cancelled:
            await conn.call(WaitRequest(gate="g"))
        assert cancelled.cancelled_caught
        assert conn._direct_call is None and conn.in_flight == 0
        gates.open("g")
        for i in range(3):
            resp = await conn.call(EchoRequest(data=i))
            assert isinstance(resp, EchoResponse) and resp.data == i


async def test_calls_started_while_one_reads_itself_get_their_answers() -> None:
    async with tcp_connection() as (gates, _, conn):
        answers: dict[str, str] = {}

        async def call(gate: str) -> None:
            resp = await conn.call(WaitRequest(gate=gate))
            answers[gate] = resp.gate  # type: ignore[attr-defined]

        async with trio.open_nursery() as callers:
            callers.start_soon(call, "a")  # alone: reads the socket itself
            await wait_until(lambda: gates.entered == ["a"])
            assert conn._direct_call is not None
            callers.start_soon(call, "b")
            callers.start_soon(call, "c")
            await wait_until(lambda: len(gates.entered) == 3)
            gates.open("b")  # read by "a"'s task, handed to "b"
            await wait_until(lambda: "b" in answers)
            gates.open("a")
            await wait_until(lambda: "a" in answers)
            gates.open("c")  # read by the reader task again
        assert answers == {"a": "a", "b": "b", "c": "c"}
        assert conn._direct_call is None


async def test_the_reader_task_stays_parked_between_lone_calls_and_is_woken_when_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Parked for an hour unless woken: only the explicit wake-ups can serve the
    # calls below, so a missing one hangs the test instead of hiding behind the
    # reader's periodic resume.
    monkeypatch.setattr(client_module, "_READER_RESUME_S", 3600.0)
    async with tcp_connection() as (gates, _, conn):
        for i in range(3):
            resp = await conn.call(EchoRequest(data=i))
            assert isinstance(resp, EchoResponse) and resp.data == i
            assert conn._reader_parked  # no hand-back between lone calls
        # Two calls in flight before anyone waits: neither may read for itself, so
        # waiting wakes the reader task.
        first = await conn.start_call(WaitRequest(gate="a"))
        second = await conn.start_call(WaitRequest(gate="b"))
        gates.open("a")
        gates.open("b")
        with trio.fail_after(10):
            assert isinstance(await first.result(), WaitResponse)
            # (Woken for "a"; "b" may come in a later read that its own caller makes.)
            assert not conn._reader_parked
            assert isinstance(await second.result(), WaitResponse)
        # A caller reading for itself that leaves another call in flight wakes the
        # reader task on its way out.
        await conn.call(EchoRequest(data="parks the reader again"))
        assert conn._reader_parked
        answered: list[str] = []

        async def lone() -> None:
            await conn.call(WaitRequest(gate="c"))
            answered.append("c")

        with trio.fail_after(10):
            async with trio.open_nursery() as callers:
                callers.start_soon(lone)
                await wait_until(lambda: conn._direct_call is not None)
                later = await conn.start_call(WaitRequest(gate="d"))
                callers.start_soon(later.wait)  # waits while "c"'s caller reads
                await trio.testing.wait_all_tasks_blocked()
                gates.open("c")
                await wait_until(lambda: answered == ["c"])
                assert conn._direct_call is None and not conn._reader_parked
                gates.open("d")
            assert isinstance(await later.result(), WaitResponse)


class _ReaderSteps(trio.abc.Instrument):
    """Counts the task steps of connections' reader tasks."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("RpcConnection.run"):
            self.steps += 1


async def test_a_long_lone_call_leaves_the_parked_reader_asleep() -> None:
    # A long poll alone on its connection (a follower's fetch, a consumer's) reads for
    # itself; the reader task must not wake on a timer meanwhile.
    async with tcp_connection() as (gates, _, conn):
        counter = _ReaderSteps()
        trio.lowlevel.add_instrument(counter)
        try:

            async def open_later() -> None:
                await trio.sleep(0.3)  # the call lasts this long
                gates.open("g")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(open_later)
                await conn.call(WaitRequest(gate="g"))
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps <= 3  # stepping aside; a timer every 10 ms would be ~30


async def test_result_after_a_cancelled_result_raises_at_once() -> None:
    async with tcp_connection() as (gates, _, conn):
        call = await conn.start_call(WaitRequest(gate="g"), timeout=30)
        with trio.move_on_after(0.1):
            await call.result()
        assert call.done and conn.in_flight == 0  # the last waiter gave up: forgotten
        with trio.fail_after(5), pytest.raises(RequestTimedOutError, match="forgotten"):
            await call.result()
        gates.open("g")  # its late answer is dropped
        resp = await conn.call(EchoRequest(data="after"))
        assert isinstance(resp, EchoResponse) and resp.data == "after"


async def test_a_call_awaited_twice_survives_one_waiter_giving_up() -> None:
    async with tcp_connection() as (_, _, conn):
        call = await conn.start_call(WaitRequest(gate="never"), timeout=1)
        outcome: list[str] = []

        async def waiter() -> None:
            with pytest.raises(RequestTimedOutError):
                await call.result()
            outcome.append("timed out")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            with trio.CancelScope() as giving_up:

                async def give_up() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    giving_up.cancel()  # the second waiter gives up while both wait

                nursery.start_soon(give_up)
                await call.result()
            assert giving_up.cancelled_caught
        assert outcome == ["timed out"]
        assert conn.in_flight == 0


async def test_result_of_a_forgotten_call_raises_at_once() -> None:
    async with tcp_connection() as (_, _, conn):
        call = await conn.start_call(WaitRequest(gate="never"))
        call.forget()
        with trio.fail_after(5), pytest.raises(RequestTimedOutError, match="forgotten"):
            await call.result()
        assert conn.in_flight == 0


async def test_a_wait_cut_short_leaves_the_call_in_flight() -> None:
    # wait() in slices (how a caller does something while an answer is late): a
    # cancelled wait neither forgets the call nor loses its answer.
    async with tcp_connection() as (gates, _, conn):
        call = await conn.start_call(WaitRequest(gate="late"))
        for _ in range(3):
            with trio.move_on_after(0.05) as scope:
                await call.wait()
            assert scope.cancelled_caught
            assert not call.done
            assert conn.in_flight == 1
        gates.open("late")
        with trio.fail_after(5):
            await call.wait()
        assert call.done
        response = await call.result()
        assert isinstance(response, WaitResponse) and response.gate == "late"
        assert conn.in_flight == 0


async def test_every_task_waiting_for_a_slot_gets_one() -> None:
    async with trio.open_nursery() as nursery:
        gates = Gates()
        scope, port = await start_server(nursery, make_server(gates))
        async with open_rpc_pool(ClientConfig(max_in_flight=1)) as pool:
            conn = await pool.connection(f"127.0.0.1:{port}")
            first = await conn.start_call(WaitRequest(gate="g"))
            done: list[int] = []

            async def caller(i: int) -> None:
                await conn.call(EchoRequest(data=i))
                done.append(i)

            with trio.fail_after(10):
                async with trio.open_nursery() as callers:
                    for i in range(3):
                        callers.start_soon(caller, i)
                    await trio.testing.wait_all_tasks_blocked()
                    gates.open("g")
                    await first.result()
            assert sorted(done) == [0, 1, 2]
        scope.cancel()


async def test_a_sender_waiting_for_outbox_room_hears_of_the_close() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with open_rpc_pool(ClientConfig(max_outbox_bytes=1 << 20)) as pool:
        conn = await pool.connection(f"127.0.0.1:{port}")
        peer = await listener.accept()  # never reads: the socket buffers fill up
        errors: list[Exception] = []

        async def sender() -> None:
            try:
                for i in range(10_000):
                    await conn.start_call(EchoRequest(data=i, payload=b"x" * (256 << 10)))
            except NetworkError as exc:
                errors.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await wait_until(lambda: conn._writer.queued_bytes >= 1 << 20)
                conn.close()
        assert len(errors) == 1
        await peer.aclose()
    await listener.aclose()
