"""Interleaved timing: a change of load during the measurement must not decide the ranking."""

import numpy as np
import pytest

from edgesdk.benchmark import time_interleaved


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """Each call costs ``cost_s`` plus the current load, on the shared fake clock."""

    def __init__(self, clock: FakeClock, cost_s: float, load) -> None:
        self.clock, self.cost_s, self.load = clock, cost_s, load
        self.calls = 0

    def run(self, feeds):
        self.calls += 1
        self.clock.now += self.cost_s + self.load(self.clock.now)
        return {}


def test_a_load_spike_during_measurement_does_not_pick_the_slower_candidate():
    clock = FakeClock()
    # The machine is busy for the first 1.5 s (every call costs 5 ms more), then quiet. Timed one
    # after the other, the fast candidate would take the whole spike and lose.
    load = lambda t: 0.005 if t < 1.5 else 0.0  # noqa: E731
    fast = FakeSession(clock, 0.010, load)  # really faster
    slow = FakeSession(clock, 0.011, load)

    stats = time_interleaved([fast, slow], {}, warmup=1, block=5, max_runs=200, clock=clock)

    assert stats[0].p50_ms < stats[1].p50_ms
    assert stats[0].runs == stats[1].runs == 200


def test_timing_one_after_the_other_is_fooled_by_the_same_spike():
    """The control for the test above: sequential timing ranks the two the wrong way round."""
    from edgesdk.benchmark import time_session

    clock = FakeClock()
    load = lambda t: 0.005 if t < 1.5 else 0.0  # noqa: E731
    fast, slow = FakeSession(clock, 0.010, load), FakeSession(clock, 0.011, load)

    first = time_session(fast, {}, warmup=1, runs=200, clock=clock)
    second = time_session(slow, {}, warmup=1, runs=200, clock=clock)

    assert first.p50_ms > second.p50_ms


def test_budget_stops_after_at_least_one_full_round():
    clock = FakeClock()
    sessions = [FakeSession(clock, 0.1, lambda t: 0.0) for _ in range(3)]

    stats = time_interleaved(sessions, {}, warmup=0, block=2, max_runs=1000, budget_s=0.05, clock=clock)

    assert all(s.runs == 2 for s in stats)


def test_rejects_nonsense_arguments():
    from edgesdk.errors import ConfigError

    with pytest.raises(ConfigError):
        time_interleaved([FakeSession(FakeClock(), 0.1, lambda t: 0.0)], {}, block=0)
