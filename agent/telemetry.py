"""Per-window latency telemetry: record every inference, roll a closed window once a period.

`LatencyRecorder.record` runs on every inference, so it is a lock, a dict lookup and one
histogram update (~1-2 µs on a slow core); when the summary budget allows (checked under the lock,
+0.2 µs), the call's outputs are summarized outside the lock and merged under it. `roll` closes the windows: it swaps them out under the
lock, then computes percentiles, probes the process and persists the next sequence number
outside it. A device with several models sends one window per model (and release) per period.

Semantics of a window (what a fleet collector reads):
- ``count`` = requests that reached the model (ok + errors); ``errors`` = the runtime raised;
  ``rejected`` = refused before the model ran (bad input names/dtypes/shapes), kept apart so a
  client sending bad input cannot make a good model look broken.
- latency percentiles and the histogram cover successful inferences only.
- ``seq`` increases by one per emitted window, whatever its model, and survives restarts (small
  state file); ``model`` names the model the window is about (None: a device heartbeat).
- ``dropped_windows`` is the spool's running total of windows dropped on overflow (a counter:
  the collector takes differences, and a lost window cannot hide earlier drops).
- ``histogram`` is `LatencyHistogram.to_bounds` (upper bound in ms as text -> count); ``extra``
  carries what makes it exactly mergeable and re-buildable: ``histogram_scheme`` ("log1.01/1"),
  ``histogram_sum_ns``, ``min_ms``, plus ``rejected`` and ``mean_ms``
  (`edgesdk.protocol.histogram.histogram_of` rebuilds the histogram from a received window).
- ``extra["outputs"]`` (only when some call's outputs were summarized): per output name, what the
  model answered (`edgesdk.protocol.outputs`, the format's one owner). Summarizing is budgeted:
  the first ALWAYS_SUMMARIZED calls of a window always, later ones only while the time spent
  summarizing in the window is at most SUMMARY_BUDGET of the inference time recorded in it, so a
  tiny model whose outputs cost as much to summarize as to compute is slowed by ~2% on average.

The window is `edgesdk.protocol.TelemetryWindow`, the message published as is.

Errors: the seq state file is read and written inside `map_os_errors` (a full disk is a
`StorageError`); a corrupt one is a one-line `ConfigError`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgesdk.atomicfile import write_bytes_atomic
from edgesdk.errors import ConfigError, map_os_errors
from edgesdk.protocol import TelemetryWindow
from edgesdk.protocol.histogram import SCHEME, LatencyHistogram
from edgesdk.protocol.outputs import MAX_OUTPUTS_PER_MODEL, OutputSummary, summarize_outputs, window_outputs

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Output summaries: always the first calls of a window (a quiet window still says what the model
# answered), then only while summarizing has cost at most 2% of the window's inference time.
ALWAYS_SUMMARIZED = 32
SUMMARY_BUDGET = 0.02


@dataclass(frozen=True)
class ProcessStats:
    cpu_percent: float | None  # since the previous probe, 100 = one core busy
    rss_mb: float | None


def psutil_probe() -> Callable[[], ProcessStats]:
    """A probe of this process via psutil; returns Nones when psutil is not installed."""
    try:
        import psutil
    except ImportError:  # the agent extra installs psutil; a bare core install still runs
        return lambda: ProcessStats(None, None)
    proc = psutil.Process()
    proc.cpu_percent(None)  # first call primes the counter and returns 0.0

    def probe() -> ProcessStats:
        with proc.oneshot():
            return ProcessStats(proc.cpu_percent(None), proc.memory_info().rss / (1024 * 1024))

    return probe


@dataclass(frozen=True)
class WindowContext:
    """What a window's numbers were measured on: one model name at one package, variant and
    provider. Each context has a window of its own, so a swap mid-window (v1 -> v2, or a new
    selection) never mixes two releases' latencies in one window."""

    package_id: str | None = None
    variant: str | None = None
    provider: str | None = None
    model: str | None = None


