"""Which deployment statements this device obeys (DESIGN §7), and the trust state behind that.

    data_dir/trust/state.json   the last accepted statement: serial and sha256 of its signed bytes
    data_dir/trust/root.json    the newest trust root accepted (when the agent uses a trust root)

A statement is obeyed only if, in this order: it is signed by a trusted fleet key; it is for this
device of this fleet and within its validity window; its serial is above the last accepted one
(the same statement again — a retained message redelivered at reconnect — is recognised and not
a replay); and it does not lower the version of a package name the device runs, unless it is a
rollback statement. Every refusal is a TrustError with one line saying which rule refused it.
The serial is written (atomically, fsynced) before the statement is handed on, so a replay after
a crash or a restart is refused too.
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
        self._serial, self._last_digest = self._load_state()

    # -- keys ----------------------------------------------------------------------------------
    @property
    def release_keys(self) -> list[Ed25519PublicKey]:
        return self.root.keys_for("release") if self.root is not None else list(self._static_release)

    @property
    def fleet_keys(self) -> list[Ed25519PublicKey]:
        return self.root.keys_for("fleet") if self.root is not None else list(self._static_fleet)

    @property
    def last_serial(self) -> int:
        return self._serial

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
        with self._lock:
            if statement.serial == self._serial and digest == self._last_digest:
                return Accepted(signed, fleet_key, redelivered=True)
            if statement.serial <= self._serial:
                raise TrustError(f"replayed statement: serial {statement.serial} is not above the last "
                                 f"accepted {self._serial}")
            current = active_version(statement.name)
            if current is not None and compare_versions(statement.version, current) < 0 and not statement.rollback:
                raise TrustError(f"downgrade refused: {statement.name} {statement.version} is below the running "
                                 f"{current} and the statement is not a rollback")
            self._save_state(statement.serial, digest)
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
    def _load_state(self) -> tuple[int, str]:
        path = self.dir / "state.json"
        try:
            data = json.loads(path.read_bytes())
            return int(data["serial"]), str(data["statement_sha256"])
        except FileNotFoundError:
            return 0, ""
        except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            # OverflowError: int(Infinity) (json.loads reads it); RecursionError: deep nesting.
            # Unreadable state must not reopen the door to replays: refuse until a new statement
            # above "now" arrives (serials are microsecond timestamps, see protocol.new_serial).
            log.error("%s unreadable (%s): accepting only statements issued from now on", path, exc)
            return int(self.clock() * 1_000_000), ""

    def _save_state(self, serial: int, digest: str) -> None:
        """Durable before the statement is obeyed; a StorageError (disk full) means not obeyed."""
        payload = json.dumps({"serial": serial, "statement_sha256": digest, "at": self.clock()}).encode()
        with map_os_errors(f"record statement serial in {self.dir / 'state.json'}"):
            write_bytes_atomic(self.dir / "state.json", payload)
        self._serial, self._last_digest = serial, digest
