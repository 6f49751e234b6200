"""The client's settings: one frozen dataclass per part, validated on construction.

Names and defaults follow Kafka's client configs in snake_case (``linger_ms``,
``batch_size``, ``delivery_timeout_ms``, ``max_partition_fetch_bytes`` ...), so a
Kafka user finds what they expect. Every bad value raises
:class:`~dlog.errors.InvalidConfigError` with one line saying which and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlog.errors import InvalidConfigError
from dlog.net.protocol import acks_from_text
from dlog.storage.batch import Compression

_COMPRESSION_NAMES = {"none": Compression.NONE, "gzip": Compression.GZIP}
_OFFSET_RESETS = ("earliest", "latest", "error")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise InvalidConfigError(f"{name} must be positive, not {value!r}")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise InvalidConfigError(f"{name} must be zero or more, not {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """Connection and metadata settings shared by everything a client does."""

    #: Per request: connecting, sending and waiting for the answer.
    request_timeout_ms: int = 30_000
    connect_timeout_ms: int = 5_000
    #: Metadata is refreshed at least this often even when nothing goes wrong.
    metadata_max_age_ms: int = 30_000
    #: First retry delay after a retriable error; doubles up to ``retry_backoff_max_ms``.
    retry_backoff_ms: int = 100
    retry_backoff_max_ms: int = 1_000
    #: Overall budget of one admin or offsets call, retries included.
    default_api_timeout_ms: int = 60_000

    def __post_init__(self) -> None:
        for name in (
            "request_timeout_ms",
            "connect_timeout_ms",
            "metadata_max_age_ms",
            "retry_backoff_ms",
            "default_api_timeout_ms",
        ):
            _positive(name, getattr(self, name))
        if self.retry_backoff_max_ms < self.retry_backoff_ms:
            raise InvalidConfigError("retry_backoff_max_ms must be >= retry_backoff_ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducerConfig:
    """Producer settings (see :meth:`dlog.client.Client.producer`)."""

    #: ``none|leader|all`` or Kafka's ``0|1|-1``; stored as the wire value.
    acks: int | str = "all"
    #: Target bytes per record batch; a batch is sent when it reaches this size...
    batch_size: int = 256 * 1024
    #: ... or when its first record has waited this long.
    linger_ms: float = 5.0
    #: Bytes of records waiting or in flight before ``send_nowait`` raises
    #: ``trio.WouldBlock`` and the async sends wait for room.
    buffer_memory: int = 64 * 1024 * 1024
    #: Bytes of batches in one ProduceRequest (at least one batch always goes).
    max_request_size: int = 8 * 1024 * 1024
    #: A record fails if it is not acknowledged this long after it was accepted
    #: (lingering, waiting for a leader and every retry included).
    delivery_timeout_ms: int = 120_000
    #: How long the broker may wait for acks=all (the request's ``timeout_ms``); the
    #: client waits a little longer for the answer.
    request_timeout_ms: int = 30_000
    #: How long a send waits for the topic's metadata or for buffer room.
    max_block_ms: int = 60_000
    #: Produce requests in flight per broker (each holds distinct partitions).
    max_in_flight_requests_per_broker: int = 5
    compression: str = "none"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "acks", acks_from_text(self.acks))
        except ValueError as exc:
            raise InvalidConfigError(str(exc)) from None
        if self.compression not in _COMPRESSION_NAMES:
            raise InvalidConfigError(
                f"compression must be one of {sorted(_COMPRESSION_NAMES)}, not {self.compression!r}"
            )
        for name in (
            "batch_size",
            "buffer_memory",
            "max_request_size",
            "delivery_timeout_ms",
            "request_timeout_ms",
            "max_block_ms",
            "max_in_flight_requests_per_broker",
        ):
            _positive(name, getattr(self, name))
        _non_negative("linger_ms", self.linger_ms)
        if self.buffer_memory < self.batch_size:
            raise InvalidConfigError("buffer_memory must be at least batch_size")

    @property
    def acks_value(self) -> int:
        """The acks setting as the wire value (0, 1 or -1)."""
        assert isinstance(self.acks, int)
        return self.acks

    @property
    def compression_codec(self) -> Compression:
        return _COMPRESSION_NAMES[self.compression]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerConfig:
    """Consumer settings (see :meth:`dlog.client.Client.consumer`)."""

    #: The offsets namespace: start from its committed offsets, ``commit()`` to it.
    group: str | None = None
    #: Partitions to read; None: every partition of the topic.
    partitions: tuple[int, ...] | None = None
    #: Where to start when the group has no committed offset: earliest or latest.
    from_beginning: bool = False
    #: What to do when the position falls outside the log (OFFSET_OUT_OF_RANGE):
    #: ``earliest``, ``latest`` or ``error``; None means earliest when
    #: ``from_beginning`` else latest.
    auto_offset_reset: str | None = None
    #: Long poll: how long the leader may hold a fetch waiting for ``min_bytes``.
    max_wait_ms: int = 500
    min_bytes: int = 1
    #: Bytes per fetch response, and per partition in it (at least one batch comes).
    fetch_max_bytes: int = 50 * 1024 * 1024
    max_partition_fetch_bytes: int = 1024 * 1024
    #: Fetched bytes waiting to be consumed; fetching pauses above this.
    max_buffer_bytes: int = 64 * 1024 * 1024
    #: Commit the consumed positions this often (and on a clean close); None: only
    #: when ``commit()`` is called.
    auto_commit_interval_ms: int | None = None

    def __post_init__(self) -> None:
        if self.auto_offset_reset is not None and self.auto_offset_reset not in _OFFSET_RESETS:
            raise InvalidConfigError(
                f"auto_offset_reset must be one of {list(_OFFSET_RESETS)}, not"
                f" {self.auto_offset_reset!r}"
            )
        if self.group is not None and not self.group:
            raise InvalidConfigError("group must be a non-empty name or None")
        if self.partitions is not None:
            object.__setattr__(self, "partitions", tuple(self.partitions))
            if any(p < 0 for p in self.partitions):
                raise InvalidConfigError("partitions must be non-negative")
            if len(set(self.partitions)) != len(self.partitions):
                raise InvalidConfigError("partitions must not repeat")
        _non_negative("max_wait_ms", self.max_wait_ms)
        _non_negative("min_bytes", self.min_bytes)
        for name in ("fetch_max_bytes", "max_partition_fetch_bytes", "max_buffer_bytes"):
            _positive(name, getattr(self, name))
        if self.auto_commit_interval_ms is not None:
            _positive("auto_commit_interval_ms", self.auto_commit_interval_ms)
        if self.auto_commit_interval_ms is not None and self.group is None:
            raise InvalidConfigError("auto_commit_interval_ms needs a group")

    @property
    def reset_policy(self) -> str:
        """The effective ``auto_offset_reset``."""
        if self.auto_offset_reset is not None:
            return self.auto_offset_reset
        return "earliest" if self.from_beginning else "latest"
