"""DiskStorage: identity, persistence, torn/corrupt tails, snapshots and compaction."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from raft_helpers import config_of, entries, nid

from dlog.errors import InconsistentClusterIdError, StorageError
from dlog.raft.disk import DiskStorage, encode_snapshot, iter_records, write_atomically
from dlog.raft.messages import Entry, EntryType, HardState, Snapshot, SnapshotMeta
from dlog.raft.storage import MemoryStorage


def open_store(
    path: Path, node: int = 1, cluster: str = "c", preallocate: int = 1 << 16
) -> DiskStorage:
    return DiskStorage.open(
        path, cluster_id=cluster, node_id=nid(node), preallocate_bytes=preallocate
    )


def state_of(s: MemoryStorage) -> tuple[HardState, list[Entry], int, int]:
    return s.initial_state(), s.all_entries(), s.first_index(), s.snapshot().meta.index


# --- identity ------------------------------------------------------------------------


def test_formatting_writes_a_random_directory_id_that_survives_reopening(tmp_path: Path) -> None:
    with open_store(tmp_path / "a") as a:
        dir_a = a.directory_id
    with open_store(tmp_path / "b") as b:
        assert b.directory_id != dir_a
    with open_store(tmp_path / "a") as again:
        assert again.directory_id == dir_a
        assert again.identity.node_id == 1


def test_a_directory_of_another_cluster_or_node_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path, cluster="c1").close()
    with pytest.raises(InconsistentClusterIdError):
        open_store(tmp_path, cluster="c2")
    with pytest.raises(StorageError, match="belongs to node 1"):
        open_store(tmp_path, node=2, cluster="c1")


def test_a_directory_in_use_is_refused(tmp_path: Path) -> None:
    with open_store(tmp_path), pytest.raises(StorageError, match="in use"):
        open_store(tmp_path)


def test_the_synchronous_writers_are_refused(tmp_path: Path) -> None:
    with open_store(tmp_path) as s, pytest.raises(StorageError):
        s.append(entries(1))


# --- persistence ---------------------------------------------------------------------


async def test_saved_state_survives_reopening(tmp_path: Path) -> None:
    with open_store(tmp_path) as s:
        await s.save(hard_state=HardState(term=2, vote=nid(3), commit=1), entries=entries(1, 1, 2))
        await s.save(hard_state=None, entries=entries(3, 3, start=3))  # replaces index 3
        await s.save(hard_state=HardState(term=3, vote=None, commit=4), entries=(), sync=False)
        expected = state_of(s)
    with open_store(tmp_path) as again:
        assert state_of(again) == expected
        assert [e.term for e in again.all_entries()] == [1, 1, 3, 3]
        assert again.initial_state() == HardState(term=3, vote=None, commit=4)
        assert again.truncated_bytes == 0


async def test_a_torn_last_record_is_truncated_on_open(tmp_path: Path) -> None:
    with open_store(tmp_path) as s:
        await s.save(hard_state=HardState(term=1, commit=0), entries=entries(1, 1))
        good = s.wal_bytes
        await s.save(hard_state=HardState(term=2, commit=2), entries=entries(2, start=3))
        full = s.wal_bytes
    wal = tmp_path / "wal"
    with wal.open("r+b") as f:
        f.truncate(full - 3)
    with open_store(tmp_path) as again:
        assert [e.index for e in again.all_entries()] == [1, 2]
        assert again.initial_state().term == 1
        assert 0 < again.truncated_bytes <= full - 3 - good
    assert wal.stat().st_size == good
    with open_store(tmp_path) as third:  # and it stays clean
        assert third.truncated_bytes == 0


async def _apply_ops(path: Path, ops: list[tuple[HardState | None, list[Entry]]]):  # type: ignore[no-untyped-def]
    """Save each op; return the WAL offset after each and the model state after each."""
    model = MemoryStorage()
    offsets = [0]
    states = [state_of(model)]
    with open_store(path) as s:
        offsets[0] = s.wal_bytes
        for hs, ents in ops:
            await s.save(hard_state=hs, entries=ents)
            if ents:
                model.append(ents)
            if hs is not None:
                model.set_hard_state(hs)
            offsets.append(s.wal_bytes)
            states.append(state_of(model))
    return offsets, states


@st.composite
def op_lists(draw):  # type: ignore[no-untyped-def]
    ops = []
    last = 0
    term = 1
    for _ in range(draw(st.integers(1, 8))):
        first = draw(st.integers(max(1, last - 3), last + 1))
        n = draw(st.integers(0, 4))
        term += draw(st.integers(0, 1))
        ents = [
            Entry(first + i, term, EntryType.NORMAL, draw(st.binary(max_size=20))) for i in range(n)
        ]
        if ents:
            last = first + n - 1
        hs = None
        if draw(st.booleans()) or not ents:
            hs = HardState(term=term, vote=draw(st.none() | st.just(nid(2))), commit=0)
        ops.append((hs, ents))
    return ops


@settings(max_examples=150)
@given(ops=op_lists(), data=st.data())
def test_any_truncation_or_corruption_of_the_tail_recovers_a_prefix(ops, data) -> None:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        offsets, states = trio.run(_apply_ops, path, ops)
        wal = path / "wal"
        size = offsets[-1]  # the file is longer: preallocated zeros follow
        assert wal.stat().st_size >= size
        point = data.draw(st.integers(0, max(0, size - 1)), label="damage at")
        blob = bytearray(wal.read_bytes())
        if data.draw(st.booleans(), label="corrupt instead of truncate"):
            blob[point] ^= data.draw(st.integers(1, 255), label="xor")
        else:
            del blob[point:]
        wal.write_bytes(bytes(blob))
        # Records that end at or before the damage survive; nothing after them does.
        survived = max(k for k, off in enumerate(offsets) if off <= point)
        with open_store(path) as again:
            assert state_of(again) == states[survived]


# --- snapshots and compaction ----------------------------------------------------------


async def filled(path: Path, n: int = 10) -> DiskStorage:
    s = open_store(path)
    await s.save(hard_state=HardState(term=2, commit=n), entries=entries(*([2] * n)))
    return s


async def test_a_local_snapshot_and_compaction_survive_reopening(tmp_path: Path) -> None:
    s = await filled(tmp_path)
    meta = SnapshotMeta(index=7, term=2, config=config_of([1, 2, 3]))
    await s.save_snapshot(meta, b"state@7")
    await s.compact_to(5)  # keep two entries the snapshot covers, for slow followers
    assert (s.first_index(), s.last_index()) == (6, 10)
    await s.save(hard_state=None, entries=entries(2, start=11))
    s.close()
    with open_store(tmp_path) as again:
        assert again.snapshot() == Snapshot(meta=meta, data=b"state@7")
        assert (again.first_index(), again.last_index()) == (6, 11)
        assert again.term(5) == 2
        assert again.initial_state().commit == 10


async def test_compaction_past_the_snapshot_is_refused(tmp_path: Path) -> None:
    s = await filled(tmp_path)
    with s:
        await s.save_snapshot(SnapshotMeta(index=3, term=2, config=config_of([1])), b"")
        with pytest.raises(StorageError):
            await s.compact_to(4)


async def test_an_installed_snapshot_replaces_the_log(tmp_path: Path) -> None:
    s = await filled(tmp_path, 4)
    snap = Snapshot(meta=SnapshotMeta(index=20, term=5, config=config_of([1, 2])), data=b"leader")
    await s.save(
        hard_state=HardState(term=5, commit=20), entries=entries(5, start=21), snapshot=snap
    )
    assert (s.first_index(), s.last_index()) == (21, 21)
    s.close()
    with open_store(tmp_path) as again:
        assert again.snapshot() == snap
        assert (again.first_index(), again.last_index()) == (21, 21)
        assert again.initial_state() == HardState(term=5, commit=20)


async def test_a_crash_after_the_snapshot_file_but_before_the_wal_rewrite(tmp_path: Path) -> None:
    # The snapshot file is written first. If the old WAL contains the snapshot's last
    # entry, its later entries are kept; if it conflicts, it is dropped.
    s = await filled(tmp_path, 6)
    s.close()
    keep = Snapshot(meta=SnapshotMeta(index=4, term=2, config=config_of([1])), data=b"k")
    write_atomically(tmp_path / "snapshot", encode_snapshot(keep))
    with open_store(tmp_path) as again:
        assert again.snapshot() == keep
        assert [e.index for e in again.all_entries()] == [1, 2, 3, 4, 5, 6]
        assert again.first_index() == 1
    other = Snapshot(meta=SnapshotMeta(index=4, term=9, config=config_of([1])), data=b"o")
    write_atomically(tmp_path / "snapshot", encode_snapshot(other))
    with open_store(tmp_path) as again:
        assert again.snapshot() == other
        assert again.all_entries() == []
        assert again.first_index() == 5
        assert again.initial_state().commit == 4


async def test_a_corrupt_snapshot_file_is_an_error_not_a_silent_loss(tmp_path: Path) -> None:
    s = await filled(tmp_path)
    await s.save_snapshot(SnapshotMeta(index=3, term=2, config=config_of([1])), b"abc")
    s.close()
    path = tmp_path / "snapshot"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(StorageError, match="checksum"):
        open_store(tmp_path)


async def test_writes_reach_the_file_before_save_returns(tmp_path: Path) -> None:
    """What save() wrote is in the file (not a Python buffer) when it returns."""
    s = open_store(tmp_path)
    await s.save(hard_state=HardState(term=1), entries=entries(1, 1))
    await s.save(hard_state=None, entries=entries(2, start=3), sync=False)
    blob = (tmp_path / "wal").read_bytes()
    ends = [end for end, _, _ in iter_records(blob)]
    assert ends[-1] == s.wal_bytes
    assert s.fsyncs == 1
    s.close()


async def test_the_wal_is_preallocated_and_its_zero_tail_is_not_corruption(
    tmp_path: Path,
) -> None:
    s = DiskStorage.open(tmp_path, cluster_id="c", node_id=nid(1), preallocate_bytes=1 << 16)
    await s.save(hard_state=HardState(term=1), entries=entries(1, 1, 1))
    assert os.stat(tmp_path / "wal").st_size >= s.wal_bytes + (1 << 16)
    written = s.wal_bytes
    s.close()
    with open_store(tmp_path) as again:
        assert again.truncated_bytes == 0
        assert [e.index for e in again.all_entries()] == [1, 2, 3]
        assert os.stat(tmp_path / "wal").st_size == written  # cut back to the records
        await again.save(hard_state=None, entries=entries(2, start=4))
    with open_store(tmp_path) as third:
        assert [e.term for e in third.all_entries()] == [1, 1, 1, 2]


@pytest.mark.parametrize("no_room", [errno.ENOSPC, errno.EDQUOT], ids=["full", "quota"])
async def test_a_nearly_full_disk_gives_up_the_wal_reserve_not_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, no_room: int
) -> None:
    """No room for the WAL's preallocated reserve (a full disk, a quota) is not "this
    filesystem cannot fallocate": the record still gets its blocks, a warning says the
    disk is nearly full (once per shortage), and the reserve is tried again next time.
    A filesystem that really cannot fallocate just appends."""
    from dlog.raft import disk

    room = [1 << 10]  # bytes the "disk" can still allocate
    calls: list[int] = []
    real_fallocate = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        if length > room[0]:
            raise OSError(no_room, os.strerror(no_room))
        real_fallocate(fd, offset, length)

    s = open_store(tmp_path, preallocate=1 << 16)
    monkeypatch.setattr(disk.os, "posix_fallocate", fallocate)
    big = [Entry(i, 1, EntryType.NORMAL, b"x" * 300) for i in (1, 2)]
    await s.save(hard_state=HardState(term=1), entries=big[:1])
    await s.save(hard_state=None, entries=big[1:])
    assert [e.index for e in s.all_entries()] == [1, 2]
    assert len(calls) == 4  # reserve refused, record alone, twice: tried again each time
    assert calls[1] < room[0] < calls[0]
    warnings = [r for r in caplog.records if "nearly full" in r.getMessage()]
    assert len(warnings) == 1
    room[0] = 1 << 20  # space again: the reserve is back
    await s.save(hard_state=None, entries=[Entry(3, 1, EntryType.NORMAL, b"x" * 300)])
    assert os.stat(tmp_path / "wal").st_size >= s.wal_bytes + (1 << 16)
    room[0] = 1 << 10  # short again, once the reserve is used up: warned again
    await s.save(hard_state=None, entries=[Entry(4, 1, EntryType.NORMAL, b"x" * (1 << 16))])
    warnings = [r for r in caplog.records if "nearly full" in r.getMessage()]
    assert len(warnings) == 2
    s.close()
    with open_store(tmp_path) as again:
        assert [e.index for e in again.all_entries()] == [1, 2, 3, 4]

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(disk.os, "posix_fallocate", unsupported)
    with open_store(tmp_path / "other", preallocate=1 << 16) as t:
        await t.save(
            hard_state=HardState(term=1), entries=[Entry(1, 1, EntryType.NORMAL, b"x" * 300)]
        )
        await t.save(hard_state=None, entries=[Entry(2, 1, EntryType.NORMAL, b"y" * 300)])
        assert [e.index for e in t.all_entries()] == [1, 2]


async def test_a_full_disk_fails_the_save_naming_the_wal_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not even the record fits: save raises OSError(ENOSPC) with the WAL's path (the
    node's last words name the file), and the in-memory view is as before."""
    from dlog.raft import disk

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    s = open_store(tmp_path, preallocate=1 << 10)
    await s.save(hard_state=HardState(term=1), entries=entries(1, 1))
    before = state_of(s)
    monkeypatch.setattr(disk.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left") as failed:
        await s.save(hard_state=None, entries=[Entry(3, 1, EntryType.NORMAL, b"x" * 4096)])
    assert failed.value.errno == 28
    assert failed.value.filename == str(tmp_path / "wal")
    assert state_of(s) == before
    s.close()
    monkeypatch.undo()
    with open_store(tmp_path) as again:
        assert state_of(again) == before


async def test_a_failed_wal_fsync_names_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync the device fails (EIO) is the node's end; its error says which file,
    inline and from the worker thread alike."""
    from dlog.raft import disk

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    s = open_store(tmp_path, preallocate=1 << 10)
    monkeypatch.setattr(disk.os, "fdatasync", eio)
    for size in (10, 1 << 12):  # inside the reserve (inline), and past it (worker)
        with pytest.raises(OSError, match="Input/output error") as failed:
            await s.save(
                hard_state=HardState(term=1), entries=[Entry(1, 1, EntryType.NORMAL, b"x" * size)]
            )
        assert failed.value.errno == errno.EIO
        assert failed.value.filename == str(tmp_path / "wal")
    s.close()


async def test_fsyncs_leave_the_event_loop_once_the_device_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fast fsyncs run inline; one slow fsync sends them to a worker thread until
    FAST_FSYNCS_TO_RETURN fast ones in a row. The device's speed is simulated: a fake
    fdatasync advances the clock the storage times it with."""
    from dlog.raft import disk

    now = [0.0]
    cost = [0.0001]
    threads: list[str] = []
    real_fdatasync = os.fdatasync

    def fake_fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        threads.append("loop" if trio.lowlevel.in_trio_run() else "worker")
        now[0] += cost[0]

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

    monkeypatch.setattr(disk.os, "fdatasync", fake_fdatasync)
    monkeypatch.setattr(disk, "time", FakeTime)
    s = open_store(tmp_path)
    index = 0

    async def save_one() -> None:
        nonlocal index
        index += 1
        await s.save(hard_state=HardState(term=1), entries=entries(1, start=index))

    await save_one()  # the first write reserves WAL space: done in a worker thread
    threads.clear()
    for _ in range(3):
        await save_one()
    assert threads == ["loop"] * 3
    cost[0] = 0.05  # the device slows down: this fsync still ran inline...
    await save_one()
    cost[0] = 0.0001  # ...but the next ones go to a thread until enough were fast
    for _ in range(disk.FAST_FSYNCS_TO_RETURN):
        await save_one()
    assert threads[3:] == ["loop"] + ["worker"] * disk.FAST_FSYNCS_TO_RETURN
    await save_one()
    assert threads[-1] == "loop"
    assert s.fsyncs == len(threads) + 1
    s.close()
