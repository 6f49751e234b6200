"""Requests with values of the right types but no valid meaning get the Kafka error
that names the problem, never UNKNOWN_SERVER_ERROR (the regressions of
tests/cluster/test_request_fuzz.py, one per handler crash it found)."""

from __future__ import annotations

from pathlib import Path

from dlog.errors import ErrorCode
from dlog.net.protocol import (
    ListOffsetsPartition,
    ListOffsetsRequest,
    ListOffsetsResponse,
)
from tests.unit.broker.dataplane import dataplane_cluster
from tests.unit.broker.test_replication import produce


async def test_list_offsets_refuses_negative_timestamps_it_does_not_define(
    tmp_path: Path,
) -> None:
    async with dataplane_cluster(tmp_path, n=1) as cluster:
        await cluster.create_topic("t", rf=1)
        await produce(cluster, "t", b"a", acks=1)
        resp = await cluster.pool.call(
            cluster.leader_of("t").address,
            ListOffsetsRequest(
                partitions=[
                    ListOffsetsPartition(topic="t", partition=0, timestamp=ts)
                    for ts in (-3, -(1 << 63), -2, -1)
                ]
            ),
        )
        assert isinstance(resp, ListOffsetsResponse)
        assert [r.error_code for r in resp.partitions] == [
            ErrorCode.INVALID_REQUEST,
            ErrorCode.INVALID_REQUEST,
            0,
            0,
        ]
        assert [r.offset for r in resp.partitions[2:]] == [0, 1]
