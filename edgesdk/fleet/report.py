"""The telemetry report (DESIGN §8 "Review"): what `edgesdk telemetry report` prints and plots,
built from the fleet store in one place so the table, JSON, CSV and HTML forms agree.

    groups            merged p50/p95/p99, calls and errors per group (``by``), from the store
    device latency    each device's p95 per release, against the other devices running the same
                      release on the same hardware class (leave-one-out, merged histograms)
    outliers          devices whose p95 is more than ``factor`` x that of their peers, each side
                      with at least ``min_calls`` calls
    offline/unknown   devices that are not online now (their Will, or silent past three windows)
    install failures  failed / rolled back / refused install events in the time range

An outlier is compared with its peers *without itself*: in a group of three, one slow device is a
third of the samples and would drag the group's p95 up to its own.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from edgesdk.errors import ConfigError
from edgesdk.fleet.records import NO_VALUE, DeviceRecord, EventRecord, GroupStats
from edgesdk.protocol.histogram import OVERFLOW, LatencyHistogram, bucket_range
from edgesdk.protocol.statements import compare_versions

if TYPE_CHECKING:
    from edgesdk.fleet.store import FleetStore

DEFAULT_SINCE = "24h"
DEFAULT_FACTOR = 2.0  # a device twice as slow as its peers at p95 is worth a look
DEFAULT_MIN_CALLS = 50  # below this a p95 is a handful of samples: no verdict
FAILURE_KINDS = ("failed", "rolled_back", "refused")
MAX_FAILURES = 1000  # the latest ones; a fleet failing more than this has one story to tell
MAX_TIMELINE_EVENTS = 5000
SERIES_POINTS = 120  # about this many points per line in the latency-over-time plot
ROLLUP_S = 300  # the store's rollup bucket (store_schema.ROLLUP_BUCKET_S): the finest time step

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float, option: str = "--since") -> float:
    """Unix time from ``30m``/``1h``/``2d``/``1w`` (that long before ``now``) or an ISO 8601 date
    or time (``2024-05-01``, ``2024-05-01T12:00``; UTC unless it names an offset)."""
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: use a duration like 30m, 1h, 2d, 1w or an ISO date like "
                          "2024-05-01 or 2024-05-01T12:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def parse_select(items: Iterable[str], option: str = "--select") -> dict[str, str]:
    """``k=v`` items as a dict (one per key); ConfigError names a malformed one."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: use key=value, e.g. {option} site=berlin")
        key = key.strip()
        if key in out and out[key] != value:
            raise ConfigError(f"{option}: {key} given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


# -- what the report holds -------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceLatency:
    """One device's telemetry for one release, and how it compares with its peers."""

    fleet: str
    device_id: str
    release: str
    hardware_class: str | None
    count: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    peers: int  # other devices on the same release and hardware class
    peers_count: int  # their calls
    peers_p95_ms: float | None  # their merged p95 (None: no peers, or no latencies)

    @property
    def ratio(self) -> float | None:
        if self.p95_ms is None or not self.peers_p95_ms:
            return None
        return self.p95_ms / self.peers_p95_ms

    @property
    def peer_group(self) -> str:
        return f"{self.release} on {self.hardware_class or NO_VALUE}"

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device_id, "fleet": self.fleet, "release": self.release,
                "hardware_class": self.hardware_class, "count": self.count, "errors": self.errors,
                "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms, "peers": self.peers,
                "peers_count": self.peers_count, "peers_p95_ms": self.peers_p95_ms, "ratio": self.ratio}


@dataclass(frozen=True)
class ReleaseHistogram:
    """A release's merged latency histogram (the old-vs-new overlay)."""

    release: str
    histogram: LatencyHistogram


