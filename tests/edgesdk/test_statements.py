"""Signed deployment statements (the `desired` message): what is signed, what is refused, and why.

Real Ed25519 keys written by `generate_keys` into tmp folders; statements are built, signed and
then attacked the way a client on a shared broker could: unsigned, re-signed by its own key,
edited after signing, addressed to another device, expired, issued in the future, malformed.
The agent's stateful rules (replay, downgrade) are tested in tests/agent/test_statement_guard.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgesdk.errors import EdgeError, ProtocolError, TrustError
from edgesdk.protocol import (BLOCK_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, DeploymentStatement, SignedStatement,
                              check_id, compare_versions, is_valid_id, new_serial, sign_statement, undeploy_statement)
from edgesdk.protocol.statements import CLOCK_SKEW_S, MAX_PACKAGE_BYTES, MAX_SERIAL
from edgesdk.signing import generate_keys, key_id, load_private_key, load_public_key

NOW = 1_900_000_000.0  # 2030-03-17: the device's clock in these tests
YEAR_2001 = 978_307_200.0
FLEET, DEVICE = "plant-7", "cam-01"


def statement(**changes: Any) -> DeploymentStatement:
    fields: dict[str, Any] = dict(
        fleet=FLEET, device=DEVICE, package_id="ab" * 32, name="detector", version="1.2.0", target="x86-64-cpu",
        size=10_000_000, block_size=BLOCK_SIZE, blocks_digest="cd" * 32, serial=new_serial(now=NOW - 60),
        issued_at=NOW - 60, expires=NOW + 3600, rollout_id="r-1", rollback=False)
    fields.update(changes)
    return DeploymentStatement(**fields)


def statement_dict(**changes: Any) -> dict[str, Any]:
    data = json.loads(statement().to_json())
    data.update(changes)
    return data


@pytest.fixture
def fleet_key(tmp_path: Path):
    pair = generate_keys(tmp_path / "fleet")
    return load_private_key(pair.private_path), load_public_key(pair.public_path)


@pytest.fixture
def stranger_key(tmp_path: Path):
    """A key the device does not trust: what anyone with broker access can sign with."""
    pair = generate_keys(tmp_path / "stranger")
    return load_private_key(pair.private_path), load_public_key(pair.public_path)


def wire_with_text(signed: SignedStatement, text: str) -> bytes:
    """The signed message with its statement text replaced and the original signature kept."""
    data = json.loads(signed.to_json())
    data["statement"] = text
    return json.dumps(data).encode()


# -- the happy path -------------------------------------------------------------------------------
def test_signed_statement_round_trips_and_verifies_with_the_fleet_key(fleet_key):
    private, public = fleet_key
    original = statement()
    signed = sign_statement(original, private)

    wire = signed.to_json()
    parsed = SignedStatement.from_json(wire, "edgesdk/v1/plant-7/devices/cam-01/desired/detector")

    assert parsed.statement == original
    assert parsed.signed_bytes == signed.signed_bytes
    assert parsed.keyid == key_id(public)
    assert parsed.verify([public]) == key_id(public)
    assert parsed.to_json() == wire  # byte for byte: a redelivery is recognisable by its digest
    parsed.statement.check_addressed(FLEET, DEVICE, NOW)


def test_statement_carries_its_transfer_limits():
    st = statement(size=BLOCK_SIZE * 3 + 10)
    assert st.sha256 == st.package_id
    assert st.block_count == 4
    assert [st.block_length(i) for i in range(4)] == [BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE, 10]


# -- signatures -----------------------------------------------------------------------------------
def test_statement_signed_by_unknown_key_is_refused(fleet_key, stranger_key):
    _, trusted = fleet_key
    forged = SignedStatement.from_json(sign_statement(statement(), stranger_key[0]).to_json())

    with pytest.raises(TrustError, match="refused"):
        forged.verify([trusted])
    with pytest.raises(TrustError):
        forged.verify([])  # a device with no fleet key trusts no statement


def test_statement_claiming_a_trusted_key_id_is_still_refused(fleet_key, stranger_key):
    """The key id on the wire is a hint, never a credential."""
    private, trusted = fleet_key
    data = json.loads(sign_statement(statement(), stranger_key[0]).to_json())
    data["signature"]["keyid"] = key_id(trusted)
    with pytest.raises(TrustError):
        SignedStatement.from_json(json.dumps(data)).verify([trusted])


@pytest.mark.parametrize("edit", [
    pytest.param(lambda t: t.replace('"device":"cam-01"', '"device":"cam-02"'), id="other-device"),
    pytest.param(lambda t: t.replace('"version":"1.2.0"', '"version":"9.9.9"'), id="version"),
    pytest.param(lambda t: t.replace('"rollback":false', '"rollback":true'), id="rollback-flag"),
    pytest.param(lambda t: t.replace('"name":"detector"', '"name":"detector2"'), id="model-name"),
    pytest.param(lambda t: t.replace('"package_id":"ab', '"package_id":"ac'), id="package-id-byte"),
    pytest.param(lambda t: t.replace('"size":10000000', '"size":10000001'), id="size"),
    pytest.param(lambda t: t.replace(",", ", ", 1), id="whitespace-only"),
    pytest.param(lambda t: json.dumps(json.loads(t), sort_keys=False, indent=1), id="same-fields-reformatted"),
])
def test_tampered_statement_bytes_fail_verification(fleet_key, edit):
    private, public = fleet_key
    signed = sign_statement(statement(), private)
    text = signed.signed_bytes.decode()
    tampered_text = edit(text)
    assert tampered_text != text

    tampered = SignedStatement.from_json(wire_with_text(signed, tampered_text))  # parsing never verifies

    with pytest.raises(TrustError):
        tampered.verify([public])


def test_flipped_bit_in_the_signature_fails_verification(fleet_key):
    private, public = fleet_key
    data = json.loads(sign_statement(statement(), private).to_json())
    sig = bytearray.fromhex(data["signature"]["sig"])
    sig[10] ^= 0x01
    data["signature"]["sig"] = sig.hex()
    with pytest.raises(TrustError):
        SignedStatement.from_json(json.dumps(data)).verify([public])
    data["signature"]["sig"] = sig[:63].hex()  # truncated: malformed, not a crash
    with pytest.raises(TrustError, match="malformed"):
        SignedStatement.from_json(json.dumps(data)).verify([public])


@pytest.mark.parametrize("payload", [
    pytest.param(lambda st, sig: st.to_json(), id="plain-statement-object"),
    pytest.param(lambda st, sig: json.dumps({"statement": st.to_json().decode()}).encode(), id="no-signature"),
    pytest.param(lambda st, sig: json.dumps({"signature": sig}).encode(), id="no-statement"),
    pytest.param(lambda st, sig: json.dumps({"statement": json.loads(st.to_json()), "signature": sig}).encode(),
                 id="statement-as-object"),
    pytest.param(lambda st, sig: json.dumps({"statement": st.to_json().decode(), "signature": sig["sig"]}).encode(),
                 id="signature-as-string"),
    pytest.param(lambda st, sig: json.dumps({"statement": st.to_json().decode(),
                                             "signature": {"keyid": "x", "sig": "zz"}}).encode(), id="sig-not-hex"),
    pytest.param(lambda st, sig: json.dumps({"statement": st.to_json().decode(),
                                             "signature": {"keyid": 1, "sig": sig["sig"]}}).encode(), id="keyid-int"),
    pytest.param(lambda st, sig: json.dumps({"statement": st.to_json().decode(),
                                             "signature": {"keyid": "x", "sig": "é" * 64}}).encode(),
                 id="sig-non-ascii"),
    pytest.param(lambda st, sig: b"", id="empty"),
    pytest.param(lambda st, sig: b"null", id="null"),
    pytest.param(lambda st, sig: b"[]", id="array"),
])
def test_unsigned_desired_message_is_refused(fleet_key, payload):
    st = statement()
    sig = json.loads(sign_statement(st, fleet_key[0]).to_json())["signature"]
    with pytest.raises(ProtocolError) as info:
        SignedStatement.from_json(payload(st, sig), "edgesdk/v1/plant-7/devices/cam-01/desired/detector")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("edgesdk/v1/plant-7/devices/cam-01/desired/detector")


def test_statement_text_that_is_not_utf8_is_refused(fleet_key):
    """A lone surrogate escaped in the outer JSON makes the signed bytes invalid UTF-8: refused when
    parsed (it used to parse, in an unknown field, and then crash `to_json`)."""
    signed = sign_statement(statement(), fleet_key[0])
    text = signed.signed_bytes.decode().replace('"name":', '"note":"x\\ud800","name":')
    raw = wire_with_text(signed, text).replace(b"\\\\ud800", b"\\ud800")
    assert json.loads(raw)["statement"].count("\ud800") == 1
    with pytest.raises(ProtocolError):
        SignedStatement.from_json(raw)


# -- addressing and validity window ---------------------------------------------------------------
@pytest.mark.parametrize("fleet,device", [(FLEET, "cam-02"), ("plant-8", DEVICE), ("plant-8", "cam-02"),
                                          (FLEET.upper(), DEVICE), (FLEET, DEVICE + "x")])
def test_statement_for_another_device_or_fleet_is_refused(fleet, device):
    st = statement()
    with pytest.raises(TrustError, match="not"):
        st.check_addressed(fleet, device, NOW)
    st.check_addressed(FLEET, DEVICE, NOW)  # the same statement is obeyed where it is addressed


def test_expired_statement_is_refused():
    st = statement(issued_at=YEAR_2001, expires=YEAR_2001 + 30 * 24 * 3600)
    with pytest.raises(TrustError, match="expired at 2001-01-31"):
        st.check_addressed(FLEET, DEVICE, NOW)
    # the boundary: valid strictly before `expires`
    edge = statement(expires=NOW)
    with pytest.raises(TrustError, match="expired"):
        edge.check_addressed(FLEET, DEVICE, NOW)
    edge.check_addressed(FLEET, DEVICE, NOW - 0.001)


def test_statement_issued_in_the_future_is_refused():
    future = statement(issued_at=NOW + CLOCK_SKEW_S + 1, expires=NOW + 7200)
    with pytest.raises(TrustError, match="future"):
        future.check_addressed(FLEET, DEVICE, NOW)
    # a device clock a little behind the fleet service's is tolerated
    statement(issued_at=NOW + CLOCK_SKEW_S - 1, expires=NOW + 7200).check_addressed(FLEET, DEVICE, NOW)


def test_reissued_statement_has_a_new_serial_and_window():
    st = statement()
    renewed = st.reissued(st.serial + 1, NOW + 100, lifetime_s=60)
    assert (renewed.serial, renewed.issued_at, renewed.expires) == (st.serial + 1, NOW + 100, NOW + 160)
    assert (renewed.package_id, renewed.version, renewed.device) == (st.package_id, st.version, st.device)


# -- field validation -----------------------------------------------------------------------------
BAD_FIELDS = [
    ("device", "-cam"), ("device", "cam:01"), ("device", "a/b"), ("device", ""), ("device", "x" * 65),
    ("device", "cam+"), ("device", "cam#"), ("device", "$SYS"), ("device", "cam 01"), ("device", "kamera-ü"),
    ("device", 7), ("device", None), ("fleet", "#"), ("fleet", ".hidden"), ("fleet", "plant\n7"),
    ("package_id", "AB" * 32), ("package_id", "ab" * 31), ("package_id", "ab" * 33), ("package_id", "zz" * 32),
    ("package_id", ""), ("blocks_digest", "g" * 64), ("blocks_digest", None),
    ("size", 0), ("size", -1), ("size", MAX_PACKAGE_BYTES + 1), ("size", 10 ** 30), ("size", True),
    ("size", 1.5), ("size", "100"), ("size", None),
    ("block_size", MIN_BLOCK_SIZE - 1), ("block_size", MAX_BLOCK_SIZE + 1), ("block_size", 0), ("block_size", -4096),
    ("serial", 0), ("serial", -5), ("serial", MAX_SERIAL + 1), ("serial", True), ("serial", 1.0), ("serial", "1"),
    ("issued_at", "now"), ("issued_at", None), ("issued_at", True), ("expires", [1]),
    ("name", ""), ("name", "x" * 129), ("name", "a\nb"), ("name", "my model"), ("name", "a/b"), ("name", "det+"),
    ("name", "-det"), ("name", "x" * 65), ("name", "$SYS"), ("name", 7), ("version", "1.0\x00"), ("version", 1),
    ("target", {"x": 1}), ("rollout_id", "x" * 129), ("rollout_id", "r\r1"), ("rollout_id", 5),
    ("rollback", 1), ("rollback", "true"), ("rollback", None), ("undeploy", 1), ("undeploy", "true"),
    ("undeploy", True),  # a deploy statement's package fields set: an undeploy statement names no package
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v in BAD_FIELDS])
def test_statement_with_a_bad_field_is_refused(field, value, fleet_key):
    raw = json.dumps(statement_dict(**{field: value}))
    with pytest.raises(ProtocolError) as info:
        DeploymentStatement.from_json(raw, "statement")
    assert field in str(info.value) or "id" in str(info.value)
    assert "\n" not in str(info.value)
    # Signed by the trusted key does not make it acceptable: parsing refuses before any rule.
    private, _ = fleet_key
    wire = json.dumps({"statement": raw, "signature": {"keyid": "k", "sig": private.sign(raw.encode()).hex()}})
    with pytest.raises(ProtocolError):
        SignedStatement.from_json(wire)


@pytest.mark.parametrize("expires_delta", [0, -1, -1e9])
def test_statement_expiring_before_it_is_issued_is_refused(expires_delta):
    raw = json.dumps(statement_dict(issued_at=NOW, expires=NOW + expires_delta))
    with pytest.raises(ProtocolError, match="expires"):
        DeploymentStatement.from_json(raw)


@pytest.mark.parametrize("field", ["fleet", "device", "package_id", "name", "version", "target", "size",
                                   "block_size", "blocks_digest", "serial", "issued_at", "expires"])
def test_statement_missing_a_required_field_is_refused(field):
    data = statement_dict()
    del data[field]
    with pytest.raises(ProtocolError, match=f"missing field '{field}'"):
        DeploymentStatement.from_json(json.dumps(data))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 5000])
def test_statement_with_a_non_finite_or_huge_number_is_refused(token):
    raw = json.dumps(statement_dict(expires="__X__")).replace('"__X__"', token)
    with pytest.raises(ProtocolError):
        DeploymentStatement.from_json(raw)


@pytest.mark.parametrize("field,value", [("size", 1), ("size", MAX_PACKAGE_BYTES), ("block_size", MIN_BLOCK_SIZE),
                                         ("block_size", MAX_BLOCK_SIZE), ("serial", 1), ("serial", MAX_SERIAL),
                                         ("rollout_id", None), ("issued_at", 0), ("device", "0" * 64),
                                         ("device", "A.b_c-9"), ("version", "1.2.0-rc.1+build"), ("name", "x" * 64),
                                         ("name", "0"), ("undeploy", False)])
def test_statement_at_the_limits_is_accepted(field, value):
    parsed = DeploymentStatement.from_json(json.dumps(statement_dict(**{field: value})))
    assert getattr(parsed, field) == value


def test_unknown_statement_fields_are_ignored_but_still_signed(fleet_key):
    """A newer fleet service may add fields; the signature still covers them."""
    private, public = fleet_key
    raw = json.dumps(statement_dict(future_field={"x": 1})).encode()
    signature = {"keyid": key_id(public), "sig": private.sign(raw).hex()}
    wire = json.dumps({"statement": raw.decode(), "signature": signature})
    parsed = SignedStatement.from_json(wire)
    assert parsed.verify([public]) == key_id(public)
    assert parsed.statement == DeploymentStatement.from_json(statement().to_json())


@pytest.mark.parametrize("value,valid", [
    ("cam-01", True), ("a", True), ("0", True), ("A.b_c-9", True), ("x" * 64, True),
    ("-cam", False), ("cam:01", False), ("a/b", False), ("", False), ("x" * 65, False), ("_cam", False),
    (".cam", False), ("cam+", False), ("cam#", False), ("$SYS", False), ("cam 01", False), ("cam\n", False),
    ("kamera-ü", False), (None, False), (7, False), (b"cam", False),
])
def test_id_rule_table(value, valid):
    assert is_valid_id(value) is valid
    if valid:
        assert check_id(value, "device id") == value
    else:
        with pytest.raises(ProtocolError, match="invalid device id"):
            check_id(value, "device id")


# -- undeploy statements --------------------------------------------------------------------------
def test_undeploy_statement_round_trips_and_verifies(fleet_key):
    private, public = fleet_key
    original = undeploy_statement(FLEET, DEVICE, "detector", new_serial(now=NOW), NOW, lifetime_s=600, rollout_id="r-2")
    signed = sign_statement(original, private)

    parsed = SignedStatement.from_json(signed.to_json(), "edgesdk/v1/plant-7/devices/cam-01/desired/detector")

    assert parsed.statement == original
    assert parsed.verify([public]) == key_id(public)
    st = parsed.statement
    assert (st.undeploy, st.name, st.rollback, st.expires - st.issued_at) == (True, "detector", False, 600)
    assert (st.package_id, st.version, st.target, st.size, st.block_size, st.blocks_digest) == ("", "", "", 0, 0, "")
    st.check_addressed(FLEET, DEVICE, NOW)
    renewed = st.reissued(st.serial + 1, NOW + 10, 600)
    assert renewed.undeploy and renewed.name == "detector"


def test_undeploy_flag_cannot_be_added_to_a_signed_deploy_statement(fleet_key):
    private, public = fleet_key
    signed = sign_statement(statement(), private)
    text = signed.signed_bytes.decode().replace('"undeploy":false', '"undeploy":true')
    with pytest.raises(ProtocolError, match="undeploy statement names no package"):
        SignedStatement.from_json(wire_with_text(signed, text))


UNDEPLOY_WITH_PACKAGE = [("package_id", "ab" * 32), ("version", "1.0"), ("target", "x86-64-cpu"), ("size", 10),
                         ("block_size", BLOCK_SIZE), ("blocks_digest", "cd" * 32), ("rollback", True)]


@pytest.mark.parametrize("field,value", UNDEPLOY_WITH_PACKAGE, ids=[f for f, _ in UNDEPLOY_WITH_PACKAGE])
def test_undeploy_statement_naming_a_package_is_refused(fleet_key, field, value):
    data = json.loads(undeploy_statement(FLEET, DEVICE, "detector", 1, NOW).to_json())
    data[field] = value
    raw = json.dumps(data)
    with pytest.raises(ProtocolError, match="undeploy statement names no package"):
        DeploymentStatement.from_json(raw, "statement")
    wire = json.dumps({"statement": raw, "signature": {"keyid": "k", "sig": fleet_key[0].sign(raw.encode()).hex()}})
    with pytest.raises(ProtocolError):
        SignedStatement.from_json(wire)


@pytest.mark.parametrize("name", ["", "my model", "a/b", "det#", "det+", "-det", "_det", "x" * 65, "kamera-ü"])
def test_undeploy_statement_for_a_name_that_is_not_an_id_is_refused(name):
    with pytest.raises(ProtocolError, match="field 'name' must be a model name"):
        undeploy_statement(FLEET, DEVICE, name, 1, NOW)
    data = json.loads(undeploy_statement(FLEET, DEVICE, "detector", 1, NOW).to_json())
    data["name"] = name
    with pytest.raises(ProtocolError, match="name"):
        DeploymentStatement.from_json(json.dumps(data))


# -- serials and versions -------------------------------------------------------------------------
def test_new_serial_grows_even_when_the_clock_goes_back():
    first = new_serial(now=NOW)
    assert first == int(NOW * 1_000_000)
    assert new_serial(first, now=NOW - 3600) == first + 1
    assert new_serial(first, now=NOW + 1) > first


@pytest.mark.parametrize("a,b,expected", [
    ("1.10", "1.9", 1), ("2.0.0", "1.99", 1), ("1.2.0-rc1", "1.2.0", -1), ("1.2", "1.2.0", 0), ("1", "1.0.0", 0),
    ("v2", "2", 0), ("V2.1", "2.1", 0), ("1.2.0-rc2", "1.2.0-rc1", 1), ("1.2.0-rc.10", "1.2.0-rc.9", 1),
    ("1.2.0-alpha", "1.2.0-beta", -1), ("1.2.1-rc1", "1.2.0", 1), ("0.9", "0.10", -1), ("01.2", "1.2", 0),
    ("1.2a", "1.2", 1), ("2", "10", -1), ("1_2", "1.2", 0), (" 1.2 ", "1.2", 0),
    # non-ASCII digits and very long numbers compare, never raise (str.isdigit() is true for '²')
    ("1.²", "1.0", 1), ("1." + "9" * 5000, "1.9", 1), ("1." + "9" * 5000, "2", -1),
])
def test_compare_versions_table(a, b, expected):
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_errors_are_edge_errors():
    assert issubclass(ProtocolError, EdgeError) and issubclass(TrustError, EdgeError)
