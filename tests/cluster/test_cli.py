"""dlogctl as a new user meets it: real ``dlogctl`` processes against a real local
3-node cluster (separate node processes on 127.0.0.1, a free base port).

The tests share one cluster (``cluster``) and each touches only its own topics; the two
that kill and stop nodes run last and first bring every node back.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main
from dlogctl.local import ClusterSpec, kill_node, node_pid, pid_alive, start_cluster
from dlogctl.main import app

from dlog.client import partition_for_key
from tests.cluster.local_cli import (
    Cmd,
    Result,
    bootstrap,
    dlogctl,
    dlogctl_many,
    local_cluster,
    wait_until,
)
from tests.cluster.top_output import members, parse_tables

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSpec]:
    with local_cluster(tmp_path_factory.mktemp("cli") / "cluster") as spec:
        yield spec


def command_paths() -> list[list[str]]:
    """Every command and subcommand of the CLI, found by walking its command tree."""
    paths: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def one_error_line(result: Result) -> str:
    """The single line a failed command printed on stderr (and nothing on stdout)."""
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("error: "), result.describe()
    assert result.stdout == "", result.describe()
    return lines[0]


def topics_snapshot(spec: ClusterSpec, topic: str) -> tuple[object, ...]:
    """What a mistake must not change: the topic list and ``topic``'s partitions."""
    listing, desc = dlogctl_many(
        [
            Cmd(["topic", "list", "--json", *bootstrap(spec)]),
            Cmd(["topic", "describe", topic, "--json", *bootstrap(spec)]),
        ]
    )
    return (listing.json(), desc.json())


# --- help and usage ------------------------------------------------------------------


def test_help_works_for_every_command() -> None:
    paths = command_paths()
    # The walk sees the whole tree (a new command is covered without editing this test).
    assert ["topic", "create"] in paths and ["cluster", "up"] in paths and ["top"] in paths
    results = dlogctl_many([Cmd([*path, "--help"]) for path in paths])
    for path, result in zip(paths, results, strict=True):
        assert result.returncode == 0, result.describe()
        assert result.stderr == "", result.describe()
        assert f"Usage: dlogctl {' '.join(path)}".rstrip() in result.stdout, result.describe()
    # Help text is plain text, not rich markup that swallows brackets.
    create = results[paths.index(["topic", "create"])]
    assert "[a-zA-Z0-9._-]" in create.stdout


def test_wrong_arguments_exit_2_with_a_usage_line() -> None:
    cases = [
        ["topic", "create"],  # a missing argument
        ["consume"],
        ["topic", "bogus"],  # an unknown command
        ["produce", "t", "--partitions", "3"],  # an unknown option
        ["consume", "t", "--max-records", "0"],  # out of range
        ["cluster", "up", "--nodes", "three"],  # not a number
        ["topic", "create", "t", "--partitions"],  # an option without its value
        ["node", "ping", "--address", "127.0.0.1:1", "--timeout", "0"],  # out of range
        ["consume", "t", "--partition", "-1"],
        ["cluster", "up", "--timeout", "-1"],
    ]
    for args, result in zip(cases, dlogctl_many([Cmd(args) for args in cases]), strict=True):
        assert result.returncode == 2, result.describe()
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        if args[-1] == "--partitions":
            # click names the option but prints no usage line for this one
            assert "'--partitions' requires an argument" in result.stderr, result.describe()
        else:
            assert f"Usage: dlogctl {args[0]}" in result.stderr, result.describe()


# --- mistakes against a running cluster ------------------------------------------------


