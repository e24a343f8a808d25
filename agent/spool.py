"""Durable, bounded spool of telemetry windows waiting for a PUBACK.

Layout: one file per window, ``{seq:020d}.json``, written with `edgesdk.atomicfile` (temp file,
fsync, rename, fsync folder), plus ``spool-state.json`` holding the persistent drop counter.

Why files and not an append-only log: at one window a minute the two fsyncs per file cost nothing,
and every operation stays a single atomic filesystem step -- ack and drop-oldest are one
``unlink``, a crash can leave only whole files (never a torn tail to detect and truncate), and
there is no compaction to write or get wrong. 10 000 small files in one folder is well within
what ext4/f2fs on an SD card handle.

Delivery is at-least-once: ``ack`` does not fsync the folder, so after a power cut an acked
window may come back and be published again; the collector de-duplicates on (device, seq).

Errors: a failing disk (full, read-only, I/O error) is a `StorageError` from `map_os_errors`; a
corrupt ``spool-state.json`` is a one-line `ConfigError`. Nothing else leaves this module, so the
daemon's telemetry loop can report and go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgesdk.atomicfile import write_bytes_atomic
from edgesdk.errors import ConfigError, map_os_errors

STATE_NAME = "spool-state.json"
_ENTRY = re.compile(r"^(\d{20})\.json$")


@dataclass(frozen=True)
class SpoolLimits:
    """Bounds of the spool; when either would be exceeded the oldest windows are dropped."""

    max_windows: int = 10_000  # ~7 days of 1-minute windows
    max_bytes: int = 64 * 1024 * 1024  # a window with a busy histogram is a few KiB

    def __post_init__(self) -> None:
        if self.max_windows < 1:
            raise ConfigError(f"spool max_windows must be at least 1, got {self.max_windows}")
        if self.max_bytes < 1:
            raise ConfigError(f"spool max_bytes must be at least 1, got {self.max_bytes}")


@dataclass(frozen=True)
class FlushResult:
    sent: int  # windows published and acked by this flush
    pending: int  # windows still spooled afterwards
    stopped: str  # "empty" | "publish-failed" | "deadline"


class TelemetrySpool:
    """Windows in seq order on disk, bounded by `SpoolLimits`; drops of the oldest are counted durably."""

    def __init__(self, directory: str | Path, limits: SpoolLimits | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dir = Path(directory)
        self._limits = limits or SpoolLimits()
        self._clock = clock
        self._lock = threading.Lock()  # guards the index and the drop counter
        self._flush_lock = threading.Lock()  # one flush at a time, so nothing is published twice
        with map_os_errors(f"open telemetry spool {self._dir}"):
            self._dir.mkdir(parents=True, exist_ok=True)
            self._dropped = self._load_dropped()
            self._sizes: dict[int, int] = {}
            for entry in os.scandir(self._dir):
                match = _ENTRY.match(entry.name)
                if match and entry.is_file(follow_symlinks=False):
                    self._sizes[int(match.group(1))] = entry.stat(follow_symlinks=False).st_size
                elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    # a temp file from a write cut short by a crash; the window it held was never appended
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        self._order = sorted(self._sizes)
        self._bytes = sum(self._sizes.values())
        # Windows already too many for (smaller) new limits are trimmed at the next append.

    # -- state ------------------------------------------------------------------------------------

    def _load_dropped(self) -> int:
        path = self._dir / STATE_NAME
        try:
            raw = path.read_bytes()  # the caller maps any other OSError
        except FileNotFoundError:
            return 0
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # bad JSON or UTF-8, a 5000-digit number, 100 000 '['
            raise ConfigError(f"{path}: spool state is not valid JSON") from None
        dropped = data.get("dropped") if isinstance(data, dict) else None
        if isinstance(dropped, bool) or not isinstance(dropped, int) or not 0 <= dropped < 2 ** 63:
            raise ConfigError(f"{path}: 'dropped' must be an integer in 0..2**63-1, got {str(dropped)[:40]!r}")
        return dropped

    def _save_dropped(self) -> None:
        path = self._dir / STATE_NAME
        with map_os_errors(f"write {path}"):
            write_bytes_atomic(path, json.dumps({"dropped": self._dropped}).encode())

    def _path(self, seq: int) -> Path:
        return self._dir / f"{seq:020d}.json"

    @property
    def dropped_count(self) -> int:
        """Windows dropped on overflow since the spool was created (survives restarts)."""
        return self._dropped

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._order)

    def newest_seq(self) -> int | None:
        with self._lock:
            return self._order[-1] if self._order else None

    def pending(self) -> list[int]:
        """Seqs waiting for an ack, oldest first."""
        with self._lock:
            return list(self._order)

    def read(self, seq: int) -> bytes | None:
        """The payload spooled as ``seq``; None if it was acked or dropped meanwhile."""
        path = self._path(seq)
        with map_os_errors(f"read {path}"):
            try:
                return path.read_bytes()
            except FileNotFoundError:  # caught before map_os_errors sees it: not a disk failure
                return None

    # -- changes ----------------------------------------------------------------------------------

    def append(self, seq: int, payload: bytes) -> bool:
        """Store a window durably; drop the oldest first if the limits require. False if ``payload``
        alone exceeds ``max_bytes`` (then it is the one dropped and counted)."""
        size = len(payload)
        with self._lock:
            if self._order and seq <= self._order[-1]:
                raise ValueError(f"spool: seq {seq} is not after the newest pending seq {self._order[-1]}")
            limits = self._limits
            if size > limits.max_bytes:
                self._dropped += 1
                self._save_dropped()
                return False
            victims: list[int] = []
            count, used = len(self._order), self._bytes
            while count and (count + 1 > limits.max_windows or used + size > limits.max_bytes):
                oldest = self._order[len(victims)]
                victims.append(oldest)
                count -= 1
                used -= self._sizes[oldest]
            if victims:
                # Count first, then delete: a crash in between over-counts by the batch rather than
                # losing windows silently.
                self._dropped += len(victims)
                self._save_dropped()
                for old in victims:
                    self._unlink(self._path(old))
                    self._bytes -= self._sizes.pop(old)
                    self._order.remove(old)
            with map_os_errors(f"write {self._path(seq)}"):
                write_bytes_atomic(self._path(seq), payload)
            self._order.append(seq)
            self._sizes[seq] = size
            self._bytes += size
            return True

    def ack(self, seq: int) -> bool:
        """Forget ``seq`` (its PUBACK arrived). False if it was not pending."""
        with self._lock:
            size = self._sizes.pop(seq, None)
            if size is None:
                return False
            self._order.remove(seq)  # almost always the first element
            self._bytes -= size
            self._unlink(self._path(seq))
            return True

    @staticmethod
    def _unlink(path: Path) -> None:
        with map_os_errors(f"remove {path}"), contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def flush(self, publish_fn: Callable[[bytes], bool], timeout_s: float) -> FlushResult:
        """Publish pending windows oldest first, acking each that ``publish_fn`` confirms (True).

        Stops at the first False to keep order, or once ``timeout_s`` has passed between windows
        (``publish_fn`` must bound its own wait, e.g. paho's wait_for_publish(timeout)). An
        exception from ``publish_fn`` propagates; that window stays pending.
        """
        deadline = self._clock() + timeout_s
        sent = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    seq = self._order[0] if self._order else None
                if seq is None:
                    return FlushResult(sent, 0, "empty")
                if self._clock() >= deadline:
                    return FlushResult(sent, len(self), "deadline")
                payload = self.read(seq)
                if payload is None:  # deleted behind our back (or dropped by a racing append)
                    self.ack(seq)
                    continue
                if not publish_fn(payload):
                    return FlushResult(sent, len(self), "publish-failed")
                if self.ack(seq):
                    sent += 1
