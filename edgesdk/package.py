"""Write and open signed .edgepkg files (a plain tar; see docs/package-format.md).

Writing is atomic: the tar is built in a temp file beside the destination and renamed into place,
so a failed run leaves no package. Opening is safe against hostile archives: only regular files
with plain relative names are accepted, every member must be declared in the signed manifest with
its exact size and sha256, and nothing is ever written outside the destination folder.

Errors: anything wrong with the bytes of a package (not a tar, corrupt, hostile, tampered) is a
`PackageError` (`IntegrityError` when a file's size or sha256 differs); a failure of the disk
(full, read-only, I/O error) while reading or writing is a `StorageError` from `map_os_errors`,
so a full disk during extraction is never reported as tampering.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgesdk.atomicfile import atomic_writer, fsync_dir
from edgesdk.errors import (IntegrityError, PackageError, PackagingError, SignatureError, StorageError,
                            map_os_errors)
from edgesdk.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME, FileEntry, Manifest
from edgesdk.signing import SIGNATURE_SIZE, sign, verify_signature

__all__ = ["MAX_MANIFEST_BYTES", "OpenedPackage", "check_files", "check_member_name", "extract_package",
           "open_package", "package_filename", "sha256_file", "verify_package", "write_package"]

MAX_MEMBERS = 10_000
CHUNK = 1024 * 1024
# What tarfile raises on malformed headers besides TarError (3.11: a bad pax "size" is a
# ValueError, an over-long number an OverflowError, odd encodings UnicodeError).
_TAR_PARSE_ERRORS = (tarfile.TarError, ValueError, UnicodeError, OverflowError, EOFError)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with map_os_errors(f"read {path}"), open(path, "rb") as handle:
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
        try:
            manifest.files[arcname] = FileEntry(sha256_file(path), os.path.getsize(path))
        except (OSError, StorageError) as exc:  # the caller named a file it cannot read: its mistake
            reason = exc.strerror if isinstance(exc, OSError) else str(exc).rsplit(": ", 1)[-1]
            raise PackagingError(f"{path}: cannot read file for package member {arcname}: {reason}") from None
    manifest_bytes = manifest.to_bytes()
    signature = sign(key, manifest_bytes)
    with map_os_errors(f"write {out_path}"):
        _write_tar(out_path, manifest_bytes, signature, files)
    return out_path


def _write_tar(out_path: Path, manifest_bytes: bytes, signature: bytes, files: Mapping[str, str | Path]) -> None:
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


@dataclass
class OpenedPackage:
    """A package whose manifest has been read (and, if keys were given, its signature checked)."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None
    signer: str | None  # key id of the trusted key that signed it, when verified
    handle: BinaryIO | None = None  # the open package file every later pass reads

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def __enter__(self) -> OpenedPackage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_file(path: Path) -> BinaryIO:
    # A missing file or a folder is the caller naming the wrong thing, not a disk failure.
    if not path.exists():
        raise PackageError(f"{path}: no such package file")
    if path.is_dir():
        raise PackageError(f"{path}: is a folder, not a package file")
    with map_os_errors(f"read {path}"):
        return open(path, "rb")


