"""The gossip datagram codec: round trips, size accounting, hostile input."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlog.gossip.messages import (
    Ack,
    Alive,
    Datagram,
    Dead,
    Left,
    MalformedDatagram,
    Nack,
    Ping,
    PingReq,
    Suspect,
    Sync,
    SyncEntry,
    array_header,
    assemble_datagram,
    datagram_overhead,
    datagram_prefix,
    decode_datagram,
    decode_state,
    encode_entry,
    encode_message,
    encode_state,
    sync_datagram,
    sync_overhead,
)
from dlog.types import NodeId

node_ids = st.integers(0, 2**63 - 1).map(NodeId)
counters = st.integers(0, 2**63 - 1)
addresses = st.tuples(st.text(min_size=1, max_size=40), st.integers(0, 65535))
metadata = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=6)

updates = st.one_of(
    st.builds(Alive, node_id=node_ids, incarnation=counters, address=addresses, metadata=metadata),
    st.builds(Suspect, node_id=node_ids, incarnation=counters, accuser=node_ids),
    st.builds(Dead, node_id=node_ids, incarnation=counters, accuser=node_ids),
    st.builds(Left, node_id=node_ids, incarnation=counters),
)
entries = st.builds(
    SyncEntry,
    node_id=node_ids,
    incarnation=counters,
    state=st.integers(0, 3),
    address=addresses,
    metadata=metadata,
)
primaries = st.one_of(
    st.builds(Ping, seq=counters, target=node_ids),
    st.builds(Ack, seq=counters),
    st.builds(Nack, seq=counters),
    st.builds(PingReq, seq=counters, target=node_ids, target_address=addresses, nack=st.booleans()),
    st.builds(Sync, want_reply=st.booleans(), entries=st.lists(entries, max_size=4).map(tuple)),
)


@given(
    sender=node_ids,
    incarnation=counters,
    primary=st.none() | primaries,
    items=st.lists(updates, max_size=30),
)
def test_datagram_round_trip(
    sender: NodeId, incarnation: int, primary: object, items: list[object]
) -> None:
    prefix = datagram_prefix(sender, incarnation)
    encoded_primary = None if primary is None else encode_message(primary)  # type: ignore[arg-type]
    encoded = [encode_message(u) for u in items]  # type: ignore[arg-type]
    data = assemble_datagram(prefix, encoded_primary, encoded)
    assert len(data) == datagram_overhead(prefix, encoded_primary, len(items)) + sum(
        map(len, encoded)
    )
    assert decode_datagram(data) == Datagram(
        sender=sender,
        incarnation=incarnation,
        primary=primary,  # type: ignore[arg-type]
        updates=tuple(items),  # type: ignore[arg-type]
    )


@given(want_reply=st.booleans(), items=st.lists(entries, max_size=30))
def test_sync_datagram_round_trip(want_reply: bool, items: list[SyncEntry]) -> None:
    prefix = datagram_prefix(NodeId(1), 2)
    encoded = [encode_entry(e) for e in items]
    data = sync_datagram(prefix, want_reply, encoded)
    assert len(data) <= sync_overhead(prefix, len(items)) + sum(map(len, encoded))
    decoded = decode_datagram(data)
    assert decoded.primary == Sync(want_reply=want_reply, entries=tuple(items))
    assert decode_state(encode_state(items)) == tuple(items)


@pytest.mark.parametrize("length", [0, 23, 24, 255, 256, 65535])
def test_array_header_is_cbor(length: int) -> None:
    items = [0] * length
    assert cbor2.dumps(items) == array_header(length) + b"\x00" * length


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_malformed(data: bytes) -> None:
    try:
        decode_datagram(data)
    except MalformedDatagram:
        pass


@pytest.mark.parametrize(
    "value",
    [
        [],
        [1, 0, 0, None],
        [2, 0, 0, None, []],  # unknown version
        [1, -1, 0, None, []],  # negative sender
        [1, 0, 0, [0, 1], []],  # ping without target
        [1, 0, 0, [10, 1, 1, "h", 1, {}], []],  # an update as primary
        [1, 0, 0, None, [[0, 1, 2]]],  # a ping as an update
        [1, 0, 0, None, [[10, 1, 1, "h", 70000, {}]]],  # port out of range
        [1, 0, 0, None, [[10, 1, 1, "", 1, {}]]],  # empty host
        [1, 0, 0, None, [[10, 1, 1, "h", 1, {"k": 1}]]],  # non-text metadata
        [1, 0, 0, None, [[99, 1]]],  # unknown kind
        [1, 0, 0, [4, True, [[1, 1, 7, "h", 1, {}]]], []],  # bad member state
        [1, 0, 0, [1, True], []],  # bool where an int belongs
    ],
)
def test_invalid_datagrams_are_rejected(value: object) -> None:
    with pytest.raises(MalformedDatagram):
        decode_datagram(cbor2.dumps(value))


def test_trailing_bytes_are_rejected() -> None:
    data = assemble_datagram(datagram_prefix(NodeId(1), 0), encode_message(Ack(seq=1)), [])
    assert decode_datagram(data).primary == Ack(seq=1)
    with pytest.raises(MalformedDatagram):
        decode_datagram(data + b"\x00")


def test_deep_nesting_is_rejected() -> None:
    with pytest.raises(MalformedDatagram):
        decode_datagram(b"\x81" * 200 + b"\x00")
