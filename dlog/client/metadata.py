"""The client's view of the cluster: brokers, topics, partition leaders.

:class:`ClusterView` is an immutable snapshot; :class:`MetadataCache` owns the current
one and replaces it when a MetadataRequest comes back. Producers and consumers read
the snapshot without awaiting anything and ask for a refresh when the cluster tells
them it moved (NOT_LEADER_OR_FOLLOWER, UNKNOWN_TOPIC_OR_PARTITION, a dead connection).

Refresh rules (Kafka's, in words):

- Requests for a refresh are coalesced: any number of them while one is pending cause
  one MetadataRequest. Attempts are at least ``retry_backoff_ms`` apart, growing to
  ``retry_backoff_max_ms`` while they keep failing.
- Metadata is refreshed every ``metadata_max_age_ms`` even when nobody asks.
- A request goes to the broker that answered last, then every other known broker,
  then the bootstrap addresses, until one answers. Every broker answers metadata from
  its own copy at once, so one that has not answered within ``_ATTEMPT_S`` is skipped
  for the next (a paused process never answers and never fails); only the last one
  gets the whole ``request_timeout_ms``. An answer older (lower ``metadata_index``)
  than the view we hold is skipped for a fresher broker's; when none is fresher the
  view is kept.
- Only the topics the client uses are asked for (:meth:`MetadataCache.track`).
- A NOT_LEADER_OR_FOLLOWER answer naming a newer leader updates the view at once
  (:meth:`MetadataCache.apply_leader_hint`), so retries need not wait for a refresh.

Ownership: :meth:`MetadataCache.run` is the one background task; the client's
nursery runs it. Cancelling it leaves the last snapshot in place.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from dlog.client.backoff import Backoff
from dlog.client.config import ClientOptions
from dlog.errors import DlogError, ErrorCode, NetworkError, error_from_wire
from dlog.net.client import RpcPool
from dlog.net.protocol import BrokerInfo, MetadataRequest, MetadataResponse, TopicMetadata

log = logging.getLogger(__name__)

#: How long a metadata request waits for one broker when others could be asked.
_ATTEMPT_S = 2.0


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    leader: int | None
    leader_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    error_code: int = 0


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    topic_id: str
    partitions: tuple[PartitionInfo, ...]
    configs: Mapping[str, Any] = field(default_factory=dict)
    internal: bool = False


@dataclass(frozen=True, slots=True)
class ClusterView:
    """One consistent snapshot of what the client knows about the cluster."""

    cluster_id: str = ""
    controller: int | None = None
    brokers: Mapping[int, BrokerInfo] = field(default_factory=dict)
    topics: Mapping[str, TopicInfo] = field(default_factory=dict)
    #: Topics the last answer said do not exist (UNKNOWN_TOPIC_OR_PARTITION).
    missing: frozenset[str] = frozenset()
    metadata_index: int = -1
    #: Bumped on every change of the snapshot (answers and leader hints).
    version: int = 0

    def address_of(self, node_id: int | None) -> str | None:
        if node_id is None:
            return None
        broker = self.brokers.get(node_id)
        return broker.rpc if broker is not None and broker.rpc else None

    def partition(self, topic: str, partition: int) -> PartitionInfo | None:
        info = self.topics.get(topic)
        if info is None or not 0 <= partition < len(info.partitions):
            return None
        return info.partitions[partition]

    def leader(self, topic: str, partition: int) -> tuple[int, str] | None:
        """``(node_id, rpc address)`` of the partition's leader, when known and reachable."""
        info = self.partition(topic, partition)
        if info is None or info.leader is None:
            return None
        address = self.address_of(info.leader)
        return None if address is None else (info.leader, address)

    def available_partitions(self, topic: str) -> list[int]:
        """Partitions of ``topic`` with a known leader (what sticky partitioning picks from)."""
        info = self.topics.get(topic)
        if info is None:
            return []
        return [p.partition for p in info.partitions if self.address_of(p.leader) is not None]


def _topic_info(meta: TopicMetadata) -> TopicInfo:
    parts = sorted(meta.partitions, key=lambda p: p.partition)
    return TopicInfo(
        name=meta.name,
        topic_id=meta.topic_id,
        partitions=tuple(
            PartitionInfo(
                partition=p.partition,
                leader=p.leader,
                leader_epoch=p.leader_epoch,
                replicas=tuple(p.replicas),
                isr=tuple(p.isr),
                error_code=p.error_code,
            )
            for p in parts
        ),
        configs=dict(meta.configs),
        internal=meta.internal,
    )


