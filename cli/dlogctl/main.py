"""The ``dlogctl`` command: a typer app; each command builds a config and calls trio.run."""

from __future__ import annotations

import typer

import dlog
from dlogctl import cluster, data, demo, node, top, topic

app = typer.Typer(
    name="dlogctl",
    help="Run and operate dlog, a Kafka-style replicated log.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(node.app, name="node")
app.add_typer(cluster.app, name="cluster")
app.add_typer(topic.app, name="topic")
app.command("produce")(data.produce)
app.command("consume")(data.consume)
app.command("top")(top.top)
app.command("demo")(demo.demo)


@app.command()
def version() -> None:
    """Print the dlog version."""
    typer.echo(dlog.__version__)


def main() -> None:
    app()
