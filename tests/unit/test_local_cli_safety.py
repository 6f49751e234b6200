"""The local cluster tooling must not mistake someone else's process or ports for its
own, and broken local files are one clear error, not a traceback."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dlogctl import local
from dlogctl.local import ClusterSpec, free_base_port, node_pid, ports_in_use
from dlogctl.main import app
from typer.testing import CliRunner


@contextmanager
def process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_pid_file_counts_only_while_its_process_is_that_node(tmp_path: Path) -> None:
    spec = ClusterSpec.create(tmp_path / "c", 1, 20000, "127.0.0.1")
    node = spec.nodes[0]
    node.path.mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    # A reused pid: another program entirely.
    with process(*sleeper) as other:
        node.pid_file.write_text(f"{other.pid}\n")
        assert node_pid(node) is None
    # A process that runs `dlogctl ... run` for this data directory.
    with process(*sleeper, "dlogctl", "node", "run", "--data-dir", node.data_dir) as mine:
        node.pid_file.write_text(f"{mine.pid}\n")
        assert node_pid(node) == mine.pid
    # ... but not another node's directory.
    with process(*sleeper, "dlogctl", "node", "run", "--data-dir", node.data_dir + "x") as its:
        node.pid_file.write_text(f"{its.pid}\n")
        assert node_pid(node) is None


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_node_counts_as_running_right_after_it_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Popen returns before the child's exec has set up its command line, which then
    # reads empty for a while (51 us to 11 ms here, longest on a busy machine): a node
    # just started was taken for one that had died, and the chaos soak failed with
    # "node 1 exited without being killed". The empty reads are made to last here.
    spec = ClusterSpec.create(tmp_path / "c", 1, 20000, "127.0.0.1")
    node = spec.nodes[0]
    node.path.mkdir(parents=True)
    args = [sys.executable, "-c", "import time; time.sleep(60)"]
    args += ["dlogctl", "node", "run", "--data-dir", node.data_dir]
    empty_reads = 0

    def still_in_exec(path: str, *rest: Any) -> Any:
        nonlocal empty_reads
        if path.endswith("/cmdline") and empty_reads < 5:
            empty_reads += 1
            return io.BytesIO(b"")
        return open(path, *rest)

    with process(*args) as proc:
        node.pid_file.write_text(f"{proc.pid}\n")
        monkeypatch.setattr(local, "open", still_in_exec, raising=False)
        assert node_pid(node) == proc.pid
        assert empty_reads == 5
        # An empty command line whose executable cannot be read (a kernel thread, or
        # another user's process, as a stale pid file may name) is not our node.
        empty_reads = 0

        def unreadable(path: str) -> str:
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(os, "readlink", unreadable)
        assert node_pid(node) is None


def test_ports_another_process_holds_are_named(tmp_path: Path) -> None:
    base = free_base_port()
    spec = ClusterSpec.create(tmp_path / "c", 1, base, "127.0.0.1")
    assert ports_in_use(spec.nodes[0]) == []
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", base))
        tcp.listen()
        udp.bind(("127.0.0.1", base + 100))
        assert ports_in_use(spec.nodes[0]) == [
            f"rpc port {base}",
            f"gossip port {base + 100}",
        ]
        result = CliRunner().invoke(
            app, ["cluster", "up", "--data-dir", str(tmp_path / "c"), "--base-port", str(base)]
        )
    assert result.exit_code == 1, result.output
    assert f"rpc port {base}, gossip port {base + 100} in use by another process" in result.output
    assert not spec.nodes[0].pid_file.exists()  # nothing was started


def test_broken_local_cluster_files_are_one_clear_error(tmp_path: Path) -> None:
    runner = CliRunner()
    broken = tmp_path / "broken"
    broken.mkdir()
    for content in ("{", "{}", '{"data_dir": 1, "nodes": 3}', "[]"):
        (broken / "cluster.json").write_text(content)
        for command in ("status", "up", "down"):
            result = runner.invoke(app, ["cluster", command, "--data-dir", str(broken)])
            assert result.exit_code == 1, (content, command, result.output)
            assert "is not a dlog cluster file" in result.output, result.output
            assert result.exception is None or isinstance(result.exception, SystemExit)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = runner.invoke(app, ["cluster", "up", "--data-dir", str(a_file)])
    assert result.exit_code == 1, result.output
    assert "cannot keep a cluster in" in result.output


def test_node_run_on_a_taken_port_says_which_in_one_line(tmp_path: Path) -> None:
    base = free_base_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base))
        taken.listen()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dlogctl",
                "node",
                "run",
                "--node-id",
                "1",
                "--data-dir",
                str(tmp_path / "n1"),
                "--rpc",
                f"127.0.0.1:{base}",
                "--gossip",
                f"127.0.0.1:{base + 100}",
                "--raft",
                f"127.0.0.1:{base + 200}",
                "--bootstrap-cluster",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: node 1 stopped:"), result.stderr
    assert f"cannot listen on 127.0.0.1:{base}" in last
