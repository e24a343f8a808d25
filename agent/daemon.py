"""The `edge-agent run` daemon: MQTT wiring, the install worker, telemetry windows, the local API.

Threads: paho's network loop (connects, reconnects with backoff — also when the broker is down
at start), one install worker fed by the retained `desired/{name}` statements (per model name the
newest wins; names are installed one at a time, in arrival order, while every other model keeps
serving), one telemetry loop (roll one window per model → spool it on disk → flush the spool in
order while connected), and the HTTP API. The broker connection, the hardware probe, the providers, the session factory
and the clock are constructor parameters so tests can inject faults; integration tests run it
against a real Mosquitto.
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from edgesdk import __version__
from edgesdk.broker import BrokerConfig, JitteredBackoff, TlsConfig, Will, make_client, parse_broker_url
from edgesdk.errors import EdgeError, ProtocolError, TrustError, describe_os_error
from edgesdk.protocol import (DeviceState, InstallEvent, InstallEventKind, SignedStatement, device_desired_filter,
                              device_events, device_state, device_telemetry, parse_desired_name, trust_root_topic)
from edgesdk.trustroot import parse_root_chain

from agent.api import ApiServer, parse_address
from agent.config import AgentConfig
from agent.engine_cache import ENGINES, EngineCache
from agent.hardware import HardwareInfo, choose_target, probe_hardware
from agent.installer import Installer, InstallOutcome
from agent.model_host import ModelHost
from agent.spool import SpoolLimits, TelemetrySpool
from agent.statement_guard import Accepted, StatementGuard
from agent.store import VersionStore
from agent.telemetry import LatencyRecorder
from agent.transfer import PackageFetcher

log = logging.getLogger("edge-agent")
PUBLISH_TIMEOUT_S = 10.0  # every wait for a PUBACK is bounded (a dead broker must not hang us)
# A stalled download is retried after a jittered delay growing from RETRY_MIN_S to RETRY_MAX_S.
RETRY_MIN_S, RETRY_MAX_S = 30.0, 900.0
GC_INTERVAL_S = 600.0  # how often the idle install worker frees the disk of undeployed models
PROBE_CACHE_NAME = "runtime-probe.json"  # the runtime/provider probe's answer, in data_dir


def guarded(where: str) -> Callable:
    """Run a callback or loop step so that nothing it raises escapes: one log line, one count, one
    event, and the thread goes on (paho's network thread, the install worker, the telemetry loop)."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self: Agent, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the point: no input may kill a thread
                self.errors[where] += 1
                reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
                log.error("%s: %s", where, reason.splitlines()[0] if reason else type(exc).__name__)
                try:
                    self._emit(InstallEventKind.FAILED, "", reason=f"{where}: {reason}"[:500],
                               extra={"internal_error": where})
                except Exception:  # noqa: BLE001 - reporting must not raise either
                    pass
                return None

        return run

    return wrap


def broker_config_of(config: AgentConfig) -> BrokerConfig:
    tls = None
    if config.tls is not None:
        tls = TlsConfig(ca_file=config.tls.ca, cert_file=config.tls.cert, key_file=config.tls.key)
    elif config.broker.startswith("mqtts://"):
        tls = TlsConfig()
    return parse_broker_url(config.broker, tls=tls, username=config.username, password=config.password)


class Agent:
    def __init__(self, config: AgentConfig, *, broker: BrokerConfig | None = None,
                 hardware: HardwareInfo | None = None, available: dict[str, list[str]] | None = None,
                 session_factory: Callable[..., Any] | None = None, clock: Callable[[], float] = time.time,
                 api_port: int | None = None, retry_delays: tuple[float, float] = (RETRY_MIN_S, RETRY_MAX_S),
                 client_factory: Callable[..., Any] = make_client) -> None:
        self.config = config
        self.clock = clock
        self.retry_delays = retry_delays
        self.errors: Counter[str] = Counter()  # errors caught per callback/loop, shown in status()
        self.refused: Counter[str] = Counter()  # statements refused, per first word of the reason
        self.broker = broker or broker_config_of(config)
        if hardware is None or available is None:
            from edgesdk.runtime import isolate_runtime_probe

            # The runtimes are probed in a child process (none is loaded here until a variant
            # needs it); its answer is kept for the next start while nothing it depends on changes.
            isolate_runtime_probe(config.data_dir / PROBE_CACHE_NAME)
        self.hardware = hardware or probe_hardware()
        # The configured target, else the one detected (`edge-agent doctor` says why): the registry's column.
        self._target_name = (config.target_profile.name if config.target_profile is not None
                             else choose_target(self.hardware).name)
        if available is None:
            from edgesdk.runtime import available_providers
            available = available_providers()
        self.available = available
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.spool = TelemetrySpool(data / "telemetry" / "spool", SpoolLimits(max_windows=config.spool_max_windows))
        newest = self.spool.newest_seq()
        self.recorder = LatencyRecorder(data / "telemetry" / "state.json", clock=clock,
                                        min_seq=0 if newest is None else newest + 1)
        self.host = ModelHost(self.recorder)
        self.store = VersionStore(data, clock=clock)
        self.guard = StatementGuard(data, config.fleet, config.device_id, release_keys=list(config.public_keys),
                                    fleet_keys=list(config.fleet_public_keys), trust_root=config.trust_root_bytes,
                                    clock=clock)
        self.installer = Installer(self.store, self.host, lambda: self.guard.release_keys, self.hardware, self.available,
                                   self._emit, profile=config.target_profile, budget_s=config.selection_budget_s,
                                   session_factory=session_factory, clock=clock,
                                   memory_budget_mb=config.memory_budget_mb,
                                   undeploy_grace_s=config.undeploy_grace_s,
                                   engine_cache=EngineCache(data / ENGINES, config.engine_cache_mb))
        host, port = parse_address(config.api)
        self.api = ApiServer(host, port if api_port is None else api_port, self.host, self.status)
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self._desired: queue.Queue[Accepted | None] = queue.Queue()
        self._last_refused: dict[str, SignedStatement] = {}  # per model name
        self._flush_now = threading.Event()
        self._threads: list[threading.Thread] = []
        # The broker client is a parameter, like the transfer and the clock: `make_client`'s signature.
        self.client = client_factory(config.device_id, self.broker, clean_start=False, session_expiry_s=7 * 24 * 3600,
                                     will=Will(device_state(config.fleet, config.device_id),
                                               self._state(online=False).to_json()))
        self.backoff = JitteredBackoff(self.client, self.broker)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.message_callback_add(device_desired_filter(config.fleet, config.device_id), self._on_desired)
        self.client.message_callback_add(trust_root_topic(config.fleet), self._on_trust_root)
        self.client.on_message = self._on_other_message
        self.fetcher = PackageFetcher(self.client, config.fleet, config.device_id, data,
                                      stall_timeout_s=config.stall_timeout_s)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Restore the active model, serve the API, and start connecting (non-blocking)."""
        for kind, package_id, reason, name in self.installer.restore():
            log.warning("%s", reason)
            self._emit(kind, package_id, reason=reason, model=name or None)
        self.api.start()
        log.info("local API on %s", self.api.url)
        self.client.loop_start()  # paho's thread connects and reconnects (broker down at start included)
        for target, name in ((self._install_loop, "install"), (self._telemetry_loop, "telemetry")):
            thread = threading.Thread(target=target, name=f"edge-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop cleanly: mark the device offline, stop the threads, the API and the MQTT loop."""
        self.stopping.set()
        self.fetcher.cancel()
        self._desired.put(None)
        self._flush_now.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.connected.is_set():
            info = self.client.publish(device_state(self.config.fleet, self.config.device_id),
                                       self._state(online=False).to_json(), qos=1, retain=True)
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
            self.client.disconnect()
        self.client.loop_stop()
        self.api.stop()
        for name in self.host.models():
            model = self.host.swap(name, None)
            if model is not None:
                model.session.close()

    def run_forever(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    # -- MQTT callbacks ----------------------------------------------------------------------
    @guarded("on_connect")
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            delay = self.backoff.failed()
            log.warning("broker %s refused the connection: %s; retrying in %.1f s", self.broker.url, reason, delay)
            return
        self.backoff.connected()
        cfg = self.config
        client.subscribe(device_desired_filter(cfg.fleet, cfg.device_id), qos=1)
        if self.guard.root is not None:
            client.subscribe(trust_root_topic(cfg.fleet), qos=1)
        client.publish(device_state(cfg.fleet, cfg.device_id), self._state(online=True).to_json(), qos=1, retain=True)
        self.fetcher.on_connected()
        self.connected.set()
        self._flush_now.set()
        log.info("connected to %s", self.broker.url)

    @guarded("on_disconnect")
    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        delay = self.backoff.failed()
        if not self.stopping.is_set():
            log.warning("disconnected from %s (%s); reconnecting in %.1f s", self.broker.url, reason, delay)

    @guarded("on_connect_fail")
    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        # paho calls this inside its `except OSError:`, so the cause is the exception in flight.
        exc = sys.exc_info()[1]
        why = describe_os_error(exc) if isinstance(exc, OSError) else "connection failed"
        delay = self.backoff.failed()
        log.warning("cannot reach broker %s: %s; retrying in %.1f s", self.broker.url, why, delay)

    @guarded("on_desired")
    def _on_desired(self, client: Any, userdata: Any, message: Any) -> None:
        name = parse_desired_name(self.config.fleet, self.config.device_id, message.topic)
        if name is None:
            self._refuse("", f"{message.topic[:200]}: not a desired/{{model name}} topic")
            return
        if not message.payload:
            # A cleared retained message. It is unsigned (anyone who may write the topic can send
            # one), so it changes nothing: a model goes only with a signed undeploy statement.
            log.info("desired statement for %s cleared on the broker; the device keeps what it runs", name)
            return
        try:
            signed = SignedStatement.from_json(message.payload, topic=message.topic)
        except ProtocolError as exc:
            self._refuse("", str(exc), name)
            return
        if signed.statement.name != name:
            # Filed under another model's topic, it would hide that model's real statement.
            self._refuse(signed.statement.package_id, f"misfiled statement refused: it is for model "
                                                      f"{signed.statement.name!r} but arrived on desired/{name}", name)
            return
        self._consider(signed)

    def _consider(self, signed: SignedStatement) -> None:
        """Queue ``signed`` for install if the guard accepts it, else report the refusal. The last
        refused statement of each name is kept: `desired` and `trust/root` are both retained and
        may arrive in either order, so a statement signed by a newly rotated fleet key is looked at
        again once the root that names the key has arrived."""
        statement = signed.statement
        try:
            accepted = self.guard.accept(signed, self.installer.active_version)
        except EdgeError as exc:  # TrustError; StorageError when the serial cannot be recorded
            self._last_refused[statement.name] = signed
            self._refuse(statement.package_id, str(exc), statement.name)
            return
        self._last_refused.pop(statement.name, None)
        if not accepted.redelivered:
            action = "undeploy" if statement.undeploy else f"{statement.name}@{statement.version}"
            log.info("accepted statement serial %d for %s (signed by %s)", statement.serial, action,
                     accepted.fleet_key)
        self._desired.put(accepted)

    def _refuse(self, package_id: str, reason: str, name: str | None = None) -> None:
        self.refused[reason.split(":")[0][:40]] += 1
        log.warning("refused desired statement: %s", reason)
        self._emit(InstallEventKind.REFUSED, package_id, reason=reason[:500], model=name)

    @guarded("on_trust_root")
    def _on_trust_root(self, client: Any, userdata: Any, message: Any) -> None:
        if not message.payload or self.guard.root is None:
            return
        try:
            updated = self.guard.update_root(parse_root_chain(message.payload, message.topic))
        except EdgeError as exc:  # ProtocolError, TrustError, StorageError (disk full writing root.json)
            self._refuse("", f"trust root update refused: {exc}")
            return
        if updated:
            self._emit(InstallEventKind.VERIFIED, "", extra={"trust_root_version": self.guard.root.version})
            for signed in list(self._last_refused.values()):
                self._consider(signed)

    @guarded("on_message")
    def _on_other_message(self, client: Any, userdata: Any, message: Any) -> None:
        log.debug("ignoring a message on %s", message.topic)

    # -- workers -----------------------------------------------------------------------------
    def _install_loop(self) -> None:
        """Install what arrives, one statement at a time: per model name only the newest statement
        counts; a stalled download is retried after a jittered, growing delay (unless a newer
        statement for its name arrives first); when idle, free the disk of undeployed models."""
        pending: dict[str, Accepted] = {}  # name -> newest statement not yet handled, in arrival order
        retries: dict[str, tuple[Accepted, int, float]] = {}  # name -> (statement, attempts, due monotonic)
        next_gc = time.monotonic()  # at start too: a grace period may have ended while the agent was down
        while not self.stopping.is_set():
            now = time.monotonic()
            due = [name for name, (_, _, at) in retries.items() if at <= now]
            for name in due:
                pending.setdefault(name, retries[name][0])
            if not pending:
                wake = min([at for _, _, at in retries.values()] + [next_gc])
                try:
                    item = self._desired.get(timeout=max(0.0, wake - now))
                except queue.Empty:
                    item = False
                if item is None or self.stopping.is_set():
                    return
                if item:
                    self._take(item, pending, retries)
            while not self._desired.empty():  # only the newest statement per name matters
                item = self._desired.get_nowait()
                if item is None:
                    return
                self._take(item, pending, retries)
            if not pending:
                if time.monotonic() >= next_gc:
                    next_gc = time.monotonic() + GC_INTERVAL_S
                    self._collect_garbage()
                continue
            name = next(iter(pending))
            accepted = pending.pop(name)
            prior = retries.pop(name, None)
            attempts = prior[1] if prior is not None and prior[0] is accepted else 0
            outcome = self._install_one(accepted)
            if outcome is InstallOutcome.RETRY:
                attempts += 1
                cap = min(self.retry_delays[1], self.retry_delays[0] * 2 ** max(attempts - 1, 0))
                delay = cap * random.uniform(0.5, 1.0)
                log.info("retrying the download of %s in %.1f s", accepted.signed.statement.package_id[:12], delay)
                retries[name] = (accepted, attempts, time.monotonic() + delay)
            self._prune_downloads(retries)

    @staticmethod
    def _take(item: Accepted, pending: dict[str, Accepted], retries: dict[str, tuple[Accepted, int, float]]) -> None:
        name = item.signed.statement.name
        pending.pop(name, None)  # re-insert: the newest statement of a name goes last in line
        pending[name] = item
        if name in retries and retries[name][0] is not item:
            del retries[name]  # a newer statement replaces the one waiting for its retry

    @guarded("install")
    def _prune_downloads(self, retries: dict[str, tuple[Accepted, int, float]]) -> None:
        """A finished or refused download leaves nothing behind; a stalled one is kept for its retry,
        which resumes it."""
        self.fetcher.prune({accepted.signed.statement.package_id for accepted, _, _ in retries.values()})

    @guarded("gc")
    def _collect_garbage(self) -> None:
        removed = self.installer.collect_garbage()
        if removed:
            log.info("freed the disk of %d undeployed version(s)", len(removed))

    @guarded("install")
    def _install_one(self, accepted: Accepted) -> InstallOutcome | None:
        statement = accepted.signed.statement
        try:
            statement.check_addressed(self.config.fleet, self.config.device_id, self.clock())  # still valid?
        except TrustError as exc:
            self._refuse(statement.package_id, str(exc), statement.name)
            return None
        if statement.undeploy:
            self.installer.undeploy(statement.name, statement.rollout_id)
            outcome = InstallOutcome.ACTIVE
        else:
            outcome = self.installer.install(statement, self._fetch)
        self._publish_state()
        return outcome

    def _fetch(self, statement: Any, progress: Callable[[float], None]) -> Any:
        return self.fetcher.fetch(statement, lambda p: progress(p.bytes_done / max(p.size, 1)))

    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry_interval_s
        next_roll = time.monotonic() + interval
        while not self.stopping.is_set():
            timeout = max(0.0, next_roll - time.monotonic())
            self._flush_now.wait(timeout)
            self._flush_now.clear()
            roll = time.monotonic() >= next_roll or self.stopping.is_set()
            if roll:
                next_roll += interval
            self._telemetry_step(roll)

    @guarded("telemetry")
    def _telemetry_step(self, roll: bool) -> None:
        """Roll a window (when due) into the spool, then flush the spool while connected."""
        if roll:
            windows = self.recorder.roll(contexts=[m.context for m in self.host.models().values()],
                                         dropped_windows=self.spool.dropped_count)
            for window in windows:
                self.spool.append(window.seq, window.to_json())
        if self.connected.is_set():
            self.spool.flush(self._publish_telemetry, timeout_s=PUBLISH_TIMEOUT_S)

    def _publish_telemetry(self, payload: bytes) -> bool:
        if not self.connected.is_set():
            return False
        info = self.client.publish(device_telemetry(self.config.fleet, self.config.device_id), payload, qos=1)
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError):  # paho raises when the message could not be queued
            return False
        return info.is_published()

    # -- reporting ---------------------------------------------------------------------------
    def _emit(self, kind: InstallEventKind, package_id: str, **fields: Any) -> None:
        event = InstallEvent(kind=kind, package_id=package_id, at=self.clock(), **fields)
        log.info("install %s %s %s", kind.value, package_id[:12], fields.get("reason") or "")
        # QoS 1: paho keeps it queued while disconnected and sends it after the reconnect.
        self.client.publish(device_events(self.config.fleet, self.config.device_id), event.to_json(), qos=1)

    def _state(self, online: bool) -> DeviceState:
        models = self.host.models()
        model = self.host.active  # the legacy single-model fields: only when exactly one is active
        hw = self.hardware
        return DeviceState(
            device_id=self.config.device_id, online=online, agent_version=__version__,
            labels=dict(self.config.labels), hardware_class=hw.hardware_class,
            telemetry_interval_s=self.config.telemetry_interval_s,
            target=self._target_name,
            hardware={"arch": hw.arch, "cpu": hw.cpu_model, "cores": hw.cpu_count, "ram_mb": hw.ram_mb,
                      "board": hw.board},
            runtimes={rt: {"version": hw.runtimes.get(rt), "providers": provs} for rt, provs in self.available.items()},
            models=[{"name": m.name, "version": m.version, "package_id": m.package_id, "variant": m.variant,
                     "provider": m.provider, "runtime": m.runtime} for m in models.values()],
            active_package=model.package_id if model else None, active_variant=model.variant if model else None,
            provider=model.provider if model else None, updated_at=self.clock())

    def _publish_state(self) -> None:
        if self.connected.is_set():
            self.client.publish(device_state(self.config.fleet, self.config.device_id),
                                self._state(online=True).to_json(), qos=1, retain=True)

    def status(self) -> dict[str, Any]:
        """The daemon's part of /v1/status: the installer's per-model records under "installs" (the
        API's "models" describes what serves), the connection, statements and telemetry."""
        installs = self.installer.status()
        installs["installs"] = installs.pop("models")
        return installs | {
            "device_id": self.config.device_id, "fleet": self.config.fleet, "broker": self.broker.url,
            "connected": self.connected.is_set(), "errors_caught": dict(self.errors),
            "statements": {"serials": self.guard.serials(), "refused": dict(self.refused),
                           "trust_root_version": self.guard.root.version if self.guard.root else None},
            "telemetry": {
                "next_seq": self.recorder.next_seq, "spooled": len(self.spool.pending()),
                "dropped_windows": self.spool.dropped_count}}


def run_agent(config: AgentConfig, stop: threading.Event) -> None:
    """Run until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
    Agent(config).run_forever(stop)
