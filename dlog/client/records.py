"""What producers hand back and consumers hand out.

Records a consumer reads are tuples (``NamedTuple``): building millions of them per
second is part of the consumer's cost, and a tuple is the cheapest object Python makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from dlog.storage.batch import Header, Record

__all__ = ["BatchMetadata", "ConsumerRecord", "Header", "Record", "RecordMetadata"]


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where an acknowledged record landed.

    ``offset`` is -1 with ``acks="none"`` (nobody waits for the broker's answer).
    ``timestamp`` is the record's timestamp (its own, or its batch's creation time).
    """

    topic: str
    partition: int
    offset: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class BatchMetadata:
    """A run of ``record_count`` records of one ``send_many`` call, stored at
    consecutive offsets from ``base_offset`` (-1 with ``acks="none"``)."""

    topic: str
    partition: int
    base_offset: int
    record_count: int


class ConsumerRecord(NamedTuple):
    """One record as ``async for record in consumer`` yields it."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
