"""The fleet's selection ranking of a package per hardware class, from the devices' own reports.

Every device that selects a variant sends a `selected` install event with its table (each
candidate's measured p50). For one package, the devices are grouped by hardware class and runtime
versions (what decides the ranking; the agent's cache key adds the rest of the fingerprint), each
device's latest table counts once, and the candidates are ranked by the median over the devices
of their p50, with the agent's rule for ties (`order_within_noise`: within the noise margin,
the profile's order). The rollout controller puts the ranking in the statements of the next
devices of that class (`edgesdk.protocol.selection_hint`).

A device's table is untrusted input: rows that are not a well-formed timed candidate are skipped,
and a device counts once however many events it sends.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from typing import Any

from edgesdk.fleet.records import DeviceRecord, EventRecord
from edgesdk.protocol import InstallEventKind
from edgesdk.protocol.selection_hint import MAX_RANKED, MAX_TEXT, RankedCandidate, SelectionHint, order_within_noise

TIMED_STATUSES = ("selected", "not_checked", "ok")  # rows whose p50 was measured and that ran
GroupKey = tuple[str, str]  # (hardware class, runtime versions as sorted JSON)


def runtime_versions(runtimes: Any) -> dict[str, str]:
    """``{"onnxruntime": {"version": "1.32.0", ...}}`` (a device's state) → ``{"onnxruntime": "1.32.0"}``."""
    if not isinstance(runtimes, dict):
        return {}
    out = {}
    for name, info in runtimes.items():
        version = info.get("version") if isinstance(info, dict) else info
        if _text_ok(name) and _text_ok(version):
            out[name] = version
    return dict(sorted(out.items()))


def group_key(hardware_class: str | None, runtimes: dict[str, str]) -> GroupKey | None:
    if not _text_ok(hardware_class):
        return None
    return hardware_class, json.dumps(runtimes, sort_keys=True)


def rank_tables(tables: Iterable[list[Any]]) -> list[RankedCandidate]:
    """One ranking from several devices' selection tables (each device's latest, once)."""
    samples: dict[tuple[str, str], list[float]] = {}
    order: dict[tuple[str, str], int] = {}
    for table in tables:
        if not isinstance(table, list):
            continue
        seen = set()
        for position, row in enumerate(table[:MAX_RANKED * 4]):
            if not isinstance(row, dict) or row.get("status") not in TIMED_STATUSES:
                continue
            variant, provider, p50 = row.get("variant"), row.get("provider"), _finite_ms(row.get("p50_ms"))
            if not (_text_ok(variant) and _text_ok(provider)) or p50 is None:
                continue
            key = (variant, provider)
            if key in seen:  # a table listing a candidate twice counts it once
                continue
            seen.add(key)
            samples.setdefault(key, []).append(p50)
            order[key] = min(order.get(key, position), position)
    medians = [(key, statistics.median(values)) for key, values in samples.items()]
    band, rest = order_within_noise(medians, lambda kv: kv[1], lambda kv: order[kv[0]])
    return [RankedCandidate(k[0], k[1], round(m, 4)) for k, m in (band + rest)[:MAX_RANKED]]


def class_rankings(devices: Iterable[DeviceRecord], events: Iterable[EventRecord]) -> dict[GroupKey, SelectionHint]:
    """Per (hardware class, runtime versions): the ranking from the latest `selected` table of each
    device in it. ``events`` are one package's, oldest first."""
    by_device = {d.device_id: d for d in devices}
    latest: dict[str, list[Any]] = {}
    for event in events:
        if event.kind == InstallEventKind.SELECTED.value and event.table and event.device_id in by_device:
            latest[event.device_id] = event.table
    groups: dict[GroupKey, list[list[Any]]] = {}
    versions: dict[GroupKey, dict[str, str]] = {}
    for device_id, table in latest.items():
        device = by_device[device_id]
        runtimes = runtime_versions(device.runtimes)
        key = group_key(device.hardware_class, runtimes)
        if key is None:
            continue
        groups.setdefault(key, []).append(table)
        versions[key] = runtimes
    out = {}
    for key, tables in groups.items():
        ranking = rank_tables(tables)
        if ranking:
            out[key] = SelectionHint(key[0], versions[key], tuple(ranking), len(tables))
    return out


def hints_for(store: Any, fleet: str, package_id: str, device_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Device id → the selection hint (as a statement carries it) for those of ``device_ids``
    whose hardware class and runtime versions already have a ranking for ``package_id``."""
    devices = store.devices(fleet)
    rankings = class_rankings(devices, store.events(fleet, kinds=[InstallEventKind.SELECTED],
                                                    package_id=package_id))
    if not rankings:
        return {}
    by_id = {d.device_id: d for d in devices}
    out = {}
    for device_id in device_ids:
        device = by_id.get(device_id)
        if device is None:
            continue
        key = group_key(device.hardware_class, runtime_versions(device.runtimes))
        if key in rankings:
            out[device_id] = rankings[key].to_dict()
    return out


def _finite_ms(value: Any) -> float | None:
    """A reported p50 as a float, or None when it is no finite number ≥ 0 (a 400-digit integer too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _text_ok(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT and value.isprintable()
