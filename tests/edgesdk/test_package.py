"""The .edgepkg file: written atomically, read safely. Hostile archives are built by hand with tarfile."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import edgesdk.package as package_module
from edgesdk.errors import IntegrityError, PackageError, PackagingError, SignatureError, StorageError
from edgesdk.manifest import FileEntry, Manifest, TensorSpec, Variant
from edgesdk.package import (
    MAX_MANIFEST_BYTES,
    extract_package,
    open_package,
    verify_package,
    write_package,
)
from edgesdk.signing import generate_keys, key_id, load_private_key, load_public_key, sign

MODEL = "variants/onnx-fp32/model.onnx"
GOOD = b"a perfectly fine model"
EVIL = b"#!/bin/sh\nrm -rf ~\n"


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    pair = generate_keys(tmp_path / "keys")
    return load_private_key(pair.private_path), load_public_key(pair.public_path)


def tiny_manifest(version: str = "1.0.0") -> Manifest:
    return Manifest(
        name="tiny", version=version, target="x86-64-cpu",
        source={"filename": "tiny.onnx", "sha256": "0" * 64, "size": 10, "format": "onnx"},
        inputs=[TensorSpec("x", "float32", ("batch", 4))],
        outputs=[TensorSpec("y", "float32", ("batch", 2))],
        variants=[Variant(id="onnx-fp32", kind="onnx-fp32", format="onnx", precision="fp32",
                          runtime="onnxruntime", file=MODEL, files=[MODEL],
                          providers=["CPUExecutionProvider"], size=4000)],
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


def signed_head(key: Ed25519PrivateKey, declared: dict[str, bytes], pad_to: int = 0,
                manifest: Manifest | None = None) -> list[tuple[tarfile.TarInfo, bytes]]:
    """manifest.json declaring ``declared`` (name → content), padded with JSON whitespace, and its signature."""
    manifest = manifest or tiny_manifest()
    manifest.files = {name: FileEntry(sha256(data), len(data)) for name, data in declared.items()}
    raw = manifest.to_bytes()
    if pad_to > len(raw):
        raw = raw[:-1] + b" " * (pad_to - len(raw)) + b"\n"
    return [regular("manifest.json", raw), regular("manifest.sig", sign(key, raw))]


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` with what it is (content for files, target for links)."""
    state: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            state[rel] = ("link", os.readlink(p))
        elif p.is_file():
            state[rel] = ("file", p.read_bytes())
        else:
            state[rel] = ("dir",)
    return state


@pytest.fixture
def good_package(tmp_path: Path, keys):
    """A package written by write_package: one variant and reference data, random bytes each."""
    private, _ = keys
    contents = {MODEL: os.urandom(4000), "reference/inputs.npz": os.urandom(300),
                "reference/outputs.npz": os.urandom(200)}
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for i, (arcname, data) in enumerate(contents.items()):
        (src / f"f{i}.bin").write_bytes(data)
        files[arcname] = src / f"f{i}.bin"
    manifest = tiny_manifest()
    pkg = write_package(tmp_path / "out" / "tiny-1.0.0-x86-64-cpu.edgepkg", manifest, files, private)
    return pkg, contents, manifest


