"""TelemetrySpool: ordered, durable, bounded (dropping the oldest, counted), flushed in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.spool import SpoolLimits, TelemetrySpool
from edgesdk.errors import ConfigError


def _payload(seq: int, size: int = 0) -> bytes:
    body = f'{{"seq":{seq}}}'.encode()
    return body + b" " * max(0, size - len(body))


def _fill(spool: TelemetrySpool, seqs: range) -> None:
    for seq in seqs:
        spool.append(seq, _payload(seq))


class Broker:
    """publish_fn stand-in: acknowledges until told to fail, records what it accepted."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.accepted: list[bytes] = []
        self.fail_after = fail_after

    def __call__(self, payload: bytes) -> bool:
        if self.fail_after is not None and len(self.accepted) >= self.fail_after:
            return False
        self.accepted.append(payload)
        return True


def test_pending_windows_are_in_seq_order_and_survive_a_restart(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path)
    for seq in (3, 9, 10, 1000):
        spool.append(seq, _payload(seq))
    reopened = TelemetrySpool(tmp_path)
    assert reopened.pending() == [3, 9, 10, 1000]
    assert reopened.read(10) == _payload(10)
    assert reopened.newest_seq() == 1000


def test_full_spool_drops_the_oldest_and_the_drop_count_survives_restart(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path, SpoolLimits(max_windows=3))
    _fill(spool, range(5))
    assert spool.pending() == [2, 3, 4]
    assert spool.dropped_count == 2
    reopened = TelemetrySpool(tmp_path, SpoolLimits(max_windows=3))
    assert reopened.dropped_count == 2
    reopened.append(5, _payload(5))
    assert reopened.pending() == [3, 4, 5] and reopened.dropped_count == 3


def test_byte_limit_drops_as_many_old_windows_as_needed(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path, SpoolLimits(max_bytes=1000))
    for seq in range(4):
        spool.append(seq, _payload(seq, 300))
    assert spool.pending() == [1, 2, 3] and spool.bytes_used == 900
    spool.append(4, _payload(4, 700))
    assert spool.pending() == [3, 4] and spool.bytes_used == 1000
    assert spool.dropped_count == 3


def test_window_larger_than_the_whole_spool_is_dropped_and_counted(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path, SpoolLimits(max_bytes=100))
    spool.append(0, _payload(0))
    assert spool.append(1, _payload(1, 101)) is False
    assert spool.pending() == [0] and spool.dropped_count == 1


def test_flush_publishes_in_order_stops_at_first_failure_and_resumes(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path)
    _fill(spool, range(5))
    broker = Broker(fail_after=2)
    first = spool.flush(broker, timeout_s=10)
    assert (first.sent, first.pending, first.stopped) == (2, 3, "publish-failed")
    assert spool.pending() == [2, 3, 4]  # nothing after the failure was skipped ahead
    broker.fail_after = None  # reconnected
    second = spool.flush(broker, timeout_s=10)
    assert (second.sent, second.pending, second.stopped) == (3, 0, "empty")
    assert broker.accepted == [_payload(s) for s in range(5)]
    assert not list(tmp_path.glob("0*.json"))  # acked windows are gone from disk


def test_flush_stops_at_its_deadline_between_windows(tmp_path: Path) -> None:
    now = [0.0]
    spool = TelemetrySpool(tmp_path, clock=lambda: now[0])
    _fill(spool, range(5))

    def slow_publish(payload: bytes) -> bool:
        now[0] += 1.0  # each PUBACK takes a second
        return True

    result = spool.flush(slow_publish, timeout_s=2.5)
    assert (result.sent, result.stopped) == (3, "deadline")
    assert spool.pending() == [3, 4]


def test_exception_from_publish_keeps_the_window_pending(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path)
    _fill(spool, range(2))

    def broken(payload: bytes) -> bool:
        raise ConnectionError("socket closed")

    with pytest.raises(ConnectionError):
        spool.flush(broken, timeout_s=1)
    assert spool.pending() == [0, 1]


def test_ack_removes_the_window_from_disk(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path)
    _fill(spool, range(2))
    assert spool.ack(0) is True and spool.ack(0) is False
    assert TelemetrySpool(tmp_path).pending() == [1]


def test_refuses_a_seq_not_after_the_newest_pending(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path)
    spool.append(7, _payload(7))
    with pytest.raises(ValueError, match="not after"):
        spool.append(7, _payload(7))


def test_temp_file_left_by_a_crash_mid_write_is_cleaned_and_not_pending(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path)
    spool.append(1, _payload(1))
    torn = tmp_path / ".00000000000000000002.json.abc123.tmp"
    torn.write_bytes(b'{"seq":2')  # what a power cut during append leaves
    reopened = TelemetrySpool(tmp_path)
    assert reopened.pending() == [1] and not torn.exists()


def test_window_deleted_behind_the_spools_back_is_skipped_by_flush(tmp_path: Path) -> None:
    spool = TelemetrySpool(tmp_path)
    _fill(spool, range(3))
    (tmp_path / f"{1:020d}.json").unlink()
    broker = Broker()
    assert spool.flush(broker, timeout_s=1).sent == 2
    assert broker.accepted == [_payload(0), _payload(2)]


@pytest.mark.parametrize("limits", [dict(max_windows=0), dict(max_bytes=0)])
def test_limits_must_be_positive(limits: dict) -> None:
    with pytest.raises(ConfigError):
        SpoolLimits(**limits)
