"""Raft benchmark: 3 RaftNodes on 127.0.0.1, each its own process, fsync on.

    python bench/raft.py [--seconds 10] [--concurrency 512] [--size 100] [--latency-count 2000]

Measures, through RaftNode.propose on the leader (which returns once the entry is
committed and applied there):

- throughput: committed entries/s of ``--size``-byte entries with ``--concurrency``
  proposers running concurrently in the leader's process (as the controller would);
- latency: p50/p99 of single proposals one after another (low load).

Every value is unique; at the end all three nodes must have applied the same number of
entries with the same checksum. Prints a table, then one JSON line (last) with
``commits_s``, ``commit_p50_ms``, ``commit_p99_ms``.

The parent chooses ports and directory ids, starts the node processes (this file with
``--serve``) and drives them with one JSON command per line on their stdin.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

CLUSTER = "raft-bench"


# --- the node process --------------------------------------------------------------------


class CountingStateMachine:
    """Counts applied entries and keeps a CRC of them (order-sensitive)."""

    def __init__(self) -> None:
        self.count = 0
        self.crc = 0

    def apply(self, index: int, data: bytes) -> int:
        self.count += 1
        self.crc = zlib.crc32(data, self.crc)
        return index

    def snapshot(self) -> bytes:
        return json.dumps([self.count, self.crc]).encode()

    def restore(self, data: bytes) -> None:
        self.count, self.crc = json.loads(data)


def serve(args: argparse.Namespace) -> None:
    import trio

    from dlog.raft.disk import DiskStorage
    from dlog.raft.messages import Configuration, Member
    from dlog.raft.node import RaftConfig, RaftNode
    from dlog.types import NodeId

    peers = json.loads(args.peers)  # [[node_id, directory_id, port], ...]
    me = next(p for p in peers if p[0] == args.node)

    async def main() -> None:
        sm = CountingStateMachine()
        storage = DiskStorage.open(
            Path(args.dir) / f"n{args.node}",
            cluster_id=CLUSTER,
            node_id=NodeId(args.node),
            directory_id=me[1],
        )
        node = RaftNode(
            RaftConfig(node_id=NodeId(args.node), cluster_id=CLUSTER, port=me[2]),
            storage=storage,
            state_machine=sm,
        )
        config = Configuration(
            voters=tuple(
                Member(node_id=NodeId(n), directory_id=d, address=f"127.0.0.1:{p}")
                for n, d, p in peers
            )
        )
        stdin = trio.lowlevel.FdStream(os.dup(0))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                node.bootstrap(config)
                # As a broker does after start-up (DESIGN.md): keep the collector off
                # long-lived state.
                gc.collect()
                gc.freeze()
                reply({"ready": True})
                buf = b""
                while True:
                    chunk = await stdin.receive_some(65536)
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        cmd = json.loads(line)
                        if cmd["cmd"] == "quit":
                            nursery.cancel_scope.cancel()
                            return
                        reply(await handle(node, sm, storage, cmd))
                nursery.cancel_scope.cancel()
        finally:
            storage.close()

    async def handle(
        node: Any, sm: CountingStateMachine, storage: Any, cmd: dict[str, Any]
    ) -> dict[str, Any]:
        from dlog.errors import NotLeaderError

        if cmd["cmd"] == "status":
            s = node.status.value
            return {"leader_ready": s.leader_ready, "term": s.term, "leader": s.leader}
        if cmd["cmd"] == "digest":
            return {"count": sm.count, "crc": sm.crc, "applied": node.applied_index.value}
        if cmd["cmd"] == "stats":
            return {
                "fsyncs": storage.fsyncs,
                "records": storage.records_written,
                "cpu_s": time.process_time(),
            }
        size = cmd["size"]
        if cmd["cmd"] == "throughput":
            return await throughput(node, cmd["seconds"], cmd["concurrency"], size)
        if cmd["cmd"] == "latency":
            lat = []
            for i in range(cmd["count"]):
                data = (b"L%d:" % i).ljust(size, b".")
                t0 = time.perf_counter()
                try:
                    await node.propose(data)
                except NotLeaderError:
                    return {"error": "not leader"}
                lat.append((time.perf_counter() - t0) * 1000)
            return {"latencies_ms": lat}
        return {"error": f"unknown command {cmd['cmd']}"}

    async def throughput(node: Any, seconds: float, concurrency: int, size: int) -> dict[str, Any]:
        done = 0
        errors = 0
        end = trio.current_time() + seconds

        async def proposer(worker: int) -> None:
            nonlocal done, errors
            seq = 0
            while trio.current_time() < end:
                seq += 1
                try:
                    await node.propose((b"T%d:%d:" % (worker, seq)).ljust(size, b"."))
                    done += 1
                except Exception:
                    errors += 1
                    return

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for w in range(concurrency):
                nursery.start_soon(proposer, w)
        return {"commits": done, "seconds": trio.current_time() - t0, "errors": errors}

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    trio.run(main)


# --- the parent ----------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Child:
    def __init__(self, node: int, tmp: str, peers: list[list[Any]]) -> None:
        self.node = node
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                "--node",
                str(node),
                "--dir",
                tmp,
                "--peers",
                json.dumps(peers),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.read()["ready"]

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node {self.node} exited ({self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def caught_up(children: list[Child], leader: Child, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until every node applied as many entries as the leader; check they are the
    same entries (count and CRC). Returns the leader's digest."""
    expected = leader.ask(cmd="digest")
    deadline = time.monotonic() + timeout
    for c in children:
        while True:
            d = c.ask(cmd="digest")
            if d["count"] == expected["count"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if (d["count"], d["crc"]) != (expected["count"], expected["crc"]):
            raise RuntimeError(f"node {c.node} applied {d}, leader {expected}")
    return expected


def wait_for_leader(children: list[Child], timeout: float = 15.0) -> Child:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in children:
            if c.ask(cmd="status")["leader_ready"]:
                return c
        time.sleep(0.05)
    raise RuntimeError("no leader elected")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--node", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--peers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="raft-bench-") as tmp:
        ports = free_ports(3)
        peers = [[i + 1, secrets.token_hex(16), ports[i]] for i in range(3)]
        children: list[Child] = []
        try:
            for i in range(3):
                children.append(Child(i + 1, tmp, peers))
            leader = wait_for_leader(children)
            # Warm up (connections, caches), then measure.
            leader.ask(cmd="throughput", seconds=1.0, concurrency=args.concurrency, size=args.size)
            cpu_before = [c.ask(cmd="stats")["cpu_s"] for c in children]
            before = leader.ask(cmd="stats")
            tp = leader.ask(
                cmd="throughput",
                seconds=args.seconds,
                concurrency=args.concurrency,
                size=args.size,
            )
            after = leader.ask(cmd="stats")
            cpu_after = [c.ask(cmd="stats")["cpu_s"] for c in children]
            cpu_us = {
                ("leader" if c is leader else f"follower {c.node}"): (b - a) / tp["commits"] * 1e6
                for c, a, b in zip(children, cpu_before, cpu_after, strict=True)
            }
            if tp.get("errors"):
                raise RuntimeError(f"{tp['errors']} proposals failed during the throughput run")
            # Low load means low load: let the followers finish applying the
            # throughput run's backlog before timing single proposals.
            caught_up(children, leader)
            lat = leader.ask(cmd="latency", count=args.latency_count, size=args.size)
            if "error" in lat:
                raise RuntimeError(lat["error"])
            latencies = lat["latencies_ms"]
            if os.environ.get("DLOG_BENCH_LATENCIES"):
                Path(os.environ["DLOG_BENCH_LATENCIES"]).write_text(json.dumps(latencies))
            # Verify: all nodes applied the same entries (count and checksum).
            expected = caught_up(children, leader)
        finally:
            for c in children:
                c.stop()

    commits_s = tp["commits"] / tp["seconds"]
    fsyncs = after["fsyncs"] - before["fsyncs"]
    p50 = statistics.median(latencies)
    p99 = percentile(latencies, 99)
    rows = [
        ("nodes (processes)", "3"),
        ("entry size", f"{args.size} B"),
        ("concurrent proposers", str(args.concurrency)),
        ("committed entries", f"{tp['commits']}"),
        ("throughput", f"{commits_s:,.0f} entries/s"),
        ("leader fsyncs/s", f"{fsyncs / tp['seconds']:,.0f}"),
        ("entries per fsync", f"{tp['commits'] / max(1, fsyncs):,.1f}"),
        *((f"CPU per entry, {who}", f"{us:.1f} us") for who, us in cpu_us.items()),
        ("latency proposals", str(len(latencies))),
        ("commit latency p50", f"{p50:.3f} ms"),
        ("commit latency p90", f"{percentile(latencies, 90):.3f} ms"),
        ("commit latency p99", f"{p99:.3f} ms"),
        ("commit latency max", f"{max(latencies):.3f} ms"),
        ("verified", f"{expected['count']} entries, crc {expected['crc']:#010x} on all nodes"),
    ]
    width = max(len(k) for k, _ in rows)
    print("raft benchmark (fsync on)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(
        json.dumps(
            {
                "commits_s": round(commits_s, 1),
                "commit_p50_ms": round(p50, 3),
                "commit_p99_ms": round(p99, 3),
                "entries": tp["commits"],
                "concurrency": args.concurrency,
                "entry_bytes": args.size,
                "fsyncs_s": round(fsyncs / tp["seconds"], 1),
                "cpu_us_per_entry": round(sum(cpu_us.values()), 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
