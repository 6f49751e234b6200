"""dlog.client: the async (trio) client -- admin calls, producer, consumer.

::

    import dlog

    async with dlog.connect("127.0.0.1:9400") as client:
        await client.create_topic("orders", partitions=3, replication_factor=3)
        async with client.producer(acks="all") as producer:
            meta = await producer.send("orders", b"value", key=b"k")
            handle = producer.send_nowait("orders", b"v2")
            await producer.send_many("orders", [b"a", b"b", b"c"])
        async with client.consumer("orders", group="g1", from_beginning=True) as consumer:
            batch = await consumer.getmany(max_records=10_000)   # {partition: Records}
            await consumer.commit()

The client speaks only :mod:`dlog.net`'s messages and builds and parses record
batches with :mod:`dlog.storage.batch`.
"""

from dlog.client.admin import (
    BrokerDescription,
    ClusterDescription,
    ListedOffset,
    PartitionDescription,
    RaftMemberDescription,
    TopicDescription,
    TopicListing,
)
from dlog.client.client import Client, connect
from dlog.client.config import ClientOptions, ConsumerConfig, ProducerConfig
from dlog.client.consumer import Consumer
from dlog.client.metadata import ClusterView, PartitionInfo, TopicInfo
from dlog.client.partitioner import murmur2, partition_for_key
from dlog.client.producer import DeliveryHandle, Producer
from dlog.client.records import BatchMetadata, ConsumerRecord, Record, RecordMetadata, Records

__all__ = [
    "BatchMetadata",
    "BrokerDescription",
    "Client",
    "ClientOptions",
    "ClusterDescription",
    "ClusterView",
    "Consumer",
    "ConsumerConfig",
    "ConsumerRecord",
    "DeliveryHandle",
    "ListedOffset",
    "PartitionDescription",
    "PartitionInfo",
    "Producer",
    "ProducerConfig",
    "RaftMemberDescription",
    "Record",
    "RecordMetadata",
    "Records",
    "TopicDescription",
    "TopicInfo",
    "TopicListing",
    "connect",
    "murmur2",
    "partition_for_key",
]
