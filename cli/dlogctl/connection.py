"""The cluster connection of a running command: a client with CLI-friendly timeouts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from dlog.client import Client, connect
from dlog.errors import NetworkError, RequestTimedOutError, UnknownTopicOrPartitionError
from dlog.net.client import ClientConfig, open_rpc_pool
from dlog.net.messages import ApiVersionsRequest, ApiVersionsResponse


@asynccontextmanager
async def open_client(addresses: list[str], **options: Any) -> AsyncIterator[Client]:
    """A client with CLI-friendly timeouts, after checking some broker answers at all:
    an unreachable cluster is one clear error within seconds, not a minute of retries."""
    # The client's own warnings (a connection dropped, a bad answer) would land between
    # the command's output lines; the command reports what fails, in one line. (Only
    # when nothing configured logging; the level is put back on the way out.)
    dlog_logger = logging.getLogger("dlog")
    level = dlog_logger.level
    if not logging.getLogger().handlers:
        dlog_logger.setLevel(logging.ERROR)
    try:
        async with _checked_client(addresses, **options) as client:
            yield client
    finally:
        dlog_logger.setLevel(level)


@asynccontextmanager
async def _checked_client(addresses: list[str], **options: Any) -> AsyncIterator[Client]:
    async with open_rpc_pool(ClientConfig(connect_timeout_s=3, request_timeout_s=5)) as pool:
        errors = []
        for address in addresses:
            try:
                versions = await pool.call(address, ApiVersionsRequest(), timeout=5)
            except (NetworkError, RequestTimedOutError) as exc:
                errors.append(exc.message)
                continue
            if isinstance(versions, ApiVersionsResponse) and "metadata" in versions.operations:
                break
            # Some other dlog server (a node's gossip or raft port): say so up front.
            errors.append(f"{address} is not a broker's rpc address (a gossip or raft port?)")
        else:
            raise NetworkError(f"no broker answers at {', '.join(addresses)} ({errors[0]})")
    options.setdefault("default_api_timeout_ms", 20_000)
    options.setdefault("connect_timeout_ms", 3_000)
    async with connect(addresses, **options) as client:
        yield client


async def require_topic(client: Client, topic: str, grace_s: float = 3.0) -> None:
    """Raise UnknownTopicOrPartitionError at once-ish for a topic that does not exist,
    rather than waiting out the client's long metadata budget on a typo.

    Brokers answer metadata from their own copy of the metadata log, which can trail a
    create that has just committed by a moment; "does not exist" is believed after
    ``grace_s``.
    """
    client.metadata.track(topic)
    with trio.move_on_after(grace_s):
        while True:
            view = await client.refresh_metadata()
            if topic in view.topics:
                return
            await trio.sleep(0.1)
    raise UnknownTopicOrPartitionError(f"topic {topic!r} does not exist", topic=topic)
