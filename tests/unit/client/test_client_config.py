"""Client, producer and consumer settings are validated up front."""

from __future__ import annotations

import pytest

from dlog.client.client import parse_bootstrap
from dlog.client.config import ClientOptions, ConsumerConfig, ProducerConfig
from dlog.errors import InvalidConfigError
from dlog.storage.batch import Compression


@pytest.mark.parametrize(
    ("text", "wire"),
    [("all", -1), ("-1", -1), (-1, -1), ("leader", 1), (1, 1), ("none", 0), (0, 0)],
)
def test_acks_aliases(text: str | int, wire: int) -> None:
    assert ProducerConfig(acks=text).acks_value == wire


@pytest.mark.parametrize(
    "bad",
    [
        {"acks": "most"},
        {"batch_size": 0},
        {"linger_ms": -1},
        {"compression": "snappy"},
        {"buffer_memory": 10, "batch_size": 100},
        {"delivery_timeout_ms": 0},
    ],
)
def test_bad_producer_settings(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidConfigError):
        ProducerConfig(**bad)  # type: ignore[arg-type]


def test_producer_compression_codec() -> None:
    assert ProducerConfig(compression="gzip").compression_codec is Compression.GZIP


@pytest.mark.parametrize(
    "bad",
    [
        {"auto_offset_reset": "middle"},
        {"group": ""},
        {"partitions": (1, 1)},
        {"partitions": (-1,)},
        {"auto_commit_interval_ms": 1000},
        {"max_buffer_bytes": 0},
    ],
)
def test_bad_consumer_settings(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidConfigError):
        ConsumerConfig(**bad)  # type: ignore[arg-type]


def test_reset_policy_follows_from_beginning_unless_set() -> None:
    assert ConsumerConfig().reset_policy == "latest"
    assert ConsumerConfig(from_beginning=True).reset_policy == "earliest"
    assert ConsumerConfig(from_beginning=True, auto_offset_reset="error").reset_policy == "error"


def test_client_options() -> None:
    with pytest.raises(InvalidConfigError):
        ClientOptions(retry_backoff_ms=500, retry_backoff_max_ms=100)
    with pytest.raises(InvalidConfigError):
        ClientOptions(request_timeout_ms=0)


def test_bootstrap_parsing() -> None:
    assert parse_bootstrap("a:1, b:2") == ["a:1", "b:2"]
    assert parse_bootstrap(["a:1"]) == ["a:1"]
    with pytest.raises(InvalidConfigError):
        parse_bootstrap("")
    with pytest.raises(InvalidConfigError):
        parse_bootstrap("host-without-port")
