"""Which partition a record goes to: Kafka's key hash and the sticky partitioner.

Keyed records: ``toPositive(murmur2(key)) % partitions`` exactly as Kafka's Java
client computes it (``Utils.murmur2`` with seed 0x9747b28c, then ``& 0x7fffffff``), so
a key lands on the same partition whichever client wrote it.

Records without a key (KIP-480): every such record goes to the topic's current
"sticky" partition until that partition's batch is closed; then a new sticky
partition is drawn at random among the partitions that have a leader, avoiding the
previous one. Batches fill up instead of every partition getting a tiny batch.

Pure functions and a small class; no I/O. Randomness comes from an injected
``random.Random`` so tests are deterministic.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK32 = 0xFFFFFFFF

_WORDS: dict[int, struct.Struct] = {}


def _words(count: int) -> struct.Struct:
    fmt = _WORDS.get(count)
    if fmt is None:
        fmt = _WORDS[count] = struct.Struct(f"<{count}I")
    return fmt


def murmur2(data: bytes | bytearray | memoryview) -> int:
    """Kafka's ``Utils.murmur2``: the 32-bit hash as the signed int Java returns."""
    length = len(data)
    h = (_SEED ^ length) & _MASK32
    count = length >> 2
    if count:
        for k in _words(count).unpack_from(data):
            k = (k * _M) & _MASK32
            k ^= k >> 24
            k = (k * _M) & _MASK32
            h = ((h * _M) & _MASK32) ^ k
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key(key: bytes | bytearray | memoryview, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def next_sticky_partition(
    available: Sequence[int], partitions: int, previous: int, rng: random.Random
) -> int:
    """A new sticky partition: random among ``available`` (those with a leader),
    avoiding ``previous`` when there is a choice; any partition when none is available.
    """
    if not available:
        choice = rng.randrange(partitions)
        if partitions > 1 and choice == previous:
            choice = (choice + 1 + rng.randrange(partitions - 1)) % partitions
        return choice
    if len(available) == 1:
        return available[0]
    choice = available[rng.randrange(len(available))]
    if choice == previous:
        i = available.index(choice)
        choice = available[(i + 1 + rng.randrange(len(available) - 1)) % len(available)]
    return choice
