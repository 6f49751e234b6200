"""Inline routes whose handler is a plain function (called with no coroutine)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from dlog.errors import NotLeaderError, UnknownServerError
from dlog.net.client import ClientConfig, RpcConnection
from dlog.net.messages import EchoRequest, EchoResponse, Message
from dlog.net.server import Deferred, Route, RpcServer, ServerConfig
from tests.unit.net.rpc_fixtures import (
    FailRequest,
    FailResponse,
    RecordRequest,
    RecordResponse,
    WaitRequest,
    WaitResponse,
)


@asynccontextmanager
async def serving(server: RpcServer) -> AsyncIterator[RpcConnection]:
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_side)
        conn = RpcConnection(client_side, "memory", ClientConfig(request_timeout_s=5))
        await nursery.start(conn.run)
        try:
            yield conn
        finally:
            nursery.cancel_scope.cancel()


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
    async with serving(server) as conn:
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
    async with serving(server) as conn:
        calls = [await conn.start_call(EchoRequest(data=n)) for n in range(20)]
        with trio.fail_after(5):
            for n, call in enumerate(calls):
                response = await call.result()
                assert isinstance(response, EchoResponse) and response.data == n
