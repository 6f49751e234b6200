"""The one error hierarchy of dlog and the table that maps it to wire error codes.

Every error dlog raises on purpose is a :class:`DlogError`. Each subclass stands for
one meaning and carries one :class:`ErrorCode` (Kafka's names and numbers), which is
what travels on the wire. :data:`ERRORS` says, per code, whether a client may retry.

An error may carry ``details``: small CBOR-friendly values a client can act on (the
current leader for NOT_LEADER_OR_FOLLOWER, the log start and end offsets for
OFFSET_OUT_OF_RANGE, ...). ``to_wire`` / ``error_from_wire`` turn an error into a
plain dict and back, choosing the subclass by code, so ``except NotLeaderError``
works on both sides of a connection.

This module is imported by every layer and imports nothing of dlog.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar


class ErrorCode(enum.IntEnum):
    """Wire error codes; names and numbers follow Kafka's protocol."""

    UNKNOWN_SERVER_ERROR = -1
    NONE = 0
    OFFSET_OUT_OF_RANGE = 1
    CORRUPT_MESSAGE = 2
    UNKNOWN_TOPIC_OR_PARTITION = 3
    LEADER_NOT_AVAILABLE = 5
    NOT_LEADER_OR_FOLLOWER = 6
    REQUEST_TIMED_OUT = 7
    BROKER_NOT_AVAILABLE = 8
    MESSAGE_TOO_LARGE = 10
    NETWORK_EXCEPTION = 13
    COORDINATOR_LOAD_IN_PROGRESS = 14
    COORDINATOR_NOT_AVAILABLE = 15
    NOT_COORDINATOR = 16
    INVALID_TOPIC_EXCEPTION = 17
    NOT_ENOUGH_REPLICAS = 19
    NOT_ENOUGH_REPLICAS_AFTER_APPEND = 20
    INVALID_REQUIRED_ACKS = 21
    INVALID_TIMESTAMP = 32
    UNSUPPORTED_VERSION = 35
    TOPIC_ALREADY_EXISTS = 36
    INVALID_PARTITIONS = 37
    INVALID_REPLICATION_FACTOR = 38
    INVALID_REPLICA_ASSIGNMENT = 39
    INVALID_CONFIG = 40
    NOT_CONTROLLER = 41
    INVALID_REQUEST = 42
    KAFKA_STORAGE_ERROR = 56
    FENCED_LEADER_EPOCH = 74
    UNKNOWN_LEADER_EPOCH = 75
    UNSUPPORTED_COMPRESSION_TYPE = 76
    STALE_BROKER_EPOCH = 77
    OFFSET_NOT_AVAILABLE = 78
    ELECTION_NOT_NEEDED = 84
    INVALID_RECORD = 87
    INVALID_UPDATE_VERSION = 95
    BROKER_ID_NOT_REGISTERED = 102
    INCONSISTENT_CLUSTER_ID = 104


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    code: ErrorCode
    retriable: bool
    description: str


def _info(code: ErrorCode, retriable: bool, description: str) -> tuple[ErrorCode, ErrorInfo]:
    return code, ErrorInfo(code, retriable, description)


