"""What every dlogctl command shares: bootstrap resolution, error reporting, output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import trio
import typer
from rich.console import Console

from dlog.client import Client, connect
from dlog.errors import DlogError, NetworkError, RequestTimedOutError
from dlog.net.client import ClientConfig, open_rpc_pool
from dlog.net.messages import ApiVersionsRequest

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DEFAULT_DATA_DIR = Path(".dlog")
CLUSTER_FILE = "cluster.json"

BootstrapOption = typer.Option(
    None,
    "--bootstrap",
    "-b",
    help="HOST:PORT of any broker (comma-separated for several). "
    "Default: $DLOG_BOOTSTRAP, else the local cluster of `dlogctl cluster up`.",
    show_default=False,
)
DataDirOption = typer.Option(
    DEFAULT_DATA_DIR, "--data-dir", help="Directory of the local cluster (`cluster up`)."
)

T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear line to stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def resolve_bootstrap(bootstrap: str | None, data_dir: Path = DEFAULT_DATA_DIR) -> list[str]:
    """--bootstrap, else $DLOG_BOOTSTRAP, else every node of the local cluster."""
    text = bootstrap or os.environ.get("DLOG_BOOTSTRAP")
    if text:
        addresses = [a.strip() for a in text.split(",") if a.strip()]
        if addresses:
            return addresses
    cluster_file = data_dir / CLUSTER_FILE
    if cluster_file.exists():
        try:
            spec = json.loads(cluster_file.read_text())
            addresses = [node["rpc"] for node in spec["nodes"]]
        except (ValueError, KeyError, TypeError):
            fail(f"{cluster_file} is not a dlog cluster file")
        if addresses:
            return addresses
    fail(
        "no cluster to talk to: pass --bootstrap HOST:PORT, set DLOG_BOOTSTRAP, "
        "or start a local cluster with `dlogctl cluster up`"
    )


@asynccontextmanager
async def open_client(addresses: list[str], **options: Any) -> AsyncIterator[Client]:
    """A client with CLI-friendly timeouts, after checking some broker answers at all:
    an unreachable cluster is one clear error within seconds, not a minute of retries."""
    async with open_rpc_pool(ClientConfig(connect_timeout_s=3, request_timeout_s=5)) as pool:
        errors = []
        for address in addresses:
            try:
                await pool.call(address, ApiVersionsRequest(), timeout=5)
                break
            except (NetworkError, RequestTimedOutError) as exc:
                errors.append(exc.message)
        else:
            raise NetworkError(f"no broker answers at {', '.join(addresses)} ({errors[0]})")
    options.setdefault("default_api_timeout_ms", 20_000)
    options.setdefault("connect_timeout_ms", 3_000)
    async with connect(addresses, **options) as client:
        yield client


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an async command; dlog errors become one line on stderr and exit code 1."""
    try:
        return trio.run(fn, *args)
    except DlogError as exc:
        report(exc)
    except ExceptionGroup as group:
        # A failure inside a nursery: report the first dlog error in it plainly.
        found = group.subgroup(DlogError)
        if found is None:
            raise
        first: BaseException = found.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        assert isinstance(first, DlogError)
        report(first)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def report(exc: DlogError) -> NoReturn:
    if isinstance(exc, NetworkError):
        fail(f"cannot reach the cluster: {exc.message}")
    if isinstance(exc, RequestTimedOutError):
        fail(f"the cluster did not answer in time: {exc.message}")
    fail(f"{exc.message} ({exc.code.name})")


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=False) + "\n")
    sys.stdout.flush()
