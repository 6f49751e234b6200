"""A seeded randomized fault soak: while producers write unique values (acks=all, and
acks=leader beside them) and a consumer reads along, a chaos loop SIGKILLs and
restarts nodes (any node, a partition leader, the controller, two at once, one
restarted at once), SIGSTOPs nodes (the controller among them) for a random time, and
pauses a follower until it leaves the ISR and then kills the leader. One fault at a
time: after each the cluster must heal (every partition led, its full ISR) within a
deadline before the next.

Afterwards: every acks=all acknowledged value is consumed, in acknowledged order per
sender; what the live consumer read is a prefix of the final log (nothing it was
served below the HW was later truncated); every replica's log is identical below the
HW; and no node died on its own or logged a traceback.

``DLOG_CHAOS_SEED`` replays a fault sequence (timing still varies);
``DLOG_CHAOS_SECONDS`` (default 60) sets how long faults are applied;
``DLOG_CHAOS_NODES`` (default 3) the cluster size. The seed is printed at the start
and with every failure.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

import dlog
from dlog.errors import DlogError
from dlog.net.protocol import MetadataRequest, MetadataResponse, PartitionMetadata
from tests.fault.processes import ProcessCluster, eventually, process_cluster
from tests.fault.workload import (
    AckLog,
    LiveConsumer,
    check_acknowledged,
    compare_replica_logs,
    consume_all,
    wait_replicas_converged,
)

SECONDS = float(os.environ.get("DLOG_CHAOS_SECONDS", "60"))
NODES = int(os.environ.get("DLOG_CHAOS_NODES", "3"))
PARTITIONS = 4
TOPIC = "chaos"
GROUP = "chaos-group"
#: After the faults stop (or between two), how long the cluster may take to have
#: every partition led with its full ISR. Failover is a few seconds; a restarted
#: follower must also catch up, on a small noisy machine.
HEAL_DEADLINE_S = 60.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS) + 420)]

#: Lines in a node's log that mean something went wrong inside it.
BAD_LOG_LINE = re.compile(r"Traceback|CRITICAL|\bERROR\b")


class Chaos:
    """The fault loop's state: which nodes are down or paused, and what was done."""

    def __init__(self, cluster: ProcessCluster, rng: random.Random, seed: int) -> None:
        self.cluster = cluster
        self.rng = rng
        self.seed = seed
        self.down: set[int] = set()
        self.paused: set[int] = set()
        self.history: list[str] = []
        self.started = trio.current_time()
        #: Faults applied, by kind.
        self.counts: dict[str, int] = {}

    def note(self, text: str) -> None:
        line = f"[{trio.current_time() - self.started:7.2f}s] {text}"
        self.history.append(line)
        print(line, flush=True)

    def live(self) -> list[int]:
        return [n for n in self.cluster.node_ids if n not in self.down and n not in self.paused]

    # --- primitive faults ------------------------------------------------------------

    def kill(self, node: int) -> None:
        self.note(f"SIGKILL node {node}")
        self.cluster.kill(node)
        self.paused.discard(node)
        self.down.add(node)

    def start(self, node: int) -> None:
        self.note(f"start node {node}")
        self.cluster.start(node)
        self.down.discard(node)

    def pause(self, node: int) -> None:
        self.note(f"SIGSTOP node {node}")
        self.cluster.pause(node)
        self.paused.add(node)

    def resume(self, node: int) -> None:
        self.note(f"SIGCONT node {node}")
        self.cluster.resume(node)
        self.paused.discard(node)

    # --- what the cluster says ---------------------------------------------------------

    async def ask(self, what: Callable[[int], Awaitable[object]]) -> object:
        """The answer of the first live node that answers."""
        last: Exception | None = None
        for n in self.rng.sample(self.live(), len(self.live())):
            try:
                with trio.fail_after(4):
                    return await what(n)
            except (DlogError, trio.TooSlowError) as exc:
                last = exc
        raise DlogError(f"no live node answered: {last!r}")

    async def controller(self) -> int | None:
        try:
            found = await self.ask(self.cluster.controller)
        except DlogError:
            return None
        return found if isinstance(found, int) else None

    async def leader_of(self, partition: int) -> int | None:
        try:
            parts = await self.ask(lambda n: self.cluster.partitions(n, TOPIC))
        except DlogError:
            return None
        assert isinstance(parts, dict)
        leader = parts[partition].leader
        return leader if isinstance(leader, int) else None

    def check_processes(self) -> None:
        """Every node we did not kill is still running (none exited on its own)."""
        for n in self.cluster.node_ids:
            if n not in self.down and not self.cluster.running(n):
                raise AssertionError(f"node {n} exited without being killed")

    async def healed(self, *, timeout: float = HEAL_DEADLINE_S) -> None:
        """Until every node's own metadata has every partition led, with its full ISR,
        and one controller every node agrees on."""

        async def check() -> bool:
            self.check_processes()
            controllers = {await self.cluster.controller(n) for n in self.cluster.node_ids}
            if len(controllers) != 1 or None in controllers:
                return False
            for n in self.cluster.node_ids:
                parts = await known_partitions(self.cluster, n)
                if parts is None:
                    return False
                for info in parts.values():
                    if info.leader is None or sorted(info.isr) != sorted(info.replicas):
                        return False
            return True

        await eventually(check, timeout=timeout, what="cluster healed", interval=0.2)

    # --- the faults -------------------------------------------------------------------

    async def sleep(self, low: float, high: float) -> None:
        await trio.sleep(self.rng.uniform(low, high))

    async def down_for_a_while(self, node: int) -> None:
        """SIGKILL ``node``, wait 0.5-5 s, start it again."""
        self.kill(node)
        await self.sleep(0.5, 5)
        self.start(node)

    async def kill_restart(self) -> None:
        node = self.rng.choice(self.cluster.node_ids)
        await self.down_for_a_while(node)

    async def quick_restart(self) -> None:
        node = self.rng.choice(self.cluster.node_ids)
        self.kill(node)
        self.start(node)

    async def kill_controller(self) -> None:
        node = await self.controller()
        if node is None:
            return
        self.note(f"(node {node} is the controller)")
        await self.down_for_a_while(node)

    async def kill_leader(self) -> None:
        partition = self.rng.randrange(PARTITIONS)
        node = await self.leader_of(partition)
        if node is None:
            return
        self.note(f"(node {node} leads partition {partition})")
        await self.down_for_a_while(node)

    async def double_kill(self) -> None:
        first, second = self.rng.sample(self.cluster.node_ids, 2)
        self.kill(first)
        await self.sleep(0, 1)
        self.kill(second)
        await self.sleep(0.5, 5)
        order = [first, second]
        self.rng.shuffle(order)
        self.start(order[0])
        await self.sleep(0, 2)
        self.start(order[1])

    async def pause_node(self) -> None:
        node = self.rng.choice(self.cluster.node_ids)
        self.pause(node)
        # Below and above broker_session_timeout_ms (4 s).
        await self.sleep(0.3, 8)
        self.resume(node)

    async def pause_controller(self) -> None:
        node = await self.controller()
        if node is None:
            return
        self.note(f"(node {node} is the controller)")
        self.pause(node)
        await self.sleep(0.3, 8)
        self.resume(node)

    async def shrink_then_kill_leader(self) -> None:
        """Pause a follower of a partition until the ISR shrinks without it (or a
        while), then kill the partition's leader: the remaining ISR member must take
        over with everything acknowledged."""
        partition = self.rng.randrange(PARTITIONS)
        leader = await self.leader_of(partition)
        if leader is None:
            return
        follower = self.rng.choice([n for n in self.cluster.node_ids if n != leader])
        self.note(f"(partition {partition}: leader {leader}, pausing follower {follower})")
        self.pause(follower)

        async def shrunk() -> bool:
            parts = await self.cluster.partitions(leader, TOPIC)
            return follower not in parts[partition].isr

        try:
            await eventually(shrunk, timeout=self.rng.uniform(2, 15), what="ISR shrink")
            self.note(f"(partition {partition}: ISR shrank without {follower})")
        except AssertionError:
            self.note(f"(partition {partition}: ISR still holds {follower})")
        self.kill(leader)
        await self.sleep(0, 1.5)
        self.resume(follower)
        await self.sleep(0.5, 4)
        self.start(leader)

    async def kill_all(self) -> None:
        """Every node crashes at once (a deliberate total failure): kill -9 loses
        nothing acknowledged, so all of it must be back after the restart."""
        for n in self.rng.sample(self.cluster.node_ids, len(self.cluster.node_ids)):
            self.kill(n)
        await self.sleep(0, 3)
        for n in self.rng.sample(self.cluster.node_ids, len(self.cluster.node_ids)):
            self.start(n)

    async def kill_catching_up(self) -> None:
        """A follower is down long enough to fall behind; right after it restarts
        (while it catches up, out of the ISR), the partition's leader is killed."""
        partition = self.rng.randrange(PARTITIONS)
        leader = await self.leader_of(partition)
        if leader is None:
            return
        follower = self.rng.choice([n for n in self.cluster.node_ids if n != leader])
        self.note(f"(partition {partition}: leader {leader}, follower {follower})")
        self.kill(follower)
        await self.sleep(2, 6)
        self.start(follower)
        await self.sleep(0, 2)
        self.kill(leader)
        await self.sleep(0.5, 4)
        self.start(leader)

    async def led(self) -> bool:
        """Whether every partition has a leader, as a live node sees it."""
        try:
            parts = await self.ask(lambda n: known_partitions(self.cluster, n))
        except DlogError:
            return False
        return isinstance(parts, dict) and all(i.leader is not None for i in parts.values())

    async def between_faults(self) -> None:
        """Before the next fault: usually the cluster must heal fully; sometimes only
        every partition must have a leader again, so the next fault can hit nodes
        still catching up or partitions whose ISR is still growing back."""
        if self.rng.random() < 0.6:
            await self.healed()
        else:
            self.check_processes()
            await eventually(self.led, timeout=HEAL_DEADLINE_S, what="every partition led")

    async def step(self) -> None:
        faults: list[tuple[int, Callable[[], Awaitable[None]]]] = [
            (3, self.kill_restart),
            (2, self.quick_restart),
            (2, self.kill_controller),
            (2, self.kill_leader),
            (1, self.double_kill),
            (2, self.pause_node),
            (1, self.pause_controller),
            (1, self.shrink_then_kill_leader),
            (1, self.kill_catching_up),
            (1, self.kill_all),
        ]
        fault = self.rng.choices([f for _, f in faults], weights=[w for w, _ in faults])[0]
        name = fault.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        self.note(f"fault: {name}")
        await fault()

    async def heal_all(self) -> None:
        for n in sorted(self.paused):
            self.resume(n)
        for n in sorted(self.down):
            self.start(n)


