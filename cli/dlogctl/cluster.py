"""``dlogctl cluster``: a local cluster of background node processes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from dlogctl.common import DataDirOption, console, err_console, fail, print_json
from dlogctl.local import (
    ClusterFileError,
    ClusterSpec,
    NodeSpec,
    describe_now,
    node_pid,
    ports_in_use,
    ready_state,
    start_node,
    stop_node,
)

app = typer.Typer(help="Start, inspect and stop a local cluster.", no_args_is_help=True)


@app.command("up")
def cluster_up(
    nodes: int | None = typer.Option(
        None,
        "--nodes",
        "-n",
        min=1,
        max=50,
        help="Number of nodes [default: 3; an existing cluster grows to it].",
        show_default=False,
    ),
    data_dir: Path = DataDirOption,
    base_port: int | None = typer.Option(
        None,
        "--base-port",
        min=1,
        max=65000,
        help="Node i gets rpc P+i, gossip P+100+i, raft P+200+i [default: 9400; a new"
        " cluster only].",
        show_default=False,
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the nodes bind to."),
    timeout: float = typer.Option(
        60.0, "--timeout", min=1, help="Seconds to wait for a ready cluster."
    ),
    log_level: str = typer.Option("info", "--log-level", help="Node log level."),
) -> None:
    """Start the local cluster (only the nodes that are not running) and wait until ready."""
    existing = load_spec(data_dir.resolve())
    if existing is not None:
        # An existing cluster keeps its ports and nodes: say so rather than ignore it.
        if base_port is not None and base_port != existing.base_port:
            err_console.print(
                f"note: the cluster in {data_dir} uses base port {existing.base_port};"
                f" --base-port {base_port} applies to a new cluster only"
            )
        if nodes is not None and nodes < len(existing.nodes):
            err_console.print(
                f"note: the cluster in {data_dir} has {len(existing.nodes)} nodes; it does"
                " not shrink (remove nodes with `dlogctl node remove N`)"
            )
    if nodes is None:  # a new cluster gets 3; an existing one keeps its size
        nodes = len(existing.nodes) if existing is not None else 3
    bring_up(data_dir, nodes, base_port or 9400, host, timeout, log_level)


def bring_up(
    data_dir: Path,
    nodes: int = 3,
    base_port: int = 9400,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    log_level: str = "info",
) -> ClusterSpec:
    """`cluster up`: start what is not running, wait (with a spinner) until ready."""
    data_dir = data_dir.resolve()
    spec = load_spec(data_dir)
    try:
        if spec is None:
            spec = ClusterSpec.create(data_dir, nodes, base_port, host)
            spec.save()
        elif nodes > len(spec.nodes):
            grown = ClusterSpec.create(data_dir, nodes, spec.base_port, spec.host)
            spec = ClusterSpec(
                spec.data_dir,
                spec.base_port,
                spec.host,
                spec.nodes + grown.nodes[len(spec.nodes) :],
            )
            spec.save()
    except OSError as exc:
        fail(f"cannot keep a cluster in {data_dir}: {exc.strerror or exc}")
    started = []
    live = spec.live_nodes
    if not live:
        fail(f"every node of the cluster in {data_dir} was removed from it")
    to_start = [node for node in live if node_pid(node) is None]
    for node in to_start:
        # Another cluster (or program) on these ports would answer for this one.
        taken = ports_in_use(node)
        if taken:
            fail(
                f"node {node.id}'s {', '.join(taken)} in use by another process (another"
                " cluster?): stop it, or give this cluster other ports (--base-port, with a"
                " new --data-dir)"
            )
    for node in to_start:
        try:
            start_node(spec, node, log_level=log_level)
        except OSError as exc:
            fail(f"cannot start node {node.id} in {node.data_dir}: {exc.strerror or exc}")
        started.append(node.id)
    if started:
        console.print(f"started node(s) {', '.join(map(str, started))}")
    else:
        console.print("every node is already running")
    removed = [n.id for n in spec.nodes if n not in live]
    if removed:
        console.print(
            f"not started: node(s) {', '.join(map(str, removed))}, removed from the cluster"
        )
    ids = {n.id for n in live}
    addresses = [n.rpc for n in live]
    deadline = time.monotonic() + timeout
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("waiting for the cluster", total=None)
        while True:
            reply = describe_now(addresses)
            ok, state = ready_state(reply, ids)
            progress.update(task, description=state)
            if ok:
                break
            for node in live:
                if node.id in started and node_pid(node) is None:
                    fail(f"node {node.id} exited; see {node.log_file}")
            if time.monotonic() > deadline:
                fail(
                    f"cluster not ready after {timeout:g}s ({state}); see the node.log files "
                    f"under {data_dir}"
                )
            time.sleep(0.2)
    assert reply is not None
    for node in live:
        if node.id in started and node_pid(node) is None:
            fail(f"node {node.id} exited; see {node.log_file}")
    console.print(f"cluster ready: {len(ids)} node(s), controller is node {reply.controller}")
    console.print(f"bootstrap: [bold]{live[0].rpc}[/]")
    console.print(f"data and logs: {data_dir}")
    return spec


def load_spec(data_dir: Path) -> ClusterSpec | None:
    """The local cluster in ``data_dir`` (None: there is none); a broken cluster file
    is one clear error."""
    try:
        return ClusterSpec.load(data_dir)
    except ClusterFileError as exc:
        fail(str(exc))


def _status(spec: ClusterSpec) -> dict[str, Any]:
    reply = describe_now([n.rpc for n in spec.nodes if node_pid(n) is not None])
    brokers = {b.node_id: b for b in reply.brokers} if reply else {}
    roles = {m.node_id: m.role for m in reply.raft_members} if reply else {}
    nodes = []
    for n in spec.nodes:
        pid = node_pid(n)
        broker = brokers.get(n.id)
        nodes.append(
            {
                "id": n.id,
                "pid": pid,
                "rpc": n.rpc,
                "gossip": n.gossip,
                "raft": n.raft,
                "alive": pid is not None,
                "removed": n.removed is not None,
                "data_dir": n.data_dir,
                "log_file": str(n.log_file),
                "registered": broker is not None,
                "fenced": broker.fenced if broker is not None else None,
                "raft_role": roles.get(n.id),
                "controller": reply is not None and reply.controller == n.id,
            }
        )
    return {
        "bootstrap": spec.nodes[0].rpc,
        "cluster_id": reply.cluster_id if reply else None,
        "controller": reply.controller if reply else None,
        "metadata_index": reply.metadata_index if reply else None,
        "nodes": nodes,
    }


@app.command("status")
def cluster_status(
    data_dir: Path = DataDirOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the local cluster's nodes, processes and controller."""
    spec = load_spec(data_dir.resolve())
    if spec is None:
        fail(f"no cluster in {data_dir} (start one with `dlogctl cluster up`)")
    status = _status(spec)
    if as_json:
        print_json(status)
        return
    # Local nodes share one host: name it once and show ports, so that the table fits
    # an 80-column terminal.
    hosts = {
        n[key].rpartition(":")[0] for n in status["nodes"] for key in ("rpc", "gossip", "raft")
    }
    shared = hosts.pop() if len(hosts) == 1 else None

    def where(address: str) -> str:
        return address.rpartition(":")[2] if shared is not None else address

    title = f"dlog cluster {status['cluster_id'] or '(unreachable)'}"
    table = Table(title=title + (f" on {shared}" if shared else ""))
    for column in ("node", "pid", "rpc", "gossip", "raft", "process", "broker", "raft role"):
        table.add_column(column, overflow="fold")
    for n in status["nodes"]:
        broker = "-" if not n["registered"] else ("fenced" if n["fenced"] else "active")
        name = f"{n['id']}{' (controller)' if n['controller'] else ''}"
        table.add_row(
            name,
            str(n["pid"] or "-"),
            where(n["rpc"]),
            where(n["gossip"]),
            where(n["raft"]),
            "[green]running[/]"
            if n["alive"]
            else ("removed" if n["removed"] else "[red]stopped[/]"),
            broker,
            n["raft_role"] or "-",
        )
    console.print(table)
    console.print(f"bootstrap: {status['bootstrap']}")


@app.command("down")
def cluster_down(
    data_dir: Path = DataDirOption,
    timeout: float = typer.Option(15.0, "--timeout", help="Seconds per node before SIGKILL."),
) -> None:
    """Stop every node, one at a time, the controller last."""
    spec = load_spec(data_dir.resolve())
    if spec is None:
        fail(f"no cluster in {data_dir}")
    status = _status(spec)
    controller = status["controller"]
    order: list[NodeSpec] = sorted(spec.nodes, key=lambda n: (n.id == controller, n.id))
    stopped = []
    for node in order:
        if node_pid(node) is None:
            continue
        with console.status(f"stopping node {node.id}"):
            stop_node(node, timeout_s=timeout)
        stopped.append(node.id)
        console.print(f"stopped node {node.id}")
    if not stopped:
        console.print("no node was running")
