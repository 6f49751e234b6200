"""The live ``dlogctl top`` in a pseudo-terminal (pexpect), against a real 3-node cluster:
it renders, re-renders on a resize and on keys, follows the topic filter, survives the
broker it reads from dying, and ``q`` quits at once with the terminal as it was."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from dlogctl.local import ClusterSpec, kill_node

from tests.cluster.local_cli import DLOGCTL, bootstrap, cli_env, dlogctl, local_cluster

pytestmark = pytest.mark.timeout(120)

#: Long enough that only a key press or a resize can explain a new frame.
SLOW = ["--interval", "60"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSpec]:
    with local_cluster(tmp_path_factory.mktemp("top") / "cluster") as spec:
        b = bootstrap(spec)
        dlogctl("topic", "create", "alpha", "--partitions", "2", *b).ok()
        dlogctl("topic", "create", "beta", "--partitions", "1", *b).ok()
        yield spec


def spawn(command: str, rows: int = 40, cols: int = 100) -> pexpect.spawn:
    env = cli_env()
    env.pop("COLUMNS")  # the terminal's size, not a fixed one
    env.update({"TERM": "xterm-256color", "LINES": "", "NO_COLOR": "1"})
    env = {k: v for k, v in env.items() if v}
    return pexpect.spawn(
        "/bin/sh",
        ["-c", command],
        env=env,
        dimensions=(rows, cols),
        encoding="utf-8",
        codec_errors="replace",
        timeout=30,
    )


def border(cols: int) -> str:
    """The top edge of the header panel drawn across a ``cols``-wide terminal."""
    return "╭" + "─" * (cols - 2) + "╮"


def test_top_renders_resizes_filters_and_quits_cleanly(cluster: ClusterSpec) -> None:
    # A shell runs top, then shows how it left the terminal: exit code, line discipline,
    # and whether stdin is still blocking (the key reader makes its fd non-blocking).
    top = " ".join([DLOGCTL, "top", *SLOW, *bootstrap(cluster)])
    after = (
        'echo "EXIT=$?"; stty -a; '
        'python3 -c "import os; print(\\"BLOCKING=%s\\" % os.get_blocking(0))"'
    )
    child = spawn(f"{top}; {after}", rows=40, cols=100)
    try:
        child.expect_exact(border(100))
        child.expect_exact("brokers")
        child.expect_exact("partitions")
        child.expect_exact("filter: all topics")

        # A resize redraws at once at the new width (not at the next 60 s refresh).
        child.setwinsize(45, 150)
        child.expect_exact(border(150))
        child.expect_exact("filter: all topics")
        # Too small to show everything: it crops, and keeps running.
        child.setwinsize(12, 60)
        child.expect_exact(border(60))
        child.setwinsize(40, 120)
        child.expect_exact(border(120))

        # `t` steps through the topics, `a` shows all again; each redraws at once.
        child.send("t")
        child.expect_exact("filter: alpha")
        child.send("t")
        child.expect_exact("filter: beta")
        child.send("a")
        child.expect_exact("filter: all topics")

        child.send("q")
        # The alternate screen is left and the cursor shown before the shell goes on.
        child.expect_exact("\x1b[?1049l")
        child.expect(r"EXIT=(\d+)")
        assert child.match.group(1) == "0"
        child.expect(r"BLOCKING=(\w+)")
        settings = child.before
        assert child.match.group(1) == "True"
        # cbreak mode is undone: canonical input and echo are back on.
        assert re.search(r"(?<![-\w])icanon\b", settings), settings
        assert re.search(r"(?<![-\w])echo\b", settings), settings
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_the_topic_filter_shows_only_that_topic_and_its_produce_rate(
    cluster: ClusterSpec,
) -> None:
    b = bootstrap(cluster)
    child = spawn(" ".join([DLOGCTL, "top", "--interval", "0.5", "--topic", "beta", *b]))
    try:
        child.expect_exact("filter: beta")
        frame = child.before
        assert "beta" in frame and "alpha" not in frame
        # Records arriving show as a produce rate (HW growth between two snapshots).
        dlogctl("produce", "beta", *b, input="".join(f"r{i}\n" for i in range(300))).ok()
        child.expect(r"beta\s*│\s*[1-9][\d.]*k?/s")
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_top_survives_the_broker_it_reads_from_dying(cluster: ClusterSpec) -> None:
    command = " ".join([DLOGCTL, "top", "--interval", "0.5", *bootstrap(cluster)])
    child = spawn(command, rows=50, cols=140)
    try:
        child.expect(r"answered by: node (\d)")
        reader = int(child.match.group(1))
        kill_node(cluster.node(reader))
        child.expect(rf"node {reader} stopped answering; now reading from node (\d)", timeout=60)
        assert int(child.match.group(1)) != reader
        child.expect(rf"answered by: node [^{reader}]")
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_top_without_a_cluster_is_one_line(tmp_path: Path) -> None:
    child = spawn(" ".join([DLOGCTL, "top", "--bootstrap", "127.0.0.1:1"]))
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)  # bold "error:"
    lines = [line for line in plain.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the cluster"), lines