class Committer:
    """A consumer of group ``GROUP`` that commits its positions every few hundred ms
    through the faults; remembers what it tried to commit and what was acknowledged."""

    def __init__(self, client: dlog.Client) -> None:
        self.client = client
        self.attempted: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
        self.acked: dict[int, int] = {}
        self.failures: list[str] = []

    async def run(self) -> None:
        async with self.client.consumer(
            TOPIC, group=GROUP, from_beginning=True, auto_offset_reset="error"
        ) as consumer:
            while True:
                await consumer.getmany(max_records=20_000, timeout_ms=300)
                offsets = {p: consumer.position(p) for p in range(PARTITIONS)}
                for p, o in offsets.items():
                    self.attempted[p].append(o)
                try:
                    await consumer.commit(offsets)
                except DlogError as exc:
                    self.failures.append(repr(exc))
                    continue
                self.acked.update(offsets)
                await trio.sleep(0.2)

    async def check(self) -> None:
        """The group's committed offsets: each at least the last acknowledged commit,
        and one that was sent (nothing older, nothing invented)."""
        async with self.client.consumer(TOPIC, group=GROUP) as consumer:
            for p in range(PARTITIONS):
                committed = await consumer.committed(p)
                acked = self.acked.get(p)
                assert committed is not None or acked is None, f"partition {p}: commit lost"
                if committed is None:
                    continue
                assert acked is None or committed >= acked, (
                    f"partition {p}: committed offset {committed} is older than the "
                    f"acknowledged commit {acked}"
                )
                assert committed in self.attempted[p], (
                    f"partition {p}: committed offset {committed} was never sent"
                )


