"""``dlogctl node``: run one node in the foreground; remove a node for good."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dlogctl.common import (
    BootstrapOption,
    DataDirOption,
    console,
    fail,
    resolve_bootstrap,
    run,
)

if TYPE_CHECKING:
    from dlog.broker.config import BrokerConfig

app = typer.Typer(help="Run or remove a single node.", no_args_is_help=True)


class _NodeFilter(logging.Filter):
    def __init__(self, node_id: int) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        name = record.name
        record.component = name.rsplit(".", 1)[-1] if name.startswith("dlog.") else name
        return True


def setup_logging(node_id: int, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeFilter(node_id))
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d node=%(node)s %(component)s %(levelname)s %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@app.command("run")
def node_run(
    node_id: int | None = typer.Option(None, "--node-id", help="This node's id (>= 0)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="This node's data directory."),
    rpc: str | None = typer.Option(None, "--rpc", help="Bind address for clients and brokers."),
    gossip: str | None = typer.Option(None, "--gossip", help="Bind address for gossip (UDP+TCP)."),
    raft: str | None = typer.Option(None, "--raft", help="Bind address for the metadata Raft."),
    advertise_rpc: str | None = typer.Option(None, "--advertise-rpc"),
    advertise_gossip: str | None = typer.Option(None, "--advertise-gossip"),
    advertise_raft: str | None = typer.Option(None, "--advertise-raft"),
    join: list[str] = typer.Option([], "--join", help="Gossip address of a node to join (repeat)."),
    bootstrap_cluster: bool = typer.Option(
        False, "--bootstrap-cluster", help="Start a new cluster here (no-op if formatted)."
    ),
    config_file: Path | None = typer.Option(None, "--config-file", help="TOML config file."),
    log_level: str | None = typer.Option(None, "--log-level", help="debug|info|warning|error"),
) -> None:
    """Run one node in the foreground until SIGTERM/SIGINT (then a controlled shutdown)."""
    flags = {
        "node_id": node_id,
        "data_dir": data_dir,
        "rpc": rpc,
        "gossip": gossip,
        "raft": raft,
        "advertise_rpc": advertise_rpc,
        "advertise_gossip": advertise_gossip,
        "advertise_raft": advertise_raft,
        "join": tuple(join) if join else None,
        "bootstrap_cluster": True if bootstrap_cluster else None,
        "log_level": log_level,
    }
    from dlog.broker.config import BrokerConfig
    from dlog.errors import DlogError

    try:
        config = BrokerConfig.load(flags, config_file=config_file)
    except DlogError as exc:
        fail(exc.message)
    from dlog.broker.identity import removed_reason

    reason = removed_reason(Path(config.data_dir))
    if reason is not None:
        fail(f"{reason} ({config.data_dir})")
    setup_logging(config.node_id, config.log_level)
    progress = _Progress()
    try:
        removed = run(_serve, config, progress)
    except (OSError, ExceptionGroup) as exc:
        # Starting: a port taken, an address not on this machine, a directory that
        # cannot be made -- one line says it. Once running, an OSError is news (a disk
        # failing, or a bug): its traceback goes to the log first.
        os_error = _only_os_errors(exc)
        if os_error is None:
            raise
        if progress.serving:
            logging.getLogger("dlog.broker.node").error("node stopped", exc_info=exc)
        else:
            logging.getLogger("dlog.broker.node").debug("could not start", exc_info=exc)
        fail(f"node {config.node_id} stopped: {_describe(os_error)}")
    if removed:
        fail(
            f"node {config.node_id} was removed from the cluster (dlogctl node remove);"
            f" wipe {config.data_dir} to bring this machine back as a new node"
        )


class _Progress:
    """How far _serve got: a failure while starting is told differently."""

    serving = False


def _only_os_errors(exc: BaseException) -> OSError | None:
    """The first OSError in ``exc`` if that is all it holds (else None: something
    else failed too, and the whole traceback is the report)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_only_os_errors(inner) for inner in exc.exceptions]
        if found and all(f is not None for f in found):
            return found[0]
    return None


def _describe(exc: OSError) -> str:
    text = str(exc)
    if exc.filename is not None and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text


async def _serve(config: BrokerConfig, progress: _Progress) -> bool:
    """Run the node until a signal's controlled shutdown, or until it finds itself
    removed from the cluster (returns True then)."""
    import trio

    from dlog.broker.node import Broker  # the whole node: imported only to run one

    broker = Broker(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(broker.run)
            progress.serving = True

            async def stop_on_signal() -> None:
                async for signum in signals:
                    logging.getLogger("dlog.broker.node").info(
                        "received %s", signal.Signals(signum).name
                    )
                    await broker.shutdown()
                    return

            nursery.start_soon(stop_on_signal)
            await broker.stopped.wait()
            nursery.cancel_scope.cancel()
    return broker.removed


@app.command("remove")
def node_remove(
    node_id: int = typer.Argument(..., help="Id of the node to remove."),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Remove a node from the Raft voters and the cluster for good."""
    from dlogctl.connection import open_client

    addresses = resolve_bootstrap(bootstrap, data_dir)

    async def remove() -> None:
        async with open_client(addresses) as client:
            await client.remove_node(node_id)

    run(remove)
    console.print(f"node {node_id} removed")


@app.command("ping")
def node_ping(
    address: str = typer.Option(..., "--address", "-a", help="The node's rpc HOST:PORT."),
    timeout: float = typer.Option(
        3.0, "--timeout", min=0.001, help="Seconds to wait for an answer."
    ),
) -> None:
    """Check that a node answers on its rpc address (exit 0) or not (exit 1)."""
    from dlog.net.client import ClientConfig, open_rpc_pool
    from dlog.net.messages import ApiVersionsRequest

    async def ping() -> None:
        async with open_rpc_pool(ClientConfig(connect_timeout_s=timeout)) as pool:
            await pool.call(address, ApiVersionsRequest(), timeout=timeout)

    run(ping)
    console.print(f"{address} is up")
