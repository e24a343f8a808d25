"""The device's other active models, run back to back while a new model's candidates are timed.

A variant that is fastest alone can lose once another model shares the cores or the accelerator
with it (both fight for the same threads, caches and memory bandwidth). Selection therefore
times the candidates twice: alone, and with `NeighbourLoad` running every other active model
on its own reference input in a background thread, and ranks them by the second timing. The
load is the worst case (the neighbours never idle), which is what a latency budget must hold
under. The neighbours run on their sessions directly, not through `ModelHost.infer`: these calls
are the agent's, not an application's, and are not counted in telemetry. A neighbour that
raises is counted and left out; nothing it raises reaches the selection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("edge-agent")


@dataclass(frozen=True)
class Neighbour:
    """One other active model: its name, its open session and an input it runs on."""

    name: str
    session: Any
    feeds: Mapping[str, np.ndarray]


class NeighbourLoad:
    """``with NeighbourLoad(neighbours):`` runs them round robin in one thread until the block ends."""

    def __init__(self, neighbours: Sequence[Neighbour]) -> None:
        self.neighbours = list(neighbours)
        self.runs: dict[str, int] = {n.name: 0 for n in self.neighbours}
        self.failures: dict[str, str] = {}
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> NeighbourLoad:
        if self.neighbours:
            self._thread = threading.Thread(target=self._run, name="edge-agent-neighbours", daemon=True)
            self._thread.start()
            self._started.wait(5.0)  # the first neighbour call has begun before any timing does
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        live = list(self.neighbours)
        while live and not self._stop.is_set():
            for neighbour in list(live):
                self._started.set()
                try:
                    neighbour.session.run(neighbour.feeds)
                    self.runs[neighbour.name] += 1
                except Exception as exc:  # noqa: BLE001 - a neighbour failing must not end the selection
                    self.failures[neighbour.name] = f"{type(exc).__name__}: {exc}"[:200]
                    log.warning("neighbour %s failed during selection: %s", neighbour.name, self.failures[neighbour.name])
                    live.remove(neighbour)
                if self._stop.is_set():
                    break
        self._started.set()
