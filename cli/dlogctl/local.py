"""The local cluster of ``dlogctl cluster up``: a data directory, one process per node.

Layout::

    <data-dir>/cluster.json        the nodes, their addresses and data directories
    <data-dir>/node-<id>/           a node's data directory (its own files, plus:)
        node.pid                    the pid of its process, written at launch
        node.log                    its stdout and stderr

Node ``i`` (0-based) gets node id ``i + 1`` and ports ``P+i`` (rpc), ``P+100+i``
(gossip), ``P+200+i`` (raft) for base port ``P``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dlogctl.common import CLUSTER_FILE


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: int
    rpc: str
    gossip: str
    raft: str
    data_dir: str

    @property
    def path(self) -> Path:
        return Path(self.data_dir)

    @property
    def pid_file(self) -> Path:
        return self.path / "node.pid"

    @property
    def log_file(self) -> Path:
        return self.path / "node.log"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    data_dir: str
    base_port: int
    host: str
    nodes: tuple[NodeSpec, ...]

    @classmethod
    def create(cls, data_dir: Path, nodes: int, base_port: int, host: str) -> ClusterSpec:
        specs = tuple(
            NodeSpec(
                id=i + 1,
                rpc=f"{host}:{base_port + i}",
                gossip=f"{host}:{base_port + 100 + i}",
                raft=f"{host}:{base_port + 200 + i}",
                data_dir=str(data_dir / f"node-{i + 1}"),
            )
            for i in range(nodes)
        )
        return cls(str(data_dir), base_port, host, specs)

    @classmethod
    def load(cls, data_dir: Path) -> ClusterSpec | None:
        path = data_dir / CLUSTER_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(
            raw["data_dir"],
            raw["base_port"],
            raw["host"],
            tuple(NodeSpec(**n) for n in raw["nodes"]),
        )

    def save(self) -> None:
        path = Path(self.data_dir)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (CLUSTER_FILE + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "data_dir": self.data_dir,
                    "base_port": self.base_port,
                    "host": self.host,
                    "bootstrap": self.nodes[0].rpc,
                    "nodes": [asdict(n) for n in self.nodes],
                },
                indent=2,
            )
            + "\n"
        )
        tmp.replace(path / CLUSTER_FILE)

    def node(self, node_id: int) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def node_pid(node: NodeSpec) -> int | None:
    """The pid of the node's process if it is running, else None."""
    try:
        pid = int(node.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def start_node(
    cluster: ClusterSpec, node: NodeSpec, *, log_level: str = "info"
) -> subprocess.Popen[bytes]:
    """Launch ``dlogctl node run`` for ``node`` in the background (own session)."""
    node.path.mkdir(parents=True, exist_ok=True)
    seeds = [n.gossip for n in cluster.nodes if n.id != node.id]
    args = [
        sys.executable,
        "-m",
        "dlogctl",
        "node",
        "run",
        "--node-id",
        str(node.id),
        "--data-dir",
        node.data_dir,
        "--rpc",
        node.rpc,
        "--gossip",
        node.gossip,
        "--raft",
        node.raft,
        "--log-level",
        log_level,
    ]
    for seed in seeds:
        args += ["--join", seed]
    if node.id == cluster.nodes[0].id:
        # A no-op once the node's Raft state exists, so restarts are safe.
        args.append("--bootstrap-cluster")
    with open(node.log_file, "ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node.pid_file.write_text(f"{proc.pid}\n")
    return proc


def stop_node(node: NodeSpec, *, timeout_s: float = 10.0) -> bool:
    """SIGTERM (controlled shutdown), then SIGKILL after ``timeout_s``; True if it ran."""
    pid = node_pid(node)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            break
        _reap(pid)
        time.sleep(0.05)
    else:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)
    try:
        node.pid_file.unlink()
    except FileNotFoundError:
        pass
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
