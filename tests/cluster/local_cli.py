"""Run ``dlogctl`` as a user would (a subprocess) against a local multi-process cluster.

``local_cluster`` starts real node processes with :func:`dlogctl.local.start_cluster`
on a free base port and kills exactly those processes on exit, however the block ends.
``dlogctl`` runs one command; ``dlogctl_many`` runs independent commands a few at a
time (each invocation spends most of a second importing, so the error-case tests run
them side by side). Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dlogctl.local import ClusterSpec, start_cluster, stop_cluster

T = TypeVar("T")

#: How many dlogctl processes ``dlogctl_many`` runs at once on this 2-core machine.
PARALLEL = 4


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> Result:
        assert self.returncode == 0, self.describe()
        return self

    def json(self) -> Any:
        return json.loads(self.ok().stdout)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.ok().stdout.splitlines() if line.strip()]

    def describe(self) -> str:
        return (
            f"dlogctl {' '.join(self.args)} exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


@dataclass(frozen=True)
class Cmd:
    args: Sequence[str]
    input: str | bytes | None = None
    timeout: float = 60.0
    cwd: Path | None = None


def cli_env() -> dict[str, str]:
    """The environment of a user with no DLOG_BOOTSTRAP and a wide, colourless output."""
    env = {k: v for k, v in os.environ.items() if k != "DLOG_BOOTSTRAP"}
    env.update({"NO_COLOR": "1", "COLUMNS": "160", "TERM": "dumb"})
    return env


#: The installed console script, as users run it.
DLOGCTL = str(Path(sys.executable).with_name("dlogctl"))


def _popen(cmd: Cmd) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [DLOGCTL, *cmd.args],
        stdin=subprocess.PIPE if cmd.input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=cmd.cwd,
    )


def _finish(proc: subprocess.Popen[bytes], cmd: Cmd, deadline: float) -> Result:
    data = cmd.input.encode() if isinstance(cmd.input, str) else cmd.input
    try:
        out, err = proc.communicate(data, timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"dlogctl {' '.join(cmd.args)} did not finish within {cmd.timeout:g}s\n"
            f"--- stdout\n{out.decode(errors='replace')}--- stderr\n"
            f"{err.decode(errors='replace')}"
        ) from None
    return Result(
        tuple(cmd.args),
        proc.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


def dlogctl(
    *args: str, input: str | bytes | None = None, timeout: float = 60.0, cwd: Path | None = None
) -> Result:
    """Run ``dlogctl ARGS`` to completion (killed and failed after ``timeout`` s)."""
    cmd = Cmd(args, input, timeout, cwd)
    return _finish(_popen(cmd), cmd, time.monotonic() + timeout)


def dlogctl_many(cmds: Sequence[Cmd]) -> list[Result]:
    """Run independent commands, ``PARALLEL`` at a time; results in ``cmds`` order."""
    results: list[Result | None] = [None] * len(cmds)
    running: list[tuple[int, subprocess.Popen[bytes], float]] = []
    pending = list(enumerate(cmds))
    try:
        while pending or running:
            while pending and len(running) < PARALLEL:
                i, cmd = pending.pop(0)
                running.append((i, _popen(cmd), time.monotonic() + cmd.timeout))
            i, proc, deadline = running.pop(0)
            results[i] = _finish(proc, cmds[i], deadline)
    finally:
        for _, proc, _ in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [r for r in results if r is not None]


def wait_until(
    probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2
) -> T:
    """Call ``probe`` until it returns something other than None (or fail at the
    deadline, with ``what`` and the last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def local_cluster(data_dir: Path, nodes: int = 3) -> Iterator[ClusterSpec]:
    """A fresh cluster of ``nodes`` processes on a free base port; every process this
    started (or that a test restarted through the same data directory) is killed on
    exit."""
    spec = None
    try:
        spec = start_cluster(data_dir, nodes)
        yield spec
    finally:
        if spec is None:
            loaded = ClusterSpec.load(data_dir)
            if loaded is not None:
                stop_cluster(loaded)
        else:
            stop_cluster(spec)


def bootstrap(spec: ClusterSpec) -> list[str]:
    """``--bootstrap`` with every node, as a script outside the test suite would pass."""
    return ["--bootstrap", ",".join(n.rpc for n in spec.nodes)]
