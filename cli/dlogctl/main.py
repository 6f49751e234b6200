"""The ``dlogctl`` command: a typer app; each command builds a config and calls trio.run."""

from __future__ import annotations

import typer

import dlog

app = typer.Typer(
    name="dlogctl",
    help="Run and operate dlog, a Kafka-style replicated log.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Run and operate dlog, a Kafka-style replicated log."""


@app.command()
def version() -> None:
    """Print the dlog version."""
    typer.echo(dlog.__version__)


def main() -> None:
    app()
