"""What every dlogctl command shares: bootstrap resolution, error reporting, output.

The command modules import only this, typer, rich and the standard library when they
load, so ``--help`` and usage errors answer without importing trio and the client (most
of a second); a command imports what it runs (:mod:`dlogctl.connection` ...) when it
runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from dlog.errors import DlogError

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
    """Print one clear line to stderr and exit non-zero. ``message`` is plain text:
    brackets in it (``[a-z]``, ``[1, 2]``) are printed, not taken as rich markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def resolve_bootstrap(bootstrap: str | None, data_dir: Path = DEFAULT_DATA_DIR) -> list[str]:
    """--bootstrap, else $DLOG_BOOTSTRAP, else every node of the local cluster."""
    if bootstrap is not None:
        addresses = [a.strip() for a in bootstrap.split(",") if a.strip()]
        if not addresses:
            fail(f"--bootstrap {bootstrap!r} names no address (HOST:PORT, comma-separated)")
        return addresses
    text = os.environ.get("DLOG_BOOTSTRAP")
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


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an async command; dlog errors become one line on stderr and exit code 1."""
    import trio

    from dlog.errors import DlogError

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
    from dlog.errors import NetworkError, RequestTimedOutError

    if isinstance(exc, NetworkError):
        fail(f"cannot reach the cluster: {exc.message}")
    if isinstance(exc, RequestTimedOutError):
        fail(f"the cluster did not answer in time: {exc.message}")
    fail(f"{exc.message} ({exc.code.name})")


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=False) + "\n")
    sys.stdout.flush()
