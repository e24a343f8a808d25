"""Ed25519 keys: generated safely, refused when they are not Ed25519 keys, and signatures that must match."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgesdk.errors import KeyFileError, SignatureError
from edgesdk.signing import (
    generate_keys,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify_signature,
)

MANIFEST = b'{"name": "tiny", "version": "1.0.0"}\n'


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_private_key_readable_only_by_owner(tmp_path: Path):
    pair = generate_keys(tmp_path / "keys")

    assert pair.private_path == tmp_path / "keys" / "signing.key"
    assert mode_of(pair.private_path) == 0o600
    assert load_public_key(pair.public_path) is not None
    assert key_id(load_private_key(pair.private_path).public_key()) == pair.key_id


def test_generate_refuses_to_overwrite_an_existing_key(tmp_path: Path):
    pair = generate_keys(tmp_path)
    before = pair.private_path.read_bytes(), pair.public_path.read_bytes()

    with pytest.raises(KeyFileError) as err:
        generate_keys(tmp_path)

    assert str(pair.private_path) in str(err.value)
    assert (pair.private_path.read_bytes(), pair.public_path.read_bytes()) == before


def test_generate_with_overwrite_replaces_the_key(tmp_path: Path):
    first = generate_keys(tmp_path)

    second = generate_keys(tmp_path, overwrite=True)

    assert second.key_id != first.key_id
    assert mode_of(second.private_path) == 0o600
    assert key_id(load_public_key(second.public_path)) == second.key_id


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _not_key_files() -> list:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    x_key = x25519.X25519PrivateKey.generate()
    ed_key = Ed25519PrivateKey.generate()
    encrypted = ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.BestAvailableEncryption(b"secret"))
    return [
        # (case id, loader, file content)
        ("text-as-private", load_private_key, b"hello, not a key\n"),
        ("text-as-public", load_public_key, b"hello, not a key\n"),
        ("empty-as-public", load_public_key, b""),
        ("rsa-private", load_private_key, _pem_private(rsa_key)),
        ("rsa-public", load_public_key, _pem_public(rsa_key)),
        ("ec-private", load_private_key, _pem_private(ec_key)),
        ("ec-public", load_public_key, _pem_public(ec_key)),
        ("x25519-private", load_private_key, _pem_private(x_key)),
        ("public-given-as-private", load_private_key, _pem_public(ed_key)),
        ("private-given-as-public", load_public_key, _pem_private(ed_key)),
        ("password-protected-private", load_private_key, encrypted),
    ]


NOT_KEYS = _not_key_files()


@pytest.mark.parametrize("loader, content", [c[1:] for c in NOT_KEYS], ids=[c[0] for c in NOT_KEYS])
def test_loading_a_file_that_is_not_an_ed25519_key_fails_in_one_line(tmp_path: Path, loader, content: bytes):
    path = tmp_path / "key.pem"
    path.write_bytes(content)

    with pytest.raises(KeyFileError) as err:
        loader(path)

    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("loader", [load_private_key, load_public_key])
@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()], ids=["missing", "directory"])
def test_loading_a_missing_or_unreadable_key_file_fails_in_one_line(tmp_path: Path, loader, make):
    path = tmp_path / "signing.key"
    make(path)

    with pytest.raises(KeyFileError) as err:
        loader(path)

    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


@pytest.fixture
def keys(tmp_path: Path):
    pair = generate_keys(tmp_path / "keys")
    return load_private_key(pair.private_path), load_public_key(pair.public_path)


def test_signature_round_trip_names_the_signing_key(keys):
    private, public = keys

    signature = sign(private, MANIFEST)

    assert len(signature) == 64
    assert verify_signature([public], MANIFEST, signature) == key_id(public)


def test_accepts_signature_from_any_one_of_several_trusted_keys(keys):
    private, public = keys
    others = [Ed25519PrivateKey.generate().public_key() for _ in range(2)]

    signer = verify_signature([others[0], public, others[1]], MANIFEST, sign(private, MANIFEST))

    assert signer == key_id(public)


def test_rejects_signature_from_unknown_key(keys):
    _, public = keys
    stranger = Ed25519PrivateKey.generate()

    with pytest.raises(SignatureError):
        verify_signature([public], MANIFEST, sign(stranger, MANIFEST))


def test_rejects_signature_over_tampered_data(keys):
    private, public = keys
    signature = sign(private, MANIFEST)

    with pytest.raises(SignatureError):
        verify_signature([public], MANIFEST.replace(b"1.0.0", b"6.6.6"), signature)


@pytest.mark.parametrize("mangle", [
    lambda s: s[:32],
    lambda s: s[:-1],
    lambda s: b"",
    lambda s: s + b"\x00",
    lambda s: bytes([s[0] ^ 0x01]) + s[1:],
], ids=["half", "one-byte-short", "empty", "one-byte-long", "bit-flipped"])
def test_rejects_malformed_or_truncated_signature(keys, mangle):
    private, public = keys

    with pytest.raises(SignatureError):
        verify_signature([public], MANIFEST, mangle(sign(private, MANIFEST)))


def test_rejects_when_no_key_is_trusted(keys):
    private, _ = keys

    with pytest.raises(SignatureError):
        verify_signature([], MANIFEST, sign(private, MANIFEST))


def test_key_id_is_stable_and_short(keys):
    _, public = keys

    assert key_id(public) == key_id(public)
    assert len(key_id(public)) == 16
    int(key_id(public), 16)


@pytest.mark.parametrize("role, names", [("release", ("signing.key", "signing.pub")),
                                         ("fleet", ("fleet.key", "fleet.pub")),
                                         ("root", ("root.key", "root.pub"))])
def test_each_role_has_its_own_key_files(tmp_path: Path, role: str, names: tuple[str, str]):
    from edgesdk.signing import key_file_names

    pair = generate_keys(tmp_path, role=role)

    assert key_file_names(role) == names
    assert (pair.private_path.name, pair.public_path.name) == names
    assert mode_of(pair.private_path) == 0o600


def test_roles_share_a_folder_without_overwriting_each_other(tmp_path: Path):
    ids = {role: generate_keys(tmp_path, role=role).key_id for role in ("release", "fleet", "root")}
    assert len(set(ids.values())) == 3
    assert key_id(load_public_key(tmp_path / "signing.pub")) == ids["release"]


def test_unknown_key_role_is_refused_in_one_line(tmp_path: Path):
    with pytest.raises(KeyFileError, match="unknown key role 'admin'"):
        generate_keys(tmp_path, role="admin")
    assert list(tmp_path.iterdir()) == []
