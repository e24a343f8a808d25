"""LatencyRecorder: numbered windows that survive restarts, and what a window reports."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.histogram import LatencyHistogram
from agent.telemetry import LatencyRecorder, ProcessStats, WindowContext, histogram_of
from edgesdk.errors import ConfigError
from edgesdk.protocol import TelemetryWindow


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _recorder(tmp_path: Path, clock: FakeClock | None = None, **kwargs) -> LatencyRecorder:
    return LatencyRecorder(tmp_path / "telemetry-state.json", clock=clock or FakeClock(),
                           probe=lambda: ProcessStats(cpu_percent=12.5, rss_mb=80.0), **kwargs)


def test_window_reports_counts_percentiles_process_stats_and_context(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    rec = _recorder(tmp_path, clock)
    for ms in range(1, 101):
        rec.record(float(ms))
    rec.record(7.0, ok=False)
    clock.now = 1060.0
    ctx = WindowContext(package_id="a" * 64, variant="onnx-int8", provider="CPUExecutionProvider")
    window = rec.roll(context=ctx, dropped_windows=3)
    assert window is not None
    assert (window.seq, window.window_start, window.window_end) == (0, 1000.0, 1060.0)
    assert (window.count, window.errors) == (101, 1)
    assert window.p50_ms == pytest.approx(50, rel=0.01) and window.p99_ms == pytest.approx(99, rel=0.01)
    assert window.max_ms == 100.0
    assert (window.variant, window.provider, window.package_id) == ("onnx-int8", "CPUExecutionProvider", "a" * 64)
    assert (window.cpu_percent, window.rss_mb, window.dropped_windows) == (12.5, 80.0, 3)


def test_next_window_starts_where_the_last_ended_and_is_empty(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    rec = _recorder(tmp_path, clock)
    rec.record(1.0)
    first = rec.roll(now=60.0)
    second = rec.roll(now=120.0)
    assert first is not None and second is not None
    assert (second.seq, second.window_start, second.window_end) == (1, 60.0, 120.0)
    assert second.count == 0 and second.p50_ms is None and second.histogram == {}


def test_seq_continues_after_restart_on_the_same_state_file(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    seqs = [rec.roll().seq for _ in range(3)]  # type: ignore[union-attr]
    restarted = _recorder(tmp_path)
    assert seqs == [0, 1, 2]
    assert restarted.roll().seq == 3  # type: ignore[union-attr]


def test_min_seq_keeps_new_windows_after_those_still_spooled(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, min_seq=41)  # state file lost, spool still holds seq 40
    assert rec.roll().seq == 41  # type: ignore[union-attr]


def test_empty_windows_are_heartbeats_unless_disabled(tmp_path: Path) -> None:
    assert _recorder(tmp_path / "a").roll() is not None
    quiet = _recorder(tmp_path / "b", emit_empty=False)
    assert quiet.roll() is None
    quiet.record(2.0)
    assert quiet.roll().seq == 0  # type: ignore[union-attr]  # the skipped window used no seq


def test_rejected_inputs_are_counted_apart_from_model_errors_and_latency(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    rec.record(5.0)
    rec.record(900.0, ok=False)
    rec.record_rejected()
    window = rec.roll()
    assert window is not None
    assert (window.count, window.errors, window.extra["rejected"]) == (2, 1, 1)
    assert window.max_ms == 5.0  # the failed call's time is not a model latency


def test_window_is_a_valid_protocol_message_whose_histogram_rebuilds_exactly(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    expected = LatencyHistogram()
    for i in range(500):
        ms = 0.05 + (i * 37 % 500) / 10.0
        rec.record(ms)
        expected.record(ms)
    window = rec.roll()
    assert window is not None
    received = TelemetryWindow.from_json(window.to_json())
    assert received == window
    assert histogram_of(received) == expected


def test_wall_clock_stepping_back_never_makes_a_window_end_before_it_starts(tmp_path: Path) -> None:
    clock = FakeClock(5000.0)
    rec = _recorder(tmp_path, clock)
    window = rec.roll(now=4000.0)  # NTP stepped the clock back
    assert window is not None and window.window_end >= window.window_start
    TelemetryWindow.from_json(window.to_json())  # still a valid message


def test_concurrent_records_are_all_counted(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for i in range(5_000):
            rec.record(1.0 + i % 10, ok=i % 100 != 0)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    window = rec.roll()
    assert window is not None and window.count == 40_000 and window.errors == 400
    hist, errors, _ = rec.snapshot()
    assert hist.count == 39_600 and errors == 400  # lifetime totals include closed windows


def test_corrupt_state_file_is_a_one_line_config_error(tmp_path: Path) -> None:
    (tmp_path / "telemetry-state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="telemetry-state.json"):
        _recorder(tmp_path)
