"""Fuzzing every parser that reads network bytes: no input may raise anything but an EdgeError.

The parsers are the ones the agent and the fleet service call on MQTT payloads: signed statements,
the JSON control messages, binary block responses and the retained trust-root chain. Each gets
arbitrary bytes, arbitrary JSON trees, and mutations of a valid message (a field replaced by any
JSON value or by a hostile token: 5000-digit integers, NaN, 1e999, deep nesting, lone surrogates;
bytes flipped, cut or made non-UTF-8). Whatever parses must be usable: it serialises again. A
signed statement whose text changed must fail verification. ~200 examples each, no deadline.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgesdk.errors import EdgeError, TrustError
from edgesdk.protocol import (BLOCK_SIZE, BlockRequest, BlockResponse, BlockStatus, DeploymentStatement, DeviceState,
                              InstallEvent, SignedStatement, TelemetryWindow, is_valid_id, new_serial,
                              parse_desired_name, parse_device_topic, parse_package_get, sign_statement,
                              undeploy_statement)
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from edgesdk.trustroot import TrustRoot, create_root, parse_root_chain, root_chain_message

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_900_000_000.0


def _keys():
    """Three key pairs, made once at import (module-level constants below); no files are kept."""
    with tempfile.TemporaryDirectory(prefix="edgesdk-fuzz-keys-") as name:
        made = [generate_keys(Path(name) / role) for role in ("fleet", "root", "release")]
        return [(load_private_key(m.private_path), load_public_key(m.public_path)) for m in made]


(FLEET_PRIVATE, FLEET_PUBLIC), (ROOT_PRIVATE, _), (_, RELEASE_PUBLIC) = _keys()

STATEMENT = DeploymentStatement(
    fleet="plant-7", device="cam-01", package_id="ab" * 32, name="detector", version="1.2.0", target="x86-64-cpu",
    size=1_000_000, block_size=BLOCK_SIZE, blocks_digest="cd" * 32, serial=new_serial(now=NOW), issued_at=NOW,
    expires=NOW + 3600, rollout_id="r-1", rollback=False)
SIGNED = sign_statement(STATEMENT, FLEET_PRIVATE)
UNDEPLOY = undeploy_statement("plant-7", "cam-01", "detector", new_serial(now=NOW), NOW, lifetime_s=3600,
                              rollout_id="r-2")
ROOT = create_root([ROOT_PRIVATE], [RELEASE_PUBLIC], [FLEET_PUBLIC])

VALID: dict[str, dict[str, Any]] = {
    "statement": json.loads(STATEMENT.to_json()),
    "undeploy": json.loads(UNDEPLOY.to_json()),
    "signed": json.loads(SIGNED.to_json()),
    "state": json.loads(DeviceState("cam-01", True, agent_version="0.3", hardware={"arch": "x86_64"},
                                    runtimes={"onnxruntime": {"version": "1.20"}}, updated_at=NOW,
                                    models=[{"name": "detector", "version": "1.2.0", "package_id": "ab" * 32,
                                             "variant": "onnx-fp32", "provider": "CPUExecutionProvider",
                                             "runtime": "onnxruntime"}]).to_json()),
    "event": json.loads(InstallEvent.from_dict({"kind": "downloading", "package_id": "ab" * 32, "at": NOW,
                                                "model": "detector", "progress": 0.5,
                                                "table": [{"variant": "fp32"}]}).to_json()),
    "telemetry": json.loads(TelemetryWindow(seq=3, window_start=NOW, window_end=NOW + 60, count=10, errors=0,
                                            p50_ms=1.5, histogram={"2.0": 10}, model="detector").to_json()),
    "blocks": json.loads(BlockRequest(blocks=(0, 1, 5), block_size=BLOCK_SIZE).to_json()),
    "index": json.loads(BlockRequest(index=True).to_json()),
    "root": json.loads(ROOT),
    "chain": json.loads(root_chain_message([ROOT])),
}


def _check_signed(raw: bytes) -> None:
    parsed = SignedStatement.from_json(raw, "desired")
    assert SignedStatement.from_json(parsed.to_json()) == parsed
    if parsed.signed_bytes != SIGNED.signed_bytes or parsed.signature != SIGNED.signature:
        with pytest.raises(TrustError):  # any change to what was signed fails verification
            parsed.verify([FLEET_PUBLIC])
    else:
        parsed.verify([FLEET_PUBLIC])


def _check_message(cls) -> Callable[[bytes], None]:
    def check(raw: bytes) -> None:
        parsed = cls.from_json(raw, "topic")
        assert cls.from_json(parsed.to_json()) == parsed  # what parsed serialises (no inf, no surrogates)
    return check


def _check_block_response(raw: bytes) -> None:
    parsed = BlockResponse.decode(raw, "blocks")
    assert parsed.encode() == raw


def _check_chain(raw: bytes) -> None:
    for root in parse_root_chain(raw):
        TrustRoot.from_bytes(root).follow([])


def _check_root(raw: bytes) -> None:
    TrustRoot.from_bytes(raw).follow([])


PARSERS: dict[str, Callable[[bytes], None]] = {
    "SignedStatement": _check_signed,
    "DeploymentStatement": _check_message(DeploymentStatement),
    "UndeployStatement": _check_message(DeploymentStatement),
    "DeviceState": _check_message(DeviceState),
    "InstallEvent": _check_message(InstallEvent),
    "TelemetryWindow": _check_message(TelemetryWindow),
    "BlockRequest": _check_message(BlockRequest),
    "BlockResponse": _check_block_response,
    "parse_root_chain": _check_chain,
    "TrustRoot": _check_root,
}
# which valid message each parser's mutations start from
SEEDS = {"SignedStatement": "signed", "DeploymentStatement": "statement", "UndeployStatement": "undeploy",
         "DeviceState": "state",
         "InstallEvent": "event", "TelemetryWindow": "telemetry", "BlockRequest": "blocks",
         "parse_root_chain": "chain", "TrustRoot": "root"}


def only_edge_errors(name: str, raw: bytes) -> None:
    try:
        PARSERS[name](raw)
    except EdgeError as exc:
        assert "\n" not in str(exc), f"{name}: a multi-line error: {str(exc)[:300]!r}"


# -- strategies -----------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2 ** 62, max_value=2 ** 70)
           | st.floats() | st.text(max_size=20) | st.sampled_from(["", "cam-01", "ab" * 32, "1.2.0", "-cam"]))
json_trees = st.recursive(scalars, lambda children: st.lists(children, max_size=5)
                          | st.dictionaries(st.text(max_size=12), children, max_size=5), max_leaves=25)
# Tokens json.dumps cannot write, spliced into the text instead.
HOSTILE_TOKENS = ["1" + "0" * 5000, "-" + "9" * 4400, "NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1e-400",
                  "[" * 5000 + "]" * 5000, "{\"a\":" * 40 + "1" + "}" * 40, "[" * 33 + "]" * 33, '"\\ud800"',
                  '"\\u0000"', "18446744073709551616", "-0", "0.0", "true", "null", '"\u202e"', "[]", "{}"]


Path_ = tuple[str, ...]


def _field_paths(seed: str) -> list[Path_]:
    """Every field of a seed, one level into objects, and every field inside a statement's text."""
    paths: list[Path_] = []
    for key, value in VALID[seed].items():
        paths.append((key,))
        if isinstance(value, dict):
            paths.extend((key, sub) for sub in value)
    if seed == "signed":
        paths.extend(("statement", "text", inner) for inner in json.loads(VALID[seed]["statement"]))
    return paths


