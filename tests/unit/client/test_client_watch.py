"""call_unless: the answer, or give up the moment the metadata makes waiting pointless.

A stub pool hands out calls the test finishes at chosen times, so every rule is
checked on the virtual clock: answered calls return, overdue ones refresh the
metadata every second, pointless ones are abandoned and forgotten, and a caller that
is cancelled forgets its call too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import pytest
import trio

from dlog.client.metadata import ClusterView, MetadataCache
from dlog.client.watch import OVERDUE_S, call_unless
from dlog.errors import DlogError, NotLeaderError, RequestTimedOutError, UnknownServerError
from dlog.net.client import RpcPool
from dlog.net.messages import EchoRequest, EchoResponse


class StubCall:
    def __init__(self) -> None:
        self.done = False
        self.forgotten = False
        self._finished = trio.Event()
        self._response: Any = None
        self._error: DlogError | None = None

    def finish(self, response: Any = None, error: DlogError | None = None) -> None:
        if not self.done:
            self.done = True
            self._response, self._error = response, error
            self._finished.set()

    def forget(self) -> None:
        self.forgotten = True
        self.finish(error=RequestTimedOutError("forgotten"))

    async def wait(self) -> None:
        await self._finished.wait()

    async def result(self) -> Any:
        await self._finished.wait()
        if self._error is not None:
            raise self._error
        return self._response


class StubPool:
    def __init__(self) -> None:
        self.calls: list[StubCall] = []

    async def start_call(self, address: str, request: Any, *, timeout: float) -> StubCall:
        await trio.lowlevel.checkpoint()
        call = StubCall()
        self.calls.append(call)
        return call


class StubMetadata:
    def __init__(self) -> None:
        self.listeners: list[Callable[[ClusterView], None]] = []
        self.refreshes: list[float] = []

    def add_listener(self, listener: Callable[[ClusterView], None]) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Callable[[ClusterView], None]) -> None:
        self.listeners.remove(listener)

    def request_refresh(self) -> None:
        self.refreshes.append(trio.current_time())

    def publish(self, view: Any) -> None:
        for listener in list(self.listeners):
            listener(view)


async def watched_call(
    pool: StubPool, metadata: StubMetadata, *, expected_s: float = 0.0
) -> EchoResponse:
    return await call_unless(
        cast(RpcPool, pool),
        cast(MetadataCache, metadata),
        "127.0.0.1:1",
        EchoRequest(data="x"),
        EchoResponse,
        timeout=30.0,
        pointless=lambda view: view == "moved",
        abandoned=lambda: NotLeaderError("moved away", leader=None),
        expected_s=expected_s,
    )


async def finish_later(pool: StubPool, delay: float, **outcome: Any) -> None:
    await trio.sleep(delay)
    pool.calls[-1].finish(**outcome)


async def test_an_answer_in_time_is_returned_without_a_refresh(
    autojump_clock: trio.abc.Clock,
) -> None:
    pool, metadata = StubPool(), StubMetadata()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(finish_later, pool, 0.5, response=EchoResponse(data="y")))
        response = await watched_call(pool, metadata)
    assert response == EchoResponse(data="y")
    assert metadata.refreshes == []
    assert metadata.listeners == []
    assert not pool.calls[0].forgotten


async def test_an_overdue_answer_refreshes_the_metadata_every_second(
    autojump_clock: trio.abc.Clock,
) -> None:
    pool, metadata = StubPool(), StubMetadata()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(finish_later, pool, 5.5, response=EchoResponse(data="late")))
        response = await watched_call(pool, metadata, expected_s=2.0)
    assert response == EchoResponse(data="late")
    first = start + 2.0 + OVERDUE_S
    assert [round(t - first, 6) for t in metadata.refreshes] == [0.0, 1.0, 2.0]


async def test_the_call_is_abandoned_and_forgotten_once_the_metadata_says_so(
    autojump_clock: trio.abc.Clock,
) -> None:
    pool, metadata = StubPool(), StubMetadata()

    async def move_partitions() -> None:
        await trio.sleep(0.3)
        metadata.publish("unrelated")
        await trio.sleep(0.3)
        metadata.publish("moved")

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(move_partitions)
        with pytest.raises(NotLeaderError, match="moved away"):
            await watched_call(pool, metadata)
    assert trio.current_time() - start == pytest.approx(0.6)
    assert pool.calls[0].forgotten
    assert metadata.listeners == []


async def test_a_server_error_is_raised_as_it_is(autojump_clock: trio.abc.Clock) -> None:
    pool, metadata = StubPool(), StubMetadata()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(finish_later, pool, 0.1, error=UnknownServerError("boom")))
        with pytest.raises(UnknownServerError, match="boom"):
            await watched_call(pool, metadata)
    assert not pool.calls[0].forgotten


async def test_a_cancelled_caller_forgets_its_call(autojump_clock: trio.abc.Clock) -> None:
    pool, metadata = StubPool(), StubMetadata()
    with trio.move_on_after(2.5) as scope:
        await watched_call(pool, metadata)
    assert scope.cancelled_caught
    assert pool.calls[0].forgotten
    assert metadata.listeners == []
