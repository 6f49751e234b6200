"""``dlogctl top``: a live view of brokers, partitions, ISR, LEO, HW and lag.

It reads the cluster-status RPC (any broker answers it by asking every broker for its
replica state) once per refresh and renders snapshots; it holds no logic of its own
beyond rates (deltas between snapshots). When the broker it reads from dies, the client
switches to another and the header says so.

Keys in the live view: ``q`` quits, ``t`` cycles the topic filter, ``a`` shows all.
"""

from __future__ import annotations

import os
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dlog.errors import DlogError
from dlog.net.protocol import ClusterStatusResponse, PartitionState
from dlogctl.common import BootstrapOption, DataDirOption, open_client, resolve_bootstrap, run

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 30


@dataclass
class Rates:
    """Per-topic produce (HW growth) and consume (committed offset growth) rates."""

    last: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    produce: dict[str, deque[float]] = field(default_factory=dict)
    consume: dict[str, deque[float]] = field(default_factory=dict)

    def update(self, status: ClusterStatusResponse, now: float) -> None:
        hw = _high_watermarks(status)
        committed: dict[str, int] = {}
        for g in status.group_offsets:
            committed[g.topic] = committed.get(g.topic, 0) + g.offset
        topics = {t for t, _ in hw}
        for topic in topics:
            total_hw = sum(v for (t, _), v in hw.items() if t == topic)
            total_committed = committed.get(topic, 0)
            previous = self.last.get(topic)
            self.last[topic] = (now, total_hw, total_committed)
            if previous is None:
                continue
            dt = max(now - previous[0], 1e-6)
            self.produce.setdefault(topic, deque(maxlen=HISTORY)).append(
                max(0, total_hw - previous[1]) / dt
            )
            self.consume.setdefault(topic, deque(maxlen=HISTORY)).append(
                max(0, total_committed - previous[2]) / dt
            )


def sparkline(values: deque[float] | None) -> str:
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


def _leader_states(status: ClusterStatusResponse) -> dict[tuple[str, int], PartitionState]:
    """Each partition's state as its leader reports it."""
    out: dict[tuple[str, int], PartitionState] = {}
    for reply in status.replicas:
        for p in reply.partitions:
            if p.role == "leader":
                out[(p.topic, p.partition)] = p
    return out


def _high_watermarks(status: ClusterStatusResponse) -> dict[tuple[str, int], int]:
    return {k: p.high_watermark for k, p in _leader_states(status).items()}


def _fmt_rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.1f}M/s"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k/s"
    return f"{value:.0f}/s"


def render(
    status: ClusterStatusResponse,
    rates: Rates,
    *,
    topic_filter: str | None = None,
    notice: str = "",
    include_internal: bool = False,
) -> Group:
    """One snapshot as rich renderables (used by the live view and ``--once``)."""
    leaders = _leader_states(status)
    led: dict[int, int] = {}
    for topic in status.topics:
        for p in topic.partitions:
            if p.leader is not None:
                led[p.leader] = led.get(p.leader, 0) + 1
    header = Text()
    header.append(f"dlog cluster {status.cluster_id}", style="bold")
    header.append(f"   controller: node {status.controller}   ")
    header.append(f"metadata index: {status.metadata_index}   ")
    header.append(f"answered by: node {status.answered_by}")
    if status.unreachable:
        header.append(f"   unreachable: {status.unreachable}", style="bold red")
    if notice:
        header.append(f"\n{notice}", style="yellow")

    brokers = Table(title="brokers", expand=True)
    for column in ("id", "rpc", "alive", "state", "raft", "leads"):
        brokers.add_column(column)
    for b in status.brokers:
        alive = "[green]yes[/]" if b.alive else "[red]no[/]"
        state = "[red]fenced[/]" if b.fenced else "active"
        role = status.raft_roles.get(str(b.node_id), "-")
        if b.node_id == status.controller:
            role += " (controller)"
        brokers.add_row(str(b.node_id), b.rpc, alive, state, role, str(led.get(b.node_id, 0)))

    partitions = Table(title="partitions", expand=True)
    for column in ("topic", "part", "leader", "epoch", "replicas", "isr", "LEO per replica", "HW"):
        partitions.add_column(column)
    shown_topics = []
    for topic in status.topics:
        if topic.internal and not include_internal and topic_filter != topic.name:
            continue
        if topic_filter is not None and topic.name != topic_filter:
            continue
        shown_topics.append(topic.name)
        for p in topic.partitions:
            leader_state = leaders.get((topic.name, p.partition))
            offline = p.leader is None
            under = len(p.isr) < len(p.replicas)
            style = "bold red" if offline else ("yellow" if under else "")
            leo = ""
            hw = "-"
            if leader_state is not None:
                leo = " ".join(f"{r.node_id}:{r.log_end_offset}" for r in leader_state.replicas)
                hw = str(leader_state.high_watermark)
            partitions.add_row(
                topic.name,
                str(p.partition),
                "offline" if offline else str(p.leader),
                str(p.leader_epoch),
                ",".join(map(str, p.replicas)),
                ",".join(map(str, p.isr)),
                leo,
                hw,
                style=style,
            )

    topics = Table(title="rates", expand=True)
    for column in ("topic", "produce", "", "consume", ""):
        topics.add_column(column)
    for name in shown_topics:
        prod = rates.produce.get(name)
        cons = rates.consume.get(name)
        topics.add_row(
            name,
            _fmt_rate(prod[-1]) if prod else "-",
            sparkline(prod),
            _fmt_rate(cons[-1]) if cons else "-",
            sparkline(cons),
        )

    groups = Table(title="consumer groups", expand=True)
    for column in ("group", "topic", "part", "committed", "lag"):
        groups.add_column(column)
    hws = {k: p.high_watermark for k, p in leaders.items()}
    for g in status.group_offsets:
        if topic_filter is not None and g.topic != topic_filter:
            continue
        hw_value = hws.get((g.topic, g.partition))
        lag = "-" if hw_value is None else str(max(0, hw_value - g.offset))
        groups.add_row(g.group, g.topic, str(g.partition), str(g.offset), lag)

    footer = Text(
        f"filter: {topic_filter or 'all topics'}   keys: q quit, t next topic, a all",
        style="dim",
    )
    parts: list[object] = [Panel(header), brokers, partitions, topics]
    if status.group_offsets:
        parts.append(groups)
    parts.append(footer)
    return Group(*parts)  # type: ignore[arg-type]


