"""``dlogctl produce`` and ``dlogctl consume``: records between stdin/stdout and a topic."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from dlogctl.common import (
    BootstrapOption,
    DataDirOption,
    err_console,
    fail,
    resolve_bootstrap,
    run,
)


def produce(
    topic: str = typer.Argument(..., help="Topic to write to."),
    acks: str = typer.Option("all", "--acks", help="none | leader | all (or 0, 1, -1)."),
    partition: int | None = typer.Option(
        None, "--partition", "-p", min=0, help="Write every record to this partition."
    ),
    key_separator: str | None = typer.Option(
        None, "--key-separator", help="Split each line into KEY<SEP>VALUE at the first SEP."
    ),
    linger_ms: int = typer.Option(
        5, "--linger-ms", min=0, help="Batch records for up to this long."
    ),
    timeout_ms: int = typer.Option(
        30_000,
        "--timeout-ms",
        min=1,
        help="Give up on a record not acknowledged this long after the producer took it"
        " (retries included).",
    ),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Write one record per line of stdin; exit non-zero if any record failed."""
    from dlog.net.protocol import acks_from_text
    from dlogctl import pipes

    try:
        acks_value = acks_from_text(acks)
    except ValueError as exc:
        fail(str(exc))
    if key_separator == "":
        fail("--key-separator must not be empty")
    addresses = resolve_bootstrap(bootstrap, data_dir)
    sent, failed = run(
        pipes.produce_lines,
        addresses,
        topic,
        acks_value,
        partition,
        key_separator,
        linger_ms,
        timeout_ms,
    )
    err_console.print(
        f"produced {sent - failed} record(s) to {topic}"
        + (f", [red]{failed} failed[/]" if failed else "")
    )
    if failed:
        raise typer.Exit(1)


def consume(
    topic: str = typer.Argument(..., help="Topic to read."),
    from_beginning: bool = typer.Option(
        False, "--from-beginning", help="Start at the earliest offset (if the group has none)."
    ),
    group: str | None = typer.Option(
        None, "--group", "-g", help="Resume from and commit to this group's offsets."
    ),
    partition: int | None = typer.Option(
        None, "--partition", "-p", min=0, help="Only this partition."
    ),
    offset: int | None = typer.Option(
        None, "--offset", "-o", help="Start at this offset (needs --partition)."
    ),
    max_records: int | None = typer.Option(
        None, "--max-records", "-n", min=1, help="Stop after this many records."
    ),
    timeout_ms: int | None = typer.Option(
        None, "--timeout-ms", min=0, help="Stop when no record arrives for this long."
    ),
    as_json: bool = typer.Option(
        False, "--json", help='One JSON object per line: {"partition", "offset", ...}.'
    ),
    json_binary: bool = typer.Option(
        False, "--json-binary", help="Like --json with key and value in base64."
    ),
    bootstrap: str | None = BootstrapOption,
    data_dir: Path = DataDirOption,
) -> None:
    """Print records to stdout (the value per line, or JSON with --json)."""
    from dlogctl import pipes

    if offset is not None and partition is None:
        fail("--offset needs --partition")
    if offset is not None and offset < 0:
        fail("--offset must be >= 0")
    addresses = resolve_bootstrap(bootstrap, data_dir)
    mode = "binary" if json_binary else ("json" if as_json else "text")
    try:
        count = run(
            pipes.print_records,
            addresses,
            topic,
            from_beginning,
            group,
            partition,
            offset,
            max_records,
            timeout_ms,
            mode,
        )
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error.
        sys.stderr.close()
        raise typer.Exit(0) from None
    err_console.print(f"consumed {count} record(s) from {topic}")
