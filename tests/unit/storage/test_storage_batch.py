"""RecordBatch v2 codec: layout, validation, building and decoding."""

from __future__ import annotations

import struct
import zlib
from unittest import mock

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlog.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    MessageTooLargeError,
    UnsupportedCompressionTypeError,
)
from dlog.storage import batch as batch_module
from dlog.storage.batch import (
    ATTRIBUTES_POS,
    CRC_POS,
    HEADER_SIZE,
    BatchBuilder,
    Compression,
    Record,
    assign_offsets,
    build_batch,
    decode_records,
    decode_rows,
    decode_varint,
    encode_varint,
    iter_batch_headers,
    iter_records,
    parse_header,
    validate_batches,
)

NOW = 1_700_000_000_000


def validate(buf: bytes | bytearray, **overrides: int | None) -> list[object]:
    args: dict[str, int | None] = {
        "now_ms": NOW,
        "max_timestamp_skew_ms": 3_600_000,
        "max_batch_bytes": 1 << 20,
    }
    args.update(overrides)
    return list(validate_batches(buf, **args))  # type: ignore[arg-type]


def reseal(buf: bytearray, pos: int = 0) -> None:
    """Recompute the CRC after a test edits CRC-covered bytes on purpose."""
    size = struct.unpack_from(">i", buf, pos + 8)[0] + 12
    struct.pack_into(
        ">I", buf, pos + CRC_POS, crc32c.crc32c(bytes(buf[pos + ATTRIBUTES_POS : pos + size]))
    )


# -- layout ---------------------------------------------------------------------------------


def test_matches_a_batch_written_by_kafka() -> None:
    # A Kafka 0.11 broker stored the record value b"123" at this timestamp with
    # batchLength 59 and CRC 51946096: same bytes under the CRC means same encoding.
    builder = BatchBuilder(1503229838908)
    builder.append(b"123")
    header = parse_header(builder.build())
    assert header.batch_length == 59
    assert header.crc == 51946096


def test_header_fields_at_their_kafka_positions() -> None:
    builder = BatchBuilder(NOW, producer_id=7, producer_epoch=3, base_sequence=11)
    builder.append(b"a", timestamp=NOW + 5)
    builder.append(b"b")
    buf = builder.build()
    assert len(buf) >= HEADER_SIZE
    base_offset, length, epoch, magic, crc = struct.unpack_from(">qiibI", buf, 0)
    assert (base_offset, length, epoch, magic) == (0, len(buf) - 12, -1, 2)
    assert crc == crc32c.crc32c(bytes(buf[21:]))
    attributes, last_delta, base_ts, max_ts, pid, pepoch, seq, count = struct.unpack_from(
        ">hiqqqhii", buf, 21
    )
    assert (attributes, last_delta, count) == (0, 1, 2)
    assert (base_ts, max_ts) == (NOW, NOW + 5)
    assert (pid, pepoch, seq) == (7, 3, 11)


def test_assigning_offsets_keeps_the_crc_valid() -> None:
    buf = build_batch([b"x", b"y"], base_timestamp=NOW) + build_batch([b"z"], base_timestamp=NOW)
    headers = validate(buf)
    assert assign_offsets(buf, headers, 100, 7) == 103  # type: ignore[arg-type]
    again = list(iter_batch_headers(buf))
    assert [(h.base_offset, h.partition_leader_epoch) for h in again] == [(100, 7), (102, 7)]
    assert [r.offset for r in decode_records(buf)] == [100, 101, 102]


@given(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1))
def test_varint_round_trip(n: int) -> None:
    encoded = encode_varint(n)
    assert decode_varint(encoded) == (n, len(encoded))


def test_varint_known_encodings() -> None:
    # zigzag: 0 -> 0, -1 -> 1, 1 -> 2, 63 -> 126, 64 -> 128 (two bytes)
    assert encode_varint(0) == b"\x00"
    assert encode_varint(-1) == b"\x01"
    assert encode_varint(1) == b"\x02"
    assert encode_varint(64) == b"\x80\x01"
    with pytest.raises(ValueError):
        encode_varint(1 << 63)


# -- round trips ----------------------------------------------------------------------------

header_names = st.text(max_size=8)
maybe_bytes = st.none() | st.binary(max_size=300)
records_strategy = st.lists(
    st.tuples(
        maybe_bytes,  # key
        maybe_bytes,  # value
        st.lists(st.tuples(header_names, maybe_bytes), max_size=3),
        st.none() | st.integers(min_value=0, max_value=(1 << 50)),  # timestamp
    ),
    min_size=1,
    max_size=40,
)


