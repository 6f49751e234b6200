"""Inline routes whose handler is a plain function (called with no coroutine)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dlog.errors import NotLeaderError, UnknownServerError
from dlog.net.client import ClientConfig
from dlog.net.messages import EchoRequest, EchoResponse, Message
from dlog.net.server import Deferred, Later, Route, RpcServer, ServerConfig
from tests.unit.net.rpc_fixtures import (
    FailRequest,
    FailResponse,
    RecordRequest,
    RecordResponse,
    WaitRequest,
    WaitResponse,
)
from tests.unit.net.test_rpc_memory import connected

CONFIG = ClientConfig(request_timeout_s=5)


def fail(req: FailRequest) -> FailResponse:
    if req.kind == "not_leader":
        raise NotLeaderError("go elsewhere", leader=3, leader_epoch=7)
    if req.kind == "crash":
        raise ZeroDivisionError("handler bug")
    if req.kind == "unencodable":
        return FailResponse(payload=object())  # type: ignore[arg-type]
    return FailResponse()


class AsyncCallable:
    """Not a coroutine function, yet calling it returns a coroutine."""

    async def __call__(self, req: WaitRequest) -> WaitResponse:
        await trio.lowlevel.checkpoint()
        return WaitResponse(gate=req.gate + "!")


async def test_plain_inline_handlers_answer_raise_and_defer() -> None:
    seen: list[int] = []
    release = trio.Event()

    def record(req: RecordRequest) -> Message | Deferred:
        seen.append(req.n)  # in arrival order, before anything is awaited
        if req.n % 2:
            return RecordResponse()

        async def finish() -> Message:
            await release.wait()
            return RecordResponse()

        return Deferred(finish)

    server = RpcServer(
        {
            "test.fail": Route(fail, inline=True),
            "test.record": Route(record, inline=True),
            "test.wait": Route(AsyncCallable(), inline=True),
        }
    )
    assert server._routes["echo"][3] and server._routes["test.fail"][3]
    async with connected(server, CONFIG) as conn:
        assert await conn.call(EchoRequest(data=1)) == EchoResponse(data=1)
        assert await conn.call(FailRequest(kind="ok")) == FailResponse()
        with pytest.raises(NotLeaderError) as info:
            await conn.call(FailRequest(kind="not_leader"))
        assert info.value.details["leader"] == 3
        for kind in ("crash", "unencodable"):
            with pytest.raises(UnknownServerError):
                await conn.call(FailRequest(kind=kind))
        assert server.stats.handler_crashes == 2
        assert await conn.call(WaitRequest(gate="g")) == WaitResponse(gate="g!")
        calls = [await conn.start_call(RecordRequest(n=n)) for n in range(6)]
        with trio.fail_after(5):
            for call in calls[1::2]:
                await call.result()  # odd ones answered at once
        assert not any(call.done for call in calls[0::2])  # even ones wait in tasks
        release.set()
        with trio.fail_after(5):
            for call in calls[0::2]:
                assert await call.result() == RecordResponse()
        assert seen == list(range(6))
        # The connection is still fine after all of that.
        assert await conn.call(EchoRequest(data="after")) == EchoResponse(data="after")


async def test_a_plain_handler_answering_into_a_full_queue_waits_for_room() -> None:
    def big(req: EchoRequest) -> EchoResponse:
        return EchoResponse(data=req.data, payload=b"x" * 4096)

    server = RpcServer({"echo": Route(big, inline=True)}, config=ServerConfig(max_outbox_bytes=1))
    async with connected(server, CONFIG) as conn:
        calls = [await conn.start_call(EchoRequest(data=n)) for n in range(20)]
        with trio.fail_after(5):
            for n, call in enumerate(calls):
                response = await call.result()
                assert isinstance(response, EchoResponse) and response.data == n


async def test_a_later_is_answered_from_outside_the_handler_and_counts_as_in_flight() -> None:
    parked: list[Later] = []

    def park(req: WaitRequest) -> WaitResponse | Later:
        if req.gate == "early":
            later = Later()
            later.reply(WaitResponse(gate="early"))  # answered before it is handed back
            return later
        later = Later()
        parked.append(later)
        return later

    server = RpcServer({"test.wait": Route(park, inline=True)})
    async with connected(server, CONFIG) as conn:
        assert await conn.call(WaitRequest(gate="early")) == WaitResponse(gate="early")
        first = await conn.start_call(WaitRequest(gate="a"))
        second = await conn.start_call(WaitRequest(gate="b"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(parked) == 2
        # Parked, yet the connection serves other requests meanwhile.
        assert await conn.call(EchoRequest(data="meanwhile")) == EchoResponse(data="meanwhile")
        assert server.in_flight == 2 and not first.done and not second.done
        parked[1].reply(WaitResponse(gate="b"))
        parked[1].reply(WaitResponse(gate="twice"))  # ignored
        with trio.fail_after(5):
            assert await second.result() == WaitResponse(gate="b")
        assert server.in_flight == 1 and not first.done
        parked[0].reply(WaitResponse(gate="a"))
        with trio.fail_after(5):
            assert await first.result() == WaitResponse(gate="a")
        assert server.in_flight == 0 and all(later.done for later in parked)


def parking_server(config: ServerConfig | None = None) -> tuple[RpcServer, list[Later]]:
    """A server whose test.wait handler parks every request in the returned list."""
    parked: list[Later] = []

    def park(req: WaitRequest) -> Later:
        parked.append(Later())
        return parked[-1]

    return RpcServer({"test.wait": Route(park, inline=True)}, config=config), parked


async def test_a_later_whose_connection_closed_is_done_and_its_reply_goes_nowhere() -> None:
    server, parked = parking_server()
    async with connected(server, CONFIG) as conn:
        await conn.start_call(WaitRequest(gate="a"))
        await trio.testing.wait_all_tasks_blocked()
        assert server.in_flight == 1 and not parked[0].done
        server.drop_connections()
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.connections_open == 0
    assert parked[0].done and server.in_flight == 0
    parked[0].reply(WaitResponse(gate="late"))  # nobody to answer: nothing happens


async def test_drain_waits_for_laters() -> None:
    server, parked = parking_server()
    async with connected(server, CONFIG) as conn:
        call = await conn.start_call(WaitRequest(gate="a"))
        await trio.testing.wait_all_tasks_blocked()
        assert parked
        async with trio.open_nursery() as nursery:
            drained: list[bool] = []

            async def drain() -> None:
                drained.append(await server.drain(5))

            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            assert not drained  # still waiting for the parked request
            parked[0].reply(WaitResponse(gate="a"))
        assert drained == [True]
        with trio.fail_after(5):
            assert await call.result() == WaitResponse(gate="a")


async def test_laters_count_against_max_in_flight() -> None:
    server, parked = parking_server(ServerConfig(max_in_flight=2))
    async with connected(server, CONFIG) as conn:
        calls = [await conn.start_call(WaitRequest(gate=str(n))) for n in range(5)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(parked) == 2 and server.in_flight == 2  # it stopped reading
        parked[0].reply(WaitResponse(gate="0"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(parked) == 3 and server.in_flight == 2
        for n in range(1, 5):
            await trio.testing.wait_all_tasks_blocked()
            parked[n].reply(WaitResponse(gate=str(n)))
        with trio.fail_after(5):
            for n, call in enumerate(calls):
                assert await call.result() == WaitResponse(gate=str(n))
        assert server.in_flight == 0