async def known_partitions(
    cluster: ProcessCluster, node: int
) -> dict[int, PartitionMetadata] | None:
    """The topic's partitions in ``node``'s metadata; None while it does not know the
    topic yet (a restarted node replaying its metadata log)."""
    reply = await cluster.call(node, MetadataRequest(topics=[TOPIC]), MetadataResponse)
    meta = next((t for t in reply.topics if t.name == TOPIC), None)
    if meta is None or meta.error_code:
        return None
    return {p.partition: p for p in meta.partitions}


def scan_logs(cluster: ProcessCluster) -> list[str]:
    """Lines of the node logs that show a failure inside a node."""
    bad = []
    for n in cluster.node_ids:
        try:
            lines = cluster.log_file(n).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines):
            if BAD_LOG_LINE.search(line):
                bad.append(f"node {n} line {i + 1}: " + " | ".join(lines[i : i + 3]))
    return bad


async def test_chaos_soak(tmp_path: Path) -> None:
    seed = int(os.environ.get("DLOG_CHAOS_SEED") or random.randrange(1 << 32))
    rng = random.Random(seed)
    # Small segments too: rolls, multi-segment recovery and truncation across segments.
    segment_bytes = int(
        os.environ.get("DLOG_CHAOS_SEGMENT_BYTES")
        or rng.choice([1 << 30, 1 << 20, 128 << 10, 32 << 10])
    )
    print(
        f"chaos seed {seed}: {SECONDS:g} s of faults on {NODES} nodes, "
        f"segment_bytes {segment_bytes}",
        flush=True,
    )
    chaos: Chaos | None = None
    try:
        async with (
            process_cluster(tmp_path, nodes=NODES) as cluster,
            dlog.connect(cluster.bootstrap, default_api_timeout_ms=15_000) as client,
        ):
            await client.create_topic(
                TOPIC,
                partitions=PARTITIONS,
                replication_factor=3,
                config={"min_insync_replicas": 2, "segment_bytes": segment_bytes},
            )
            await client.wait_for_topic(TOPIC)
            chaos = Chaos(cluster, rng, seed)
            await chaos.healed()

            acked = AckLog(TOPIC)
            unsafe = AckLog(TOPIC)
            live = LiveConsumer(client, TOPIC, PARTITIONS)
            async with (
                client.producer(acks="all", linger_ms=0) as producer,
                client.producer(acks="leader", linger_ms=2) as leader_producer,
                trio.open_nursery() as nursery,
            ):
                consumer_scope = trio.CancelScope()

                async def consume() -> None:
                    with consumer_scope:
                        await live.run()

                nursery.start_soon(consume)
                committer = Committer(client)
                committer_scope = trio.CancelScope()

                async def commit_loop() -> None:
                    with committer_scope:
                        await committer.run()

                nursery.start_soon(commit_loop)
                nursery.start_soon(acked.send_pipelined, producer, 0, "pipe0", 32)
                nursery.start_soon(unsafe.send_pipelined, leader_producer, 1, "leader1", 16)
                await acked.start_senders(nursery, producer, range(PARTITIONS))

                deadline = trio.current_time() + SECONDS
                try:
                    while trio.current_time() < deadline:
                        await chaos.step()
                        await chaos.between_faults()
                        await chaos.sleep(0.2, 2)
                finally:
                    # Let the cluster heal whatever happened.
                    with trio.CancelScope(shield=True):
                        await chaos.heal_all()
                chaos.note(f"faults done: {chaos.counts}")
                await chaos.healed()
                healed_at = trio.current_time()
                # Every partition takes acks=all writes again.
                await eventually(
                    lambda: all(acked.first_fresh_ack(p, healed_at) for p in range(PARTITIONS)),
                    timeout=30,
                    what="fresh acks=all on every partition after healing",
                )
                # Every send lands before the HWs are taken (a pipelined window in
                # flight would land above them, and the consumed log end past them).
                acked.stopping = unsafe.stopping = True
                await acked.stop(timeout=150)
                await unsafe.stop(timeout=150)
                hws = await wait_replicas_converged(cluster, TOPIC, PARTITIONS, timeout=90)
                await live.wait_until(hws, timeout=60)
                consumer_scope.cancel()
                committer_scope.cancel()
            chaos.note(
                f"acked {acked.total()} (acks=all), {unsafe.total()} (acks=leader); "
                f"{len(acked.failures)} + {len(unsafe.failures)} sends failed; HWs {hws}"
            )
            chaos.note(
                f"offset commits: {sum(map(len, committer.attempted.values())) // PARTITIONS} "
                f"sent, {len(committer.failures)} failed; last acknowledged {committer.acked}"
            )
            await committer.check()
            seen = await consume_all(cluster.bootstrap, TOPIC, PARTITIONS)
            check_acknowledged(acked, seen)
            for p in range(PARTITIONS):
                got = live.seen[p]
                assert got == seen[p][: len(got)], (
                    f"partition {p}: the live consumer read values that are not a prefix of "
                    f"the final log (first difference at index "
                    f"{next(i for i, (a, b) in enumerate(zip(got, seen[p], strict=False)) if a != b) if any(a != b for a, b in zip(got, seen[p], strict=False)) else min(len(got), len(seen[p]))})"
                )
            chaos.check_processes()
            placement = await cluster.partitions(cluster.node_ids[0], TOPIC)
            replicas = {p: list(info.replicas) for p, info in placement.items()}
            cluster.cleanup()
            values = compare_replica_logs(cluster, TOPIC, hws, replicas)
            for p in range(PARTITIONS):
                assert values[p] == seen[p], f"partition {p}: replica logs differ from consumed"
            bad = scan_logs(cluster)
            assert not bad, f"{len(bad)} bad node log lines:\n" + "\n".join(bad[:20])
    except BaseException:
        print(f"\nCHAOS FAILED: seed {seed} (replay with DLOG_CHAOS_SEED={seed})")
        if chaos is not None:
            print("\n".join(chaos.history))
        raise
    print(f"chaos seed {seed} passed: {chaos.counts if chaos else {}}")
