"""Reads against a model: whole batches, max_bytes, upper bound, across segments."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from storage_testing import START_MS

from dlog.clock import ManualClock
from dlog.errors import OffsetOutOfRangeError
from dlog.storage.batch import build_batch
from dlog.storage.config import LogConfig
from dlog.storage.log import PartitionLog


def expected_read(
    batches: list[tuple[int, int, bytes]], offset: int, max_bytes: int, bound: int
) -> tuple[bytes, int]:
    """The model: (data, next offset) for a read, from (base, last, bytes) triples."""
    taken: list[bytes] = []
    size = 0
    next_offset = offset
    for _base, last, data in batches:
        if last < offset:
            continue
        if last >= bound or (taken and size + len(data) > max_bytes):
            break
        taken.append(data)
        size += len(data)
        next_offset = last + 1
    return b"".join(taken), next_offset


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=30),
    value_bytes=st.integers(min_value=0, max_value=100),
    reads=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=1000),  # offset, modulo log end + 2
            # max_bytes: any, or exactly k whole batches from the offset, give or take a byte
            st.integers(min_value=0, max_value=3000)
            | st.tuples(st.integers(min_value=1, max_value=5), st.sampled_from([-1, 0, 1])),
            st.none() | st.integers(min_value=0, max_value=250),  # upper bound
        ),
        min_size=1,
        max_size=25,
    ),
    sequential=st.booleans(),
    index_interval=st.sampled_from([0, 150, 4096]),
)
def test_reads_match_the_model(
    sizes: list[int],
    value_bytes: int,
    reads: list[tuple[int, int | tuple[int, int], int | None]],
    sequential: bool,
    index_interval: int,
) -> None:
    config = LogConfig(segment_bytes=3000, index_interval_bytes=index_interval)
    with tempfile.TemporaryDirectory() as tmp:
        log = PartitionLog.open(Path(tmp) / "t-0", config, ManualClock(START_MS))
        try:
            batches: list[tuple[int, int, bytes]] = []
            for size in sizes:
                batch = build_batch([b"v" * value_bytes] * size, base_timestamp=START_MS)
                info = log.append(batch, leader_epoch=0)
                batches.append((info.first_offset, info.last_offset, bytes(batch)))
            end = log.log_end_offset
            for offset, max_spec, upper_bound in reads:
                offset %= end + 2  # end + 1 is out of range
                if sequential:  # a consumer chaining next_offset: the read-hint path
                    offset = min(offset, end)
                if isinstance(max_spec, int):
                    max_bytes = max_spec
                else:
                    count, slack = max_spec
                    sizes_from = [len(d) for _, last, d in batches if last >= offset]
                    max_bytes = max(sum(sizes_from[:count]) + slack, 0)
                if offset > end:
                    with pytest.raises(OffsetOutOfRangeError):
                        log.read(offset, max_bytes, upper_bound)
                    continue
                bound = end if upper_bound is None else min(upper_bound, end)
                data, next_offset = expected_read(batches, offset, max_bytes, bound)
                result = log.read(offset, max_bytes, upper_bound)
                assert result.records == data
                assert result.next_offset == next_offset
                if sequential and data:
                    again = log.read(result.next_offset, max_bytes, upper_bound)
                    assert (
                        again.records
                        == expected_read(batches, result.next_offset, max_bytes, bound)[0]
                    )
        finally:
            log.close()
