"""Kafka RecordBatch v2: the unit of storage, replication and fetch.

Layout (big-endian; 61-byte header, then ``recordCount`` records)::

    offset  size  field
         0     8  baseOffset            written by the leader, not covered by the CRC
         8     4  batchLength           bytes after this field (total size - 12)
        12     4  partitionLeaderEpoch  written by the leader, not covered by the CRC
        16     1  magic                 2
        17     4  crc                   CRC-32C of bytes [21, end)
        21     2  attributes            bits 0-2 compression, 3 timestamp type,
                                        4 transactional, 5 control
        23     4  lastOffsetDelta
        27     8  baseTimestamp
        35     8  maxTimestamp
        43     8  producerId
        51     2  producerEpoch
        53     4  baseSequence
        57     4  recordCount
        61     .  records (compressed as one block when compression != none)

    record: length varint | attributes i8 | timestampDelta varlong | offsetDelta varint |
            keyLength varint | key | valueLength varint | value |
            headerCount varint | (keyLength varint | key utf-8 | valueLength varint | value)*

All varints are zigzag-encoded; a length of -1 means null.

Two halves, for two kinds of callers:

* Broker side (:func:`validate_batches`, :func:`parse_batches`,
  :func:`assign_offsets`): works on whole batches only and never looks at a record,
  because per-record Python work would bound the broker at ~1M records/s instead of
  the ~7M/s an opaque-blob broker reaches (DESIGN.md, "Performance notes").
* Client side (:class:`BatchBuilder`, :func:`decode_records`, :func:`iter_records`):
  per-record work kept tight: one ``bytearray`` per batch, precomputed varint
  encodings, no per-record objects when building.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, Final, NamedTuple

import crc32c

from dlog.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    MessageTooLargeError,
    UnsupportedCompressionTypeError,
)

#: What a batch buffer may be: bytes in, and writable (bytearray/memoryview) when
#: the caller wants offsets assigned in place.
Buffer = bytes | bytearray | memoryview

HEADER_SIZE: Final = 61
#: baseOffset + batchLength: the bytes ``batchLength`` does not count.
LOG_OVERHEAD: Final = 12
MAGIC: Final = 2
#: Smallest legal ``batchLength`` (a header and nothing else).
MIN_BATCH_LENGTH: Final = HEADER_SIZE - LOG_OVERHEAD

BASE_OFFSET_POS: Final = 0
BATCH_LENGTH_POS: Final = 8
PARTITION_LEADER_EPOCH_POS: Final = 12
MAGIC_POS: Final = 16
CRC_POS: Final = 17
ATTRIBUTES_POS: Final = 21
LAST_OFFSET_DELTA_POS: Final = 23
MAX_TIMESTAMP_POS: Final = 35

#: Record timestamp meaning "none" (Kafka's RecordBatch.NO_TIMESTAMP).
NO_TIMESTAMP: Final = -1

COMPRESSION_MASK: Final = 0x07
TIMESTAMP_TYPE_MASK: Final = 0x08
TRANSACTIONAL_MASK: Final = 0x10
CONTROL_MASK: Final = 0x20

#: The whole 61-byte header, field by field (see the table above).
HEADER_STRUCT: Final = struct.Struct(">qiibIhiqqqhii")
_HEADER = HEADER_STRUCT
_OFFSET_LENGTH_EPOCH = struct.Struct(">qii")
_I64 = struct.Struct(">q")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")


class Compression(enum.IntEnum):
    """The compression codec in bits 0-2 of a batch's attributes (Kafka's numbers)."""

    NONE = 0
    GZIP = 1
    SNAPPY = 2
    LZ4 = 3
    ZSTD = 4


#: Codecs dlog can write and read (stdlib only). A leader rejects the others, so no
#: consumer is ever handed a batch it cannot decode.
SUPPORTED_COMPRESSION: Final = frozenset({Compression.NONE, Compression.GZIP})


class BatchHeader(NamedTuple):
    """A parsed batch header plus where the batch starts in the buffer it came from."""

    position: int
    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def size(self) -> int:
        """Total bytes of the batch, header included."""
        return self.batch_length + LOG_OVERHEAD

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.last_offset_delta + 1

    @property
    def compression(self) -> int:
        """The raw codec number (may be one :class:`Compression` does not name)."""
        return self.attributes & COMPRESSION_MASK

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & CONTROL_MASK)

    @property
    def is_transactional(self) -> bool:
        return bool(self.attributes & TRANSACTIONAL_MASK)


def parse_header(buf: Buffer, position: int = 0) -> BatchHeader:
    """Parse the header at ``position`` (structure only: no CRC or semantic checks)."""
    if len(buf) - position < HEADER_SIZE:
        raise CorruptRecordError(
            f"batch at byte {position}: {len(buf) - position} bytes left, a header needs"
            f" {HEADER_SIZE}",
            position=position,
        )
    return BatchHeader._make((position, *_HEADER.unpack_from(buf, position)))


def _check_structure(buf: Buffer, header: BatchHeader) -> None:
    pos = header.position
    if header.batch_length < MIN_BATCH_LENGTH:
        raise CorruptRecordError(
            f"batch at byte {pos}: batchLength {header.batch_length} is below the header size",
            position=pos,
        )
    if pos + header.batch_length + LOG_OVERHEAD > len(buf):
        raise CorruptRecordError(
            f"batch at byte {pos}: batchLength {header.batch_length} runs past the end of the"
            f" {len(buf)}-byte buffer",
            position=pos,
        )
    if header.magic != MAGIC:
        raise CorruptRecordError(
            f"batch at byte {pos}: magic {header.magic}, only {MAGIC} is supported",
            position=pos,
        )


def compute_crc(buf: Buffer, position: int = 0, size: int | None = None) -> int:
    """CRC-32C over the CRC-covered part of the batch at ``position``."""
    if size is None:
        size = _I32.unpack_from(buf, position + BATCH_LENGTH_POS)[0] + LOG_OVERHEAD
    with memoryview(buf) as view:
        return crc32c.crc32c(view[position + ATTRIBUTES_POS : position + size])


def _check_crc(buf: Buffer, header: BatchHeader) -> None:
    actual = compute_crc(buf, header.position, header.size)
    if actual != header.crc:
        raise CorruptRecordError(
            f"batch at byte {header.position}: CRC mismatch (stored {header.crc:#010x},"
            f" computed {actual:#010x})",
            position=header.position,
        )


def _check_counts(header: BatchHeader) -> None:
    if header.record_count < 1:
        raise CorruptRecordError(
            f"batch at byte {header.position}: recordCount {header.record_count}, at least 1",
            position=header.position,
        )
    if header.last_offset_delta != header.record_count - 1:
        raise CorruptRecordError(
            f"batch at byte {header.position}: lastOffsetDelta {header.last_offset_delta} with"
            f" recordCount {header.record_count}",
            position=header.position,
        )


def parse_batches(buf: Buffer, *, verify_crc: bool = True) -> list[BatchHeader]:
    """The headers of every batch in a buffer of concatenated whole batches.

    Checks structure (length, magic), counts and, unless told not to, the CRC of
    every batch; raises :class:`CorruptRecordError` for the first bad one, or for
    trailing bytes that do not form a whole batch. All or nothing: a caller never
    acts on a prefix of a bad buffer.
    """
    return _parse(buf, verify_crc, None)


#: The leader's produce rules for :func:`_parse`: (now_ms or None, max_timestamp_skew_ms,
#: max_batch_bytes, the latest maxTimestamp allowed). A plain tuple: built per append.
_ProduceRules = tuple[int | None, int, int, int]


def _parse(buf: Buffer, verify_crc: bool, rules: _ProduceRules | None) -> list[BatchHeader]:
    """One pass over the batches: structure, CRC, counts and, given ``rules``, the
    leader's produce rules. (One loop, no helper calls unless a check fails: this
    runs for every batch produced or replicated.)"""
    headers: list[BatchHeader] = []
    append = headers.append
    new = tuple.__new__  # BatchHeader._make without its Python frame
    unpack = _HEADER.unpack_from
    crc = crc32c.crc32c
    if rules is not None:
        max_batch_bytes = rules[2]
        latest_timestamp = rules[3]
    pos = 0
    end = len(buf)
    with memoryview(buf) as view:
        while pos < end:
            if end - pos < HEADER_SIZE:
                parse_header(buf, pos)  # raises, naming the problem
            header: BatchHeader = new(BatchHeader, (pos, *unpack(buf, pos)))
            size = header.batch_length + LOG_OVERHEAD
            # The fast path checks; the helpers re-check to raise a precise error.
            if header.batch_length < MIN_BATCH_LENGTH or pos + size > end or header.magic != MAGIC:
                _check_structure(buf, header)
            if verify_crc and crc(view[pos + ATTRIBUTES_POS : pos + size]) != header.crc:
                _check_crc(buf, header)
            if header.record_count < 1 or header.last_offset_delta != header.record_count - 1:
                _check_counts(header)
            if rules is not None:
                attributes = header.attributes
                if (
                    size > max_batch_bytes
                    or attributes & CONTROL_MASK
                    or (attributes & COMPRESSION_MASK) not in SUPPORTED_COMPRESSION
                    or header.max_timestamp > latest_timestamp
                ):
                    _check_produce_rules(header, rules[0], rules[1], max_batch_bytes)
            append(header)
            pos += size
    return headers


def iter_batch_headers(buf: Buffer, *, verify_crc: bool = True) -> Iterator[BatchHeader]:
    """Iterate :func:`parse_batches` (which validates the whole buffer first)."""
    yield from parse_batches(buf, verify_crc=verify_crc)


def validate_batches(
    buf: Buffer,
    *,
    now_ms: int | None,
    max_timestamp_skew_ms: int,
    max_batch_bytes: int,
) -> list[BatchHeader]:
    """Validate every batch of a produce buffer and return their headers.

    The leader's check, done before anything is written so that one bad batch rejects
    the whole buffer: structure, magic, CRC, ``lastOffsetDelta == recordCount - 1``,
    a codec dlog supports, no control batches from clients, each batch at most
    ``max_batch_bytes``, and ``maxTimestamp`` no later than ``now_ms +
    max_timestamp_skew_ms`` (skipped when ``now_ms`` is None). Raises
    :class:`CorruptRecordError`, :class:`UnsupportedCompressionTypeError`,
    :class:`InvalidRecordError`, :class:`MessageTooLargeError` or
    :class:`InvalidTimestampError`.
    """
    return validate_produce(buf, now_ms, max_timestamp_skew_ms, max_batch_bytes)


def validate_produce(
    buf: Buffer, now_ms: int | None, max_timestamp_skew_ms: int, max_batch_bytes: int
) -> list[BatchHeader]:
    """:func:`validate_batches` with positional arguments, for the log's append (a
    keyword call costs more, and this runs for every produce)."""
    if len(buf) == 0:
        raise CorruptRecordError("empty record set")
    latest = (1 << 63) if now_ms is None else now_ms + max_timestamp_skew_ms
    return _parse(buf, True, (now_ms, max_timestamp_skew_ms, max_batch_bytes, latest))


def _check_produce_rules(
    header: BatchHeader, now_ms: int | None, max_timestamp_skew_ms: int, max_batch_bytes: int
) -> None:
    """Raise the precise error for a batch that failed a produce rule."""
    if header.size > max_batch_bytes:
        raise MessageTooLargeError(
            f"batch at byte {header.position} is {header.size} bytes, the limit is"
            f" {max_batch_bytes}",
            position=header.position,
            size=header.size,
            limit=max_batch_bytes,
        )
    if header.compression not in SUPPORTED_COMPRESSION:
        raise UnsupportedCompressionTypeError(
            f"batch at byte {header.position}: compression codec {header.compression} is"
            " not supported (none and gzip are)",
            position=header.position,
            codec=header.compression,
        )
    if header.is_control:
        raise InvalidRecordError(
            f"batch at byte {header.position}: clients may not write control batches",
            position=header.position,
        )
    if now_ms is not None and header.max_timestamp > now_ms + max_timestamp_skew_ms:
        raise InvalidTimestampError(
            f"batch at byte {header.position}: maxTimestamp {header.max_timestamp} is more"
            f" than {max_timestamp_skew_ms} ms after the broker's clock ({now_ms})",
            position=header.position,
            max_timestamp=header.max_timestamp,
            now_ms=now_ms,
        )


def set_base_offset_and_epoch(
    buf: bytearray | memoryview, position: int, base_offset: int, leader_epoch: int
) -> None:
    """Write baseOffset and partitionLeaderEpoch in place; the CRC does not cover them."""
    _I64.pack_into(buf, position + BASE_OFFSET_POS, base_offset)
    _I32.pack_into(buf, position + PARTITION_LEADER_EPOCH_POS, leader_epoch)


def assign_offsets(
    buf: bytearray | memoryview,
    headers: Sequence[BatchHeader],
    first_offset: int,
    leader_epoch: int,
) -> int:
    """Give the batches consecutive offsets starting at ``first_offset``.

    Returns the next offset after the last batch.
    """
    offset = first_offset
    pack = _OFFSET_LENGTH_EPOCH.pack_into
    for header in headers:
        # batchLength sits between the two fields: written back unchanged, so one
        # pack per batch.
        pack(buf, header.position, offset, header.batch_length, leader_epoch)
        offset += header.last_offset_delta + 1
    return offset


# ---------------------------------------------------------------------------------------
# Client side: varints
# ---------------------------------------------------------------------------------------

#: Zigzag varints for 0..TABLE_SIZE-1 are precomputed: record lengths, value lengths
#: and offset deltas of ordinary batches are all in this range.
_TABLE_SIZE: Final = 1 << 14


def _encode_varint(n: int) -> bytes:
    """Zigzag varint (varlong) encoding of a signed 64-bit integer."""
    if not -(1 << 63) <= n < (1 << 63):
        raise ValueError(f"{n} does not fit in a signed 64-bit varint")
    v = (n << 1) ^ (n >> 63)
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


#: Values shorter than this take the fast path: their record length (value plus at
#: most 10 bytes of prefix) is still in the table.
_FAST_MAX_VALUE: Final = _TABLE_SIZE - 16
_VARINT: Final[tuple[bytes, ...]] = tuple(_encode_varint(i) for i in range(_TABLE_SIZE))
#: Record attributes (0), timestampDelta 0, offsetDelta i, keyLength -1: the start of
#: every record of the fast path (no key, no headers, the batch's timestamp).
_NULL_KEY_PREFIX: Final[tuple[bytes, ...]] = tuple(
    b"\x00\x00" + _VARINT[i] + b"\x01" for i in range(_TABLE_SIZE)
)
#: Offset deltas [lo, hi) whose varint is ``width`` bytes, within the table.
_OFFSET_DELTA_WIDTHS: Final = ((0, 64, 1), (64, 8192, 2), (8192, _TABLE_SIZE, 3))
_NULL: Final = b"\x01"  # varint -1
_NO_HEADERS: Final = b"\x00"  # varint 0
_ZIGZAG_BYTE: Final[tuple[int, ...]] = tuple((b >> 1) ^ -(b & 1) for b in range(0x80))


# "Uniform" records: no key, no headers, the batch's timestamp, values of one length n
# (what send_many of fixed-size values makes). Record i is then
#   length | 00 (attributes) | 00 (timestampDelta) | i | 01 (null key) | n | value | 00
# and only i's varint width changes the layout, so both the builder and the decoder
# handle such records with no Python code per record.


#: Byte k of each offset delta's varint (0 past its end): column k of uniform records.
_OFFSET_DELTA_BYTES: Final[tuple[bytes, ...]] = tuple(
    bytes(v[k] if k < len(v) else 0 for v in _VARINT) for k in range(3)
)


def _uniform_ranges(first: int, count: int, n: int) -> list[tuple[int, int, bytes, int, int]]:
    """For records ``first .. first+count-1`` with ``n``-byte values, per offset-delta
    width: (lo, hi, the encoded record length, the record's size in bytes, the width).
    Needs first + count <= _TABLE_SIZE and n < _FAST_MAX_VALUE."""
    value_len = len(_VARINT[n])
    out = []
    for lo, hi, width in _OFFSET_DELTA_WIDTHS:
        a = max(first, lo)
        b = min(first + count, hi)
        if a < b:
            body = 3 + width + value_len + n + 1
            record_len = _VARINT[body]
            out.append((a, b, record_len, len(record_len) + body, width))
    return out


def _join_uniform(first: int, values: Sequence[Buffer], n: int) -> bytes:
    """The encoding of uniform records ``first ..`` holding ``values`` (all ``n`` bytes):
    five pieces a record laid out by list repetition and slice assignment, one join."""
    value_len = _VARINT[n]
    parts: list[Buffer] = []
    for a, b, record_len, _, _ in _uniform_ranges(first, len(values), n):
        parts += [record_len, b"", value_len, b"", _NO_HEADERS] * (b - a)
    parts[1::5] = _NULL_KEY_PREFIX[first : first + len(values)]
    parts[3::5] = values
    return b"".join(parts)


def encode_varint(n: int) -> bytes:
    """Zigzag varint encoding as Kafka's records use it (exposed for tests and tools)."""
    if 0 <= n < _TABLE_SIZE:
        return _VARINT[n]
    return _encode_varint(n)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a zigzag varint at ``pos``; returns (value, next position)."""
    shift = 0
    raw = 0
    while True:
        b = data[pos]
        pos += 1
        raw |= (b & 0x7F) << shift
        if b < 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7
        if shift > 63:
            raise CorruptRecordError(f"varint longer than 10 bytes at record byte {pos}")


def decode_varint(data: bytes, pos: int = 0) -> tuple[int, int]:
    """Decode one zigzag varint; returns (value, next position)."""
    try:
        return _read_varint(data, pos)
    except IndexError:
        raise CorruptRecordError("truncated varint") from None


# ---------------------------------------------------------------------------------------
# Client side: building
# ---------------------------------------------------------------------------------------

Header = tuple[str, bytes | None]


class BatchBuilder:
    """Builds one RecordBatch v2 into one ``bytearray``.

    ``base_timestamp`` is the batch's baseTimestamp and the timestamp of every record
    appended without one (the caller reads its clock once per batch, not per record).
    Records are encoded as they are appended, so no per-record object survives the
    call; :meth:`append_values` is the bulk path for records with only a value.
    :meth:`build` writes the header and CRC and hands over the buffer; the builder
    is finished after it.
    """

    __slots__ = (
        "_base_sequence",
        "_base_timestamp",
        "_buf",
        "_built",
        "_compression",
        "_compression_level",
        "_count",
        "_max_timestamp",
        "_producer_epoch",
        "_producer_id",
    )

    def __init__(
        self,
        base_timestamp: int,
        *,
        compression: Compression = Compression.NONE,
        compression_level: int = 6,
        producer_id: int = -1,
        producer_epoch: int = -1,
        base_sequence: int = -1,
    ) -> None:
        if compression not in SUPPORTED_COMPRESSION:
            raise UnsupportedCompressionTypeError(
                f"compression {Compression(compression).name} is not supported (none and gzip are)",
                codec=int(compression),
            )
        self._base_timestamp = base_timestamp
        self._max_timestamp = NO_TIMESTAMP
        self._compression = Compression(compression)
        self._compression_level = compression_level
        self._producer_id = producer_id
        self._producer_epoch = producer_epoch
        self._base_sequence = base_sequence
        # The header is reserved up front so build() writes it in place, no copy.
        self._buf = bytearray(HEADER_SIZE)
        self._count = 0
        self._built = False

    @property
    def record_count(self) -> int:
        return self._count

    @property
    def size_in_bytes(self) -> int:
        """Bytes so far, header included, before compression: what batch_size counts."""
        return len(self._buf)

    def append(
        self,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        timestamp: int | None = None,
    ) -> int:
        """Add one record; returns its offset delta within the batch."""
        i = self._count
        if self._built:
            raise RuntimeError("BatchBuilder.append after build()")
        if key is None and timestamp is None and not headers and value is not None:
            n = len(value)
            if n < _FAST_MAX_VALUE and i < _TABLE_SIZE:
                prefix = _NULL_KEY_PREFIX[i]
                value_len = _VARINT[n]
                buf = self._buf
                buf += _VARINT[len(prefix) + len(value_len) + n + 1]
                buf += prefix
                buf += value_len
                buf += value
                buf += _NO_HEADERS
                self._count = i + 1
                return i
        elif timestamp is None and not headers and value is not None and key is not None:
            n = len(value)
            k = len(key)
            if n < _FAST_MAX_VALUE and k < _FAST_MAX_VALUE and i < _TABLE_SIZE:
                offset_delta = _VARINT[i]
                key_len = _VARINT[k]
                value_len = _VARINT[n]
                length = 3 + len(offset_delta) + len(key_len) + k + len(value_len) + n
                buf = self._buf
                buf += encode_varint(length)
                buf += b"\x00\x00"
                buf += offset_delta
                buf += key_len
                buf += key
                buf += value_len
                buf += value
                buf += _NO_HEADERS
                self._count = i + 1
                return i
        self._append_general(i, value, key, headers, timestamp)
        return i

    def _append_general(
        self,
        i: int,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[Header] | None,
        timestamp: int | None,
    ) -> None:
        if timestamp is None:
            delta = 0
        else:
            delta = timestamp - self._base_timestamp
            if timestamp > self._max_timestamp:
                self._max_timestamp = timestamp
        parts = [b"\x00", encode_varint(delta), encode_varint(i)]
        if key is None:
            parts.append(_NULL)
        else:
            parts += (encode_varint(len(key)), key)
        if value is None:
            parts.append(_NULL)
        else:
            parts += (encode_varint(len(value)), value)
        if headers:
            parts.append(encode_varint(len(headers)))
            for name, header_value in headers:
                encoded = name.encode()
                parts += (encode_varint(len(encoded)), encoded)
                if header_value is None:
                    parts.append(_NULL)
                else:
                    parts += (encode_varint(len(header_value)), header_value)
        else:
            parts.append(_NO_HEADERS)
        body = b"".join(parts)
        buf = self._buf
        buf += encode_varint(len(body))
        buf += body
        self._count = i + 1

    def append_values(self, values: Iterable[bytes]) -> None:
        """Bulk path: one record per value, no key, no headers, the batch's timestamp."""
        if self._built:
            raise RuntimeError("BatchBuilder.append_values after build()")
        i = self._count
        if isinstance(values, list | tuple) and values:
            lengths = set(map(len, values))
            if len(lengths) == 1:
                n = lengths.pop()
                if n < _FAST_MAX_VALUE and i + len(values) <= _TABLE_SIZE:
                    # No Python code per record: see _join_uniform.
                    self._buf += _join_uniform(i, values, n)
                    self._count = i + len(values)
                    return
        varint = _VARINT
        prefixes = _NULL_KEY_PREFIX
        no_headers = _NO_HEADERS
        # The pieces are collected and joined once: one list extend per record is
        # cheaper than five appends to the growing bytearray.
        parts: list[Buffer] = []
        extend = parts.extend
        for value in values:
            n = len(value)
            if n < _FAST_MAX_VALUE and i < _TABLE_SIZE:
                prefix = prefixes[i]
                value_len = varint[n]
                extend(
                    (
                        varint[len(prefix) + len(value_len) + n + 1],
                        prefix,
                        value_len,
                        value,
                        no_headers,
                    )
                )
                i += 1
            else:
                if parts:
                    self._buf += b"".join(parts)
                    parts.clear()
                self._count = i
                self._append_general(i, value, None, None, None)
                i += 1
        if parts:
            self._buf += b"".join(parts)
        self._count = i

    def build(self) -> bytearray:
        """Finish the batch: header, compression, CRC. baseOffset 0, epoch -1."""
        if self._built:
            raise RuntimeError("BatchBuilder.build called twice")
        if self._count == 0:
            raise ValueError("a record batch needs at least one record")
        self._built = True
        buf = self._buf
        if self._compression is Compression.GZIP:
            compressor = zlib.compressobj(self._compression_level, zlib.DEFLATED, 31)
            with memoryview(buf) as view:
                compressed = compressor.compress(view[HEADER_SIZE:]) + compressor.flush()
            buf = bytearray(HEADER_SIZE) + compressed
            self._buf = buf
        # A record without its own timestamp carries the base timestamp.
        max_timestamp = max(self._max_timestamp, self._base_timestamp)
        _HEADER.pack_into(
            buf,
            0,
            0,
            len(buf) - LOG_OVERHEAD,
            -1,
            MAGIC,
            0,
            int(self._compression),
            self._count - 1,
            self._base_timestamp,
            max_timestamp,
            self._producer_id,
            self._producer_epoch,
            self._base_sequence,
            self._count,
        )
        with memoryview(buf) as view:
            _U32.pack_into(buf, CRC_POS, crc32c.crc32c(view[ATTRIBUTES_POS:]))
        return buf


def build_batch(
    values: Iterable[bytes],
    *,
    base_timestamp: int,
    compression: Compression = Compression.NONE,
) -> bytearray:
    """One batch of value-only records (the bulk producer path)."""
    builder = BatchBuilder(base_timestamp, compression=compression)
    builder.append_values(values)
    return builder.build()


# ---------------------------------------------------------------------------------------
# Client side: decoding
# ---------------------------------------------------------------------------------------


class Record(NamedTuple):
    """One decoded record. ``headers`` is a tuple of (name, value) pairs."""

    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]


