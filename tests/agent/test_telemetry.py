"""LatencyRecorder: numbered windows, one per model and release, that survive restarts, and what a
window reports."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edgesdk.protocol.histogram import LatencyHistogram
from agent.telemetry import LatencyRecorder, ProcessStats, WindowContext
from edgesdk.protocol.histogram import histogram_of
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


def _ctx(model: str, package: str = "a", variant: str = "onnx-int8") -> WindowContext:
    return WindowContext(package_id=package * 64, variant=variant, provider="CPUExecutionProvider", model=model)


def test_window_reports_counts_percentiles_process_stats_and_context(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    rec = _recorder(tmp_path, clock)
    ctx = _ctx("detector")
    for ms in range(1, 101):
        rec.record(float(ms), context=ctx)
    rec.record(7.0, ok=False, context=ctx)
    clock.now = 1060.0
    [window] = rec.roll(contexts=[ctx], dropped_windows=3)
    assert (window.seq, window.window_start, window.window_end) == (0, 1000.0, 1060.0)
    assert (window.count, window.errors) == (101, 1)
    assert window.p50_ms == pytest.approx(50, rel=0.01) and window.p99_ms == pytest.approx(99, rel=0.01)
    assert window.max_ms == 100.0
    assert (window.model, window.variant, window.provider, window.package_id) == (
        "detector", "onnx-int8", "CPUExecutionProvider", "a" * 64)
    assert (window.cpu_percent, window.rss_mb, window.dropped_windows) == (12.5, 80.0, 3)
    assert rec.last_window == window


def test_next_window_starts_where_the_last_ended_and_is_empty(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    rec = _recorder(tmp_path, clock)
    rec.record(1.0)
    [first] = rec.roll(now=60.0)
    [second] = rec.roll(now=120.0)
    assert first.count == 1
    assert (second.seq, second.window_start, second.window_end) == (1, 60.0, 120.0)
    assert second.count == 0 and second.p50_ms is None and second.histogram == {}


def test_seq_continues_after_restart_on_the_same_state_file(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    seqs = [rec.roll()[0].seq for _ in range(3)]
    restarted = _recorder(tmp_path)
    assert seqs == [0, 1, 2]
    assert restarted.roll()[0].seq == 3


def test_min_seq_keeps_new_windows_after_those_still_spooled(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, min_seq=41)  # state file lost, spool still holds seq 40
    assert rec.roll()[0].seq == 41


def test_empty_windows_are_heartbeats_unless_disabled(tmp_path: Path) -> None:
    [heartbeat] = _recorder(tmp_path / "a").roll()
    assert heartbeat.model is None and heartbeat.count == 0  # no model active: one device heartbeat
    quiet = _recorder(tmp_path / "b", emit_empty=False)
    assert quiet.roll(contexts=[_ctx("detector")]) == []
    quiet.record(2.0)
    assert quiet.roll()[0].seq == 0  # the skipped window used no seq


def test_rejected_inputs_are_counted_apart_from_model_errors_and_latency(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    rec.record(5.0)
    rec.record(900.0, ok=False)
    rec.record_rejected()
    [window] = rec.roll()
    assert (window.count, window.errors, window.extra["rejected"]) == (2, 1, 1)
    assert window.max_ms == 5.0  # the failed call's time is not a model latency


def test_window_is_a_valid_protocol_message_whose_histogram_rebuilds_exactly(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    expected = LatencyHistogram()
    for i in range(500):
        ms = 0.05 + (i * 37 % 500) / 10.0
        rec.record(ms)
        expected.record(ms)
    [window] = rec.roll()
    received = TelemetryWindow.from_json(window.to_json())
    assert received == window
    assert histogram_of(received) == expected


def test_wall_clock_stepping_back_never_makes_a_window_end_before_it_starts(tmp_path: Path) -> None:
    clock = FakeClock(5000.0)
    rec = _recorder(tmp_path, clock)
    [window] = rec.roll(now=4000.0)  # NTP stepped the clock back
    assert window.window_end >= window.window_start
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
    [window] = rec.roll()
    assert window.count == 40_000 and window.errors == 400
    hist, errors, _ = rec.snapshot()
    assert hist.count == 39_600 and errors == 400  # lifetime totals include closed windows


# -- several models -------------------------------------------------------------------------------

def test_each_model_gets_its_own_window_with_its_own_counts_and_consecutive_seqs(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    fast, slow = _ctx("fast", "a"), _ctx("slow", "b")
    for ms in range(1, 101):
        rec.record(ms / 100, context=fast)  # 0.01 .. 1 ms
        rec.record(float(ms * 10), context=slow)  # 10 .. 1000 ms
    rec.record(3.0, ok=False, context=slow)
    rec.record_rejected(fast)
    windows = rec.roll(contexts=[slow, fast])
    assert [(w.seq, w.model, w.package_id) for w in windows] == [(0, "fast", "a" * 64), (1, "slow", "b" * 64)]
    one, other = windows
    assert (one.count, one.errors, one.extra["rejected"]) == (100, 0, 1)
    assert (other.count, other.errors, other.extra["rejected"]) == (101, 1, 0)
    assert one.p99_ms == pytest.approx(0.99, rel=0.01) and one.max_ms == 1.0
    assert other.p50_ms == pytest.approx(500, rel=0.01) and other.max_ms == 1000.0
    assert rec.models() == ["fast", "slow"]
    assert rec.snapshot("fast")[0].count == 100 and rec.snapshot("slow")[1:] == (1, 0)
    assert rec.snapshot()[0].count == 200  # every model together
    assert [w.seq for w in rec.roll(contexts=[slow, fast])] == [2, 3]  # the device's seq, across models


def test_swap_mid_window_gives_one_window_per_release(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    v1, v2 = _ctx("detector", "1", "onnx-fp32"), _ctx("detector", "2", "onnx-int8")
    for _ in range(5):
        rec.record(40.0, context=v1)
    for _ in range(3):  # the swap: later requests run on v2
        rec.record(10.0, context=v2)
    windows = {w.package_id: w for w in rec.roll(contexts=[v2])}
    assert set(windows) == {"1" * 64, "2" * 64}
    assert (windows["1" * 64].count, windows["1" * 64].max_ms, windows["1" * 64].variant) == (5, 40.0, "onnx-fp32")
    assert (windows["2" * 64].count, windows["2" * 64].max_ms, windows["2" * 64].variant) == (3, 10.0, "onnx-int8")
    assert sorted(w.seq for w in windows.values()) == [0, 1]
    assert {w.model for w in windows.values()} == {"detector"}
    assert rec.snapshot("detector")[0].count == 8  # the model's lifetime spans both releases
    [after] = rec.roll(contexts=[v2])  # v1 is gone: no more windows for it
    assert (after.package_id, after.count) == ("2" * 64, 0)


def test_every_active_model_sends_a_heartbeat_and_a_busy_one_only_its_window(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    busy, idle = _ctx("busy", "a"), _ctx("idle", "b")
    rec.record(2.0, context=busy)
    windows = rec.roll(contexts=[busy, idle])
    assert [(w.model, w.count) for w in windows] == [("busy", 1), ("idle", 0)]
    windows = rec.roll(contexts=[busy, idle])
    assert [(w.model, w.count, w.p50_ms) for w in windows] == [("busy", 0, None), ("idle", 0, None)]
    assert [w.seq for w in windows] == [2, 3]
    assert all(w.model is not None for w in rec.roll(contexts=[idle]))  # no device heartbeat beside it


def test_corrupt_state_file_is_a_one_line_config_error(tmp_path: Path) -> None:
    (tmp_path / "telemetry-state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="telemetry-state.json"):
        _recorder(tmp_path)
