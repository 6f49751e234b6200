"""Kafka-compatible key hashing and KIP-480 sticky partition choice."""

from __future__ import annotations

import random

import pytest

from dlog.client.partitioner import murmur2, next_sticky_partition, partition_for_key

# Apache Kafka, clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java,
# testMurmur2: Utils.murmur2 as the signed ints Java returns.
KAFKA_MURMUR2 = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]

# kafka-python's test_murmur2_java_compatibility: the partition Kafka's Java
# DefaultPartitioner picks among 1000 partitions (toPositive(murmur2(key)) % 1000).
KAFKA_PARTITIONS_OF_1000 = [
    (b"", 681),
    (b"a", 524),
    (b"ab", 434),
    (b"abc", 107),
    (b"123456789", 566),
    (b"\x00 ", 742),
]


@pytest.mark.parametrize(("key", "expected"), KAFKA_MURMUR2)
def test_murmur2_matches_kafka_utils(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


@pytest.mark.parametrize(("key", "expected"), KAFKA_PARTITIONS_OF_1000)
def test_partition_for_key_matches_kafka_default_partitioner(key: bytes, expected: int) -> None:
    assert partition_for_key(key, 1000) == expected


def test_negative_hash_is_masked_not_negated() -> None:
    # murmur2(b"21") is negative: Kafka masks the sign bit (toPositive), abs() would differ.
    h = murmur2(b"21")
    assert h < 0
    assert partition_for_key(b"21", 7) == (h & 0x7FFFFFFF) % 7 != abs(h) % 7


def test_bytearray_and_memoryview_hash_like_bytes() -> None:
    key = b"some-key-123"
    assert murmur2(bytearray(key)) == murmur2(memoryview(key)) == murmur2(key)


def test_sticky_choice_avoids_the_previous_partition() -> None:
    rng = random.Random(1)
    available = [0, 1, 2, 3]
    for previous in available:
        for _ in range(50):
            assert next_sticky_partition(available, 4, previous, rng) != previous


def test_sticky_choice_only_takes_available_partitions_and_covers_them() -> None:
    rng = random.Random(2)
    seen = {next_sticky_partition([1, 3, 5], 6, -1, rng) for _ in range(200)}
    assert seen == {1, 3, 5}
    assert next_sticky_partition([4], 6, 4, rng) == 4  # no choice: stay


def test_sticky_choice_without_available_partitions_uses_any() -> None:
    rng = random.Random(3)
    seen = {next_sticky_partition([], 3, 0, rng) for _ in range(100)}
    assert seen == {1, 2}
