"""The fleet's trust root (TUF root metadata, checked by python-tuf's Metadata API).

Each test builds real roots with real Ed25519 keys (written by `generate_keys`) and attacks the
chain the way python-tuf's own tests do: a root not signed by the previous threshold, a rollback to
an older version, a skipped version, an expired root, documents that are not roots at all. How the
agent follows the chain (keys changing, revoked keys refused) is in tests/agent/test_statement_guard.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgesdk.errors import ConfigError, ProtocolError, TrustError
from edgesdk.signing import generate_keys, key_id, load_private_key, load_public_key
from edgesdk.trustroot import (MAX_ROOT_BYTES, ROLE_OF, TrustRoot, create_root, parse_root_chain, root_chain_message,
                               rotate_root)

LONG_AGO = datetime(2001, 1, 1, tzinfo=timezone.utc)


class Keys:
    """Named key pairs in tmp folders: keys.private('root1'), keys.public('fleet')."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._pairs: dict[str, tuple] = {}

    def _pair(self, name: str):
        if name not in self._pairs:
            pair = generate_keys(self.folder / name)
            self._pairs[name] = (load_private_key(pair.private_path), load_public_key(pair.public_path))
        return self._pairs[name]

    def private(self, *names: str) -> list:
        return [self._pair(n)[0] for n in names]

    def public(self, *names: str) -> list:
        return [self._pair(n)[1] for n in names]

    def ids(self, *names: str) -> list[str]:
        return [key_id(k) for k in self.public(*names)]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def root_v1(keys: Keys) -> TrustRoot:
    """Threshold 2 of 3 root keys; one release key; one fleet key."""
    return TrustRoot.from_bytes(create_root(keys.private("root1", "root2", "root3"), keys.public("release"),
                                            keys.public("fleet"), threshold=2))


def tuf_metadata(raw: bytes):
    from tuf.api.metadata import Metadata

    return Metadata.from_bytes(raw)


# -- a root and its roles -------------------------------------------------------------------------
def test_created_root_names_release_keys_as_targets_and_fleet_keys_as_timestamp(keys: Keys, root_v1: TrustRoot):
    assert root_v1.version == 1
    assert not root_v1.is_expired()
    assert [key_id(k) for k in root_v1.keys_for("root")] == keys.ids("root1", "root2", "root3")
    assert [key_id(k) for k in root_v1.keys_for("release")] == keys.ids("release")
    assert [key_id(k) for k in root_v1.keys_for("fleet")] == keys.ids("fleet")
    assert (root_v1.threshold("root"), root_v1.threshold("release"), root_v1.threshold("fleet")) == (2, 1, 1)
    roles = tuf_metadata(root_v1.raw).signed.roles
    assert ROLE_OF == {"root": "root", "release": "targets", "fleet": "timestamp"}
    assert roles["snapshot"].keyids == roles["timestamp"].keyids  # TUF requires snapshot: the fleet keys
    assert len(tuf_metadata(root_v1.raw).signatures) == 3


@pytest.mark.parametrize("threshold", [0, 4])
def test_root_threshold_outside_the_root_keys_is_a_config_error(keys: Keys, threshold: int):
    with pytest.raises(ConfigError, match="threshold"):
        create_root(keys.private("root1", "root2", "root3"), keys.public("release"), keys.public("fleet"),
                    threshold=threshold)


@pytest.mark.parametrize("days", [float("nan"), float("inf"), -1, 0, 1e9])
def test_root_lifetime_out_of_range_is_a_config_error(keys: Keys, days: float):
    with pytest.raises(ConfigError, match="root lifetime"):
        create_root(keys.private("root1"), keys.public("release"), keys.public("fleet"), expires_days=days)


def test_root_asking_for_two_fleet_or_release_signatures_is_refused(keys: Keys):
    """Statements and packages carry one signature: a root asking for two must not be read as one."""
    for role in ("targets", "timestamp"):
        with pytest.raises(TrustError, match="threshold 2"):
            TrustRoot.from_bytes(_root_document(keys, thresholds={role: 2}))


