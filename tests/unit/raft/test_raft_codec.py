"""Encodings of Raft values (dlog.raft.codec) and the in-memory log/storage."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from raft_helpers import config_of, entries, member, nid

from dlog.errors import ProtocolError, StorageError
from dlog.raft.codec import (
    decode_configuration,
    decode_entries,
    encode_configuration,
    encode_entries,
    hard_state_from_obj,
    hard_state_to_obj,
    message_from_wire,
    message_to_wire,
)
from dlog.raft.messages import (
    AppendEntries,
    AppendResponse,
    Entry,
    EntryType,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    TimeoutNow,
    VoteResponse,
)
from dlog.raft.storage import LogCompactedError, LogUnavailableError, MemoryStorage

H = {"cluster_id": "c", "term": 7, "from_id": nid(1), "from_dir": "d1", "to": nid(2)}
META = SnapshotMeta(index=9, term=3, config=config_of([1, 2], [3]))

EXAMPLES = [
    AppendEntries(**H, prev_index=4, prev_term=2, entries=tuple(entries(7, 7, start=5)), commit=3),
    AppendEntries(**H, prev_index=0, prev_term=0, entries=(), commit=0),
    AppendEntries(**H, prev_index=9, prev_term=2, entries=(), commit=9, ack=False),
    AppendResponse(**H, index=9),
    AppendResponse(**H, index=9, reject=True, reject_hint=5, log_term=2),
    Heartbeat(**H, commit=4, context=b"ctx"),
    HeartbeatResponse(**H, context=b""),
    RequestVote(**H, pre_vote=True, last_index=9, last_term=3, transfer=False),
    RequestVote(**H, pre_vote=False, last_index=9, last_term=3, transfer=True),
    VoteResponse(**H, pre_vote=False, reject=True),
    InstallSnapshot(**H, meta=META, offset=8, total=20, data=b"chunk", done=False),
    SnapshotResponse(**H, snapshot_index=9, snapshot_term=3, next_offset=13),
    TimeoutNow(**H),
    ReadIndexRequest(**H, context=b"r"),
    ReadIndexResponse(**H, context=b"r", index=12),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_wire(msg: object) -> None:
    head, payload = message_to_wire(msg)  # type: ignore[arg-type]
    # The header travels as CBOR; the payload as raw bytes.
    assert message_from_wire(cbor2.loads(cbor2.dumps(head)), payload) == msg


def test_entries_round_trip_and_are_compact() -> None:
    ents = [
        Entry(5, 2, EntryType.NORMAL, b"x" * 100),
        Entry(6, 2, EntryType.NOOP, b""),
        Entry(7, 3, EntryType.CONFIG, encode_configuration(config_of([1]))),
    ]
    buf = encode_entries(ents)
    assert decode_entries(buf) == ents
    assert len(encode_entries(ents[:1])) == 21 + 100


def test_a_configuration_round_trips_with_addresses() -> None:
    cfg = config_of([3, 1, 2], [5])
    assert decode_configuration(encode_configuration(cfg)) == cfg
    assert decode_configuration(encode_configuration(cfg)).voters[0] == member(1)


def test_hard_state_round_trips() -> None:
    for hs in (HardState(), HardState(term=5, vote=nid(2), commit=9)):
        assert hard_state_from_obj(cbor2.loads(cbor2.dumps(hard_state_to_obj(hs)))) == hs


@pytest.mark.parametrize(
    "head",
    [
        None,
        [],
        [1, "c", 1, 1, "d", 2],  # AppendEntries without its fields
        [1, "c", 1, 1, "d", 2, 4, 2, 3, False, False],  # AppendEntries with a field too many
        [99, "c", 1, 1, "d", 2],  # unknown tag
        [2, "c", -1, 1, "d", 2, 0, False, 0, 0],  # negative term
        [2, "c", 1, 1, "d", 2, 0, "no", 0, 0],  # bool expected
        [4, 5, 1, 1, "d", 2, b""],  # cluster id not a string
        [9, "c", 1, 1, "d", 2, "extra"],
    ],
)
def test_malformed_headers_raise_protocol_error(head: object) -> None:
    with pytest.raises(ProtocolError):
        message_from_wire(head, b"")


def test_non_contiguous_entries_are_malformed() -> None:
    buf = encode_entries([Entry(1, 1, EntryType.NORMAL, b"a"), Entry(3, 1, EntryType.NORMAL, b"b")])
    with pytest.raises(ProtocolError):
        decode_entries(buf)


@given(st.binary(max_size=200))
def test_decode_entries_never_fails_but_with_protocol_error(data: bytes) -> None:
    try:
        decode_entries(data)
    except ProtocolError:
        pass


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 2**65)
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=8),
    max_leaves=20,
)


@given(st.integers(1, 11), st.lists(_json, max_size=10), st.binary(max_size=64))
def test_message_from_wire_never_fails_but_with_protocol_error(
    tag: int, rest: list[object], payload: bytes
) -> None:
    try:
        message_from_wire([tag, "c", 1, 1, "d", 2, *rest], payload)
    except ProtocolError:
        pass


@given(st.binary(max_size=100))
def test_decode_configuration_never_fails_but_with_protocol_error(data: bytes) -> None:
    try:
        decode_configuration(data)
    except ProtocolError:
        pass


# --- MemoryStorage ----------------------------------------------------------------------


def test_storage_append_overwrites_a_conflicting_suffix() -> None:
    s = MemoryStorage()
    s.append(entries(1, 1, 1))
    s.append(entries(2, 2, start=2))
    assert [e.term for e in s.all_entries()] == [1, 2, 2]
    with pytest.raises(StorageError):
        s.append(entries(3, start=9))


def test_storage_ranges_and_compaction() -> None:
    s = MemoryStorage()
    s.append(entries(1, 1, 2, 2, 3))
    s.create_snapshot(SnapshotMeta(index=3, term=2, config=config_of([1])), b"snap")
    s.compact(3)
    assert (s.first_index(), s.last_index()) == (4, 5)
    assert s.term(3) == 2
    with pytest.raises(LogCompactedError):
        s.term(2)
    with pytest.raises(LogUnavailableError):
        s.term(6)
    with pytest.raises(LogCompactedError):
        s.entries(3, 5, 1 << 20)
    assert [e.index for e in s.entries(4, 6, 1)] == [4]  # at least one entry
    assert [e.index for e in s.entries(4, 6, 1 << 20)] == [4, 5]


def test_storage_apply_snapshot_restarts_the_log_after_it() -> None:
    s = MemoryStorage()
    s.append(entries(1, 1))
    snap = Snapshot(meta=SnapshotMeta(index=10, term=4, config=config_of([1])), data=b"s")
    s.apply_snapshot(snap)
    assert (s.first_index(), s.last_index()) == (11, 10)
    assert s.snapshot() == snap
    assert s.initial_state().commit == 10
    with pytest.raises(StorageError):
        s.apply_snapshot(
            Snapshot(meta=SnapshotMeta(index=5, term=4, config=config_of([1])), data=b"")
        )


def test_create_snapshot_checks_the_log() -> None:
    s = MemoryStorage()
    s.append(entries(1, 2))
    with pytest.raises(StorageError):
        s.create_snapshot(SnapshotMeta(index=2, term=1, config=config_of([1])), b"")
    with pytest.raises(StorageError):
        s.create_snapshot(SnapshotMeta(index=3, term=2, config=config_of([1])), b"")


def test_the_core_imports_no_io() -> None:
    """The sans-I/O modules import neither trio nor socket (checked in a fresh process)."""
    import subprocess
    import sys

    code = (
        "import sys, dlog.raft, dlog.raft.core, dlog.raft.sim;"
        "bad = [m for m in ('trio', 'socket', 'dlog.net') if m in sys.modules];"
        "assert not bad, bad;"
        "from dlog.raft import RaftCore, MemoryStorage;"
        "assert 'trio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
