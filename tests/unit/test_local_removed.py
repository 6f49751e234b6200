"""A node removed from the cluster for good is marked in its data directory, and the
local tooling and `dlogctl node run` respect the mark without starting the node."""

from __future__ import annotations

from pathlib import Path

from dlogctl.local import ClusterSpec
from dlogctl.main import app
from typer.testing import CliRunner

from dlog.broker.identity import mark_removed, removed_reason


def test_removed_nodes_are_left_out_of_the_local_cluster(tmp_path: Path) -> None:
    spec = ClusterSpec.create(tmp_path / "c", 3, 20000, "127.0.0.1")
    for node in spec.nodes:
        node.path.mkdir(parents=True)
    assert [n.id for n in spec.live_nodes] == [1, 2, 3]
    mark_removed(spec.nodes[1].path, "node 2 was removed from the cluster for good")
    assert [n.id for n in spec.live_nodes] == [1, 3]
    assert spec.nodes[1].removed == "node 2 was removed from the cluster for good"


def test_node_run_refuses_a_removed_directory(tmp_path: Path) -> None:
    mark_removed(tmp_path, "node 2 was removed from the cluster for good")
    assert removed_reason(tmp_path) is not None
    result = CliRunner().invoke(app, ["node", "run", "--node-id", "2", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "removed from the cluster for good" in result.output
