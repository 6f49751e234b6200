"""A call that gives up early when the metadata says its broker is no longer the one.

A broker that *fails* (connection refused, reset) fails a call at once; one that
*hangs* (a paused process, a dead machine whose kernel still ACKs nothing) answers
nothing until the call's timeout. :func:`call_unless` waits for the answer, but gives
up the moment the metadata shows what makes waiting pointless (the partitions moved to
another leader, the broker was fenced or declared dead), and while the answer is
overdue it keeps the metadata fresh so such a change is seen. What was abandoned may
still be carried out by the hung broker later -- as with any timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from dlog.client.metadata import ClusterView, MetadataCache
from dlog.errors import DlogError
from dlog.net.client import PendingCall, RpcPool, expect_response
from dlog.net.messages import Message

_R = TypeVar("_R", bound=Message)

#: An answer this much later than expected gets the metadata refreshed every second.
OVERDUE_S = 1.0


async def call_unless(
    pool: RpcPool,
    metadata: MetadataCache,
    address: str,
    request: Message,
    response_type: type[_R],
    *,
    timeout: float,
    pointless: Callable[[ClusterView], bool],
    abandoned: Callable[[], DlogError],
    expected_s: float = 0.0,
) -> _R:
    """``pool.call_typed(address, request)``, or ``abandoned()`` raised as soon as
    ``pointless(view)`` holds for a metadata view (checked on every change).

    ``expected_s``: how long the answer may legitimately take (a long poll's wait);
    overdue means later than that plus :data:`OVERDUE_S`.
    """
    overdue_at = trio.current_time() + expected_s + OVERDUE_S
    call: PendingCall | None = None
    answered = False
    # No task per call: the metadata listener cancels this scope, and the wait for
    # the answer is cut into slices so that an overdue answer refreshes the metadata.
    with trio.CancelScope() as scope:

        def check(view: ClusterView) -> None:
            if pointless(view):
                scope.cancel()

        metadata.add_listener(check)
        try:
            call = await pool.start_call(address, request, timeout=timeout)
            while not call.done:
                with trio.move_on_at(overdue_at):
                    await call.wait()
                if not call.done:
                    metadata.request_refresh()
                    overdue_at = trio.current_time() + 1.0
        finally:
            metadata.remove_listener(check)
            if call is not None:
                answered = call.done
                if not answered:
                    call.forget()  # abandoned (or cancelled from outside): drop a late answer
    if call is None or not answered:
        raise abandoned()
    # Finished: result() returns (or raises) without waiting.
    return expect_response(await call.result(), response_type)


def led_elsewhere(partitions: list[tuple[str, int]], node: int) -> Callable[[ClusterView], bool]:
    """True once every one of ``partitions`` has a known leader other than ``node``."""

    def moved(view: ClusterView) -> bool:
        for topic, partition in partitions:
            info = view.partition(topic, partition)
            if info is None or info.leader is None or info.leader == node:
                return False
        return True

    return moved
