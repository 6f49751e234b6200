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

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dlogctl.common import CLUSTER_FILE

if TYPE_CHECKING:
    from dlog.net.protocol import DescribeClusterResponse


class ClusterFileError(ValueError):
    """A cluster file that cannot be read, or is not one."""


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

    @property
    def removed(self) -> str | None:
        """Why this node was removed from the cluster for good (None: it was not)."""
        from dlog.broker.identity import removed_reason

        return removed_reason(self.path)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    data_dir: str
    base_port: int
    host: str
    nodes: tuple[NodeSpec, ...]

    @property
    def live_nodes(self) -> list[NodeSpec]:
        """The nodes not removed from the cluster (``dlogctl node remove``)."""
        return [n for n in self.nodes if n.removed is None]

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
        """The cluster of ``data_dir``; None if there is none. Raises
        :class:`ClusterFileError` for a cluster file that cannot be read or is not one."""
        path = data_dir / CLUSTER_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            spec = cls(
                str(raw["data_dir"]),
                int(raw["base_port"]),
                str(raw["host"]),
                tuple(NodeSpec(**n) for n in raw["nodes"]),
            )
        except OSError as exc:
            raise ClusterFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError):
            raise ClusterFileError(f"{path} is not a dlog cluster file") from None
        if not spec.nodes:
            raise ClusterFileError(f"{path} is not a dlog cluster file (it has no nodes)")
        return spec

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
    """The pid of the node's process if it is running, else None.

    A pid file outlives its process (a crash, a reboot), and its pid may then belong
    to another program: the pid counts only while that process runs ``dlogctl node
    run`` with this node's data directory (where ``/proc`` can tell)."""
    try:
        pid = int(node.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) and _runs_node(pid, node) else None


#: How long an empty command line is taken for a process still in its exec.
_EXEC_GRACE_S = 2.0


def _runs_node(pid: int, node: NodeSpec) -> bool:
    # A process just started shows an empty command line until its exec has set up
    # the new one, which takes a while after Popen returns (~10 ms on a busy machine
    # here): wait that out rather than call a node that is starting "not running".
    deadline = time.monotonic() + _EXEC_GRACE_S
    while True:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return not Path("/proc/self").exists()  # no /proc here: trust the pid file
        except OSError:
            return True
        if raw:
            break
        # Empty and for good: a kernel thread (no executable) or another user's process
        # (its executable unreadable to us). Neither is a node we started.
        try:
            os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return False
        if time.monotonic() >= deadline or not pid_alive(pid):
            return False
        time.sleep(0.002)
    args = raw.split(b"\0")
    return b"dlogctl" in b" ".join(args) and b"run" in args and os.fsencode(node.data_dir) in args


def ports_in_use(node: NodeSpec) -> list[str]:
    """Which of ``node``'s ports something else holds now, as "rpc port 9400", ...
    (checked by binding them as the node would: TCP for rpc and raft, both for gossip)."""
    taken = []
    for role, address, kinds in (
        ("rpc", node.rpc, (socket.SOCK_STREAM,)),
        ("gossip", node.gossip, (socket.SOCK_DGRAM, socket.SOCK_STREAM)),
        ("raft", node.raft, (socket.SOCK_STREAM,)),
    ):
        host, _, port = address.rpartition(":")
        if not all(_can_bind(host, int(port), kind) for kind in kinds):
            taken.append(f"{role} port {port}")
    return taken


def _can_bind(host: str, port: int, kind: int) -> bool:
    try:
        infos = socket.getaddrinfo(host, port, type=kind)
    except OSError:
        return True  # not this check's business: the node says what is wrong
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio's listeners
        try:
            s.bind(sockaddr)
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE  # (anything else: the node will say)
    return True


def start_node(
    cluster: ClusterSpec, node: NodeSpec, *, log_level: str = "info"
) -> subprocess.Popen[bytes]:
    """Launch ``dlogctl node run`` for ``node`` in the background (own session)."""
    node.path.mkdir(parents=True, exist_ok=True)
    seeds = [n.gossip for n in cluster.nodes if n.id != node.id]
    args = [
        sys.executable,
        # -P: the working directory is not put on sys.path. Started from a source tree
        # (a checkout of dlog), `-m` would import the dlog there, not the installed one
        # (for one, a compiled build would run as pure Python).
        "-P",
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
    if node.id == cluster.nodes[0].id and not any(
        (n.path / "meta.json").exists() for n in cluster.nodes if n.id != node.id
    ):
        # Only while no other node was ever formatted: once the cluster exists, a
        # restarted first node (even one whose disk was lost) joins it through gossip.
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


def kill_node(node: NodeSpec, sig: int = signal.SIGKILL) -> int | None:
    """Send ``sig`` to the node's process (SIGKILL: a crash); returns its pid."""
    pid = node_pid(node)
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return None
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.01)
            _reap(pid)
    return pid


