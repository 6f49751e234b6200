"""LogConfig: defaults, overrides from a dict, validation."""

from __future__ import annotations

import dataclasses

import pytest

from dlog.errors import InvalidConfigError
from dlog.storage.config import LogConfig


def test_defaults() -> None:
    config = LogConfig()
    assert config.segment_bytes == 1 << 30
    assert config.segment_ms == config.retention_ms == 7 * 24 * 3600 * 1000
    assert (config.retention_bytes, config.flush_ms, config.flush_messages) == (-1, 1000, -1)
    assert config.max_timestamp_skew_ms == 3_600_000
    assert config.index_interval_bytes == 4096
    assert config.segment_index_bytes == 10 * 1024 * 1024
    assert config.max_message_bytes == 1048588
    assert set(config.to_dict()) == LogConfig.KEYS


def test_from_overrides_accepts_ints_and_strings() -> None:
    config = LogConfig.from_overrides(
        {"retention_ms": "-1", "segment_bytes": 4096, "flush_messages": " 1 "}
    )
    assert (config.retention_ms, config.segment_bytes, config.flush_messages) == (-1, 4096, 1)
    assert config.with_overrides({"flush_ms": 5}).segment_bytes == 4096


def test_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        LogConfig().segment_bytes = 1  # type: ignore[misc]


def test_unknown_keys_are_named() -> None:
    with pytest.raises(InvalidConfigError, match="min_insync_replicas") as info:
        LogConfig.from_overrides({"min_insync_replicas": 2, "segment_bytes": 100})
    assert info.value.details["keys"] == ["min_insync_replicas"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("segment_bytes", 0),
        ("segment_bytes", 1 << 31),
        ("segment_ms", 0),
        ("retention_ms", -2),
        ("retention_bytes", -5),
        ("flush_ms", -2),
        ("flush_messages", 0),
        ("flush_messages", -2),
        ("max_timestamp_skew_ms", -2),
        ("segment_index_bytes", 8),
        ("max_message_bytes", -1),
        ("segment_bytes", "lots"),
        ("segment_bytes", 1.5),
        ("segment_bytes", True),
        ("segment_bytes", None),
    ],
)
def test_bad_values(key: str, value: object) -> None:
    with pytest.raises(InvalidConfigError, match=key) as info:
        LogConfig.from_overrides({key: value})
    assert info.value.details["key"] == key