_new_record = tuple.__new__  # skips NamedTuple.__new__'s Python-level argument handling

#: A record as a plain tuple, laid out as :class:`Record`: what :func:`decode_rows`
#: returns. Unlike a NamedTuple, a plain tuple of ints, bytes and None is dropped from
#: the garbage collector's lists the first time a collection looks at it, so holding
#: many of them costs no full collections (see :func:`decode_rows`).
RecordRow = tuple[int, int, "bytes | None", "bytes | None", "tuple[Header, ...]"]


def records_section(buf: Buffer, header: BatchHeader) -> bytes:
    """The batch's records as bytes, decompressed if needed (one copy per batch)."""
    start = header.position + HEADER_SIZE
    end = header.position + header.size
    with memoryview(buf) as view:
        raw = view[start:end]
        codec = header.compression
        if codec == Compression.NONE:
            return bytes(raw)
        if codec == Compression.GZIP:
            try:
                return zlib.decompress(raw, 31)
            except zlib.error as exc:
                raise CorruptRecordError(
                    f"batch at offset {header.base_offset}: bad gzip data ({exc})",
                    base_offset=header.base_offset,
                ) from None
    try:
        name = Compression(codec).name
    except ValueError:
        name = str(codec)
    raise UnsupportedCompressionTypeError(
        f"batch at offset {header.base_offset}: compression {name} is not supported",
        codec=codec,
    )