def member_offsets(pkg: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(pkg) as tar:
        return {m.name: m for m in tar.getmembers()}


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------
# Round trip


def test_written_package_opens_with_the_same_manifest_and_signer(good_package, keys):
    pkg, contents, manifest = good_package
    _, public = keys

    opened = open_package(pkg, [public])

    assert opened.manifest_bytes == manifest.to_bytes()
    assert opened.signer == key_id(public)
    assert opened.manifest.files == {n: FileEntry(sha256(d), len(d)) for n, d in contents.items()}
    assert opened.manifest.variants[0].file == MODEL
    assert opened.manifest.inputs == [TensorSpec("x", "float32", ("batch", 4))]


def test_written_package_verifies(good_package, keys):
    pkg, _, _ = good_package
    _, public = keys

    assert verify_package(pkg, [public]).signer == key_id(public)


def test_extraction_reproduces_every_file_and_the_signed_manifest(good_package, keys, tmp_path: Path):
    pkg, contents, manifest = good_package
    _, public = keys
    dest = tmp_path / "versions" / "tiny"

    extract_package(pkg, dest, [public])

    assert {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()} == \
        set(contents) | {"manifest.json", "manifest.sig"}
    for arcname, data in contents.items():
        assert (dest / arcname).read_bytes() == data
    assert (dest / "manifest.json").read_bytes() == manifest.to_bytes()
    assert not (tmp_path / "versions" / "tiny.partial").exists()


def test_manifest_and_signature_are_the_first_members(good_package):
    # A reader can check the signature before it reads any model bytes.
    pkg, _, _ = good_package

    assert list(member_offsets(pkg))[:2] == ["manifest.json", "manifest.sig"]


def test_open_without_keys_reads_the_manifest_but_vouches_for_no_signer(good_package):
    pkg, _, _ = good_package

    opened = open_package(pkg)

    assert opened.signer is None
    assert opened.signature is not None and len(opened.signature) == 64


def test_accepts_package_signed_by_one_of_several_trusted_keys(good_package, keys):
    pkg, _, _ = good_package
    _, public = keys
    other = Ed25519PrivateKey.generate().public_key()

    assert open_package(pkg, [other, public]).signer == key_id(public)


# ---------------------------------------------------------------------------------------------
# Atomic writing


@pytest.mark.parametrize("arcname", ["../outside.bin", "/etc/cron.d/evil", "a/./b.bin", "a//b.bin",
                                     "manifest.json", "manifest.sig"])
def test_write_refuses_hostile_or_reserved_member_name(tmp_path: Path, keys, arcname: str):
    private, _ = keys
    (tmp_path / "f.bin").write_bytes(GOOD)
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(PackageError):
        write_package(out / "p.edgepkg", tiny_manifest(), {arcname: tmp_path / "f.bin"}, private)

    assert list(out.iterdir()) == []


def test_failed_write_leaves_no_package_and_no_temp_file(tmp_path: Path, keys):
    private, _ = keys
    (tmp_path / "model.onnx").write_bytes(GOOD)
    out = tmp_path / "out"
    out.mkdir()
    files = {MODEL: tmp_path / "model.onnx", "reference/inputs.npz": tmp_path / "gone.npz"}

    with pytest.raises((OSError, PackagingError)):
        write_package(out / "p.edgepkg", tiny_manifest(), files, private)

    assert list(out.iterdir()) == []


def test_disk_full_mid_write_keeps_the_old_package_and_leaves_no_temp_file(tmp_path: Path, keys, monkeypatch):
    private, public = keys
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.bin").write_bytes(os.urandom(2000))
    files = {f"variants/onnx-fp32/{n}.bin": tmp_path / f"{n}.bin" for n in ("a", "b", "c")}
    out = tmp_path / "out"
    old = write_package(out / "p.edgepkg", tiny_manifest("1.0.0"), files, private)
    old_bytes = old.read_bytes()

    # The disk fills up after the manifest, the signature and one file are in the tar.
    real_addfile = tarfile.TarFile.addfile
    calls = []

    def addfile_until_disk_full(self, tarinfo, fileobj=None):
        calls.append(tarinfo.name)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile_until_disk_full)
    with pytest.raises(StorageError, match="disk full") as err:
        write_package(out / "p.edgepkg", tiny_manifest("2.0.0"), files, private)
    monkeypatch.undo()

    assert err.value.disk_full

    assert len(calls) == 4, "the fault was not injected mid-write"
    assert sorted(out.iterdir()) == [old]
    assert old.read_bytes() == old_bytes
    assert open_package(old, [public]).manifest.version == "1.0.0"


# ---------------------------------------------------------------------------------------------
# Hostile archives (each validly signed, so only the archive's shape can be the reason to refuse)


Entries = list[tuple[tarfile.TarInfo, bytes | None]]


def _absolute(area: Path, key) -> Entries:
    name = str(area / "absolute-evil.sh")
    return signed_head(key, {name: EVIL}) + [regular(name, EVIL)]


def _dotdot(area: Path, key) -> Entries:
    return signed_head(key, {"../evil.sh": EVIL}) + [regular("../evil.sh", EVIL)]


def _deep_dotdot(area: Path, key) -> Entries:
    name = "variants/../../../evil.sh"
    return signed_head(key, {name: EVIL}) + [regular(name, EVIL)]


def _backslash_dotdot(area: Path, key) -> Entries:
    name = "..\\..\\evil.sh"
    return signed_head(key, {name: EVIL}) + [regular(name, EVIL)]


