"""Clocks for the simulator: the wall clock, or simulated time running ``speed`` times faster.

Simulated time is what devices write into their messages (window start/end, event times) and
check statements' validity windows against; the loop converts simulated delays (telemetry interval,
install steps) into real ones with `real_seconds`. Broker keepalive, reconnect backoff and the
connect rate stay in real time: the broker does not run faster.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Unix time as the simulated devices see it."""

    def real_seconds(self, sim_seconds: float) -> float:
        """How long ``sim_seconds`` of simulated time take in real time."""


class WallClock:
    """Simulated time is real time."""

    def time(self) -> float:
        return time.time()

    def real_seconds(self, sim_seconds: float) -> float:
        return sim_seconds


class ScaledClock:
    """Simulated time starts at ``start`` (default: now) and runs ``speed`` times faster than real
    time, e.g. ``speed=60``: a 60 s telemetry interval passes every real second."""

    def __init__(self, speed: float, start: float | None = None) -> None:
        if not speed > 0:
            raise ValueError(f"clock speed must be > 0, got {speed!r}")
        self.speed = float(speed)
        self._start = time.time() if start is None else float(start)
        self._t0 = time.monotonic()

    def time(self) -> float:
        return self._start + (time.monotonic() - self._t0) * self.speed

    def real_seconds(self, sim_seconds: float) -> float:
        return sim_seconds / self.speed