def _decode_headers(data: bytes, pos: int, count: int) -> tuple[tuple[Header, ...], int]:
    out: list[Header] = []
    for _ in range(count):
        name_len, pos = _read_varint(data, pos)
        if name_len < 0:
            raise CorruptRecordError("record header with a null key")
        name = data[pos : pos + name_len].decode()
        pos += name_len
        value_len, pos = _read_varint(data, pos)
        if value_len < 0:
            out.append((name, None))
        else:
            out.append((name, data[pos : pos + value_len]))
            pos += value_len
    return tuple(out), pos


#: Batches with fewer records are decoded record by record (the check costs more).
_UNIFORM_MIN_RECORDS: Final = 16


def _decode_uniform(
    out: list[Any], data: bytes, header: BatchHeader, min_offset: int, kind: type[tuple[Any, ...]]
) -> bool:
    """Decode a batch of uniform records (see :func:`_join_uniform`) without parsing
    record by record; False, with nothing appended, for any other batch.

    The value length is read from the first record, which fixes every record's size
    and layout. The batch is accepted only if its length is exactly that layout's and
    every byte outside the values is what the layout says (checked a column at a time
    with strided slices); then the values are sliced out.
    """
    count = header.record_count
    if count < _UNIFORM_MIN_RECORDS or count > _TABLE_SIZE or len(data) < 8:
        return False
    # The first record: length, attributes 0, timestampDelta 0, offsetDelta 0, null key.
    pos = 1 if data[0] < 0x80 else 2 if data[1] < 0x80 else 3
    if data[pos : pos + 4] != b"\x00\x00\x00\x01":
        return False
    try:
        n = _read_varint(data, pos + 4)[0]
    except IndexError:
        return False
    if not 0 <= n < _FAST_MAX_VALUE:
        return False
    ranges = _uniform_ranges(0, count, n)
    if sum((b - a) * size for a, b, _, size, _ in ranges) != len(data):
        return False
    value_len = _VARINT[n]
    values: list[bytes] = []
    start = 0
    for a, b, record_len, size, width in ranges:
        records = b - a
        end = start + records * size
        # Byte columns: (position in the record, what each record must have there).
        head = record_len + b"\x00\x00"
        tail = b"\x01" + value_len  # null key, value length
        columns = [(j, bytes((c,)) * records) for j, c in enumerate(head)]
        columns += [(len(head) + k, _OFFSET_DELTA_BYTES[k][a:b]) for k in range(width)]
        columns += [(len(head) + width + j, bytes((c,)) * records) for j, c in enumerate(tail)]
        columns.append((size - 1, b"\x00" * records))  # headers count
        value_at = len(head) + width + len(tail)
        for j, expected in columns:
            if data[start + j : end : size] != expected:
                return False
        values += [data[p : p + n] for p in range(start + value_at, end, size)]
        start = end
    base = header.base_offset
    skip = max(0, min_offset - base)
    out += map(
        _new_record,
        repeat(kind),
        zip(
            range(base + skip, base + count),
            repeat(header.base_timestamp),
            repeat(None),
            values[skip:] if skip else values,
            repeat(()),
        ),
    )
    return True


