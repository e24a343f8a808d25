"""One simulated device: what it runs, which statements it obeys, and the messages it sends.

No I/O here: the loop (edgesdk/sim/loop.py) hands a device what arrived and publishes what the
device returns, so these rules are the same whatever drives them.

Statements are checked as the agent checks them (agent/statement_guard.py; docs/protocol.md), in
this order: the statement's name is its topic's → a trusted fleet key signed it (a trust root
must not have expired) → it is addressed to this device and fleet and within its validity window →
its serial is above the last accepted one *for that name* (the same statement redelivered is
recognised by the sha256 of its signed bytes) → it does not lower the version of the name the
device runs unless it is a rollback. The guard itself is not reused: it records every serial in an
fsynced file per device, which 5,000 devices in one process must not do; serials live in memory
(a restarted simulator obeys the retained statements again, as a freshly flashed device would).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgesdk import __version__
from edgesdk.errors import ProtocolError, TrustError
from edgesdk.protocol import (DeploymentStatement, DeviceState, InstallEvent, InstallEventKind, SignedStatement,
                              TelemetryWindow, compare_versions, device_desired_filter, device_events,
                              device_state, device_telemetry)
from edgesdk.sim.behaviour import ReleaseBehaviour
from edgesdk.sim.windows import HEARTBEAT, ModelContext, device_factor, draw, draw_load, empty_draw, window
from edgesdk.trustroot import TrustRoot

K = InstallEventKind
DEPLOY_STEPS = (K.DOWNLOADING, K.DOWNLOADED, K.VERIFIED, K.EXTRACTED, K.SELECTED, K.HEALTH_CHECKED, K.ACTIVATED)
FAILABLE = (K.VERIFIED, K.EXTRACTED, K.SELECTED, K.HEALTH_CHECKED)  # where a simulated install may fail


@dataclass(frozen=True)
class FleetTrust:
    """Whom the simulated devices believe: fixed fleet keys, or the fleet keys of a trust root."""

    keys: tuple[Ed25519PublicKey, ...] = ()
    root: TrustRoot | None = None

    def fleet_keys(self, now: float) -> list[Ed25519PublicKey]:
        if self.root is not None:
            self.root.check_not_expired(now)  # a frozen fleet (no new root) stops steering devices
            return self.root.keys_for("fleet")
        if not self.keys:
            raise TrustError("no trusted fleet key: the simulator was started without --fleet-key-pub or "
                             "--trust-root")
        return list(self.keys)


@dataclass
class ActiveModel:
    name: str
    version: str
    package_id: str
    behaviour: ReleaseBehaviour
    since: float  # start of its open telemetry window
    scale: float = 1.0  # this device's fixed latency factor for the release (behaviour.device_spread)

    @property
    def context(self) -> ModelContext:
        return ModelContext(self.name, self.package_id, self.behaviour.variant, self.behaviour.provider)

    def entry(self) -> dict[str, Any]:
        """Its DeviceState.models entry."""
        b = self.behaviour
        return {"name": self.name, "version": self.version, "package_id": self.package_id, "variant": b.variant,
                "provider": b.provider, "runtime": b.runtime}


@dataclass
class InstallRun:
    """The steps left of obeying one statement; the loop runs one step per ``step_s`` simulated seconds."""

    statement: DeploymentStatement
    behaviour: ReleaseBehaviour | None  # None for an undeploy
    steps: list[InstallEventKind]
    step_s: float
    failure: str | None = None  # reason of the FAILED step, when the install fails
    done: int = 0


@dataclass
class Verdict:
    """What a device made of one desired message: ``run`` to start, or an ``event`` (refused), or
    neither (an ignored message: a cleared payload or a statement redelivered)."""

    run: InstallRun | None = None
    event: InstallEvent | None = None
    redelivered: bool = False


@dataclass(frozen=True)
class DeviceTopics:
    """A device's topics, built once (each topic function checks the ids again)."""

    state: str
    events: str
    telemetry: str
    desired: str  # the subscription filter devices/{id}/desired/+

    @classmethod
    def of(cls, fleet: str, device_id: str) -> DeviceTopics:
        return cls(device_state(fleet, device_id), device_events(fleet, device_id),
                   device_telemetry(fleet, device_id), device_desired_filter(fleet, device_id))