def _replace(data: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    if path[:2] == ("statement", "text"):
        inner = json.loads(data["statement"])
        inner[path[2]] = value
        data["statement"] = json.dumps(inner)
    elif len(path) == 2:
        data[path[0]][path[1]] = value
    else:
        data[path[0]] = value
    return data


def _delete(data: dict[str, Any], path: Path_) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    if path[:2] == ("statement", "text"):
        inner = json.loads(data["statement"])
        del inner[path[2]]
        data["statement"] = json.dumps(inner)
    elif len(path) == 2:
        del data[path[0]][path[1]]
    else:
        del data[path[0]]
    return data


def _with_token(seed: str, path: Path_, token: str) -> bytes:
    text = json.dumps(_replace(VALID[seed], path, "__HOSTILE__"))
    if path[:2] == ("statement", "text"):  # inside the statement's text the token is escaped once more
        return text.replace('\\"__HOSTILE__\\"', json.dumps(token)[1:-1]).encode()
    return text.replace('"__HOSTILE__"', token).encode()


@st.composite
def mutated_messages(draw, seed: str) -> bytes:
    """A valid message with one field replaced, removed, or set to a hostile token."""
    path = draw(st.sampled_from(_field_paths(seed)))
    how = draw(st.sampled_from(["tree", "token", "delete"]))
    if how == "delete":
        return json.dumps(_delete(VALID[seed], path)).encode()
    if how == "token":
        return _with_token(seed, path, draw(st.sampled_from(HOSTILE_TOKENS)))
    return json.dumps(_replace(VALID[seed], path, draw(json_trees))).encode()


@st.composite
def damaged_bytes(draw, seed: str) -> bytes:
    """A valid message's bytes flipped, cut, or given non-UTF-8 bytes."""
    raw = bytearray(json.dumps(VALID[seed]).encode())
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(raw) - 1))
        how = draw(st.sampled_from(["flip", "insert", "cut", "non-utf8"]))
        if how == "flip":
            raw[pos] ^= draw(st.integers(1, 255))
        elif how == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif how == "cut":
            del raw[pos:]
            if not raw:
                break
        else:
            raw[pos:pos] = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf"]))
    return bytes(raw)