@dataclass(frozen=True)
class PlotData:
    """What only the HTML page needs."""

    series: dict[str, list[tuple[float, GroupStats]]]  # per release: (bucket start, stats)
    series_step_s: int
    compared: dict[str, tuple[ReleaseHistogram, ...]]  # model name -> its two latest releases, old first
    timeline: tuple[EventRecord, ...]
    rollout_marks: tuple[RolloutMark, ...] = ()


@dataclass(frozen=True)
class RolloutMark:
    """A moment of a staged rollout on the latency-over-time plot: a wave sent, a halt, the end."""

    at: float
    kind: str  # wave | completed | halted
    text: str  # one line (rollout id, release, what happened)


@dataclass(frozen=True)
class Report:
    fleet: str | None
    since: float
    until: float
    by: str
    select: dict[str, str]
    generated_at: float
    factor: float
    min_calls: int
    groups: tuple[GroupStats, ...]
    device_latency: tuple[DeviceLatency, ...]
    offline: tuple[DeviceRecord, ...]
    unknown: tuple[DeviceRecord, ...]
    install_failures: tuple[EventRecord, ...]
    plots: PlotData | None = None

    @property
    def outliers(self) -> tuple[DeviceLatency, ...]:
        """Devices slower than ``factor`` x their peers at p95, slowest first."""
        found = [d for d in self.device_latency if is_outlier(d, self.factor, self.min_calls)]
        return tuple(sorted(found, key=lambda d: -(d.ratio or 0.0)))

    def to_json(self) -> dict[str, Any]:
        """`telemetry report --format json` (docs/cli-json.md)."""
        return {
            "fleet": self.fleet, "since": self.since, "until": self.until, "by": self.by,
            "select": dict(self.select), "generated_at": self.generated_at,
            "outlier_rule": {"factor": self.factor, "min_calls": self.min_calls},
            "groups": [g.to_json() for g in self.groups],
            "outliers": [d.to_json() for d in self.outliers],
            "devices": {"offline": [d.to_json() for d in self.offline],
                        "unknown": [d.to_json() for d in self.unknown]},
            "install_failures": [failure_json(e) for e in self.install_failures],
        }

    def to_csv(self) -> str:
        """The groups table as CSV (first column named after ``by``; empty cell: not known)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([self.by, "count", "errors", "error_rate", "p50_ms", "p95_ms", "p99_ms", "devices",
                         "windows"])
        for g in self.groups:
            writer.writerow([g.key, g.count, g.errors, *("" if v is None else repr(v) for v in
                             (g.error_rate, g.p50_ms, g.p95_ms, g.p99_ms)), g.devices, g.windows])
        return buffer.getvalue()


def is_outlier(d: DeviceLatency, factor: float, min_calls: int) -> bool:
    ratio = d.ratio
    return (ratio is not None and ratio > factor and d.count - d.errors >= min_calls
            and d.peers_count >= min_calls)


def failure_json(e: EventRecord) -> dict[str, Any]:
    return {"at": e.at, "fleet": e.fleet, "device": e.device_id, "kind": e.kind, "model": e.model,
            "release": e.release, "package_id": e.package_id, "reason": e.reason, "rollout_id": e.rollout_id}


# -- building it from the store ----------------------------------------------------------------------
def build_report(store: FleetStore, *, fleet: str | None = None, since: float, until: float, by: str = "release",
                 select: Mapping[str, str] | None = None, factor: float = DEFAULT_FACTOR,
                 min_calls: int = DEFAULT_MIN_CALLS, plots: bool = False, now: float | None = None) -> Report:
    """Read everything the report shows from ``store`` (``plots``: also what only the HTML needs)."""
    if not until > since:
        raise ConfigError(f"the time range is empty: --since {_iso(since)} is not before --until {_iso(until)}")
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"--outlier-factor {factor!r}: must be a positive number")
    select = dict(select or {})
    now = time.time() if now is None else now
    groups = store.telemetry(fleet, since=since, until=until, by=by, select=select or None)
    registry = store.devices(fleet, select or None, now=now)
    chosen = {(d.fleet, d.device_id) for d in registry}
    hardware = {(d.fleet, d.device_id): d.hardware_class for d in registry}
    failures = [e for e in store.events(fleet, since=since, until=until, kinds=FAILURE_KINDS, limit=MAX_FAILURES)
                if not select or (e.fleet, e.device_id) in chosen]
    plot_data = _plot_data(store, fleet, since, until, select, chosen) if plots else None
    return Report(
        fleet=fleet, since=since, until=until, by=by, select=select, generated_at=now, factor=factor,
        min_calls=min_calls, groups=tuple(groups),
        device_latency=tuple(device_latency(store, fleet, since, until, select, hardware)),
        offline=tuple(d for d in registry if d.status == "offline"),
        unknown=tuple(d for d in registry if d.status == "unknown"),
        install_failures=tuple(failures), plots=plot_data)


def device_latency(store: FleetStore, fleet: str | None, since: float, until: float, select: Mapping[str, str],
                   hardware: Mapping[tuple[str, str], str | None]) -> list[DeviceLatency]:
    """Each device's numbers per release and those of its peers (same release and hardware class)."""
    # The store groups by one key at a time: per device, its releases (one query per device).
    per_device: dict[tuple[str, str], tuple[dict[str, GroupStats], dict[str, LatencyHistogram]]] = {}
    for g in store.telemetry(fleet, since=since, until=until, by="device", select=select or None):
        f, d = (fleet, g.key) if fleet is not None else g.key.split("/", 1)
        kwargs = dict(since=since, until=until, by="release", device_ids=[d])
        stats = {s.key: s for s in store.telemetry(f, **kwargs)}
        per_device[(f, d)] = (stats, store.merged_histogram(f, **kwargs))

    peer_groups: dict[tuple[str, str | None], LatencyHistogram] = {}
    peer_counts: dict[tuple[str, str | None], tuple[int, int]] = {}  # calls, devices
    for (f, d), (stats, hists) in per_device.items():
        for release, s in stats.items():
            key = (release, hardware.get((f, d)))
            total = peer_groups.setdefault(key, LatencyHistogram())
            if release in hists:
                total.merge(hists[release])
            calls, devices = peer_counts.get(key, (0, 0))
            peer_counts[key] = (calls + s.count, devices + 1)

    out = []
    for (f, d), (stats, hists) in sorted(per_device.items()):
        for release, s in sorted(stats.items()):
            key = (release, hardware.get((f, d)))
            own = hists.get(release, LatencyHistogram())
            rest = histogram_without(peer_groups[key], own)
            calls, devices = peer_counts[key]
            out.append(DeviceLatency(
                fleet=f, device_id=d, release=release, hardware_class=key[1], count=s.count, errors=s.errors,
                p50_ms=s.p50_ms, p95_ms=s.p95_ms, p99_ms=s.p99_ms, peers=devices - 1,
                peers_count=rest.count, peers_p95_ms=rest.percentile(95)))
    return out


