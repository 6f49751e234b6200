from __future__ import annotations

import struct

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlog.errors import ProtocolError
from dlog.net.framing import (
    NEED_DATA,
    Frame,
    FrameDecoder,
    FrameTooLargeError,
    encode_frame,
    encode_header,
)


def drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        assert isinstance(frame, Frame)
        frames.append(frame)
    return frames


def test_round_trip_with_and_without_payload() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame({"i": 1, "o": "echo"}) + encode_frame({"i": 2}, b"xyz"))
    frames = drain(decoder)
    assert [f.header["i"] for f in frames] == [1, 2]
    assert frames[0].payload == b""
    assert frames[1].payload == b"xyz"
    assert frames[1].header["p"] == 3
    assert decoder.buffered_bytes == 0


def test_header_and_payload_sent_separately_equal_one_frame() -> None:
    payload = bytes(range(256)) * 10
    assert encode_header({"i": 7}, len(payload)) + payload == encode_frame({"i": 7}, payload)


frames_strategy = st.lists(
    st.tuples(
        st.dictionaries(st.sampled_from("ioveb"), st.integers(0, 2**40) | st.text(max_size=20)),
        st.binary(max_size=300),
    ),
    max_size=8,
)


@given(frames=frames_strategy, cuts=st.lists(st.integers(0, 5000), max_size=20))
def test_any_chunking_yields_the_same_frames(
    frames: list[tuple[dict[str, object], bytes]], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(dict(h), p) for h, p in frames)
    decoder = FrameDecoder()
    got: list[Frame] = []
    start = 0
    for cut in sorted({c % (len(wire) + 1) for c in cuts}) + [len(wire)]:
        decoder.receive_data(wire[start:cut])
        start = cut
        got.extend(drain(decoder))
    assert [(f.header, f.payload) for f in got] == [
        ({**h, **({"p": len(p)} if p else {})}, p) for h, p in frames
    ]


@given(data=st.binary(max_size=2000), chunk=st.integers(1, 64))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_frame_bytes=1024, max_header_bytes=512)
    try:
        for i in range(0, len(data), chunk):
            decoder.receive_data(data[i : i + chunk])
            drain(decoder)
            # Never holds more than one maximal frame plus the chunk just fed.
            assert decoder.buffered_bytes <= 1024 + chunk
    except ProtocolError:
        pass


@given(header=st.binary(min_size=1, max_size=200))
def test_garbage_header_is_a_protocol_error(header: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", len(header)) + header)
    try:
        frame = decoder.next_frame()
    except ProtocolError:
        return
    # Some garbage is valid CBOR for a map: then it must be a well-formed frame.
    if frame is not NEED_DATA:
        assert isinstance(frame, Frame)
        assert isinstance(frame.header, dict)


def test_oversize_frame_is_refused_before_buffering_and_names_the_request() -> None:
    decoder = FrameDecoder(max_frame_bytes=1000)
    decoder.receive_data(encode_header({"i": 42, "o": "produce"}, 5000))
    with pytest.raises(FrameTooLargeError) as info:
        decoder.next_frame()
    assert info.value.details["correlation_id"] == 42
    with pytest.raises(ProtocolError):
        decoder.receive_data(b"more")


def test_oversize_header_is_refused() -> None:
    decoder = FrameDecoder(max_frame_bytes=10_000, max_header_bytes=100)
    decoder.receive_data(struct.pack(">I", 5000))
    with pytest.raises(FrameTooLargeError):
        decoder.next_frame()


@pytest.mark.parametrize(
    "header",
    [cbor2.dumps([1, 2]), cbor2.dumps({"p": -1}), cbor2.dumps({"p": "x"}), b"\xff\xff"],
)
def test_malformed_headers(header: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", len(header)) + header)
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_zero_length_header_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_many_pipelined_frames_do_not_grow_the_buffer() -> None:
    decoder = FrameDecoder()
    frame = encode_frame({"i": 1}, b"x" * 50)
    for _ in range(1000):
        decoder.receive_data(frame * 10)
        assert len(drain(decoder)) == 10
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("bad_p", ["7", -1, 1.5, True, [1], None])
def test_bad_payload_length_in_a_batch_is_a_protocol_error(bad_p: object) -> None:
    """frames() (the batch path) rejects a bad 'p' like next_frame() does, after
    a good frame in the same read."""
    decoder = FrameDecoder()
    good = encode_frame({"i": 1}, b"abc")
    body = cbor2.dumps({"i": 2, "p": bad_p})
    decoder.receive_data(good + len(body).to_bytes(4, "big") + body)
    with pytest.raises(ProtocolError):
        decoder.frames()


def test_a_header_only_frame_over_the_limit_is_too_large_in_a_batch() -> None:
    decoder = FrameDecoder(max_frame_bytes=64, max_header_bytes=1024)
    decoder.receive_data(encode_frame({"i": 1}) + encode_frame({"i": 2, "pad": "x" * 100}))
    with pytest.raises(FrameTooLargeError):
        decoder.frames()