JSON_PARSERS = list(SEEDS)


# -- properties -----------------------------------------------------------------------------------
def test_every_valid_seed_parses():
    """The control: each seed is accepted, so the mutations below start from something valid."""
    for name, seed in SEEDS.items():
        PARSERS[name](json.dumps(VALID[seed]).encode())
    _check_block_response(BlockResponse(BlockStatus.OK, 3, b"x" * 100).encode())


@pytest.mark.parametrize("name", list(PARSERS))
@FUZZ
@given(raw=st.binary(max_size=600))
@example(raw=b"")
@example(raw=b"\xff\xfe\x00\x00")
@example(raw=b"EB1\x00\xff\xff\xff\xff\x00\x00\x00\x00")
def test_arbitrary_bytes_raise_only_edge_errors(name: str, raw: bytes):
    only_edge_errors(name, raw)


@pytest.mark.parametrize("name", list(PARSERS))
@FUZZ
@given(tree=json_trees)
def test_arbitrary_json_trees_raise_only_edge_errors(name: str, tree: Any):
    only_edge_errors(name, json.dumps(tree).encode())


@pytest.mark.parametrize("name", JSON_PARSERS)
@FUZZ
@given(data=st.data())
def test_mutated_valid_messages_raise_only_edge_errors(name: str, data):
    only_edge_errors(name, data.draw(mutated_messages(SEEDS[name])))


@pytest.mark.parametrize("name", JSON_PARSERS)
@FUZZ
@given(data=st.data())
def test_damaged_message_bytes_raise_only_edge_errors(name: str, data):
    only_edge_errors(name, data.draw(damaged_bytes(SEEDS[name])))


@pytest.mark.parametrize("name", JSON_PARSERS)
@pytest.mark.parametrize("token", HOSTILE_TOKENS)
def test_hostile_tokens_in_every_field_raise_only_edge_errors(name: str, token: str):
    """The same mutations as above, exhaustively: every hostile token in every field."""
    for path in _field_paths(SEEDS[name]):
        raw = _with_token(SEEDS[name], path, token)
        assert token.encode() in raw or path[:2] == ("statement", "text")
        only_edge_errors(name, raw)


@FUZZ
@given(status=st.integers(0, 255), block=st.integers(0, 2 ** 32 - 1), payload=st.binary(max_size=64),
       length_delta=st.integers(-3, 3))
def test_block_response_headers_raise_only_edge_errors(status: int, block: int, payload: bytes, length_delta: int):
    import struct

    length = max(0, len(payload) + length_delta)
    raw = struct.pack(">3sBII", b"EB1", status, block, length) + payload
    try:
        parsed = BlockResponse.decode(raw, "blocks")
    except EdgeError:
        assert status not in set(BlockStatus) or length != len(payload)
        return
    assert (parsed.status, parsed.block, parsed.payload) == (status, block, payload)


@FUZZ
@given(topic=st.text(max_size=120) | st.builds(lambda mid, leaf: f"edgesdk/v1/plant-7/devices/{mid}/{leaf}",
                                               st.text(max_size=70), st.text(max_size=10))
       | st.builds(lambda mid, name: f"edgesdk/v1/plant-7/devices/{mid}/desired/{name}",
                   st.sampled_from(["cam-01", "", "+", "a/b"]) | st.text(max_size=12), st.text(max_size=70))
       | st.builds(lambda mid: f"edgesdk/v1/plant-7/packages/{mid}/get", st.text(max_size=70)))
@example(topic="edgesdk/v1/plant-7/devices/cam-01/desired/detector")
@example(topic="edgesdk/v1/plant-7/devices/cam-01/desired/a/b")
@example(topic="edgesdk/v1/plant-7/devices/cam-01/desired/")
@example(topic="edgesdk/v1/plant-7/devices/cam-01/desired/+")
def test_topic_parsers_never_raise(topic: str):
    device = parse_device_topic("plant-7", topic)
    if device is not None:
        assert topic.endswith(f"/devices/{device[0]}/{device[1]}") and is_valid_id(device[0])
        leaf, _, name = device[1].partition("/")
        # one level, or `desired/{name}` with a name that is one topic level
        assert "/" not in device[1] or (leaf == "desired" and is_valid_id(name))
    name = parse_desired_name("plant-7", "cam-01", topic)
    assert name is None or (is_valid_id(name) and topic == f"edgesdk/v1/plant-7/devices/cam-01/desired/{name}")
    package = parse_package_get("plant-7", topic)
    assert package is None or "/" not in package