def test_root_without_a_fleet_key_is_a_config_error(keys: Keys):
    with pytest.raises(ConfigError):
        create_root(keys.private("root1"), keys.public("release"), [])


def test_rotated_root_is_followed_and_keeps_what_was_not_rotated(keys: Keys, root_v1: TrustRoot):
    raw_v2 = rotate_root(root_v1, keys.private("root1", "root2"), fleet_keys=keys.public("fleet2"))

    v2 = root_v1.follow([raw_v2])

    assert v2.version == 2
    assert [key_id(k) for k in v2.keys_for("fleet")] == keys.ids("fleet2")
    assert [key_id(k) for k in v2.keys_for("release")] == keys.ids("release")
    # The root role is unchanged: signing with 2 of 3 keys does not drop the third one.
    assert [key_id(k) for k in v2.keys_for("root")] == keys.ids("root1", "root2", "root3")
    assert v2.threshold("root") == 2


def test_root_keys_themselves_rotate(keys: Keys, root_v1: TrustRoot):
    raw_v2 = rotate_root(root_v1, keys.private("root1", "root3"), root_keys=keys.private("new1", "new2"), threshold=2)
    v2 = root_v1.follow([raw_v2])
    assert [key_id(k) for k in v2.keys_for("root")] == keys.ids("new1", "new2")
    # v3 is now authorised by the new root keys only; the old ones no longer count.
    raw_v3 = rotate_root(v2, keys.private("new1", "new2"), release_keys=keys.public("release2"))
    assert v2.follow([raw_v3]).version == 3
    with pytest.raises(TrustError, match="threshold"):
        rotate_root(v2, keys.private("root1", "root2"), release_keys=keys.public("release3"))


# -- attacks on the chain -------------------------------------------------------------------------
def test_root_not_signed_by_threshold_of_previous_is_refused(keys: Keys, root_v1: TrustRoot):
    # rotate_root refuses to write what devices would refuse...
    with pytest.raises(TrustError, match="threshold"):
        rotate_root(root_v1, keys.private("root1"), fleet_keys=keys.public("attacker"))
    # ...and a device refuses it when it is crafted anyway: v2 signed by 1 of the 3 old keys.
    one_signer = create_root(keys.private("root1"), keys.public("release"), keys.public("attacker"), version=2)
    with pytest.raises(TrustError, match="not signed by the threshold of root version 1"):
        root_v1.next(one_signer)
    with pytest.raises(TrustError):
        root_v1.follow([one_signer])
    # nor does a root made entirely of the attacker's own keys chain from v1
    attacker = create_root(keys.private("attacker"), keys.public("attacker"), keys.public("attacker"), version=2)
    with pytest.raises(TrustError):
        root_v1.follow([attacker])


def test_root_not_signed_by_its_own_new_threshold_is_refused(keys: Keys, root_v1: TrustRoot):
    raw = create_root(keys.private("new1", "new2"), keys.public("release"), keys.public("fleet"), threshold=2,
                      version=2, extra_signers=keys.private("root1", "root2"))
    md = tuf_metadata(raw)
    del md.signatures[tuf_metadata(raw).signed.roles["root"].keyids[1]]  # drop new2's signature
    with pytest.raises(TrustError, match="threshold"):
        root_v1.follow([md.to_bytes()])
    assert root_v1.follow([raw]).version == 2  # with both signatures it is a valid rotation


