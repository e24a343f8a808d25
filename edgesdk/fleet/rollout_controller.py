"""The rollout controller (DESIGN §8, docs/rollouts.md): runs inside `edgesdk serve --fleet-key`
and drives every rollout of its fleet stored in the fleet store, one step per tick.

For each wave: sign the wave's statements and store them (state ``signed``), publish them
retained (``sent``), wait for each device's outcome (``active``, ``failed``, or ``unknown`` when
offline; no activation within the timeout is a failure), bake, then judge the gates
(`edgesdk.fleet.rollout_gates`). A failed gate, too little data for too long, or the operator's
abort rolls every touched device back to the release it ran before (signed rollback statements,
or an undeploy where it ran none), confirmed by the devices' own reports.

Every transition is one transaction, written only while this controller holds the rollout's
lease, so a `serve` killed at any point resumes where the store says: statements already signed
are re-published as the same bytes (a device takes a redelivered statement as already seen), a
wave already sent is not sent again, none is skipped. With several `serve` processes, one holds
each rollout's lease; another takes over once it lapses (`LEASE_S`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgesdk import protocol
from edgesdk.broker import BrokerConfig, disconnect
from edgesdk.errors import EdgeError, first_line
from edgesdk.fleet import rollouts as R
from edgesdk.fleet.deploy import _own_client, _publish_all, sign_for_devices, sign_undeploy
from edgesdk.fleet.repository import find_package
from edgesdk.fleet.rollout_data import DeviceNow, events_since, fleet_now, wave_data
from edgesdk.fleet.rollout_gates import (FAIL, INCONCLUSIVE, PASS, WAIT, WaveData, evaluate, failure_gate,
                                         verdict_of)
from edgesdk.fleet.rollouts import Decision, LeaseLost, RolloutDevice, RolloutRecord, RolloutWriter
from edgesdk.fleet.selection_hints import hints_for
from edgesdk.fleet.store import FleetStore
from edgesdk.protocol.statements import compare_versions

log = logging.getLogger(__name__)

TICK_S = 1.0
LEASE_S = 30.0  # a controller that stops renewing loses its rollouts to another after this
EVALUATE_EVERY_S = 5.0  # while a wave waits for data
EVENT_SKEW_S = 60.0  # device clocks: an outcome event up to this long before the send still counts
PUBLISH_TIMEOUT_S = 30.0


class RolloutController:
    """Drives the fleet's rollouts from the store; `start()`/`stop()` (a thread), or `step_all()`."""

    def __init__(self, broker_config: BrokerConfig, fleet: str, store: FleetStore, repo: Path,
                 fleet_key: Ed25519PrivateKey, *, owner: str | None = None, tick_s: float = TICK_S,
                 lease_s: float = LEASE_S, clock: Callable[[], float] = time.time) -> None:
        self.config, self.fleet, self.store, self.repo, self.key = broker_config, fleet, store, repo, fleet_key
        self.owner = owner or f"serve-{uuid.uuid4().hex[:8]}"
        self.tick_s, self.lease_s, self.clock = tick_s, lease_s, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._refused: dict[int, object] = {}
        self._last_eval: dict[tuple[str, int], float] = {}
        self._last_summaries: dict[tuple[str, int], tuple] = {}
        self.steps = 0
        self.cpu_s = 0.0  # CPU time this controller's thread spent in its steps

    # -- running ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop stepping and hand every lease this controller holds back (another serve takes its
        rollouts over at once, not after a lease period)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            for rollout in R.list_rollouts(self.store, self.fleet, active_only=True):
                if rollout.lease_owner == self.owner:
                    R.release_lease(self.store, rollout.id, self.owner)
        except EdgeError as exc:
            log.warning("rollout controller: leases not handed back: %s", exc)
        if self._client is not None:
            disconnect(self._client)
            self._client = None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.thread_time()
            try:
                self.step_all()
            except Exception as exc:  # noqa: BLE001 - a bad rollout or a store hiccup must not end the thread
                log.warning("rollout controller: %s", first_line(exc))
            self.cpu_s += time.thread_time() - started
            self._stop.wait(self.tick_s)

    def step_all(self) -> None:
        """One step of every rollout of the fleet that is still going and whose lease this holds."""
        for rollout in R.list_rollouts(self.store, self.fleet, active_only=True):
            now = self.clock()
            if not R.acquire_lease(self.store, rollout.id, self.owner, self.lease_s, now):
                continue
            try:
                self.step(rollout.id)
            except LeaseLost:
                continue
            except EdgeError as exc:
                log.warning("rollout %s: %s", rollout.id, exc)
            self.steps += 1

    def step(self, rollout_id: str) -> None:
        rollout = R.get_rollout(self.store, rollout_id)
        if rollout is None or rollout.final:
            return
        writer = RolloutWriter(self.store, rollout.id, self.owner)
        now = self.clock()
        if rollout.abort_requested and rollout.phase != R.ROLLING_BACK:
            self._halt(writer, rollout, "aborted by the operator", now, R.ABORTED)
            return
        if rollout.state == R.PENDING:
            writer.write(rollout={"state": R.RUNNING, "phase": R.SENDING, "wave": 0, "phase_at": now}, now=now)
            rollout = R.get_rollout(self.store, rollout.id)
            assert rollout is not None
        if rollout.paused and rollout.phase != R.ROLLING_BACK:
            return
        phase = rollout.phase
        if phase == R.SENDING:
            self._send_wave(writer, rollout, now)
        elif phase == R.ACTIVATING:
            self._watch_activation(writer, rollout, now)
        elif phase == R.BAKING:
            self._bake(writer, rollout, now)
        elif phase == R.ROLLING_BACK:
            self._roll_back(writer, rollout, now)

    # -- sending ---------------------------------------------------------------------------------
    def _send_wave(self, writer: RolloutWriter, rollout: RolloutRecord, now: float) -> None:
        devices = R.rollout_devices(self.store, rollout.id, rollout.wave)
        waiting = [d for d in devices if d.state == R.WAITING]
        if waiting:
            fleet = fleet_now(self.store, self.fleet, rollout.model, now)
            signed = self._sign(rollout, waiting, now)
            rows = []
            for d in waiting:
                was = fleet.get(d.device_id)
                rows.append((d.device_id, {
                    "state": R.SIGNED, "statement": signed[d.device_id].to_json().decode(),
                    "prev_package_id": was.package_id if was else None, "prev_version": was.version if was else None,
                    "prev_provider": was.provider if was else None}))
            writer.write(devices=rows, wave=(rollout.wave, {"sent_at": now}), now=now)
            devices = R.rollout_devices(self.store, rollout.id, rollout.wave)
        to_publish = [d for d in devices if d.state == R.SIGNED and d.statement]
        self._publish({protocol.device_desired(self.fleet, d.device_id, rollout.model): d.statement.encode()
                       for d in to_publish if d.statement})
        sent = self.clock()
        fleet = fleet_now(self.store, self.fleet, rollout.model, sent)
        rows = []
        for d in to_publish:
            status = fleet[d.device_id].status if d.device_id in fleet else "unknown"
            if status == "offline":  # it gets the retained statement when it connects: not a success now
                rows.append((d.device_id, {"state": R.UNKNOWN, "sent_at": sent,
                                           "reason": "offline when the wave was sent"}))
            else:
                rows.append((d.device_id, {"state": R.SENT, "sent_at": sent}))
        writer.write(rollout={"phase": R.ACTIVATING, "phase_at": sent}, devices=rows, now=sent)
        log.info("rollout %s: wave %d sent to %d devices", rollout.id, rollout.wave + 1, len(to_publish))

    def _sign(self, rollout: RolloutRecord, devices: list[RolloutDevice], now: float) -> dict[str, Any]:
        by_package: dict[str | None, list[str]] = {}
        for d in devices:
            by_package.setdefault(d.package_id, []).append(d.device_id)
        signed: dict[str, Any] = {}
        for package_id, ids in by_package.items():
            if package_id is None:
                signed.update(sign_undeploy(self.fleet, ids, rollout.model, self.key, rollout_id=rollout.id, now=now))
                continue
            published = find_package(self.repo, package_id)
            signed.update(sign_for_devices(published, self.fleet, ids, self.key, rollout_id=rollout.id,
                                           rollback=rollout.kind == "rollback", now=now,
                                           hints=hints_for(self.store, self.fleet, package_id, ids)))
        return signed

    def _publish(self, topics: dict[str, bytes | None]) -> None:
        if not topics:
            return
        if self._client is None or not self._client.is_connected():
            if self._client is not None:
                disconnect(self._client)
            self._refused = {}
            self._client = _own_client(self.config, self._refused, PUBLISH_TIMEOUT_S, "rollout")
        for part in _batches(topics, 2000):
            _publish_all(self.config, part, PUBLISH_TIMEOUT_S, self._client, self._refused)

    # -- activation ------------------------------------------------------------------------------
    def _watch_activation(self, writer: RolloutWriter, rollout: RolloutRecord, now: float) -> None:
        devices = R.rollout_devices(self.store, rollout.id, rollout.wave)
        pending = [d for d in devices if d.state == R.SENT]
        fleet = fleet_now(self.store, self.fleet, rollout.model, now)
        rows = self._outcomes(rollout, pending, fleet, now) if pending else []
        changed = {device_id: values for device_id, values in rows}
        states = [changed.get(d.device_id, {}).get("state", d.state) for d in devices]
        failed = states.count(R.FAILED)
        limit = rollout.spec.limits.max_failure_rate
        if limit is not None and failed / len(devices) > limit:
            # Even if every other device succeeds, the wave's failure rate is past the limit.
            writer.write(devices=rows, now=now)
            refreshed = R.rollout_devices(self.store, rollout.id, rollout.wave)
            decisions = [failure_gate(rollout.spec.limits, WaveData(rollout.wave, refreshed), now)]
            self._halt(writer, rollout, f"wave {rollout.wave + 1}: {decisions[0].summary}", now, R.HALTED,
                       decisions=decisions)
            return
        timed_out = now - (rollout.phase_at or now) >= rollout.spec.activation_timeout_s
        if timed_out:
            for d in pending:
                if d.device_id in changed:
                    continue
                status = fleet[d.device_id].status if d.device_id in fleet else "unknown"
                if status == "online":
                    rows.append((d.device_id, {"state": R.FAILED, "reason": "did not activate within "
                                               f"{rollout.spec.activation_timeout_s:g} s"}))
                else:
                    rows.append((d.device_id, {"state": R.UNKNOWN, "reason": f"{status}: no answer within "
                                               f"{rollout.spec.activation_timeout_s:g} s"}))
            changed = {device_id: values for device_id, values in rows}
        settled = all(changed.get(d.device_id, {}).get("state", d.state) != R.SENT for d in devices)
        if settled:
            writer.write(rollout={"phase": R.BAKING, "phase_at": now}, devices=rows,
                         wave=(rollout.wave, {"settled_at": now}), now=now)
            log.info("rollout %s: wave %d settled, baking %g s", rollout.id, rollout.wave + 1, rollout.spec.bake_s)
        elif rows:
            writer.write(devices=rows, now=now)

    def _outcomes(self, rollout: RolloutRecord, pending: list[RolloutDevice], fleet: dict[str, DeviceNow],
                  now: float) -> list[tuple[str, dict]]:
        """Devices of ``pending`` whose outcome is known now (``fleet``: the store's view of each
        device at ``now``): their new rows."""
        since = min(d.sent_at or now for d in pending) - EVENT_SKEW_S
        by_device: dict[str, list] = {}
        for e in events_since(self.store, self.fleet, rollout.model, since, [d.device_id for d in pending]):
            by_device.setdefault(e.device_id, []).append(e)
        rows = []
        for d in pending:
            current = fleet.get(d.device_id)
            outcome: dict[str, Any] | None = None
            for e in by_device.get(d.device_id, []):
                if e.at < (d.sent_at or now) - EVENT_SKEW_S or e.rollout_id not in (None, rollout.id):
                    continue
                if d.package_id is None:  # an undeploy
                    if e.kind == "undeployed":
                        outcome = {"state": R.ACTIVE, "activated_at": e.at}
                    continue
                if e.package_id != d.package_id and not (e.kind == "refused" and not e.package_id):
                    continue
                if e.kind == "activated":
                    outcome = {"state": R.ACTIVE, "activated_at": e.at}
                elif e.kind in ("failed", "rolled_back", "refused") and not e.retry:
                    outcome = {"state": R.FAILED, "reason": f"{e.kind}: {(e.reason or 'no reason given')[:400]}"}
            if outcome is None and current is not None and d.package_id and current.package_id == d.package_id:
                outcome = {"state": R.ACTIVE, "activated_at": current.state_at or now}  # already ran it: no event
            if outcome is not None and outcome["state"] == R.ACTIVE and current is not None:
                outcome["new_provider"] = current.provider if current.package_id == d.package_id else None
            if outcome is not None:
                rows.append((d.device_id, outcome))
        return rows

    # -- baking and the gates ----------------------------------------------------------------------
    def _bake(self, writer: RolloutWriter, rollout: RolloutRecord, now: float) -> None:
        spec = rollout.spec
        started = rollout.phase_at or now
        if now - started < spec.bake_s:
            return
        key = (rollout.id, rollout.wave)
        if now - self._last_eval.get(key, 0.0) < EVALUATE_EVERY_S and key in self._last_eval:
            return
        self._last_eval[key] = now
        decisions = self._judge(rollout, now)
        verdict = verdict_of(decisions)
        waited_out = verdict == WAIT and now - started >= spec.bake_s + spec.data_wait_s
        summaries = tuple((d.gate, d.verdict, d.summary) for d in decisions)
        fresh = [] if self._last_summaries.get(key) == summaries else decisions
        self._last_summaries[key] = summaries
        if verdict == FAIL:
            failed = next(d for d in decisions if d.verdict == FAIL)
            self._halt(writer, rollout, f"wave {rollout.wave + 1}: {failed.gate}: {failed.summary}", now, R.HALTED,
                       decisions=fresh, wave_verdict=FAIL)
        elif waited_out:
            waiting = next(d for d in decisions if d.verdict == WAIT)
            decision = Decision(rollout.wave, now, waiting.gate, INCONCLUSIVE, waiting.summary, waiting.evidence)
            self._halt(writer, rollout, f"wave {rollout.wave + 1}: inconclusive after "
                       f"{now - started:.0f} s: {waiting.gate}: {waiting.summary}", now, R.HALTED,
                       decisions=[*fresh, decision], wave_verdict=INCONCLUSIVE)
        elif verdict == PASS:
            last = rollout.wave + 1 >= rollout.waves
            wave = (rollout.wave, {"evaluated_at": now, "verdict": PASS})
            if last:
                counts = R.count_states(R.rollout_devices(self.store, rollout.id))
                writer.write(rollout={"state": R.COMPLETED, "phase": R.DONE, "finished_at": now, "phase_at": now,
                                      "outcome": f"completed: {_describe_counts(counts)}"},
                             wave=wave, decisions=fresh, now=now)
                log.info("rollout %s completed", rollout.id)
            else:
                writer.write(rollout={"wave": rollout.wave + 1, "phase": R.SENDING, "phase_at": now}, wave=wave,
                             decisions=fresh, now=now)
        elif fresh:
            writer.write(decisions=fresh, now=now)

    def _judge(self, rollout: RolloutRecord, now: float) -> list[Decision]:
        devices = R.rollout_devices(self.store, rollout.id)
        wave_devices = [d for d in devices if d.wave == rollout.wave]
        later = {d.device_id for d in devices if d.wave > rollout.wave}
        fleet = fleet_now(self.store, self.fleet, rollout.model, now)
        untouched: dict[str, DeviceNow] = {d: fleet[d] for d in later if d in fleet}
        # The new provider as the device reports it now (a re-selection may have changed it).
        refreshed = []
        for d in wave_devices:
            current = fleet.get(d.device_id)
            if d.state == R.ACTIVE and current is not None and current.package_id == d.package_id:
                d = replace(d, new_provider=current.provider)
            refreshed.append(d)
        sent = min((d.sent_at for d in wave_devices if d.sent_at), default=now)
        activated = min((d.activated_at for d in wave_devices if d.activated_at and d.state == R.ACTIVE), default=now)
        data = wave_data(self.store, self.fleet, rollout.model, rollout.wave, refreshed, untouched,
                         new_package={d.device_id: d.package_id for d in devices}, sent_at=sent,
                         activated_at=max(activated, sent), now=now, lookback_s=rollout.spec.old_window_s)
        return evaluate(rollout.spec.limits, data, now)

    # -- halting and rolling back ------------------------------------------------------------------
    def _halt(self, writer: RolloutWriter, rollout: RolloutRecord, reason: str, now: float, final_state: str,
              decisions: Iterable[Decision] = (), wave_verdict: str | None = None) -> None:
        """Stop sending and start rolling back; the rollout's final state (halted, or aborted:
        remembered in abort_requested) is written once the rollback is done."""
        wave = (rollout.wave, {"evaluated_at": now, "verdict": wave_verdict}) if wave_verdict else None
        writer.write(rollout={"phase": R.ROLLING_BACK, "phase_at": now, "outcome": reason, "state": R.RUNNING,
                              "abort_requested": int(final_state == R.ABORTED)},
                     wave=wave, decisions=decisions, now=now)
        log.warning("rollout %s halted: %s", rollout.id, reason)

    def _roll_back(self, writer: RolloutWriter, rollout: RolloutRecord, now: float) -> None:
        devices = R.rollout_devices(self.store, rollout.id)
        to_sign = [d for d in devices if d.state in R.TOUCHED]
        if to_sign:
            rows = []
            prior = {d.device_id: d.state for d in to_sign}
            for d, signed in self._sign_rollback(rollout, to_sign, now).items():
                rows.append((d, {"state": R.RB_SIGNED, "rollback_statement": signed.to_json().decode(),
                                 "prior_state": prior[d]}))
            writer.write(devices=rows, now=now)
            devices = R.rollout_devices(self.store, rollout.id)
        to_publish = [d for d in devices if d.state == R.RB_SIGNED and d.rollback_statement]
        if to_publish:
            self._publish({protocol.device_desired(self.fleet, d.device_id, rollout.model):
                           d.rollback_statement.encode() for d in to_publish if d.rollback_statement})
            sent = self.clock()
            writer.write(devices=[(d.device_id, {"state": R.RB_SENT, "rollback_sent_at": sent}) for d in to_publish],
                         now=sent)
            devices = R.rollout_devices(self.store, rollout.id)
        waiting = [d for d in devices if d.state == R.RB_SENT]
        rows = self._rollback_confirmations(rollout, waiting, now) if waiting else []
        confirmed = {d for d, _ in rows}
        timed_out = now - (rollout.phase_at or now) >= rollout.spec.activation_timeout_s
        if timed_out:
            rows += [(d.device_id, {"state": R.RB_UNCONFIRMED}) for d in waiting if d.device_id not in confirmed]
        if len(confirmed) == len(waiting) or timed_out:
            ended = {d: v["state"] for d, v in rows}
            counts = R.count_states(replace(d, state=ended.get(d.device_id, d.state)) for d in devices)
            final = R.ABORTED if rollout.abort_requested else R.HALTED
            back = counts.get(R.ROLLED_BACK, 0)
            unconfirmed = counts.get(R.RB_UNCONFIRMED, 0)
            tail = f"; rolled back {back} of {back + unconfirmed} touched devices" if back + unconfirmed else ""
            tail += f" ({unconfirmed} unconfirmed: offline or silent)" if unconfirmed else ""
            writer.write(rollout={"state": final, "phase": R.DONE, "finished_at": now,
                                  "outcome": f"{rollout.outcome or final}{tail}"}, devices=rows, now=now)
            log.warning("rollout %s %s%s", rollout.id, final, tail)
        elif rows:
            writer.write(devices=rows, now=now)

    def _sign_rollback(self, rollout: RolloutRecord, devices: list[RolloutDevice], now: float) -> dict[str, Any]:
        signed: dict[str, Any] = {}
        by_package: dict[str | None, list[RolloutDevice]] = {}
        for d in devices:
            by_package.setdefault(d.prev_package_id, []).append(d)
        for package_id, group in by_package.items():
            ids = [d.device_id for d in group]
            if package_id is None:
                signed.update(sign_undeploy(self.fleet, ids, rollout.model, self.key, rollout_id=rollout.id, now=now))
                continue
            published = find_package(self.repo, package_id)
            backwards = compare_versions(published.version, rollout.version) < 0
            signed.update(sign_for_devices(published, self.fleet, ids, self.key, rollout_id=rollout.id,
                                           rollback=backwards, now=now,
                                           hints=hints_for(self.store, self.fleet, package_id, ids)))
        return signed

    def _rollback_confirmations(self, rollout: RolloutRecord, waiting: list[RolloutDevice],
                                now: float) -> list[tuple[str, dict]]:
        """A device is back when the store shows it running its previous release (or no release of
        the model when it ran none) from a state it sent after the rollback statement, or it never
        switched (its install failed or it was offline)."""
        fleet = fleet_now(self.store, self.fleet, rollout.model, now)
        since = min(d.rollback_sent_at or now for d in waiting) - EVENT_SKEW_S
        events = events_since(self.store, self.fleet, rollout.model, since, [d.device_id for d in waiting])
        # Only this rollout's own rollback answers count (its statements carry its id).
        answered = {(e.device_id, e.package_id) for e in events
                    if e.kind in ("activated", "undeployed") and e.rollout_id == rollout.id}
        rows = []
        for d in waiting:
            current = fleet.get(d.device_id)
            if current is None:
                continue
            back = current.package_id == d.prev_package_id
            after = (current.state_at or 0) >= (d.rollback_sent_at or now) or (
                d.device_id, d.prev_package_id or "") in answered or (d.device_id, "") in answered
            # A device that failed the install, or was offline, when the rollout halted never left
            # its release. One still without an outcome (silent, or downloading) must answer.
            never_switched = d.prior_state in (R.FAILED, R.UNKNOWN) and d.activated_at is None
            if back and (after or never_switched):
                rows.append((d.device_id, {"state": R.ROLLED_BACK, "rollback_at": now}))
        return rows


def _describe_counts(counts: dict[str, int]) -> str:
    order = (R.ACTIVE, R.FAILED, R.UNKNOWN, R.ROLLED_BACK, R.RB_UNCONFIRMED, R.SENT, R.SIGNED, R.WAITING)
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))


def _batches(topics: dict[str, bytes | None], size: int) -> Iterable[dict[str, bytes | None]]:
    items = list(topics.items())
    for start in range(0, len(items), size):
        yield dict(items[start:start + size])
