"""LeaderEpochCache: Kafka's assign / end-offset / truncation rules."""

from __future__ import annotations

import pytest

from dlog.storage.epoch_cache import EpochEntry, LeaderEpochCache


def entries(cache: LeaderEpochCache) -> list[tuple[int, int]]:
    return [(e.epoch, e.start_offset) for e in cache.entries()]


def test_assign_keeps_epochs_and_offsets_increasing() -> None:
    cache = LeaderEpochCache()
    assert cache.latest_epoch is None
    assert cache.assign(1, 0)
    assert not cache.assign(1, 5)  # same epoch, later offset: nothing new
    assert cache.assign(3, 10)
    assert cache.latest_epoch == 3
    assert entries(cache) == [(1, 0), (3, 10)]
    # An entry that conflicts with later ones replaces them.
    assert cache.assign(2, 8)
    assert entries(cache) == [(1, 0), (2, 8)]
    assert cache.assign(4, 8)  # same start offset, newer epoch
    assert entries(cache) == [(1, 0), (4, 8)]
    with pytest.raises(ValueError):
        cache.assign(-1, 0)


def test_end_offset_for_epoch_as_kafka_answers() -> None:
    cache = LeaderEpochCache([EpochEntry(1, 0), EpochEntry(3, 100), EpochEntry(5, 250)])  # type: ignore[arg-type]
    leo = 300
    assert cache.end_offset_for(5, leo) == (5, 300)  # latest epoch: the log end
    assert cache.end_offset_for(3, leo) == (3, 250)
    assert cache.end_offset_for(4, leo) == (3, 250)  # unknown epoch between: floor epoch
    assert cache.end_offset_for(1, leo) == (1, 100)
    assert cache.end_offset_for(0, leo) == (0, 0)  # below all: requested, first start
    assert cache.end_offset_for(6, leo) == (-1, -1)
    assert cache.end_offset_for(-1, leo) == (-1, -1)
    assert LeaderEpochCache().end_offset_for(0, leo) == (-1, -1)


def test_truncation_from_both_ends() -> None:
    cache = LeaderEpochCache([EpochEntry(1, 0), EpochEntry(3, 100), EpochEntry(5, 250)])  # type: ignore[arg-type]
    version = cache.version
    cache.truncate_from_end(251)
    assert entries(cache) == [(1, 0), (3, 100), (5, 250)]
    assert cache.version == version
    cache.truncate_from_end(250)
    assert entries(cache) == [(1, 0), (3, 100)]
    assert cache.version > version
    cache.truncate_from_start(120)
    assert entries(cache) == [(3, 120)]
    cache.truncate_from_start(100)
    assert entries(cache) == [(3, 120)]
    assert cache.epoch_for_offset(119) is None
    assert cache.epoch_for_offset(500) == 3
    cache.clear()
    assert cache.entries() == []