class _Open:
    """One context's open window (or its lifetime totals, which keep no output summaries)."""

    __slots__ = ("hist", "errors", "rejected", "outputs", "summarized", "summary_ms")

    def __init__(self) -> None:
        self.hist = LatencyHistogram()
        self.errors = 0
        self.rejected = 0
        self.outputs: dict[str, OutputSummary] = {}
        self.summarized = 0  # calls whose outputs were summarized
        self.summary_ms = 0.0  # time spent summarizing them

    def merge(self, other: _Open) -> None:
        self.hist.merge(other.hist)
        self.errors += other.errors
        self.rejected += other.rejected

    def summary_due(self, latency_ms: float) -> bool:
        """Whether the budget allows summarizing one more call that took ``latency_ms``."""
        if self.summarized < ALWAYS_SUMMARIZED:
            return True
        return self.summary_ms <= SUMMARY_BUDGET * (self.hist.sum_ns / 1e6 + latency_ms)

    def add_outputs(self, summaries: dict[str, OutputSummary], spent_ms: float) -> None:
        """Merge one call's summaries (taking ownership of them); at most MAX_OUTPUTS_PER_MODEL names."""
        self.summarized += 1
        self.summary_ms += spent_ms
        for name, summary in summaries.items():
            have = self.outputs.get(name)
            if have is not None:
                have.merge(summary)
            elif len(self.outputs) < MAX_OUTPUTS_PER_MODEL:
                self.outputs[name] = summary

    @property
    def empty(self) -> bool:
        return self.hist.count == 0 and self.errors == 0 and self.rejected == 0


NO_CONTEXT = WindowContext()