@given(
    records=records_strategy,
    compression=st.sampled_from([Compression.NONE, Compression.GZIP]),
    base_timestamp=st.integers(min_value=0, max_value=1 << 45),
)
def test_codec_round_trip(
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], int | None]],
    compression: Compression,
    base_timestamp: int,
) -> None:
    builder = BatchBuilder(base_timestamp, compression=compression)
    for key, value, headers, timestamp in records:
        builder.append(value, key=key, headers=headers, timestamp=timestamp)
    buf = builder.build()
    (header,) = validate(buf, now_ms=None)
    assert header.record_count == len(records)
    assert header.compression == compression
    expected_max = max([base_timestamp] + [t for *_, t in records if t is not None])
    assert header.max_timestamp == expected_max
    decoded = decode_records(buf)
    assert decoded == [
        Record(
            offset=i,
            timestamp=base_timestamp if timestamp is None else timestamp,
            key=key,
            value=value,
            headers=tuple(headers),
        )
        for i, (key, value, headers, timestamp) in enumerate(records)
    ]
    assert list(iter_records(buf)) == decoded


@given(st.lists(st.binary(max_size=20_000), min_size=1, max_size=30))
def test_bulk_and_per_record_builders_agree(values: list[bytes]) -> None:
    bulk = BatchBuilder(NOW)
    bulk.append_values(values)
    single = BatchBuilder(NOW)
    for value in values:
        single.append(value)
    assert bulk.build() == single.build()


