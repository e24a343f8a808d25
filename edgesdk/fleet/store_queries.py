"""What the fleet store computes in Python: device-sent values made safe to store, telemetry
windows turned into rows and rollup keys, and groups of rollup rows merged into `GroupStats`.

Grouping happens here, not in SQL: a group may be a label value or a release name the database
would need joins for, and the histograms merge in numpy anyway (`store_schema.HistogramMerger`).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgesdk.errors import FleetError
from edgesdk.fleet.records import (GROUP_KEYS, NO_VALUE, SILENT_WINDOWS, DesiredRecord, DeviceStatus, GroupStats,
                                   ReleaseRecord, release_name)
from edgesdk.fleet.store_schema import (ROLLUP_BUCKET_S, ROLLUP_HOUR_S, HistogramMerger, Transaction, chunks,
                                        decode_histogram, encode_histogram)
from edgesdk.protocol.histogram import IncompatibleHistogramError, LatencyHistogram, histogram_of
from edgesdk.protocol.messages import TelemetryWindow
from edgesdk.protocol.outputs import MAX_OUTPUTS_PER_WINDOW, OutputSummary, parse_window_outputs
from edgesdk.protocol.statements import compare_versions

log = logging.getLogger(__name__)

INT64_MAX = (1 << 63) - 1
# A window claiming more calls than this is not a measurement; refusing it keeps every sum of
# counts far inside a 64-bit column (2^40 calls per window x 2^23 windows per bucket).
MAX_WINDOW_COUNT = 1 << 40
MAX_TIME = 1e11  # unix seconds (year ~5138); past it a timestamp is garbage, and floor() must fit a BIGINT
# Pending histogram bytes held across all groups before they are added up (bounds memory).
FLUSH_EVERY_ROWS = 200_000
DEFAULT_TELEMETRY_INTERVAL_S = 60.0  # what an agent sends when its state does not say
KEYS_PER_QUERY = 200  # keys per lookup: ~1000 parameters, a statement the drivers parse quickly


def clean_text(value: object) -> str | None:
    """A device-sent string as both databases store it: no NUL (PostgreSQL refuses it), no lone
    surrogate (not UTF-8); None stays None, anything else becomes its text."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def check_group_by(by: str) -> str | None:
    """The label key of ``label:KEY``, None for the fixed keys; FleetError names the choices."""
    if by in GROUP_KEYS:
        return None
    if by.startswith("label:") and len(by) > len("label:"):
        return by[len("label:"):]
    raise FleetError(f"cannot group telemetry by {by!r}: use one of {', '.join(GROUP_KEYS)} or label:KEY")


def release_key(model: str, package_id: str, known: Mapping[str, str]) -> str:
    """``name@version`` of a package the store knows; else the model and the package id's start."""
    name = known.get(package_id)
    if name is not None:
        return name
    return f"{model or NO_VALUE}@sha256:{package_id[:12]}"


@dataclass
class WindowRow:
    """One telemetry window, checked and ready for the windows table and the rollup."""

    key: tuple[str, str, int, float]  # fleet, device_id, seq, window_start: what makes a window one window
    values: tuple  # the telemetry_windows row (`INSERT_WINDOW`)
    series: tuple[str, str, str, str, str, str]  # fleet, device_id, model, package_id, variant, provider ('' unknown)
    bucket: int  # the 5-minute bucket of window_end
    count: int
    errors: int
    hist: LatencyHistogram | None
    outputs: dict[str, OutputSummary] | None = None  # what the model answered (the drift gate's data)