def test_bad_values_give_one_clear_line_and_change_nothing(cluster: ClusterSpec) -> None:
    b = bootstrap(cluster)
    dlogctl("topic", "create", "existing", "--partitions", "2", *b).ok()
    dlogctl("produce", "existing", *b, input="one\ntwo\n").ok()
    before = topics_snapshot(cluster, "existing")
    cases: list[tuple[Cmd, str]] = [
        (Cmd(["produce", "existing", "--acks", "most", *b], "x\n"), "acks must be"),
        (Cmd(["produce", "existing", "--partition", "7", *b], "x\n"), "no partition 7"),
        (Cmd(["produce", "nosuch", *b], "x\n"), "topic 'nosuch' does not exist"),
        (Cmd(["topic", "create", "t", "--config", "nokv", *b]), "expected KEY=VALUE"),
        (Cmd(["topic", "create", "t", "--config", "colour=red", *b]), "unknown topic config"),
        (Cmd(["topic", "create", "bad name!", *b]), "[a-zA-Z0-9._-]"),
        (Cmd(["topic", "create", "t", "--replication-factor", "5", *b]), "replication factor"),
        (Cmd(["topic", "create", "existing", *b]), "already exists"),
        (Cmd(["topic", "describe", "nosuch", *b]), "does not exist"),
        (Cmd(["topic", "delete", "nosuch", *b]), "does not exist"),
        (Cmd(["topic", "alter", "existing", "--partitions", "1", *b]), "can only be added"),
        (Cmd(["consume", "existing", "--offset", "3", *b]), "--offset needs --partition"),
        (Cmd(["consume", "nosuch", "--timeout-ms", "100", *b]), "does not exist"),
        (Cmd(["top", "--once", "--topic", "nosuch", *b]), "does not exist"),
        # Past the end: an error, not a silent restart from the beginning.
        (
            Cmd(["consume", "existing", "-p", "0", "--offset", "100", "--timeout-ms", "20000", *b]),
            "OFFSET_OUT_OF_RANGE",
        ),
        (Cmd(["topic", "alter", "nosuch", "--partitions", "5", *b]), "does not exist"),
        (Cmd(["node", "remove", "77", *b]), "node 77 is not in the cluster"),
        (Cmd(["topic", "list", "--bootstrap", ","]), "names no address"),
        (
            Cmd(["topic", "list", "--bootstrap", cluster.nodes[0].gossip]),
            "is not a broker's rpc address",
        ),
    ]
    results = dlogctl_many([cmd for cmd, _ in cases])
    for (_, expected), result in zip(cases, results, strict=True):
        line = one_error_line(result)
        assert expected in line, result.describe()
    assert topics_snapshot(cluster, "existing") == before


def test_an_unreachable_cluster_is_one_line(tmp_path: Path) -> None:
    nowhere = ["--bootstrap", "127.0.0.1:1"]
    cases = [
        Cmd(["topic", "create", "t", *nowhere]),
        Cmd(["produce", "t", *nowhere], "x\n"),
        Cmd(["consume", "t", "--timeout-ms", "100", *nowhere]),
        Cmd(["top", "--once", *nowhere]),
    ]
    for result in dlogctl_many(cases):
        line = one_error_line(result)
        assert "cannot reach the cluster" in line and "127.0.0.1:1" in line, result.describe()
    # No --bootstrap, no DLOG_BOOTSTRAP, no local cluster: say what to do.
    where = dlogctl("topic", "list", cwd=tmp_path)
    assert "dlogctl cluster up" in one_error_line(where)
    status = dlogctl("cluster", "status", "--data-dir", str(tmp_path / "none"))
    assert "no cluster in" in one_error_line(status)


# --- topics ------------------------------------------------------------------------------


