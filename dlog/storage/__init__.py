"""dlog.storage: record batches, segments, sparse indexes, the partition log.

Knows nothing of brokers. The broker uses :class:`LogManager` and
:class:`PartitionLog`; clients use the record-batch codec (:class:`BatchBuilder`,
:func:`build_batch`, :func:`decode_records`, :func:`decode_rows`, :func:`iter_records`).
"""

from __future__ import annotations

from dlog.storage.batch import (
    HEADER_SIZE,
    NO_TIMESTAMP,
    BatchBuilder,
    BatchHeader,
    Compression,
    Record,
    RecordRow,
    assign_offsets,
    build_batch,
    decode_records,
    decode_rows,
    iter_batch_headers,
    iter_records,
    parse_batches,
    validate_batches,
)
from dlog.storage.config import LogConfig
from dlog.storage.epoch_cache import EpochEntry, LeaderEpochCache
from dlog.storage.log import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    FetchDataInfo,
    LogAppendInfo,
    PartitionLog,
    TimestampAndOffset,
    UnexpectedAppendOffsetError,
)
from dlog.storage.manager import LogManager

__all__ = [
    "EARLIEST_TIMESTAMP",
    "HEADER_SIZE",
    "LATEST_TIMESTAMP",
    "NO_TIMESTAMP",
    "BatchBuilder",
    "BatchHeader",
    "Compression",
    "EpochEntry",
    "FetchDataInfo",
    "LeaderEpochCache",
    "LogAppendInfo",
    "LogConfig",
    "LogManager",
    "PartitionLog",
    "Record",
    "RecordRow",
    "TimestampAndOffset",
    "UnexpectedAppendOffsetError",
    "assign_offsets",
    "build_batch",
    "decode_records",
    "decode_rows",
    "iter_batch_headers",
    "iter_records",
    "parse_batches",
    "validate_batches",
]
