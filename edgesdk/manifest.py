"""The package manifest (schema v1): what a .edgepkg holds, as records that cross module lines.

The manifest is signed as its exact bytes; `to_bytes` is the one serialisation (sorted keys, UTF-8)
and `Manifest.from_bytes` validates every field it reads, so a malformed manifest fails with one
line naming the field. docs/package-format.md documents every field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from edgesdk.errors import PackageError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
REFERENCE_INPUTS = "reference/inputs.npz"
REFERENCE_OUTPUTS = "reference/outputs.npz"


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
    schema_version: int = SCHEMA_VERSION

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("inputs", "outputs"):
            for spec in data[key]:
                spec["shape"] = list(spec["shape"])
        return data

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackageError(f"{MANIFEST_NAME}: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise PackageError(f"{MANIFEST_NAME}: must be a JSON object")
        version = _get(data, "schema_version", int)
        if version != SCHEMA_VERSION:
            raise PackageError(f"{MANIFEST_NAME}: schema_version {version} is not supported "
                               f"(this edgesdk reads {SCHEMA_VERSION})")
        files = {}
        for path, entry in _get(data, "files", dict).items():
            entry = _expect(entry, dict, f"files[{path!r}]")
            files[path] = FileEntry(_get(entry, "sha256", str, f"files[{path!r}]."),
                                    _get(entry, "size", int, f"files[{path!r}]."))
        variants = []
        vfields = {f.name for f in dataclasses.fields(Variant)}
        for i, v in enumerate(_get(data, "variants", list)):
            v = _expect(v, dict, f"variants[{i}]")
            for key in ("id", "kind", "format", "precision", "runtime", "file"):
                _get(v, key, str, f"variants[{i}].")
            variants.append(Variant(**{k: val for k, val in v.items() if k in vfields}))
        return cls(
            name=_get(data, "name", str), version=_get(data, "version", str),
            target=_get(data, "target", str), source=_get(data, "source", dict),
            inputs=_specs(data, "inputs"), outputs=_specs(data, "outputs"),
            variants=variants, files=files,
            dropped=data.get("dropped", []), skipped=data.get("skipped", []),
            calibration=data.get("calibration", {}), host=data.get("host", {}),
            reference=data.get("reference", {"inputs": REFERENCE_INPUTS, "outputs": REFERENCE_OUTPUTS}),
            created=data.get("created", ""), edgesdk_version=data.get("edgesdk_version", ""),
            architecture=data.get("architecture", "") if isinstance(data.get("architecture", ""), str) else "",
            schema_version=version,
        )

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise PackageError(f"{MANIFEST_NAME}: no variant {variant_id!r}")


def _expect(value: Any, typ: type, where: str) -> Any:
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise PackageError(f"{MANIFEST_NAME}: {where}: expected {typ.__name__}")
    return value


def _get(data: dict, key: str, typ: type, prefix: str = "") -> Any:
    if key not in data:
        raise PackageError(f"{MANIFEST_NAME}: missing field {prefix}{key}")
    return _expect(data[key], typ, prefix + key)


def _specs(data: dict, key: str) -> list[TensorSpec]:
    specs = []
    for i, s in enumerate(_get(data, key, list)):
        s = _expect(s, dict, f"{key}[{i}]")
        shape = _get(s, "shape", list, f"{key}[{i}].")
        specs.append(TensorSpec(_get(s, "name", str, f"{key}[{i}]."), _get(s, "dtype", str, f"{key}[{i}]."),
                                tuple(shape)))
    return specs
