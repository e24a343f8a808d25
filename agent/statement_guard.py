"""Which deployment statements this device obeys (DESIGN §7), and the trust state behind that.

    data_dir/trust/state.json   per model name, the last accepted statement: serial and sha256 of
                                its signed bytes; and a floor every serial must be above
    data_dir/trust/root.json    the newest trust root accepted (when the agent uses a trust root)

A statement is obeyed only if, in this order: it is signed by a trusted fleet key; it is for this
device of this fleet and within its validity window; its serial is above the last one accepted
for its model name (the same statement again — a retained message redelivered at reconnect — is
recognised and not a replay); and it does not lower the version of the name the device runs,
unless it is a rollback statement. Serials are per name because each name has its own retained
statement (`devices/{id}/desired/{name}`): deploying one model must not make another's current
statement look like a replay. Every refusal is a TrustError with one line saying which rule
refused it. The serial is written (atomically, fsynced) before the statement is handed on, so a
replay after a crash or a restart is refused too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgesdk.atomicfile import write_bytes_atomic
from edgesdk.errors import TrustError, map_os_errors
from edgesdk.protocol import SignedStatement, compare_versions
from edgesdk.trustroot import TrustRoot

log = logging.getLogger("edge-agent")
ActiveVersionFn = Callable[[str], "str | None"]  # package name -> the version this device runs


@dataclass(frozen=True)
class Accepted:
    """A statement that passed every rule; ``redelivered`` when it is the last accepted one again."""

    signed: SignedStatement
    fleet_key: str
    redelivered: bool


class StatementGuard:
    def __init__(self, data_dir: Path, fleet: str, device_id: str, *, release_keys: list[Ed25519PublicKey],
                 fleet_keys: list[Ed25519PublicKey], trust_root: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.fleet, self.device_id, self.clock = fleet, device_id, clock
        self.dir = Path(data_dir) / "trust"
        with map_os_errors(f"create {self.dir}"):
            self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._static_release, self._static_fleet = list(release_keys), list(fleet_keys)
        self.root: TrustRoot | None = self._load_root(trust_root) if trust_root is not None else None
        # name -> (serial, sha256 of the signed bytes); the floor applies to every name (a state
        # file of a single-model agent, or unreadable state: see _load_state).
        self._last: dict[str, tuple[int, str]] = {}
        self._floor: tuple[int, str] = (0, "")
        self._load_state()

    # -- keys ----------------------------------------------------------------------------------
    @property
    def release_keys(self) -> list[Ed25519PublicKey]:
        return self.root.keys_for("release") if self.root is not None else list(self._static_release)

    @property
    def fleet_keys(self) -> list[Ed25519PublicKey]:
        return self.root.keys_for("fleet") if self.root is not None else list(self._static_fleet)

    def last_serial(self, name: str) -> int:
        """The serial last accepted for model ``name`` (or the floor)."""
        return self._last.get(name, self._floor)[0]

    def serials(self) -> dict[str, int]:
        """The last accepted serial per model name."""
        return {name: serial for name, (serial, _) in sorted(self._last.items())}

    # -- statements ------------------------------------------------------------------------------
    def accept(self, signed: SignedStatement, active_version: ActiveVersionFn) -> Accepted:
        """Apply every rule; TrustError names the one that refused. Records the serial when accepted."""
        statement = signed.statement
        now = self.clock()
        if self.root is not None:
            self.root.check_not_expired(now)  # a frozen fleet (no new root) stops steering devices
        fleet_key = signed.verify(self.fleet_keys)
        statement.check_addressed(self.fleet, self.device_id, now)
        digest = hashlib.sha256(signed.signed_bytes).hexdigest()
        name = statement.name
        with self._lock:
            serial, last_digest = self._last.get(name, self._floor)
            if statement.serial == serial and digest == last_digest:
                return Accepted(signed, fleet_key, redelivered=True)
            if statement.serial <= serial:
                raise TrustError(f"replayed statement: serial {statement.serial} for {name} is not above the last "
                                 f"accepted {serial}")
            current = active_version(name)
            if (current is not None and not statement.undeploy and not statement.rollback
                    and compare_versions(statement.version, current) < 0):
                raise TrustError(f"downgrade refused: {name}@{statement.version} is below the running "
                                 f"{name}@{current} and the statement is not a rollback")
            self._save_state(name, statement.serial, digest)
        return Accepted(signed, fleet_key, redelivered=False)

    # -- trust root ------------------------------------------------------------------------------
    def update_root(self, chain: list[bytes]) -> bool:
        """Follow a published chain of roots (python-tuf's rules); True when a newer root was taken."""
        if self.root is None:
            raise TrustError("this agent is configured with fixed keys, not a trust root: root update ignored")
        with self._lock:
            newer = self.root.follow(chain, self.clock())
            if newer.version == self.root.version:
                return False
            with map_os_errors(f"write {self.dir / 'root.json'}"):
                write_bytes_atomic(self.dir / "root.json", newer.raw)
            log.info("trust root updated from version %d to %d", self.root.version, newer.version)
            self.root = newer
            return True

    def _load_root(self, provisioned: bytes) -> TrustRoot:
        """The newer of the provisioned root and the one accepted last time (both self-checked)."""
        root = TrustRoot.from_bytes(provisioned, "provisioned trust root")
        stored_path = self.dir / "root.json"
        try:
            stored = TrustRoot.from_bytes(stored_path.read_bytes(), str(stored_path))
        except FileNotFoundError:
            return root
        except (OSError, TrustError) as exc:
            log.warning("ignoring %s: %s", stored_path, exc)
            return root
        return stored if stored.version > root.version else root

    # -- state -------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        path = self.dir / "state.json"
        try:
            data = json.loads(path.read_bytes())
            if "names" not in data:  # a single-model agent's state: its serial bounds every name
                self._floor = (_serial(data["serial"]), str(data["statement_sha256"]))
                return
            self._floor = (_serial(data.get("floor", 0)), str(data.get("floor_sha256", "")))
            for name, entry in data["names"].items():
                self._last[str(name)] = (_serial(entry["serial"]), str(entry["statement_sha256"]))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            # OverflowError: int(Infinity) (json.loads reads it); RecursionError: deep nesting.
            # Unreadable state must not reopen the door to replays: refuse until a new statement
            # above "now" arrives (serials are microsecond timestamps, see protocol.new_serial).
            log.error("%s unreadable (%s): accepting only statements issued from now on", path, exc)
            self._last = {}
            self._floor = (int(self.clock() * 1_000_000), "")

    def _save_state(self, name: str, serial: int, digest: str) -> None:
        """Durable before the statement is obeyed; a StorageError (disk full) means not obeyed."""
        names = {**self._last, name: (serial, digest)}
        payload = json.dumps({
            "version": 2, "floor": self._floor[0], "floor_sha256": self._floor[1], "at": self.clock(),
            "names": {n: {"serial": s, "statement_sha256": d} for n, (s, d) in sorted(names.items())}}).encode()
        with map_os_errors(f"record statement serial in {self.dir / 'state.json'}"):
            write_bytes_atomic(self.dir / "state.json", payload)
        self._last = names


def _serial(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"serial {str(value)[:30]!r} is not an integer >= 0")
    return value
