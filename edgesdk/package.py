"""Write and open signed .edgepkg files (a plain tar; see docs/package-format.md).

Writing is atomic: the tar is built in a temp file beside the destination and renamed into place,
so a failed run leaves no package. Opening is safe against hostile archives: only regular files
with plain relative names are accepted, every member must be declared in the signed manifest with
its exact size and sha256, and nothing is ever written outside the destination folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgesdk.atomicfile import atomic_writer, fsync_dir
from edgesdk.errors import IntegrityError, PackageError, SignatureError
from edgesdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest
from edgesdk.signing import sign, verify_signature

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_MEMBERS = 10_000
CHUNK = 1024 * 1024


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_member_name(name: str) -> str:
    """A member name must be a plain relative POSIX path without `..`, `.` or empty parts."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise PackageError(f"hostile archive: member {name!r} has an absolute or invalid path")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise PackageError(f"hostile archive: member {name!r} escapes or is not normalised")
    return name


def write_package(out_path: str | Path, manifest: Manifest, files: Mapping[str, str | Path],
                  key: Ed25519PrivateKey) -> Path:
    """Hash ``files`` (arcname → path) into ``manifest.files``, sign it, and write the tar atomically."""
    out_path = Path(out_path)
    manifest.files = {}
    for arcname, path in sorted(files.items()):
        check_member_name(arcname)
        if arcname in (MANIFEST_NAME, SIGNATURE_NAME):
            raise PackageError(f"{arcname}: reserved name inside a package")
        manifest.files[arcname] = FileEntry(sha256_file(path), os.path.getsize(path))
    manifest_bytes = manifest.to_bytes()
    signature = sign(key, manifest_bytes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_path) as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # Manifest and signature first, so a reader can verify before touching anything else.
            for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature)):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
            for arcname, path in sorted(files.items()):
                info = tarfile.TarInfo(arcname)
                info.size, info.mode, info.mtime = os.path.getsize(path), 0o644, 0
                with open(path, "rb") as src:
                    tar.addfile(info, src)
    return out_path


