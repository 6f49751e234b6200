"""LogConfig: the per-partition storage settings (Kafka's topic-level log configs).

Keys are Kafka's topic config names in snake_case. A broker builds one from a
topic's config overrides with :meth:`LogConfig.from_overrides`; an unknown key or a
bad value raises :class:`InvalidConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from dlog.errors import InvalidConfigError

_DAY_MS: Final = 24 * 3600 * 1000
_MAX_INT32: Final = (1 << 31) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    #: Roll the active segment when it would grow past this many bytes.
    segment_bytes: int = 1 << 30
    #: Roll the active segment this long after its first batch (wall clock).
    segment_ms: int = 7 * _DAY_MS
    #: Delete a closed segment whose newest record is older than this; -1 keeps all.
    retention_ms: int = 7 * _DAY_MS
    #: Delete the oldest closed segments while the log is bigger than this; -1 = off.
    retention_bytes: int = -1
    #: fsync unflushed data at least this often; 0 = before every acknowledgement;
    #: -1 = no interval (flush_messages, shutdown and roll only).
    flush_ms: int = 1000
    #: fsync once this many records are unflushed; 1 = after every append; -1 = off.
    flush_messages: int = -1
    #: Reject a batch whose maxTimestamp is further than this ahead of the broker;
    #: -1 = unchecked.
    max_timestamp_skew_ms: int = 3600 * 1000
    #: About how many log bytes between two index entries.
    index_interval_bytes: int = 4096
    #: Preallocated size of each index file (the active segment rolls when one fills).
    segment_index_bytes: int = 10 * 1024 * 1024
    #: Largest record batch a producer may append (Kafka's max.message.bytes).
    max_message_bytes: int = 1048588

    KEYS: ClassVar[frozenset[str]]

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidConfigError(
                    f"{field.name} must be an integer, got {value!r}", key=field.name
                )
        _at_least(self, "segment_bytes", 14, maximum=_MAX_INT32)
        _at_least(self, "segment_ms", 1)
        _at_least(self, "retention_ms", -1)
        _at_least(self, "retention_bytes", -1)
        _at_least(self, "flush_ms", -1)
        if self.flush_messages == 0 or self.flush_messages < -1:
            raise InvalidConfigError(
                f"flush_messages must be -1 (off) or at least 1, got {self.flush_messages}",
                key="flush_messages",
            )
        _at_least(self, "max_timestamp_skew_ms", -1)
        _at_least(self, "index_interval_bytes", 0, maximum=_MAX_INT32)
        _at_least(self, "segment_index_bytes", 12, maximum=_MAX_INT32)
        _at_least(self, "max_message_bytes", 0, maximum=_MAX_INT32)

    @classmethod
    def from_overrides(
        cls, overrides: Mapping[str, object], *, base: LogConfig | None = None
    ) -> LogConfig:
        """``base`` (default: the defaults) with ``overrides`` applied.

        Values may be ints or strings of ints (as ``--config k=v`` gives them).
        """
        unknown = sorted(set(overrides) - cls.KEYS)
        if unknown:
            raise InvalidConfigError(
                f"unknown log config key(s): {', '.join(unknown)}", keys=unknown
            )
        values = {key: _parse_int(key, value) for key, value in overrides.items()}
        return dataclasses.replace(base or cls(), **values)

    def with_overrides(self, overrides: Mapping[str, object]) -> LogConfig:
        return LogConfig.from_overrides(overrides, base=self)

    def to_dict(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in sorted(self.KEYS)}


LogConfig.KEYS = frozenset(field.name for field in dataclasses.fields(LogConfig))


def _at_least(config: LogConfig, key: str, minimum: int, *, maximum: int | None = None) -> None:
    value = getattr(config, key)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise InvalidConfigError(f"{key} must be {bound}, got {value}", key=key, value=value)


def _parse_int(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise InvalidConfigError(f"{key} must be an integer, got {value!r}", key=key)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InvalidConfigError(f"{key} must be an integer, got {value!r}", key=key)
