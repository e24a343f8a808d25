"""Fuzzing every parser that reads package bytes: no input may raise anything but an EdgeError.

Manifest.from_bytes gets arbitrary bytes, arbitrary JSON trees and mutations of a valid manifest;
the package reader gets mutated tar bytes of a tiny real signed package; the telemetry spool and
the latency recorder get arbitrary state files. Each property runs ~200 examples, no deadline.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.spool import STATE_NAME, TelemetrySpool
from agent.telemetry import LatencyRecorder, ProcessStats
from edgesdk.errors import EdgeError, PackageError
from edgesdk.manifest import FileEntry, Manifest, TensorSpec, Variant, check_package_path
from edgesdk.package import check_files, extract_package, open_package, write_package
from edgesdk.signing import generate_keys, load_private_key, load_public_key

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = "variants/onnx-fp32/model.onnx"


def tiny_manifest() -> Manifest:
    return Manifest(
        name="tiny", version="1.0.0", target="x86-64-cpu",
        source={"filename": "tiny.onnx", "sha256": "0" * 64, "size": 10, "format": "onnx"},
        inputs=[TensorSpec("x", "float32", ("batch", 4))], outputs=[TensorSpec("y", "float32", ("batch", 2))],
        variants=[Variant(id="onnx-fp32", kind="onnx-fp32", format="onnx", precision="fp32",
                          runtime="onnxruntime", file=MODEL, files=[MODEL], providers=["CPUExecutionProvider"],
                          health_tolerance={"cosine_min": 0.99}, metrics={"outputs": {"y": {"cosine": 1.0}}},
                          size=64)],
        files={MODEL: FileEntry("0" * 64, 64)},
    )


VALID = tiny_manifest().to_dict()


def assert_parses_or_package_error(raw: bytes) -> None:
    try:
        manifest = Manifest.from_bytes(raw)
    except PackageError as exc:
        assert "\n" not in str(exc)
        return
    # Whatever parsed is safe to use: every path it names stays inside the package.
    for path in [*manifest.files, *manifest.reference.values(),
                 *(p for v in manifest.variants for p in (v.file, *v.files))]:
        check_package_path(path, "fuzz")
    manifest.to_bytes()  # and it can be written back (no NaN, no surrogates)


# -- the manifest -----------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=2048))
@example(b"[" * 100_000)
@example(b'{"schema_version": ' + b"9" * 5000 + b"}")
@example(b"\xff\xfe{}")
@example(b'{"schema_version": 1, "files": {"a": {"size": NaN}}}')
def test_arbitrary_bytes_never_raise_anything_but_package_error(raw: bytes) -> None:
    assert_parses_or_package_error(raw)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30)


@FUZZ
@given(JSON)
def test_arbitrary_json_tree_never_raises_anything_but_package_error(tree: Any) -> None:
    assert_parses_or_package_error(json.dumps(tree).encode())
    try:  # from_dict is public too, and gets Python objects (NaN floats included)
        Manifest.from_dict(tree)
    except PackageError:
        pass


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, prefix + (i,))
    return found


ALL_PATHS = _paths(VALID)[1:]
HOSTILE_VALUES = st.sampled_from(["/etc/passwd", "../x", "a/../../b", "a\\b", "a\x00b", "", "\ud800", -1,
                                  10 ** 400, 2 ** 63, True, None, [], {}, "x" * 300, 1e308])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), st.one_of(JSON, HOSTILE_VALUES),
                          st.booleans()), min_size=1, max_size=4))
def test_mutated_valid_manifest_never_raises_anything_but_package_error(edits: list) -> None:
    data = json.loads(json.dumps(VALID))
    for path, value, delete in edits:
        node = data
        try:
            for step in path[:-1]:
                node = node[step]
            if delete:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced the parent
    raw = json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert_parses_or_package_error(raw)


# -- the package reader ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    tmp = tmp_path_factory.mktemp("fuzz-package")
    pair = generate_keys(tmp / "keys")
    (tmp / "model.onnx").write_bytes(bytes(range(64)))
    (tmp / "in.npz").write_bytes(b"reference inputs")
    manifest = tiny_manifest()
    pkg = write_package(tmp / "tiny.edgepkg", manifest,
                        {MODEL: tmp / "model.onnx", "reference/inputs.npz": tmp / "in.npz"},
                        load_private_key(pair.private_path))
    return pkg.read_bytes(), load_public_key(pair.public_path)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete"]),
                               st.integers(min_value=0), st.binary(min_size=1, max_size=16)),
                     min_size=1, max_size=6)


def mutate(raw: bytes, mutations: list, rng_seed: int) -> bytes:
    data = bytearray(raw)
    rng = random.Random(rng_seed)
    for op, where, blob in mutations:
        if not data:
            break
        # Half the edits land in the first 3 KiB: the tar headers, the manifest and the signature.
        i = where % (min(len(data), 3072) if rng.random() < 0.5 else len(data))
        if op == "flip":
            data[i] ^= 1 << (where % 8)
        elif op == "set":
            data[i:i + len(blob)] = blob
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = blob
        else:
            del data[i:i + len(blob)]
    return bytes(data)


@FUZZ
@given(MUTATIONS, st.integers(min_value=0, max_value=2 ** 32))
def test_mutated_package_never_raises_anything_but_edge_error(signed_package, mutations: list, seed: int) -> None:
    raw, public = signed_package
    mutated = mutate(raw, mutations, seed)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "mutated.edgepkg"
        pkg.write_bytes(mutated)
        try:  # unsigned reading parses whatever manifest is there
            with open_package(pkg) as opened:
                check_files(opened)
        except EdgeError as exc:
            assert "\n" not in str(exc)
        dest = Path(tmp) / "dest"
        try:
            extract_package(pkg, dest, [public])
        except EdgeError:
            assert not dest.exists() and not dest.with_name("dest.partial").exists()
        else:  # only a mutation the signature and every sha256 still vouch for extracts
            assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == sorted(
                ["manifest.json", "manifest.sig", "model.onnx", "inputs.npz"])


# -- the telemetry spool and the recorder's state ---------------------------------------------------
@FUZZ
@given(st.binary(max_size=512), st.dictionaries(
    st.from_regex(r"[0-9]{20}\.json|\.x\.tmp|[a-z]{1,8}", fullmatch=True), st.binary(max_size=64), max_size=4))
@example(b"[" * 100_000, {})
@example(b'{"dropped": ' + b"9" * 5000 + b"}", {})
@example(b'{"dropped": 1e999}', {})
def test_spool_state_and_records_never_raise_anything_but_edge_error(state: bytes, entries: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / STATE_NAME).write_bytes(state)
        for name, payload in entries.items():
            (folder / name).write_bytes(payload)
        try:
            spool = TelemetrySpool(folder)
        except EdgeError as exc:
            assert "\n" not in str(exc)
            return
        for seq in spool.pending():
            assert spool.read(seq) == entries[f"{seq:020d}.json"]
        spool.append((spool.newest_seq() or 0) + 1, b"{}")


@FUZZ
@given(st.binary(max_size=512))
@example(b"[" * 100_000)
@example(b'{"next_seq": ' + b"9" * 4000 + b"}")
@example(b'{"next_seq": 18446744073709551616}')
def test_recorder_state_never_raises_anything_but_edge_error(state: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.json"
        path.write_bytes(state)
        try:
            recorder = LatencyRecorder(path, probe=lambda: ProcessStats(None, None))
        except EdgeError as exc:
            assert "\n" not in str(exc)
            return
        assert 0 <= recorder.next_seq < 2 ** 63