@dataclass
class SimDevice:
    index: int
    device_id: str
    fleet: str
    hardware_class: str | None
    labels: dict[str, str]
    telemetry_interval_s: float
    seed: int = 0  # the simulator's seed: with the index, it fixes the device's device_factor
    models: dict[str, ActiveModel] = field(default_factory=dict)
    installs: dict[str, InstallRun] = field(default_factory=dict)  # name -> run in progress
    serials: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (serial, sha256 of statement)
    # Windows of releases replaced or undeployed since the last roll: (context, behaviour, scale, start, end).
    closed: list[tuple[ModelContext, ReleaseBehaviour, float, float, float]] = field(default_factory=list)
    seq: int = 0
    dropped_windows: int = 0
    last_roll: float = 0.0  # start of the heartbeat window (no model active)
    # Loop bookkeeping (edgesdk/sim/loop.py): the paho client, connection state, backoff.
    client: Any = None
    connected: bool = False
    ever_connected: bool = False
    attempts: int = 0
    reconnect_pending: bool = False
    topics: DeviceTopics = field(init=False)

    def __post_init__(self) -> None:
        self.topics = DeviceTopics.of(self.fleet, self.device_id)

    # -- state -----------------------------------------------------------------------------------
    def state(self, online: bool, now: float) -> DeviceState:
        models = [m.entry() for _, m in sorted(self.models.items())]
        only = next(iter(self.models.values())) if len(self.models) == 1 else None
        return DeviceState(
            device_id=self.device_id, online=online, agent_version=f"edgesdk-sim {__version__}",
            hardware={"arch": "simulated", "board": self.hardware_class},
            runtimes=_runtimes(self.models.values()), labels=dict(self.labels), hardware_class=self.hardware_class,
            telemetry_interval_s=self.telemetry_interval_s, models=models,
            active_package=only.package_id if only else None, active_variant=only.behaviour.variant if only else None,
            provider=only.behaviour.provider if only else None, updated_at=now, extra={"simulated": True})

    def active_version(self, name: str) -> str | None:
        model = self.models.get(name)
        return model.version if model else None

    # -- statements --------------------------------------------------------------------------------
    def consider(self, topic_name: str, payload: bytes, topic: str, trust: FleetTrust, now: float,
                 behaviour_of: Any, rng: np.random.Generator) -> Verdict:
        """Apply the statement rules (module docstring) to one `desired/{topic_name}` message.
        ``behaviour_of(name, version, hardware_class)`` gives a release's ReleaseBehaviour."""
        if not payload:  # a cleared retained statement changes nothing (docs/protocol.md)
            return Verdict()
        try:
            signed = SignedStatement.from_json(payload, topic)
        except ProtocolError as exc:
            return self._refuse("", str(exc), topic_name, now)
        statement = signed.statement
        if statement.name != topic_name:
            return self._refuse(statement.package_id, f"misfiled statement refused: it is for model "
                                f"{statement.name!r} but arrived on desired/{topic_name}", topic_name, now)
        try:
            signed.verify(trust.fleet_keys(now))
            statement.check_addressed(self.fleet, self.device_id, now)
            digest = hashlib.sha256(signed.signed_bytes).hexdigest()
            serial, last_digest = self.serials.get(statement.name, (0, ""))
            if statement.serial == serial and digest == last_digest:
                return Verdict(redelivered=True)
            if statement.serial <= serial:
                raise TrustError(f"replayed statement: serial {statement.serial} for {statement.name} is not "
                                 f"above the last accepted {serial}")
            current = self.active_version(statement.name)
            if (current is not None and not statement.undeploy and not statement.rollback
                    and compare_versions(statement.version, current) < 0):
                raise TrustError(f"downgrade refused: {statement.name}@{statement.version} is below the running "
                                 f"{statement.name}@{current} and the statement is not a rollback")
        except TrustError as exc:
            return self._refuse(statement.package_id, str(exc), statement.name, now)
        self.serials[statement.name] = (statement.serial, digest)
        return Verdict(run=self._plan(statement, behaviour_of, rng))

    def _refuse(self, package_id: str, reason: str, name: str | None, now: float) -> Verdict:
        return Verdict(event=InstallEvent(kind=K.REFUSED, package_id=package_id, at=now, model=name,
                                          reason=reason[:500]))

    def _plan(self, statement: DeploymentStatement, behaviour_of: Any, rng: np.random.Generator) -> InstallRun:
        if statement.undeploy:
            current = self.models.get(statement.name)
            step_s = current.behaviour.install_s / (len(DEPLOY_STEPS) - 1) if current else 0.0
            return InstallRun(statement, None, [K.UNDEPLOYED], step_s)
        behaviour = behaviour_of(statement.name, statement.version, self.hardware_class)
        steps = list(DEPLOY_STEPS)
        failure = None
        if behaviour.install_failure_rate > 0 and rng.random() < behaviour.install_failure_rate:
            at = FAILABLE[int(rng.integers(len(FAILABLE)))]
            steps = steps[:steps.index(at)] + [K.FAILED]
            failure = f"simulated install failure at {at.value} ({statement.name}@{statement.version})"
        return InstallRun(statement, behaviour, steps, behaviour.install_s / (len(DEPLOY_STEPS) - 1), failure)

    # -- installs ----------------------------------------------------------------------------------
    def step(self, run: InstallRun, now: float) -> tuple[InstallEvent, bool]:
        """Run the next step of ``run``: its event, and whether the device's state changed."""
        kind = run.steps[run.done]
        run.done += 1
        statement = run.statement
        common = {"at": now, "model": statement.name, "rollout_id": statement.rollout_id}
        if kind is K.UNDEPLOYED:
            removed = self.models.pop(statement.name, None)
            if removed is not None:
                self.closed.append((removed.context, removed.behaviour, removed.scale, removed.since, now))
            return InstallEvent(kind=kind, package_id=removed.package_id if removed else "", **common), \
                removed is not None
        if kind is K.FAILED:
            return InstallEvent(kind=kind, package_id=statement.package_id, reason=run.failure, **common), False
        details: dict[str, Any] = {}
        b = run.behaviour
        if kind is K.DOWNLOADING:
            details["progress"] = 0.0
        elif kind is K.SELECTED and b is not None:  # a deploy run always has a behaviour
            details["table"] = [{"variant": b.variant, "provider": b.provider, "runtime": b.runtime,
                                 "p50_ms": b.p50_ms, "selected": True}]
        event = InstallEvent(kind=kind, package_id=statement.package_id, **common, **details)
        if kind is K.ACTIVATED and b is not None:
            self.activate(statement.name, statement.version, statement.package_id, b, now)
            return event, True
        return event, False

    def activate(self, name: str, version: str, package_id: str, behaviour: ReleaseBehaviour, now: float) -> None:
        """Make ``name@version`` the active release of ``name``; the old one's window closes now."""
        old = self.models.get(name)
        if old is not None:
            self.closed.append((old.context, old.behaviour, old.scale, old.since, now))
        scale = device_factor(self.seed, self.index, behaviour.device_spread)
        self.models[name] = ActiveModel(name, version, package_id, behaviour, now, scale)

    # -- telemetry ---------------------------------------------------------------------------------
    def roll(self, now: float, rng: np.random.Generator, send: bool) -> list[TelemetryWindow]:
        """Close the open windows at ``now``: one per release that ran since the last roll (as the
        agent, ordered by model name), or a heartbeat when none did. Each takes the next seq. When
        ``send`` is False (offline) the windows are dropped and counted in ``dropped_windows``."""
        parts: list[tuple[ModelContext, ReleaseBehaviour | None, float, float, float]] = list(self.closed)
        self.closed.clear()
        for model in self.models.values():
            parts.append((model.context, model.behaviour, model.scale, model.since, now))
            model.since = now
        if not parts:
            parts.append((HEARTBEAT, None, 1.0, self.last_roll, now))
        self.last_roll = now
        parts.sort(key=lambda p: (p[0].model or "", p[0].package_id or ""))
        first, self.seq = self.seq, self.seq + len(parts)
        if not send:
            self.dropped_windows += len(parts)
            return []
        interval = self.telemetry_interval_s
        # One load per device and window, shared by every release it ran (load is the device's, not
        # the model's); drawn only when a release has jitter, so without it the draws are unchanged.
        load = draw_load(rng) if any(p[1] is not None and p[1].jitter > 0 for p in parts) else None
        return [window(seq, start, end, ctx,
                       draw(rng, b, end - start, interval, scale=scale, load=load) if b else empty_draw(),
                       self.dropped_windows)
                for seq, (ctx, b, scale, start, end) in enumerate(parts, start=first)]


def _runtimes(models: Iterable[ActiveModel]) -> dict[str, Any]:
    runtimes: dict[str, set[str]] = {}
    for model in models:
        runtimes.setdefault(model.behaviour.runtime, set()).add(model.behaviour.provider)
    return {rt: {"version": "simulated", "providers": sorted(provs)} for rt, provs in sorted(runtimes.items())}
