"""The fleet store (DESIGN §8): devices, releases, desired deployments, install events and
telemetry, in SQLite (default, WAL) or PostgreSQL (``postgresql://...``) with one schema and one
behaviour (`edgesdk.fleet.store_schema`; the same tests run on both).

    FleetStore.open()                       $EDGESDK_HOME/fleet.db (else ~/.config/edgesdk/fleet.db)
    FleetStore.open("postgresql://u@h/db")  PostgreSQL (needs psycopg: edgesdk[fleet])

Thread-safe: each thread gets its own connection (the collector writes from its thread while
commands read). Every write is one transaction; telemetry writers of one fleet take a lock
(SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock), so a window redelivered to two
collectors is stored and counted once. Reports read a rollup kept in the same transaction as
the windows: per series (a device's model, release, variant and provider) and per 5-minute and
1-hour bucket, so a report over 10 million windows reads one row per device and hour inside its
range plus its 5-minute edges (~2 s on one core; see docs/architecture.md "Fleet store"). Every
value travels as a parameter, never as SQL text. Database errors become one-line `FleetError`s
naming the store (without its password).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from edgesdk.errors import FleetError, first_line, map_os_errors
from edgesdk.fleet.records import (DesiredRecord, DeviceRecord, EventRecord, GroupStats, ModelRecord, ReleaseRecord,
                                   release_name)
from edgesdk.fleet.store_queries import (DESIRED_COLUMNS, MAX_TIME, RELEASE_COLUMNS, UPSERT_DEVICE, Aggregate,
                                         WindowRow, check_group_by, clean_text, desired_record, device_filter,
                                         device_slots, device_status, from_json, key_function, label_values,
                                         release_names, release_order, release_record, rollup_pieces,
                                         series_filter, series_step, store_windows, to_json, window_row)
from edgesdk.fleet.store_schema import (ROLLUP_HOUR_S, PostgresBackend, SQLiteBackend, Transaction,
                                        migrate, redact_url)
from edgesdk.protocol.histogram import LatencyHistogram
from edgesdk.protocol.messages import DeviceState, InstallEvent, InstallEventKind, TelemetryWindow
from edgesdk.protocol.statements import DeploymentStatement, compare_versions

RETRIES = 3  # PostgreSQL deadlock/serialization failures are retried, the whole transaction
MAX_LISTED_SERIES = 500  # a report on this many series or fewer names them in its query
_T = TypeVar("_T")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def default_store_path() -> Path:
    """$EDGESDK_HOME/fleet.db, else ~/.config/edgesdk/fleet.db (where `edgesdk.signing` keeps keys)."""
    home = os.environ.get("EDGESDK_HOME")
    return (Path(home) if home else Path.home() / ".config" / "edgesdk") / "fleet.db"


class FleetStore:
    """Devices, releases, desired vs actual, events and telemetry of every fleet (DESIGN §8)."""

    def __init__(self, backend: SQLiteBackend | PostgresBackend) -> None:
        """Use `FleetStore.open`."""
        self._backend = backend
        self._local = threading.local()
        self._conns: list[tuple[weakref.ref[threading.Thread], Any]] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._series_ids: dict[tuple, int] = {}  # telemetry series -> id, once committed
        self.schema_version = 0

    # -- opening, connections, transactions ------------------------------------------------------
    @classmethod
    def open(cls, location: str | Path | None = None) -> FleetStore:
        """None: the default SQLite file; ``postgresql://...``: PostgreSQL; else a SQLite file path
        (``sqlite:///path`` too). Creates the schema or migrates it to this edgesdk's version."""
        if location is None:
            backend: SQLiteBackend | PostgresBackend = SQLiteBackend(default_store_path())
        elif isinstance(location, Path):
            backend = SQLiteBackend(location)
        elif location.startswith(("postgresql://", "postgres://")):
            backend = PostgresBackend(location)
        elif location.startswith("sqlite://"):
            backend = SQLiteBackend(Path(location[len("sqlite://"):]))
        elif _SCHEME.match(location):
            raise FleetError(f"fleet store {redact_url(location)!r}: use a file path or postgresql://...")
        else:
            backend = SQLiteBackend(Path(location))
        if isinstance(backend, SQLiteBackend):
            backend.path = backend.path.expanduser().absolute()
            backend.url = f"sqlite://{backend.path}"
            with map_os_errors(f"create {backend.path.parent}"):
                backend.path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(backend)
        try:
            store.schema_version = store._run(
                lambda tx: migrate(tx.execute, tx.query, backend.dialect), write=True, locks=("schema",))
        except BaseException:
            store.close()
            raise
        return store

    @property
    def url(self) -> str:
        """Where the store is, for messages (no password)."""
        return self._backend.url

    @property
    def dialect(self) -> str:
        return self._backend.dialect.name

    def close(self) -> None:
        """Close every thread's connection; call it when no other thread uses the store."""
        with self._conns_lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for _, conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._conns_lock:
            if self._closed:
                raise FleetError(f"fleet store {self.url} is closed")
            # Connections of threads that ended are closed here, so a pool of short threads
            # does not pile them up.
            kept, dead = [], []
            for ref, c in self._conns:
                thread = ref()
                (kept if thread is not None and thread.is_alive() else dead).append((ref, c))
            self._conns = kept
        for _, c in dead:
            with contextlib.suppress(Exception):
                c.close()
        try:
            conn = self._backend.connect()
        except self._backend.errors as exc:
            raise FleetError(f"cannot open the fleet store {self.url}: {first_line(exc)}") from None
        with self._conns_lock:
            self._conns.append((weakref.ref(threading.current_thread()), conn))
        self._local.conn = conn
        return conn

    def _forget_conn(self, conn: Any) -> None:
        self._local.conn = None
        with self._conns_lock:
            self._conns = [(r, c) for r, c in self._conns if c is not conn]
        with contextlib.suppress(Exception):
            conn.close()

    def transact(self, fn: Callable[[Transaction], _T], *, write: bool = False) -> _T:
        """``fn(tx)`` in one transaction of this store (for the modules that keep their own tables
        in it, e.g. `edgesdk.fleet.rollouts`); errors as FleetError."""
        return self._run(fn, write=write)

    def _run(self, fn: Callable[[Transaction], _T], *, write: bool = False, locks: Collection[str] = ()) -> _T:
        """``fn`` in one transaction (rerun on a PostgreSQL deadlock); errors as FleetError."""
        attempt = 0
        while True:
            conn = self._conn()
            try:
                with self._backend.transaction(conn, write, locks) as tx:
                    return fn(tx)
            except self._backend.retryable as exc:
                attempt += 1
                if attempt >= RETRIES:
                    raise FleetError(f"fleet store {self.url}: {first_line(exc)}") from None
            except self._backend.errors as exc:
                if self._backend.broken(conn):
                    self._forget_conn(conn)  # the next call reconnects
                raise FleetError(f"fleet store {self.url}: {first_line(exc)}") from None

    # -- registry --------------------------------------------------------------------------------
    def record_state(self, fleet: str, state: DeviceState, at: float) -> None:
        """A device's state message: upsert the device (first_seen kept, last_seen = ``at`` unless
        later already), its labels and the models it runs. An offline state (the Will, written
        when the device connected) only marks it offline: what it ran stays as its last online
        state said, unless the device is new."""
        device_id = state.device_id
        hw = state.hardware if isinstance(state.hardware, dict) else {}
        hardware_class = state.hardware_class or next(
            (hw[k] for k in ("board", "cpu", "arch") if isinstance(hw.get(k), str) and hw[k]), None)
        interval = state.telemetry_interval_s
        if interval is not None and not 0 < interval < 1e9:
            interval = None
        row = (fleet, device_id, int(state.online), at, at, at, clean_text(hardware_class),
               clean_text(hw.get("arch")) if isinstance(hw.get("arch"), str) else None, clean_text(state.target),
               clean_text(state.agent_version) or None, interval, to_json(hw), to_json(state.runtimes))
        labels = [(fleet, device_id, clean_text(k), clean_text(v)) for k, v in sorted(state.labels.items())]
        models, names = [], set()
        for m in state.models:
            if not isinstance(m, dict) or not isinstance(m.get("name"), str) or m["name"] in names:
                continue
            names.add(m["name"])
            models.append((fleet, device_id, clean_text(m["name"]), clean_text(m.get("version")) or "",
                           clean_text(m.get("package_id")) or "", clean_text(m.get("variant")),
                           clean_text(m.get("provider")), clean_text(m.get("runtime"))))

        def write(tx: Transaction) -> None:
            known = tx.query("SELECT 1 FROM devices WHERE fleet = ? AND device_id = ?", (fleet, device_id))
            if known and not state.online:
                tx.execute("UPDATE devices SET online = 0, state_at = ?, last_seen = CASE WHEN last_seen IS NULL "
                           "OR last_seen < ? THEN ? ELSE last_seen END WHERE fleet = ? AND device_id = ?",
                           (at, at, at, fleet, device_id))
                return
            tx.execute(UPSERT_DEVICE, row)  # locks the device row first: concurrent states queue here
            tx.execute("DELETE FROM device_labels WHERE fleet = ? AND device_id = ?", (fleet, device_id))
            tx.executemany("INSERT INTO device_labels (fleet, device_id, key, value) VALUES (?, ?, ?, ?)", labels)
            tx.execute("DELETE FROM device_models WHERE fleet = ? AND device_id = ?", (fleet, device_id))
            tx.executemany("INSERT INTO device_models (fleet, device_id, name, version, package_id, variant, "
                           "provider, runtime) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", models)

        self._run(write, write=True)

    def touch(self, fleet: str, device_id: str, at: float) -> None:
        """Any message from a device: its last_seen moves to ``at`` (an unknown device stays unknown)."""
        self._run(lambda tx: tx.execute(
            "UPDATE devices SET last_seen = ? WHERE fleet = ? AND device_id = ? AND (last_seen IS NULL OR "
            "last_seen < ?)", (at, fleet, device_id, at)), write=True)

    def devices(self, fleet: str | None = None, select: Mapping[str, str] | None = None,
                now: float | None = None) -> list[DeviceRecord]:
        """Devices of ``fleet`` (all fleets: None) whose labels match every ``select`` key=value,
        sorted by fleet and id. Status: offline after an offline state; unknown when online but
        silent for more than SILENT_WINDOWS telemetry intervals (60 s when unknown) before ``now``."""
        where, params = device_filter(fleet, None, select)
        return self._run(lambda tx: self._load_devices(tx, where, params, time.time() if now is None else now))

    def device(self, fleet: str, device_id: str, now: float | None = None) -> DeviceRecord | None:
        """One device as `devices` describes it, or None."""
        where, params = device_filter(fleet, device_id, None)
        found = self._run(lambda tx: self._load_devices(tx, where, params, time.time() if now is None else now))
        return found[0] if found else None

    def fleets(self) -> list[str]:
        """Every fleet with a device or a desired deployment, sorted."""
        rows = self._run(lambda tx: tx.query("SELECT fleet FROM devices UNION SELECT fleet FROM desired"))
        return sorted(r[0] for r in rows)

    def forget_device(self, fleet: str, device_id: str) -> bool:
        """Delete the device and what it was told to run; its events and telemetry stay (history).
        False when the store knew neither."""
        def write(tx: Transaction) -> bool:
            gone = tx.execute("DELETE FROM devices WHERE fleet = ? AND device_id = ?", (fleet, device_id))
            gone += tx.execute("DELETE FROM desired WHERE fleet = ? AND device_id = ?", (fleet, device_id))
            return gone > 0

        return self._run(write, write=True)

    def _load_devices(self, tx: Transaction, where: str, params: list[Any], now: float) -> list[DeviceRecord]:
        rows = tx.query("SELECT d.fleet, d.device_id, d.online, d.first_seen, d.last_seen, d.hardware_class, d.arch, "
                        f"d.target, d.agent_version, d.telemetry_interval_s, d.hardware, d.runtimes FROM devices d "
                        f"WHERE {where}", params)
        if not rows:
            return []
        chosen = f"(x.fleet, x.device_id) IN (SELECT d.fleet, d.device_id FROM devices d WHERE {where})"
        labels: dict[tuple[str, str], dict[str, str]] = {}
        for f, d, k, v in tx.query(f"SELECT x.fleet, x.device_id, x.key, x.value FROM device_labels x WHERE {chosen}",
                                   params):
            labels.setdefault((f, d), {})[k] = v
        models: dict[tuple[str, str], list[ModelRecord]] = {}
        for f, d, *m in tx.query("SELECT x.fleet, x.device_id, x.name, x.version, x.package_id, x.variant, "
                                 f"x.provider, x.runtime FROM device_models x WHERE {chosen}", params):
            models.setdefault((f, d), []).append(ModelRecord(*m))
        desired: dict[tuple[str, str], list[DesiredRecord]] = {}
        for f, d, *s in tx.query(f"SELECT x.fleet, x.device_id, {DESIRED_COLUMNS} FROM desired x WHERE {chosen}",
                                 params):
            desired.setdefault((f, d), []).append(desired_record(s))
        out = []
        for (f, d, online, first, last, hw_class, arch, target, agent, interval, hw, runtimes) in rows:
            out.append(DeviceRecord(
                fleet=f, device_id=d, status=device_status(bool(online), last, interval, now), last_seen=last,
                first_seen=first, hardware_class=hw_class, arch=arch, target=target, agent_version=agent,
                labels=labels.get((f, d), {}), models=tuple(sorted(models.get((f, d), []), key=lambda m: m.name)),
                desired=tuple(sorted(desired.get((f, d), []), key=lambda s: s.model)),
                telemetry_interval_s=interval, hardware=from_json(hw, {}), runtimes=from_json(runtimes, {})))
        return sorted(out, key=lambda r: (r.fleet, r.device_id))

    # -- releases --------------------------------------------------------------------------------
    def record_release(self, release: ReleaseRecord) -> None:
        """Add or update a published package (keyed by its package id)."""
        r = release
        self._run(lambda tx: tx.execute(
            "INSERT INTO releases (package_id, name, version, target, size, published_at, signer, metrics) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (package_id) DO UPDATE SET name = excluded.name, "
            "version = excluded.version, target = excluded.target, size = excluded.size, published_at = "
            "excluded.published_at, signer = excluded.signer, metrics = excluded.metrics",
            (r.package_id, r.name, r.version, r.target, r.size, r.published_at, r.signer, to_json(r.metrics))),
            write=True)

    def releases(self, name: str | None = None) -> list[ReleaseRecord]:
        """Known releases (of package ``name``), sorted by name, version (1.10 after 1.9), target."""
        sql, params = f"SELECT {RELEASE_COLUMNS} FROM releases", ()
        if name is not None:
            sql, params = sql + " WHERE name = ?", (name,)
        rows = self._run(lambda tx: tx.query(sql, params))
        return sorted((release_record(r) for r in rows), key=release_order)

    def release(self, package_id: str) -> ReleaseRecord | None:
        """The release of this package id, or None."""
        rows = self._run(lambda tx: tx.query(f"SELECT {RELEASE_COLUMNS} FROM releases WHERE package_id = ?",
                                             (package_id,)))
        return release_record(rows[0]) if rows else None

    def find_release(self, name: str, version: str, target: str | None = None) -> list[ReleaseRecord]:
        """Releases ``name@version`` (versions compared as `compare_versions` does: 1.2 = 1.2.0),
        for ``target`` when given; one per target."""
        return [r for r in self.releases(name) if compare_versions(r.version, version) == 0
                and (target is None or r.target == target)]

    # -- deployments: desired vs actual ----------------------------------------------------------
    def record_desired(self, fleet: str, statement: DeploymentStatement) -> None:
        """What a device was told for one model name; a statement with a serial at or below the
        stored one changes nothing. An undeploy statement is stored with no package."""
        s = statement
        if s.fleet != fleet:
            raise FleetError(f"statement serial {s.serial} is for fleet {s.fleet!r}, not {fleet!r}")
        row = (fleet, s.device, s.name, None if s.undeploy else s.package_id, None if s.undeploy else s.version,
               s.serial, s.issued_at, s.expires, s.rollout_id, int(s.rollback))
        self._run(lambda tx: tx.execute(
            "INSERT INTO desired (fleet, device_id, model, package_id, version, serial, issued_at, expires, "
            "rollout_id, is_rollback) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device_id, model) "
            "DO UPDATE SET package_id = excluded.package_id, version = excluded.version, serial = excluded.serial, "
            "issued_at = excluded.issued_at, expires = excluded.expires, rollout_id = excluded.rollout_id, "
            "is_rollback = excluded.is_rollback WHERE excluded.serial > desired.serial", row), write=True)

    def clear_desired(self, fleet: str, device_id: str, model: str) -> None:
        """Forget what ``device_id`` was told for ``model`` (its retained statement was cleared)."""
        self._run(lambda tx: tx.execute("DELETE FROM desired WHERE fleet = ? AND device_id = ? AND model = ?",
                                        (fleet, device_id, model)), write=True)

    def desired(self, fleet: str, device_id: str) -> list[DesiredRecord]:
        """What the device was told to run, by model name (a device the registry lacks too)."""
        rows = self._run(lambda tx: tx.query(f"SELECT {DESIRED_COLUMNS} FROM desired x WHERE x.fleet = ? AND "
                                             "x.device_id = ?", (fleet, device_id)))
        return sorted((desired_record(r) for r in rows), key=lambda s: s.model)

    # -- events ----------------------------------------------------------------------------------
    def add_events(self, items: Iterable[tuple[str, str, InstallEvent]]) -> int:
        """Store (fleet, device_id, event)s in one transaction; the same event delivered again
        (fleet, device, at, kind, package, model) is stored once. Returns the rows added."""
        rows = []
        for fleet, device_id, e in items:
            if not abs(e.at) < MAX_TIME:
                continue
            rows.append((fleet, device_id, e.at, e.kind.value, clean_text(e.model) or "", clean_text(e.package_id),
                         clean_text(e.rollout_id), e.progress, clean_text(e.reason), to_json(e.extra),
                         None if e.table is None else to_json(e.table)))
        if not rows:
            return 0
        return self._run(lambda tx: tx.executemany(
            "INSERT INTO events (fleet, device_id, at, kind, model, package_id, rollout_id, progress, reason, "
            "extra, table_rows) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device_id, at, kind, "
            "package_id, model) DO NOTHING", rows), write=True)

    def events(self, fleet: str | None = None, *, since: float | None = None, until: float | None = None,
               device_id: str | None = None, kinds: Iterable[str | InstallEventKind] | None = None,
               limit: int | None = None, package_id: str | None = None) -> list[EventRecord]:
        """Events with since <= at < until, oldest first; with ``limit``, the latest ``limit``."""
        where, params = ["1 = 1"], []
        for clause, value in (("e.fleet = ?", fleet), ("e.at >= ?", since), ("e.at < ?", until),
                              ("e.device_id = ?", device_id), ("e.package_id = ?", package_id)):
            if value is not None:
                where.append(clause)
                params.append(value)
        if kinds is not None:
            names = sorted({k.value if isinstance(k, InstallEventKind) else str(k) for k in kinds})
            if not names:
                return []
            where.append(f"e.kind IN ({', '.join('?' * len(names))})")
            params.extend(names)
        sql = ("SELECT e.fleet, e.device_id, e.at, e.kind, e.model, e.package_id, r.name, r.version, e.rollout_id, "
               "e.reason, e.extra, e.progress, e.table_rows FROM events e LEFT JOIN releases r ON r.package_id = "
               f"e.package_id WHERE {' AND '.join(where)}")
        if limit is not None:
            sql += " ORDER BY e.at DESC, e.id DESC LIMIT ?"
            params.append(max(0, int(limit)))
        else:
            sql += " ORDER BY e.at, e.id"
        rows = self._run(lambda tx: tx.query(sql, params))
        if limit is not None:
            rows.reverse()
        return [EventRecord(fleet=f, device_id=d, at=at, kind=kind, model=model or None, package_id=pid,
                            release=release_name(name, version), rollout_id=rollout, reason=reason,
                            extra=from_json(extra, {}), progress=progress, table=from_json(table, None))
                for f, d, at, kind, model, pid, name, version, rollout, reason, extra, progress, table in rows]

    # -- telemetry -------------------------------------------------------------------------------
    def add_windows(self, items: Iterable[tuple[str, str, TelemetryWindow]]) -> int:
        """Store (fleet, device_id, window)s and fold them into the rollup, in one transaction.
        A window already stored (same fleet, device, seq and start) is skipped, so redelivery never
        counts twice; a device whose agent was reinstalled starts its seq at 0 again, and its new
        windows (other start times) are stored. Returns how many were new. Windows with numbers no device can mean (past 64 bits)
        are dropped; a histogram of another scheme is dropped from its window (calls still count)."""
        received = time.time()
        rows: dict[tuple[str, str, int], WindowRow] = {}
        for fleet, device_id, window in items:
            row = window_row(fleet, device_id, window, received)
            if row is not None:
                rows.setdefault(row.key, row)
        if not rows:
            return 0
        locks = {f"telemetry/{key[0]}" for key in rows}
        new, learned = self._run(lambda tx: store_windows(tx, rows, self._series_ids), write=True, locks=locks)
        self._series_ids.update(learned)  # only now: they are committed (series rows are never deleted)
        return new

    def window_count(self, fleet: str | None = None) -> int:
        """Telemetry windows stored (of ``fleet``)."""
        sql, params = f"SELECT SUM(r.windows) FROM telemetry_rollup r WHERE r.span = {ROLLUP_HOUR_S}", ()
        if fleet is not None:
            sql += " AND r.series_id IN (SELECT s.id FROM telemetry_series s WHERE s.fleet = ?)"
            params = (fleet,)
        return int(self._run(lambda tx: tx.query(sql, params))[0][0] or 0)

    def telemetry(self, fleet: str | None = None, *, since: float | None = None, until: float | None = None,
                  by: str = "release", select: Mapping[str, str] | None = None,
                  device_ids: Collection[str] | None = None) -> list[GroupStats]:
        """Telemetry merged per group, sorted by key: exact percentiles of the merged histograms.

        ``by``: release | device | target | provider | model | hardware | label:KEY (a value the
        store does not know groups as `records.NO_VALUE`). Windows are selected by the 5-minute
        bucket their ``window_end`` falls in: a bucket overlapping [since, until) counts whole.
        ``select`` keeps devices whose labels match all key=value pairs; ``device_ids`` only those
        devices. Device heartbeats (windows with no package) belong to no group.
        """
        return self._aggregate(fleet, since, until, by, select, device_ids, None).stats()

    def latency_series(self, fleet: str | None = None, *, since: float | None = None, until: float | None = None,
                       bucket_s: float = 300, by: str = "release", select: Mapping[str, str] | None = None,
                       device_ids: Collection[str] | None = None) -> dict[str, list[tuple[float, GroupStats]]]:
        """Per group, per time bucket (its start, unix time) in time order: like `telemetry`.
        ``bucket_s`` is rounded up to whole 5-minute rollup buckets (whole hours read fastest)."""
        return self._aggregate(fleet, since, until, by, select, device_ids, series_step(bucket_s)).series()

    def merged_histogram(self, fleet: str | None = None, *, since: float | None = None, until: float | None = None,
                         by: str = "release", select: Mapping[str, str] | None = None,
                         device_ids: Collection[str] | None = None) -> dict[str, LatencyHistogram]:
        """Per group, the merged latency histogram (selected as in `telemetry`)."""
        return self._aggregate(fleet, since, until, by, select, device_ids, None).histograms()

    def _aggregate(self, fleet: str | None, since: float | None, until: float | None, by: str,
                   select: Mapping[str, str] | None, device_ids: Collection[str] | None,
                   step: int | None) -> Aggregate:
        label_key = check_group_by(by)
        where, params = series_filter(fleet, select, device_ids)
        pieces = rollup_pieces(since, until, step)

        def read(tx: Transaction) -> Aggregate:
            key_of = key_function(
                by, multi_fleet=fleet is None, releases=release_names(tx) if by == "release" else {},
                devices=device_slots(tx, fleet) if by in ("target", "hardware") else {},
                labels=label_values(tx, fleet, label_key) if label_key is not None else {})
            series = {sid: (key_of(f, d, m, p, v, pr), f, d) for sid, f, d, m, p, v, pr in tx.query(
                f"SELECT s.id, s.fleet, s.device_id, s.model, s.package_id, s.variant, s.provider FROM "
                f"telemetry_series s WHERE {where}", params)}
            out = Aggregate(series, step)
            if not series:
                return out
            # Few series (some devices): name them, so the database reads them by the series index.
            # Many: let it filter; unfiltered, the lookup in Python drops the heartbeats.
            if len(series) <= MAX_LISTED_SERIES:
                narrow, narrow_params = f" AND r.series_id IN ({', '.join('?' * len(series))})", sorted(series)
            elif fleet is None and not select and device_ids is None:
                narrow, narrow_params = "", []
            else:
                narrow = f" AND r.series_id IN (SELECT s.id FROM telemetry_series s WHERE {where})"
                narrow_params = params
            for span, low, high in pieces:
                out.add(tx.stream("SELECT r.series_id, r.bucket_start, r.windows, r.count, r.errors, r.histogram "
                                  "FROM telemetry_rollup r WHERE r.span = ? AND r.bucket_start >= ? AND "
                                  f"r.bucket_start < ?{narrow}", [span, low, high, *narrow_params]))
            return out

        return self._run(read)