def test_topic_create_list_describe_alter_delete(cluster: ClusterSpec) -> None:
    b = bootstrap(cluster)

    def listed() -> dict[str, dict[str, object]]:
        return {t["name"]: t for t in dlogctl("topic", "list", "--json", *b).json()}

    created = dlogctl(
        "topic", "create", "orders", "-p", "2", "-r", "3", "--config", "retention_ms=60000", *b
    ).ok()
    assert "created topic orders with 2 partition(s)" in created.stdout
    listing = listed()
    assert listing["orders"]["partitions"] == 2
    assert listing["orders"]["replication_factor"] == 3
    assert listing["orders"]["configs"] == {"retention_ms": "60000"}
    assert not any(name.startswith("__") for name in listing)

    desc = dlogctl("topic", "describe", "orders", "--json", *b).json()
    assert set(desc) == {"name", "partitions"} and desc["name"] == "orders"
    assert [p["partition"] for p in desc["partitions"]] == [0, 1]
    for p in desc["partitions"]:
        assert set(p) == {
            "partition",
            "leader",
            "leader_epoch",
            "replicas",
            "isr",
            "high_watermark",
            "log_end_offset",
        }
        assert sorted(p["replicas"]) == [1, 2, 3]
        assert sorted(p["isr"]) == [1, 2, 3]
        assert p["leader"] in p["isr"]
        assert p["high_watermark"] == p["log_end_offset"] == 0

    dlogctl("topic", "alter", "orders", "--partitions", "3", "-c", "retention_ms=120000", *b).ok()
    listing = listed()
    assert listing["orders"]["partitions"] == 3
    assert listing["orders"]["configs"] == {"retention_ms": "120000"}
    dlogctl("topic", "alter", "orders", "--config", "retention_ms=", *b).ok()  # reset
    table, listing_json = dlogctl_many(
        [Cmd(["topic", "describe", "orders", *b]), Cmd(["topic", "list", "--json", *b])]
    )
    assert {t["name"]: t for t in listing_json.json()}["orders"]["configs"] == {}
    rows = [line for line in table.ok().stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 3 and "defaults" in table.stdout

    dlogctl("topic", "delete", "orders", *b).ok()
    listing_json, described = dlogctl_many(
        [Cmd(["topic", "list", "--json", *b]), Cmd(["topic", "describe", "orders", *b])]
    )
    assert "orders" not in {t["name"] for t in listing_json.json()}
    assert "does not exist" in one_error_line(described)


# --- produce and consume -----------------------------------------------------------------


def test_produce_then_consume_every_way(cluster: ClusterSpec) -> None:
    # --data-dir: the local cluster's own file says where it is (no --bootstrap).
    d = ["--data-dir", cluster.data_dir]
    dlogctl("topic", "create", "events", "--partitions", "3", *d).ok()
    keyed = [f"user-{i}:payload {i}" for i in range(12)]
    produced = dlogctl("produce", "events", "--key-separator", ":", "--acks", "all", *d,
                       input="\n".join(keyed) + "\n").ok()  # fmt: skip
    assert "produced 12 record(s)" in produced.stderr
    dlogctl("produce", "events", "--partition", "1", "--acks", "leader", *d,
            input="pinned-a\npinned-b\n").ok()  # fmt: skip
    # Bytes that are not UTF-8 and a line with no newline at the end.
    dlogctl("produce", "events", "--partition", "2", "--acks", "none", *d,
            input=b"\xff\xfe raw\nlast-no-newline").ok()  # fmt: skip
    total = 12 + 2 + 2

    # --max-records waits (with the subprocess deadline) until everything arrived,
    # even the acks=none records nobody waited for.
    records = dlogctl("consume", "events", "--from-beginning", "--json",
                      "--max-records", str(total), *d).json_lines()  # fmt: skip
    assert len(records) == total
    for r in records:
        assert list(r) == ["partition", "offset", "timestamp", "key", "value"]
        assert isinstance(r["timestamp"], int) and abs(r["timestamp"] / 1000 - time.time()) < 600
    by_partition: dict[int, list[int]] = {}
    for r in records:
        by_partition.setdefault(r["partition"], []).append(r["offset"])
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    for line in keyed:
        key, _, value = line.partition(":")
        (r,) = [r for r in records if r["value"] == value]
        assert r["key"] == key
        # Kafka's murmur2 partitioner: the same key lands where Kafka would put it.
        assert r["partition"] == partition_for_key(key.encode(), 3)
    pinned = [r for r in records if r["value"].startswith("pinned")]
    assert [(r["partition"], r["key"], r["value"]) for r in pinned] == [
        (1, None, "pinned-a"),
        (1, None, "pinned-b"),
    ]

    binary = dlogctl("consume", "events", "--partition", "2", "--offset", "0", "--json-binary",
                     "--max-records", str(len(by_partition[2])), *d).json_lines()  # fmt: skip
    raw = [base64.b64decode(r["value"]) for r in binary]
    assert raw[-2:] == [b"\xff\xfe raw", b"last-no-newline"]
    assert all(r["partition"] == 2 for r in binary)

    # --timeout-ms: stop when nothing more comes; plain text is one value per line.
    text = dlogctl("consume", "events", "--from-beginning", "--timeout-ms", "3000", *d).ok()
    assert sorted(text.stdout.splitlines()) == sorted(
        [line.partition(":")[2] for line in keyed]
        + ["pinned-a", "pinned-b", "\ufffd\ufffd raw", "last-no-newline"]
    )
    assert f"consumed {total} record(s)" in text.stderr

    # --max-records stops early; --partition --offset starts exactly there.
    two = dlogctl("consume", "events", "--from-beginning", "--max-records", "2", *d).ok()
    assert len(two.stdout.splitlines()) == 2
    tail = dlogctl("consume", "events", "--partition", "1", "--offset", "1", "--json",
                   "--timeout-ms", "3000", *d).json_lines()  # fmt: skip
    assert [(r["partition"], r["offset"]) for r in tail] == [
        (1, o) for o in range(1, len(by_partition[1]))
    ]
    # Without --from-beginning a consumer starts at the end: nothing old.
    latest = dlogctl("consume", "events", "--timeout-ms", "1000", *d).ok()
    assert latest.stdout == ""


def test_a_group_resumes_after_its_commit(cluster: ClusterSpec) -> None:
    b = bootstrap(cluster)
    dlogctl("topic", "create", "jobs", "--partitions", "1", *b).ok()
    dlogctl("produce", "jobs", *b, input="".join(f"job-{i}\n" for i in range(5))).ok()
    group = ["--group", "workers", "--from-beginning", *b]
    first = dlogctl("consume", "jobs", "--max-records", "3", *group).ok()
    assert first.stdout.splitlines() == ["job-0", "job-1", "job-2"]
    rest = dlogctl("consume", "jobs", "--timeout-ms", "3000", *group).ok()
    assert rest.stdout.splitlines() == ["job-3", "job-4"]
    nothing = dlogctl("consume", "jobs", "--timeout-ms", "1000", *group).ok()
    assert nothing.stdout == ""
    dlogctl("produce", "jobs", *b, input="job-5\njob-6\n").ok()
    new = dlogctl("consume", "jobs", "--max-records", "2", *group).ok()
    assert new.stdout.splitlines() == ["job-5", "job-6"]


# --- the local cluster (these stop and kill nodes: they run last and heal first) ------


def heal(spec: ClusterSpec) -> None:
    """Every node of ``spec`` running and registered again (after a test that killed one)."""
    start_cluster(Path(spec.data_dir))


def test_top_once_shows_isr_and_hw_then_the_shrunk_isr_after_a_kill(
    cluster: ClusterSpec,
) -> None:
    heal(cluster)
    b = bootstrap(cluster)
    dlogctl("topic", "create", "watched", "--partitions", "3", "-r", "3", *b).ok()
    dlogctl("produce", "watched", "--partition", "0", *b, input="a\nb\nc\n").ok()
    dlogctl("produce", "watched", "--partition", "2", *b, input="d\n").ok()
    want_hw = {"0": "3", "1": "0", "2": "1"}

    def watched(tables: dict[str, list[dict[str, str]]]) -> list[dict[str, str]]:
        return [r for r in tables["partitions"] if r["topic"] == "watched"]

    def snapshot() -> dict[str, list[dict[str, str]]]:
        return parse_tables(dlogctl("top", "--once", *b).ok().stdout)

    def settled() -> dict[str, list[dict[str, str]]] | None:
        # Followers learn the HW from their next fetch after the acknowledgement.
        tables = snapshot()
        rows = watched(tables)
        if {r["part"]: r["HW"] for r in rows} != want_hw:
            return None
        return tables if all(len(set(r["LEO per replica"].split())) == 3 for r in rows) else None

    tables = wait_until(settled, timeout=30, what="top --once to show every HW")
    assert [r["id"] for r in tables["brokers"]] == ["1", "2", "3"]
    assert all(r["alive"] == "yes" and r["state"] == "active" for r in tables["brokers"])
    rows = watched(tables)
    assert [r["part"] for r in rows] == ["0", "1", "2"]
    for r in rows:
        assert members(r["isr"]) == members(r["replicas"]) == {1, 2, 3}
        assert int(r["leader"]) in {1, 2, 3}
        leos = dict(pair.split(":") for pair in r["LEO per replica"].split())
        assert set(leos) == {"1", "2", "3"} and set(leos.values()) == {r["HW"]}
    assert "rates" not in tables  # a rate needs two snapshots: not in --once
    # Without a terminal (a pipe, a script) plain `top` prints that one snapshot too.
    piped = parse_tables(dlogctl("top", *b, timeout=30).ok().stdout)
    assert [r["part"] for r in watched(piped)] == ["0", "1", "2"]

    victim = int(rows[0]["leader"])
    led_before = {r["part"]: int(r["epoch"]) for r in rows if r["leader"] == str(victim)}
    try:
        kill_node(cluster.node(victim))

        def shrunk() -> dict[str, list[dict[str, str]]] | None:
            tables = snapshot()
            rows = watched(tables)
            if any(victim in members(r["isr"]) or r["leader"] == str(victim) for r in rows):
                return None
            # A new leader reports the HW once it has applied its leadership.
            return None if any(r["HW"] == "-" for r in rows) else tables

        tables = wait_until(shrunk, timeout=60, what=f"node {victim} to leave every ISR")
        rows = watched(tables)
        for r in rows:
            assert members(r["isr"]) == {1, 2, 3} - {victim}
            assert members(r["replicas"]) == {1, 2, 3}
            assert r["leader"] != "offline" and int(r["leader"]) != victim
            if r["part"] in led_before:
                assert int(r["epoch"]) > led_before[r["part"]]  # a new leader, a new epoch
        assert {r["part"]: r["HW"] for r in rows} == want_hw
        dead = next(r for r in tables["brokers"] if r["id"] == str(victim))
        assert dead["alive"] == "no" or dead["state"] == "fenced"
        assert dead["leads"] == "0"
    finally:
        heal(cluster)


def test_cluster_status_down_and_up_again(cluster: ClusterSpec) -> None:
    heal(cluster)
    d = ["--data-dir", cluster.data_dir]
    dlogctl("topic", "create", "kept", "--partitions", "2", *d).ok()
    dlogctl("produce", "kept", *d, input="a\nb\nc\n").ok()

    status = dlogctl("cluster", "status", "--json", *d).json()
    assert status["bootstrap"] == cluster.nodes[0].rpc
    assert status["controller"] in (1, 2, 3)
    assert [n["id"] for n in status["nodes"]] == [1, 2, 3]
    for node, n in zip(cluster.nodes, status["nodes"], strict=True):
        assert set(n) >= {"id", "pid", "rpc", "gossip", "raft", "alive", "data_dir"}
        assert (n["rpc"], n["gossip"], n["raft"]) == (node.rpc, node.gossip, node.raft)
        assert n["alive"] is True and n["pid"] == node_pid(node)
        assert Path(n["data_dir"]) == node.path

    # `cluster up` with one node killed restarts only that one.
    pids = {n.id: node_pid(n) for n in cluster.nodes}
    kill_node(cluster.node(3))
    down = dlogctl("cluster", "status", "--json", *d).json()
    assert [n["alive"] for n in down["nodes"]] == [True, True, False]
    up = dlogctl("cluster", "up", *d, timeout=90).ok()
    assert "started node(s) 3" in up.stdout and "cluster ready" in up.stdout
    assert node_pid(cluster.node(1)) == pids[1] and node_pid(cluster.node(2)) == pids[2]
    assert node_pid(cluster.node(3)) not in (None, pids[3])
    assert "every node is already running" in dlogctl("cluster", "up", *d, timeout=90).ok().stdout

    # `cluster down`: every node stops, one at a time, the controller last.
    controller = dlogctl("cluster", "status", "--json", *d).json()["controller"]
    pids = {n.id: node_pid(n) for n in cluster.nodes}
    stopped = dlogctl("cluster", "down", *d, timeout=90).ok()
    order = [int(line.split()[-1]) for line in stopped.stdout.splitlines()
             if line.startswith("stopped node")]  # fmt: skip
    assert sorted(order) == [1, 2, 3] and order[-1] == controller
    for pid in pids.values():
        assert pid is not None and not pid_alive(pid)
    after = dlogctl("cluster", "status", "--json", *d).json()
    assert [n["alive"] for n in after["nodes"]] == [False, False, False]

    # Up again on the same data dir: the same cluster, its data kept.
    dlogctl("cluster", "up", *d, timeout=90).ok()
    assert dlogctl("cluster", "status", "--json", *d).json()["cluster_id"] == status["cluster_id"]
    back = dlogctl("consume", "kept", "--from-beginning", "--max-records", "3", *d).ok()
    assert sorted(back.stdout.splitlines()) == ["a", "b", "c"]


def test_nodes_do_not_import_a_dlog_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Started from a checkout of dlog, `python -m dlogctl` put the working directory first
    # on the node's sys.path and imported the dlog there: a compiled install (`make
    # compiled`, `make bench`) quietly ran its nodes as pure Python. Here the working
    # directory's dlog cannot even be imported.
    checkout = tmp_path / "checkout"
    (checkout / "dlog").mkdir(parents=True)
    (checkout / "dlog" / "__init__.py").write_text(
        'raise ImportError("the dlog in the working directory was imported")\n'
    )
    monkeypatch.chdir(checkout)
    spec = start_cluster(tmp_path / "cluster", 1, timeout_s=30)
    try:
        assert node_pid(spec.nodes[0]) is not None
    finally:
        kill_node(spec.nodes[0])