def window_row(fleet: str, device_id: str, window: TelemetryWindow, received_at: float) -> WindowRow | None:
    """The rows ``window`` becomes, or None when it cannot be stored (numbers past 64 bits or
    times past `MAX_TIME`: only a broken or hostile device sends those). A histogram of another
    scheme is dropped (its calls still count; its latencies cannot merge)."""
    w = window
    if not (-INT64_MAX <= w.seq <= INT64_MAX and 0 <= w.count <= MAX_WINDOW_COUNT
            and 0 <= w.errors <= MAX_WINDOW_COUNT and 0 <= w.dropped_windows <= INT64_MAX
            and abs(w.window_start) < MAX_TIME and abs(w.window_end) < MAX_TIME):
        log.warning("telemetry %s/%s seq %s: numbers out of range, not stored", fleet, device_id, str(w.seq)[:20])
        return None
    hist: LatencyHistogram | None = None
    blob: bytes | None = None
    if w.histogram:
        try:
            hist = histogram_of(w)
            blob = encode_histogram(hist)
        except (IncompatibleHistogramError, ValueError) as exc:
            log.warning("telemetry %s/%s seq %d: histogram not stored: %s", fleet, device_id, w.seq, exc)
            hist = blob = None
    model, package_id = clean_text(w.model), clean_text(w.package_id)
    variant, provider = clean_text(w.variant), clean_text(w.provider)
    values = (fleet, device_id, w.seq, w.window_start, w.window_end, w.count, w.errors, w.p50_ms, w.p95_ms,
              w.p99_ms, w.max_ms, model, package_id, variant, provider, w.cpu_percent, w.rss_mb,
              w.dropped_windows, blob, received_at)
    outputs = parse_window_outputs(w.extra, f"telemetry {device_id} seq {w.seq}") if "outputs" in w.extra else None
    return WindowRow((fleet, device_id, w.seq, w.window_start), values,
                     (fleet, device_id, model or "", package_id or "", variant or "", provider or ""),
                     math.floor(w.window_end / ROLLUP_BUCKET_S) * ROLLUP_BUCKET_S, w.count, w.errors, hist,
                     outputs or None)


# -- reading the rollup ---------------------------------------------------------------------------
_FAR = 1 << 62  # "no bound": an integer, so the database compares BIGINT with BIGINT and uses its index