def _open_tar(handle: BinaryIO, path: Path) -> tarfile.TarFile:
    """A tar reader over ``handle`` from its start: every pass reads the same open file, so a
    package swapped on disk after it was checked is never the one extracted."""
    try:
        with map_os_errors(f"read {path}"):
            handle.seek(0)
            return tarfile.open(fileobj=handle, mode="r:")
    except _TAR_PARSE_ERRORS as exc:
        raise PackageError(f"{path}: not an .edgepkg (unreadable tar: {_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _members(tar: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    members = []
    seen = set()
    try:
        with map_os_errors(f"read {path}"):
            _collect(tar, path, members, seen)
    except _TAR_PARSE_ERRORS as exc:
        raise PackageError(f"{path}: truncated or corrupt package ({_one_line(exc)})") from None
    return members


def _collect(tar: tarfile.TarFile, path: Path, members: list[tarfile.TarInfo], seen: set[str]) -> None:
    for info in tar:
        if len(members) >= MAX_MEMBERS:
            raise PackageError(f"{path}: hostile archive: more than {MAX_MEMBERS} members")
        try:
            check_member_name(info.name)
        except PackageError as exc:
            raise PackageError(f"{path}: {exc}") from None
        if not info.isreg() or info.issparse():
            raise PackageError(f"{path}: hostile archive: member {info.name!r} is not a regular file")
        if info.name in seen:
            raise PackageError(f"{path}: hostile archive: member {info.name!r} appears twice")
        seen.add(info.name)
        members.append(info)


def open_package(path: str | Path, trusted_keys: Iterable[Ed25519PublicKey] | None = None,
                 require_signature: bool = True) -> OpenedPackage:
    """Read and validate the manifest; verify the signature against ``trusted_keys`` when given.

    The returned package keeps its file open (``close()`` or use it as a context manager); the
    later passes (`check_files`, `extract_package`) read that same open file.
    """
    path = Path(path)
    handle = _open_file(path)
    try:
        return _open_handle(handle, path, trusted_keys, require_signature)
    except BaseException:
        handle.close()
        raise


def _open_handle(handle: BinaryIO, path: Path, trusted_keys: Iterable[Ed25519PublicKey] | None,
                 require_signature: bool) -> OpenedPackage:
    with _open_tar(handle, path) as tar:
        members = {m.name: m for m in _members(tar, path)}
        if MANIFEST_NAME not in members:
            raise PackageError(f"{path}: not an .edgepkg (no {MANIFEST_NAME})")
        if members[MANIFEST_NAME].size > MAX_MANIFEST_BYTES:
            raise PackageError(f"{path}: hostile archive: {MANIFEST_NAME} is oversized")
        if SIGNATURE_NAME in members and members[SIGNATURE_NAME].size != SIGNATURE_SIZE:
            raise SignatureError(f"{path}: {SIGNATURE_NAME} is {members[SIGNATURE_NAME].size} bytes, "
                                 f"expected {SIGNATURE_SIZE}")
        try:
            with map_os_errors(f"read {path}"):
                manifest_bytes = _read_member(tar, members[MANIFEST_NAME], path)
                signature = _read_member(tar, members[SIGNATURE_NAME], path) if SIGNATURE_NAME in members else None
        except _TAR_PARSE_ERRORS as exc:
            raise PackageError(f"{path}: truncated or corrupt package ({_one_line(exc)})") from None
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
            try:
                check_member_name(name)
            except PackageError as exc:
                raise PackageError(f"{path}: manifest: {exc}") from None
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
    return OpenedPackage(path, manifest, manifest_bytes, signature, signer, handle)


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
    with open_package(path, trusted_keys) as opened:
        check_files(opened)
    return opened


def _handle_of(opened: OpenedPackage) -> BinaryIO:
    if opened.handle is None:
        raise PackageError(f"{opened.path}: package was closed")
    return opened.handle


def check_files(opened: OpenedPackage) -> None:
    """Check every declared file's size and sha256 (does not check the signature)."""
    with _open_tar(_handle_of(opened), opened.path) as tar:
        for info in _iter_members(tar, opened.path):
            if info.name in opened.manifest.files:
                _copy_verified(tar, info, opened.manifest.files[info.name], None, opened.path)


def _iter_members(tar: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """The members of a package opened before, mapping read failures (it may have changed on disk)."""
    iterator = iter(tar)
    while True:
        try:
            with map_os_errors(f"read {path}"):
                info = next(iterator, None)
        except _TAR_PARSE_ERRORS as exc:
            raise PackageError(f"{path}: truncated or corrupt package ({_one_line(exc)})") from None
        if info is None:
            return
        yield info


def _copy_verified(tar: tarfile.TarFile, info: tarfile.TarInfo, entry: FileEntry,
                   dest: io.BufferedWriter | None, path: Path) -> None:
    digest, remaining = hashlib.sha256(), entry.size
    # Reading and writing are mapped apart: a corrupt tar is the package's fault (IntegrityError),
    # an OSError reading it or writing the copy is the disk's (StorageError, "disk full").
    try:
        with map_os_errors(f"read {path}"):
            handle = tar.extractfile(info)
        if handle is None:
            raise PackageError(f"{path}: {info.name}: not a regular file")
        while remaining > 0:
            with map_os_errors(f"read {path}"):
                block = handle.read(min(CHUNK, remaining))
            if not block:
                raise IntegrityError(f"{path}: {info.name}: truncated")
            digest.update(block)
            if dest is not None:
                with map_os_errors(f"write {getattr(dest, 'name', 'extracted file')}"):
                    dest.write(block)
            remaining -= len(block)
    except _TAR_PARSE_ERRORS as exc:
        raise IntegrityError(f"{path}: {info.name}: unreadable ({_one_line(exc)})") from None
    if digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{path}: {info.name}: sha256 mismatch (corrupt or tampered)")


def extract_package(path: str | Path, dest: str | Path,
                    trusted_keys: Iterable[Ed25519PublicKey]) -> OpenedPackage:
    """Verify and extract into ``dest``, replacing it. On any failure ``dest`` is left as it was.

    Only the signed manifest bytes, the signature and declared files whose size and sha256
    match are written; every byte comes from the one open file that was verified.
    """
    dest = Path(dest)
    with open_package(path, trusted_keys) as opened:
        staging = dest.with_name(dest.name + ".partial")
        with map_os_errors(f"extract {path} into {dest}"):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                _extract_into(opened, staging)
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(staging, dest)
                fsync_dir(dest.parent)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return opened


def _extract_into(opened: OpenedPackage, staging: Path) -> None:
    root = staging.resolve()
    fixed = {MANIFEST_NAME: opened.manifest_bytes, SIGNATURE_NAME: opened.signature}
    for name, data in fixed.items():
        if data is not None:
            _write_new(staging / name, data)
    with _open_tar(_handle_of(opened), opened.path) as tar:
        for info in _iter_members(tar, opened.path):
            if info.name in fixed:
                continue
            if info.name not in opened.manifest.files:
                raise PackageError(f"{opened.path}: member {info.name!r} is not declared in the manifest")
            target = (staging / info.name).resolve()
            if root not in target.parents:
                raise PackageError(f"{opened.path}: hostile archive: {info.name!r} points outside")
            with map_os_errors(f"write {target}"):
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "xb") as out:
                    _copy_verified(tar, info, opened.manifest.files[info.name], out, opened.path)
                    out.flush()
                    os.fsync(out.fileno())
    missing = [n for n in opened.manifest.files if not (staging / n).is_file()]
    if missing:
        raise IntegrityError(f"{opened.path}: {missing[0]}: listed in the manifest but missing")


def _write_new(path: Path, data: bytes) -> None:
    with map_os_errors(f"write {path}"), open(path, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def package_filename(name: str, version: str, target: str) -> str:
    safe = [posixpath.basename(x).replace("/", "_") for x in (name, version, target)]
    return "{}-{}-{}.edgepkg".format(*safe)
