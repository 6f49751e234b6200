"""BrokerConfig: everything one node needs, from flags, DLOG_* variables or a TOML file.

Precedence, highest first: command-line flags, ``DLOG_<KEY>`` environment variables
(upper-case key, e.g. ``DLOG_BROKER_SESSION_TIMEOUT_MS``), the TOML file given with
``--config-file`` (keys as below, topic defaults under ``[topic_defaults]``), then the
defaults here. Every value is validated in ``__post_init__``; a bad value is an
InvalidConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlog.broker.topic_config import validate_topic_configs
from dlog.errors import InvalidConfigError
from dlog.net.address import format_address, parse_address

ENV_PREFIX = "DLOG_"


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    node_id: int
    data_dir: Path
    #: Bind addresses (port 0: any free port; the bound ports are written to the data dir).
    rpc: str = "127.0.0.1:9400"
    gossip: str = "127.0.0.1:9500"
    raft: str = "127.0.0.1:9600"
    #: What other nodes and clients are told; default: the bind address.
    advertise_rpc: str | None = None
    advertise_gossip: str | None = None
    advertise_raft: str | None = None
    #: Gossip addresses of nodes to join through.
    join: tuple[str, ...] = ()
    #: Create a new cluster with this node as its first Raft voter (no-op if formatted).
    bootstrap_cluster: bool = False
    max_voters: int = 3
    #: A broker unheard by the controller's Raft heartbeats this long is fenced; a
    #: broker that heard no Raft leader this long stops leading partitions.
    broker_session_timeout_ms: int = 4000
    controlled_shutdown_timeout_ms: int = 5000
    replica_lag_time_max_ms: int = 10_000
    replica_fetch_max_wait_ms: int = 500
    replica_fetch_max_bytes: int = 8 << 20
    replica_fetch_backoff_ms: int = 100
    #: Most a fetch answer carries, whatever the request asks (plus at most one batch,
    #: so that one larger than this is still served): Kafka's fetch.max.bytes. Keeps
    #: answers within the 64 MiB frames clients accept.
    fetch_max_bytes: int = 55 << 20
    #: How often the controller moves leaderships back to preferred replicas (0: never).
    leader_rebalance_interval_ms: int = 30_000
    #: Replication factor of topics created without one (None: min(3, live brokers)).
    default_replication_factor: int | None = None
    offsets_topic_partitions: int = 8
    #: Broker-wide defaults for topic configs (same keys as ``topic create --config``).
    topic_defaults: Mapping[str, str] = field(default_factory=dict)
    request_timeout_ms: int = 30_000
    max_frame_bytes: int = 64 << 20
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.node_id < 0:
            raise InvalidConfigError("node_id must be >= 0", key="node_id")
        for key in ("rpc", "gossip", "raft"):
            parse_address(getattr(self, key))
            adv = getattr(self, f"advertise_{key}")
            if adv is not None:
                parse_address(adv)
        for seed in self.join:
            parse_address(seed)
        positive = (
            "max_voters",
            "broker_session_timeout_ms",
            "replica_lag_time_max_ms",
            "replica_fetch_max_wait_ms",
            "replica_fetch_max_bytes",
            "replica_fetch_backoff_ms",
            "fetch_max_bytes",
            "offsets_topic_partitions",
            "request_timeout_ms",
            "max_frame_bytes",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise InvalidConfigError(f"{key} must be > 0", key=key)
        if self.controlled_shutdown_timeout_ms < 0 or self.leader_rebalance_interval_ms < 0:
            raise InvalidConfigError("timeouts and intervals must be >= 0")
        if self.replica_fetch_max_wait_ms >= self.replica_lag_time_max_ms:
            raise InvalidConfigError(
                "replica_fetch_max_wait_ms must be well below replica_lag_time_max_ms",
                key="replica_fetch_max_wait_ms",
            )
        if self.default_replication_factor is not None and self.default_replication_factor < 1:
            raise InvalidConfigError("default_replication_factor must be >= 1")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise InvalidConfigError(f"unknown log level {self.log_level!r}", key="log_level")
        validate_topic_configs(self.topic_defaults)

    def advertised(self, key: str, bound_port: int | None = None) -> str:
        """The address others are told for ``key`` (rpc, gossip or raft)."""
        adv = getattr(self, f"advertise_{key}")
        bind_host, bind_port = parse_address(getattr(self, key))
        if adv is not None:
            host, port = parse_address(adv)
            if port == 0 and bound_port is not None:
                port = bound_port
            return format_address(host, port)
        if bind_host in ("0.0.0.0", "::", ""):
            bind_host = "127.0.0.1"
        return format_address(bind_host, bound_port if bound_port is not None else bind_port)

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any],
        *,
        environ: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> BrokerConfig:
        """Merge defaults < TOML file < DLOG_* environment < flags (None means unset)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if config_file is not None:
            try:
                with open(config_file, "rb") as f:
                    values.update(tomllib.load(f))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidConfigError(f"cannot read config file {config_file}: {exc}") from None
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name in known:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        for name, value in flags.items():
            if value is not None:
                values[name] = value
        unknown = set(values) - set(known)
        if unknown:
            raise InvalidConfigError(f"unknown broker config key(s): {', '.join(sorted(unknown))}")
        for key in ("node_id", "data_dir"):
            if key not in values:
                raise InvalidConfigError(
                    f"{key} is required (flag, {ENV_PREFIX}{key.upper()} or config file)", key=key
                )
        typed = {name: _coerce(name, known[name].type, value) for name, value in values.items()}
        return cls(**typed)


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Turn strings (from the environment) and TOML values into the field's type."""
    text = str(annotation)
    try:
        if name == "data_dir":
            return Path(value)
        if name == "join":
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if name == "topic_defaults":
            if isinstance(value, str):
                pairs = (kv.split("=", 1) for kv in value.split(",") if kv.strip())
                return {k.strip(): v.strip() for k, v in pairs}
            return {str(k): str(v) for k, v in dict(value).items()}
        if text.startswith("bool"):
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if text.startswith("int"):
            if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
                if "None" in text:
                    return None
                raise ValueError(value)
            return int(value)
        if "str" in text:
            return None if value is None else str(value)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"bad value for {name}: {value!r}", key=name) from None
    return value
