"""Encodings of Raft values, shared by the disk storage and the transport. Pure.

Entries travel and rest in one compact binary layout, so a batch of them is one
``bytes`` object (a frame's raw payload, or part of one disk record)::

    entry := index u64 | term u64 | type u8 | length u32 | data

Everything else (configurations, hard state, message headers) is a small dict or list
of ints, strings and bytes that CBOR carries as is.

Decoders raise :class:`dlog.errors.ProtocolError` on malformed input, never anything
else, so bad bytes from a peer or a disk cannot crash a node.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import cbor2

from dlog.errors import ProtocolError
from dlog.raft.messages import (
    AnyMessage,
    AppendEntries,
    AppendResponse,
    Configuration,
    Entry,
    EntryType,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InvalidConfChangeError,
    Member,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    SnapshotMeta,
    SnapshotResponse,
    TimeoutNow,
    VoteResponse,
)
from dlog.types import NodeId

_ENTRY_HEADER = struct.Struct(">QQBI")
_ENTRY_TYPES = {int(t): t for t in EntryType}


def encode_entries(entries: tuple[Entry, ...] | list[Entry]) -> bytes:
    pack = _ENTRY_HEADER.pack
    parts: list[bytes] = []
    append = parts.append
    for e in entries:
        data = e.data
        append(pack(e.index, e.term, e.type, len(data)))
        append(data)
    return b"".join(parts)


def decode_entries(buf: bytes | memoryview) -> list[Entry]:
    view = memoryview(buf)
    end = len(view)
    unpack = _ENTRY_HEADER.unpack_from
    hsize = _ENTRY_HEADER.size
    types = _ENTRY_TYPES
    out: list[Entry] = []
    pos = 0
    try:
        while pos < end:
            index, term, etype, length = unpack(view, pos)
            pos += hsize
            if pos + length > end:
                raise ProtocolError("entry data runs past the end of the buffer")
            out.append(Entry(index, term, types[etype], bytes(view[pos : pos + length])))
            pos += length
    except (struct.error, KeyError) as exc:
        raise ProtocolError(f"malformed entries: {exc}") from None
    for prev, nxt in itertools.pairwise(out):
        if nxt.index != prev.index + 1:
            raise ProtocolError("entries are not contiguous")
    return out


# --- configuration ---------------------------------------------------------------------


def configuration_to_obj(config: Configuration) -> list[Any]:
    return [
        [[m.node_id, m.directory_id, m.address] for m in config.voters],
        [[m.node_id, m.directory_id, m.address] for m in config.learners],
    ]


def _members(obj: Any) -> tuple[Member, ...]:
    out = []
    for node_id, directory_id, address in obj:
        if not isinstance(node_id, int) or not isinstance(directory_id, str):
            raise ProtocolError("malformed configuration member")
        if not isinstance(address, str):
            raise ProtocolError("malformed configuration member")
        out.append(Member(node_id=NodeId(node_id), directory_id=directory_id, address=address))
    return tuple(sorted(out, key=lambda m: m.node_id))


def configuration_from_obj(obj: Any) -> Configuration:
    try:
        voters, learners = obj
        return Configuration(voters=_members(voters), learners=_members(learners))
    except ProtocolError:
        raise
    except (TypeError, ValueError, InvalidConfChangeError) as exc:
        raise ProtocolError(f"malformed configuration: {exc}") from None


def encode_configuration(config: Configuration) -> bytes:
    return cbor2.dumps(configuration_to_obj(config))


def decode_configuration(data: bytes) -> Configuration:
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise ProtocolError(f"malformed configuration: {exc}") from None
    return configuration_from_obj(obj)


def snapshot_meta_to_obj(meta: SnapshotMeta) -> list[Any]:
    return [meta.index, meta.term, configuration_to_obj(meta.config)]


def snapshot_meta_from_obj(obj: Any) -> SnapshotMeta:
    try:
        index, term, config = obj
        if not isinstance(index, int) or not isinstance(term, int) or index < 0 or term < 0:
            raise ProtocolError("malformed snapshot metadata")
        return SnapshotMeta(index=index, term=term, config=configuration_from_obj(config))
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed snapshot metadata: {exc}") from None


def hard_state_to_obj(hs: HardState) -> list[Any]:
    return [hs.term, hs.vote, hs.commit]


def hard_state_from_obj(obj: Any) -> HardState:
    try:
        term, vote, commit = obj
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed hard state: {exc}") from None
    if not isinstance(term, int) or not isinstance(commit, int):
        raise ProtocolError("malformed hard state")
    if vote is not None and not isinstance(vote, int):
        raise ProtocolError("malformed hard state")
    return HardState(term=term, vote=None if vote is None else NodeId(vote), commit=commit)


# --- messages --------------------------------------------------------------------------

# Wire tags: part of the protocol, never renumber.
_TAGS: dict[type[Any], int] = {
    AppendEntries: 1,
    AppendResponse: 2,
    Heartbeat: 3,
    HeartbeatResponse: 4,
    RequestVote: 5,
    VoteResponse: 6,
    InstallSnapshot: 7,
    SnapshotResponse: 8,
    TimeoutNow: 9,
    ReadIndexRequest: 10,
    ReadIndexResponse: 11,
}


def message_to_wire(msg: AnyMessage) -> tuple[list[Any], bytes]:
    """``(header, payload)``: a CBOR-friendly list and raw bytes (entries or a chunk).

    The header is ``[tag, cluster_id, term, from, from_dir, to, *fields]``.
    """
    head: list[Any] = [
        _TAGS[type(msg)],
        msg.cluster_id,
        msg.term,
        msg.from_id,
        msg.from_dir,
        msg.to,
    ]
    payload = b""
    match msg:
        case AppendEntries():
            head += [msg.prev_index, msg.prev_term, msg.commit]
            if not msg.ack:
                head.append(False)  # absent means True
            payload = encode_entries(msg.entries)
        case AppendResponse():
            head += [msg.index, msg.reject, msg.reject_hint, msg.log_term]
        case Heartbeat():
            head += [msg.commit, msg.context]
        case HeartbeatResponse():
            head += [msg.context]
        case RequestVote():
            head += [msg.pre_vote, msg.last_index, msg.last_term, msg.transfer]
        case VoteResponse():
            head += [msg.pre_vote, msg.reject]
        case InstallSnapshot():
            head += [snapshot_meta_to_obj(msg.meta), msg.offset, msg.total, msg.done]
            payload = msg.data
        case SnapshotResponse():
            head += [msg.snapshot_index, msg.snapshot_term, msg.next_offset]
        case TimeoutNow():
            pass
        case ReadIndexRequest():
            head += [msg.context]
        case ReadIndexResponse():
            head += [msg.context, msg.index]
    return head, payload


def _int(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise ProtocolError(f"expected a non-negative int, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ProtocolError(f"expected a bool, got {v!r}")
    return v


def _bytes(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise ProtocolError(f"expected bytes, got {type(v).__name__}")
    return v


def message_from_wire(head: Any, payload: bytes | memoryview = b"") -> AnyMessage:
    """Inverse of :func:`message_to_wire`; raises ProtocolError on anything malformed."""
    if not isinstance(head, list) or len(head) < 6:
        raise ProtocolError("malformed raft message header")
    tag, cluster_id, term, from_id, from_dir, to, *rest = head
    if not isinstance(cluster_id, str) or not isinstance(from_dir, str):
        raise ProtocolError("malformed raft message header")
    common: dict[str, Any] = {
        "cluster_id": cluster_id,
        "term": _int(term),
        "from_id": NodeId(_int(from_id)),
        "from_dir": from_dir,
        "to": NodeId(_int(to)),
    }
    try:
        match tag:
            case 1:
                prev_index, prev_term, commit, *ack = rest
                if len(ack) > 1:
                    raise ProtocolError("append entries: too many fields")
                return AppendEntries(
                    **common,
                    prev_index=_int(prev_index),
                    prev_term=_int(prev_term),
                    commit=_int(commit),
                    entries=tuple(decode_entries(payload)),
                    ack=_bool(ack[0]) if ack else True,
                )
            case 2:
                index, reject, hint, log_term = rest
                return AppendResponse(
                    **common,
                    index=_int(index),
                    reject=_bool(reject),
                    reject_hint=_int(hint),
                    log_term=_int(log_term),
                )
            case 3:
                commit, context = rest
                return Heartbeat(**common, commit=_int(commit), context=_bytes(context))
            case 4:
                (context,) = rest
                return HeartbeatResponse(**common, context=_bytes(context))
            case 5:
                pre_vote, last_index, last_term, transfer = rest
                return RequestVote(
                    **common,
                    pre_vote=_bool(pre_vote),
                    last_index=_int(last_index),
                    last_term=_int(last_term),
                    transfer=_bool(transfer),
                )
            case 6:
                pre_vote, reject = rest
                return VoteResponse(**common, pre_vote=_bool(pre_vote), reject=_bool(reject))
            case 7:
                meta, offset, total, done = rest
                return InstallSnapshot(
                    **common,
                    meta=snapshot_meta_from_obj(meta),
                    offset=_int(offset),
                    total=_int(total),
                    done=_bool(done),
                    data=bytes(payload),
                )
            case 8:
                index, sterm, next_offset = rest
                return SnapshotResponse(
                    **common,
                    snapshot_index=_int(index),
                    snapshot_term=_int(sterm),
                    next_offset=_int(next_offset),
                )
            case 9:
                if rest:
                    raise ProtocolError("TimeoutNow takes no fields")
                return TimeoutNow(**common)
            case 10:
                (context,) = rest
                return ReadIndexRequest(**common, context=_bytes(context))
            case 11:
                context, index = rest
                return ReadIndexResponse(**common, context=_bytes(context), index=_int(index))
            case _:
                raise ProtocolError(f"unknown raft message tag {tag!r}")
    except ValueError as exc:  # wrong number of fields to unpack
        raise ProtocolError(f"malformed raft message: {exc}") from None
