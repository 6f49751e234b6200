"""Topic configuration keys: names, types, defaults, validation.

Topic configs are stored in the metadata as strings (what the user typed) and parsed
here into typed values. An unknown key or a value that does not parse is an
InvalidConfigError naming the key, so `dlogctl topic create --config k=v` fails with
one clear line and nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dlog.errors import InvalidConfigError
from dlog.net.messages import INT_MAX, INT_MIN

MS_PER_DAY = 24 * 3600 * 1000


def _parse_int(text: str) -> int:
    value = int(text.strip().replace("_", ""))
    # Integer configs are Kafka's LONGs, the wire's integers: the storage layer's
    # arithmetic on them (a flush interval in seconds is a float) holds only for those.
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"{text} is not a 64-bit integer")
    return value


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclass(frozen=True, slots=True)
class ConfigKey:
    name: str
    parse: Callable[[str], Any]
    default: Any
    check: Callable[[Any], bool]
    requirement: str
    doc: str


def _key(
    name: str,
    parse: Callable[[str], Any],
    default: Any,
    check: Callable[[Any], bool],
    requirement: str,
    doc: str,
) -> tuple[str, ConfigKey]:
    return name, ConfigKey(name, parse, default, check, requirement, doc)


TOPIC_CONFIG_KEYS: dict[str, ConfigKey] = dict(
    [
        _key(
            "retention_ms",
            _parse_int,
            7 * MS_PER_DAY,
            lambda v: v == -1 or v > 0,
            "-1 (forever) or > 0",
            "delete whole segments older than this",
        ),
        _key(
            "retention_bytes",
            _parse_int,
            -1,
            lambda v: v == -1 or v > 0,
            "-1 (unlimited) or > 0",
            "delete old segments while the partition is larger",
        ),
        _key(
            "segment_bytes",
            _parse_int,
            1 << 30,
            lambda v: 1024 <= v <= (1 << 31) - 1,
            "1024 .. 2^31-1",
            "roll a new segment at this size",
        ),
        _key(
            "segment_ms",
            _parse_int,
            7 * MS_PER_DAY,
            lambda v: v > 0,
            "> 0",
            "roll a new segment after this long",
        ),
        _key(
            "min_insync_replicas",
            _parse_int,
            None,
            lambda v: v is None or v >= 1,
            ">= 1",
            "acks=all needs at least this many in-sync replicas (default 2 when RF >= 3, else 1)",
        ),
        _key(
            "unclean_leader_election",
            _parse_bool,
            False,
            lambda v: True,
            "true or false",
            "elect a leader outside the ISR when none is left (may lose data)",
        ),
        _key(
            "flush_ms",
            _parse_int,
            1000,
            lambda v: v >= -1,
            "-1 (off) or >= 0",
            "fsync at least this often (0: before every acknowledgement)",
        ),
        _key(
            "flush_messages",
            _parse_int,
            -1,
            lambda v: v == -1 or v > 0,
            "-1 (off) or > 0",
            "fsync once this many records are unflushed (1: before every acknowledgement)",
        ),
        _key(
            "max_timestamp_skew_ms",
            _parse_int,
            3600 * 1000,
            lambda v: v == -1 or v >= 0,
            "-1 (unchecked) or >= 0",
            "reject batches timestamped further in the future",
        ),
        _key(
            "max_message_bytes",
            _parse_int,
            1048588,
            lambda v: 64 <= v <= (1 << 31) - 1,
            "64 .. 2^31-1",
            "largest record batch a producer may send",
        ),
    ]
)


def validate_topic_configs(configs: Mapping[str, str | None]) -> dict[str, str | None]:
    """Check keys and values; returns them normalized (stripped strings)."""
    out: dict[str, str | None] = {}
    for key, raw in configs.items():
        spec = TOPIC_CONFIG_KEYS.get(key)
        if spec is None:
            known = ", ".join(sorted(TOPIC_CONFIG_KEYS))
            raise InvalidConfigError(f"unknown topic config {key!r} (known: {known})", key=key)
        if raw is None:
            out[key] = None
            continue
        text = str(raw).strip()
        try:
            value = spec.parse(text)
        except ValueError:
            kind = ", a 64-bit integer" if spec.parse is _parse_int else ""
            raise InvalidConfigError(
                f"topic config {key}={raw!r}: expected {spec.requirement}{kind}", key=key
            ) from None
        if not spec.check(value):
            raise InvalidConfigError(
                f"topic config {key}={raw!r}: must be {spec.requirement}", key=key
            )
        out[key] = text
    return out


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """A topic's effective configuration: defaults overlaid with its overrides."""

    retention_ms: int
    retention_bytes: int
    segment_bytes: int
    segment_ms: int
    min_insync_replicas: int
    unclean_leader_election: bool
    flush_ms: int
    flush_messages: int
    max_timestamp_skew_ms: int
    max_message_bytes: int

    @classmethod
    def resolve(
        cls,
        overrides: Mapping[str, str],
        replication_factor: int,
        defaults: Mapping[str, str] | None = None,
    ) -> TopicConfig:
        values: dict[str, Any] = {k: spec.default for k, spec in TOPIC_CONFIG_KEYS.items()}
        for source in (defaults or {}, overrides):
            for key, text in source.items():
                spec = TOPIC_CONFIG_KEYS.get(key)
                if spec is not None:
                    try:
                        values[key] = spec.parse(text)
                    except ValueError:
                        continue  # validated on the way in; an old bad value keeps the default
        if values["min_insync_replicas"] is None:
            values["min_insync_replicas"] = 2 if replication_factor >= 3 else 1
        return cls(**values)

    def log_overrides(self) -> dict[str, int]:
        """The keys the storage layer's LogConfig takes."""
        return {
            "retention_ms": self.retention_ms,
            "retention_bytes": self.retention_bytes,
            "segment_bytes": self.segment_bytes,
            "segment_ms": self.segment_ms,
            "flush_ms": self.flush_ms,
            "flush_messages": self.flush_messages,
            "max_timestamp_skew_ms": self.max_timestamp_skew_ms,
            "max_message_bytes": self.max_message_bytes,
        }