def merge_response(
    view: ClusterView, response: MetadataResponse, asked: Iterable[str] | None
) -> ClusterView:
    """The view after ``response``, an answer to a request for ``asked`` (None: all)."""
    topics: dict[str, TopicInfo] = {} if asked is None else dict(view.topics)
    missing = set() if asked is None else set(view.missing)
    # A topic asked for and absent from the answer does not exist either (a broker
    # may answer with every topic however few were asked for).
    answered = {meta.name for meta in response.topics}
    for name in asked or ():
        if name not in answered:
            topics.pop(name, None)
            missing.add(name)
    for meta in response.topics:
        if meta.error_code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION:
            topics.pop(meta.name, None)
            missing.add(meta.name)
            continue
        if meta.error_code:
            # Another per-topic error (e.g. leader not available): keep what we had.
            continue
        if len(meta.partitions) != max((p.partition for p in meta.partitions), default=-1) + 1:
            continue  # not a dense 0..n-1 list: keep what we had rather than guess
        topics[meta.name] = _topic_info(meta)
        missing.discard(meta.name)
    return ClusterView(
        cluster_id=response.cluster_id,
        controller=response.controller,
        brokers={b.node_id: b for b in response.brokers},
        topics=topics,
        missing=frozenset(missing),
        metadata_index=response.metadata_index,
        version=view.version + 1,
    )


