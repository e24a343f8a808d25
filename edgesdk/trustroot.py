"""The fleet's trust root: which keys may sign packages and deployment statements, and until when.

The shape is TUF's (and Uptane's) root metadata, read and verified with python-tuf's `Metadata`
API, so the rules are python-tuf's, not ours: a root is signed by a threshold of its own root
keys; the next root (version + 1) must be signed by a threshold of the previous root's keys AND
of its own; versions never go back; an expired root is not trusted. Agents are provisioned with
the first root and follow the chain, so release and fleet keys rotate (and stolen ones are
revoked) without touching a device.

TUF's root names exactly four roles. edgesdk uses them as:

    root       the root keys (offline; threshold N): sign new roots
    targets    the release keys: sign packages (manifest.sig) — TUF's targets role signs artifacts
    timestamp  the fleet keys: sign deployment statements — short-lived, like TUF's timestamp
    snapshot   the fleet keys as well (TUF requires the role; edgesdk signs nothing with it)

Packages and statements carry one signature each, so the release and fleet roles have threshold 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgesdk.errors import ConfigError, TrustError, first_line

ROLE_OF = {"root": "root", "release": "targets", "fleet": "timestamp"}
DEFAULT_ROOT_LIFETIME_DAYS = 365
MAX_ROOT_LIFETIME_DAYS = 100 * 365  # far past any sensible rotation; keeps datetime arithmetic in range
MAX_ROOT_BYTES = 512 * 1024


def _tuf():
    # Imported lazily: `edgesdk inspect` and the packager never need python-tuf.
    from securesystemslib.signer import CryptoSigner, SSlibKey
    from tuf.api.metadata import Metadata, Role, Root

    return Metadata, Role, Root, SSlibKey, CryptoSigner


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _as_datetime(now: float | datetime | None) -> datetime:
    if now is None:
        return _now()
    if isinstance(now, datetime):
        return now
    return datetime.fromtimestamp(now, timezone.utc)


@dataclass(frozen=True)
class TrustRoot:
    """One verified root document (self-signed by its threshold)."""

    metadata: object  # tuf.api.metadata.Metadata[Root]
    raw: bytes

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "trust root") -> TrustRoot:
        """Parse and check the root's own threshold signature; TrustError on anything wrong."""
        Metadata, _, Root, _, _ = _tuf()
        if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_ROOT_BYTES:
            raise TrustError(f"{where}: not a root document (over {MAX_ROOT_BYTES} bytes or not bytes)")
        try:
            md = Metadata.from_bytes(bytes(raw))
        except RecursionError:
            raise TrustError(f"{where}: not a TUF root document (nested too deeply)") from None
        except Exception as exc:  # python-tuf raises DeserializationError, ValueError, KeyError, ...
            # DeserializationError says only "Failed to deserialize JSON"; its cause says why.
            why = first_line(exc, 200)
            if exc.__cause__ is not None:
                why += f": {first_line(exc.__cause__, 200)}"
            raise TrustError(f"{where}: not a TUF root document ({why})") from None
        if not isinstance(md.signed, Root):
            raise TrustError(f"{where}: a {md.signed.type} document, not a root")
        root = cls(md, bytes(raw))
        root._check_threshold(root, where)
        for role in ("release", "fleet"):
            keys = root.keys_for(role)  # an unusable key type fails here, at load
            if not keys:
                raise TrustError(f"{where}: names no {role} key")
            if root.threshold(role) != 1:
                # Packages and statements carry one signature: obeying a root that asks for more
                # would quietly weaken it to one, so such a root is refused instead.
                raise TrustError(f"{where}: {role} threshold {root.threshold(role)}; edgesdk checks one "
                                 f"signature per package and statement (threshold 1)")
        return root

    @property
    def version(self) -> int:
        return self.metadata.signed.version  # type: ignore[attr-defined]

    @property
    def expires(self) -> datetime:
        return self.metadata.signed.expires  # type: ignore[attr-defined]

    def is_expired(self, now: float | datetime | None = None) -> bool:
        return self.metadata.signed.is_expired(_as_datetime(now))  # type: ignore[attr-defined]

    def check_not_expired(self, now: float | datetime | None = None) -> None:
        if self.is_expired(now):
            raise TrustError(f"trust root version {self.version} expired at {self.expires:%Y-%m-%dT%H:%M:%SZ}")

    def keys_for(self, role: str) -> list[Ed25519PublicKey]:
        """The Ed25519 keys of ``role`` ('root', 'release' or 'fleet')."""
        signed = self.metadata.signed  # type: ignore[attr-defined]
        keys = []
        for keyid in signed.roles[ROLE_OF[role]].keyids:
            key = signed.keys.get(keyid)
            if key is None:
                continue
            if key.keytype != "ed25519":
                raise TrustError(f"trust root version {self.version}: {role} key {keyid[:12]} is "
                                 f"{key.keytype}, edgesdk verifies ed25519 only")
            try:
                keys.append(Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.keyval["public"])))
            except (KeyError, ValueError, TypeError):
                raise TrustError(f"trust root version {self.version}: {role} key {keyid[:12]} is malformed") from None
        return keys

    def threshold(self, role: str) -> int:
        return self.metadata.signed.roles[ROLE_OF[role]].threshold  # type: ignore[attr-defined]

    def _check_threshold(self, signer: TrustRoot, where: str) -> None:
        """``self`` is signed by the root-role threshold of ``signer`` (python-tuf's rule)."""
        try:
            signer.metadata.signed.verify_delegate(  # type: ignore[attr-defined]
                "root", self.metadata.signed_bytes, self.metadata.signatures)  # type: ignore[attr-defined]
        except Exception as exc:  # UnsignedMetadataError, or a signature that cannot be read
            raise TrustError(f"{where}: root version {self.version} is not signed by the threshold of root "
                             f"version {signer.version}'s keys ({first_line(exc, 200)})") from None

    def next(self, raw: bytes, where: str = "trust root update") -> TrustRoot:
        """The following root, accepted only by TUF's rules: version + 1, signed by our threshold
        and by its own. (An intermediate root may be expired; only the newest one must not be.)"""
        new = TrustRoot.from_bytes(raw, where)
        if new.version != self.version + 1:
            raise TrustError(f"{where}: expected root version {self.version + 1}, got {new.version}")
        new._check_threshold(self, where)
        return new

    def follow(self, chain: Iterable[bytes], now: float | datetime | None = None) -> TrustRoot:
        """Apply the roots of ``chain`` newer than this one, in version order; the result must not
        be expired. Versions at or below ours are skipped (already applied or a rollback attempt)."""
        parsed = sorted((TrustRoot.from_bytes(raw, "trust root update") for raw in chain), key=lambda r: r.version)
        current = self
        for candidate in parsed:
            if candidate.version <= current.version:
                continue
            current = current.next(candidate.raw)
        current.check_not_expired(now)
        return current