def _not_normalised(area: Path, key) -> Entries:
    return signed_head(key, {"./model.onnx": GOOD}) + [regular("./model.onnx", GOOD)]


def _symlink_out(area: Path, key) -> Entries:
    return signed_head(key, {"link": b""}) + [special("link", tarfile.SYMTYPE, str(area / "keep.txt"))]


def _file_through_symlink(area: Path, key) -> Entries:
    # The classic: a link to a folder outside, then a file "inside" the link.
    return signed_head(key, {"link": b"", "link/evil.sh": EVIL}) + [
        special("link", tarfile.SYMTYPE, str(area)), regular("link/evil.sh", EVIL)]


def _hardlink(area: Path, key) -> Entries:
    return signed_head(key, {"hl": b""}) + [special("hl", tarfile.LNKTYPE, str(area / "keep.txt"))]


def _hardlink_to_member(area: Path, key) -> Entries:
    return signed_head(key, {"model.onnx": GOOD, "hl": b""}) + [
        regular("model.onnx", GOOD), special("hl", tarfile.LNKTYPE, "model.onnx")]


def _char_device(area: Path, key) -> Entries:
    return signed_head(key, {"dev": b""}) + [special("dev", tarfile.CHRTYPE)]


def _fifo(area: Path, key) -> Entries:
    return signed_head(key, {"fifo": b""}) + [special("fifo", tarfile.FIFOTYPE)]


def _directory(area: Path, key) -> Entries:
    return signed_head(key, {"variants": b""}) + [special("variants", tarfile.DIRTYPE)]


def _duplicate(area: Path, key) -> Entries:
    # The second copy would overwrite the checked one on a naive extract.
    return signed_head(key, {"model.onnx": GOOD}) + [regular("model.onnx", GOOD), regular("model.onnx", EVIL)]


def _undeclared(area: Path, key) -> Entries:
    return signed_head(key, {"model.onnx": GOOD}) + [regular("model.onnx", GOOD), regular("payload.sh", EVIL)]


def _oversized_member(area: Path, key) -> Entries:
    return signed_head(key, {"model.onnx": GOOD}) + [regular("model.onnx", GOOD + b"\0" * 100_000)]


def _declared_but_missing(area: Path, key) -> Entries:
    return signed_head(key, {"model.onnx": GOOD, "weights.bin": GOOD}) + [regular("model.onnx", GOOD)]


def _oversized_manifest(area: Path, key) -> Entries:
    return signed_head(key, {"model.onnx": GOOD}, pad_to=MAX_MANIFEST_BYTES + 1) + [regular("model.onnx", GOOD)]


def _no_manifest(area: Path, key) -> Entries:
    return [regular("model.onnx", GOOD)]


HOSTILE: dict[str, Callable[[Path, Ed25519PrivateKey], Entries]] = {
    "absolute-path": _absolute,
    "dotdot-path": _dotdot,
    "dotdot-inside-path": _deep_dotdot,
    "backslash-dotdot-path": _backslash_dotdot,
    "dot-path": _not_normalised,
    "symlink": _symlink_out,
    "file-through-symlinked-dir": _file_through_symlink,
    "hardlink-outside": _hardlink,
    "hardlink-to-member": _hardlink_to_member,
    "char-device": _char_device,
    "fifo": _fifo,
    "directory-member": _directory,
    "duplicate-member": _duplicate,
    "undeclared-member": _undeclared,
    "member-larger-than-declared": _oversized_member,
    "declared-member-missing": _declared_but_missing,
    "oversized-manifest": _oversized_manifest,
    "no-manifest": _no_manifest,
}


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """A folder with the extraction target inside it; anything a hostile package writes shows up here."""
    root = tmp_path / "area"
    (root / "sub").mkdir(parents=True)
    (root / "keep.txt").write_text("precious\n")
    return root


@pytest.mark.parametrize("case", HOSTILE)
def test_open_refuses_hostile_archive(tmp_path: Path, keys, area: Path, case: str):
    private, _ = keys
    pkg = write_tar(tmp_path / "hostile.edgepkg", HOSTILE[case](area, private))

    with pytest.raises(PackageError):
        open_package(pkg)


