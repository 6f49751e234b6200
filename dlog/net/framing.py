"""Sans-I/O framing: bytes in, frames out; frames in, bytes out.

A frame on the wire::

    u32 big-endian header_length | CBOR header (a map), header_length bytes | payload

The header's key ``"p"`` says how many raw payload bytes follow it (absent means 0).
Record batches travel as the payload, so bulk data never passes through cbor2.

Header keys (kept to one letter: they are encoded for every request):

- ``"i"``: correlation id (int), on every request and response.
- ``"o"``: operation name (str), on requests.
- ``"v"``: message version (int), on requests.
- ``"b"``: message body (map), on requests and successful responses.
- ``"e"``: error (map: code, message, details), on failed responses.
- ``"p"``: payload length in bytes.

:class:`FrameDecoder` never buffers more than one frame of ``max_frame_bytes`` plus
what it was fed beyond it, and raises only :class:`~dlog.errors.ProtocolError`. After
an error the decoder is unusable; the connection must be closed.

This module imports neither trio nor socket.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Final, NamedTuple

import cbor2

from dlog.errors import MessageTooLargeError, ProtocolError

_U32: Final = struct.Struct(">I")
PREFIX_BYTES: Final = 4
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES: Final = 1024 * 1024


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by :meth:`FrameDecoder.next_frame` when no whole frame is buffered yet.
NEED_DATA: Final = _NeedData.NEED_DATA


class Frame(NamedTuple):
    """One decoded frame: the CBOR header (a dict) and the raw payload."""

    header: dict[Any, Any]
    payload: bytes


_new_frame = tuple.__new__  # skips NamedTuple.__new__'s argument handling (hot path)


class FrameTooLargeError(ProtocolError, MessageTooLargeError):
    """A frame (or its header) is larger than the configured maximum.

    ``details`` may hold ``correlation_id`` when the header could still be read, so
    the server can answer before it closes the connection.
    """


def encode_header(header: dict[str, Any], payload_length: int = 0) -> bytes:
    """The prefix and CBOR header of a frame whose payload follows separately.

    Sets ``header["p"]`` when there is a payload. The caller sends the returned
    bytes, then the payload chunks, with nothing between.
    """
    if payload_length:
        header["p"] = payload_length
    encoded = cbor2.dumps(header)
    return _U32.pack(len(encoded)) + encoded


# --- headers assembled from CBOR pieces (the hot paths) -------------------------------
#
# cbor2 spends most of an encode of a small header on its two maps (about 0.8 us each,
# against 0.2 us for an int), so the request and response headers are assembled here
# from constant bytes and pre-encoded pieces; the body comes already encoded from
# :func:`dlog.net.messages.body_cbor`. The bytes decode to the same map
# :func:`encode_header` would make.

_U16: Final = struct.Struct(">H")
_U64: Final = struct.Struct(">Q")
_SMALL_UINTS: Final = tuple(bytes((n,)) if n < 24 else bytes((0x18, n)) for n in range(256))
_MAP_HEADS: Final = tuple(bytes((0xA0 + n,)) for n in range(24))  # CBOR_MAP + n
_TEXT_HEADS: Final = tuple(bytes((0x60 + n,)) for n in range(24))  # CBOR_TEXT + n


def cbor_uint(n: int) -> bytes:
    """The CBOR encoding of an unsigned integer ``0 <= n < 2**64``."""
    if n < 256:
        return _SMALL_UINTS[n]
    if n < 0x10000:
        return b"\x19" + _U16.pack(n)
    if n < 0x100000000:
        return b"\x1a" + _U32.pack(n)
    return b"\x1b" + _U64.pack(n)


#: CBOR major types, as the top three bits of an item's first byte.
CBOR_TEXT: Final = 0x60
CBOR_ARRAY: Final = 0x80
CBOR_MAP: Final = 0xA0


def cbor_head(major: int, n: int) -> bytes:
    """The head of a CBOR item of major type ``major`` (e.g. :data:`CBOR_ARRAY`) with
    argument ``n`` (a length): :func:`cbor_uint`'s encoding with the type bits set."""
    head = cbor_uint(n)  # major type 0: its top three bits are 0
    return bytes((head[0] | major,)) + head[1:]


def cbor_text(text: str) -> bytes:
    """The CBOR encoding of a text string."""
    data = text.encode()
    n = len(data)
    if n < 24:
        return _TEXT_HEADS[n] + data
    return cbor_head(CBOR_TEXT, n) + data


