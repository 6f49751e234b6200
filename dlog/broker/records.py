"""Metadata records: what the controller proposes to Raft and every broker applies.

A Raft entry of the metadata log holds one *batch* of records, applied atomically
(``encode_batch`` / ``decode_batch``). Records are small frozen dataclasses tagged by
``kind``; they carry everything apply needs (ids, timestamps), so applying is
deterministic: no clock, no randomness, no I/O.

Records that change a partition carry the partition epoch they were computed from;
apply skips a record whose epoch is stale (a controller that raced a newer change),
the AlterPartition rule of Kafka's KRaft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from dlog.errors import ProtocolError
from dlog.net.messages import Struct, from_body, to_body


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterBroker(Struct):
    node_id: int
    directory_id: str
    incarnation: str
    rpc: str
    gossip: str
    raft: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FenceBroker(Struct):
    node_id: int
    incarnation: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UnfenceBroker(Struct):
    node_id: int
    incarnation: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UnregisterBroker(Struct):
    node_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionAssignment(Struct):
    partition: int
    replicas: list[int]
    isr: list[int]
    leader: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateTopic(Struct):
    name: str
    topic_id: str
    configs: dict[str, str]
    partitions: list[PartitionAssignment]
    internal: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CreatePartitions(Struct):
    topic_id: str
    partitions: list[PartitionAssignment]


@dataclass(frozen=True, slots=True, kw_only=True)
class AlterConfigs(Struct):
    topic_id: str
    #: key -> new value, or None to reset the key to its default.
    configs: dict[str, str | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteTopic(Struct):
    topic_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionChange(Struct):
    topic_id: str
    partition: int
    #: The partition epoch this change was computed from; stale ones are skipped.
    partition_epoch: int
    leader: int | None
    isr: list[int]


Record = (
    RegisterBroker
    | FenceBroker
    | UnfenceBroker
    | UnregisterBroker
    | CreateTopic
    | CreatePartitions
    | AlterConfigs
    | DeleteTopic
    | PartitionChange
)

_KINDS: dict[str, type[Any]] = {
    "register_broker": RegisterBroker,
    "fence_broker": FenceBroker,
    "unfence_broker": UnfenceBroker,
    "unregister_broker": UnregisterBroker,
    "create_topic": CreateTopic,
    "create_partitions": CreatePartitions,
    "alter_configs": AlterConfigs,
    "delete_topic": DeleteTopic,
    "partition_change": PartitionChange,
}
_KIND_OF: dict[type[Any], str] = {cls: kind for kind, cls in _KINDS.items()}


def encode_batch(records: list[Record]) -> bytes:
    return cbor2.dumps([[_KIND_OF[type(r)], to_body(r)] for r in records])


def decode_batch(data: bytes) -> list[Record]:
    try:
        raw = cbor2.loads(data)
    except Exception as exc:
        raise ProtocolError(f"undecodable metadata batch: {exc}") from None
    if not isinstance(raw, list):
        raise ProtocolError("metadata batch is not an array")
    out: list[Record] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and item[0] in _KINDS):
            raise ProtocolError(f"bad metadata record {item!r:.80}")
        out.append(from_body(_KINDS[item[0]], item[1]))
    return out
