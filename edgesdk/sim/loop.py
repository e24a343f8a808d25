"""N simulated devices on one thread: paho clients driven by one selector, timers on one heap.

paho's ``loop_start`` runs a thread per client, which stalls at a few hundred clients; here each
client is driven the way paho documents for an external event loop:

- ``client.reconnect()`` opens the TCP (+TLS) connection, makes the socket non-blocking and queues
  CONNECT; paho then calls ``on_socket_open`` (we register the socket with the selector, for
  reading) and ``on_socket_register_write`` whenever it has bytes to send (we add write interest;
  ``on_socket_unregister_write`` removes it once ``loop_write`` has sent everything);
- readable → ``loop_read()`` (again while a TLS socket holds decrypted bytes: ``pending()``);
  writable → ``loop_write()``; every second → ``loop_misc()`` for keepalive PINGs;
- ``on_socket_close`` unregisters the socket; ``on_disconnect`` schedules a reconnect.

Because the write callbacks are set, ``publish()`` never writes inline: every byte leaves in the
loop, batched per socket. Timers are one heap of (due, kind, device): each device has one
telemetry tick (phases spread over the interval, so N devices send a steady N/interval windows/s),
plus install steps and reconnects. Connects go through a token bucket (``connect_rate``/s) so a
broker is not flooded, and a failed TCP connect closes the gate for a jittered, doubling delay
(a broker that is down costs one attempt per delay, not one per device).

The one thing that blocks the loop is ``reconnect()`` itself (paho connects, and does the TLS
handshake, in blocking mode, bounded by ``connect_timeout_s``): one round trip per connect, which
the connect rate spreads out.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import resource
import selectors
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edgesdk.broker import Will
from edgesdk.errors import ConfigError
from edgesdk.protocol import InstallEventKind, parse_desired_name
from edgesdk.sim.behaviour import spread
from edgesdk.sim.clock import Clock, WallClock
from edgesdk.sim.config import ClientFactory, SimConfig, SimCounters, default_client_factory
from edgesdk.sim.device import InstallRun, SimDevice

log = logging.getLogger("edgesdk.sim")
_TICK, _STEP, _RECONNECT = 0, 1, 2
MISC_EVERY_S = 1.0  # loop_misc sweep: keepalive PINGs (keepalive is 30 s by default)
MAX_WAIT_S = 0.2  # the loop looks at the stop event at least this often
GATE_MIN_S, GATE_MAX_S = 0.5, 30.0  # connect gate after a failed TCP connect: doubling, jittered
FILES_PER_PROCESS = 64  # open files besides the devices' sockets (stdio, selector, libraries)


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """A callback or timer that must not raise: paho would re-raise it out of loop_read, and either
    way one device's error would stop all of them. Counted, logged, and the loop goes on."""

    @functools.wraps(method)
    def wrapper(self: Simulator, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:  # noqa: BLE001 - counted and logged; one device's bug must not stop N
            self.counters.internal_errors += 1
            self.counters.last_error = f"{method.__name__}: {type(exc).__name__}: {exc}"[:300]
            log.exception("simulator: error in %s", method.__name__)

    return wrapper


class Simulator:
    """``Simulator(config).run(stop)`` runs until ``stop`` is set or ``config.duration_s`` passed.

    ``clock`` gives simulated time (`ScaledClock` runs it faster); ``client_factory`` builds each
    device's paho client (default: `default_client_factory`); ``progress(counters)`` is called
    every ``progress_every_s``. ``counters`` and ``all_connected`` (set once every device got a
    CONNACK) may be read from other threads while it runs.
    """

    def __init__(self, config: SimConfig, *, clock: Clock | None = None,
                 client_factory: ClientFactory | None = None,
                 progress: Callable[[SimCounters], None] | None = None, progress_every_s: float = 10.0) -> None:
        self.config = config
        self.progress, self.progress_every_s = progress, progress_every_s
        self.clock: Clock = clock or WallClock()
        self.client_factory = client_factory or default_client_factory(config.broker, config.credentials)
        self.counters = SimCounters(devices=config.devices)
        self.all_connected = threading.Event()
        self.rng = np.random.default_rng(config.seed)
        self.devices = self._make_devices()
        self._selector: selectors.BaseSelector | None = None
        self._heap: list[tuple[float, int, int, SimDevice, Any]] = []
        self._order = itertools.count()
        self._connect_queue: deque[SimDevice] = deque()
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._gate_until = 0.0
        self._gate_delay = 0.0
        self._stopping = False

    # -- setup ---------------------------------------------------------------------------------------
    def _make_devices(self) -> list[SimDevice]:
        config, behaviour = self.config, self.config.behaviour
        n = config.devices
        if config.hardware_class is not None:
            classes: list[str | None] = [config.hardware_class] * n
        elif behaviour.hardware_classes:
            classes = list(spread(behaviour.hardware_classes, n, self.rng))
        else:
            classes = [None] * n
        spreads = {key: spread(weights, n, self.rng) for key, weights in behaviour.labels.items()}
        devices = []
        for i, ident in enumerate(config.device_ids()):
            labels = {key: values[i] for key, values in spreads.items()} | dict(config.labels)
            dev = SimDevice(config.first_index + i, ident, config.fleet, classes[i], labels,
                            config.telemetry_interval_s, seed=config.seed)
            for release in config.start_with:
                dev.activate(release.name, release.version, release.package_id,
                             behaviour.for_release(release.name, release.version, classes[i]), 0.0)
            devices.append(dev)
        return devices

    # -- run -------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> SimCounters:
        """Connect every device, simulate until ``stop`` (or the duration), then stop cleanly: each
        connected device publishes its offline state and disconnects (no Will)."""
        _raise_open_file_limit(self.config.devices + FILES_PER_PROCESS)
        started = time.monotonic()
        deadline = started + self.config.duration_s if self.config.duration_s is not None else None
        self._selector = selectors.DefaultSelector()
        self._connect_queue.extend(self.devices)
        self._tokens, self._tokens_at = 1.0, started
        next_misc = started + MISC_EVERY_S
        next_progress = started + self.progress_every_s
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                now = time.monotonic()
                self._run_due(now)
                wait = self._connect_some(now)
                if now >= next_misc:
                    self._sweep()
                    next_misc = now + MISC_EVERY_S
                    self.counters.elapsed_s = now - started
                    if self.progress is not None and now >= next_progress:
                        self.progress(self.counters)
                        next_progress = now + self.progress_every_s
                if self._heap:
                    wait = min(wait, self._heap[0][0] - now)
                if deadline is not None:
                    wait = min(wait, deadline - now)
                self._poll(max(0.0, min(wait, next_misc - now, MAX_WAIT_S)))
            self._shutdown()
        finally:
            self._close_all()
            self.counters.elapsed_s = time.monotonic() - started
        return self.counters

    def _poll(self, timeout: float) -> None:
        if self._selector is None:
            return
        for key, mask in self._selector.select(timeout):
            dev: SimDevice = key.data
            client = dev.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
                sock = client.socket()
                # TLS: bytes already decrypted inside the SSL object never make the socket readable.
                while isinstance(sock, ssl.SSLSocket) and sock.pending() and client.socket() is sock:
                    client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is key.fileobj:
                client.loop_write()

    def _sweep(self) -> None:
        for dev in self.devices:
            if dev.client is not None and dev.client.socket() is not None:
                dev.client.loop_misc()

    # -- timers --------------------------------------------------------------------------------------
    def _schedule(self, delay_real_s: float, kind: int, dev: SimDevice, payload: Any = None) -> None:
        heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay_real_s), next(self._order), kind, dev, payload))

    def _run_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, kind, dev, payload = heapq.heappop(heap)
            if kind == _TICK:
                self._tick(dev, due, now)
            elif kind == _STEP:
                self._step(dev, payload)
            elif kind == _RECONNECT:
                dev.reconnect_pending = False
                if not self._stopping:
                    self._connect_queue.append(dev)

    @_guarded
    def _tick(self, dev: SimDevice, due: float, now: float) -> None:
        dropped = dev.dropped_windows
        windows = dev.roll(self.clock.time(), self.rng, send=dev.connected)
        self.counters.windows_dropped += dev.dropped_windows - dropped
        for w in windows:
            dev.client.publish(dev.topics.telemetry, w.to_json(), qos=1)
        self.counters.windows_sent += len(windows)
        interval = self.clock.real_seconds(self.config.telemetry_interval_s)
        # Keep the phase (due + interval) unless the loop fell behind by a whole interval.
        next_due = due + interval if due + interval > now else now + interval
        heapq.heappush(self._heap, (next_due, next(self._order), _TICK, dev, None))

    @_guarded
    def _step(self, dev: SimDevice, run: InstallRun) -> None:
        name = run.statement.name
        if dev.installs.get(name) is not run:
            return  # superseded by a newer statement for the same name
        event, changed = dev.step(run, self.clock.time())
        self._publish_event(dev, event)
        if changed:
            self._publish_state(dev, online=True)
        if run.done < len(run.steps):
            self._schedule(self.clock.real_seconds(run.step_s), _STEP, dev, run)
            return
        del dev.installs[name]
        if event.kind is InstallEventKind.ACTIVATED:
            self.counters.activations += 1
        elif event.kind is InstallEventKind.FAILED:
            self.counters.installs_failed += 1
        elif event.kind is InstallEventKind.UNDEPLOYED:
            self.counters.undeploys += 1

    # -- connections ---------------------------------------------------------------------------------
    def _connect_some(self, now: float) -> float:
        """Start connects the token bucket allows; returns how long until the next one may start."""
        if not self._connect_queue or self._stopping:
            return MAX_WAIT_S
        if now < self._gate_until:
            return self._gate_until - now
        rate = self.config.connect_rate
        burst = max(1.0, rate / 10)  # at most a tenth of a second's worth at once
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        while self._connect_queue and self._tokens >= 1.0 and time.monotonic() >= self._gate_until:
            self._tokens -= 1.0
            self._connect(self._connect_queue.popleft())
        return (1.0 - self._tokens) / rate if self._connect_queue else MAX_WAIT_S

    def _connect(self, dev: SimDevice) -> None:
        will = Will(dev.topics.state, dev.state(online=False, now=self.clock.time()).to_json())
        if dev.client is None:
            dev.client = self._new_client(dev, will)
        else:  # the Will carries the models the device runs now
            dev.client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        try:
            dev.client.reconnect()
        except (OSError, ValueError) as exc:  # refused, unreachable, timeout, TLS (SSLError is an OSError)
            self.counters.connect_failures += 1
            self.counters.last_error = f"cannot reach broker {self.config.broker.url}: {_describe(exc)}"
            # The broker (not this device) is the problem: close the gate for everyone, retry this one first.
            self._gate_delay = min(GATE_MAX_S, max(GATE_MIN_S, self._gate_delay * 2))
            self._gate_until = time.monotonic() + self._gate_delay * float(self.rng.uniform(0.5, 1.0))
            self._connect_queue.appendleft(dev)

    def _new_client(self, dev: SimDevice, will: Will) -> mqtt.Client:
        client = self.client_factory(dev.device_id, will)
        client.user_data_set(dev)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _retry_later(self, dev: SimDevice) -> None:
        if self._stopping or dev.reconnect_pending:
            return
        broker = self.config.broker
        cap = min(broker.reconnect_max_s, broker.reconnect_min_s * 2 ** min(dev.attempts, 30))
        dev.attempts += 1
        dev.reconnect_pending = True
        self._schedule(cap * float(self.rng.uniform(0.5, 1.0)), _RECONNECT, dev)

    # -- paho callbacks (all on the loop's thread) ---------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        if self._selector is not None:
            self._selector.register(sock, selectors.EVENT_READ, dev)

    def _on_socket_close(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        if self._selector is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass  # never registered (the connect failed before paho opened it)

    def _on_register_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        if self._selector is not None:
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)

    def _on_unregister_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        if self._selector is not None:
            try:
                self._selector.modify(sock, selectors.EVENT_READ, dev)
            except (KeyError, ValueError):
                pass  # paho unregisters write interest just before it closes the socket

    @_guarded
    def _on_connect(self, client: mqtt.Client, dev: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:  # the broker closes the connection next; on_disconnect retries
            self.counters.connect_failures += 1
            self.counters.last_error = f"broker {self.config.broker.url} refused {dev.device_id}: {reason}"
            return
        self._gate_delay = 0.0
        dev.connected = True
        dev.attempts = 0
        self.counters.connected += 1
        self.counters.connects += 1
        if not dev.ever_connected:
            dev.ever_connected = True
            now = self.clock.time()
            dev.last_roll = now
            for model in dev.models.values():
                model.since = now
            # Spread the first windows over one interval (a golden-ratio sequence: even for any N).
            phase = ((dev.index * 0.6180339887498949) % 1.0) or 1.0
            self._schedule(self.clock.real_seconds(self.config.telemetry_interval_s * phase), _TICK, dev)
            self.counters.ever_connected += 1
            if self.counters.ever_connected == self.config.devices:
                self.all_connected.set()
        client.subscribe(dev.topics.desired, qos=1)
        self._publish_state(dev, online=True)

    @_guarded
    def _on_disconnect(self, client: mqtt.Client, dev: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        if dev.connected:
            dev.connected = False
            self.counters.connected -= 1
            self.counters.disconnects += 1
        self._retry_later(dev)

    @_guarded
    def _on_publish(self, client: mqtt.Client, dev: SimDevice, mid: int, reason: Any, props: Any) -> None:
        self.counters.publishes_acked += 1

    @_guarded
    def _on_message(self, client: mqtt.Client, dev: SimDevice, message: mqtt.MQTTMessage) -> None:
        name = parse_desired_name(self.config.fleet, dev.device_id, message.topic)
        if name is None:
            return
        verdict = dev.consider(name, message.payload, message.topic, self.config.trust, self.clock.time(),
                               self.config.behaviour.for_release, self.rng)
        if verdict.event is not None:
            self.counters.statements_refused += 1
            self._publish_event(dev, verdict.event)
        elif verdict.redelivered:
            self.counters.statements_redelivered += 1
        elif verdict.run is not None:
            self.counters.statements_obeyed += 1
            run = verdict.run
            dev.installs[name] = run  # a newer statement for the name replaces a run in progress
            first = run.step_s if run.statement.undeploy else 0.0  # downloading starts at once
            self._schedule(self.clock.real_seconds(first), _STEP, dev, run)

    # -- publishing ------------------------------------------------------------------------------------
    def _publish_state(self, dev: SimDevice, online: bool) -> mqtt.MQTTMessageInfo:
        self.counters.states_sent += 1
        return dev.client.publish(dev.topics.state, dev.state(online, self.clock.time()).to_json(), qos=1,
                                  retain=True)

    def _publish_event(self, dev: SimDevice, event: Any) -> None:
        self.counters.events_sent += 1
        dev.client.publish(dev.topics.events, event.to_json(), qos=1)

    # -- stop --------------------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """Offline states out (waiting for their PUBACKs), then a DISCONNECT per device, each bounded."""
        self._stopping = True
        deadline = time.monotonic() + self.config.stop_timeout_s
        pending = [self._publish_state(dev, online=False) for dev in self.devices if dev.connected]
        while pending and time.monotonic() < deadline:
            self._poll(0.05)
            pending = [info for info in pending if not info.is_published()
                       and info.rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS]
        for dev in self.devices:
            if dev.client is not None and dev.client.socket() is not None:
                dev.client.disconnect()
        while self._selector is not None and self._selector.get_map() and time.monotonic() < deadline:
            self._poll(0.05)

    def _close_all(self) -> None:
        if self._selector is None:
            return
        for key in list(self._selector.get_map().values()):
            self._selector.unregister(key.fileobj)
            try:
                key.fileobj.close()  # type: ignore[union-attr]
            except OSError:
                pass
        self._selector.close()
        self._selector = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer (timeout)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate refused ({(exc.verify_message or exc.reason or '').rstrip('.')})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _raise_open_file_limit(needed: int) -> None:
    """One socket per device: raise the soft limit on open files to what N devices need (up to the
    hard limit), or say in one line that the machine does not allow that many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ConfigError(f"{needed - FILES_PER_PROCESS} devices need {needed} open files; this process may "
                              f"open at most {hard} (raise the hard limit: `ulimit -Hn`, or run fewer devices "
                              "per simulator with --first)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
