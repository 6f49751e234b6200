"""A local cluster of real ``dlogctl node run`` processes for fault tests.

Nodes are started with :func:`dlogctl.local.start_node` (and restarted through the
CLI's ``dlogctl cluster up``), each in its own session, on free ports below the
kernel's ephemeral range. The harness remembers every pid it started and signals exactly those: SIGKILL for a
crash, SIGSTOP/SIGCONT for a pause. On exit every paused pid gets SIGCONT first,
then every pid still alive gets SIGKILL, so nothing outlives the test.

Blocking helpers of :mod:`dlogctl.local` (they call ``trio.run`` themselves) run in a
worker thread. Waiting is always on a condition with a deadline (:func:`eventually`).
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import trio
from dlogctl.local import (
    ClusterSpec,
    describe,
    node_pid,
    pid_alive,
    ready_state,
    start_node,
)

from dlog.errors import DlogError, error_from_wire
from dlog.net.client import ClientConfig, RpcPool, open_rpc_pool
from dlog.net.messages import Message
from dlog.net.protocol import (
    DescribeClusterRequest,
    DescribeClusterResponse,
    MetadataRequest,
    MetadataResponse,
    PartitionMetadata,
    ReplicaStatusRequest,
    ReplicaStatusResponse,
)

T = TypeVar("T")
M = TypeVar("M", bound=Message)


async def eventually(
    check: Callable[[], Awaitable[T | None] | T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """Poll ``check`` (a function or a coroutine function) until it returns something
    other than None/False; that value.

    A DlogError from ``check`` counts as "not yet" (a node may be down or electing).
    Fails the test after ``timeout`` seconds, saying what was last seen.
    """
    deadline = trio.current_time() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except DlogError as exc:
            result = None
            last = exc
        else:
            if result is not None and result is not False:
                return result
        if trio.current_time() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last error: {last!r})")
        await trio.sleep(interval)


class ProcessCluster:
    """The nodes of one test, with the pids it started (see the module docstring)."""

    def __init__(self, spec: ClusterSpec, pool: RpcPool) -> None:
        self.spec = spec
        self.pool = pool
        #: Every pid this test started (read back from the nodes' pid files).
        self.pids: set[int] = set()
        self.paused: set[int] = set()
        self._record_pids()

    # --- addresses --------------------------------------------------------------------

    @property
    def node_ids(self) -> list[int]:
        return [n.id for n in self.spec.nodes]

    @property
    def bootstrap(self) -> list[str]:
        return [n.rpc for n in self.spec.nodes]

    def rpc(self, node_id: int) -> str:
        return self.spec.node(node_id).rpc

    def log_file(self, node_id: int) -> Path:
        return self.spec.node(node_id).log_file

    def data_dir(self, node_id: int) -> Path:
        return self.spec.node(node_id).path

    # --- processes --------------------------------------------------------------------

    def _record_pids(self) -> None:
        for node in self.spec.nodes:
            pid = node_pid(node)
            if pid is not None:
                self.pids.add(pid)

    def pid(self, node_id: int) -> int:
        """The pid of a running node this test started."""
        pid = node_pid(self.spec.node(node_id))
        if pid is None:
            raise AssertionError(f"node {node_id} is not running")
        if pid not in self.pids:
            raise AssertionError(f"node {node_id} runs as pid {pid}, which this test did not start")
        return pid

    def running(self, node_id: int) -> bool:
        return node_pid(self.spec.node(node_id)) is not None

    def kill(self, node_id: int) -> float:
        """SIGKILL the node (a crash) and wait until it is gone; the time of the kill."""
        pid = self.pid(node_id)
        killed_at = trio.current_time()
        os.kill(pid, signal.SIGKILL)
        self.paused.discard(pid)
        _wait_gone(pid, timeout=10)
        return killed_at

    def terminate(self, node_id: int) -> int:
        """SIGTERM the node (a controlled shutdown); its pid, to wait for with
        :meth:`exited`."""
        pid = self.pid(node_id)
        os.kill(pid, signal.SIGTERM)
        return pid

    def exited(self, pid: int) -> bool:
        """Whether a pid this test started is gone (reaping it if it is our child)."""
        assert pid in self.pids
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return not pid_alive(pid)

    def pause(self, node_id: int) -> float:
        """SIGSTOP the node (it keeps its sockets but answers nothing); the time."""
        pid = self.pid(node_id)
        self.paused.add(pid)
        os.kill(pid, signal.SIGSTOP)
        return trio.current_time()

    def resume(self, node_id: int) -> None:
        pid = self.pid(node_id)
        os.kill(pid, signal.SIGCONT)
        self.paused.discard(pid)

    def start(self, node_id: int) -> int:
        """Start one node that is not running (as ``cluster up`` would, but without
        waiting for the cluster to be ready); its pid, remembered for cleanup."""
        assert not self.running(node_id), f"node {node_id} is already running"
        pid = start_node(self.spec, self.spec.node(node_id)).pid
        self.pids.add(pid)
        return pid

    async def cluster_up(self, *, timeout: float = 60) -> str:
        """``dlogctl cluster up`` on this cluster's data dir: starts the nodes that are
        not running and waits until the cluster is ready. Its output."""
        args = [
            sys.executable,
            "-P",  # (not the source tree's dlog: see start_node)
            "-m",
            "dlogctl",
            "cluster",
            "up",
            "--data-dir",
            self.spec.data_dir,
            "--timeout",
            str(timeout),
        ]
        try:
            with trio.fail_after(timeout + 30):
                done = await trio.run_process(
                    args, capture_stdout=True, capture_stderr=True, check=False
                )
        finally:
            # Whatever it started is ours to clean up, even if it failed or hung.
            self._record_pids()
        out = done.stdout.decode() + done.stderr.decode()
        if done.returncode != 0:
            raise AssertionError(f"dlogctl cluster up failed ({done.returncode}): {out}")
        return out

    async def dlogctl(self, *args: str, bootstrap: str | None = None) -> str:
        """Run a dlogctl command against the cluster (or one node); its stdout."""
        addresses = bootstrap or ",".join(self.bootstrap)
        argv = [sys.executable, "-P", "-m", "dlogctl", *args, "--bootstrap", addresses]
        with trio.fail_after(60):
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
        if done.returncode != 0:
            raise AssertionError(
                f"dlogctl {' '.join(args)} failed ({done.returncode}): {done.stderr.decode()}"
            )
        return str(done.stdout.decode())

    def cleanup(self) -> None:
        """SIGCONT every paused pid, then SIGKILL every pid still alive, and wait."""
        for pid in list(self.paused):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.paused.clear()
        for pid in self.pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
        for pid in self.pids:
            _wait_gone(pid, timeout=10)

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for node in self.spec.nodes:
            try:
                text = node.log_file.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = ["(no log)"]
            out.append(f"--- node {node.id} ({node.log_file}) ---")
            out.extend(text)
        return "\n".join(out)

    # --- each node's own view ------------------------------------------------------------

    async def call(self, node_id: int, request: Message, response_type: type[M]) -> M:
        return await self.pool.call_typed(self.rpc(node_id), request, response_type, timeout=3)

    async def describe_cluster(self, node_id: int) -> DescribeClusterResponse:
        return await self.call(node_id, DescribeClusterRequest(), DescribeClusterResponse)

    async def partitions(self, node_id: int, topic: str) -> dict[int, PartitionMetadata]:
        """The topic's partitions as ``node_id``'s own metadata copy has them."""
        response = await self.call(node_id, MetadataRequest(topics=[topic]), MetadataResponse)
        meta = next(t for t in response.topics if t.name == topic)
        if meta.error_code:
            # A DlogError, so that eventually() reads it as "not yet" (a restarted node
            # may not know the topic for a moment).
            raise error_from_wire(meta.error_code, f"node {node_id}: {topic}: {meta.error_message}")
        return {p.partition: p for p in meta.partitions}

    async def replica_status(self, node_id: int, topic: str) -> ReplicaStatusResponse:
        return await self.call(node_id, ReplicaStatusRequest(topics=[topic]), ReplicaStatusResponse)

    async def controller(self, node_id: int) -> int | None:
        return (await self.describe_cluster(node_id)).controller

    async def wait_quorum(self, *, timeout: float = 30) -> None:
        """Until min(3, nodes) nodes are Raft voters.

        The start (like ``cluster up``) is done once a controller is elected and
        every broker registered; the controller then adds the others as learners
        and promotes them one by one. Until that is done the first node is the only
        voter, and killing it leaves no one to elect a controller.
        """
        want = min(3, len(self.spec.nodes))

        async def formed() -> bool:
            reply = await self.describe_cluster(self.node_ids[0])
            return sum(1 for m in reply.raft_members if m.role == "voter") >= want

        await eventually(formed, timeout=timeout, what=f"{want} Raft voters")


def _wait_gone(pid: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} did not exit")
        time.sleep(0.01)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@asynccontextmanager
async def process_cluster(root: Path, nodes: int = 3) -> AsyncIterator[ProcessCluster]:
    """A fresh cluster of ``nodes`` processes under ``root``, killed on exit.

    On a failure the tails of the node logs are printed (pytest shows them).
    """
    spec = await trio.to_thread.run_sync(lambda: _start(root, nodes))
    body_error: BaseException | None = None
    async with open_rpc_pool(ClientConfig(connect_timeout_s=1, request_timeout_s=3)) as pool:
        cluster = ProcessCluster(spec, pool)
        try:
            await cluster.wait_quorum()
            yield cluster
        except BaseException as exc:
            print(cluster.log_tails())
            body_error = exc
        finally:
            cluster.cleanup()
    if body_error is not None:
        # Raised outside the pool's nursery: the test's own exception, not a group.
        raise body_error


def _start(root: Path, nodes: int) -> ClusterSpec:
    """Start a cluster and wait until it is ready. Ports are checked free before the
    nodes bind them, but something else may take one in between: a node that exits
    (it cannot bind) makes a fresh attempt on other ports rather than a 60 s wait."""
    failures = []
    for attempt in range(3):
        spec = ClusterSpec.create(
            root / f"cluster{attempt}" if attempt else root / "cluster",
            nodes,
            _free_base_port(),
            "127.0.0.1",
        )
        spec.save()
        pids = [start_node(spec, node).pid for node in spec.nodes]
        try:
            _wait_ready(spec, pids, timeout=60)
            return spec
        except _NodeExited as exc:
            failures.append(str(exc))
            _kill_all(pids)
        except BaseException:
            _kill_all(pids)
            raise
    raise AssertionError(f"no cluster started in 3 attempts: {failures}")


class _NodeExited(Exception):
    pass


def _wait_ready(spec: ClusterSpec, pids: list[int], *, timeout: float) -> None:
    ids = {n.id for n in spec.nodes}
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        for node, pid in zip(spec.nodes, pids, strict=True):
            if not pid_alive(pid):
                tail = node.log_file.read_text(errors="replace").splitlines()[-3:]
                raise _NodeExited(f"node {node.id} exited: {' / '.join(tail)}")
        ok, state = ready_state(trio.run(describe, [n.rpc for n in spec.nodes]), ids)
        if ok:
            return
        time.sleep(0.1)
    raise AssertionError(f"cluster not ready after {timeout:g} s ({state})")


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _wait_gone(pid, timeout=10)


def _free_base_port() -> int:
    """A base port P with P, P+100, P+200 (+ node index) free, below the kernel's
    ephemeral range: there no outgoing connection can take one before a node binds it
    (``dlogctl.local.free_base_port`` picks from the ephemeral range too)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(11_000, min(low, 60_000) - 300)
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10_000, top, 10)
        if all(_port_free(base + off) for off in (0, 1, 2, 100, 101, 102, 200, 201, 202)):
            return base
    raise AssertionError("no free port range")


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True
