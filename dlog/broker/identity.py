"""A node's data directory: its identity file, its lock, the ports it bound, and the
mark of a node removed from the cluster for good.

``meta.json`` holds ``cluster_id``, ``node_id`` and a random ``directory_id``, written
once when the directory is formatted. A directory formatted for another node id or
another cluster is refused, never reused. The lock is an exclusive ``flock`` held for
the process's lifetime, so two nodes can never share a directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from dlog.errors import InconsistentClusterIdError, InvalidConfigError, StorageError

META_FILE = "meta.json"
PORTS_FILE = "ports.json"
LOCK_FILE = ".lock"
#: Written when the controller refuses the node because it was removed for good: the
#: directory can never rejoin, and tools can tell so without starting the node.
REMOVED_FILE = "removed"


def mark_removed(data_dir: Path, reason: str) -> None:
    (data_dir / REMOVED_FILE).write_text(reason + "\n")


def removed_reason(data_dir: Path) -> str | None:
    """Why the node of ``data_dir`` was removed from its cluster, or None if it was not."""
    try:
        return (data_dir / REMOVED_FILE).read_text().strip() or "removed from the cluster"
    except FileNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    cluster_id: str
    node_id: int
    directory_id: str


def new_cluster_id() -> str:
    return uuid.uuid4().hex[:22]


def load_identity(data_dir: Path, node_id: int) -> NodeIdentity | None:
    path = data_dir / META_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StorageError(f"{path} is unreadable: {exc}") from None
    try:
        identity = NodeIdentity(
            str(raw["cluster_id"]), int(raw["node_id"]), str(raw["directory_id"])
        )
    except (KeyError, TypeError, ValueError):
        raise StorageError(f"{path} is not a dlog identity file") from None
    if identity.node_id != node_id:
        raise InvalidConfigError(
            f"{data_dir} belongs to node {identity.node_id}, not node {node_id}", key="node_id"
        )
    return identity


def format_directory(data_dir: Path, cluster_id: str, node_id: int) -> NodeIdentity:
    """Write a new identity (fresh directory id) atomically."""
    existing = load_identity(data_dir, node_id)
    if existing is not None:
        if existing.cluster_id != cluster_id:
            raise InconsistentClusterIdError(
                f"{data_dir} belongs to cluster {existing.cluster_id}, not {cluster_id}"
            )
        return existing
    identity = NodeIdentity(cluster_id, node_id, uuid.uuid4().hex)
    write_json_atomically(data_dir / META_FILE, asdict(identity))
    return identity


def write_json_atomically(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryLock:
    """An exclusive flock on ``<data_dir>/.lock``; released by :meth:`release`."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise StorageError(
                f"{data_dir} is in use by another dlog node (lock held on {LOCK_FILE})"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