class LatencyRecorder:
    """Thread-safe latency recorder that rolls numbered windows, one per context (model and
    release) that saw requests or is active; ``seq`` is the device's, persists in ``state_path``
    and grows by one per window whatever its model.

    ``clock`` is the wall clock for window bounds; ``probe`` reads process CPU/RSS (inject a
    constant one in tests); ``emit_empty`` makes an active model's window with no requests a
    heartbeat (and, with no model active, one device heartbeat) instead of nothing.
    ``min_seq`` lets the daemon keep seq above windows still pending in the spool if the state file
    was lost. ``timer`` (seconds, monotonic) times the summarizing of outputs against its budget.
    """

    def __init__(self, state_path: str | Path, *, clock: Callable[[], float] = time.time,
                 probe: Callable[[], ProcessStats] | None = None, emit_empty: bool = True,
                 min_seq: int = 0, timer: Callable[[], float] = time.perf_counter) -> None:
        self._state_path = Path(state_path)
        with map_os_errors(f"create {self._state_path.parent}"):
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._timer = timer
        self._summary_failed = False  # log a failing summary once, then at debug level
        self._probe = probe if probe is not None else psutil_probe()
        self._emit_empty = emit_empty
        self._lock = threading.Lock()  # guards the open windows; held for one histogram update
        self._roll_lock = threading.Lock()  # serialises roll() so seq is persisted in order
        self._open: dict[WindowContext, _Open] = {}
        self._lifetime: dict[str | None, _Open] = {}  # closed windows merged per model name
        self._next_seq = max(self._load_seq(), min_seq)
        self._window_start = clock()
        self._last: TelemetryWindow | None = None

    def _load_seq(self) -> int:
        with map_os_errors(f"read {self._state_path}"):
            try:
                raw = self._state_path.read_bytes()
            except FileNotFoundError:  # caught before map_os_errors sees it: a first start
                return 0
        try:
            data = json.loads(raw)
            seq = data["next_seq"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            raise ConfigError(f"{self._state_path}: telemetry state is not valid JSON with 'next_seq'") from None
        # Spool files are named by a 20-digit seq, so anything from 2**63 on is corrupt too.
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2 ** 63:
            raise ConfigError(f"{self._state_path}: 'next_seq' must be an integer in 0..2**63-1, "
                              f"got {str(seq)[:40]!r}")
        return seq

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_window(self) -> TelemetryWindow | None:
        """The most recently closed window (for /metrics), None before the first roll."""
        return self._last

    def _window(self, context: WindowContext | None) -> _Open:
        key = context or NO_CONTEXT
        window = self._open.get(key)
        if window is None:
            window = self._open[key] = _Open()
        return window

    def record(self, latency_ms: float, ok: bool = True, context: WindowContext | None = None,
               outputs: Mapping[str, Any] | None = None) -> None:
        """Count one inference on ``context``'s model; the latency of a failed one is not a model
        latency and is not kept. ``outputs`` (of a successful call) are summarized into the window
        when the summary budget allows, outside the lock."""
        if not ok:
            with self._lock:
                self._window(context).errors += 1
            return
        if outputs is not None:
            with self._lock:
                window = self._window(context)
                if not window.summary_due(latency_ms):  # the common case: one lock, as without outputs
                    window.hist.record(latency_ms)
                    return
            summaries, spent_ms = self._summarize(context, outputs)
            with self._lock:  # the current window: a roll meanwhile moves latency and summary together
                window = self._window(context)
                window.hist.record(latency_ms)
                window.add_outputs(summaries, spent_ms)
            return
        with self._lock:
            self._window(context).hist.record(latency_ms)

    def _summarize(self, context: WindowContext | None,
                   outputs: Mapping[str, Any]) -> tuple[dict[str, OutputSummary], float]:
        """One call's output summaries and the ms they took; none if summarizing failed (its time
        still counts against the budget, so a failing summary is not retried on every call)."""
        start = self._timer()
        try:
            summaries = summarize_outputs(outputs)
        except Exception:  # telemetry must never fail the inference it describes (e.g. MemoryError)
            log.log(logging.DEBUG if self._summary_failed else logging.WARNING,
                    "could not summarize the outputs of model %s", (context or NO_CONTEXT).model, exc_info=True)
            self._summary_failed = True
            summaries = {}
        return summaries, (self._timer() - start) * 1000.0

    def record_rejected(self, context: WindowContext | None = None) -> None:
        """Count one request refused before it reached the model (bad input)."""
        with self._lock:
            self._window(context).rejected += 1

    def models(self) -> list[str]:
        """The model names with requests counted since start (for /metrics)."""
        with self._lock:
            names = {ctx.model for ctx in self._open} | set(self._lifetime)
        return sorted(n for n in names if n is not None)

    def snapshot(self, model: str | None = None) -> tuple[LatencyHistogram, int, int]:
        """Since start: (latency histogram, errors, rejected), open windows included (for
        /metrics); of model ``model``, or of every model when None."""
        total = _Open()
        with self._lock:
            for name, done in self._lifetime.items():
                if model is None or name == model:
                    total.merge(done)
            for ctx, window in self._open.items():
                if model is None or ctx.model == model:
                    total.merge(window)
        return total.hist, total.errors, total.rejected

    def roll(self, now: float | None = None, contexts: Iterable[WindowContext] = (),
             dropped_windows: int = 0) -> list[TelemetryWindow]:
        """Close the open windows at ``now`` (default: the clock) and start the next ones.

        One window per context that saw requests, plus (``emit_empty``) a heartbeat for each
        context in ``contexts`` (the active models) that saw none, or one device heartbeat when
        nothing is active. Windows are ordered by model name; each takes the next seq.
        """
        with self._roll_lock:
            return self._roll(self._clock() if now is None else now, list(contexts), dropped_windows)

    def _roll(self, end: float, active: list[WindowContext], dropped_windows: int) -> list[TelemetryWindow]:
        with self._lock:
            closed, self._open = self._open, {}
            for ctx, window in closed.items():
                self._lifetime.setdefault(ctx.model, _Open()).merge(window)
            start, self._window_start = self._window_start, end
            windows = {ctx: w for ctx, w in closed.items() if not w.empty}
            if self._emit_empty:
                for ctx in active or ([] if windows else [NO_CONTEXT]):
                    windows.setdefault(ctx, _Open())
            ordered = sorted(windows.items(), key=lambda item: (item[0].model or "", item[0].package_id or ""))
            first = self._next_seq
            self._next_seq = first + len(ordered)
        if not ordered:
            return []
        # Persist before the windows leave this object: a crash after one is published must not
        # reuse its seq. One small fsynced write per roll (once a minute) costs nothing. On a
        # failing disk the windows are lost (StorageError) but their seqs stay used, so none repeats.
        with map_os_errors(f"write {self._state_path}"):
            write_bytes_atomic(self._state_path,
                               json.dumps({"version": STATE_VERSION, "next_seq": first + len(ordered)}).encode())
        stats = self._probe()
        out = []
        for seq, (ctx, window) in enumerate(ordered, start=first):
            hist = window.hist
            out.append(TelemetryWindow(
                seq=seq, window_start=start, window_end=max(end, start),  # a wall clock stepped back
                count=hist.count + window.errors, errors=window.errors,
                p50_ms=hist.percentile(50), p95_ms=hist.percentile(95), p99_ms=hist.percentile(99),
                max_ms=hist.max, histogram=hist.to_bounds(),
                variant=ctx.variant, provider=ctx.provider, package_id=ctx.package_id, model=ctx.model,
                cpu_percent=stats.cpu_percent, rss_mb=stats.rss_mb, dropped_windows=dropped_windows,
                extra=_extra(window)))
        self._last = out[-1]
        return out


def _extra(window: _Open) -> dict[str, Any]:
    hist = window.hist
    extra: dict[str, Any] = {"rejected": window.rejected, "mean_ms": hist.mean, "min_ms": hist.min,
                             "histogram_scheme": SCHEME, "histogram_sum_ns": hist.sum_ns}
    if window.outputs:
        extra["outputs"] = window_outputs(window.outputs)
    return extra