@settings(max_examples=60, deadline=None)
@given(
    before=st.integers(0, 8300),
    count=st.integers(1, 300),
    size=st.sampled_from([0, 1, 63, 64, 100, 8190, 8191, 16_300]),
)
def test_same_length_bulk_path_matches_per_record_appends(
    before: int, count: int, size: int
) -> None:
    # Values of one length take their own path; offset deltas cross the 1-, 2- and
    # 3-byte varint widths depending on how many records the batch already holds.
    filler = [b"f"] * before
    values = [i.to_bytes(4, "big") * (size // 4) + b"v" * (size % 4) for i in range(count)]
    bulk = BatchBuilder(NOW)
    single = BatchBuilder(NOW)
    bulk.append_values(iter(filler))
    bulk.append_values(values)
    for value in filler + values:
        single.append(value)
    assert bulk.build() == single.build()


def test_many_records_cross_the_precomputed_tables() -> None:
    values = [i.to_bytes(3, "big") for i in range(20_000)]
    buf = build_batch(values, base_timestamp=NOW)
    decoded = decode_records(buf)
    assert [r.value for r in decoded] == values
    assert decoded[-1].offset == 19_999


def test_decode_skips_records_below_min_offset() -> None:
    buf = build_batch([b"a", b"b", b"c"], base_timestamp=NOW) + build_batch(
        [b"d"], base_timestamp=NOW
    )
    assign_offsets(buf, list(iter_batch_headers(buf)), 10, 0)
    assert [r.value for r in decode_records(buf, min_offset=11)] == [b"b", b"c", b"d"]
    assert [r.value for r in decode_records(buf, min_offset=13)] == [b"d"]


def test_builder_misuse() -> None:
    builder = BatchBuilder(NOW)
    with pytest.raises(ValueError):
        builder.build()
    builder.append(b"x")
    assert builder.record_count == 1
    assert builder.size_in_bytes > HEADER_SIZE
    builder.build()
    with pytest.raises(RuntimeError):
        builder.append(b"y")
    with pytest.raises(RuntimeError):
        builder.build()
    with pytest.raises(UnsupportedCompressionTypeError):
        BatchBuilder(NOW, compression=Compression.ZSTD)


def test_gzip_batch_is_gzip_on_the_wire() -> None:
    values = [b"hello world " * 10] * 50
    buf = build_batch(values, base_timestamp=NOW, compression=Compression.GZIP)
    assert len(buf) < sum(len(v) for v in values) // 5
    records = zlib.decompress(bytes(buf[HEADER_SIZE:]), 31)  # a plain gzip stream
    assert records.count(b"hello world") == 500


# -- broker-side validation -----------------------------------------------------------------


def test_validates_several_concatenated_batches() -> None:
    first = build_batch([b"a", b"b"], base_timestamp=NOW)
    buf = first + build_batch([b"c"], base_timestamp=NOW)
    headers = validate(buf)
    assert [(h.position, h.record_count) for h in headers] == [(0, 2), (len(first), 1)]


def test_rejects_bad_magic() -> None:
    buf = build_batch([b"a"], base_timestamp=NOW)
    buf[16] = 1
    with pytest.raises(CorruptRecordError, match="magic"):
        validate(buf)


def test_rejects_bad_crc() -> None:
    buf = build_batch([b"a"], base_timestamp=NOW)
    buf[-1] ^= 0xFF
    with pytest.raises(CorruptRecordError, match="CRC"):
        validate(buf)


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_rejects_batch_length_inconsistent_with_buffer(delta: int) -> None:
    buf = build_batch([b"a"], base_timestamp=NOW)
    struct.pack_into(">i", buf, 8, len(buf) - 12 + delta)
    with pytest.raises(CorruptRecordError):
        validate(buf)


def test_rejects_batch_length_below_header() -> None:
    buf = build_batch([b"a"], base_timestamp=NOW)
    struct.pack_into(">i", buf, 8, 10)
    with pytest.raises(CorruptRecordError, match="below the header"):
        validate(buf)


@pytest.mark.parametrize("garbage", [b"\x00", b"x" * 60, bytes(70)])
def test_rejects_trailing_bytes(garbage: bytes) -> None:
    buf = build_batch([b"a"], base_timestamp=NOW) + garbage
    with pytest.raises(CorruptRecordError):
        validate(buf)


def test_rejects_empty_input() -> None:
    with pytest.raises(CorruptRecordError):
        validate(b"")


def test_rejects_last_offset_delta_not_matching_count() -> None:
    buf = build_batch([b"a", b"b"], base_timestamp=NOW)
    struct.pack_into(">i", buf, 23, 5)
    reseal(buf)
    with pytest.raises(CorruptRecordError, match="lastOffsetDelta"):
        validate(buf)


def test_rejects_zero_records() -> None:
    buf = build_batch([b"a"], base_timestamp=NOW)
    struct.pack_into(">i", buf, 57, 0)
    struct.pack_into(">i", buf, 23, -1)
    reseal(buf)
    with pytest.raises(CorruptRecordError, match="recordCount"):
        validate(buf)


@pytest.mark.parametrize("codec", [2, 3, 4, 7])
def test_rejects_unsupported_compression(codec: int) -> None:
    buf = build_batch([b"a"], base_timestamp=NOW)
    struct.pack_into(">h", buf, 21, codec)
    reseal(buf)
    with pytest.raises(UnsupportedCompressionTypeError) as info:
        validate(buf)
    assert info.value.details["codec"] == codec
    with pytest.raises(UnsupportedCompressionTypeError):
        decode_records(buf)


def test_rejects_control_batches_from_clients() -> None:
    buf = build_batch([b"a"], base_timestamp=NOW)
    struct.pack_into(">h", buf, 21, 0x20)
    reseal(buf)
    with pytest.raises(InvalidRecordError):
        validate(buf)


def test_timestamp_skew() -> None:
    skew = 3_600_000
    ok = build_batch([b"a"], base_timestamp=NOW + skew)
    validate(ok)
    late = build_batch([b"a"], base_timestamp=NOW + skew + 1)
    with pytest.raises(InvalidTimestampError) as info:
        validate(late)
    assert info.value.details["max_timestamp"] == NOW + skew + 1
    validate(late, now_ms=None)  # followers and recovery do not check the clock


def test_rejects_too_large_batch() -> None:
    buf = build_batch([bytes(1000)], base_timestamp=NOW)
    with pytest.raises(MessageTooLargeError):
        validate(buf, max_batch_bytes=len(buf) - 1)
    validate(buf, max_batch_bytes=len(buf))


def test_one_bad_batch_among_good_ones_fails_the_whole_buffer() -> None:
    good = build_batch([b"a"], base_timestamp=NOW)
    bad = build_batch([b"b"], base_timestamp=NOW)
    bad[-1] ^= 1
    with pytest.raises(CorruptRecordError) as info:
        validate(good + bad + good)
    assert info.value.details["position"] == len(good)


def test_malformed_records_under_a_valid_crc() -> None:
    buf = build_batch([b"abc"], base_timestamp=NOW)
    struct.pack_into(">i", buf, 57, 2)  # claims two records, has one
    struct.pack_into(">i", buf, 23, 1)
    reseal(buf)
    with pytest.raises(CorruptRecordError):
        decode_records(buf)
    buf = build_batch([b"abc"], base_timestamp=NOW)
    buf[HEADER_SIZE + 5] = 0x7E  # value length now runs past the end
    reseal(buf)
    with pytest.raises(CorruptRecordError):
        decode_records(buf)


def test_corrupt_gzip_payload() -> None:
    buf = build_batch([b"abc" * 100], base_timestamp=NOW, compression=Compression.GZIP)
    buf[HEADER_SIZE + 12] ^= 0xFF
    reseal(buf)
    with pytest.raises(CorruptRecordError):
        decode_records(buf)


def test_bulk_appends_in_several_calls_match_per_record_appends() -> None:
    chunks = [[b"a" * 10, b"b" * 20_000, b"c"], [b"d" * 100] * 3, [b"e" * 17_000]]
    bulk = BatchBuilder(NOW)
    single = BatchBuilder(NOW)
    for chunk in chunks:
        bulk.append_values(chunk)
        for value in chunk:
            single.append(value)
    assert bulk.build() == single.build()


# -- uniform batches: one value length, no keys, no headers ----------------------------------


def decode_record_by_record(buf: bytes, min_offset: int = 0) -> list[Record] | str:
    """decode_records with the uniform-batch shortcut switched off (or the error's name)."""
    with mock.patch.object(batch_module, "_decode_uniform", return_value=False):
        try:
            return decode_records(buf, min_offset=min_offset)
        except CorruptRecordError:
            return "CorruptRecordError"


def decode_or_error(buf: bytes, min_offset: int = 0) -> list[Record] | str:
    try:
        return decode_records(buf, min_offset=min_offset)
    except CorruptRecordError:
        return "CorruptRecordError"


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 9000),
    size=st.sampled_from([0, 1, 63, 64, 100, 8191, 16_300]),
    skip=st.integers(0, 9001),
)
def test_uniform_batches_decode_like_any_other(count: int, size: int, skip: int) -> None:
    values = [i.to_bytes(4, "big") * (size // 4) + b"v" * (size % 4) for i in range(count)]
    builder = BatchBuilder(NOW)
    builder.append_values(values)
    buf = bytes(builder.build())
    header = next(iter_batch_headers(buf))
    shortcut: list[Record] = []
    taken = batch_module._decode_uniform(
        shortcut, batch_module.records_section(buf, header), header, 0, Record
    )
    assert taken == (count >= batch_module._UNIFORM_MIN_RECORDS)
    assert decode_records(buf, min_offset=skip) == decode_record_by_record(buf, skip)
    assert [r.value for r in decode_records(buf)] == values


@settings(max_examples=300, deadline=None)
@given(
    count=st.sampled_from([16, 17, 100, 300]),
    size=st.sampled_from([0, 3, 100, 130]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=3),
    resize=st.sampled_from([None, "insert", "delete"]),
)
def test_a_damaged_uniform_batch_decodes_exactly_as_record_by_record(
    count: int, size: int, edits: list[tuple[int, int]], resize: str | None
) -> None:
    # A batch that is almost uniform (a byte changed, added or removed, CRC recomputed
    # as a buggy or hostile producer would) must not be misread by the shortcut: it
    # gives the same records, or the same error, as parsing record by record.
    builder = BatchBuilder(NOW)
    builder.append_values([bytes([i % 251]) * size for i in range(count)])
    buf = builder.build()
    body = len(buf) - HEADER_SIZE
    for where, byte in edits:
        buf[HEADER_SIZE + where % body] = byte
    if resize is not None:
        where = HEADER_SIZE + edits[0][0] % body
        if resize == "insert":
            buf[where:where] = b"\x00"
        else:
            del buf[where]
        struct.pack_into(">i", buf, 8, len(buf) - 12)
    reseal(buf)
    assert decode_or_error(bytes(buf)) == decode_record_by_record(bytes(buf))


@pytest.mark.parametrize("count", [3, 100])  # record by record, and the uniform shortcut
def test_rows_are_the_records_as_plain_tuples_the_collector_lets_go(count: int) -> None:
    import gc

    uniform = build_batch([b"v%04d" % i for i in range(count)], base_timestamp=NOW)
    builder = BatchBuilder(NOW)
    builder.append(b"x", key=b"k", headers=[("h", b"1")])
    builder.append(None, timestamp=NOW + 5)
    buf = uniform + builder.build()
    assign_offsets(buf, list(iter_batch_headers(buf)), 40, 0)
    for min_offset in (0, 41, 40 + count):
        records = decode_records(buf, min_offset=min_offset)
        rows = decode_rows(buf, min_offset=min_offset)
        assert rows == [tuple(r) for r in records]
        assert {type(row) for row in rows} == {tuple}
    rows = decode_rows(buf)
    records = decode_records(buf)
    for _ in range(3):  # a pass untracks a tuple once what it holds is untracked:
        gc.collect()  # headers are tuples of tuples, three levels with the row
    # What the consumer holds costs the collector nothing once it has looked at it
    # (a NamedTuple, like Record, stays tracked for good).
    assert not any(gc.is_tracked(row) for row in rows)
    assert all(gc.is_tracked(record) for record in records)
