"""What producers hand back and consumers hand out.

Records a consumer reads are tuples (``NamedTuple``): building millions of them per
second is part of the consumer's cost, and a tuple is the cheapest object Python makes.
``getmany`` hands each partition's records out as :class:`Records`, which keeps them as
plain tuples and makes each :class:`Record` as it is read (see :class:`Records`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple, overload

from dlog.storage.batch import Header, Record, RecordRow

__all__ = ["BatchMetadata", "ConsumerRecord", "Header", "Record", "RecordMetadata", "Records"]

_new_record = tuple.__new__  # Record(*row) without NamedTuple.__new__'s argument handling


class Records(Sequence[Record]):
    """One partition's records from ``getmany``: a read-only sequence of
    :class:`Record` in offset order. Index it, slice it (a slice is a ``Records``),
    iterate it, ``len`` it; it compares equal to a list of the same records. It is
    not a list (no ``append``, ``+`` or ``sort``): ``list(records)`` makes one.

    It holds the records as plain tuples and makes the :class:`Record` for each one
    as it is read. Plain tuples of ints, bytes and None are untracked by Python's
    garbage collector at its first look; NamedTuples never are, and a consumer's
    records held across a fetch reached the oldest generation, where every full
    collection walked them all again (a third of bench/consume.py's time). A record
    the application keeps is an ordinary Record.
    """

    __slots__ = ("_rows",)

    def __init__(self, rows: list[RecordRow]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> Records: ...

    def __getitem__(self, index: int | slice) -> Record | Records:
        if isinstance(index, slice):
            return Records(self._rows[index])
        return _new_record(Record, self._rows[index])

    def __iter__(self) -> Iterator[Record]:
        return map(_new_record, repeat(Record), self._rows)

    def __reversed__(self) -> Iterator[Record]:
        return map(_new_record, repeat(Record), reversed(self._rows))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Records):
            return self._rows == other._rows
        if isinstance(other, list):  # (as a list, never equal to a tuple)
            return len(other) == len(self._rows) and all(
                a == b for a, b in zip(self._rows, other, strict=True)
            )
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like the list it replaces

    def __repr__(self) -> str:
        return f"Records({list(self)!r})"


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