def test_root_version_rollback_is_refused(keys: Keys, root_v1: TrustRoot):
    raw_v2 = rotate_root(root_v1, keys.private("root1", "root2"), fleet_keys=keys.public("fleet2"))
    v2 = root_v1.follow([raw_v2])
    raw_v3 = rotate_root(v2, keys.private("root2", "root3"), fleet_keys=keys.public("fleet3"))
    v3 = v2.follow([raw_v3])

    # An older root offered after a newer one is ignored: nothing changes.
    for stale in ([raw_v2], [root_v1.raw], [root_v1.raw, raw_v2], [raw_v2, raw_v3]):
        assert v3.follow(stale) is v3
    # A v2 with other keys, validly signed by v1's root keys, is still older than v3.
    other_v2 = rotate_root(root_v1, keys.private("root1", "root3"), fleet_keys=keys.public("attacker"))
    assert v3.follow([other_v2]) is v3
    # And as "the next root" a lower version is refused outright.
    with pytest.raises(TrustError, match="expected root version 4, got 2"):
        v3.next(raw_v2)


def test_root_skipping_a_version_is_refused(keys: Keys, root_v1: TrustRoot):
    raw_v2 = rotate_root(root_v1, keys.private("root1", "root2"), fleet_keys=keys.public("fleet2"))
    raw_v3 = rotate_root(TrustRoot.from_bytes(raw_v2), keys.private("root1", "root2"),
                         fleet_keys=keys.public("fleet3"))
    # v3 carries valid signatures of the (unchanged) root keys, but v2 never arrived.
    with pytest.raises(TrustError, match="expected root version 2, got 3"):
        root_v1.follow([raw_v3])
    # the same version twice is not "the next" either
    with pytest.raises(TrustError, match="expected root version 2, got 1"):
        root_v1.next(root_v1.raw)
    assert root_v1.follow([raw_v3, raw_v2]).version == 3  # order on the wire does not matter


def test_expired_root_is_refused(keys: Keys, root_v1: TrustRoot):
    expired = TrustRoot.from_bytes(create_root(keys.private("root1"), keys.public("release"), keys.public("fleet"),
                                               expires_days=30, now=LONG_AGO))
    assert expired.is_expired()
    with pytest.raises(TrustError, match="expired at 2001-01-31"):
        expired.check_not_expired()
    with pytest.raises(TrustError, match="expired"):
        expired.follow([])  # following nothing still leaves an expired root
    # an expired newest root in a chain is refused...
    expired_v2 = create_root(keys.private("root1", "root2", "root3"), keys.public("release"),
                             keys.public("fleet2"), threshold=2, version=2, expires_days=30, now=LONG_AGO)
    with pytest.raises(TrustError, match="version 2 expired"):
        root_v1.follow([expired_v2])
    # ...but an expired intermediate one is fine (TUF: only the newest root must be current)
    raw_v3 = create_root(keys.private("root1", "root2", "root3"), keys.public("release"), keys.public("fleet3"),
                         threshold=2, version=3)
    assert root_v1.follow([expired_v2, raw_v3]).version == 3
    # the expiry is checked against the given clock
    later = datetime.now(timezone.utc) + timedelta(days=400)
    with pytest.raises(TrustError, match="expired"):
        root_v1.check_not_expired(later)
    root_v1.check_not_expired(later.timestamp() - 60 * 86400)


def _root_document(keys: Keys, *, targets_key=None, fleet_public=None, public_hex: str | None = None,
                   thresholds: dict[str, int] | None = None) -> bytes:
    """A root built with python-tuf directly, to hold what `create_root` never writes."""
    from securesystemslib.signer import CryptoSigner, SSlibKey
    from tuf.api.metadata import Metadata, Root

    root = Root(version=1, expires=datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=30))
    root.add_key(SSlibKey.from_crypto(keys.public("root1")[0]), "root")
    root.add_key(targets_key or SSlibKey.from_crypto(keys.public("release")[0]), "targets")
    fleet = SSlibKey.from_crypto(fleet_public or keys.public("fleet")[0])
    if public_hex is not None:
        fleet = SSlibKey(fleet.keyid, fleet.keytype, fleet.scheme, {"public": public_hex})
    for role in ("timestamp", "snapshot"):
        root.add_key(fleet, role)
    for role, threshold in (thresholds or {}).items():
        root.roles[role].threshold = threshold
    md = Metadata(root)
    md.sign(CryptoSigner(keys.private("root1")[0]))
    return md.to_bytes()


