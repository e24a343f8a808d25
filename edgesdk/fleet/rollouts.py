"""Staged rollouts as the fleet store keeps them (DESIGN §8, docs/rollouts.md): the rollout (its
spec, where it is, who runs it), each device's part in it, each wave's timing and every gate
decision with its evidence.

The controller (`edgesdk.fleet.rollout_controller`) is the only writer of a running rollout and
writes only while it holds the rollout's lease (`acquire_lease`; every update says ``WHERE
lease_owner = me``), so two `serve` processes never both drive one rollout. The CLI writes a new
rollout (`create_rollout`) and the operator's requests (`request`: pause, resume, abort), which the
controller acts on at its next step.

Device states::

    waiting ──> signed ──> sent ──> active                    (activated the release)
                              └──> failed                    (failed/refused, or no activation in time)
                              └──> unknown                   (offline: never counted a success)
    any touched ──> rollback_signed ──> rollback_sent ──> rolled_back | rollback_unconfirmed
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgesdk.errors import ConfigError, FleetError
from edgesdk.fleet.rollout_spec import RolloutSpec
from edgesdk.fleet.store_queries import from_json, to_json
from edgesdk.fleet.store_schema import chunks

if TYPE_CHECKING:
    from edgesdk.fleet.store import FleetStore
    from edgesdk.fleet.store_schema import Transaction

# Rollout states; the last three are final.
PENDING, RUNNING, COMPLETED, HALTED, ABORTED = "pending", "running", "completed", "halted", "aborted"
FINAL_STATES = (COMPLETED, HALTED, ABORTED)
# Phases of a running rollout's current wave.
SENDING, ACTIVATING, BAKING, ROLLING_BACK, DONE = "sending", "activating", "baking", "rolling_back", "done"
# Device states.
WAITING, SIGNED, SENT, ACTIVE, FAILED, UNKNOWN = "waiting", "signed", "sent", "active", "failed", "unknown"
RB_SIGNED, RB_SENT, ROLLED_BACK, RB_UNCONFIRMED = ("rollback_signed", "rollback_sent", "rolled_back",
                                                  "rollback_unconfirmed")
TOUCHED = (SIGNED, SENT, ACTIVE, FAILED, UNKNOWN)  # a statement of this rollout may have reached it

_ROLLOUT_COLUMNS = ("id, fleet, model, version, kind, spec, state, phase, wave, waves, phase_at, created_at, "
                    "updated_at, finished_at, paused, abort_requested, outcome, lease_owner, lease_until")
_DEVICE_COLUMNS = ("device_id, wave, hardware_class, target, package_id, state, prev_package_id, prev_version, "
                   "prev_provider, new_provider, statement, sent_at, activated_at, rollback_statement, "
                   "rollback_sent_at, rollback_at, reason, prior_state")


@dataclass(frozen=True)
class RolloutRecord:
    id: str
    fleet: str
    model: str
    version: str
    kind: str
    spec: RolloutSpec
    state: str
    phase: str
    wave: int  # the current wave, 0-based
    waves: int
    phase_at: float | None
    created_at: float
    updated_at: float
    finished_at: float | None
    paused: bool
    abort_requested: bool
    outcome: str | None  # why it ended (halt reason, "completed", "aborted by the operator")
    lease_owner: str | None
    lease_until: float | None

    @property
    def release(self) -> str:
        return f"{self.model}@{self.version}"

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class RolloutDevice:
    device_id: str
    wave: int
    hardware_class: str | None
    target: str | None
    package_id: str | None  # the package this device is told to run (None: an undeploy)
    state: str
    prev_package_id: str | None = None  # what it ran before this rollout touched it (None: nothing)
    prev_version: str | None = None
    prev_provider: str | None = None
    new_provider: str | None = None
    statement: str | None = None  # the signed statement's JSON, as published
    sent_at: float | None = None
    activated_at: float | None = None
    rollback_statement: str | None = None
    rollback_sent_at: float | None = None
    rollback_at: float | None = None
    reason: str | None = None
    prior_state: str | None = None  # its state when the rollout halted (what its rollback must confirm)


@dataclass(frozen=True)
class WaveRecord:
    wave: int
    size: int
    sent_at: float | None = None
    settled_at: float | None = None  # every device active, failed or unknown
    evaluated_at: float | None = None
    verdict: str | None = None  # pass | fail | inconclusive


@dataclass(frozen=True)
class Decision:
    wave: int
    at: float
    gate: str
    verdict: str  # pass | fail | wait | inconclusive | n/a
    summary: str  # one line
    evidence: dict[str, Any] = field(default_factory=dict)


def count_states(devices: Iterable[RolloutDevice]) -> dict[str, int]:
    """How many of ``devices`` are in each state."""
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.state] = counts.get(d.state, 0) + 1
    return counts


def new_rollout_id(now: float | None = None) -> str:
    """``ro-YYYYMMDD-xxxxxx``: sortable by day, unique, short enough to type."""
    day = time.strftime("%Y%m%d", time.gmtime(time.time() if now is None else now))
    return f"ro-{day}-{uuid.uuid4().hex[:6]}"


def _rollout(row: Sequence[Any]) -> RolloutRecord:
    (rid, fleet, model, version, kind, spec, state, phase, wave, waves, phase_at, created, updated, finished,
     paused, abort, outcome, owner, until) = row
    return RolloutRecord(rid, fleet, model, version, kind, RolloutSpec.from_dict(from_json(spec, {})), state, phase,
                         int(wave), int(waves), phase_at, created, updated, finished, bool(paused), bool(abort),
                         outcome, owner, until)


def _device(row: Sequence[Any]) -> RolloutDevice:
    return RolloutDevice(*row[:2], *row[2:])


# -- the CLI side ----------------------------------------------------------------------------------
def create_rollout(store: FleetStore, spec: RolloutSpec, devices: Sequence[tuple[str, str | None, str | None,
                                                                                 str | None]],
                   wave_sizes: Sequence[int], *, rollout_id: str | None = None,
                   now: float | None = None) -> RolloutRecord:
    """Store a new pending rollout; ``devices`` are (device_id, hardware_class, target, package_id)
    in wave order, ``wave_sizes`` how many each wave takes (summing to len(devices))."""
    if sum(wave_sizes) != len(devices) or not devices:
        raise FleetError(f"rollout of {spec.release}: {len(devices)} devices do not fill waves {list(wave_sizes)}")
    at = time.time() if now is None else now
    rid = rollout_id or new_rollout_id(at)
    wave_of = [w for w, size in enumerate(wave_sizes) for _ in range(size)]
    rows = [(rid, d, wave_of[i], hw, target, pid, WAITING) for i, (d, hw, target, pid) in enumerate(devices)]

    def write(tx: Transaction) -> None:
        tx.execute(f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS}) VALUES ({', '.join('?' * 19)})",
                   (rid, spec.fleet, spec.name, spec.version, spec.kind, to_json(spec.to_dict()), PENDING, SENDING,
                    0, len(wave_sizes), None, at, at, None, 0, 0, None, None, None))
        tx.executemany("INSERT INTO rollout_devices (rollout_id, device_id, wave, hardware_class, target, package_id, "
                       "state) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        tx.executemany("INSERT INTO rollout_waves (rollout_id, wave, size) VALUES (?, ?, ?)",
                       [(rid, w, size) for w, size in enumerate(wave_sizes)])

    store.transact(write, write=True)
    found = get_rollout(store, rid)
    assert found is not None
    return found


def get_rollout(store: FleetStore, ref: str) -> RolloutRecord | None:
    """The rollout with id ``ref``, or the one whose id starts with it; None when none does.
    ConfigError when the prefix is ambiguous."""
    rows = store.transact(lambda tx: tx.query(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?", (ref,)))
    if not rows and ref:
        rows = store.transact(lambda tx: tx.query(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 3",
            (len(ref), ref)))
        if len(rows) > 1:
            raise ConfigError(f"rollout {ref!r} is ambiguous: {', '.join(r[0] for r in rows)}, …")
    return _rollout(rows[0]) if rows else None


def list_rollouts(store: FleetStore, fleet: str | None = None, *, active_only: bool = False,
                  limit: int | None = None) -> list[RolloutRecord]:
    """Rollouts, newest first."""
    where, params = ["1 = 1"], []
    if fleet is not None:
        where.append("fleet = ?")
        params.append(fleet)
    if active_only:
        where.append(f"state NOT IN ({', '.join('?' * len(FINAL_STATES))})")
        params.extend(FINAL_STATES)
    sql = f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE {' AND '.join(where)} ORDER BY created_at DESC, id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [_rollout(r) for r in store.transact(lambda tx: tx.query(sql, params))]


def rollout_devices(store: FleetStore, rollout_id: str, wave: int | None = None) -> list[RolloutDevice]:
    sql, params = f"SELECT {_DEVICE_COLUMNS} FROM rollout_devices WHERE rollout_id = ?", [rollout_id]
    if wave is not None:
        sql += " AND wave = ?"
        params.append(wave)
    rows = store.transact(lambda tx: tx.query(sql + " ORDER BY wave, device_id", params))
    return [_device(r) for r in rows]


def rollout_waves(store: FleetStore, rollout_id: str) -> list[WaveRecord]:
    rows = store.transact(lambda tx: tx.query(
        "SELECT wave, size, sent_at, settled_at, evaluated_at, verdict FROM rollout_waves WHERE rollout_id = ? "
        "ORDER BY wave", (rollout_id,)))
    return [WaveRecord(*r) for r in rows]


def decisions(store: FleetStore, rollout_id: str) -> list[Decision]:
    rows = store.transact(lambda tx: tx.query(
        "SELECT wave, at, gate, verdict, summary, evidence FROM rollout_decisions WHERE rollout_id = ? "
        "ORDER BY at, id", (rollout_id,)))
    return [Decision(w, at, gate, verdict, summary, from_json(evidence, {})) for w, at, gate, verdict, summary,
            evidence in rows]


def request(store: FleetStore, rollout_id: str, *, paused: bool | None = None, abort: bool = False,
            now: float | None = None) -> RolloutRecord:
    """The operator's pause/resume/abort: recorded for the controller's next step. FleetError for a
    rollout that already ended."""
    at = time.time() if now is None else now
    found = get_rollout(store, rollout_id)
    if found is None:
        raise ConfigError(f"no rollout {rollout_id!r} (see `edgesdk rollout list`)")
    if found.final:
        raise FleetError(f"rollout {found.id} already ended ({found.state}: {found.outcome or '—'})")
    sets, params = ["updated_at = ?"], [at]
    if paused is not None:
        sets.append("paused = ?")
        params.append(int(paused))
    if abort:
        sets.append("abort_requested = 1")
    store.transact(lambda tx: tx.execute(f"UPDATE rollouts SET {', '.join(sets)} WHERE id = ?",
                                         (*params, found.id)), write=True)
    again = get_rollout(store, found.id)
    assert again is not None
    return again


# -- the controller side ---------------------------------------------------------------------------
def acquire_lease(store: FleetStore, rollout_id: str, owner: str, lease_s: float, now: float) -> bool:
    """Take or renew the rollout's lease for ``owner``: True when it holds it until now + lease_s.
    Another owner's lease is taken only once it has lapsed (that controller stopped renewing)."""
    changed = store.transact(lambda tx: tx.execute(
        "UPDATE rollouts SET lease_owner = ?, lease_until = ? WHERE id = ? AND state NOT IN (?, ?, ?) AND "
        "(lease_owner IS NULL OR lease_owner = ? OR lease_until IS NULL OR lease_until < ?)",
        (owner, now + lease_s, rollout_id, *FINAL_STATES, owner, now)), write=True)
    return changed == 1