def _decode_into(
    out: list[Any], data: bytes, header: BatchHeader, min_offset: int, kind: type[tuple[Any, ...]]
) -> None:
    """Append the batch's records at or above ``min_offset`` to ``out``, as ``kind``
    (:class:`Record`, or ``tuple`` for rows).

    The loop inlines one- and two-byte varints (every length, offset delta and small
    timestamp delta of an ordinary batch), which is most of its speed.
    """
    base_offset = header.base_offset
    base_timestamp = header.base_timestamp
    zz = _ZIGZAG_BYTE
    read = _read_varint
    append = out.append
    new = _new_record
    pos = 0
    end = len(data)
    count = 0
    while pos < end:
        # length: skipped (the fields are parsed; the total is checked at the end)
        if data[pos] < 0x80:
            pos += 2  # and the attributes byte
        elif data[pos + 1] < 0x80:
            pos += 3
        else:
            pos = read(data, pos)[1] + 1
        b = data[pos]
        if b < 0x80:
            ts_delta = zz[b]
            pos += 1
        else:
            ts_delta, pos = read(data, pos)
        b = data[pos]
        if b < 0x80:
            offset_delta = zz[b]
            pos += 1
        elif data[pos + 1] < 0x80:
            v = (b & 0x7F) | (data[pos + 1] << 7)
            offset_delta = (v >> 1) ^ -(v & 1)
            pos += 2
        else:
            offset_delta, pos = read(data, pos)
        b = data[pos]
        if b == 1:
            key = None
            pos += 1
        else:
            if b < 0x80:
                key_len = zz[b]
                pos += 1
            else:
                key_len, pos = read(data, pos)
            if key_len < 0:
                key = None
            else:
                key = data[pos : pos + key_len]
                pos += key_len
        b = data[pos]
        if b < 0x80:
            value_len = zz[b]
            pos += 1
        elif data[pos + 1] < 0x80:
            v = (b & 0x7F) | (data[pos + 1] << 7)
            value_len = (v >> 1) ^ -(v & 1)
            pos += 2
        else:
            value_len, pos = read(data, pos)
        if value_len < 0:
            value = None
        else:
            stop = pos + value_len
            value = data[pos:stop]
            pos = stop
        if data[pos] == 0:
            pos += 1
            headers: tuple[Header, ...] = ()
        else:
            header_count, pos = read(data, pos)
            headers, pos = _decode_headers(data, pos, header_count)
        count += 1
        offset = base_offset + offset_delta
        if offset >= min_offset:
            append(new(kind, (offset, base_timestamp + ts_delta, key, value, headers)))
    if pos != end or count != header.record_count:
        raise CorruptRecordError(
            f"batch at offset {base_offset}: records do not match recordCount"
            f" {header.record_count}",
            base_offset=base_offset,
        )