def create_root(root_keys: Sequence[Ed25519PrivateKey], release_keys: Sequence[Ed25519PublicKey],
                fleet_keys: Sequence[Ed25519PublicKey], *, threshold: int = 1, version: int = 1,
                expires_days: float = DEFAULT_ROOT_LIFETIME_DAYS, extra_signers: Sequence[Ed25519PrivateKey] = (),
                now: datetime | None = None) -> bytes:
    """A signed root document. ``extra_signers`` (the previous root's keys) sign it too: a rotated
    root must carry the previous threshold's signatures besides its own."""
    return _build_root([k.public_key() for k in root_keys], release_keys, fleet_keys,
                       list(root_keys) + list(extra_signers), threshold=threshold, version=version,
                       expires_days=expires_days, now=now)


def _build_root(root_publics: Sequence[Ed25519PublicKey], release_keys: Sequence[Ed25519PublicKey],
                fleet_keys: Sequence[Ed25519PublicKey], signers: Sequence[Ed25519PrivateKey], *, threshold: int,
                version: int, expires_days: float, now: datetime | None = None) -> bytes:
    Metadata, Role, Root, SSlibKey, CryptoSigner = _tuf()
    if not (isinstance(expires_days, (int, float)) and 0 < expires_days <= MAX_ROOT_LIFETIME_DAYS):
        # NaN, infinities and 1e9 days used to escape as ValueError/OverflowError from timedelta,
        # and a negative lifetime wrote a root every device would refuse as expired.
        raise ConfigError(f"root lifetime {expires_days!r} days: use more than 0 and at most "
                          f"{MAX_ROOT_LIFETIME_DAYS}")
    if not root_publics or not release_keys or not fleet_keys:
        raise ConfigError("a trust root needs at least one root key, one release key and one fleet key")
    if not 1 <= threshold <= len(root_publics):
        raise ConfigError(f"root threshold {threshold} must be within 1..{len(root_publics)} (the root keys given)")
    expires = (now or _now()).replace(microsecond=0) + timedelta(days=expires_days)
    root = Root(version=version, expires=expires, consistent_snapshot=False)
    for role, publics in (("root", root_publics), ("release", release_keys), ("fleet", fleet_keys)):
        for public in publics:
            root.add_key(SSlibKey.from_crypto(public), ROLE_OF[role])
            if role == "fleet":
                root.add_key(SSlibKey.from_crypto(public), "snapshot")
    root.roles["root"].threshold = threshold
    md = Metadata(root)
    for private in signers:  # signatures are keyed by key id: a key given twice signs once
        md.sign(CryptoSigner(private), append=True)
    return md.to_bytes()


