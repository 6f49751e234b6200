"""bench/_relay.py, the latency baseline bench/produce.py runs: every message is answered."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _relay import STACKS, cpu_probe, relay_latencies  # noqa: E402


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_relay_answers_every_message_after_the_warmup(stack: str) -> None:
    samples = relay_latencies(stack, rate=1000, seconds=0.5)
    assert len(samples) == 500 - 200
    assert all(ms > 0 for ms in samples)


def test_cpu_probe_reports_its_figures() -> None:
    figures = cpu_probe(0.2)
    assert set(figures) == {"p50_us", "p99_us", "slow_pct", "longest_slow_ms"}
    assert 0 < figures["p50_us"] <= figures["p99_us"]
    assert 0 <= figures["slow_pct"] <= 100
    assert figures["longest_slow_ms"] >= 0


def test_python_build_names_the_running_interpreter() -> None:
    from _harness import python_build

    assert python_build().startswith(sys.version.split()[0] + " ")