def decode_records(buf: Buffer, *, min_offset: int = 0, verify_crc: bool = True) -> list[Record]:
    """Decode every record of the whole batches in ``buf`` (a fetch response's data).

    Records below ``min_offset`` (the fetch offset fell inside a batch) are skipped.
    Raises :class:`CorruptRecordError` on a bad CRC or malformed records,
    :class:`UnsupportedCompressionTypeError` on a codec dlog does not read.
    """
    out: list[Record] = _decode(buf, min_offset, verify_crc, Record)
    return out


def decode_rows(buf: Buffer, *, min_offset: int = 0, verify_crc: bool = True) -> list[RecordRow]:
    """:func:`decode_records` with each record a plain tuple (:data:`RecordRow`): the
    bulk path for ``getmany``-style consumers.

    A consumer holds a fetch's worth of records (tens of thousands) while it hands
    them out, long enough for every one to reach the collector's oldest generation.
    As NamedTuples they stay tracked there, and each full collection walks all of them
    again: that was a third of a consumer's time (bench/consume.py, 2M records: 23
    full collections of 20-75 ms). Plain tuples of untracked values are untracked by
    the first collection that sees them and never walked again.
    """
    out: list[RecordRow] = _decode(buf, min_offset, verify_crc, tuple)
    return out