def histogram_without(total: LatencyHistogram, part: LatencyHistogram) -> LatencyHistogram:
    """``total`` less the samples of ``part`` (which was merged into it). The exact min/max of the
    rest are not known: the edges of its lowest and highest buckets stand in for them."""
    rest = LatencyHistogram()
    for index, n in total.counts.items():
        left = n - part.counts.get(index, 0)
        if left > 0:
            rest.counts[index] = left
    rest.count = sum(rest.counts.values())
    rest.sum_ns = max(0, total.sum_ns - part.sum_ns)
    if rest.count:
        low, high = min(rest.counts), max(rest.counts)
        rest.min = bucket_range(low)[0]
        rest.max = bucket_range(high)[0] if high == OVERFLOW else bucket_range(high)[1]
    return rest


def series_step(since: float, until: float) -> int:
    """A time step giving about `SERIES_POINTS` points over [since, until), in whole rollup buckets."""
    buckets = max(1, math.ceil((until - since) / SERIES_POINTS / ROLLUP_S))
    return buckets * ROLLUP_S


def _plot_data(store: FleetStore, fleet: str | None, since: float, until: float, select: Mapping[str, str],
               chosen: set[tuple[str, str]]) -> PlotData:
    step = series_step(since, until)
    sel = select or None
    series = store.latency_series(fleet, since=since, until=until, bucket_s=step, by="release", select=sel)
    merged = store.merged_histogram(fleet, since=since, until=until, by="release", select=sel)
    timeline = [e for e in store.events(fleet, since=since, until=until, limit=MAX_TIMELINE_EVENTS)
                if e.kind != "downloading" and (not select or (e.fleet, e.device_id) in chosen)]
    return PlotData(series=series, series_step_s=step, compared=latest_two(merged), timeline=tuple(timeline),
                    rollout_marks=tuple(rollout_marks(store, fleet, since, until)))


