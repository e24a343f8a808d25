"""Signed deployment statements: the `desired` message (DESIGN §7, docs/protocol.md).

A statement says "device D of fleet F should run package P (name, version), serial S, valid from
issued_at until expires", signed by a fleet key; an *undeploy* statement says "device D should no
longer run model N" (its package fields are empty). One statement concerns one model name: it
travels on `devices/{id}/desired/{name}` and its serial is compared with that name's. On the wire:

    {"statement": "<the statement's JSON text>", "signature": {"keyid": "<16 hex>", "sig": "<128 hex>"}}

The statement travels as text so the signature covers its exact bytes (no canonical-JSON step
whose float or key-order rules two implementations could read differently). Parsing never
verifies; `verify` checks the signature against trusted fleet keys and `check_addressed` the
stateless rules (fleet, device, validity window). Replay (serial) and downgrade (version) need
the device's state and are the agent's (agent/statement_guard.py).
"""

from __future__ import annotations

import binascii
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgesdk.errors import ProtocolError, SignatureError, TrustError
from edgesdk.protocol.blocks import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from edgesdk.protocol.ids import check_id, is_sha256_hex, is_valid_id
from edgesdk.protocol.messages import _Message, parse_json
from edgesdk.protocol.selection_hint import SelectionHint

DEFAULT_LIFETIME_S = 30 * 24 * 3600  # a statement not re-issued within 30 days stops being obeyed
CLOCK_SKEW_S = 300.0  # a statement "issued" up to 5 min in the device's future is still accepted
MAX_SERIAL = 2 ** 63 - 1
MAX_PACKAGE_BYTES = 1 << 40  # 1 TiB: sizes past this are nonsense, not packages
MAX_TEXT = 128  # version, target, rollout id
UNDEPLOY_EMPTY = ("package_id", "version", "target", "size", "block_size", "blocks_digest")