def encode_call_header(
    cid: int | None, op_cbor: bytes, body_cbor: bytes, version: int, payload_length: int
) -> bytes:
    """The prefix and header of a request: ``{"i": cid, "o": op, "b": body}`` plus
    ``"v"`` when ``version`` and ``"p"`` when ``payload_length``; a one-way request
    (``cid`` None) carries ``"n": true`` instead of ``"i"``. ``op_cbor`` is
    :func:`cbor_text` of the operation name and ``body_cbor`` the encoded body map."""
    if cid is not None and not version and not payload_length:
        # The common shape in one join, its length summed rather than measured.
        cid_cbor = cbor_uint(cid)
        return b"".join(
            (
                _U32.pack(7 + len(cid_cbor) + len(op_cbor) + len(body_cbor)),
                b"\xa3\x61i",
                cid_cbor,
                b"\x61o",
                op_cbor,
                b"\x61b",
                body_cbor,
            )
        )
    parts = [
        _MAP_HEADS[3 + (version != 0) + (payload_length != 0)],
        b"\x61i" + cbor_uint(cid) if cid is not None else b"\x61n\xf5",
        b"\x61o",
        op_cbor,
        b"\x61b",
        body_cbor,
    ]
    if version:
        parts.append(b"\x61v" + cbor_uint(version))
    if payload_length:
        parts.append(b"\x61p" + cbor_uint(payload_length))
    encoded = b"".join(parts)
    return _U32.pack(len(encoded)) + encoded