def release_lease(store: FleetStore, rollout_id: str, owner: str) -> None:
    store.transact(lambda tx: tx.execute(
        "UPDATE rollouts SET lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ?",
        (rollout_id, owner)), write=True)


class LeaseLost(FleetError):
    """Another controller holds the rollout now: this one stops touching it."""


class RolloutWriter:
    """The controller's writes to one rollout, each in one transaction and each only while
    ``owner`` holds the lease (LeaseLost otherwise: nothing was written)."""

    def __init__(self, store: FleetStore, rollout_id: str, owner: str) -> None:
        self.store, self.id, self.owner = store, rollout_id, owner

    def _guarded(self, tx: Transaction) -> None:
        held = tx.query("SELECT lease_owner FROM rollouts WHERE id = ?", (self.id,))
        if not held or held[0][0] != self.owner:
            raise LeaseLost(f"rollout {self.id}: the lease is held by {held[0][0] if held and held[0][0] else 'nobody'}")

    def write(self, *, rollout: Mapping[str, Any] | None = None,
              devices: Iterable[tuple[str, Mapping[str, Any]]] = (),
              wave: tuple[int, Mapping[str, Any]] | None = None,
              decisions: Iterable[Decision] = (), now: float | None = None) -> None:
        """One transition: rollout columns, device rows (device_id, columns), one wave's columns and
        new decisions, all or nothing."""
        at = time.time() if now is None else now
        device_rows = list(devices)
        new_decisions = list(decisions)

        def apply(tx: Transaction) -> None:
            self._guarded(tx)
            columns = {**(rollout or {}), "updated_at": at}
            tx.execute(f"UPDATE rollouts SET {', '.join(f'{k} = ?' for k in columns)} WHERE id = ?",
                       (*columns.values(), self.id))
            by_columns: dict[tuple[str, ...], list[tuple]] = {}
            for device_id, values in device_rows:
                by_columns.setdefault(tuple(values), []).append((*values.values(), self.id, device_id))
            for names, rows in by_columns.items():
                sql = (f"UPDATE rollout_devices SET {', '.join(f'{k} = ?' for k in names)} WHERE rollout_id = ? "
                       "AND device_id = ?")
                for part in chunks(rows, 1000):
                    tx.executemany(sql, list(part))
            if wave is not None:
                number, values = wave
                tx.execute(f"UPDATE rollout_waves SET {', '.join(f'{k} = ?' for k in values)} WHERE rollout_id = ? "
                           "AND wave = ?", (*values.values(), self.id, number))
            tx.executemany("INSERT INTO rollout_decisions (rollout_id, wave, at, gate, verdict, summary, evidence) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(self.id, d.wave, d.at, d.gate, d.verdict, d.summary, to_json(d.evidence))
                            for d in new_decisions])

        self.store.transact(apply, write=True)
