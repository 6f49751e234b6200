"""Gossip wire messages and their CBOR codec (sans-I/O).

A datagram is the CBOR array ``[version, sender, incarnation, primary, [update, ...]]``:

* ``sender`` and ``incarnation`` say who sent it and at which incarnation, so a
  receiver that still holds the sender suspect or dead at an older incarnation can
  tell it (and hear the refutation back);
* ``primary`` is at most one request or reply (ping, ack, nack, ping-req, sync) or
  null when the datagram only carries gossip;
* the updates (alive, suspect, dead, left) are membership changes piggybacked on it.
  The receiver applies the updates before it handles the primary, so an ack answers
  with the refutation of a suspicion that rode on the ping.

Every message is a CBOR array whose first item is its kind. Updates are encoded once
and kept as bytes in the broadcast queue; :func:`assemble_datagram` concatenates
pre-encoded items behind a hand-written array header, so filling a datagram up to
its size bound never re-encodes anything.

:func:`decode_datagram` validates every field (types, ranges, sizes) and raises
:class:`MalformedDatagram` on anything else; it never raises another exception.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from dlog.types import NodeId

#: Version of the datagram layout; a datagram with another version is dropped.
PROTOCOL_VERSION = 1

#: (host, port) as given to and reported by sockets.
Address = tuple[str, int]

_MAX_INT = 2**63 - 1
_MAX_HOST = 255
_MAX_META_ITEMS = 32
_MAX_META_STR = 256


class MalformedDatagram(ValueError):
    """Bytes that are not a valid gossip datagram."""


# Message kinds on the wire.
_PING = 0
_ACK = 1
_NACK = 2
_PING_REQ = 3
_SYNC = 4
_ALIVE = 10
_SUSPECT = 11
_DEAD = 12
_LEFT = 13

# Member states inside a sync entry.
STATE_ALIVE = 0
STATE_SUSPECT = 1
STATE_DEAD = 2
STATE_LEFT = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    seq: int
    #: The node the sender means to reach; a different node at that address ignores it.
    target: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    """An intermediary's "I asked, the target did not answer" (Lifeguard)."""

    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PingReq:
    seq: int
    target: NodeId
    target_address: Address
    #: Whether the requester wants a nack when the target does not answer.
    nack: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncEntry:
    node_id: NodeId
    incarnation: int
    state: int
    address: Address
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Sync:
    """Part of a push-pull state exchange: some members as the sender sees them."""

    #: The receiver answers with its own full state.
    want_reply: bool
    entries: tuple[SyncEntry, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Alive:
    node_id: NodeId
    incarnation: int
    address: Address
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspect:
    node_id: NodeId
    incarnation: int
    #: Who suspects it; distinct accusers shorten the suspicion timeout.
    accuser: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class Dead:
    node_id: NodeId
    incarnation: int
    accuser: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class Left:
    node_id: NodeId
    incarnation: int


Primary = Ping | Ack | Nack | PingReq | Sync
Update = Alive | Suspect | Dead | Left


@dataclass(frozen=True, slots=True, kw_only=True)
class Datagram:
    sender: NodeId
    incarnation: int
    primary: Primary | None
    updates: tuple[Update, ...]


# -- encoding -------------------------------------------------------------------------


def _entry_item(entry: SyncEntry) -> list[Any]:
    host, port = entry.address
    return [entry.node_id, entry.incarnation, entry.state, host, port, dict(entry.metadata)]


def _message_item(message: Primary | Update) -> list[Any]:
    match message:
        case Ping(seq=seq, target=target):
            return [_PING, seq, target]
        case Ack(seq=seq):
            return [_ACK, seq]
        case Nack(seq=seq):
            return [_NACK, seq]
        case PingReq(seq=seq, target=target, target_address=(host, port), nack=nack):
            return [_PING_REQ, seq, target, host, port, nack]
        case Sync(want_reply=want_reply, entries=entries):
            return [_SYNC, want_reply, [_entry_item(e) for e in entries]]
        case Alive(node_id=node_id, incarnation=inc, address=(host, port), metadata=meta):
            return [_ALIVE, node_id, inc, host, port, dict(meta)]
        case Suspect(node_id=node_id, incarnation=inc, accuser=accuser):
            return [_SUSPECT, node_id, inc, accuser]
        case Dead(node_id=node_id, incarnation=inc, accuser=accuser):
            return [_DEAD, node_id, inc, accuser]
        case Left(node_id=node_id, incarnation=inc):
            return [_LEFT, node_id, inc]
        case _:  # pragma: no cover - exhaustive above; a tuple pattern hides it from mypy
            raise TypeError(f"not a gossip message: {message!r}")


def encode_message(message: Primary | Update) -> bytes:
    """One message as CBOR, ready for :func:`assemble_datagram`."""
    return cbor2.dumps(_message_item(message))


def encode_entry(entry: SyncEntry) -> bytes:
    return cbor2.dumps(_entry_item(entry))


def array_header(length: int) -> bytes:
    """The CBOR header of an array of ``length`` items."""
    if length < 24:
        return bytes((0x80 | length,))
    if length < 256:
        return bytes((0x98, length))
    if length < 65536:
        return bytes((0x99, length >> 8, length & 0xFF))
    raise ValueError("array too long for a datagram")


_NULL = b"\xf6"


def datagram_prefix(sender: NodeId, incarnation: int) -> bytes:
    """The first bytes of every datagram ``sender`` sends at ``incarnation``."""
    return b"".join(
        (bytes((0x85, PROTOCOL_VERSION)), cbor2.dumps(sender), cbor2.dumps(incarnation))
    )


def datagram_overhead(prefix: bytes, primary: bytes | None, updates: int) -> int:
    """Bytes a datagram needs besides its updates."""
    return len(prefix) + len(primary or _NULL) + len(array_header(updates))


def assemble_datagram(prefix: bytes, primary: bytes | None, updates: list[bytes]) -> bytes:
    """A datagram from pre-encoded parts (see :func:`encode_message`)."""
    return b"".join((prefix, primary or _NULL, array_header(len(updates)), *updates))


def sync_datagram(prefix: bytes, want_reply: bool, entries: list[bytes]) -> bytes:
    """A datagram whose primary is a sync of pre-encoded entries (see encode_entry)."""
    # [_SYNC, want_reply, [entry, ...]]; a uint below 24 is its own header byte.
    body = b"".join(
        (
            bytes((0x83, _SYNC)),
            b"\xf5" if want_reply else b"\xf4",
            array_header(len(entries)),
            *entries,
        )
    )
    return assemble_datagram(prefix, body, [])


def sync_overhead(prefix: bytes, entries: int) -> int:
    """Bytes a sync datagram of ``entries`` entries needs besides the entries."""
    return len(prefix) + 3 + len(array_header(entries)) + len(array_header(0))


# -- decoding -------------------------------------------------------------------------


def _int(value: object, low: int = 0, high: int = _MAX_INT) -> int:
    if type(value) is not int or not low <= value <= high:
        raise MalformedDatagram(f"expected an integer in [{low}, {high}], got {value!r}")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise MalformedDatagram(f"expected a bool, got {value!r}")
    return value


def _address(host: object, port: object) -> Address:
    if type(host) is not str or not 0 < len(host) <= _MAX_HOST:
        raise MalformedDatagram(f"bad host {host!r}")
    return (host, _int(port, 0, 65535))


def _metadata(value: object) -> dict[str, str]:
    if type(value) is not dict or len(value) > _MAX_META_ITEMS:
        raise MalformedDatagram("metadata must be a small map")
    for key, item in value.items():
        if type(key) is not str or type(item) is not str:
            raise MalformedDatagram("metadata keys and values must be text")
        if len(key) > _MAX_META_STR or len(item) > _MAX_META_STR:
            raise MalformedDatagram("metadata key or value too long")
    return value


def _node(value: object) -> NodeId:
    return NodeId(_int(value))


def _fields(item: list[Any], count: int) -> list[Any]:
    if len(item) != count:
        raise MalformedDatagram(f"message kind {item[0]!r} needs {count} fields")
    return item


def _entry(item: object) -> SyncEntry:
    if type(item) is not list or len(item) != 6:
        raise MalformedDatagram("bad sync entry")
    node_id, inc, state, host, port, meta = item
    return SyncEntry(
        node_id=_node(node_id),
        incarnation=_int(inc),
        state=_int(state, STATE_ALIVE, STATE_LEFT),
        address=_address(host, port),
        metadata=_metadata(meta),
    )


def _decode_message(item: object) -> Primary | Update:
    if type(item) is not list or not item:
        raise MalformedDatagram("a message is a non-empty array")
    kind = item[0]
    if kind == _PING:
        _, seq, target = _fields(item, 3)
        return Ping(seq=_int(seq), target=_node(target))
    if kind == _ACK:
        _, seq = _fields(item, 2)
        return Ack(seq=_int(seq))
    if kind == _NACK:
        _, seq = _fields(item, 2)
        return Nack(seq=_int(seq))
    if kind == _PING_REQ:
        _, seq, target, host, port, nack = _fields(item, 6)
        return PingReq(
            seq=_int(seq),
            target=_node(target),
            target_address=_address(host, port),
            nack=_bool(nack),
        )
    if kind == _SYNC:
        _, want_reply, entries = _fields(item, 3)
        if type(entries) is not list:
            raise MalformedDatagram("sync entries must be an array")
        return Sync(want_reply=_bool(want_reply), entries=tuple(_entry(e) for e in entries))
    if kind == _ALIVE:
        _, node_id, inc, host, port, meta = _fields(item, 6)
        return Alive(
            node_id=_node(node_id),
            incarnation=_int(inc),
            address=_address(host, port),
            metadata=_metadata(meta),
        )
    if kind == _SUSPECT:
        _, node_id, inc, accuser = _fields(item, 4)
        return Suspect(node_id=_node(node_id), incarnation=_int(inc), accuser=_node(accuser))
    if kind == _DEAD:
        _, node_id, inc, accuser = _fields(item, 4)
        return Dead(node_id=_node(node_id), incarnation=_int(inc), accuser=_node(accuser))
    if kind == _LEFT:
        _, node_id, inc = _fields(item, 3)
        return Left(node_id=_node(node_id), incarnation=_int(inc))
    raise MalformedDatagram(f"unknown message kind {kind!r}")


_UPDATE_TYPES = (Alive, Suspect, Dead, Left)


def _load(data: bytes) -> object:
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream, max_depth=8).decode()
    except Exception as exc:  # cbor2 raises many types on hostile input
        raise MalformedDatagram(f"not CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise MalformedDatagram("trailing bytes after the datagram")
    return value


def decode_datagram(data: bytes) -> Datagram:
    """Parse and validate one datagram; :class:`MalformedDatagram` on any defect."""
    value = _load(data)
    if type(value) is not list or len(value) != 5:
        raise MalformedDatagram("a datagram is a 5-item array")
    version, sender, incarnation, primary_item, update_items = value
    if version != PROTOCOL_VERSION:
        raise MalformedDatagram(f"unsupported protocol version {version!r}")
    primary: Primary | None = None
    if primary_item is not None:
        decoded = _decode_message(primary_item)
        if isinstance(decoded, _UPDATE_TYPES):
            raise MalformedDatagram("an update cannot be the primary message")
        primary = decoded
    if type(update_items) is not list:
        raise MalformedDatagram("updates must be an array")
    updates: list[Update] = []
    for item in update_items:
        update = _decode_message(item)
        if not isinstance(update, _UPDATE_TYPES):
            raise MalformedDatagram("only membership updates can be piggybacked")
        updates.append(update)
    return Datagram(
        sender=_node(sender),
        incarnation=_int(incarnation),
        primary=primary,
        updates=tuple(updates),
    )


def encode_state(entries: list[SyncEntry]) -> bytes:
    """A full membership state as one CBOR blob (push-pull over a stream transport)."""
    return cbor2.dumps([PROTOCOL_VERSION, [_entry_item(e) for e in entries]])


def decode_state(blob: bytes) -> tuple[SyncEntry, ...]:
    """Parse a blob from :func:`encode_state`; :class:`MalformedDatagram` on any defect."""
    value = _load(blob)
    if type(value) is not list or len(value) != 2 or value[0] != PROTOCOL_VERSION:
        raise MalformedDatagram("not a gossip state blob")
    if type(value[1]) is not list:
        raise MalformedDatagram("state entries must be an array")
    return tuple(_entry(e) for e in value[1])