@pytest.mark.parametrize("case", HOSTILE)
def test_extraction_of_hostile_archive_writes_nothing(tmp_path: Path, keys, area: Path, case: str):
    private, public = keys
    pkg = write_tar(tmp_path / "hostile.edgepkg", HOSTILE[case](area, private))
    dest = area / "sub" / "dest"
    before = snapshot(area)

    with pytest.raises(PackageError):
        extract_package(pkg, dest, [public])

    assert snapshot(area) == before
    assert not dest.exists() and not dest.with_name("dest.partial").exists()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_error_names_the_package_file(tmp_path: Path, keys, area: Path, case: str):
    private, _ = keys
    pkg = write_tar(tmp_path / "hostile.edgepkg", HOSTILE[case](area, private))

    with pytest.raises(PackageError) as err:
        open_package(pkg)

    assert str(err.value).startswith(f"{pkg}: ")
    assert "\n" not in str(err.value)


def test_refuses_oversized_signature_before_reading_it(tmp_path: Path, keys):
    private, _ = keys
    entries = signed_head(private, {"model.onnx": GOOD})
    entries[1] = regular("manifest.sig", b"\0" * (MAX_MANIFEST_BYTES + 1))
    pkg = write_tar(tmp_path / "bigsig.edgepkg", entries + [regular("model.onnx", GOOD)])

    with pytest.raises(PackageError):
        open_package(pkg)


def test_extraction_writes_only_verified_bytes_when_package_is_swapped_after_verification(
        tmp_path: Path, keys, area: Path, monkeypatch):
    private, public = keys
    pkg = write_tar(tmp_path / "p.edgepkg", signed_head(private, {"model.onnx": GOOD}) + [regular("model.onnx", GOOD)])
    swap = write_tar(tmp_path / "swap.edgepkg",
                     signed_head(private, {"model.onnx": GOOD}) + [regular("model.onnx", GOOD),
                                                                   regular("payload.sh", EVIL)])
    real_open = package_module.open_package

    # The race, made deterministic: someone replaces the file right after its checks passed.
    def open_then_swap(path, *args, **kwargs):
        opened = real_open(path, *args, **kwargs)
        os.replace(swap, path)
        return opened

    monkeypatch.setattr(package_module, "open_package", open_then_swap)
    dest = area / "sub" / "dest"
    try:
        extract_package(pkg, dest, [public])
    except PackageError:
        pass

    assert not (dest / "payload.sh").exists()


# ---------------------------------------------------------------------------------------------
# Tampering, signatures, broken files


def test_rejects_package_with_tampered_file_content(good_package, keys, tmp_path: Path):
    pkg, _, _ = good_package
    _, public = keys
    flip_byte(pkg, member_offsets(pkg)[MODEL].offset_data + 10)
    dest = tmp_path / "dest"

    with pytest.raises(IntegrityError):
        verify_package(pkg, [public])
    with pytest.raises(IntegrityError):
        extract_package(pkg, dest, [public])
    assert not dest.exists() and not (tmp_path / "dest.partial").exists()


def test_rejects_package_with_tampered_manifest(good_package, keys, tmp_path: Path):
    pkg, _, _ = good_package
    _, public = keys
    raw = pkg.read_bytes()
    assert raw.count(b'"version": "1.0.0"') == 1
    pkg.write_bytes(raw.replace(b'"version": "1.0.0"', b'"version": "6.6.6"'))  # same length, sig kept
    dest = tmp_path / "dest"

    with pytest.raises(SignatureError):
        open_package(pkg, [public])
    with pytest.raises(SignatureError):
        extract_package(pkg, dest, [public])
    assert not dest.exists()


def test_rejects_package_with_flipped_signature_byte(good_package, keys):
    pkg, _, _ = good_package
    _, public = keys
    flip_byte(pkg, member_offsets(pkg)["manifest.sig"].offset_data)

    with pytest.raises(SignatureError):
        verify_package(pkg, [public])


def test_rejects_package_signed_by_unknown_key(good_package):
    pkg, _, _ = good_package
    stranger = Ed25519PrivateKey.generate().public_key()

    with pytest.raises(SignatureError):
        verify_package(pkg, [stranger])


