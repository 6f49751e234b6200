"""Checkpoint files: small text files replaced atomically.

The format is Kafka's checkpoint format: a version line, a count line, then one
entry per line, fields separated by a space::

    0
    2
    0 0
    3 1500

A write goes to ``<name>.tmp``, is fsynced, renamed over ``<name>``, and the
directory is fsynced, so a crash leaves either the old file or the new one. A file
that does not parse raises :class:`CorruptCheckpointError`; callers fall back to
safe defaults (recovering more) rather than refuse to start.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from dlog.errors import StorageError

CHECKPOINT_VERSION: Final = 0
TMP_SUFFIX: Final = ".tmp"


class CorruptCheckpointError(StorageError):
    """A checkpoint file exists but does not parse."""


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: Path, entries: Sequence[Sequence[object]]) -> None:
    """Replace ``path`` atomically with the given entries (blocking: fsyncs twice)."""
    lines = [str(CHECKPOINT_VERSION), str(len(entries))]
    lines += [" ".join(str(field) for field in entry) for entry in entries]
    data = ("\n".join(lines) + "\n").encode()
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def read_checkpoint(path: Path, fields: int) -> list[list[str]] | None:
    """The entries of a checkpoint file (each ``fields`` strings), or None if absent."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: unreadable ({exc})") from exc
    lines = text.splitlines()
    if len(lines) < 2 or lines[0].strip() != str(CHECKPOINT_VERSION):
        raise CorruptCheckpointError(f"{path}: missing or unknown version line")
    try:
        count = int(lines[1])
    except ValueError:
        raise CorruptCheckpointError(f"{path}: bad count line {lines[1]!r}") from None
    body = lines[2:]
    if count < 0 or len(body) != count:
        raise CorruptCheckpointError(f"{path}: says {count} entries, has {len(body)}")
    entries = [line.split() for line in body]
    for entry in entries:
        if len(entry) != fields:
            raise CorruptCheckpointError(f"{path}: entry {' '.join(entry)!r} is malformed")
    return entries


def parse_offset(path: Path, value: str) -> int:
    try:
        offset = int(value)
    except ValueError:
        raise CorruptCheckpointError(f"{path}: {value!r} is not an offset") from None
    if offset < 0:
        raise CorruptCheckpointError(f"{path}: negative offset {offset}")
    return offset
