"""Checkpoint files: format, atomic replacement, damage detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlog.storage.checkpoint import CorruptCheckpointError, read_checkpoint, write_checkpoint


def test_round_trip_in_kafka_format(tmp_path: Path) -> None:
    path = tmp_path / "leader-epoch-checkpoint"
    write_checkpoint(path, [(0, 0), (3, 1500)])
    assert path.read_text() == "0\n2\n0 0\n3 1500\n"
    assert read_checkpoint(path, 2) == [["0", "0"], ["3", "1500"]]
    assert read_checkpoint(tmp_path / "missing", 2) is None
    assert not (tmp_path / "leader-epoch-checkpoint.tmp").exists()


@pytest.mark.parametrize(
    "text",
    ["", "1\n0\n", "0\n", "0\nx\n", "0\n2\n1 2\n", "0\n1\n1 2 3\n", "\xff"],
)
def test_damage_is_reported(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cp"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptCheckpointError):
        read_checkpoint(path, 2)


def test_a_failed_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cp"
    write_checkpoint(path, [(1, 1)])

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(path, [(2, 2)])
    assert read_checkpoint(path, 2) == [["1", "1"]]
