"""`make run` runs `dlogctl demo`: it must bring up a cluster, produce and consume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dlogctl.local import ClusterSpec, free_base_port, stop_cluster

pytestmark = pytest.mark.timeout(180)


def test_demo_produces_and_consumes_through_a_local_cluster(tmp_path: Path) -> None:
    data_dir = tmp_path / "dlog"
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dlogctl",
                "demo",
                "--data-dir",
                str(data_dir),
                "--base-port",
                str(free_base_port()),
            ],
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert result.returncode == 0, result.stderr
        out = result.stdout
        for word in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot"):
            assert f"produced {word!r}" in out
            assert f"consumed {word!r}" in out
        assert "cluster ready: 3 node(s)" in out
        assert "bootstrap address" in out
    finally:
        spec = ClusterSpec.load(data_dir.resolve())
        if spec is not None:
            stop_cluster(spec)
