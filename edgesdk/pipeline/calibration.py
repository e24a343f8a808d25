"""Calibration and validation data: load it from .npz/.npy files, or make synthetic inputs.

File format (docs/CONTRACTS.md): an .npz keyed by input name; each array stacks the samples on a
new leading axis, N × the input's own shape (input 1×3×224×224 → array N×1×3×224×224). A .npy
holds that one array for a single-input model. A folder means all its *.npz/*.npy, sorted by name.
Symbolic dims of the model match any size; fixed dims must match exactly.

Synthetic inputs, when no data is given (the report is then marked synthetic):
  - float inputs: standard normal; image-like ones (rank 4, 1/3/4 channels first or last) uniform
    in [0, 1), the range most image models were trained on.
  - integer inputs: uniform in 0..255 (token ids, byte values), clipped to the dtype's range;
    bool inputs: fair coin flips.
  - dynamic dims: the first dim is the batch and gets 1; the spatial dims of an image-like input
    get 224 (a multiple of 32, which detectors with stride-32 heads need); any other gets 32.
    One symbolic name gets one value across all inputs (e.g. "seq" of input_ids and mask).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesdk.atomicfile import atomic_writer
from edgesdk.errors import CalibrationDataError, ConfigError, first_line
from edgesdk.manifest import TensorSpec

Feeds = dict[str, np.ndarray]

SYNTHETIC_BATCH = 1
SYNTHETIC_IMAGE_SIZE = 224
SYNTHETIC_OTHER_DIM = 32
_INT_HIGH = 256  # integer inputs are drawn from [0, 256)
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"


# -- loading ---------------------------------------------------------------------------------------

def load_samples(path: str | Path, inputs: list[TensorSpec]) -> list[Feeds]:
    """Read samples from an .npz/.npy file or a folder of them, checked against the model inputs."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".npz", ".npy"))
        if not files:
            raise CalibrationDataError(f"{path}: folder holds no .npz or .npy files")
        samples: list[Feeds] = []
        for file in files:
            samples.extend(_load_file(file, inputs))
        return samples
    if not path.exists():
        raise CalibrationDataError(f"{path}: calibration/validation data not found")
    return _load_file(path, inputs)


def _load_file(path: Path, inputs: list[TensorSpec]) -> list[Feeds]:
    arrays = _read_arrays(path, inputs)
    names = [spec.name for spec in inputs]
    unknown = [k for k in arrays if k not in names]
    missing = [n for n in names if n not in arrays]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown input name(s) {', '.join(map(repr, unknown))}")
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        raise CalibrationDataError(f"{path}: {'; '.join(parts)} (model inputs: {', '.join(names)})")

    counts: dict[str, int] = {}
    checked: dict[str, np.ndarray] = {}
    for spec in inputs:
        array = arrays[spec.name]
        _check_shape(path, spec, array)
        checked[spec.name] = _cast(path, spec, array)
        counts[spec.name] = array.shape[0]
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise CalibrationDataError(f"{path}: inputs hold different numbers of samples ({detail})")
    n = next(iter(counts.values()), 0)
    if n == 0:
        raise CalibrationDataError(f"{path}: holds no samples (N = 0 on the leading axis)")
    # array[i, ...], not array[i]: a scalar input (silero-vad's `sr`) must stay a 0-d array;
    # a numpy scalar makes quantize_static fail ("Unable to handle object of type numpy.int64").
    return [{name: array[i, ...] for name, array in checked.items()} for i in range(n)]


