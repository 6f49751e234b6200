"""The deterministic Raft simulation (dlog.raft.sim) over many seeds.

Each seed runs a cluster through drops, duplicates, delays, partitions, crashes that
lose unpersisted state, disk wipes, membership changes, snapshots and transfers, and
checks election safety, log matching, leader completeness, state machine safety and
ReadIndex after every event, then liveness once healed. A failure names its seed and
the command that replays it (``python -m dlog.raft.sim --seed N --trace``).
"""

from __future__ import annotations

import multiprocessing

import pytest

from dlog.raft.sim import SafetyViolation, Simulation, run_range, run_seed

SEEDS_PER_CHUNK = 50
CI_SEEDS = 1000


@pytest.mark.parametrize("start", range(0, CI_SEEDS, SEEDS_PER_CHUNK))
def test_seeds(start: int) -> None:
    for seed in range(start, start + SEEDS_PER_CHUNK):
        run_seed(seed)


def test_a_seed_replays_exactly() -> None:
    def trace_of(seed: int) -> list[str]:
        lines: list[str] = []
        run_seed(seed, trace=lines.append)
        return lines

    first = trace_of(7)
    assert len(first) > 50
    assert first == trace_of(7)
    assert first != trace_of(8)


def test_the_simulation_does_work() -> None:
    """Guard against a simulation that passes because nothing happens in it."""
    totals: dict[str, int] = {}
    applied = 0
    for seed in range(40):
        sim = Simulation(seed)
        sim.run_until(sim.params.duration)
        sim.finish()
        applied += sim.max_applied
        for k, v in sim.stats.items():
            totals[k] = totals.get(k, 0) + v
    assert applied > 40 * 20
    for what in ("elections", "conf_changes", "snapshots", "read_served", "wipes", "net_drop"):
        assert totals.get(what, 0) > 0, what


def _first_violation(seeds: range) -> str:
    for seed in seeds:
        try:
            run_seed(seed)
        except SafetyViolation as exc:
            return str(exc)
    return ""


def test_a_voter_that_forgets_its_vote_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not persisting the vote lets a restarted node vote twice in a term: two leaders."""
    from dlog.raft.core import RaftCore
    from dlog.raft.messages import HardState

    def hard_state_without_vote(self: RaftCore) -> HardState:
        return HardState(term=self.term, vote=None, commit=self.log.committed)

    monkeypatch.setattr(RaftCore, "hard_state", hard_state_without_vote)
    found = _first_violation(range(100))
    assert "election safety" in found
    assert "reproduce: python -m dlog.raft.sim --seed" in found


def test_a_vote_for_an_out_of_date_candidate_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the up-to-date check (5.4.1) a leader lacking committed entries wins."""
    from dlog.raft.log import RaftLog

    monkeypatch.setattr(RaftLog, "is_up_to_date", lambda self, index, term: True)
    found = _first_violation(range(50))
    assert "leader completeness" in found or "state machine safety" in found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_more_seeds() -> None:
    ranges = [(s, s + 250) for s in range(CI_SEEDS, CI_SEEDS + 2000, 250)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        failures = [f for _, failed in pool.map(run_range, ranges) for f in failed]
    assert not failures, "\n".join(failures)
