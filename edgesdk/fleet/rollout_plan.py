"""Planning a rollout on the host, before anything is sent (`edgesdk rollout start`, `edgesdk
rollback`): which devices, which package each gets (by its target), in which wave, and the
release gate that refuses a release whose packaged task metric dropped.

Waves are *stratified* by hardware class: devices are interleaved class by class (each class in a
random order fixed by the rollout id), so the first waves reach every class in proportion and a
release that is slow only on one board is caught early, on few devices of that board.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgesdk.errors import ConfigError, FleetError
from edgesdk.fleet.records import NO_VALUE, DeviceRecord, ReleaseRecord
from edgesdk.fleet.rollout_spec import RolloutSpec, wave_sizes
from edgesdk.fleet.store import FleetStore
from edgesdk.protocol.statements import compare_versions

DEFAULT_MAX_METRIC_DROP = 1.0  # points: 0.01 of a 0..1 score (accuracy, mAP), 1 of a 0..100 score


class ReleaseGateError(FleetError):
    """The candidate's task metric dropped past --max-metric-drop (exit code 2, like a bad option)."""

    exit_code = 2


@dataclass(frozen=True)
class Plan:
    spec: RolloutSpec
    devices: list[tuple[str, str | None, str | None, str | None]]  # (id, hardware class, target, package id)
    sizes: list[int]
    releases: dict[str, ReleaseRecord]  # target -> the release's package for it
    gate: str  # the release gate's one-line verdict


def plan_rollout(store: FleetStore, spec: RolloutSpec, *, rollout_id: str, max_metric_drop: float | None,
                 force: bool = False) -> Plan:
    """Everything checked before the rollout is stored: ConfigError/FleetError name the problem."""
    candidates = store.find_release(spec.name, spec.version)
    if not candidates:
        known = sorted({r.version for r in store.releases(spec.name)})
        hint = f"published: {', '.join(f'{spec.name}@{v}' for v in known)}" if known else \
            f"no release named {spec.name!r}: `edgesdk publish` records them"
        raise ConfigError(f"{spec.release} is not published ({hint})")
    by_target = {r.target: r for r in candidates}
    devices = select_devices(store, spec)
    if spec.kind == "rollback":
        running = [d for d in devices if any(m.name == spec.name for m in d.models)]
        if not running:
            raise ConfigError(f"no selected device runs {spec.name}: nothing to roll back")
        devices = running
    if spec.kind == "deploy":
        newer = [(d.device_id, m.version) for d in devices for m in d.models
                 if m.name == spec.name and compare_versions(m.version, spec.version) > 0]
        if newer:
            raise ConfigError(f"{spec.release} is below the {spec.name}@{newer[0][1]} that "
                              f"{_few([d for d, _ in newer])} run: devices refuse a lower version from a deploy; "
                              f"use `edgesdk rollback {spec.name} --to {spec.version}`")
    only = next(iter(by_target.values())) if len(by_target) == 1 else None
    package_of: dict[str, ReleaseRecord] = {}
    missing: dict[str, list[str]] = {}
    for d in devices:
        # A device that reports no target (an older agent, the simulator) takes the release's only package.
        chosen = by_target.get(d.target) if d.target else only
        if chosen is None:
            missing.setdefault(d.target or "(not reported)", []).append(d.device_id)
        else:
            package_of[d.device_id] = chosen
    if missing:
        parts = [f"{t} ({_few(ids)})" for t, ids in sorted(missing.items())]
        raise ConfigError(f"{spec.release} has no package for target {', '.join(parts)} (published for "
                          f"{', '.join(sorted(by_target))}): publish one or narrow --select")
    ordered = stratified(devices, rollout_id)
    rows = [(d.device_id, d.hardware_class, d.target, package_of[d.device_id].package_id) for d in ordered]
    gate = "release gate skipped (a rollback returns to a known release)" if spec.kind == "rollback" else \
        release_gate(store, spec, devices, by_target, max_metric_drop, force)
    return Plan(spec, rows, wave_sizes(spec.waves, len(rows)), by_target, gate)


def select_devices(store: FleetStore, spec: RolloutSpec) -> list[DeviceRecord]:
    found = store.devices(spec.fleet, spec.select or None)
    if spec.devices:
        known = {d.device_id: d for d in found}
        unknown = [d for d in spec.devices if d not in known]
        if unknown:
            raise ConfigError(f"unknown device {', '.join(unknown[:5])} in fleet {spec.fleet}"
                              f"{' matching ' + _select_text(spec.select) if spec.select else ''}")
        found = [known[d] for d in dict.fromkeys(spec.devices)]
    if not found:
        where = f" matching {_select_text(spec.select)}" if spec.select else ""
        raise ConfigError(f"no device in fleet {spec.fleet}{where} (see `edgesdk devices list`)")
    return found


