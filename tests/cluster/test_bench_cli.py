"""``dlogctl bench`` against a real local 3-node cluster (small runs, ``--json`` parsed),
and the progress bars of long-running commands: on a terminal's stderr only, never in
what goes to stdout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from dlogctl.local import ClusterSpec, node_pid

from tests.cluster.local_cli import (
    DLOGCTL,
    Cmd,
    bootstrap,
    cli_env,
    dlogctl,
    dlogctl_many,
    local_cluster,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSpec]:
    with local_cluster(tmp_path_factory.mktemp("bench") / "cluster") as spec:
        yield spec


@pytest.fixture
def healthy(cluster: ClusterSpec) -> Iterator[ClusterSpec]:
    """The cluster, checked to have every node still running after the test: creating,
    filling and deleting throwaway topics once made nodes exit (see
    tests/unit/storage/test_storage_delete_during_flush.py)."""
    yield cluster
    exited = [n.id for n in cluster.nodes if node_pid(n) is None]
    assert not exited, f"node(s) {exited} exited; see {[str(n.log_file) for n in cluster.nodes]}"


def topic_names(spec: ClusterSpec) -> set[str]:
    return {t["name"] for t in dlogctl("topic", "list", "--json", *bootstrap(spec)).json()}


def one_json_object(stdout: str) -> dict[str, object]:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


def test_bench_produce_verifies_and_removes_its_topic(healthy: ClusterSpec) -> None:
    run = dlogctl("bench", "produce", "--records", "6000", "--value-bytes", "64",
                  "--partitions", "2", "--json", *bootstrap(healthy)).ok()  # fmt: skip
    result = one_json_object(run.stdout)
    assert result["workload"] == "produce"
    assert result["records"] == result["verified_records"] == 6000
    assert result["verified"] is True and result["checksum_ok"] is True
    assert result["value_bytes"] == 64 and result["acks"] == "all"
    assert result["partitions"] == 2 and result["replication_factor"] == 3
    assert isinstance(result["records_s"], int) and result["records_s"] > 0
    assert result["mb_s"] == pytest.approx(result["records_s"] * 64 / 1e6, rel=0.01, abs=0.01)
    p50, p99, top = result["latency_p50_ms"], result["latency_p99_ms"], result["latency_max_ms"]
    assert isinstance(p50, float) and isinstance(p99, float) and isinstance(top, float)
    assert 0 < p50 <= p99 <= top
    assert result["throwaway_topic"] is True
    assert result["topic"] not in topic_names(healthy)


def test_bench_on_an_existing_topic_checks_only_its_own_records(healthy: ClusterSpec) -> None:
    b = bootstrap(healthy)
    dlogctl("topic", "create", "shared", "--partitions", "2", *b).ok()
    dlogctl("produce", "shared", *b, input="".join(f"other-{i}\n" for i in range(50))).ok()
    consumed, produced = dlogctl_many(
        [
            Cmd(["bench", "consume", "--topic", "shared", "--records", "3000", "--json", *b]),
            Cmd(
                [
                    "bench",
                    "produce",
                    "--topic",
                    "shared",
                    "--records",
                    "2000",
                    "--acks",
                    "leader",
                    "--json",
                    *b,
                ]
            ),  # fmt: skip
        ]
    )
    for run, records in ((consumed, 3000), (produced, 2000)):
        result = one_json_object(run.ok().stdout)
        assert result["topic"] == "shared" and result["throwaway_topic"] is False
        assert result["verified_records"] == records and result["verified"] is True
    assert one_json_object(consumed.stdout)["records_s"] > 0
    assert one_json_object(produced.stdout)["acks"] == "leader"
    # The topic stays, with everyone's records.
    assert "shared" in topic_names(healthy)
    desc = dlogctl("topic", "describe", "shared", "--json", *b).json()
    assert sum(p["high_watermark"] for p in desc["partitions"]) == 50 + 3000 + 2000


def test_bench_e2e_measures_produce_to_consume_latency(healthy: ClusterSpec) -> None:
    run = dlogctl("bench", "e2e", "--rate", "400", "--seconds", "1", "--json",
                  *bootstrap(healthy)).ok()  # fmt: skip
    result = one_json_object(run.stdout)
    assert result["workload"] == "e2e" and result["partitions"] == 1
    assert result["records"] == result["received"] == 400 and result["verified"] is True
    for kind in ("latency", "ack"):
        p50, p99, top = (result[f"{kind}_{p}_ms"] for p in ("p50", "p99", "max"))
        assert isinstance(p50, float) and isinstance(p99, float) and isinstance(top, float)
        assert 0 < p50 <= p99 <= top
    assert isinstance(result["achieved_rate"], float) and result["achieved_rate"] > 0


def test_bench_prints_a_table_without_json(healthy: ClusterSpec) -> None:
    run = dlogctl("bench", "consume", "--records", "2000", *bootstrap(healthy)).ok()
    for row in ("dlog bench consume", "records/s", "MB/s", "fill (acks=all)", "verified"):
        assert row in run.stdout, run.stdout
    assert "2,000 records, checksum ok" in run.stdout
    assert run.stderr == ""  # no progress bar when stderr is not a terminal


def test_bench_mistakes_are_one_line(healthy: ClusterSpec) -> None:
    b = bootstrap(healthy)
    cases = [
        (Cmd(["bench", "produce", "--acks", "most", *b]), "acks must be"),
        (Cmd(["bench", "consume", "--topic", "nosuch", *b]), "topic 'nosuch' does not exist"),
        (Cmd(["bench", "produce", "--replication-factor", "4", *b]), "replication factor"),
        (Cmd(["bench", "e2e", "--bootstrap", "127.0.0.1:1"]), "cannot reach the cluster"),
    ]
    for (_, expected), run in zip(cases, dlogctl_many([c for c, _ in cases]), strict=True):
        assert run.returncode == 1, run.describe()
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), run.describe()
        assert expected in lines[0], run.describe()
    small = dlogctl("bench", "produce", "--value-bytes", "10", *b)
    assert small.returncode == 2 and "--value-bytes" in small.stderr


def spawn_shell(command: str, tmp_path: Path) -> pexpect.spawn:
    env = {k: v for k, v in cli_env().items() if k != "COLUMNS"}
    env["TERM"] = "xterm-256color"
    return pexpect.spawn(
        "/bin/sh",
        ["-c", command],
        cwd=str(tmp_path),
        env=env,
        dimensions=(30, 120),
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
    )


def test_progress_goes_to_the_terminal_and_never_into_stdout(
    healthy: ClusterSpec, tmp_path: Path
) -> None:
    b = " ".join(bootstrap(healthy))
    dlogctl("topic", "create", "big", "--partitions", "3", *bootstrap(healthy)).ok()
    command = (
        f"{DLOGCTL} bench produce --topic big --records 50000 --json {b} > bench.json && "
        f"{DLOGCTL} consume big --from-beginning --max-records 50000 {b} > records.txt && "
        "echo ALL-DONE"
    )
    child = spawn_shell(command, tmp_path)
    try:
        child.expect_exact("producing")  # bench's bar, on the terminal
        child.expect_exact("consuming")  # consume's bar, stdout being a file
        child.expect_exact("ALL-DONE")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    result = one_json_object((tmp_path / "bench.json").read_text())
    assert result["verified"] is True
    lines = (tmp_path / "records.txt").read_text().splitlines()
    assert len(lines) == 50000 and len(set(lines)) == 50000
