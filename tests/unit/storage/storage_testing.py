"""Helpers shared by the storage tests (the fixtures are in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import trio

from dlog.storage.log import PartitionLog

START_MS = 1_700_000_000_000

MakeBatch = Callable[..., bytearray]
OpenLog = Callable[..., PartitionLog]


class ThreadGate:
    """Holds every ``trio.to_thread.run_sync`` call until :meth:`open` (see the
    ``thread_gate`` fixture)."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.opened = trio.Event()

    def open(self) -> None:
        self.opened.set()
