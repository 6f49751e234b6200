"""A peer that stays down must not break the pool that keeps reconnecting to it.

Found with a local cluster: one node died; about four minutes later (1024 failed
reconnects of the Raft pool, whose backoff is capped at election_timeout/2) every other
node exited with ``OverflowError: int too large to convert to float`` from
``RpcPool.connection`` (``reconnect_backoff_s * 2 ** (failures - 1)``).
"""

from __future__ import annotations

import pytest
import trio

from dlog.errors import NetworkError, RequestTimedOutError
from dlog.net.client import ClientConfig, open_rpc_pool
from dlog.net.messages import ApiVersionsRequest

#: Nothing listens here: every connect is refused at once.
NOWHERE = "127.0.0.1:1"


async def test_a_peer_down_for_thousands_of_reconnects_only_gives_network_errors(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = ClientConfig(
        connect_timeout_s=1, reconnect_backoff_s=0.05, reconnect_backoff_max_s=0.25
    )
    async with open_rpc_pool(config) as pool:
        for _ in range(1100):
            with pytest.raises((NetworkError, RequestTimedOutError)):
                await pool.call(NOWHERE, ApiVersionsRequest(), timeout=1)