def encode_reply_header(cid: int, body_cbor: bytes, payload_length: int) -> bytes:
    """The prefix and header of a successful response: ``{"i": cid, "b": body}`` plus
    ``"p"`` when ``payload_length``."""
    if payload_length:
        encoded = b"".join(
            (b"\xa3\x61i", cbor_uint(cid), b"\x61b", body_cbor, b"\x61p", cbor_uint(payload_length))
        )
        return _U32.pack(len(encoded)) + encoded
    cid_cbor = cbor_uint(cid)
    return b"".join(
        (_U32.pack(5 + len(cid_cbor) + len(body_cbor)), b"\xa2\x61i", cid_cbor, b"\x61b", body_cbor)
    )


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A whole frame as one bytes object (for small payloads and tests)."""
    return encode_header(header, len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream, fed in arbitrary chunks, into frames.

    ``receive_data(chunk)`` appends; ``next_frame()`` returns a :class:`Frame` or
    :data:`NEED_DATA`. A frame whose declared size exceeds ``max_frame_bytes`` (or
    whose header exceeds ``max_header_bytes``) raises :class:`FrameTooLargeError`
    before its bytes are buffered; a malformed header raises ProtocolError.

    Buffering: small frames are parsed straight out of the chunk they arrived in (no
    copy into a buffer); the payload of a large frame that spans many chunks is
    collected as a list of chunks and joined once, so it is copied exactly once.
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_header",
        "_parts",
        "_parts_len",
        "_payload_len",
        "_pos",
        "max_frame_bytes",
        "max_header_bytes",
    )

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        if max_frame_bytes < 16 or max_header_bytes < 16:
            raise ValueError("max_frame_bytes and max_header_bytes must be at least 16")
        self.max_frame_bytes = max_frame_bytes
        self.max_header_bytes = min(max_header_bytes, max_frame_bytes)
        # Unparsed bytes are self._buf[self._pos:].
        self._buf: bytes = b""
        self._pos = 0
        # A frame whose header is decoded but whose payload is still arriving: its
        # payload so far is self._parts (self._parts_len bytes of self._payload_len).
        self._header: dict[Any, Any] | None = None
        self._parts: list[bytes] = []
        self._parts_len = 0
        self._payload_len = 0
        self._broken = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet returned as part of a frame."""
        return len(self._buf) - self._pos + self._parts_len

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            raise ProtocolError("decoder used after a protocol error")
        if not data:
            return
        if self._header is not None:
            self._parts.append(bytes(data))
            self._parts_len += len(self._parts[-1])
        elif self._pos >= len(self._buf):
            self._buf = bytes(data)
            self._pos = 0
        else:
            self._buf = self._buf[self._pos :] + bytes(data)
            self._pos = 0

    def frames(self) -> list[Frame]:
        """Every whole frame buffered now (possibly none), in order.

        The batch form of :meth:`next_frame`: a connection handles what one read
        brought in one loop. Raises ProtocolError like :meth:`next_frame`.
        """
        out: list[Frame] = []
        if self._header is not None:  # finish the frame whose payload was arriving
            frame = self.next_frame()
            if frame is NEED_DATA:
                return out
            out.append(frame)
        elif self._broken:
            raise ProtocolError("decoder used after a protocol error")
        # Fast path, one loop with no calls but cbor2's: the whole, well-formed frames
        # in the buffer. Anything else (a partial frame, a bad or oversize header) stops
        # it, and next_frame() takes over to wait for data or raise the precise error.
        buf = self._buf
        pos = self._pos
        end = len(buf)
        unpack = _U32.unpack_from
        loads = cbor2.loads
        append = out.append
        max_header = self.max_header_bytes
        max_frame = self.max_frame_bytes
        while end - pos >= PREFIX_BYTES:
            (header_len,) = unpack(buf, pos)
            header_end = pos + PREFIX_BYTES + header_len
            if not 0 < header_len <= max_header or header_end > end:
                break
            try:
                header = loads(buf[pos + PREFIX_BYTES : header_end])
            except Exception:
                break
            if type(header) is not dict:
                break
            payload_len = header.get("p", 0)
            if type(payload_len) is not int or payload_len < 0:
                break
            frame_end = header_end + payload_len
            if frame_end - pos > max_frame or frame_end > end:
                break
            append(_new_frame(Frame, (header, buf[header_end:frame_end] if payload_len else b"")))
            pos = frame_end
        self._pos = pos
        while True:
            frame = self.next_frame()
            if frame is NEED_DATA:
                return out
            out.append(frame)

    def next_frame(self) -> Frame | _NeedData:
        if self._broken:
            raise ProtocolError("decoder used after a protocol error")
        try:
            if self._header is not None:
                return self._finish_payload()
            return self._next_frame()
        except ProtocolError:
            self._broken = True
            raise

    def _finish_payload(self) -> Frame | _NeedData:
        if self._parts_len < self._payload_len:
            return NEED_DATA
        header = self._header
        assert header is not None
        parts = self._parts
        extra = self._parts_len - self._payload_len
        if extra:
            # The last chunk also holds the start of what follows: split it, so the
            # payload is still copied only once (by the join).
            last = parts[-1]
            parts[-1] = last[: len(last) - extra]
            self._buf = last[len(last) - extra :]
        else:
            self._buf = b""
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos = 0
        self._header = None
        self._parts = []
        self._parts_len = 0
        return _new_frame(Frame, (header, payload))

    def _next_frame(self) -> Frame | _NeedData:
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < PREFIX_BYTES:
            return NEED_DATA
        (header_len,) = _U32.unpack_from(buf, pos)
        if header_len > self.max_header_bytes:
            raise FrameTooLargeError(
                f"frame header of {header_len} bytes exceeds {self.max_header_bytes}"
            )
        if header_len == 0:
            raise ProtocolError("empty frame header")
        header_end = pos + PREFIX_BYTES + header_len
        if len(buf) < header_end:
            return NEED_DATA
        header = self._decode_header(buf, pos + PREFIX_BYTES, header_end)
        payload_len = header.get("p", 0)
        if type(payload_len) is not int or payload_len < 0:
            raise ProtocolError("frame header 'p' must be a non-negative integer")
        if PREFIX_BYTES + header_len + payload_len > self.max_frame_bytes:
            cid = header.get("i")
            details = {"correlation_id": cid} if type(cid) is int else {}
            raise FrameTooLargeError(
                f"frame of {PREFIX_BYTES + header_len + payload_len} bytes exceeds "
                f"{self.max_frame_bytes}",
                **details,
            )
        frame_end = header_end + payload_len
        if len(buf) >= frame_end:
            self._pos = frame_end
            payload = buf[header_end:frame_end] if payload_len else b""
            return _new_frame(Frame, (header, payload))
        # The payload continues in later chunks: collect them, join once.
        self._header = header
        self._payload_len = payload_len
        self._parts = [buf[header_end:]]
        self._parts_len = len(buf) - header_end
        self._buf = b""
        self._pos = 0
        return NEED_DATA

    @staticmethod
    def _decode_header(buf: bytes, start: int, end: int) -> dict[Any, Any]:
        try:
            header = cbor2.loads(buf[start:end])
        except Exception as exc:  # cbor2 raises several types for bad input
            raise ProtocolError(f"undecodable frame header: {exc}") from None
        if not isinstance(header, dict):
            raise ProtocolError("frame header is not a map")
        return header