@dataclass(frozen=True)
class DeploymentStatement(_Message):
    """What one device should run for one package name; every field is covered by the signature.
    With ``undeploy`` the device should stop running ``name``, and the package fields are empty
    (`undeploy_statement` builds one)."""

    fleet: str
    device: str
    package_id: str  # sha256 hex of the .edgepkg bytes: the bytes are checked against it
    name: str  # the package (model) name, a topic level (ids rule); versions and serials are per name
    version: str
    target: str
    size: int  # bytes of the .edgepkg: the transfer never accepts more
    block_size: int
    blocks_digest: str  # sha256 of the block index
    serial: int  # grows with every statement for this device: a lower or equal one is a replay
    issued_at: float  # unix time
    expires: float  # unix time; after it the statement is refused (a frozen fleet cannot pin a device)
    rollout_id: str | None = None
    rollback: bool = False  # only a rollback statement may install a lower version of a name
    undeploy: bool = False  # the device unloads ``name`` and frees its disk; no package named
    # The fleet's ranking of this package's candidates on the device's hardware class
    # (`edgesdk.protocol.selection_hint`); None: the device searches every candidate itself.
    selection_hint: dict[str, Any] | None = None

    @property
    def sha256(self) -> str:
        """The whole-file sha256 the transfer checks: the package id itself."""
        return self.package_id

    @property
    def hint(self) -> SelectionHint | None:
        """The parsed selection hint (checked when the statement was parsed)."""
        return None if self.selection_hint is None else SelectionHint.from_dict(self.selection_hint)

    @property
    def block_count(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def _check(self, where: str) -> None:
        try:
            check_id(self.fleet, "fleet")
            check_id(self.device, "device id")
        except ProtocolError as exc:
            raise ProtocolError(f"{where}: {exc}") from None
        if not is_valid_id(self.name):
            raise ProtocolError(f"{where}: field 'name' must be a model name (letters, digits, '.', '_', '-', "
                                "1-64, starting with a letter or digit)")
        if self.rollout_id is not None and (len(self.rollout_id) > MAX_TEXT or not self.rollout_id.isprintable()):
            raise ProtocolError(f"{where}: field 'rollout_id' must be at most {MAX_TEXT} printable characters")
        if not 0 < self.serial <= MAX_SERIAL:
            raise ProtocolError(f"{where}: field 'serial' must be within 1..2^63-1")
        if self.expires <= self.issued_at:
            raise ProtocolError(f"{where}: 'expires' is not after 'issued_at'")
        if self.selection_hint is not None:
            SelectionHint.from_dict(self.selection_hint, f"{where}: field 'selection_hint'")
        if self.undeploy:
            if self.rollback or self.selection_hint is not None or any(getattr(self, f) for f in UNDEPLOY_EMPTY):
                raise ProtocolError(f"{where}: an undeploy statement names no package (fields "
                                    f"{', '.join(UNDEPLOY_EMPTY)} empty, rollback false, no selection_hint)")
            return
        for name in ("package_id", "blocks_digest"):
            if not is_sha256_hex(getattr(self, name)):
                raise ProtocolError(f"{where}: field '{name}' must be 64 lowercase hex")
        for name in ("version", "target"):
            value = getattr(self, name)
            if not value or len(value) > MAX_TEXT or not value.isprintable():
                raise ProtocolError(f"{where}: field '{name}' must be 1-{MAX_TEXT} printable characters")
        if not 0 < self.size <= MAX_PACKAGE_BYTES:
            raise ProtocolError(f"{where}: field 'size' must be within 1..{MAX_PACKAGE_BYTES}")
        if not MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE:
            raise ProtocolError(f"{where}: field 'block_size' must be {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")

    def check_addressed(self, fleet: str, device: str, now: float) -> None:
        """TrustError unless this statement is for ``device`` of ``fleet`` and valid at ``now``."""
        if self.fleet != fleet or self.device != device:
            raise TrustError(f"statement is for device {self.device!r} of fleet {self.fleet!r}, "
                             f"not {device!r} of {fleet!r}")
        if now >= self.expires:
            raise TrustError(f"statement serial {self.serial} expired at {_utc(self.expires)} (now {_utc(now)})")
        if self.issued_at > now + CLOCK_SKEW_S:
            raise TrustError(f"statement serial {self.serial} is issued in the future ({_utc(self.issued_at)}; "
                             f"now {_utc(now)})")

    def reissued(self, serial: int, now: float, lifetime_s: float = DEFAULT_LIFETIME_S) -> DeploymentStatement:
        """The same deployment with a new serial and validity window (the fleet service renews)."""
        return replace(self, serial=serial, issued_at=now, expires=now + lifetime_s)


@dataclass(frozen=True)
class SignedStatement:
    """A statement with the exact bytes that were signed and the signature over them."""

    statement: DeploymentStatement
    signed_bytes: bytes
    keyid: str
    signature: bytes

    def to_json(self) -> bytes:
        return json.dumps({"statement": self.signed_bytes.decode(),
                           "signature": {"keyid": self.keyid, "sig": self.signature.hex()}},
                          separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str, topic: str = "") -> SignedStatement:
        """Parse (never verify): ProtocolError for anything malformed, including an unsigned message."""
        where = topic or "deployment statement"
        data = parse_json(raw, where)
        if not isinstance(data, dict) or "statement" not in data or "signature" not in data:
            raise ProtocolError(f"{where}: not a signed statement (expected 'statement' and 'signature')")
        text, sig = data["statement"], data["signature"]
        if not isinstance(text, str):
            raise ProtocolError(f"{where}: field 'statement' must be the statement's JSON text")
        if not isinstance(sig, dict) or not isinstance(sig.get("keyid"), str) or not isinstance(sig.get("sig"), str):
            raise ProtocolError(f"{where}: field 'signature' must be {{keyid, sig}} strings")
        try:
            signature = binascii.unhexlify(sig["sig"])
        except (binascii.Error, ValueError):
            raise ProtocolError(f"{where}: signature is not hex") from None
        signed = text.encode("utf-8", errors="surrogatepass")
        statement = DeploymentStatement.from_json(signed, f"{where}: statement")
        return cls(statement, signed, sig["keyid"][:64], signature)

    def verify(self, fleet_keys: Iterable[Ed25519PublicKey]) -> str:
        """The id of the trusted fleet key that signed it; TrustError when none did."""
        from edgesdk.signing import verify_signature

        try:
            return verify_signature(fleet_keys, self.signed_bytes, self.signature)
        except SignatureError as exc:
            raise TrustError(f"statement serial {self.statement.serial} refused: {exc}") from None


def undeploy_statement(fleet: str, device: str, name: str, serial: int, now: float,
                       lifetime_s: float = DEFAULT_LIFETIME_S, rollout_id: str | None = None) -> DeploymentStatement:
    """"Device ``device`` should no longer run model ``name``" (checked like a parsed one)."""
    statement = DeploymentStatement(fleet=fleet, device=device, package_id="", name=name, version="", target="",
                                    size=0, block_size=0, blocks_digest="", serial=serial, issued_at=now,
                                    expires=now + lifetime_s, rollout_id=rollout_id, undeploy=True)
    statement._check("undeploy statement")
    return statement


def sign_statement(statement: DeploymentStatement, fleet_key: Ed25519PrivateKey) -> SignedStatement:
    from edgesdk.signing import key_id

    signed = statement.to_json()
    return SignedStatement(statement, signed, key_id(fleet_key.public_key()), fleet_key.sign(signed))


def new_serial(previous: int = 0, now: float | None = None) -> int:
    """A serial above ``previous``: microseconds since the epoch, so separate operators and fleet
    service processes issue growing serials without sharing a counter (clocks kept by NTP)."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    return max(previous + 1, micros)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1: numeric parts compare as numbers ("1.10" > "1.9"), others as text; a
    pre-release tail sorts before the release ("1.2.0-rc1" < "1.2.0")."""
    ka, kb = _version_key(a), _version_key(b)
    return (ka > kb) - (ka < kb)


def _version_key(version: str) -> tuple[Any, ...]:
    import re

    main, _, pre = version.strip().lstrip("vV").partition("-")
    parts = tuple(_part_key(p) for p in re.split(r"[.+_]", main) if p)
    pre_key = (1,) if not pre else (0, tuple(_part_key(p) for p in re.split(r"[.\-]", pre) if p))
    # pad so "1.2" == "1.2.0"
    while parts and parts[-1] == (0, 0, ""):
        parts = parts[:-1]
    return parts, pre_key


def _part_key(part: str) -> tuple[int, int, str]:
    # A number compares by (digit count, digits) without int(): str.isdigit() is true for '²' and
    # other Unicode digits int() refuses, and int() refuses more than 4300 digits (ValueError).
    if part.isascii() and part.isdigit():
        digits = part.lstrip("0")
        return 0, len(digits), digits
    return 1, 0, part


def _utc(ts: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, ValueError, OSError):
        return repr(ts)