class MetadataCache:
    """Holds the current :class:`ClusterView` and refreshes it (see the module docstring)."""

    def __init__(
        self,
        pool: RpcPool,
        bootstrap: list[str],
        options: ClientOptions,
        rng: random.Random,
    ) -> None:
        if not bootstrap:
            raise ValueError("need at least one bootstrap address")
        self._pool = pool
        self._bootstrap = list(bootstrap)
        self._options = options
        self._rng = rng
        self._view = ClusterView()
        self._tracked: set[str] = set()
        self._last_good: str | None = None
        self._wanted = trio.Event()
        self._requested = 0
        self._completed = 0
        self._last_error: DlogError | None = None
        self._updated = trio.Event()
        self._listeners: list[Callable[[ClusterView], None]] = []
        self._backoff = Backoff(
            options.retry_backoff_ms / 1000, options.retry_backoff_max_ms / 1000, rng
        )

    @property
    def view(self) -> ClusterView:
        return self._view

    # --- listeners and requests (no awaiting) ---------------------------------------

    def add_listener(self, listener: Callable[[ClusterView], None]) -> None:
        """Call ``listener(view)`` after every change of the view (from this task)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[ClusterView], None]) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def track(self, *topics: str) -> None:
        """Include ``topics`` in every refresh; asks for a refresh if one is new."""
        new = [t for t in topics if t not in self._tracked]
        if new:
            self._tracked.update(new)
            self.request_refresh()

    def request_refresh(self) -> int:
        """Ask for a refresh soon; returns a ticket :meth:`wait_for` accepts."""
        self._requested += 1
        self._wanted.set()
        return self._requested

    def apply_leader_hint(
        self, topic: str, partition: int, leader: int | None, leader_epoch: int
    ) -> bool:
        """Take a NOT_LEADER_OR_FOLLOWER answer's leader if it is newer than ours.

        Returns whether the view changed (the new leader's address must be known).
        """
        view = self._view
        info = view.topics.get(topic)
        if leader is None or info is None or not 0 <= partition < len(info.partitions):
            return False
        current = info.partitions[partition]
        if leader_epoch <= current.leader_epoch or view.address_of(leader) is None:
            return False
        parts = list(info.partitions)
        parts[partition] = PartitionInfo(
            partition=partition,
            leader=leader,
            leader_epoch=leader_epoch,
            replicas=current.replicas,
            isr=current.isr,
        )
        topics = dict(view.topics)
        topics[topic] = TopicInfo(
            name=info.name,
            topic_id=info.topic_id,
            partitions=tuple(parts),
            configs=info.configs,
            internal=info.internal,
        )
        self._set_view(
            ClusterView(
                cluster_id=view.cluster_id,
                controller=view.controller,
                brokers=view.brokers,
                topics=topics,
                missing=view.missing,
                metadata_index=view.metadata_index,
                version=view.version + 1,
            )
        )
        return True

    # --- waiting ------------------------------------------------------------------------

    async def wait_for(self, ticket: int) -> ClusterView:
        """Wait until a refresh requested at or after ``ticket`` has finished.

        Raises the error of that attempt when no broker answered it (NetworkError or
        the broker's error). Cancelling the wait leaves the refresh going.
        """
        while self._completed < ticket:
            await self._updated.wait()
        error = self._last_error
        if error is not None:
            # A copy per waiter: many tasks may be waiting for the same attempt.
            raise type(error)(error.message, **error.details)
        return self._view

    async def refresh(self) -> ClusterView:
        """Refresh now (subject to the backoff) and return the new view."""
        return await self.wait_for(self.request_refresh())

    async def fetch(self, topics: list[str] | None) -> MetadataResponse:
        """One MetadataRequest for ``topics`` (None: all) to the best broker; merges
        the answer into the view. Tries every candidate broker before giving up."""
        response, _ = await self._fetch_from_any(topics)
        self.merge(response, topics)
        return response

    # --- the background task ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh when asked and every ``metadata_max_age_ms``; never returns."""
        task_status.started()
        max_age = self._options.metadata_max_age_ms / 1000
        last_attempt = -math.inf
        last_success = trio.current_time()
        while True:
            with trio.move_on_at(last_success + max_age):
                await self._wanted.wait()
            await trio.sleep_until(last_attempt + self._backoff.current())
            self._wanted = trio.Event()
            ticket = self._requested
            last_attempt = trio.current_time()
            topics = sorted(self._tracked)
            try:
                response, _ = await self._fetch_from_any(topics)
            except DlogError as exc:
                log.debug("metadata refresh failed: %s", exc)
                self._last_error = exc
                self._backoff.failed()
            else:
                self._last_error = None
                self._backoff.reset()
                last_success = trio.current_time()
                self.merge(response, topics)
            self._completed = ticket
            self._updated.set()
            self._updated = trio.Event()

    # --- internals ------------------------------------------------------------------

    def candidates(self) -> list[str]:
        """Broker addresses to ask, best first: the last that answered (unless it is now
        fenced or dead to gossip), the other known brokers (live ones first, shuffled),
        then the bootstrap addresses."""
        view = self._view
        live = [
            b.rpc for b in view.brokers.values() if b.rpc and not b.fenced and b.alive is not False
        ]
        down = [b.rpc for b in view.brokers.values() if b.rpc and (b.fenced or b.alive is False)]
        self._rng.shuffle(live)
        first = [self._last_good] if self._last_good not in down else []
        out: list[str] = []
        for address in [*first, *live, *down, *self._bootstrap]:
            if address and address not in out:
                out.append(address)
        return out

    async def _fetch_from_any(self, topics: list[str] | None) -> tuple[MetadataResponse, str]:
        timeout = self._options.request_timeout_ms / 1000
        current = self._view
        stale: tuple[MetadataResponse, str] | None = None
        last_error: DlogError | None = None
        candidates = self.candidates()
        for i, address in enumerate(candidates):
            attempt = timeout if i == len(candidates) - 1 else min(timeout, _ATTEMPT_S)
            try:
                response = await self._pool.call_typed(
                    address, MetadataRequest(topics=topics), MetadataResponse, timeout=attempt
                )
            except DlogError as exc:
                last_error = exc
                continue
            if (
                response.cluster_id == current.cluster_id
                and response.metadata_index < current.metadata_index
            ):
                # A broker that has not caught up: prefer a fresher one if any answers.
                stale = stale or (response, address)
                continue
            self._last_good = address
            return response, address
        if stale is not None:
            return stale
        if last_error is None or not last_error.retriable:
            raise last_error or NetworkError("no broker address to ask for metadata")
        raise type(last_error)(
            f"no broker answered a metadata request (last: {last_error.message})",
            **last_error.details,
        )

    def merge(self, response: MetadataResponse, asked: list[str] | None) -> None:
        """Take an answer to a MetadataRequest for ``asked`` (None: every topic)."""
        view = self._view
        if response.cluster_id == view.cluster_id and response.metadata_index < view.metadata_index:
            return
        self._set_view(merge_response(view, response, asked))

    def _set_view(self, view: ClusterView) -> None:
        self._view = view
        for listener in list(self._listeners):
            listener(view)


def topic_error(view: ClusterView, topic: str) -> DlogError | None:
    """The error to report for ``topic`` if the view says it does not exist."""
    if topic in view.missing:
        return error_from_wire(
            ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"topic {topic!r} does not exist"
        )
    return None