def rollup_pieces(since: float | None, until: float | None, step_s: int | None) -> list[tuple[int, int, int]]:
    """(span, low, high): rollup rows ``low <= bucket_start < high`` of that span that together hold
    every window whose 5-minute bucket overlaps [since, until), each once. Whole hours come from
    the hourly rows (unless a series step is not whole hours), the edges from the 5-minute rows."""
    low = -_FAR if since is None else math.floor(since / ROLLUP_BUCKET_S) * ROLLUP_BUCKET_S
    high = _FAR if until is None else math.ceil(until / ROLLUP_BUCKET_S) * ROLLUP_BUCKET_S
    if low >= high:
        return []
    hour_low, hour_high = -(-low // ROLLUP_HOUR_S) * ROLLUP_HOUR_S, high // ROLLUP_HOUR_S * ROLLUP_HOUR_S
    if (step_s is not None and step_s % ROLLUP_HOUR_S) or hour_low >= hour_high:
        return [(ROLLUP_BUCKET_S, low, high)]
    pieces = [(ROLLUP_HOUR_S, hour_low, hour_high), (ROLLUP_BUCKET_S, low, hour_low),
              (ROLLUP_BUCKET_S, hour_high, high)]
    return [p for p in pieces if p[1] < p[2]]


def label_filters(alias: str, select: Mapping[str, str] | None, where: list[str], params: list[Any]) -> None:
    """Add one clause per ``key=value`` of ``select`` (all must hold) on the device that table
    ``alias`` (with ``fleet`` and ``device_id`` columns) names."""
    for key, value in sorted((select or {}).items()):
        where.append(f"EXISTS (SELECT 1 FROM device_labels l WHERE l.fleet = {alias}.fleet AND "
                     f"l.device_id = {alias}.device_id AND l.key = ? AND l.value = ?)")
        params.extend((key, value))


def series_filter(fleet: str | None, select: Mapping[str, str] | None,
                  device_ids: Iterable[str] | None) -> tuple[str, list[Any]]:
    """A WHERE clause on ``telemetry_series s``: releases only (no heartbeats), then the filters."""
    where, params = ["s.package_id <> ''"], []
    if fleet is not None:
        where.append("s.fleet = ?")
        params.append(fleet)
    label_filters("s", select, where, params)
    if device_ids is not None:
        wanted = sorted(set(device_ids))
        where.append(f"s.device_id IN ({', '.join('?' * len(wanted))})" if wanted else "1 = 0")
        params.extend(wanted)
    return " AND ".join(where), params


class _Cell:
    __slots__ = ("count", "errors", "windows", "series", "merger")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.windows = 0
        self.series: set[int] = set()
        self.merger = HistogramMerger()

    def stats(self, key: str, device_of: Mapping[int, tuple[str, str]]) -> GroupStats:
        hist = self.merger.result()
        return GroupStats(key=key, count=self.count, errors=self.errors, p50_ms=hist.percentile(50),
                          p95_ms=hist.percentile(95), p99_ms=hist.percentile(99),
                          devices=len({device_of[s] for s in self.series}), windows=self.windows)


KeyFunction = Callable[[str, str, str, str, str, str], str]


def key_function(by: str, *, multi_fleet: bool, releases: Mapping[str, str],
                 devices: Mapping[tuple[str, str], tuple[str | None, str | None]],
                 labels: Mapping[tuple[str, str], str]) -> KeyFunction:
    """(fleet, device_id, model, package_id, variant, provider) of a series -> its group for ``by``.

    ``devices`` maps (fleet, id) to (target, hardware_class); ``labels`` to the value of the
    ``label:KEY`` label; ``releases`` package id to ``name@version``.
    """
    if by == "release":
        return lambda f, d, m, p, v, pr: release_key(m, p, releases)
    if by == "device":
        return (lambda f, d, m, p, v, pr: f"{f}/{d}") if multi_fleet else (lambda f, d, m, p, v, pr: d)
    if by == "model":
        return lambda f, d, m, p, v, pr: m or NO_VALUE
    if by == "provider":
        return lambda f, d, m, p, v, pr: pr or NO_VALUE
    if by in ("target", "hardware"):
        slot = 0 if by == "target" else 1
        return lambda f, d, m, p, v, pr: (devices.get((f, d), (None, None))[slot] or NO_VALUE)
    return lambda f, d, m, p, v, pr: labels.get((f, d), NO_VALUE)


class Aggregate:
    """Rollup rows (series_id, bucket_start, windows, count, errors, histogram) merged per group,
    and per time step when ``step_s``; ``series`` maps each series id to (group, fleet, device)."""

    def __init__(self, series: Mapping[int, tuple[str, str, str]], step_s: int | None) -> None:
        self.group_of = {sid: group for sid, (group, _, _) in series.items()}
        self.device_of = {sid: (fleet, device) for sid, (_, fleet, device) in series.items()}
        self.step_s = step_s
        self.cells: dict[tuple[str, int], _Cell] = {}
        self._seen = 0

    def add(self, rows: Iterable[tuple]) -> None:
        cells, group_of, step = self.cells, self.group_of, self.step_s
        seen = self._seen
        for sid, bucket, windows, count, errors, blob in rows:
            key = group_of.get(sid)
            if key is None:  # a series the filters dropped
                continue
            at = bucket - bucket % step if step else 0
            cell = cells.get((key, at))
            if cell is None:
                cell = cells[(key, at)] = _Cell()
            cell.count += count
            cell.errors += errors
            cell.windows += windows
            cell.series.add(sid)
            if blob is not None:
                cell.merger.add(blob)
            seen += 1
            if seen % FLUSH_EVERY_ROWS == 0:  # bound the bytes held across all groups
                for c in cells.values():
                    c.merger.flush()
        self._seen = seen

    def stats(self) -> list[GroupStats]:
        """One `GroupStats` per group, sorted by key."""
        return [self.cells[k].stats(k[0], self.device_of) for k in sorted(self.cells)]

    def series(self) -> dict[str, list[tuple[float, GroupStats]]]:
        out: dict[str, list[tuple[float, GroupStats]]] = {}
        for key, at in sorted(self.cells):
            out.setdefault(key, []).append((float(at), self.cells[(key, at)].stats(key, self.device_of)))
        return out

    def histograms(self) -> dict[str, LatencyHistogram]:
        return {k[0]: self.cells[k].merger.result() for k in sorted(self.cells)}


def series_step(bucket_s: float) -> int:
    """``bucket_s`` as a whole number of 5-minute rollup buckets (at least one)."""
    if not math.isfinite(bucket_s) or bucket_s <= 0:
        raise FleetError(f"bucket_s must be a positive number of seconds, not {bucket_s!r}")
    return max(1, math.ceil(bucket_s / ROLLUP_BUCKET_S - 1e-9)) * ROLLUP_BUCKET_S


def merge_rollup(old: tuple[int, int, int, bytes | None, str | None] | None, windows: int, count: int, errors: int,
                 hist: LatencyHistogram | None,
                 outputs: dict[str, OutputSummary] | None = None) -> tuple[int, int, int, bytes | None, str | None]:
    """A rollup row's (windows, count, errors, histogram bytes, output summaries as JSON) after
    adding new windows to ``old``."""
    if old is None:
        return (windows, count, errors, encode_histogram(hist) if hist is not None and hist.count else None,
                _outputs_json(outputs))
    o_windows, o_count, o_errors, o_blob, o_outputs = old
    if outputs:
        if o_outputs:
            stored = parse_window_outputs({"outputs": from_json(o_outputs, {})}, "stored rollup outputs")
            outputs = _merged_outputs(stored, outputs)
        new_outputs = _outputs_json(outputs)
    else:
        new_outputs = o_outputs
    if hist is not None and hist.count:
        if o_blob is not None:
            merged = decode_histogram(o_blob)
            merged.merge(hist)
            hist = merged
        blob = encode_histogram(hist)
    else:
        blob = o_blob
    return o_windows + windows, o_count + count, o_errors + errors, blob, new_outputs


def _merged_outputs(into: dict[str, OutputSummary] | None,
                    more: dict[str, OutputSummary] | None) -> dict[str, OutputSummary] | None:
    """``into`` with ``more`` merged in (``into`` is changed; ``more`` never is)."""
    if not more:
        return into
    if into is None:
        return {name: s.copy() for name, s in more.items()}
    for name, summary in more.items():
        if name in into:
            into[name].merge(summary)
        elif len(into) < MAX_OUTPUTS_PER_WINDOW:
            into[name] = summary.copy()
    return into


def _outputs_json(outputs: dict[str, OutputSummary] | None) -> str | None:
    return to_json({name: s.to_dict() for name, s in sorted(outputs.items())}) if outputs else None


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def from_json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


# -- the SQL FleetStore runs, and the rows it reads turned into records ---------------------------
UPSERT_DEVICE = (
    "INSERT INTO devices (fleet, device_id, online, first_seen, last_seen, state_at, hardware_class, arch, target, "
    "agent_version, telemetry_interval_s, hardware, runtimes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (fleet, device_id) DO UPDATE SET online = excluded.online, "
    "first_seen = COALESCE(devices.first_seen, excluded.first_seen), "
    "last_seen = CASE WHEN devices.last_seen IS NULL OR devices.last_seen < excluded.last_seen "
    "THEN excluded.last_seen ELSE devices.last_seen END, state_at = excluded.state_at, "
    "hardware_class = excluded.hardware_class, arch = excluded.arch, target = excluded.target, "
    "agent_version = excluded.agent_version, telemetry_interval_s = excluded.telemetry_interval_s, "
    "hardware = excluded.hardware, runtimes = excluded.runtimes")
RELEASE_COLUMNS = "package_id, name, version, target, size, published_at, signer, metrics"
DESIRED_COLUMNS = "x.model, x.package_id, x.version, x.serial, x.issued_at, x.rollout_id"
INSERT_WINDOW = (
    "INSERT INTO telemetry_windows (fleet, device_id, seq, window_start, window_end, count, errors, p50_ms, p95_ms, "
    "p99_ms, max_ms, model, package_id, variant, provider, cpu_percent, rss_mb, dropped_windows, histogram, "
    f"received_at) VALUES ({', '.join('?' * 20)})")
UPSERT_ROLLUP = (
    "INSERT INTO telemetry_rollup (span, bucket_start, series_id, windows, count, errors, histogram, outputs) VALUES "
    "(?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (span, bucket_start, series_id) DO UPDATE SET windows = excluded.windows, "
    "count = excluded.count, errors = excluded.errors, histogram = excluded.histogram, outputs = excluded.outputs")


def device_filter(fleet: str | None, device_id: str | None,
                  select: Mapping[str, str] | None) -> tuple[str, list[Any]]:
    """A WHERE clause on ``devices d`` and its parameters (labels: every key=value must match)."""
    where, params = ["1 = 1"], []
    if fleet is not None:
        where.append("d.fleet = ?")
        params.append(fleet)
    if device_id is not None:
        where.append("d.device_id = ?")
        params.append(device_id)
    label_filters("d", select, where, params)
    return " AND ".join(where), params


def device_status(online: bool, last_seen: float | None, interval: float | None, now: float) -> DeviceStatus:
    if not online:
        return "offline"
    window = interval if interval and interval > 0 else DEFAULT_TELEMETRY_INTERVAL_S
    if last_seen is None or now - last_seen > SILENT_WINDOWS * window:
        return "unknown"
    return "online"


def desired_record(row: Iterable[Any]) -> DesiredRecord:
    model, package_id, version, serial, issued_at, rollout_id = row
    return DesiredRecord(model=model, package_id=package_id, release=release_name(model, version) if package_id
                         else None, serial=serial, at=issued_at, rollout_id=rollout_id)


def release_record(row: tuple) -> ReleaseRecord:
    package_id, name, version, target, size, published_at, signer, metrics = row
    return ReleaseRecord(package_id=package_id, name=name, version=version, target=target, size=size,
                         published_at=published_at, signer=signer, metrics=from_json(metrics, {}))


_version_order = functools.cmp_to_key(compare_versions)


def release_order(r: ReleaseRecord) -> tuple:
    return r.name, _version_order(r.version), r.version, r.target, r.package_id


def release_names(tx: Transaction) -> dict[str, str]:
    return {pid: f"{name}@{version}" for pid, name, version in tx.query("SELECT package_id, name, version "
                                                                        "FROM releases")}


def device_slots(tx: Transaction, fleet: str | None) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    sql, params = "SELECT fleet, device_id, target, hardware_class FROM devices", ()
    if fleet is not None:
        sql, params = sql + " WHERE fleet = ?", (fleet,)
    return {(f, d): (target, hw) for f, d, target, hw in tx.query(sql, params)}


def label_values(tx: Transaction, fleet: str | None, key: str) -> dict[tuple[str, str], str]:
    sql, params = "SELECT fleet, device_id, value FROM device_labels WHERE key = ?", [key]
    if fleet is not None:
        sql += " AND fleet = ?"
        params.append(fleet)
    return {(f, d): v for f, d, v in tx.query(sql, params)}


def store_windows(tx: Transaction, rows: dict[tuple[str, str, int], WindowRow],
                  known_series: Mapping[tuple, int]) -> tuple[int, dict[tuple, int]]:
    """Insert the windows not stored yet and add them to their rollup rows (under the fleet lock).
    Returns how many were new and the series ids it had to look up (for the caller's cache,
    once the transaction committed).

    Which windows are new is what the insert itself says (ON CONFLICT DO NOTHING RETURNING: a
    primary-key probe per row), never a query plan over millions of stored windows.
    """
    ordered = sorted(rows.values(), key=lambda r: r.key)
    inserted = {tuple(k) for k in tx.insert_returning(
        f"{INSERT_WINDOW} ON CONFLICT (fleet, device_id, seq, window_start) DO NOTHING "
        "RETURNING fleet, device_id, seq, window_start",
        [r.values for r in ordered])}
    new = [r for r in ordered if r.key in inserted]
    if not new:
        return 0, {}
    learned = _series_ids(tx, sorted({r.series for r in new if r.series not in known_series}))
    ids = collections.ChainMap(learned, known_series)  # lookups only: the cache may grow meanwhile
    # Add up per 5-minute rollup row first (one read and one write per row, however many
    # windows), then the hours from those (a 5-minute bucket lies in exactly one hour).
    added: dict[tuple[int, int, int], list[Any]] = {}
    for r in new:
        key = (ROLLUP_BUCKET_S, r.bucket, ids[r.series])
        acc = added.get(key)
        if acc is None:
            # r.hist and r.outputs are this window's own: merged into in place
            added[key] = [1, r.count, r.errors, r.hist, r.outputs]
            continue
        acc[0] += 1
        acc[1] += r.count
        acc[2] += r.errors
        if r.hist is not None:
            if acc[3] is None:
                acc[3] = r.hist
            else:
                acc[3].merge(r.hist)
        acc[4] = _merged_outputs(acc[4], r.outputs)
    for (_, bucket, sid), (windows, count, errors, hist, outputs) in list(added.items()):
        key = (ROLLUP_HOUR_S, bucket - bucket % ROLLUP_HOUR_S, sid)
        acc = added.get(key)
        if acc is None:
            added[key] = [windows, count, errors, None if hist is None else hist.copy(),
                          _merged_outputs(None, outputs)]
            continue
        acc[0] += windows
        acc[1] += count
        acc[2] += errors
        if hist is not None:
            if acc[3] is None:
                acc[3] = hist.copy()
            else:
                acc[3].merge(hist)
        acc[4] = _merged_outputs(acc[4], outputs)
    keys = sorted(added)
    low, high = min(k[1] for k in keys), max(k[1] for k in keys)
    old: dict[tuple[int, int, int], tuple[int, int, int, bytes | None, str | None]] = {}
    for part in chunks(keys, KEYS_PER_QUERY):
        marks = ", ".join(["(?, ?, ?)"] * len(part))
        # The bucket range bounds the read whatever plan the database picks for the join.
        for span, bucket, sid, windows, count, errors, blob, outputs in tx.query(
                "SELECT r.span, r.bucket_start, r.series_id, r.windows, r.count, r.errors, r.histogram, r.outputs FROM "
                f"telemetry_rollup r JOIN (VALUES {marks}) AS k ON r.span = k.column1 AND r.bucket_start = "
                "k.column2 AND r.series_id = k.column3 WHERE r.bucket_start BETWEEN ? AND ?",
                [*(v for key in part for v in key), low, high]):
            old[(span, bucket, sid)] = (windows, count, errors, None if blob is None else bytes(blob), outputs)
    tx.executemany(UPSERT_ROLLUP, [(*key, *merge_rollup(old.get(key), *added[key])) for key in keys])
    return len(new), learned


def _series_ids(tx: Transaction, keys: list[tuple[str, str, str, str, str, str]]) -> dict[tuple, int]:
    """The ids of these series, adding the ones the store lacks."""
    if not keys:
        return {}
    tx.executemany("INSERT INTO telemetry_series (fleet, device_id, model, package_id, variant, provider) VALUES "
                   "(?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device_id, model, package_id, variant, provider) "
                   "DO NOTHING", keys)
    found: dict[tuple, int] = {}
    by_fleet: dict[str, list[tuple]] = {}
    for key in keys:
        by_fleet.setdefault(key[0], []).append(key[1:])
    for fleet, rest in by_fleet.items():
        for part in chunks(rest, KEYS_PER_QUERY):
            marks = ", ".join(["(?, ?, ?, ?, ?)"] * len(part))
            for sid, *key in tx.query(
                    "SELECT s.id, s.device_id, s.model, s.package_id, s.variant, s.provider FROM telemetry_series s "
                    f"JOIN (VALUES {marks}) AS k ON s.device_id = k.column1 AND s.model = k.column2 AND "
                    "s.package_id = k.column3 AND s.variant = k.column4 AND s.provider = k.column5 WHERE s.fleet = ?",
                    [*(v for key in part for v in key), fleet]):
                found[(fleet, *key)] = sid
    return found
