"""Sending one request to the broker that should answer it, with retries.

Three destinations, as Kafka's clients have them:

- **any broker** (metadata, admin: brokers forward controller operations): the broker
  that answered last, then every other known one, then the bootstrap addresses. A
  broker that cannot be reached is skipped at once; a retriable answer (NOT_CONTROLLER,
  BROKER_NOT_AVAILABLE ...) is retried after a backoff.
- **a partition's leader** (ListOffsets): grouped by leader; NOT_LEADER_OR_FOLLOWER,
  UNKNOWN_TOPIC_OR_PARTITION, LEADER_NOT_AVAILABLE ... refresh the metadata and retry.
- **a group's coordinator** (offset commit and fetch): found with FindCoordinator and
  cached; NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE or a dead connection forget it,
  COORDINATOR_LOAD_IN_PROGRESS waits; then retry.

Every call retries only errors the error table marks retriable, with exponential
backoff, until its deadline (``default_api_timeout_ms`` unless the caller gives one);
then it raises the last error, its message saying how long it tried. Cancelling a
call abandons it between attempts or mid-request (the broker may have acted on it).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import TypeVar

import trio

from dlog.client.backoff import Backoff
from dlog.client.config import ClientOptions
from dlog.client.metadata import ClusterView, MetadataCache
from dlog.client.watch import call_unless
from dlog.errors import (
    BrokerNotAvailableError,
    CoordinatorNotAvailableError,
    DlogError,
    FencedLeaderEpochError,
    LeaderNotAvailableError,
    NetworkError,
    NotCoordinatorError,
    NotLeaderError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
    error_from_wire,
)
from dlog.net.client import RpcPool
from dlog.net.messages import Message
from dlog.net.protocol import (
    FindCoordinatorRequest,
    FindCoordinatorResponse,
    ListOffsetsPartition,
    ListOffsetsPartitionResult,
    ListOffsetsRequest,
    ListOffsetsResponse,
)

_R = TypeVar("_R", bound=Message)

#: Errors that say "this broker is gone or not the right one": try another at once.
_UNREACHABLE = (NetworkError, RequestTimedOutError, BrokerNotAvailableError)
#: Errors after which a partition's leader should be looked up again.
_LEADER_ERRORS = (
    NotLeaderError,
    UnknownTopicOrPartitionError,
    LeaderNotAvailableError,
    FencedLeaderEpochError,
    NetworkError,
    BrokerNotAvailableError,
    RequestTimedOutError,
)


def gave_up(exc: DlogError, what: str, seconds: float) -> DlogError:
    """``exc`` re-made with a message saying what was tried for how long."""
    return type(exc)(f"{what}: gave up after {seconds:g}s: {exc.message}", **exc.details)


class Router:
    """Sends requests to the right broker with retries (see the module docstring)."""

    def __init__(
        self,
        pool: RpcPool,
        metadata: MetadataCache,
        options: ClientOptions,
        rng: random.Random,
    ) -> None:
        self._pool = pool
        self._metadata = metadata
        self._options = options
        self._rng = rng
        self._coordinators: dict[str, str] = {}

    def _new_backoff(self) -> Backoff:
        opts = self._options
        return Backoff(opts.retry_backoff_ms / 1000, opts.retry_backoff_max_ms / 1000, self._rng)

    def _deadline(self, timeout_s: float | None) -> tuple[float, float]:
        budget = self._options.default_api_timeout_ms / 1000 if timeout_s is None else timeout_s
        return trio.current_time() + budget, budget

    def _call_timeout(self, deadline: float) -> float:
        remaining = deadline - trio.current_time()
        return max(0.001, min(self._options.request_timeout_ms / 1000, remaining))

    async def call_any(
        self,
        request: Message,
        response_type: type[_R],
        *,
        timeout_s: float | None = None,
        final: tuple[type[DlogError], ...] = (),
    ) -> _R:
        """Send ``request`` to any broker; retry retriable errors until the deadline,
        except those of ``final``: for a request the controller answers from committed
        metadata, its "no such topic" or "no such node" will not change by retrying."""
        deadline, budget = self._deadline(timeout_s)
        backoff = self._new_backoff()
        what = f"{type(request).__name__}"
        while True:
            last: DlogError | None = None
            for address in self._metadata.candidates():
                if trio.current_time() >= deadline:
                    break
                try:
                    return await self._call_watching(
                        address, request, response_type, self._call_timeout(deadline)
                    )
                except DlogError as exc:
                    if not exc.retriable or isinstance(exc, final):
                        raise
                    last = exc
                    if isinstance(exc, _UNREACHABLE):
                        continue
                    break
            delay = backoff.failed()
            if trio.current_time() + delay >= deadline:
                raise gave_up(last or RequestTimedOutError("no broker tried"), what, budget)
            await trio.sleep(delay)

    async def _call_watching(
        self, address: str, request: Message, response_type: type[_R], timeout: float
    ) -> _R:
        """``pool.call_typed``, given up (NetworkError, retriable) as soon as the
        metadata shows the broker at ``address`` fenced or dead to gossip: a broker that
        hangs (a paused process) answers nothing until the timeout, while the others
        could (see :mod:`dlog.client.watch`)."""

        def down(view: ClusterView) -> bool:
            return any(
                b.rpc == address and (b.fenced or b.alive is False) for b in view.brokers.values()
            )

        return await call_unless(
            self._pool,
            self._metadata,
            address,
            request,
            response_type,
            timeout=timeout,
            pointless=down,
            abandoned=lambda: NetworkError(
                f"{address} stopped answering (fenced or dead to gossip)", address=address
            ),
        )

    async def list_offsets(
        self,
        topic: str,
        timestamps: Mapping[int, int],
        *,
        timeout_s: float | None = None,
    ) -> dict[int, ListOffsetsPartitionResult]:
        """ListOffsets for ``{partition: timestamp}`` of ``topic``, each asked of its
        leader. Timestamps are ms or EARLIEST_TIMESTAMP / LATEST_TIMESTAMP."""
        deadline, budget = self._deadline(timeout_s)
        backoff = self._new_backoff()
        remaining = dict(timestamps)
        results: dict[int, ListOffsetsPartitionResult] = {}
        self._metadata.track(topic)
        last: DlogError | None = None
        while True:
            view = self._metadata.view
            by_leader: dict[str, list[int]] = {}
            for partition in remaining:
                info = view.topics.get(topic)
                if info is not None and partition >= len(info.partitions):
                    raise UnknownTopicOrPartitionError(
                        f"topic {topic!r} has no partition {partition}"
                        f" (it has {len(info.partitions)})"
                    )
                leader = view.leader(topic, partition)
                if leader is None:
                    last = last or LeaderNotAvailableError(
                        f"no leader known for {topic}-{partition}"
                    )
                    if topic in view.missing:
                        last = UnknownTopicOrPartitionError(f"topic {topic!r} does not exist")
                    continue
                by_leader.setdefault(leader[1], []).append(partition)
            refresh = len(by_leader) < len(remaining) or not by_leader
            for address, partitions in by_leader.items():
                request = ListOffsetsRequest(
                    partitions=[
                        ListOffsetsPartition(topic=topic, partition=p, timestamp=remaining[p])
                        for p in partitions
                    ]
                )
                try:
                    response = await self._pool.call_typed(
                        address, request, ListOffsetsResponse, timeout=self._call_timeout(deadline)
                    )
                except DlogError as exc:
                    if not exc.retriable:
                        raise
                    last, refresh = exc, True
                    continue
                for result in response.partitions:
                    if result.topic != topic or result.partition not in remaining:
                        continue
                    if result.error_code == 0:
                        results[result.partition] = result
                        del remaining[result.partition]
                        continue
                    err = error_from_wire(result.error_code, result.error_message)
                    if not err.retriable:
                        raise err
                    last = err
                    if result.leader is not None:
                        self._metadata.apply_leader_hint(
                            topic, result.partition, result.leader, result.leader_epoch
                        )
                    refresh = refresh or isinstance(err, _LEADER_ERRORS)
            if not remaining:
                return results
            if refresh:
                self._metadata.request_refresh()
            delay = backoff.failed()
            if trio.current_time() + delay >= deadline:
                raise gave_up(
                    last or RequestTimedOutError("no answer"), f"list offsets of {topic!r}", budget
                )
            await trio.sleep(delay)

    async def coordinator(self, group: str, *, timeout_s: float | None = None) -> str:
        """The rpc address of ``group``'s coordinator (cached until it fails)."""
        address = self._coordinators.get(group)
        if address is None:
            response = await self.call_any(
                FindCoordinatorRequest(group=group), FindCoordinatorResponse, timeout_s=timeout_s
            )
            address = self._coordinators[group] = response.rpc
        return address

    async def call_coordinator(
        self,
        group: str,
        request: Message,
        response_type: type[_R],
        *,
        check: Callable[[_R], DlogError | None] | None = None,
        timeout_s: float | None = None,
    ) -> _R:
        """Send ``request`` to ``group``'s coordinator, retrying coordinator moves.

        ``check(response)`` may return a per-partition error from the response: a
        retriable one is retried like a request error, another is raised.
        """
        deadline, budget = self._deadline(timeout_s)
        backoff = self._new_backoff()
        while True:
            try:
                address = await self.coordinator(
                    group, timeout_s=max(0.001, deadline - trio.current_time())
                )
                response = await self._pool.call_typed(
                    address, request, response_type, timeout=self._call_timeout(deadline)
                )
                error = check(response) if check is not None else None
                if error is None:
                    return response
                raise error
            except DlogError as exc:
                if not exc.retriable:
                    raise
                if isinstance(
                    exc, (NotCoordinatorError, CoordinatorNotAvailableError, *_UNREACHABLE)
                ):
                    self._coordinators.pop(group, None)
                delay = backoff.failed()
                if trio.current_time() + delay >= deadline:
                    what = f"{type(request).__name__} for group {group!r}"
                    raise gave_up(exc, what, budget) from None
                await trio.sleep(delay)
