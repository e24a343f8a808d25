"""What the rollout controller reads from the fleet store: where each device of the fleet is for
one model (its release, provider, whether it is online), the install events since a wave was
sent, and the telemetry cohorts its gates compare (`edgesdk.fleet.rollout_gates`).

Telemetry comes from the store's rollup (5-minute buckets of merged histograms and output
summaries, by series: device × model × release × variant × provider), so a gate over 5,000
devices reads one row per series and bucket, never the raw windows. Time bounds are therefore
whole 5-minute buckets: the *untouched* cohort may include up to five minutes before the wave
activated; the same devices' old release is bounded by its own series (it stops at the switch).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgesdk.fleet.rollout_gates import ClassData, Cohort, WaveData
from edgesdk.fleet.rollouts import ACTIVE, RolloutDevice
from edgesdk.fleet.records import NO_VALUE
from edgesdk.fleet.store_queries import device_status, from_json
from edgesdk.fleet.store_schema import ROLLUP_BUCKET_S, HistogramMerger, chunks, encode_histogram, merge_encoded
from edgesdk.protocol.histogram import LatencyHistogram
from edgesdk.protocol.outputs import OutputSummary

if TYPE_CHECKING:
    from edgesdk.fleet.store import FleetStore

IDS_PER_QUERY = 500
EVENT_KINDS = ("activated", "failed", "refused", "rolled_back", "undeployed")


@dataclass(frozen=True)
class DeviceNow:
    """A device of the fleet as the store knows it now, for one model name."""

    device_id: str
    status: str  # online | offline | unknown (`records.DeviceStatus`)
    state_at: float | None  # when its last state message arrived (server time)
    hardware_class: str | None
    target: str | None
    package_id: str | None  # the model's active release on it (None: not running the model)
    version: str | None
    provider: str | None


def fleet_now(store: FleetStore, fleet: str, model: str, now: float) -> dict[str, DeviceNow]:
    """Every device of ``fleet`` with what it runs for ``model``."""
    rows = store.transact(lambda tx: tx.query(
        "SELECT d.device_id, d.online, d.last_seen, d.telemetry_interval_s, d.state_at, d.hardware_class, d.target, "
        "m.package_id, m.version, m.provider FROM devices d LEFT JOIN device_models m ON m.fleet = d.fleet AND "
        "m.device_id = d.device_id AND m.name = ? WHERE d.fleet = ?", (model, fleet)))
    return {d: DeviceNow(d, device_status(bool(online), last, interval, now), state_at, hw, target, pid or None,
                         version, provider)
            for d, online, last, interval, state_at, hw, target, pid, version, provider in rows}


@dataclass(frozen=True)
class DeviceEvent:
    device_id: str
    at: float
    kind: str
    model: str
    package_id: str
    rollout_id: str | None
    reason: str | None
    retry: bool


def events_since(store: FleetStore, fleet: str, model: str, since: float,
                 devices: Collection[str]) -> list[DeviceEvent]:
    """Outcome events (activated, failed, refused, rolled back, undeployed) of ``devices`` for
    ``model`` at or after ``since``, oldest first."""
    wanted = set(devices)
    rows = store.transact(lambda tx: tx.query(
        f"SELECT e.device_id, e.at, e.kind, e.model, e.package_id, e.rollout_id, e.reason, e.extra FROM events e "
        f"WHERE e.fleet = ? AND e.at >= ? AND e.kind IN ({', '.join('?' * len(EVENT_KINDS))}) ORDER BY e.at, e.id",
        (fleet, since, *EVENT_KINDS)))
    out = []
    for d, at, kind, m, pid, rid, reason, extra in rows:
        if d not in wanted or (m and m != model):
            continue
        retry = bool(from_json(extra, {}).get("retry")) if extra and "retry" in extra else False
        out.append(DeviceEvent(d, at, kind, m, pid, rid, reason, retry))
    return out


# -- telemetry cohorts ---------------------------------------------------------------------------------
MAX_DEVICE_WEIGHT = 3.0  # no device weighs more than this many times the median device of its cohort


class _Side:
    """One cohort's rollup rows, kept per device until `cohort` merges them."""

    __slots__ = ("rows", "outputs")

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[int, int, bytes | None]]] = {}
        self.outputs: dict[str, OutputSummary] = {}

    def add(self, device: str, count: int, errors: int, blob: bytes | None, outputs: str | None) -> None:
        if count or blob is not None:
            self.rows.setdefault(device, []).append((count, errors, None if blob is None else bytes(blob)))
        if outputs:
            merge_outputs(self.outputs, outputs)

    def cohort(self) -> Cohort:
        """The merged cohort. A device with more calls than MAX_DEVICE_WEIGHT times the median
        device's is counted at that weight (its histogram scaled down, listed in ``capped``): one
        device flooding the store with fabricated fast calls cannot outweigh the others."""
        merger, calls, errors, devices, capped = HistogramMerger(), 0, 0, set(), []
        totals = {d: sum(c for c, _, _ in rows) for d, rows in self.rows.items()}
        active = sorted(t for t in totals.values() if t)
        cap = MAX_DEVICE_WEIGHT * active[len(active) // 2] if len(active) >= 3 else None
        for device, rows in self.rows.items():
            total = totals[device]
            if total:
                devices.add(device)
            if cap is None or total <= cap:
                calls += total
                errors += sum(e for _, e, _ in rows)
                for _, _, blob in rows:
                    if blob is not None:
                        merger.add(blob)
                continue
            factor = cap / total
            capped.append(device)
            calls += round(total * factor)
            errors += round(sum(e for _, e, _ in rows) * factor)
            hist = merge_encoded(blob for _, _, blob in rows if blob is not None)
            if hist.count:
                merger.add(encode_histogram(scaled(hist, factor)))
        return Cohort(hist=merger.result(), calls=calls, errors=errors, devices=devices, outputs=self.outputs,
                      capped=sorted(capped))


def scaled(hist: LatencyHistogram, factor: float) -> LatencyHistogram:
    """``hist`` with every bucket's count multiplied by ``factor`` (rounded; min and max kept)."""
    out = LatencyHistogram()
    out.counts = {b: n for b, n in ((b, round(c * factor)) for b, c in hist.counts.items()) if n}
    out.count = sum(out.counts.values())
    out.sum_ns = round(hist.sum_ns * factor)
    out.min, out.max = hist.min, hist.max
    return out


def merge_outputs(into: dict[str, OutputSummary], text: str) -> None:
    """Merge a rollup row's stored output summaries (JSON) into ``into``; what does not parse is skipped."""
    stored = from_json(text, {})
    if not isinstance(stored, dict):
        return
    for name, data in stored.items():
        try:
            summary = OutputSummary.from_dict(data, f"stored output {name}")
        except Exception:  # noqa: BLE001 - the store holds what devices sent: skip, never fail a gate
            continue
        if name in into:
            into[name].merge(summary)
        else:
            into[name] = summary


def wave_data(store: FleetStore, fleet: str, model: str, wave: int, wave_devices: Iterable[RolloutDevice],
              untouched: Mapping[str, DeviceNow], *, new_package: Mapping[str, str | None], sent_at: float,
              activated_at: float, now: float, lookback_s: float) -> WaveData:
    """The numbers the gates judge a wave by.

    ``new_package``: device -> the package it was told to run; the wave's devices that activated
    form the *new* cohort (their new release's series since ``activated_at``) and the *old* one
    (their previous release's series in the ``lookback_s`` before ``sent_at``); ``untouched``
    devices (not yet in any wave) on any other release of the model form the third, since
    ``activated_at``. Grouped by hardware class."""
    devices = list(wave_devices)
    active = {d.device_id: d for d in devices if d.state == ACTIVE}
    prev = {d.device_id: d.prev_package_id for d in active.values() if d.prev_package_id}
    class_of = {d.device_id: d.hardware_class or NO_VALUE for d in devices}
    class_of.update({d: (u.hardware_class or NO_VALUE) for d, u in untouched.items()})
    sides: dict[tuple[str, str], _Side] = {}
    outputs_new, outputs_old, outputs_untouched = _Side(), _Side(), _Side()

    series = store.transact(lambda tx: tx.query(
        "SELECT s.id, s.device_id, s.package_id FROM telemetry_series s WHERE s.fleet = ? AND s.model = ?",
        (fleet, model)))
    role: dict[int, tuple[str, str]] = {}  # series id -> (side, device)
    for sid, device, pid in series:
        if device in active:
            if pid and pid == new_package.get(device):
                role[sid] = ("new", device)
            elif pid and pid == prev.get(device):
                role[sid] = ("old", device)
        elif device in untouched and pid and pid != new_package.get(device):
            role[sid] = ("untouched", device)

    def bucket(t: float) -> int:
        return math.floor(t / ROLLUP_BUCKET_S) * ROLLUP_BUCKET_S

    ranges = {"new": (bucket(activated_at), bucket(now) + ROLLUP_BUCKET_S),
              "untouched": (bucket(activated_at), bucket(now) + ROLLUP_BUCKET_S),
              "old": (bucket(sent_at - lookback_s), bucket(sent_at) + ROLLUP_BUCKET_S)}
    for side_name, (low, high) in ranges.items():
        ids = sorted(sid for sid, (s, _) in role.items() if s == side_name)
        for part in chunks(ids, IDS_PER_QUERY):
            rows = store.transact(lambda tx, part=part, low=low, high=high: tx.query(
                "SELECT r.series_id, r.count, r.errors, r.histogram, r.outputs FROM telemetry_rollup r WHERE "
                f"r.span = ? AND r.bucket_start >= ? AND r.bucket_start < ? AND r.series_id IN "
                f"({', '.join('?' * len(part))})", (ROLLUP_BUCKET_S, low, high, *part)))
            for sid, count, errors, blob, outputs in rows:
                _, device = role[sid]
                key = (class_of.get(device, NO_VALUE), side_name)
                side = sides.get(key)
                if side is None:
                    side = sides[key] = _Side()
                side.add(device, count, errors, blob, outputs)
                {"new": outputs_new, "old": outputs_old, "untouched": outputs_untouched}[side_name].add(
                    device, 0, 0, None, outputs)

    classes: dict[str, ClassData] = {}
    for d in active.values():
        cls = classes.setdefault(class_of[d.device_id], ClassData())
        cls.had_previous = cls.had_previous or bool(d.prev_package_id)
    for (hw, side_name), side in sides.items():
        cls = classes.setdefault(hw, ClassData())
        setattr(cls, side_name, side.cohort())
    return WaveData(wave=wave, devices=devices, classes=classes, outputs_new=outputs_new.outputs,
                    outputs_old=outputs_old.outputs, outputs_untouched=outputs_untouched.outputs,
                    had_previous=bool(prev))