@contextmanager
def _cbreak() -> Iterator[int | None]:
    """Single-key input from the terminal, restored on exit (None without a tty)."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _live(addresses: list[str], interval: float, topic: str | None) -> None:
    console = Console()
    rates = Rates()
    state = {"filter": topic, "quit": False}
    notice = ""
    last_answered: int | None = None
    status: ClusterStatusResponse | None = None

    async with open_client(addresses) as client, trio.open_nursery() as nursery:
        with _cbreak() as fd:
            if fd is not None:
                stream = trio.lowlevel.FdStream(os.dup(fd))

                async def keys() -> None:
                    async with stream:
                        while True:
                            data = await stream.receive_some(16)
                            if not data:
                                return
                            for key in data.decode(errors="ignore").lower():
                                if key == "q":
                                    state["quit"] = True
                                    nursery.cancel_scope.cancel()
                                    return
                                if key == "a":
                                    state["filter"] = None
                                if key == "t" and status is not None:
                                    names = [t.name for t in status.topics if not t.internal]
                                    current = state["filter"]
                                    if names:
                                        i = names.index(current) + 1 if current in names else 0
                                        state["filter"] = names[i] if i < len(names) else None
                            wake.set()

                wake = trio.Event()
                nursery.start_soon(keys)
            else:
                wake = trio.Event()
            with Live(console=console, screen=True, auto_refresh=False) as live:
                while True:
                    try:
                        status = await client.cluster_status()
                        if last_answered is not None and status.answered_by != last_answered:
                            notice = (
                                f"node {last_answered} stopped answering; "
                                f"now reading from node {status.answered_by}"
                            )
                        last_answered = status.answered_by
                        rates.update(status, time.monotonic())
                    except DlogError as exc:
                        notice = f"cluster unreachable: {exc.message}; retrying"
                    if status is not None:
                        live.update(
                            render(
                                status,
                                rates,
                                topic_filter=state["filter"],  # type: ignore[arg-type]
                                notice=notice,
                            ),
                            refresh=True,
                        )
                    with trio.move_on_after(interval):
                        await wake.wait()
                    wake = trio.Event()


async def _once(addresses: list[str], topic: str | None) -> None:
    async with open_client(addresses) as client:
        status = await client.cluster_status()
    rates = Rates()
    rates.update(status, time.monotonic())
    Console(width=max(120, Console().width)).print(
        render(status, rates, topic_filter=topic, include_internal=topic is not None)
    )


def top(
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
    topic: str | None = typer.Option(None, "--topic", help="Only this topic."),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between refreshes."),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Live view of brokers, partitions, leaders, ISR, LEO, HW and lag."""
    addresses = resolve_bootstrap(bootstrap, data_dir)
    if once:
        run(_once, addresses, topic)
    else:
        run(_live, addresses, interval, topic)