def _read_arrays(path: Path, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise CalibrationDataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        if magic.startswith(_ZIP_MAGIC):
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        if magic == _NPY_MAGIC:
            if len(inputs) != 1:
                raise CalibrationDataError(
                    f"{path}: a .npy file can feed only a single-input model; this one has inputs "
                    f"{', '.join(s.name for s in inputs)} (use an .npz keyed by input name)")
            return {inputs[0].name: np.load(path, allow_pickle=False)}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz/.npy file ({first_line(exc)})") from None
    raise CalibrationDataError(f"{path}: not an .npz or .npy file")


def _check_shape(path: Path, spec: TensorSpec, array: np.ndarray) -> None:
    expected = "×".join(["N", *map(str, spec.shape)])
    got = "×".join(map(str, array.shape))
    if array.ndim != len(spec.shape) + 1:
        hint = " (samples are stacked on a new leading axis)" if array.ndim == len(spec.shape) else ""
        raise CalibrationDataError(f"{path}: input '{spec.name}': expected shape {expected}, got {got}{hint}")
    for want, have in zip(spec.shape, array.shape[1:]):
        if isinstance(want, int) and want != have:
            raise CalibrationDataError(f"{path}: input '{spec.name}': expected shape {expected}, got {got}")


def _cast(path: Path, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """The array in the input's dtype when the cast loses nothing that matters, else an error."""
    where = f"{path}: input '{spec.name}'"
    try:
        target = np.dtype(spec.dtype)
    except TypeError:
        raise CalibrationDataError(f"{where}: the model's dtype {spec.dtype} is not supported") from None
    src = array.dtype
    if src == target:
        return np.ascontiguousarray(array)
    bad = f"{where}: {src.name} data cannot feed an input of dtype {target.name}"
    if target.kind == "f":  # ints and bools widen to float; float64 → float32 only rounds
        if src.kind not in "biuf":
            raise CalibrationDataError(bad)
        return array.astype(target)
    if target.kind in "iu":
        if src.kind not in "biuf":
            raise CalibrationDataError(bad)
        if array.size and src.kind == "f":
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise CalibrationDataError(f"{bad} (it has non-integer values)")
        if array.size and src.kind != "b":
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise CalibrationDataError(f"{bad} (values outside {info.min}..{info.max})")
        return array.astype(target)
    if target.kind == "b":
        if src.kind in "iuf" and array.size and not np.all((array == 0) | (array == 1)):
            raise CalibrationDataError(f"{bad} (values other than 0 and 1)")
        if src.kind not in "biuf":
            raise CalibrationDataError(bad)
        return array.astype(bool)
    if target.kind in "UO" and src.kind == "U":
        return array
    raise CalibrationDataError(bad)


def save_samples(samples: list[Feeds], path: str | Path) -> None:
    """Write samples in the .npz format `load_samples` reads (per input: N × the input's shape)."""
    if not samples:
        raise CalibrationDataError(f"{path}: no samples to write")
    stacked = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
    with atomic_writer(path) as handle:
        np.savez(handle, **stacked)


# -- synthetic -------------------------------------------------------------------------------------

def synthetic_shape(spec: TensorSpec, params: dict[str, int] | None = None,
                    other_dim: int = SYNTHETIC_OTHER_DIM) -> tuple[int, ...]:
    """Concrete shape for a synthetic sample of ``spec`` (rules in the module docstring)."""
    params = {} if params is None else params
    image = _image_like(spec)
    shape = []
    for i, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        if dim != "?" and dim in params:
            shape.append(params[dim])
            continue
        if i == 0:
            size = SYNTHETIC_BATCH
        elif image and i in image:
            size = SYNTHETIC_IMAGE_SIZE
        else:
            size = other_dim
        if dim != "?":
            params[dim] = size
        shape.append(size)
    return tuple(shape)


def _image_like(spec: TensorSpec) -> tuple[int, ...]:
    """The spatial dim indices of a float NCHW/NHWC image input; () when it is not one."""
    if len(spec.shape) != 4 or not spec.dtype.startswith(("float", "bfloat")):
        return ()
    if spec.shape[1] in (1, 3, 4):
        return (2, 3)
    if spec.shape[3] in (1, 3, 4):
        return (1, 2)
    return ()


def synthetic_samples(inputs: list[TensorSpec], n: int, seed: int = 0,
                      shapes_override: dict[str, tuple[int, ...]] | None = None,
                      other_dim: int = SYNTHETIC_OTHER_DIM) -> list[Feeds]:
    """``n`` random samples for the inputs; ``shapes_override`` gives an input's exact shape,
    ``other_dim`` the size of dynamic dims that are neither batch nor image height/width."""
    if n < 1:
        raise ConfigError(f"number of synthetic samples must be ≥ 1, got {n}")
    overrides = shapes_override or {}
    params: dict[str, int] = {}
    shapes = {spec.name: tuple(overrides[spec.name]) if spec.name in overrides else
              synthetic_shape(spec, params, other_dim) for spec in inputs}
    rng = np.random.default_rng(seed)
    return [{spec.name: _random(rng, spec, shapes[spec.name]) for spec in inputs} for _ in range(n)]


def _random(rng: np.random.Generator, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    try:
        dtype = np.dtype(spec.dtype)
    except TypeError:
        raise CalibrationDataError(f"input '{spec.name}': cannot make synthetic {spec.dtype} data; "
                                   "pass calibration data") from None
    if dtype.kind == "f":
        if _image_like(spec):
            return rng.random(shape, dtype=np.float32).astype(dtype)
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    if dtype.kind in "iu":
        high = min(_INT_HIGH, int(np.iinfo(dtype).max) + 1)
        return rng.integers(0, high, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    raise CalibrationDataError(f"input '{spec.name}': cannot make synthetic {spec.dtype} data; "
                               "pass calibration data")


# -- planning --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataPlan:
    """The samples the pipeline calibrates and validates with, and where they came from."""

    calibration: list[Feeds]
    validation: list[Feeds]
    source: str  # "file" (both given) | "split" (validation held out of calibration) | "synthetic"
    synthetic: bool  # True when any of the two sets is synthetic: metrics are then not representative
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """The manifest's `calibration` record."""
        return {"source": self.source, "samples": len(self.calibration),
                "validation_samples": len(self.validation), "synthetic": self.synthetic,
                "notes": list(self.notes)}


def plan_data(inputs: list[TensorSpec], calibration_path: str | Path | None = None,
              validation_path: str | Path | None = None, n_synthetic: int = 32,
              holdout: float = 0.25, seed: int = 0, max_calibration: int = 256) -> DataPlan:
    """Choose calibration and validation samples: given files, a held-out split, or synthetic."""
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
    if max_calibration < 1:
        raise ConfigError(f"max_calibration must be ≥ 1, got {max_calibration}")
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    synthetic_note = (f"no {{what}} data given: using {n_synthetic} synthetic random inputs; "
                      "{effect} (pass real data for representative results)")
    if validation_path is not None:
        validation = load_samples(validation_path, inputs)
        if calibration_path is not None:
            calibration, source, synthetic = load_samples(calibration_path, inputs), "file", False
        else:
            calibration, source, synthetic = synthetic_samples(inputs, n_synthetic, seed), "file", True
            notes.append(synthetic_note.format(what="calibration",
                                               effect="int8 ranges come from random inputs"))
    elif calibration_path is not None:
        samples = load_samples(calibration_path, inputs)
        source, synthetic = "split", False
        if len(samples) == 1:
            calibration = validation = samples
            notes.append("only one sample given: it is used for both calibration and validation")
        else:
            # Shuffled, so a folder sorted by class does not put one class in validation only.
            order = rng.permutation(len(samples))
            n_val = min(max(1, round(len(samples) * holdout)), len(samples) - 1)
            validation = [samples[i] for i in order[:n_val]]
            calibration = [samples[i] for i in order[n_val:]]
            notes.append(f"validation: {n_val} of {len(samples)} samples held out of the calibration data")
    else:
        calibration = synthetic_samples(inputs, n_synthetic, seed)
        validation = synthetic_samples(inputs, n_synthetic, seed + 1)
        source, synthetic = "synthetic", True
        notes.append(synthetic_note.format(what="calibration or validation",
                                           effect="int8 ranges and accuracy metrics are not representative"))
    if len(calibration) > max_calibration:
        keep = sorted(rng.choice(len(calibration), size=max_calibration, replace=False))
        notes.append(f"calibration: {max_calibration} of {len(calibration)} samples used (random subset)")
        calibration = [calibration[i] for i in keep]
    return DataPlan(calibration, validation, source, synthetic, notes)