def rollout_marks(store: FleetStore, fleet: str | None, since: float, until: float) -> list[RolloutMark]:
    """Each rollout's waves sent, its halt and its end within [since, until), oldest first."""
    from edgesdk.fleet import rollouts as R

    marks = []
    for r in R.list_rollouts(store, fleet):
        if r.created_at >= until or (r.finished_at is not None and r.finished_at < since):
            continue
        for w in R.rollout_waves(store, r.id):
            if w.sent_at is not None:
                marks.append(RolloutMark(w.sent_at, "wave", f"{r.id} {r.release}: wave {w.wave + 1} of {r.waves} "
                                                              f"sent ({w.size} devices)"))
        if r.finished_at is not None:
            kind = "completed" if r.state == R.COMPLETED else "halted"
            marks.append(RolloutMark(r.finished_at, kind, f"{r.id} {r.release}: {r.state} — {r.outcome or ''}"))
    return sorted((m for m in marks if since <= m.at < until), key=lambda m: m.at)


def latest_two(merged: Mapping[str, LatencyHistogram]) -> dict[str, tuple[ReleaseHistogram, ...]]:
    """Per model name, its two highest versions with latencies (old first). Releases the store
    does not know by name (``model@sha256:...``) have no version to order by and are left out."""
    by_model: dict[str, list[tuple[str, str]]] = {}
    for release, hist in merged.items():
        name, sep, version = release.rpartition("@")
        if not sep or not name or version.startswith("sha256:") or not hist.count:
            continue
        by_model.setdefault(name, []).append((version, release))
    out = {}
    for name, versions in sorted(by_model.items()):
        versions.sort(key=functools.cmp_to_key(lambda a, b: compare_versions(a[0], b[0])))
        out[name] = tuple(ReleaseHistogram(r, merged[r]) for _, r in versions[-2:])
    return out


# -- formatting shared by the terminal and HTML tables ------------------------------------------------
def fmt_ms(value: float | None) -> str:
    """A latency for a table: about three significant digits, "—" when not known."""
    if value is None or not math.isfinite(value):
        return NO_VALUE
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_count(value: int | None) -> str:
    return NO_VALUE if value is None else f"{value:,}"


def fmt_rate(value: float | None) -> str:
    if value is None:
        return NO_VALUE
    return "0%" if value == 0 else f"{value * 100:.2f}%"


def fmt_ratio(value: float | None) -> str:
    return NO_VALUE if value is None else f"{value:.1f}×"


def fmt_time(ts: float | None) -> str:
    """UTC, to the second."""
    if ts is None:
        return NO_VALUE
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_ago(ts: float | None, now: float) -> str:
    """"12s ago", "5m ago", "3h ago", "2d ago"; "—" when never."""
    if ts is None:
        return NO_VALUE
    delta = now - ts
    if delta < 0:
        return "in the future"
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= seconds:
            return f"{int(delta // seconds)}{unit} ago"
    return f"{int(delta)}s ago"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
