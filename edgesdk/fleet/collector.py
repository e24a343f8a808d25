"""The collector: what devices send, into the fleet store (DESIGN §8); no loss, no double count.

    paho thread ─parse─▶ queue ─▶ writer thread ─▶ store (one add_windows/add_events per batch)
                                              └─▶ PUBACK of each message, once its batch committed

One MQTT 5 client with a persistent session (``clean_start=False``, a 7-day session expiry and a
stable client id), QoS 1 subscriptions and manual acknowledgements: a message is acknowledged only
once the batch holding it is committed, so a collector killed between receiving and committing
gets it again from the broker when it comes back, and windows devices send while it is down wait
in its session. Windows are upserted on (fleet, device, seq, window start), so a redelivered or twice-collected
window is stored once.

Telemetry and events are read through a shared subscription (``$share/{group}-collector/...``):
several `serve` processes split them. Mosquitto 2.0 queues a shared subscription's QoS 1 messages
for an offline member with a persistent session (measured: alone in its group it gets every message
sent while it was down; with one member online and one offline it hands each half), so a member
that is killed and restarted loses nothing — but one that never comes back strands its share until
its session expires. ``shared=False`` makes every collector read everything (the upsert makes the
double collection harmless). State and desired statements are retained current values that every
instance wants: always a plain subscription.

A malformed message is counted, logged in one line, acknowledged and dropped; nothing a device
sends can end a thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgesdk import protocol
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import BrokerError, FleetError, ProtocolError, first_line, map_os_errors
from edgesdk.protocol import DeploymentStatement, DeviceState, InstallEvent, SignedStatement, TelemetryWindow

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # a collector may be down this long without losing what devices send
FLUSH_EVERY_S = 0.2
BATCH_SIZE = 500
# Messages the broker may send us unacknowledged (MQTT 5 ReceiveMaximum): bounds our memory, since
# nothing is acknowledged before it is committed. Several batches, so the broker never waits on one.
MAX_UNACKED = 4 * BATCH_SIZE
MAX_SQL_INT = 2 ** 63 - 1  # both SQLite and PostgreSQL store integers in 64 bits
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason: another client connected with our client id


class CollectorStore(Protocol):
    """What the collector needs of `edgesdk.fleet.store.FleetStore` (injected, so tests can count calls)."""

    def add_windows(self, windows: Sequence[tuple[str, str, TelemetryWindow]]) -> int: ...
    def add_events(self, events: Sequence[tuple[str, str, InstallEvent]]) -> int: ...
    def record_state(self, fleet: str, state: DeviceState, at: float) -> Any: ...
    def record_desired(self, fleet: str, statement: DeploymentStatement) -> Any: ...
    def clear_desired(self, fleet: str, device_id: str, model: str) -> Any: ...
    def touch(self, fleet: str, device_id: str, at: float) -> Any: ...


@dataclass(frozen=True)
class CollectorStats:
    """Counters since start; `stored` and `duplicates` count windows and events."""

    received: int = 0  # messages of any kind, malformed included
    stored: int = 0  # windows and events new to the store
    duplicates: int = 0  # windows and events the store already had (redelivered, or collected twice)
    malformed: int = 0  # dropped: unreadable, or not what its topic says
    states: int = 0
    desired: int = 0  # statements recorded or cleared
    store_errors: int = 0  # failed commits (retried; nothing acknowledged meanwhile)
    queue_depth: int = 0  # received, not yet committed and acknowledged
    last_flush_at: float | None = None  # unix time of the last committed batch

    def line(self, now: float) -> str:
        ago = "never" if self.last_flush_at is None else f"{max(0.0, now - self.last_flush_at):.1f} s ago"
        return (f"collector: received {self.received}, stored {self.stored}, duplicates {self.duplicates}, "
                f"malformed {self.malformed}, states {self.states}, desired {self.desired}, "
                f"queue {self.queue_depth}, store errors {self.store_errors}, last flush {ago}")


@dataclass(frozen=True)
class _Item:
    """One received message, parsed, waiting for its batch."""

    kind: str  # window | event | state | desired | clear | drop (malformed or empty: only acknowledged)
    device: str
    value: Any
    seen_at: float | None  # when to `touch` the device (None: a retained value, not a sign of life)
    mid: int
    qos: int
    generation: int  # the connection it came on: a PUBACK is only valid on that one


_COUNTERS = ("received", "stored", "duplicates", "malformed", "states", "desired", "store_errors")
_STOP = _Item("stop", "", None, None, 0, 0, -1)


def default_client_id(fleet: str, share_group: str, host: str | None = None) -> str:
    """``edgesdk-collector-{fleet}-{host}-{8 hex}``: stable across restarts on one host, so a restarted
    `serve` resumes its session. The hex comes from the (secret) share group, so a device login
    cannot guess the id and take the session over (Mosquitto does not tie client ids to logins)."""
    host = host if host is not None else socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9._-]", "-", host)[:40].strip("-.") or "host"
    tag = hashlib.sha256(f"{share_group}\0{host}".encode()).hexdigest()[:8]
    return f"edgesdk-collector-{fleet}-{name}-{tag}"


@dataclass
class ClaimedId:
    """A collector client id held by this process (a lock file) until `release()` or its exit."""

    client_id: str
    _lock: IO[str] = field(repr=False)

    def release(self) -> None:
        self._lock.close()


def claim_client_id(fleet: str, share_group: str, lock_dir: Path, host: str | None = None,
                    max_slots: int = 64) -> ClaimedId:
    """The lowest free default client id on this host: `default_client_id`, then ``-1``, ``-2``...

    A restarted `serve` gets its id back (the kernel drops a dead process's lock, SIGKILL too), and
    a second `serve` on the same host gets another one: two clients with one id would take the
    session from each other in turns (Mosquitto 2.0 just closes the older connection, unannounced).
    """
    base = default_client_id(fleet, share_group, host)
    with map_os_errors(f"create {lock_dir}"):
        lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(max_slots):
        with map_os_errors(f"open {lock_dir}"):
            handle = open(lock_dir / f"{base}-{slot}.lock", "a")  # noqa: SIM115 - held while collecting
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return ClaimedId(base if slot == 0 else f"{base}-{slot}", handle)
    raise FleetError(f"{max_slots} collectors of fleet {fleet} already run on this host ({lock_dir})")


class Collector:
    """Reads state, desired, events and telemetry of one fleet into ``store``; `start()`/`stop()`.

    ``client_id`` must be stable per instance (a restart resumes the session and gets what was sent
    meanwhile) and distinct between instances (two with one id take the session from each other;
    `claim_client_id` hands out distinct ones per host, and `failure` is set where the broker says
    "session taken over"). ``store`` is shared with the caller, who closes it.
    """

    def __init__(self, broker_config: BrokerConfig, fleet: str, store: CollectorStore, *,
                 client_id: str | None = None, share_group: str = protocol.SHARE_GROUP, shared: bool = True,
                 flush_every_s: float = FLUSH_EVERY_S, batch_size: int = BATCH_SIZE,
                 max_unacked: int = MAX_UNACKED, session_expiry_s: int = SESSION_EXPIRY_S,
                 retry_min_s: float = 0.5, retry_max_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        if flush_every_s <= 0 or batch_size < 1 or not 1 <= max_unacked <= 65535 or session_expiry_s < 1:
            raise FleetError("collector: flush interval, batch size, max unacked (1..65535) and session "
                             "expiry must be positive")
        self.config, self.fleet, self.store = broker_config, protocol.check_id(fleet, "fleet"), store
        self.share_group = protocol.check_id(share_group, "share group")
        # Its own group: the repository's group shares block requests, not telemetry.
        self.collector_group = protocol.check_id(f"{share_group}-collector"[:64], "share group")
        self.client_id = client_id or default_client_id(self.fleet, self.share_group)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", self.client_id):
            raise FleetError(f"collector id {self.client_id!r}: use 1-128 letters, digits, '.', '_', '-'")
        self.shared = shared
        self.flush_every_s, self.batch_size = flush_every_s, batch_size
        self.max_unacked, self.session_expiry_s = max_unacked, session_expiry_s
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.clock = clock
        self.failure: str | None = None  # set when the collector gave up (its session was taken over)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._last_flush_at: float | None = None
        self._done = 0  # received messages committed (or dropped) and acknowledged
        self._lock = threading.Condition()  # guards the counters; notified whenever they change
        self._stopped = threading.Event()
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._generation = 0
        self._closing = False
        self._subscribed = threading.Event()
        self._client: mqtt.Client | None = None
        self._writer: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def filters(self, shared: bool | None = None) -> list[str]:
        """The subscriptions: telemetry and events (shared or not), state and desired (never shared)."""
        records = [protocol.devices_filter(self.fleet, leaf) for leaf in ("telemetry", "events")]
        if self.shared if shared is None else shared:
            records = [f"$share/{self.collector_group}/{f}" for f in records]
        return records + [protocol.devices_filter(self.fleet, leaf) for leaf in ("state", "desired/+")]

    def start(self) -> None:
        """Connect (resuming the session), subscribe, and wait for the broker to confirm."""
        client = make_client(self.client_id, self.config, clean_start=False, session_expiry_s=self.session_expiry_s)
        # make_client recorded where to connect; record it again with a ReceiveMaximum (same settings).
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        props.MaximumPacketSize = self.config.max_packet_size
        props.ReceiveMaximum = self.max_unacked
        client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s,
                             clean_start=False, properties=props)
        client.manual_ack_set(True)  # PUBACK only after the store committed the message (see _ack)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._writer = threading.Thread(target=self._write_loop, name=f"collector-{self.client_id}", daemon=True)
        self._writer.start()
        self._client = client
        try:
            connect_blocking(client, self.config)
            if not self._subscribed.wait(self.config.connect_timeout_s):
                raise BrokerError(f"broker {self.config.url} did not confirm the collector's subscriptions "
                                  f"within {self.config.connect_timeout_s:g} s")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit and acknowledge what was received, then disconnect (the session stays for a restart).
        Messages arriving meanwhile are left unacknowledged: the broker sends them again next time."""
        self._closing = True
        self._stopped.set()
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join(timeout_s)
            self._writer = None
        if self._client is not None:
            disconnect(self._client)  # queued PUBACKs go out before the DISCONNECT
            self._client = None

    def __enter__(self) -> Collector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stats(self) -> CollectorStats:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> CollectorStats:
        return CollectorStats(**self._counts, queue_depth=self._counts["received"] - self._done,
                              last_flush_at=self._last_flush_at)

    def wait_for(self, predicate: Callable[[CollectorStats], bool], timeout_s: float) -> bool:
        """Wait until ``predicate(stats)`` holds (checked on every change); False after ``timeout_s``."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self._snapshot()), timeout_s)

    def _count(self, flushed: bool = False, **by: int) -> None:
        with self._lock:
            for name, value in by.items():
                if name == "done":
                    self._done += value
                else:
                    self._counts[name] += value
            if flushed:
                self._last_flush_at = self.clock()
            self._lock.notify_all()

    # -- paho thread: parse and queue; nothing a device sends may raise out of a callback ------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                    props: object) -> None:
        self._generation += 1  # acknowledgements of the previous connection's messages are void
        if reason.is_failure:
            return
        try:
            # A resumed session has its subscriptions already, and the broker sends what it queued
            # for them ahead of any SUBACK (behind up to max_unacked messages): do not wait for one.
            if getattr(flags, "session_present", False):
                self._subscribed.set()
            # Subscribing again is idempotent, and retainHandling=1 sends the retained state and
            # desired values only where the subscription is new (not on every reconnect). The other
            # mode's telemetry filters go, so switching --collector-shared does not collect twice.
            other = self.filters(shared=not self.shared)[:2]
            client.unsubscribe(other)
            client.subscribe([(f, SubscribeOptions(qos=1, retainHandling=1)) for f in self.filters()])
        except Exception:  # noqa: BLE001
            log.exception("collector: could not subscribe after connecting")

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[mqtt.ReasonCode],
                      props: object) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused or len(reasons) != len(self.filters()):
            log.error("collector: broker refused subscriptions: %s", ", ".join(refused) or reasons)
        else:
            self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                       props: object) -> None:
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER and not self._closing:
            with self._lock:
                self.failure = (f"collector id {self.client_id} is used by another collector (session taken "
                                f"over): give each serve its own --collector-id")
                self._lock.notify_all()
            log.error("%s", self.failure)
            client.disconnect()  # stop paho reconnecting: two clients would take the session in turns

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._closing:
            return  # not acknowledged: the broker redelivers it to our session next time
        try:
            item = self._parse(msg)
        except ProtocolError as exc:
            log.warning("collector: dropped malformed message: %s", exc)
            item = _Item("drop", "", None, None, msg.mid, msg.qos, self._generation)
            malformed = 1
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the paho thread
            log.warning("collector: dropped unreadable message on %s (%s)", msg.topic, type(exc).__name__)
            item = _Item("drop", "", None, None, msg.mid, msg.qos, self._generation)
            malformed = 1
        else:
            malformed = 0
        self._queue.put(item)
        self._count(received=1, malformed=malformed)

    def _parse(self, msg: mqtt.MQTTMessage) -> _Item:
        topic = msg.topic
        parsed = protocol.parse_device_topic(self.fleet, topic)
        if parsed is None:
            raise ProtocolError(f"{topic[:200]!r}: not a device topic of fleet {self.fleet}")
        device, leaf = parsed
        # A retained message is a stored value replayed on subscribing, not a sign of life now.
        seen = None if msg.retain else self.clock()
        item = _Item("drop", device, None, seen, msg.mid, msg.qos, self._generation)
        payload = msg.payload
        if leaf == "telemetry":
            window = TelemetryWindow.from_json(payload, topic)
            _check_ints(topic, seq=window.seq, count=window.count, errors=window.errors,
                        dropped_windows=window.dropped_windows)
            return replace(item, kind="window", value=window)
        if leaf == "events":
            return replace(item, kind="event", value=InstallEvent.from_json(payload, topic))
        if leaf == "state":
            if not payload:
                return item  # a cleared retained state: nothing to record
            state = DeviceState.from_json(payload, topic)
            if state.device_id != device:
                raise ProtocolError(f"{topic}: state of device {state.device_id!r} on another device's topic")
            return replace(item, kind="state", value=state)
        if leaf.startswith("desired/"):
            name = leaf.removeprefix("desired/")
            if not payload:
                return replace(item, kind="clear", value=name)
            statement = SignedStatement.from_json(payload, topic).statement
            # Not verified (the agent does that); but a statement filed under another device's or
            # model's topic is not what that topic says, and is not recorded.
            if (statement.fleet, statement.device, statement.name) != (self.fleet, device, name):
                raise ProtocolError(f"{topic}: statement for {statement.fleet}/{statement.device}/{statement.name} "
                                    f"on another topic")
            return replace(item, kind="desired", value=statement)
        raise ProtocolError(f"{topic}: unexpected topic")

    # -- writer thread -------------------------------------------------------------------------
    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._next_batch()
            if batch and not self._commit_until_done(batch, stopping):
                return  # stopped while the store was failing: nothing acknowledged, all redelivered later

    def _next_batch(self) -> tuple[list[_Item], bool]:
        """Up to ``batch_size`` items, at most ``flush_every_s`` after the first; (items, stop seen)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, deadline = [first], time.monotonic() + self.flush_every_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _commit_until_done(self, batch: list[_Item], stopping: bool) -> bool:
        """Commit ``batch``, then acknowledge it; False if stopped before the store took it.

        The store says neither "down" nor "refused this row" in its error type (both are FleetError),
        so a failed batch is retried message by message: messages that fail while others succeed
        are refused data (dropped, counted as malformed); when none succeeds the store is down, and
        the batch waits (backing off, acknowledging nothing) and grows with what arrives meanwhile,
        so a lone refused message cannot hold the queue once anything else can be stored.
        """
        delay = self.retry_min_s
        try:
            self._commit(batch)
        except Exception as exc:  # noqa: BLE001 - the store's errors, and anything a row could cause
            self._count(store_errors=1)
            log.warning("collector: store write failed (%s); retrying message by message", first_line(exc, 200))
            while not self._commit_one_by_one(batch):
                if stopping or self._stopped.wait(delay):
                    return False
                delay = min(self.retry_max_s, delay * 2)
                stopping = self._top_up(batch) or stopping
        self._ack(batch)
        self._count(done=len(batch))
        return True

    def _top_up(self, batch: list[_Item]) -> bool:
        """Add what arrived meanwhile to a waiting batch (up to ``batch_size``); True when stop was asked."""
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _commit_one_by_one(self, batch: list[_Item]) -> bool:
        """Commit each item still pending alone. True when done (refused items dropped); False when
        nothing could be stored (the store is down: retry later). Committed items become drops,
        so a retry stores them no second time and still acknowledges them."""
        failed: list[tuple[int, Exception]] = []
        stored_any = False
        for index, item in enumerate(batch):
            if item.kind == "drop" and item.seen_at is None:
                continue
            try:
                self._commit([item])
            except Exception as exc:  # noqa: BLE001
                failed.append((index, exc))
                continue
            stored_any = True
            batch[index] = replace(item, kind="drop", seen_at=None)
        if failed and not stored_any:
            self._count(store_errors=1)
            log.warning("collector: store unavailable, retrying: %s", first_line(failed[0][1]))
            return False
        for index, exc in failed:
            item = batch[index]
            log.warning("collector: dropped a message from %s that the store refused: %s", item.device or "?",
                        first_line(exc, 200))
            batch[index] = replace(item, kind="drop", seen_at=None)
        self._count(malformed=len(failed))
        return True

    def _commit(self, batch: list[_Item]) -> None:
        store, fleet = self.store, self.fleet
        states = desired = 0
        for item in batch:  # current values, in the order they came
            if item.kind == "state":
                store.record_state(fleet, item.value, item.seen_at if item.seen_at is not None
                                   else self._retained_at(item.value))
                states += 1
            elif item.kind == "desired":
                store.record_desired(fleet, item.value)
                desired += 1
            elif item.kind == "clear":
                store.clear_desired(fleet, item.device, item.value)
                desired += 1
        windows = [(fleet, i.device, i.value) for i in batch if i.kind == "window"]
        events = [(fleet, i.device, i.value) for i in batch if i.kind == "event"]
        new = (store.add_windows(windows) if windows else 0) + (store.add_events(events) if events else 0)
        seen: dict[str, float] = {}
        for item in batch:
            if item.seen_at is not None and item.device and item.kind != "drop":
                seen[item.device] = max(seen.get(item.device, 0.0), item.seen_at)
        for device, at in seen.items():
            store.touch(fleet, device, at)
        self._count(flushed=True, stored=new, duplicates=len(windows) + len(events) - new, states=states,
                    desired=desired)

    def _retained_at(self, state: DeviceState) -> float:
        """When a retained (replayed) state was current: its own time, never past now (device clocks
        drift), so a device gone for a week does not look seen at the collector's start."""
        now = self.clock()
        return min(now, state.updated_at) if state.updated_at > 0 else now

    def _ack(self, batch: list[_Item]) -> None:
        client, generation = self._client, self._generation
        if client is None:
            return
        for item in batch:
            # A message from an earlier connection is redelivered on this one (with its own PUBACK).
            if item.qos > 0 and item.generation == generation:
                client.ack(item.mid, item.qos)


def _check_ints(topic: str, **values: int) -> None:
    """Values the store keeps as 64-bit integers (a device could send 10**30)."""
    for name, value in values.items():
        if not -MAX_SQL_INT <= value <= MAX_SQL_INT:
            raise ProtocolError(f"{topic}: field '{name}' is out of range")