@dataclass
class OpenedPackage:
    """A package whose manifest has been read (and, if keys were given, its signature checked)."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None
    signer: str | None  # key id of the trusted key that signed it, when verified


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except FileNotFoundError:
        raise PackageError(f"{path}: no such package file") from None
    except (tarfile.TarError, OSError) as exc:
        raise PackageError(f"{path}: not an .edgepkg (unreadable tar: {exc})") from None


def _members(tar: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    members = []
    seen = set()
    try:
        for info in tar:
            if len(members) >= MAX_MEMBERS:
                raise PackageError(f"{path}: hostile archive: more than {MAX_MEMBERS} members")
            check_member_name(info.name)
            if not info.isreg():
                raise PackageError(f"{path}: hostile archive: member {info.name!r} is not a regular file")
            if info.name in seen:
                raise PackageError(f"{path}: hostile archive: member {info.name!r} appears twice")
            seen.add(info.name)
            members.append(info)
    except tarfile.TarError as exc:
        raise PackageError(f"{path}: truncated or corrupt package ({exc})") from None
    return members


def open_package(path: str | Path, trusted_keys: Iterable[Ed25519PublicKey] | None = None,
                 require_signature: bool = True) -> OpenedPackage:
    """Read and validate the manifest; verify the signature against ``trusted_keys`` when given."""
    path = Path(path)
    with _open_tar(path) as tar:
        members = {m.name: m for m in _members(tar, path)}
        if MANIFEST_NAME not in members:
            raise PackageError(f"{path}: not an .edgepkg (no {MANIFEST_NAME})")
        if members[MANIFEST_NAME].size > MAX_MANIFEST_BYTES:
            raise PackageError(f"{path}: hostile archive: {MANIFEST_NAME} is oversized")
        manifest_bytes = _read_member(tar, members[MANIFEST_NAME], path)
        signature = _read_member(tar, members[SIGNATURE_NAME], path) if SIGNATURE_NAME in members else None
        try:
            manifest = Manifest.from_bytes(manifest_bytes)
        except PackageError as exc:
            raise PackageError(f"{path}: {exc}") from None
        declared = set(manifest.files) | {MANIFEST_NAME, SIGNATURE_NAME}
        for name, info in members.items():
            if name not in declared:
                raise PackageError(f"{path}: member {name!r} is not declared in the manifest")
            if name in manifest.files and info.size != manifest.files[name].size:
                raise IntegrityError(f"{path}: {name}: size {info.size} differs from the manifest's "
                                     f"{manifest.files[name].size}")
        for name in manifest.files:
            check_member_name(name)
            if name not in members:
                raise IntegrityError(f"{path}: {name}: listed in the manifest but missing (truncated?)")
    signer = None
    if trusted_keys is not None:
        if signature is None:
            if require_signature:
                raise SignatureError(f"{path}: package is unsigned (no {SIGNATURE_NAME})")
        else:
            try:
                signer = verify_signature(trusted_keys, manifest_bytes, signature)
            except SignatureError as exc:
                raise SignatureError(f"{path}: {exc}") from None
    return OpenedPackage(path, manifest, manifest_bytes, signature, signer)


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path) -> bytes:
    handle = tar.extractfile(info)
    if handle is None:
        raise PackageError(f"{path}: {info.name}: not a regular file")
    data = handle.read(info.size + 1)
    if len(data) != info.size:
        raise PackageError(f"{path}: {info.name}: truncated")
    return data


def verify_package(path: str | Path, trusted_keys: Iterable[Ed25519PublicKey]) -> OpenedPackage:
    """Signature and every file's size and sha256; raises on the first thing that does not hold."""
    opened = open_package(path, trusted_keys)
    with _open_tar(opened.path) as tar:
        for info in tar:
            if info.name in opened.manifest.files:
                _copy_verified(tar, info, opened.manifest.files[info.name], None, opened.path)
    return opened


def _copy_verified(tar: tarfile.TarFile, info: tarfile.TarInfo, entry: FileEntry,
                   dest: io.BufferedWriter | None, path: Path) -> None:
    handle = tar.extractfile(info)
    if handle is None:
        raise PackageError(f"{path}: {info.name}: not a regular file")
    digest, remaining = hashlib.sha256(), entry.size
    try:
        while remaining > 0:
            block = handle.read(min(CHUNK, remaining))
            if not block:
                raise IntegrityError(f"{path}: {info.name}: truncated")
            digest.update(block)
            if dest is not None:
                dest.write(block)
            remaining -= len(block)
    except (tarfile.TarError, OSError) as exc:
        raise IntegrityError(f"{path}: {info.name}: unreadable ({exc})") from None
    if digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{path}: {info.name}: sha256 mismatch (corrupt or tampered)")


def extract_package(path: str | Path, dest: str | Path,
                    trusted_keys: Iterable[Ed25519PublicKey]) -> OpenedPackage:
    """Verify and extract into ``dest`` (created; must not exist). On any failure ``dest`` is removed."""
    opened = open_package(path, trusted_keys)
    dest = Path(dest)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        root = staging.resolve()
        with _open_tar(opened.path) as tar:
            for info in tar:
                target = (staging / info.name).resolve()
                if root not in target.parents:
                    raise PackageError(f"{path}: hostile archive: {info.name!r} points outside")
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "xb") as out:
                    if info.name in opened.manifest.files:
                        _copy_verified(tar, info, opened.manifest.files[info.name], out, opened.path)
                    else:  # manifest.json / manifest.sig, already checked
                        out.write(_read_member(tar, info, opened.path))
                    out.flush()
                    os.fsync(out.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    opened.path = Path(path)
    return opened


def package_filename(name: str, version: str, target: str) -> str:
    safe = [posixpath.basename(x).replace("/", "_") for x in (name, version, target)]
    return "{}-{}-{}.edgepkg".format(*safe)