#: Per code: may a client retry the same request (after refreshing metadata)?
ERRORS: dict[ErrorCode, ErrorInfo] = dict(
    [
        _info(ErrorCode.UNKNOWN_SERVER_ERROR, False, "unexpected server error"),
        _info(ErrorCode.NONE, False, "no error"),
        _info(ErrorCode.OFFSET_OUT_OF_RANGE, False, "offset outside the log's range"),
        _info(ErrorCode.CORRUPT_MESSAGE, False, "record batch failed validation"),
        _info(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, True, "no such topic or partition"),
        _info(ErrorCode.LEADER_NOT_AVAILABLE, True, "partition has no leader right now"),
        _info(ErrorCode.NOT_LEADER_OR_FOLLOWER, True, "this node does not lead the partition"),
        _info(ErrorCode.REQUEST_TIMED_OUT, True, "request timed out"),
        _info(ErrorCode.BROKER_NOT_AVAILABLE, True, "broker not available"),
        _info(ErrorCode.MESSAGE_TOO_LARGE, False, "message or frame larger than allowed"),
        _info(ErrorCode.NETWORK_EXCEPTION, True, "connection failed or was closed"),
        _info(ErrorCode.COORDINATOR_LOAD_IN_PROGRESS, True, "coordinator is loading offsets"),
        _info(ErrorCode.COORDINATOR_NOT_AVAILABLE, True, "coordinator not available"),
        _info(ErrorCode.NOT_COORDINATOR, True, "this node is not the group's coordinator"),
        _info(ErrorCode.INVALID_TOPIC_EXCEPTION, False, "invalid topic name"),
        _info(ErrorCode.NOT_ENOUGH_REPLICAS, True, "ISR smaller than min_insync_replicas"),
        _info(
            ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
            True,
            "written, but the ISR shrank below min_insync_replicas before it was replicated",
        ),
        _info(ErrorCode.INVALID_REQUIRED_ACKS, False, "acks must be none, leader or all"),
        _info(ErrorCode.INVALID_TIMESTAMP, False, "timestamp outside the allowed range"),
        _info(ErrorCode.UNSUPPORTED_VERSION, False, "unsupported message version"),
        _info(ErrorCode.TOPIC_ALREADY_EXISTS, False, "topic already exists"),
        _info(ErrorCode.INVALID_PARTITIONS, False, "invalid partition count"),
        _info(ErrorCode.INVALID_REPLICATION_FACTOR, False, "invalid replication factor"),
        _info(ErrorCode.INVALID_REPLICA_ASSIGNMENT, False, "invalid replica assignment"),
        _info(ErrorCode.INVALID_CONFIG, False, "invalid configuration"),
        _info(ErrorCode.NOT_CONTROLLER, True, "this node is not the controller"),
        _info(ErrorCode.INVALID_REQUEST, False, "malformed or invalid request"),
        _info(ErrorCode.KAFKA_STORAGE_ERROR, True, "disk error on the broker"),
        _info(ErrorCode.FENCED_LEADER_EPOCH, True, "leader epoch in the request is stale"),
        _info(ErrorCode.UNKNOWN_LEADER_EPOCH, True, "leader epoch in the request is newer"),
        _info(ErrorCode.UNSUPPORTED_COMPRESSION_TYPE, False, "unsupported compression codec"),
        _info(ErrorCode.STALE_BROKER_EPOCH, False, "broker epoch is stale"),
        _info(ErrorCode.OFFSET_NOT_AVAILABLE, True, "offset not available yet"),
        _info(ErrorCode.ELECTION_NOT_NEEDED, False, "leader election not needed"),
        _info(ErrorCode.INVALID_RECORD, False, "record failed validation"),
        _info(ErrorCode.INVALID_UPDATE_VERSION, False, "partition epoch in the request is stale"),
        _info(ErrorCode.BROKER_ID_NOT_REGISTERED, True, "broker not registered"),
        _info(ErrorCode.INCONSISTENT_CLUSTER_ID, False, "cluster id does not match"),
    ]
)


class DlogError(Exception):
    """Root of every error dlog raises on purpose.

    ``message`` is one human-readable line; ``details`` are values a caller can act on.
    """

    code: ClassVar[ErrorCode] = ErrorCode.UNKNOWN_SERVER_ERROR

    def __init__(self, message: str = "", **details: Any) -> None:
        self.message = message or ERRORS[self.code].description
        self.details: dict[str, Any] = details
        super().__init__(self.message)

    @property
    def retriable(self) -> bool:
        return ERRORS[self.code].retriable

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        """A CBOR-friendly dict: ``{"code": int, "message": str, "details": {...}}``."""
        return {"code": int(self.code), "message": self.message, "details": self.details}


class UnknownServerError(DlogError):
    code = ErrorCode.UNKNOWN_SERVER_ERROR


class OffsetOutOfRangeError(DlogError):
    """details: ``log_start_offset``, ``log_end_offset`` where known."""

    code = ErrorCode.OFFSET_OUT_OF_RANGE


class CorruptRecordError(DlogError):
    code = ErrorCode.CORRUPT_MESSAGE


class UnknownTopicOrPartitionError(DlogError):
    code = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


class LeaderNotAvailableError(DlogError):
    code = ErrorCode.LEADER_NOT_AVAILABLE


class NotLeaderError(DlogError):
    """details: ``leader`` (node id or None) and, where known, ``leader_epoch``."""

    code = ErrorCode.NOT_LEADER_OR_FOLLOWER


class RequestTimedOutError(DlogError):
    code = ErrorCode.REQUEST_TIMED_OUT


class BrokerNotAvailableError(DlogError):
    code = ErrorCode.BROKER_NOT_AVAILABLE


class MessageTooLargeError(DlogError):
    code = ErrorCode.MESSAGE_TOO_LARGE


class NetworkError(DlogError):
    """The connection failed or dropped; the request may or may not have been handled."""

    code = ErrorCode.NETWORK_EXCEPTION


class CoordinatorLoadInProgressError(DlogError):
    code = ErrorCode.COORDINATOR_LOAD_IN_PROGRESS


class CoordinatorNotAvailableError(DlogError):
    code = ErrorCode.COORDINATOR_NOT_AVAILABLE