def stratified(devices: Sequence[DeviceRecord], seed: str) -> list[DeviceRecord]:
    """Devices interleaved across hardware classes, each class in an order fixed by ``seed``, so
    that every prefix holds each class within one device of its share (Tijdeman's chairman
    assignment: at each step, of the classes that may take one more without going a full device
    over their share, the one whose next device is due first)."""
    classes: dict[str, list[DeviceRecord]] = {}
    for d in devices:
        classes.setdefault(d.hardware_class or NO_VALUE, []).append(d)
    queues = sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    for _, members in queues:
        members.sort(key=lambda d: hashlib.sha256(f"{seed}/{d.device_id}".encode()).digest())
    total, k = len(devices), len(queues)
    delta = 1 / (2 * (k - 1)) if k > 1 else 0.0
    rates = [len(members) / total for _, members in queues]
    taken = [0] * k
    out: list[DeviceRecord] = []
    for step in range(1, total + 1):
        open_ = [i for i in range(k) if taken[i] < len(queues[i][1])]
        eligible = [i for i in open_ if rates[i] * step - taken[i] - delta >= -1e-9] or open_
        i = min(eligible, key=lambda c: ((taken[c] + 1 - delta) / rates[c], c))
        out.append(queues[i][1][taken[i]])
        taken[i] += 1
    return out


# -- the release gate ------------------------------------------------------------------------------
def task_score(release: ReleaseRecord) -> tuple[str, float] | None:
    """(metric name, the worst variant's score) from the manifest's task metric, or None when the
    package was built without --labels/--evaluator."""
    scores, name = [], None
    metrics = release.metrics if isinstance(release.metrics, Mapping) else {}
    for variant in metrics.values():
        task = variant.get("task") if isinstance(variant, Mapping) else None
        if isinstance(task, Mapping) and isinstance(task.get("variant"), (int, float)) \
                and not isinstance(task.get("variant"), bool):
            scores.append(float(task["variant"]))
            name = name or str(task.get("name") or "task metric")
    return (name or "task metric", min(scores)) if scores else None


def release_gate(store: FleetStore, spec: RolloutSpec, devices: Sequence[DeviceRecord],
                 by_target: Mapping[str, ReleaseRecord], max_drop: float | None, force: bool) -> str:
    """Compare the candidate's task metric with the release(s) it replaces on these devices (the
    package each runs now): ReleaseGateError past ``max_drop`` points unless ``force``."""
    if max_drop is None:
        return "release gate off (--max-metric-drop off)"
    replaced: dict[str, ReleaseRecord] = {}
    for d in devices:
        model = next((m for m in d.models if m.name == spec.name), None)
        if model is not None and model.package_id not in replaced:
            found = store.release(model.package_id)
            if found is not None and found.package_id not in {r.package_id for r in by_target.values()}:
                replaced[found.package_id] = found
    if not replaced:
        return "release gate: nothing replaced (a first install)"
    lines, worst = [], None
    for old in sorted(replaced.values(), key=lambda r: (r.version, r.target)):
        new = by_target.get(old.target) or next(iter(by_target.values()))
        new_score, old_score = task_score(new), task_score(old)
        if new_score is None or old_score is None:
            which = ("neither release" if new_score is None and old_score is None else
                     "the candidate" if new_score is None else f"{old.name}@{old.version}")
            lines.append(f"{old.name}@{old.version} ({old.target}): no task metric to compare ({which} was "
                         "packaged without --labels/--evaluator)")
            continue
        point = 0.01 if max(abs(new_score[1]), abs(old_score[1])) <= 1.0 else 1.0
        drop = (old_score[1] - new_score[1]) / point
        lines.append(f"{new_score[0]} {new_score[1]:.4g} vs {old_score[1]:.4g} for {old.name}@{old.version} "
                     f"on {old.target} ({-drop:+.2f} points)")
        if worst is None or drop > worst[0]:
            worst = (drop, old, new_score, old_score)
    summary = "; ".join(lines)
    if worst is not None and worst[0] > max_drop:
        drop, old, new_score, old_score = worst
        message = (f"release gate: {spec.release} scores {new_score[0]} {new_score[1]:.4g}, {drop:.2f} points below "
                   f"{old.name}@{old.version} ({old_score[1]:.4g}); the limit is {max_drop:g} "
                   "(--max-metric-drop; --force deploys anyway)")
        if not force:
            raise ReleaseGateError(message)
        return message + " — forced"
    if worst is None:
        return f"release gate: nothing to compare: {summary}"
    return f"release gate passed: {summary}"


def _few(ids: Sequence[str], limit: int = 5) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _select_text(select: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(select.items()))
