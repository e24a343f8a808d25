"""The package manifest (schema v1): what a .edgepkg holds, as records that cross module lines.

The manifest is signed as its exact bytes; `to_bytes` is the one serialisation (sorted keys, UTF-8)
and `Manifest.from_bytes` validates every field it reads, so a malformed manifest fails with one
line naming the field. docs/package-format.md documents every field.

`from_bytes` is a parse boundary: whatever the bytes (not UTF-8, not JSON, nested 100 000 levels,
a 5000-digit number, NaN, a wrong type, a path pointing out of the package), the only exception it
raises is `PackageError`. A signature says who wrote a manifest, not that it is well formed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from edgesdk.errors import PackageError

SCHEMA_VERSION = 1
# The gate thresholds a device-verified variant carries (the names of edgesdk.profiles.Gate's fields).
DEVICE_GATE_KEYS = ("cosine_min", "top1_min", "max_abs_error", "spread_ratio_min")
HOST_VALIDATIONS = ("computed", "weights-only")
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
REFERENCE_INPUTS = "reference/inputs.npz"
REFERENCE_OUTPUTS = "reference/outputs.npz"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a real manifest is a few KiB; the metrics make it grow, not files
MAX_DEPTH = 32  # nesting of any JSON value; real manifests nest 5 deep (variants[].metrics.outputs.x.y)
MAX_FILE_SIZE = 1 << 40  # 1 TiB: a larger declared size is hostile, not a model
MAX_PATH_BYTES = 1024  # under Linux's PATH_MAX with room for the data dir in front
MAX_NAME_BYTES = 255  # one path part: NAME_MAX on ext4/f2fs/tmpfs; longer fails as ENAMETOOLONG
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``shape`` entries are ints or symbolic names (dynamic dims)."""

    name: str
    dtype: str  # numpy dtype name: float32, int64, ...
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Variant:
    """One shipped variant of the model, with what was measured about it on the host."""

    id: str  # unique in the package, e.g. "onnx-int8"
    kind: str  # profile variant kind (edgesdk.profiles.VARIANT_KINDS)
    format: str  # onnx | openvino-ir | tflite
    precision: str  # fp32 | fp16 | int8 | native
    runtime: str  # onnxruntime | openvino | litert
    file: str  # main file, path inside the package
    files: list[str] = field(default_factory=list)  # every file of the variant (IR has .xml + .bin)
    providers: list[str] = field(default_factory=list)  # profile providers that may run it, in order
    runtime_options: dict[str, Any] = field(default_factory=dict)  # e.g. inference_precision_hint
    quantized_nodes: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # per-output accuracy vs fp32 reference
    gate: dict[str, Any] = field(default_factory=dict)  # {"passed": bool, "failures": [...], ...}
    remedies: list[dict[str, Any]] = field(default_factory=list)  # repairs tried and their result
    host_latency_ms: dict[str, Any] | None = None  # {"p50_ms", "p95_ms", ..., "speedup_vs_fp32"}
    health_tolerance: dict[str, float] = field(default_factory=dict)  # {"cosine_min":..,"max_abs":..}
    size: int = 0  # bytes of all its files
    # Device-verified variants (bf16/fp16 compute, whose result depends on the device): the profile's
    # gate for the precision, which the agent applies on the reference data before the variant may
    # compete. Empty: no device gate (host-validated variants, and packages written before it).
    device_gate: dict[str, float] = field(default_factory=dict)  # {"cosine_min", "top1_min", ...}
    # What the host's validation measured: "computed" (it ran the variant's precision) or
    # "weights-only" (the host cannot compute it, e.g. no BF16: it ran the rounded weights in f32).
    host_validation: str = "computed"
    # Nodes an INT8 variant keeps in float on purpose, each {"node": name, "reason": why} (the
    # detection head's post-processing, a repair's sensitive nodes).
    float_nodes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Manifest:
    name: str
    version: str
    target: str
    source: dict[str, Any]  # {"filename", "sha256", "size", "format"}
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variants: list[Variant]
    files: dict[str, FileEntry] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # gate failures {"id","reason",...}
    skipped: list[dict[str, Any]] = field(default_factory=list)  # not applicable {"kind","reason"}
    calibration: dict[str, Any] = field(default_factory=dict)  # {"source","samples","synthetic"}
    host: dict[str, Any] = field(default_factory=dict)  # machine and runtime versions measured on
    reference: dict[str, str] = field(default_factory=lambda: {
        "inputs": REFERENCE_INPUTS, "outputs": REFERENCE_OUTPUTS})
    created: str = ""
    edgesdk_version: str = ""
    architecture: str = ""  # the target's CPU architecture, so a device can refuse a user profile's package
    # Runtime → ids of the variants that need it, written by the packager so a device (or a person
    # reading manifest.json) sees which runtimes to install. Empty (manifests written before it
    # existed): `required_runtimes()` derives it from the variants.
    requires: dict[str, list[str]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("inputs", "outputs"):
            for spec in data[key]:
                spec["shape"] = list(spec["shape"])
        return data

    def to_bytes(self) -> bytes:
        # JSON has no NaN/Infinity and `from_bytes` refuses them; a measurement that came out
        # non-finite (a failed run's speedup, a NaN task score) is written as null instead.
        return (json.dumps(_finite(self.to_dict()), sort_keys=True, indent=1, ensure_ascii=False,
                           allow_nan=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse and validate; any malformed input is a one-line `PackageError`, nothing else."""
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise PackageError(f"{MANIFEST_NAME}: expected bytes, got {type(raw).__name__}")
        if len(raw) > MAX_MANIFEST_BYTES:
            raise PackageError(f"{MANIFEST_NAME}: {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PackageError(f"{MANIFEST_NAME}: not UTF-8 (byte {exc.start})") from None
        try:
            data = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
        except RecursionError:  # the C scanner recurses once per level: 100 000 '[' exhaust the stack
            raise PackageError(f"{MANIFEST_NAME}: nested too deeply (limit {MAX_DEPTH} levels)") from None
        except json.JSONDecodeError as exc:
            raise PackageError(f"{MANIFEST_NAME}: not valid JSON ({exc.msg} at line {exc.lineno} "
                               f"column {exc.colno})") from None
        except ValueError as exc:  # int() refuses > 4300 digits; our hooks raise ValueError too
            raise PackageError(f"{MANIFEST_NAME}: not valid JSON ({_one_line(exc)})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise PackageError(f"{MANIFEST_NAME}: must be a JSON object")
        _check_tree(data, "", 0)
        version = _get(data, "schema_version", int)
        if version != SCHEMA_VERSION:
            raise PackageError(f"{MANIFEST_NAME}: schema_version {version} is not supported "
                               f"(this edgesdk reads {SCHEMA_VERSION})")
        files = {}
        for path, entry in _get(data, "files", dict).items():
            where = f"files[{path!r}]"
            check_package_path(path, where)
            if path in RESERVED_NAMES:
                raise PackageError(f"{MANIFEST_NAME}: {where}: {path} is reserved, not a package file")
            entry = _expect(entry, dict, where)
            digest = _get(entry, "sha256", str, f"{where}.")
            if not _SHA256.fullmatch(digest):
                raise PackageError(f"{MANIFEST_NAME}: {where}.sha256: expected 64 lowercase hex digits")
            files[path] = FileEntry(digest, _size(entry, "size", f"{where}.", required=True))
        _check_no_file_is_a_folder(files)
        variants = [_variant(v, i) for i, v in enumerate(_get(data, "variants", list))]
        ids = [v.id for v in variants]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise PackageError(f"{MANIFEST_NAME}: variants: id {dup!r} appears twice")
        reference = _opt(data, "reference", dict, {"inputs": REFERENCE_INPUTS, "outputs": REFERENCE_OUTPUTS})
        for key in ("inputs", "outputs"):
            check_package_path(_get(reference, key, str, "reference."), f"reference.{key}")
        for key, value in reference.items():
            check_package_path(_expect(value, str, f"reference.{key}"), f"reference.{key}")
        return cls(
            name=_text(data, "name"), version=_text(data, "version"), target=_text(data, "target"),
            source=_get(data, "source", dict),
            inputs=_specs(data, "inputs"), outputs=_specs(data, "outputs"),
            variants=variants, files=files,
            dropped=_records(data, "dropped"), skipped=_records(data, "skipped"),
            calibration=_opt(data, "calibration", dict, {}), host=_opt(data, "host", dict, {}),
            reference=dict(reference),
            created=_opt(data, "created", str, ""), edgesdk_version=_opt(data, "edgesdk_version", str, ""),
            architecture=_opt(data, "architecture", str, ""),
            requires=_requires(data, variants),
            schema_version=version,
        )

    def required_runtimes(self) -> dict[str, list[str]]:
        """Runtime → ids of its variants, in variant order: the `requires` field, or derived when absent."""
        return {r: list(ids) for r, ids in self.requires.items()} if self.requires else runtimes_of(self.variants)

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise PackageError(f"{MANIFEST_NAME}: no variant {variant_id!r}")


# -- paths ----------------------------------------------------------------------------------------
def check_package_path(path: Any, where: str) -> str:
    """A path inside the package: plain relative POSIX, no `..`, `.` or empty parts, no backslash,
    no NUL or control characters, within Linux's name limits. Raises PackageError naming ``where``.

    Every path a manifest names (files, variant files, reference I/O) passes here at parse time, so
    a signed manifest cannot point the agent at /etc/passwd or ../../other-version/model.onnx.
    """
    if not isinstance(path, str):
        raise PackageError(f"{MANIFEST_NAME}: {where}: expected a path string")
    bad = None
    if not path:
        bad = "is empty"
    elif path.startswith("/"):
        bad = "is absolute"
    elif "\\" in path:
        bad = "contains a backslash"  # a `..\\..\\x` path on a Windows host, or a confused tool
    elif any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        bad = "contains a control character"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        bad = "has an empty, `.` or `..` part"
    else:
        encoded = path.encode("utf-8", "surrogatepass")
        if len(encoded) > MAX_PATH_BYTES or any(len(p) > MAX_NAME_BYTES for p in encoded.split(b"/")):
            bad = "is too long"
    if bad:
        raise PackageError(f"{MANIFEST_NAME}: {where}: path {_short(path)} {bad}; "
                           "it must be a plain relative path inside the package")
    return path


def _check_no_file_is_a_folder(files: dict[str, FileEntry]) -> None:
    """`a` and `a/b` cannot both be files: extraction would fail half-way, looking like a disk error."""
    folders = {path.rsplit("/", 1)[0] for path in files if "/" in path}
    folders |= {f.rsplit("/", i)[0] for f in folders for i in range(1, f.count("/") + 1)}
    clash = sorted(folders & files.keys())
    if clash:
        raise PackageError(f"{MANIFEST_NAME}: files[{clash[0]!r}]: is both a file and a folder")


# -- parsing helpers ------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two tools can read a duplicated key differently (first vs last wins): refuse it outright.
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {_short(dup)} appears twice in one object")
    return data


def _check_tree(value: Any, where: str, depth: int) -> None:
    """Bound the nesting of every value and refuse strings that are not valid Unicode."""
    if depth > MAX_DEPTH:
        raise PackageError(f"{MANIFEST_NAME}: {where or 'manifest'}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, float) and not math.isfinite(value):  # from_dict called on a Python dict
        raise PackageError(f"{MANIFEST_NAME}: {where}: {value} is not a JSON number")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PackageError(f"{MANIFEST_NAME}: {where}: keys must be strings")
            _check_text(key, where)
            _check_tree(item, f"{where}.{key}" if where else key, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_tree(item, f"{where}[{i}]", depth + 1)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" is valid JSON but no valid text: it fails later, anywhere
        raise PackageError(f"{MANIFEST_NAME}: {where or 'manifest'}: a string holds an unpaired surrogate") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_TYPE_NAMES = {dict: "object", list: "list", str: "string", int: "integer", float: "number"}


def _expect(value: Any, typ: type | tuple[type, ...], where: str) -> Any:
    types = typ if isinstance(typ, tuple) else (typ,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise PackageError(f"{MANIFEST_NAME}: {where}: expected {names}")
    return value


def _get(data: dict, key: str, typ: type | tuple[type, ...], prefix: str = "") -> Any:
    if key not in data:
        raise PackageError(f"{MANIFEST_NAME}: missing field {prefix}{key}")
    return _expect(data[key], typ, prefix + key)


def _opt(data: dict, key: str, typ: type | tuple[type, ...], default: Any, prefix: str = "") -> Any:
    return default if key not in data else _expect(data[key], typ, prefix + key)


def _text(data: dict, key: str, prefix: str = "") -> str:
    value = _get(data, key, str, prefix)
    if not value:
        raise PackageError(f"{MANIFEST_NAME}: {prefix}{key}: must not be empty")
    return value


def _size(data: dict, key: str, prefix: str, required: bool = False) -> int:
    value = _get(data, key, int, prefix) if required else _opt(data, key, int, 0, prefix)
    if not 0 <= value <= MAX_FILE_SIZE:
        raise PackageError(f"{MANIFEST_NAME}: {prefix}{key}: {value if abs(value) < 10**15 else 'a huge number'} "
                           f"is out of range (0..{MAX_FILE_SIZE})")
    return value


def _records(data: dict, key: str, prefix: str = "") -> list[dict[str, Any]]:
    items = _opt(data, key, list, [], prefix)
    for i, item in enumerate(items):
        _expect(item, dict, f"{prefix}{key}[{i}]")
    return items


def _strings(data: dict, key: str, prefix: str) -> list[str]:
    items = _opt(data, key, list, [], prefix)
    for i, item in enumerate(items):
        _expect(item, str, f"{prefix}{key}[{i}]")
    return items


def _variant(v: Any, i: int) -> Variant:
    where = f"variants[{i}]"
    v = _expect(v, dict, where)
    p = f"{where}."
    files = _strings(v, "files", p)
    for j, path in enumerate(files):
        check_package_path(path, f"{p}files[{j}]")
    tolerance = _opt(v, "health_tolerance", dict, {}, p)
    for key, value in tolerance.items():
        _expect(value, (int, float), f"{p}health_tolerance.{key}")
        if isinstance(value, int) and abs(value) > 2 ** 53:  # float() of a 400-digit int overflows
            raise PackageError(f"{MANIFEST_NAME}: {p}health_tolerance.{key}: number out of range")
    device_gate = _opt(v, "device_gate", dict, {}, p)
    for key, value in device_gate.items():
        if key not in DEVICE_GATE_KEYS:
            raise PackageError(f"{MANIFEST_NAME}: {p}device_gate.{_short(key)}: unknown key "
                               f"(known: {', '.join(DEVICE_GATE_KEYS)})")
        _expect(value, (int, float), f"{p}device_gate.{key}")
        if isinstance(value, bool) or (isinstance(value, int) and abs(value) > 2 ** 53):
            raise PackageError(f"{MANIFEST_NAME}: {p}device_gate.{key}: number out of range")
    host_validation = _opt(v, "host_validation", str, "computed", p)
    if host_validation not in HOST_VALIDATIONS:
        raise PackageError(f"{MANIFEST_NAME}: {p}host_validation: {_short(host_validation)} is not one of "
                           f"{', '.join(HOST_VALIDATIONS)}")
    quantized = _opt(v, "quantized_nodes", int, 0, p)
    if quantized < 0:
        raise PackageError(f"{MANIFEST_NAME}: {p}quantized_nodes: must not be negative")
    host_latency = v.get("host_latency_ms")
    if host_latency is not None:
        _expect(host_latency, dict, f"{p}host_latency_ms")
    return Variant(
        id=_text(v, "id", p), kind=_get(v, "kind", str, p), format=_get(v, "format", str, p),
        precision=_get(v, "precision", str, p), runtime=_get(v, "runtime", str, p),
        file=check_package_path(_get(v, "file", str, p), f"{p}file"), files=files,
        providers=_strings(v, "providers", p), runtime_options=_opt(v, "runtime_options", dict, {}, p),
        quantized_nodes=quantized, metrics=_opt(v, "metrics", dict, {}, p), gate=_opt(v, "gate", dict, {}, p),
        remedies=_records(v, "remedies", p), host_latency_ms=host_latency,
        health_tolerance={k: float(x) for k, x in tolerance.items()}, size=_size(v, "size", p),
        device_gate={k: float(x) for k, x in device_gate.items()}, host_validation=host_validation,
        float_nodes=_records(v, "float_nodes", p),
    )


def runtimes_of(variants: list[Variant]) -> dict[str, list[str]]:
    """Runtime → ids of the variants it runs, in variant order (what the packager writes as `requires`)."""
    found: dict[str, list[str]] = {}
    for v in variants:
        found.setdefault(v.runtime, []).append(v.id)
    return found


def _requires(data: dict, variants: list[Variant]) -> dict[str, list[str]]:
    """`requires` must agree with the variants: every variant under its own runtime, once, no other ids.

    A manifest whose `requires` hides a runtime would have a device install too little; one naming a
    variant that does not exist is not what the packager wrote.
    """
    raw = _opt(data, "requires", dict, {})
    if not raw:
        return {}
    runtime_of = {v.id: v.runtime for v in variants}
    seen: set[str] = set()
    requires = {}
    for runtime, ids in raw.items():
        where = f"requires.{runtime}"
        ids = _expect(ids, list, where)
        if not ids:
            raise PackageError(f"{MANIFEST_NAME}: {where}: names no variant")
        for j, vid in enumerate(ids):
            _expect(vid, str, f"{where}[{j}]")
            if vid not in runtime_of:
                raise PackageError(f"{MANIFEST_NAME}: {where}[{j}]: no variant {_short(vid)}")
            if runtime_of[vid] != runtime:
                raise PackageError(f"{MANIFEST_NAME}: {where}[{j}]: variant {_short(vid)} runs on "
                                   f"{runtime_of[vid]}, not {runtime}")
            if vid in seen:
                raise PackageError(f"{MANIFEST_NAME}: {where}[{j}]: variant {_short(vid)} is listed twice")
            seen.add(vid)
        requires[runtime] = list(ids)
    left_out = [v.id for v in variants if v.id not in seen]
    if left_out:
        raise PackageError(f"{MANIFEST_NAME}: requires: leaves out variant {_short(left_out[0])} "
                           f"({runtime_of[left_out[0]]})")
    return requires


def _specs(data: dict, key: str) -> list[TensorSpec]:
    specs = []
    for i, s in enumerate(_get(data, key, list)):
        where = f"{key}[{i}]"
        s = _expect(s, dict, where)
        shape = _get(s, "shape", list, f"{where}.")
        for j, dim in enumerate(shape):
            _expect(dim, (int, str), f"{where}.shape[{j}]")
            if isinstance(dim, int) and not -1 <= dim <= MAX_FILE_SIZE:  # ONNX writes -1 for "unknown"
                raise PackageError(f"{MANIFEST_NAME}: {where}.shape[{j}]: dimension out of range")
        specs.append(TensorSpec(_get(s, "name", str, f"{where}."), _get(s, "dtype", str, f"{where}."),
                                tuple(shape)))
    return specs
