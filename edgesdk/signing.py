"""Ed25519 signing keys: generate, load, sign and verify manifests (via `cryptography`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgesdk.atomicfile import write_bytes_atomic
from edgesdk.errors import KeyFileError, SignatureError, map_os_errors

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
SIGNATURE_SIZE = 64

# One key pair per role (DESIGN §7), each in its own files so a folder can hold all three:
# release signs packages (manifest.sig), fleet signs deployment statements, root signs trust roots.
KEY_FILE_NAMES: dict[str, tuple[str, str]] = {
    "release": (PRIVATE_NAME, PUBLIC_NAME),
    "fleet": ("fleet.key", "fleet.pub"),
    "root": ("root.key", "root.pub"),
}
KEY_ROLES = tuple(KEY_FILE_NAMES)


def key_file_names(role: str) -> tuple[str, str]:
    """(private, public) file names of ``role``; KeyFileError names the roles for an unknown one."""
    try:
        return KEY_FILE_NAMES[role]
    except KeyError:
        raise KeyFileError(f"unknown key role {role!r}: use one of {', '.join(KEY_ROLES)}") from None


def default_key_dir() -> Path:
    """Where `edgesdk package` keeps its key when --key is not given ($EDGESDK_HOME overrides)."""
    home = os.environ.get("EDGESDK_HOME")
    return Path(home) / "keys" if home else Path.home() / ".config" / "edgesdk" / "keys"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable fingerprint of a public key: first 16 hex of sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keys(out_dir: str | Path, overwrite: bool = False, role: str = "release") -> KeyPair:
    """Write ``role``'s private key (PKCS#8 PEM, mode 0600) and public key (PEM) into ``out_dir``:
    signing.key/.pub (release), fleet.key/.pub or root.key/.pub. OSError becomes StorageError."""
    private_name, public_name = key_file_names(role)
    out = Path(out_dir)
    private_path, public_path = out / private_name, out / public_name
    with map_os_errors(f"write keys into {out}"):
        out.mkdir(parents=True, exist_ok=True)
        if not overwrite and private_path.exists():
            raise KeyFileError(f"{private_path}: a {role} key already exists (refusing to overwrite it)")
        key = Ed25519PrivateKey.generate()
        write_bytes_atomic(private_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
        public = key.public_key()
        write_bytes_atomic(public_path, public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(private_path, public_path, key_id(public))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read {what}: {exc.strerror}") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, Exception) as exc:  # cryptography raises several kinds here
        raise KeyFileError(f"{path}: not a PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, Exception) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def public_key_of(private: Ed25519PrivateKey) -> Ed25519PublicKey:
    return private.public_key()


def sign(private: Ed25519PrivateKey, data: bytes) -> bytes:
    return private.sign(data)


def verify_signature(trusted: Iterable[Ed25519PublicKey], data: bytes, signature: bytes) -> str:
    """Return the id of the trusted key that made ``signature`` over ``data``; raise otherwise."""
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"malformed signature: {len(signature)} bytes, expected {SIGNATURE_SIZE}")
    keys = list(trusted)
    if not keys:
        raise SignatureError("no trusted public key to verify the signature with")
    for key in keys:
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return key_id(key)
    raise SignatureError("signature does not match any trusted key (unknown signer or tampered manifest)")