def _decode(
    buf: Buffer, min_offset: int, verify_crc: bool, kind: type[tuple[Any, ...]]
) -> list[Any]:
    out: list[Any] = []
    for header in iter_batch_headers(buf, verify_crc=verify_crc):
        if header.last_offset < min_offset or header.is_control:
            continue
        data = records_section(buf, header)
        if _decode_uniform(out, data, header, min_offset, kind):
            continue
        try:
            _decode_into(out, data, header, min_offset, kind)
        except (IndexError, UnicodeDecodeError):
            raise CorruptRecordError(
                f"batch at offset {header.base_offset}: malformed record",
                base_offset=header.base_offset,
            ) from None
    return out


def iter_records(buf: Buffer, *, min_offset: int = 0, verify_crc: bool = True) -> Iterator[Record]:
    """Yield records batch by batch (decodes one batch at a time)."""
    for header in iter_batch_headers(buf, verify_crc=verify_crc):
        if header.last_offset < min_offset or header.is_control:
            continue
        batch_records: list[Record] = []
        data = records_section(buf, header)
        try:
            _decode_into(batch_records, data, header, min_offset, Record)
        except (IndexError, UnicodeDecodeError):
            raise CorruptRecordError(
                f"batch at offset {header.base_offset}: malformed record",
                base_offset=header.base_offset,
            ) from None
        yield from batch_records