def _targets_document(keys: Keys) -> bytes:
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Targets

    md = Metadata(Targets(version=1, expires=datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)))
    md.sign(CryptoSigner(keys.private("root1")[0]))
    return md.to_bytes()


def _deeply_nested(root_raw: bytes, depth: int) -> bytes:
    data = json.loads(root_raw)
    data["signed"]["x-nested"] = "__X__"
    return json.dumps(data).encode().replace(b'"__X__"', b"[" * depth + b"]" * depth)


MALFORMED = {
    "empty": lambda k, r: b"",
    "garbage": lambda k, r: b"not json at all",
    "not-utf8": lambda k, r: b"\xff\xfe{\x00}",
    "null": lambda k, r: b"null",
    "array": lambda k, r: b"[]",
    "empty-object": lambda k, r: b"{}",
    "deep-nesting": lambda k, r: b"[" * 100_000 + b"]" * 100_000,
    "deep-nesting-inside-a-root": lambda k, r: _deeply_nested(r, 50_000),
    "too-big": lambda k, r: r + b" " * MAX_ROOT_BYTES,
    "not-bytes": lambda k, r: r.decode(),
    "targets-metadata": lambda k, r: _targets_document(k),
    "ecdsa-release-key": lambda k, r: _root_document(k, targets_key=_ecdsa_key()),
    "malformed-ed25519-key": lambda k, r: _root_document(k, public_hex="zz" * 32),
    "short-ed25519-key": lambda k, r: _root_document(k, public_hex="ab" * 31),
    "signatures-stripped": lambda k, r: json.dumps({**json.loads(r), "signatures": []}).encode(),
    "signed-edited": lambda k, r: r.replace(b'"threshold":2', b'"threshold":1', 1),
    "version-as-text": lambda k, r: r.replace(b'"version":1', b'"version":"1"', 1),
}


def _ecdsa_key():
    from securesystemslib.signer import SSlibKey

    return SSlibKey.from_crypto(ec.generate_private_key(ec.SECP256R1()).public_key())


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_root_documents_are_trust_errors(keys: Keys, root_v1: TrustRoot, case: str):
    raw = MALFORMED[case](keys, root_v1.raw)
    assert raw != root_v1.raw
    with pytest.raises(TrustError) as info:
        TrustRoot.from_bytes(raw)
    assert "\n" not in str(info.value)
    if isinstance(raw, bytes):
        with pytest.raises(TrustError):  # and as an update, it never replaces the current root
            root_v1.follow([raw])


def test_well_formed_python_tuf_root_is_accepted(keys: Keys):
    """The control for the hand-built documents above: built right, it loads."""
    root = TrustRoot.from_bytes(_root_document(keys))
    assert [key_id(k) for k in root.keys_for("fleet")] == keys.ids("fleet")


# -- the retained chain message -------------------------------------------------------------------
def test_root_chain_message_round_trips(keys: Keys, root_v1: TrustRoot):
    raw_v2 = rotate_root(root_v1, keys.private("root1", "root2"), fleet_keys=keys.public("fleet2"))
    assert parse_root_chain(root_chain_message([raw_v2])) == [raw_v2]
    assert parse_root_chain(root_chain_message([])) == []


@pytest.mark.parametrize("payload", [b"", b"{}", b'{"roots": "x"}', b'{"roots": [1]}', b'{"roots": [{}]}', b"[]",
                                     b'{"roots": [NaN]}', b"\xff", b"[" * 10_000])
def test_malformed_root_chain_message_is_a_protocol_error(payload: bytes):
    with pytest.raises(ProtocolError, match="trust/root"):
        parse_root_chain(payload)
