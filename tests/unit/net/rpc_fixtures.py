"""Operations and a server used by the RPC tests."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from dlog.errors import NotLeaderError
from dlog.net.messages import Message, register
from dlog.net.server import Route, RpcServer, ServerConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitRequest(Message):
    """Blocks until the named gate opens, then answers with its name."""

    gate: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitResponse(Message):
    gate: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FailRequest(Message):
    kind: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FailResponse(Message):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunksRequest(Message):
    count: int
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunksResponse(Message):
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordRequest(Message):
    """Carries a number (the tests' handlers record the order they see them in)."""

    n: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordResponse(Message):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ManyNamesRequest(Message):
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ManyNamesResponse(Message):
    names: list[str]


register("test.wait", WaitRequest, WaitResponse)
register("test.fail", FailRequest, FailResponse)
register("test.chunks", ChunksRequest, ChunksResponse)
register("test.record", RecordRequest, RecordResponse)
register("test.many_names", ManyNamesRequest, ManyNamesResponse)


class Gates:
    def __init__(self) -> None:
        self.events: dict[str, trio.Event] = {}
        self.entered: list[str] = []

    def get(self, name: str) -> trio.Event:
        return self.events.setdefault(name, trio.Event())

    def open(self, name: str) -> None:
        self.get(name).set()


def make_server(gates: Gates, config: ServerConfig | None = None) -> RpcServer:
    async def wait(req: WaitRequest) -> WaitResponse:
        gates.entered.append(req.gate)
        await gates.get(req.gate).wait()
        return WaitResponse(gate=req.gate)

    async def fail(req: FailRequest) -> FailResponse:
        if req.kind == "not_leader":
            raise NotLeaderError("go elsewhere", leader=3, leader_epoch=7)
        if req.kind == "crash":
            raise ZeroDivisionError("handler bug")
        return FailResponse()

    async def chunks(req: ChunksRequest) -> ChunksResponse:
        parts = [bytes([i % 256]) * req.size for i in range(req.count)]
        return ChunksResponse(count=req.count, payload=parts)

    return RpcServer(
        {"test.wait": wait, "test.fail": Route(fail, inline=True), "test.chunks": chunks},
        config=config,
        name="test",
    )
