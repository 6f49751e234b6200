"""`dlogctl node run` stops with one clear line when the disk fails under a running node
(a full disk under the Raft WAL naming the file, a partition's failed fsync), not with
a traceback; a failure that is not the disk's keeps its traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dlogctl.node
import pytest
from dlogctl.main import app
from typer.testing import CliRunner

from dlog.errors import StorageIOError


def run_node_failing_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> Any:
    async def serve(config: Any, progress: Any) -> bool:
        progress.serving = True  # it was up and running when the disk failed
        raise failure

    monkeypatch.setattr(dlogctl.node, "_serve", serve)
    monkeypatch.setattr(dlogctl.node, "setup_logging", lambda *args: None)
    return CliRunner().invoke(app, ["node", "run", "--node-id", "4", "--data-dir", str(tmp_path)])


def test_a_full_wal_disk_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal = str(tmp_path / "raft" / "wal")
    failure = ExceptionGroup("node", [OSError(28, "No space left on device", wal)])
    result = run_node_failing_with(tmp_path, monkeypatch, failure)
    assert result.exit_code == 1
    assert "node 4 stopped: [Errno 28] No space left on device:" in result.output
    assert result.output.rstrip().endswith("/raft/wal'")  # the file, as the WAL names it
    assert "Traceback" not in result.output


def test_a_failed_partition_fsync_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failure = ExceptionGroup(
        "node", [StorageIOError("fsync of /data/t-0 failed: [Errno 5] Input/output error")]
    )
    result = run_node_failing_with(tmp_path, monkeypatch, failure)
    assert result.exit_code == 1
    assert "error: fsync of /data/t-0 failed" in result.output
    assert "Traceback" not in result.output


def test_other_failures_keep_their_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failure = ExceptionGroup("node", [RuntimeError("a bug")])
    result = run_node_failing_with(tmp_path, monkeypatch, failure)
    assert result.exit_code == 1
    assert isinstance(result.exception, ExceptionGroup)
    assert "stopped:" not in result.output