class NotCoordinatorError(DlogError):
    code = ErrorCode.NOT_COORDINATOR


class InvalidTopicError(DlogError):
    code = ErrorCode.INVALID_TOPIC_EXCEPTION


class NotEnoughReplicasError(DlogError):
    code = ErrorCode.NOT_ENOUGH_REPLICAS


class NotEnoughReplicasAfterAppendError(DlogError):
    code = ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND


class InvalidRequiredAcksError(DlogError):
    code = ErrorCode.INVALID_REQUIRED_ACKS


class InvalidTimestampError(DlogError):
    code = ErrorCode.INVALID_TIMESTAMP


class UnsupportedVersionError(DlogError):
    code = ErrorCode.UNSUPPORTED_VERSION


class TopicAlreadyExistsError(DlogError):
    code = ErrorCode.TOPIC_ALREADY_EXISTS


class InvalidPartitionsError(DlogError):
    code = ErrorCode.INVALID_PARTITIONS


class InvalidReplicationFactorError(DlogError):
    code = ErrorCode.INVALID_REPLICATION_FACTOR


class InvalidReplicaAssignmentError(DlogError):
    code = ErrorCode.INVALID_REPLICA_ASSIGNMENT


class InvalidConfigError(DlogError):
    code = ErrorCode.INVALID_CONFIG


class NotControllerError(DlogError):
    """details: ``controller`` (node id or None)."""

    code = ErrorCode.NOT_CONTROLLER


class InvalidRequestError(DlogError):
    code = ErrorCode.INVALID_REQUEST


class ProtocolError(InvalidRequestError):
    """Bytes on a connection that do not form a valid frame or message."""


class StorageError(DlogError):
    """A log cannot do what was asked: it is closed, being truncated or offline, an
    index is full, a file on disk is malformed -- or the disk itself failed
    (:class:`StorageIOError`)."""

    code = ErrorCode.KAFKA_STORAGE_ERROR


class StorageIOError(StorageError):
    """The operating system failed a disk operation (I/O error, full disk, bad
    permissions), or a log went offline after such a failure: the disk is at fault,
    not the log's state. Raised ``from`` the OSError where there is one; that is not
    relied on (a mypyc-compiled ``raise ... from`` leaves ``__cause__`` unset)."""


class FencedLeaderEpochError(DlogError):
    code = ErrorCode.FENCED_LEADER_EPOCH


class UnknownLeaderEpochError(DlogError):
    code = ErrorCode.UNKNOWN_LEADER_EPOCH


class UnsupportedCompressionTypeError(DlogError):
    code = ErrorCode.UNSUPPORTED_COMPRESSION_TYPE


class StaleBrokerEpochError(DlogError):
    code = ErrorCode.STALE_BROKER_EPOCH


class OffsetNotAvailableError(DlogError):
    code = ErrorCode.OFFSET_NOT_AVAILABLE


class ElectionNotNeededError(DlogError):
    code = ErrorCode.ELECTION_NOT_NEEDED


class InvalidRecordError(DlogError):
    code = ErrorCode.INVALID_RECORD


class InvalidUpdateVersionError(DlogError):
    code = ErrorCode.INVALID_UPDATE_VERSION


class BrokerIdNotRegisteredError(DlogError):
    code = ErrorCode.BROKER_ID_NOT_REGISTERED


class InconsistentClusterIdError(DlogError):
    code = ErrorCode.INCONSISTENT_CLUSTER_ID


def _subclasses(cls: type[DlogError]) -> list[type[DlogError]]:
    out: list[type[DlogError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


# The first class declared for a code is the one a wire error turns back into
# (ProtocolError is raised locally; on the wire it is INVALID_REQUEST).
_CLASS_BY_CODE: dict[ErrorCode, type[DlogError]] = {}
for _cls in _subclasses(DlogError):
    _CLASS_BY_CODE.setdefault(_cls.code, _cls)


def error_class(code: int) -> type[DlogError]:
    """The exception class for a wire code (UnknownServerError for unknown codes)."""
    try:
        return _CLASS_BY_CODE[ErrorCode(code)]
    except (ValueError, KeyError):
        return UnknownServerError


def error_from_wire(
    code: int, message: str = "", details: dict[str, Any] | None = None
) -> DlogError:
    """Rebuild the exception a peer sent with :meth:`DlogError.to_wire`."""
    cls = error_class(code)
    err = cls(message, **(details or {}))
    if cls is UnknownServerError and code != ErrorCode.UNKNOWN_SERVER_ERROR:
        err.details.setdefault("wire_code", code)
    return err


def is_retriable(code: int) -> bool:
    try:
        return ERRORS[ErrorCode(code)].retriable
    except (ValueError, KeyError):
        return False
