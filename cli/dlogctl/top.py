"""``dlogctl top``: a live view of brokers, partitions, ISR, LEO, HW and lag
(:mod:`dlogctl.top_view` draws it); ``--once`` prints one snapshot for scripts.

Keys in the live view: ``q`` quits, ``t`` cycles the topic filter, ``a`` shows all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from dlogctl.common import BootstrapOption, DataDirOption, resolve_bootstrap, run


def top(
    once: bool = typer.Option(
        False, "--once", help="Print one snapshot and exit (also when stdout is no terminal)."
    ),
    topic: str | None = typer.Option(None, "--topic", help="Only this topic."),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between refreshes."),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Live view of brokers, partitions, leaders, ISR, LEO, HW and lag."""
    from dlogctl import top_view

    addresses = resolve_bootstrap(bootstrap, data_dir)
    if once or not sys.stdout.isatty():
        run(top_view.once, addresses, topic)
    else:
        run(top_view.live, addresses, interval, topic)