def test_rejects_unsigned_package_when_keys_are_given(tmp_path: Path, keys):
    private, public = keys
    head = signed_head(private, {"model.onnx": GOOD})
    pkg = write_tar(tmp_path / "unsigned.edgepkg", [head[0], regular("model.onnx", GOOD)])
    dest = tmp_path / "dest"

    with pytest.raises(SignatureError):
        open_package(pkg, [public])
    with pytest.raises(SignatureError):
        extract_package(pkg, dest, [public])
    assert not dest.exists()
    assert open_package(pkg).signature is None  # without keys: readable, and says it is unsigned


TRUNCATIONS: dict[str, Callable[[dict[str, tarfile.TarInfo], int], int]] = {
    "empty": lambda m, n: 0,
    "inside-first-header": lambda m, n: 100,
    "inside-manifest": lambda m, n: m["manifest.json"].offset_data + m["manifest.json"].size // 2,
    "inside-signature": lambda m, n: m["manifest.sig"].offset_data + 32,
    "inside-variant-file": lambda m, n: m[MODEL].offset_data + m[MODEL].size // 2,
    # Half of the content (the tar's zero padding after the last member carries nothing to lose).
    "half": lambda m, n: max(i.offset_data + i.size for i in m.values()) // 2,
}


@pytest.mark.parametrize("cut", TRUNCATIONS)
def test_rejects_truncated_package(good_package, keys, tmp_path: Path, cut: str):
    pkg, _, _ = good_package
    _, public = keys
    raw = pkg.read_bytes()
    pkg.write_bytes(raw[:TRUNCATIONS[cut](member_offsets(pkg), len(raw))])
    dest = tmp_path / "dest"

    with pytest.raises(PackageError):
        verify_package(pkg, [public])
    with pytest.raises(PackageError):
        extract_package(pkg, dest, [public])
    assert not dest.exists() and not (tmp_path / "dest.partial").exists()


def _gzipped_package(path: Path, good: Path) -> None:
    path.write_bytes(gzip.compress(good.read_bytes()))


NOT_PACKAGES: dict[str, Callable[[Path, Path], None]] = {
    "random-bytes": lambda p, good: p.write_bytes(random.Random(7).randbytes(3000)),
    "text": lambda p, good: p.write_text("name: not a package\n" * 40),
    "gzipped-tar": _gzipped_package,
    "empty-tar": lambda p, good: p.write_bytes(b"\0" * 10240),
    "directory": lambda p, good: p.mkdir(),
}


@pytest.mark.parametrize("make", NOT_PACKAGES)
def test_rejects_file_that_is_not_a_package(good_package, tmp_path: Path, make: str):
    pkg, _, _ = good_package
    path = tmp_path / "not-a.edgepkg"
    NOT_PACKAGES[make](path, pkg)

    with pytest.raises(PackageError) as err:
        open_package(path)

    assert "\n" not in str(err.value)


def test_missing_package_file_is_a_package_error_naming_it(tmp_path: Path):
    path = tmp_path / "nope.edgepkg"

    with pytest.raises(PackageError) as err:
        open_package(path)

    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Manifest schema


def _manifest_dict() -> dict:
    manifest = tiny_manifest()
    manifest.files = {MODEL: FileEntry(sha256(GOOD), len(GOOD))}
    return manifest.to_dict()


def _drop(*path):
    def change(data):
        node = data
        for step in path[:-1]:
            node = node[step]
        del node[path[-1]]
    return change


def _set(*path, value):
    def change(data):
        node = data
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
    return change


BAD_MANIFESTS = [
    # (case id, change, field the message must name)
    *[(f"missing-{f}", _drop(f), f) for f in
      ("name", "version", "target", "source", "inputs", "outputs", "variants", "files", "schema_version")],
    ("missing-variant-file", _drop("variants", 0, "file"), "variants[0].file"),
    ("missing-variant-runtime", _drop("variants", 0, "runtime"), "variants[0].runtime"),
    ("missing-file-sha256", _drop("files", MODEL, "sha256"), "sha256"),
    ("missing-input-dtype", _drop("inputs", 0, "dtype"), "inputs[0].dtype"),
    ("version-not-a-string", _set("version", value=1), "version"),
    ("variants-not-a-list", _set("variants", value="onnx-fp32"), "variants"),
    ("file-size-not-an-int", _set("files", MODEL, "size", value="22"), "size"),
    ("file-size-is-a-bool", _set("files", MODEL, "size", value=True), "size"),
    ("schema-version-2", _set("schema_version", value=2), "schema_version"),
    ("schema-version-string", _set("schema_version", value="1"), "schema_version"),
]