def rotate_root(current: TrustRoot, signers: Sequence[Ed25519PrivateKey], *,
                root_keys: Sequence[Ed25519PrivateKey] | None = None,
                release_keys: Sequence[Ed25519PublicKey] | None = None,
                fleet_keys: Sequence[Ed25519PublicKey] | None = None, threshold: int | None = None,
                expires_days: float = DEFAULT_ROOT_LIFETIME_DAYS) -> bytes:
    """Root version + 1 with new keys; each omitted group keeps the current keys and threshold.
    ``signers`` are current root keys that authorise the change (the previous threshold); new
    ``root_keys`` are private because the new root must be signed by its own threshold too. It is
    checked here as a device will check it."""
    if root_keys is None:
        # Keep the root role as it is: rotating a fleet key with 2 of 3 root keys must not quietly
        # shrink the root role to the 2 keys that happened to sign.
        root_publics, own_signers = current.keys_for("root"), []
        new_threshold = threshold if threshold is not None else current.threshold("root")
    else:
        root_publics, own_signers = [k.public_key() for k in root_keys], list(root_keys)
        new_threshold = threshold if threshold is not None else min(current.threshold("root"), len(root_keys))
    raw = _build_root(root_publics, list(release_keys) if release_keys is not None else current.keys_for("release"),
                      list(fleet_keys) if fleet_keys is not None else current.keys_for("fleet"),
                      own_signers + list(signers), threshold=new_threshold, version=current.version + 1,
                      expires_days=expires_days)
    current.next(raw, "new root")  # refuse to write a root that devices would refuse
    return raw


def root_chain_message(roots: Iterable[bytes]) -> bytes:
    """The retained `trust/root` payload: every root after the first, oldest first."""
    import json

    return json.dumps({"roots": [raw.decode() for raw in roots]}, separators=(",", ":")).encode()


def parse_root_chain(payload: bytes, where: str = "trust/root") -> list[bytes]:
    from edgesdk.errors import ProtocolError
    from edgesdk.protocol import parse_json

    data = parse_json(payload, where, limit=8 * MAX_ROOT_BYTES)
    if not isinstance(data, dict) or not isinstance(data.get("roots"), list) or \
            not all(isinstance(r, str) for r in data["roots"]):
        raise ProtocolError(f"{where}: expected {{\"roots\": [root JSON text, ...]}}")
    return [r.encode("utf-8", errors="surrogatepass") for r in data["roots"]]


