"""The benchmark workloads' unique values: exactly the documented format."""

from __future__ import annotations

import pytest
from dlogctl import workloads
from hypothesis import given
from hypothesis import strategies as st


def reference_values(start: int, count: int, size: int, tag: bytes) -> list[bytes]:
    pad = b"x" * (size - len(tag) - workloads.SEQUENCE_DIGITS)
    return [tag + b"%020d" % i + pad for i in range(start, start + count)]


@given(
    start=st.one_of(st.integers(0, 30_000), st.integers(0, 10**19)),
    count=st.integers(0, 25_000),
    size=st.sampled_from([20, 25, 100, 1000]),
    tag=st.sampled_from([b"", b"t", b"run-7:"]),
)
def test_values_are_tag_sequence_number_and_padding(
    start: int, count: int, size: int, tag: bytes
) -> None:
    if size < workloads.min_value_bytes(tag):
        with pytest.raises(ValueError, match="cannot hold"):
            workloads.values(start, count, size, tag)
        return
    got = workloads.values(start, count, size, tag)
    assert got == reference_values(start, count, size, tag)
    assert all(workloads.sequence_of(v, tag) == start + i for i, v in enumerate(got[:50]))


def test_values_reject_a_negative_start() -> None:
    with pytest.raises(ValueError, match="start at 0"):
        workloads.values(-1, 3)