@pytest.mark.parametrize("change, field", [c[1:] for c in BAD_MANIFESTS], ids=[c[0] for c in BAD_MANIFESTS])
def test_malformed_manifest_fails_naming_the_field(change, field: str):
    data = _manifest_dict()
    change(data)

    with pytest.raises(PackageError) as err:
        Manifest.from_bytes(json.dumps(data).encode())

    assert field in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"], ids=["broken-json", "list", "not-utf8"])
def test_manifest_that_is_not_a_json_object_is_refused(raw: bytes):
    with pytest.raises(PackageError):
        Manifest.from_bytes(raw)


@pytest.mark.parametrize("change, field", [(_drop("target"), "target"), (_set("schema_version", value=2),
                                                                          "schema_version")],
                         ids=["missing-target", "schema-version-2"])
def test_signed_package_with_malformed_manifest_is_refused_naming_file_and_field(tmp_path: Path, keys, change, field):
    private, public = keys
    data = _manifest_dict()
    change(data)
    raw = json.dumps(data).encode()
    pkg = write_tar(tmp_path / "odd.edgepkg", [regular("manifest.json", raw), regular("manifest.sig", sign(private, raw)),
                                               regular(MODEL, GOOD)])

    with pytest.raises(PackageError) as err:
        open_package(pkg, [public])

    assert str(pkg) in str(err.value)
    assert field in str(err.value)


# ---------------------------------------------------------------------------------------------
# Malformed manifests: whatever the bytes, one PackageError naming what and where


def _signed_package(tmp_path: Path, private, raw: bytes, members: dict[str, bytes] | None = None) -> Path:
    """A tar whose manifest.json is exactly ``raw``, signed with the trusted key."""
    entries = [regular("manifest.json", raw), regular("manifest.sig", sign(private, raw))]
    entries += [regular(name, data) for name, data in (members or {}).items()]
    return write_tar(tmp_path / "crafted.edgepkg", entries)


def test_deeply_nested_manifest_is_a_package_error(tmp_path: Path, keys):
    private, public = keys
    data = _manifest_dict()
    raw = json.dumps(data).encode()
    nested = raw[:-1] + b', "host": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    pkg = _signed_package(tmp_path, private, nested)

    with pytest.raises(PackageError, match="nested too deeply") as err:
        open_package(pkg, [public])  # json.loads alone raises RecursionError here

    assert str(err.value).startswith(f"{pkg}: manifest.json: ")
    data["host"] = {"a": json.loads("[" * 40 + "]" * 40)}  # parses, but deeper than any real manifest
    with pytest.raises(PackageError, match=r"host\.a.*nested deeper than 32 levels"):
        Manifest.from_bytes(json.dumps(data).encode())


@pytest.mark.parametrize("where", ["size", "schema_version", "host"])
def test_huge_integer_in_signed_manifest_is_a_package_error(tmp_path: Path, keys, where: str):
    private, public = keys
    data = _manifest_dict()
    if where == "size":
        data["files"][MODEL]["size"] = 12345
    elif where == "schema_version":
        data["schema_version"] = 12345
    else:
        data["host"] = {"cpus": 12345}
    raw = json.dumps(data).encode().replace(b"12345", b"9" * 5000)  # int() refuses past 4300 digits
    pkg = _signed_package(tmp_path, private, raw, {MODEL: GOOD})

    with pytest.raises(PackageError, match="not valid JSON") as err:
        open_package(pkg, [public])

    assert str(pkg) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value, message", [
    (-1, "out of range"), (2 ** 41, "out of range"), (10 ** 300, "out of range"), (1.5, "expected integer"),
])
def test_out_of_range_file_size_is_a_package_error(value, message: str):
    data = _manifest_dict()
    data["files"][MODEL]["size"] = value

    with pytest.raises(PackageError, match=rf"files\['{MODEL}'\]\.size: .*{message}"):
        Manifest.from_bytes(json.dumps(data).encode())


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_number_in_manifest_is_a_package_error(token: str):
    raw = json.dumps(_manifest_dict()).encode()
    raw = raw[:-1] + b', "host": {"speed": ' + token.encode() + b"}}"

    with pytest.raises(PackageError, match="not a JSON number|not valid JSON"):
        Manifest.from_bytes(raw)