def free_base_port(span: int = 300, attempts: int = 200) -> int:
    """A base port P with P .. P+span free for TCP and UDP on 127.0.0.1 (for tests).

    Picked below Linux's ephemeral range (32768+), so an outgoing connection of another
    process cannot take one of the ports between this check and the node's bind.
    """
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20_000, 32_000 - span, 10)
        if all(_port_free(base + off) for off in (0, 1, 2, 100, 101, 102, 200, 201, 202)):
            return base
    raise RuntimeError("no free port range found")


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def describe_now(addresses: list[str], timeout: float = 2.0) -> DescribeClusterResponse | None:
    """:func:`describe` from synchronous code."""
    import trio

    return trio.run(describe, addresses, timeout)


async def describe(addresses: list[str], timeout: float = 2.0) -> DescribeClusterResponse | None:
    """The cluster as the first reachable node sees it, or None."""
    # Imported here: `dlogctl cluster --help` and the process helpers need no trio or net.
    from dlog.errors import DlogError
    from dlog.net.client import ClientConfig, open_rpc_pool
    from dlog.net.protocol import DescribeClusterRequest, DescribeClusterResponse

    async with open_rpc_pool(ClientConfig(connect_timeout_s=timeout)) as pool:
        for address in addresses:
            try:
                reply = await pool.call(address, DescribeClusterRequest(), timeout=timeout)
            except DlogError:
                continue
            if isinstance(reply, DescribeClusterResponse):
                return reply
    return None


def ready_state(reply: DescribeClusterResponse | None, ids: set[int]) -> tuple[bool, str]:
    """Is the cluster ready (a controller, every node registered and unfenced)? And why not."""
    if reply is None:
        return False, "waiting for the first node to answer"
    if reply.controller is None:
        return False, "electing a controller"
    registered = {b.node_id for b in reply.brokers if not b.fenced}
    missing = sorted(ids - registered)
    if missing:
        return False, f"controller is node {reply.controller}; waiting for node(s) {missing}"
    # Ready means able to survive a failure: the Raft quorum has its voters (up to the
    # default max_voters of 3), not just learners that are still catching up.
    voters = sum(1 for m in reply.raft_members if m.role == "voter")
    want = min(len(ids), 3)
    if voters < want:
        return False, f"controller is node {reply.controller}; {voters} of {want} Raft voters"
    return True, f"controller is node {reply.controller}; all {len(ids)} nodes registered"


def start_cluster(
    data_dir: Path, nodes: int = 3, base_port: int | None = None, *, timeout_s: float = 60
) -> ClusterSpec:
    """Create (or reuse) and start a local cluster; wait until it is ready (for tests and
    benchmarks: the CLI's ``cluster up`` does the same with a progress display)."""
    spec = ClusterSpec.load(data_dir)
    if spec is None:
        spec = ClusterSpec.create(data_dir, nodes, base_port or free_base_port(), "127.0.0.1")
        spec.save()
    for node in spec.live_nodes:
        if node_pid(node) is None:
            start_node(spec, node)
    wait_ready(spec, timeout_s=timeout_s)
    return spec


def wait_ready(spec: ClusterSpec, *, timeout_s: float = 60, ids: set[int] | None = None) -> None:
    want = ids if ids is not None else {n.id for n in spec.live_nodes}
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        reply = describe_now([n.rpc for n in spec.nodes])
        ok, state = ready_state(reply, want)
        if ok:
            return
        time.sleep(0.1)
    logs = "; ".join(str(n.log_file) for n in spec.nodes)
    raise TimeoutError(f"cluster not ready after {timeout_s:g}s ({state}); logs: {logs}")


def stop_cluster(spec: ClusterSpec, *, sig: int = signal.SIGKILL) -> None:
    """Stop every node (SIGKILL by default: tests clean up exactly their processes)."""
    for node in spec.nodes:
        if sig == signal.SIGKILL:
            kill_node(node)
        else:
            stop_node(node)
