from __future__ import annotations

from pathlib import Path

import pytest

from dlog.broker.config import BrokerConfig
from dlog.broker.topic_config import TOPIC_CONFIG_KEYS, TopicConfig, validate_topic_configs
from dlog.errors import InvalidConfigError
from dlog.storage import LogConfig


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        'node_id = 1\ndata_dir = "/from/file"\nmax_voters = 5\n'
        'replica_lag_time_max_ms = 20000\n[topic_defaults]\nretention_ms = "1000"\n'
    )
    env = {"DLOG_MAX_VOTERS": "4", "DLOG_JOIN": "a:1, b:2", "DLOG_BOOTSTRAP_CLUSTER": "true"}
    cfg = BrokerConfig.load(
        {"data_dir": "/from/flag", "node_id": None}, environ=env, config_file=toml
    )
    assert cfg.node_id == 1
    assert cfg.data_dir == Path("/from/flag")
    assert cfg.max_voters == 4
    assert cfg.replica_lag_time_max_ms == 20000
    assert cfg.join == ("a:1", "b:2")
    assert cfg.bootstrap_cluster is True
    assert cfg.topic_defaults == {"retention_ms": "1000"}


def test_required_and_bad_values() -> None:
    with pytest.raises(InvalidConfigError, match="node_id is required"):
        BrokerConfig.load({"data_dir": "x"}, environ={})
    with pytest.raises(InvalidConfigError, match="max_voters"):
        BrokerConfig.load({"node_id": 1, "data_dir": "x"}, environ={"DLOG_MAX_VOTERS": "many"})
    with pytest.raises(InvalidConfigError, match="bad address"):
        BrokerConfig(node_id=1, data_dir=Path("x"), rpc="nohostport:")
    with pytest.raises(InvalidConfigError, match="well below"):
        BrokerConfig(node_id=1, data_dir=Path("x"), replica_fetch_max_wait_ms=20_000)
    with pytest.raises(InvalidConfigError, match="unknown topic config"):
        BrokerConfig(node_id=1, data_dir=Path("x"), topic_defaults={"retention": "1"})


def test_advertised_defaults_to_bind_with_bound_port() -> None:
    cfg = BrokerConfig(
        node_id=1, data_dir=Path("x"), rpc="0.0.0.0:0", advertise_gossip="node1:7000"
    )
    assert cfg.advertised("rpc", 4321) == "127.0.0.1:4321"
    assert cfg.advertised("gossip", 999) == "node1:7000"
    assert cfg.advertised("raft") == "127.0.0.1:9600"


def test_topic_config_validation_and_resolution() -> None:
    assert validate_topic_configs(
        {"retention_ms": " 60000 ", "unclean_leader_election": "true"}
    ) == {
        "retention_ms": "60000",
        "unclean_leader_election": "true",
    }
    for bad in (
        {"nope": "1"},
        {"retention_ms": "soon"},
        {"segment_bytes": "10"},
        {"min_insync_replicas": "0"},
    ):
        with pytest.raises(InvalidConfigError):
            validate_topic_configs(bad)
    # Integers are Kafka's LONGs: 64 bits (10**400 ms once crashed a log's flush timer).
    for key in ("retention_ms", "flush_ms", "segment_ms", "flush_messages"):
        validate_topic_configs({key: str((1 << 63) - 1)})
        for huge in (str(1 << 63), "9" * 400):
            with pytest.raises(InvalidConfigError, match="64-bit"):
                validate_topic_configs({key: huge})
    # One stored before that check keeps the default, as other bad stored values do.
    assert TopicConfig.resolve({"flush_ms": "9" * 400}, 1).flush_ms == 1000
    cfg = TopicConfig.resolve(
        {"retention_ms": "5"}, replication_factor=3, defaults={"retention_ms": "7"}
    )
    assert cfg.retention_ms == 5
    assert cfg.min_insync_replicas == 2
    assert TopicConfig.resolve({}, replication_factor=1).min_insync_replicas == 1


@pytest.mark.parametrize(
    "key",
    sorted(k for k in TOPIC_CONFIG_KEYS if k in TopicConfig.resolve({}, 3).log_overrides()),
)
def test_every_accepted_topic_config_opens_a_log(key: str) -> None:
    """What the controller accepts, every broker's storage must take: a mismatch made a
    topic whose partitions no broker could create (flush_ms=-1 once did)."""
    spec = TOPIC_CONFIG_KEYS[key]
    candidates = [-(2**31), -2, -1, 0, 1, 13, 64, 1023, 1024, 4096, 2**31 - 1, 2**31, 2**40]
    accepted = [v for v in candidates if spec.check(v)]
    assert accepted
    for value in accepted:
        cfg = TopicConfig.resolve(validate_topic_configs({key: str(value)}), 3)
        LogConfig.from_overrides(cfg.log_overrides())