def test_non_finite_measurement_is_written_as_null_so_the_package_still_reads():
    manifest = tiny_manifest()
    manifest.variants[0].host_latency_ms = {"p50_ms": 1.0, "speedup_vs_fp32": float("nan")}

    again = Manifest.from_bytes(manifest.to_bytes())

    assert again.variants[0].host_latency_ms == {"p50_ms": 1.0, "speedup_vs_fp32": None}


@pytest.mark.parametrize("raw", [
    b'{"a": 1, "a": 2}',
    b'{"name": "\\ud800"}',
    b"\xef\xbb\xbf{}",  # a byte-order mark: not JSON
])
def test_ambiguous_or_invalid_text_in_manifest_is_a_package_error(raw: bytes):
    data = _manifest_dict()
    body = json.dumps(data).encode()
    if raw.startswith(b"{"):
        raw = body[:-1] + b", " + raw[1:]
    with pytest.raises(PackageError):
        Manifest.from_bytes(raw)


def _set_variant_file(path: str):
    return _set("variants", 0, "file", value=path)


HOSTILE_PATHS = {
    "absolute": "/etc/passwd",
    "dotdot": "../../other-version/model.onnx",
    "inner-dotdot": "variants/../../escape.onnx",
    "backslash": "..\\..\\escape.onnx",
    "nul": "variants/model.onnx\x00.txt",
    "empty-part": "variants//model.onnx",
    "dot": "./model.onnx",
    "empty": "",
    "too-long": "a" * 256,
}


@pytest.mark.parametrize("field", ["variants[0].file", "variants[0].files[0]", "reference.inputs", "files"])
@pytest.mark.parametrize("case", HOSTILE_PATHS)
def test_variant_path_outside_package_is_refused(tmp_path: Path, keys, case: str, field: str):
    """Signed with the trusted key, so the signature passes: the refusal comes from the path check."""
    private, public = keys
    path = HOSTILE_PATHS[case]
    data = _manifest_dict()
    if field == "variants[0].file":
        data["variants"][0]["file"] = path
    elif field == "variants[0].files[0]":
        data["variants"][0]["files"] = [path]
    elif field == "reference.inputs":
        data["reference"]["inputs"] = path
    else:
        data["files"][path] = {"sha256": sha256(GOOD), "size": len(GOOD)}
    raw = json.dumps(data).encode()
    pkg = _signed_package(tmp_path, private, raw, {MODEL: GOOD})
    dest = tmp_path / "dest"

    with pytest.raises(PackageError) as err:
        extract_package(pkg, dest, [public])

    message = str(err.value)
    assert not isinstance(err.value, SignatureError)
    assert (field if field != "files" else "files[") in message
    assert "plain relative path inside the package" in message and "\n" not in message
    assert not dest.exists()


def test_manifest_declaring_a_file_inside_another_file_is_refused():
    data = _manifest_dict()
    data["files"][MODEL + "/inner"] = {"sha256": sha256(GOOD), "size": len(GOOD)}

    with pytest.raises(PackageError, match="is both a file and a folder"):
        Manifest.from_bytes(json.dumps(data).encode())


@pytest.mark.parametrize("change, field", [
    (_set("variants", 0, "providers", value=[1]), "variants[0].providers[0]"),
    (_set("variants", 0, "health_tolerance", value={"cosine_min": "high"}), "variants[0].health_tolerance.cosine_min"),
    (_set("variants", 0, "health_tolerance", value={"cosine_min": True}), "variants[0].health_tolerance.cosine_min"),
    (_set("variants", 0, "metrics", value=[]), "variants[0].metrics"),
    (_set("variants", 0, "size", value=-5), "variants[0].size"),
    (_set("inputs", 0, "shape", value=[1, None]), "inputs[0].shape[1]"),
    (_set("files", MODEL, "sha256", value="XYZ"), "sha256"),
    (_set("dropped", value=["x"]), "dropped[0]"),
    (_set("architecture", value=7), "architecture"),
    (_set("reference", value={"inputs": 1, "outputs": "o.npz"}), "reference.inputs"),
    (_set("name", value=""), "name"),
])
def test_wrongly_typed_field_fails_naming_the_field(change, field: str):
    data = _manifest_dict()
    change(data)

    with pytest.raises(PackageError) as err:
        Manifest.from_bytes(json.dumps(data).encode())

    assert field in str(err.value) and "\n" not in str(err.value)
