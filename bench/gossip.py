"""bench/gossip.py: failure detection of dlog.gossip, simulated and with real processes.

Measures, with the default GossipConfig:

1. simulation (seeded, dlog.gossip.sim): time from a crash to "dead" on every survivor
   in 3- and 20-node clusters (median, p99); false "dead" declarations of live nodes in
   a 20-node cluster at 10% packet loss over 10 simulated minutes; bytes/s sent per node;
2. real processes on 127.0.0.1 (one GossipNode per process, UDP + TCP push-pull):
   kill -9 of a node to "dead" on every survivor, for 3 and 20 nodes (the victim is
   restarted on its port and rejoins between trials); bytes/s per node;
3. real 3-process cluster while both cores are saturated by busy loops for
   ``--busy-seconds`` (0 skips it): false "dead" declarations.

Prints a table, then one JSON line (last) with at least ``detect_median_s_3``,
``detect_p99_s_3``, ``detect_median_s_20``, ``false_dead_at_10pct_loss``,
``bytes_s_per_node``.

    python bench/gossip.py [--sim-only] [--busy-seconds 60] [--trials-3 20] [--trials-20 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import trio

from dlog.gossip import GossipConfig, GossipNode, MemberState
from dlog.gossip.sim import SimNetwork
from dlog.types import NodeId

HOST = "127.0.0.1"
SCRIPT = os.path.abspath(__file__)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


# --- simulation ------------------------------------------------------------------------


def sim_detection(size: int, seed: int) -> float:
    net = SimNetwork(seed=seed, max_delay=1)
    ids = [NodeId(i) for i in range(size)]
    for node_id in ids:
        net.add_node(node_id, seeds=[NodeId(0)] if node_id else [])
    if not net.run_until(lambda: net.sees_exactly(ids, set(ids)), max_ticks=3000):
        raise RuntimeError("simulated cluster did not converge")
    net.run(net.rng.randrange(200, 600))
    victim, survivors = ids[-1], ids[:-1]
    net.crash(victim)
    crashed_at = net.now
    if not net.run_until(
        lambda: net.all_see(survivors, victim, MemberState.DEAD), max_ticks=3000, every=1
    ):
        raise RuntimeError("crash not detected in 30 simulated seconds")
    return (net.now - crashed_at) * net.config.tick_ms / 1000


def sim_loss_run(seed: int, minutes: int) -> tuple[int, int, float]:
    """(false deaths, suspicions, bytes/s per node) of 20 nodes at 10% loss."""
    net = SimNetwork(seed=seed, loss=0.10, max_delay=2)
    ids = [NodeId(i) for i in range(20)]
    for node_id in ids:
        net.add_node(
            node_id,
            seeds=[NodeId(0)] if node_id else [],
            metadata={"rpc": f"10.0.0.{node_id}:9400", "role": "broker"},
        )
    net.run_until(lambda: net.sees_exactly(ids, set(ids)), max_ticks=3000)
    start_bytes = sum(net.bytes_sent_per_node().values())
    start = net.now
    ticks = minutes * 60 * 100
    net.run(ticks)
    seconds = (net.now - start) * net.config.tick_ms / 1000
    sent = sum(net.bytes_sent_per_node().values()) - start_bytes
    suspicions = sum(n.core.stats.suspicions_raised for n in net.nodes.values())
    return len(net.false_deaths()), suspicions, sent / len(ids) / seconds


# --- real processes --------------------------------------------------------------------


async def child_main(node_id: int, port: int, seeds: list[str]) -> None:
    """One gossip node; prints JSON lines: ready, events, stats every second."""
    node = GossipNode(
        node_id=NodeId(node_id),
        host=HOST,
        port=port,
        seeds=seeds,
        metadata={"rpc": f"{HOST}:{9400 + node_id}", "role": "broker", "version": "bench"},
    )

    def emit(record: dict[str, object]) -> None:
        print(json.dumps(record), flush=True)

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(node.run)
        emit({"ready": bound, "t": time.time()})

        async def stats() -> None:
            while True:
                emit({"stats": node.stats.bytes_sent, "t": time.time()})
                await trio.sleep(1)

        nursery.start_soon(stats)
        async with node.subscribe(max_buffer=100_000) as events:
            async for event in events:
                emit(
                    {
                        "event": type(event).__name__,
                        "node": event.member.node_id,
                        "inc": event.member.incarnation,
                        "t": time.time(),
                    }
                )


@dataclass
class Child:
    node_id: int
    process: trio.Process
    port: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    events: list[dict[str, object]] = field(default_factory=list)
    stats: list[tuple[float, int]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)


class RealCluster:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.children: dict[int, Child] = {}
        self.seeds: list[str] = []

    async def start(self, node_id: int, port: int = 0) -> Child:
        command = [
            sys.executable,
            SCRIPT,
            "--child",
            str(node_id),
            "--port",
            str(port),
            "--seeds",
            *self.seeds,
        ]
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
        child = Child(node_id, process)
        self.children[node_id] = child
        self.nursery.start_soon(self._read, child)
        with trio.fail_after(30):
            await child.ready.wait()
        if not self.seeds:
            self.seeds = [f"{HOST}:{child.port}"]
        return child

    async def _read(self, child: Child) -> None:
        assert child.process.stdout is not None
        buffer = b""
        async for chunk in child.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                record = json.loads(line)
                if "ready" in record:
                    child.port = int(record["ready"])
                    child.ready.set()
                elif "stats" in record:
                    child.stats.append((float(record["t"]), int(record["stats"])))
                else:
                    child.events.append(record)
                    child.changed.set()
                    child.changed = trio.Event()

    def state_seen(self, observer: int, subject: int) -> str | None:
        state = None
        for record in self.children[observer].events:
            if record["node"] == subject:
                state = str(record["event"])
        return state

    async def wait_all(
        self, observers: list[int], subject: int, events: set[str], since: float, timeout: float
    ) -> float:
        """Wall time when every observer reported one of ``events`` about ``subject``."""
        with trio.fail_after(timeout):
            while True:
                times = []
                for observer in observers:
                    hits = [
                        float(str(r["t"]))
                        for r in self.children[observer].events
                        if r["node"] == subject
                        and r["event"] in events
                        and float(str(r["t"])) >= since
                    ]
                    if not hits:
                        break
                    times.append(min(hits))
                else:
                    return max(times)
                await self.children[observer].changed.wait()

    def kill(self, node_id: int) -> None:
        self.children[node_id].process.send_signal(signal.SIGKILL)

    def stop_all(self) -> None:
        for child in self.children.values():
            if child.process.returncode is None:
                child.process.send_signal(signal.SIGKILL)

    def bytes_per_second(self) -> float:
        rates = []
        for child in self.children.values():
            if len(child.stats) >= 2:
                t0, b0 = child.stats[-6] if len(child.stats) > 6 else child.stats[0]
                t1, b1 = child.stats[-1]
                if t1 > t0:
                    rates.append((b1 - b0) / (t1 - t0))
        return statistics.mean(rates) if rates else 0.0


async def real_detection(size: int, trials: int) -> tuple[list[float], float]:
    async with trio.open_nursery() as nursery:
        cluster = RealCluster(nursery)
        try:
            for node_id in range(1, size + 1):
                await cluster.start(node_id)
            everyone = list(range(1, size + 1))
            start = time.time() - 60
            for subject in everyone:
                others = [o for o in everyone if o != subject]
                await cluster.wait_all(others, subject, {"MemberJoined"}, start, timeout=60)
            await trio.sleep(3)  # steady state for the bytes/s sample
            rate = cluster.bytes_per_second()
            times = []
            for trial in range(trials):
                victim = 2 + trial % (size - 1)
                survivors = [o for o in everyone if o != victim]
                port = cluster.children[victim].port
                await trio.sleep(0.5 + (trial % 5) * 0.07)  # spread kills over the period
                killed_at = time.time()
                cluster.kill(victim)
                dead_at = await cluster.wait_all(
                    survivors, victim, {"MemberDead"}, killed_at, timeout=15
                )
                times.append(dead_at - killed_at)
                await cluster.children[victim].process.wait()
                restarted_at = time.time()
                await cluster.start(victim, port)
                await cluster.wait_all(
                    survivors, victim, {"MemberJoined"}, restarted_at, timeout=15
                )
            return times, rate
        finally:
            cluster.stop_all()
            nursery.cancel_scope.cancel()


async def real_busy(seconds: float) -> tuple[int, int]:
    """(false dead, suspect events) in a 3-process cluster while both cores spin."""
    async with trio.open_nursery() as nursery:
        cluster = RealCluster(nursery)
        burners: list[trio.Process] = []
        try:
            for node_id in (1, 2, 3):
                await cluster.start(node_id)
            start = time.time() - 60
            for subject in (1, 2, 3):
                others = [o for o in (1, 2, 3) if o != subject]
                await cluster.wait_all(others, subject, {"MemberJoined"}, start, timeout=60)
            busy_from = time.time()
            for _ in range(os.cpu_count() or 2):
                burners.append(
                    await trio.lowlevel.open_process([sys.executable, "-c", "while True: pass"])
                )
            await trio.sleep(seconds)
            events = [
                r
                for c in cluster.children.values()
                for r in c.events
                if float(str(r["t"])) >= busy_from
            ]
            dead = sum(1 for r in events if r["event"] == "MemberDead")
            suspect = sum(1 for r in events if r["event"] == "MemberSuspect")
            return dead, suspect
        finally:
            for burner in burners:
                burner.send_signal(signal.SIGKILL)
            cluster.stop_all()
            nursery.cancel_scope.cancel()


# --- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seeds", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--sim-only", action="store_true", help="skip real processes")
    parser.add_argument(
        "--busy-seconds",
        type=float,
        default=0,
        help="run the saturated-cores false-positive check this long (0: skip)",
    )
    parser.add_argument("--sim-trials-3", type=int, default=200)
    parser.add_argument("--sim-trials-20", type=int, default=40)
    parser.add_argument("--loss-minutes", type=int, default=10)
    parser.add_argument("--trials-3", type=int, default=20)
    parser.add_argument("--trials-20", type=int, default=8)
    args = parser.parse_args()
    if args.child is not None:
        try:
            trio.run(child_main, args.child, args.port, args.seeds)
        except KeyboardInterrupt:
            pass
        return

    config = GossipConfig()
    rows: list[tuple[str, str]] = []
    result: dict[str, object] = {}

    t0 = time.perf_counter()
    sim3 = [sim_detection(3, seed) for seed in range(args.sim_trials_3)]
    sim20 = [sim_detection(20, seed) for seed in range(args.sim_trials_20)]
    false_dead, suspicions, sim_rate = sim_loss_run(seed=10, minutes=args.loss_minutes)
    rows += [
        (
            "sim 3 nodes: kill -> dead on all, median / p99 s",
            f"{statistics.median(sim3):.2f} / {p99(sim3):.2f}  ({len(sim3)} trials)",
        ),
        (
            "sim 20 nodes: kill -> dead on all, median / p99 s",
            f"{statistics.median(sim20):.2f} / {p99(sim20):.2f}  ({len(sim20)} trials)",
        ),
        (
            f"sim 20 nodes, 10% loss, {args.loss_minutes} min: false dead",
            f"{false_dead}  ({suspicions} suspicions raised, all refuted)",
        ),
        ("sim 20 nodes, 10% loss: bytes/s sent per node", f"{sim_rate:.0f}"),
        ("sim wall time s", f"{time.perf_counter() - t0:.1f}"),
    ]
    result.update(
        sim_detect_median_s_3=round(statistics.median(sim3), 3),
        sim_detect_p99_s_3=round(p99(sim3), 3),
        sim_detect_median_s_20=round(statistics.median(sim20), 3),
        sim_detect_p99_s_20=round(p99(sim20), 3),
        false_dead_at_10pct_loss=false_dead,
        sim_bytes_s_per_node_20_at_10pct_loss=round(sim_rate),
    )
    detect3, detect20, rate3 = sim3, sim20, sim_rate
    if not args.sim_only:
        real3, rate3 = trio.run(real_detection, 3, args.trials_3)
        real20, rate20 = trio.run(real_detection, 20, args.trials_20)
        detect3, detect20 = real3, real20
        rows += [
            (
                "real 3 processes: kill -9 -> dead on all, median / p99 s",
                f"{statistics.median(real3):.2f} / {p99(real3):.2f}  ({len(real3)} trials)",
            ),
            (
                "real 20 processes: kill -9 -> dead on all, median / p99 s",
                f"{statistics.median(real20):.2f} / {p99(real20):.2f}  ({len(real20)} trials)",
            ),
            ("real 3 processes: bytes/s sent per node", f"{rate3:.0f}"),
            ("real 20 processes: bytes/s sent per node", f"{rate20:.0f}"),
        ]
        result.update(
            real_detect_median_s_3=round(statistics.median(real3), 3),
            real_detect_p99_s_3=round(p99(real3), 3),
            real_detect_median_s_20=round(statistics.median(real20), 3),
            real_detect_p99_s_20=round(p99(real20), 3),
            real_bytes_s_per_node_20=round(rate20),
        )
        if args.busy_seconds > 0:
            busy_dead, busy_suspect = trio.run(real_busy, args.busy_seconds)
            rows.append(
                (
                    f"real 3 processes, cores saturated {args.busy_seconds:.0f} s: false dead",
                    f"{busy_dead}  ({busy_suspect} suspect events)",
                )
            )
            result.update(false_dead_busy_cores=busy_dead, busy_seconds=args.busy_seconds)
    result.update(
        detect_median_s_3=round(statistics.median(detect3), 3),
        detect_p99_s_3=round(p99(detect3), 3),
        detect_median_s_20=round(statistics.median(detect20), 3),
        bytes_s_per_node=round(rate3),
        source="real" if not args.sim_only else "sim",
        probe_interval_ms=config.probe_interval_ms,
        probe_timeout_ms=config.probe_timeout_ms,
        suspicion_mult=config.suspicion_mult,
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
