"""The controller's Raft membership work never holds up fencing and failover."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

import dlog.broker.controller as controller_module
from dlog.broker.controller import QuorumMember
from tests.unit.broker.dataplane import dataplane_cluster, wait_until


async def test_failover_goes_on_while_a_membership_change_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(controller_module, "MEMBERSHIP_CHANGE_WARN_S", 0.5)
    caplog.set_level(logging.WARNING, logger="dlog.broker.controller")
    async with dataplane_cluster(tmp_path) as cluster:
        await cluster.create_topic("t")
        quorum = cluster.quorum
        started = trio.Event()

        def members() -> list[QuorumMember]:
            # Node 3's Raft identity is stale (as after a wiped disk): the controller
            # removes it, and Raft never applies the removal.
            return [
                QuorumMember(
                    node_id=n.node_id,
                    directory_id="old" if n.node_id == 3 else f"d{n.node_id}",
                    address="",
                    voter=True,
                )
                for n in cluster.nodes.values()
            ]

        async def remove_member(node_id: int, directory_id: str) -> None:
            started.set()
            await trio.sleep_forever()

        quorum.members = members  # type: ignore[method-assign]
        quorum.remove_member = remove_member  # type: ignore[method-assign]
        assert cluster.controller is not None
        cluster.controller.wake()
        with trio.fail_after(10):
            await started.wait()
        # The leader dies while the removal hangs: it is fenced and the partition gets
        # a new leader all the same.
        old = cluster.leader_of("t")
        await cluster.stop(old.node_id)
        await wait_until(lambda: cluster.leader_of("t") is not old)
        assert cluster.image.brokers[old.node_id].fenced
        # ... and the stuck change is reported (then waited for again).
        await wait_until(lambda: "membership change is not applied" in caplog.text)
