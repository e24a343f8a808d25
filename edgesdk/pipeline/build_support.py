"""What the ONNX, OpenVINO and LiteRT variant builders share: config fields, sample checks and
the staging of output files.

A builder writes into a hidden work folder inside ``out_dir`` (``work_dir``) and moves finished
files out with ``publish`` only on success, so a failed build leaves nothing a reader could take for
a variant. Kept apart from the builder modules so none of them imports another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgesdk.atomicfile import fsync_dir
from edgesdk.errors import CalibrationDataError, ConfigError
from edgesdk.profiles import VARIANT_OPTIONS

Samples = list[dict[str, np.ndarray]]
PROTO_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, less headroom: larger models use external data


# --------------------------------------------------------------------------- configs


def param(default: Any, help: str) -> Any:  # noqa: A002 - mirrors Olive's PassConfigParam wording
    """A config field with its default and a one-line description (read by docs and the CLI)."""
    return field(default=default, metadata={"help": help})


def config_from_options(config_cls: type, kind: str, options: dict[str, Any]) -> Any:
    """Build a builder config from a profile's ``variants[].options``.

    Options the profile schema allows but this config does not declare are consumed by other
    passes (``max_float_nodes`` drives the INT8 repair step) and are ignored here.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(options) - set(VARIANT_OPTIONS.get(kind, {})) - names
    if unknown:
        raise ConfigError(f"{kind}: unknown option(s) {', '.join(sorted(unknown))}")
    return config_cls(**{k: v for k, v in options.items() if k in names})


# --------------------------------------------------------------------------- samples


def real_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def check_samples(model: onnx.ModelProto, samples: Samples, kind: str) -> None:
    """Samples must be a non-empty list of feed dicts naming exactly the model's inputs, each
    array with the input's dtype and rank (a wrong one fails deep in calibration otherwise)."""
    if not samples:
        raise CalibrationDataError(f"{kind}: no calibration samples given")
    names = real_inputs(model)
    specs = {i.name: i.type.tensor_type for i in model.graph.input if i.name in names}
    for i, feeds in enumerate(samples):
        if not isinstance(feeds, dict) or set(feeds) != set(names):
            got = sorted(feeds) if isinstance(feeds, dict) else type(feeds).__name__
            raise CalibrationDataError(f"{kind}: sample {i} has inputs {got}, the model expects {sorted(names)}")
        for name, array in feeds.items():
            spec = specs[name]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.elem_type) if spec.elem_type else None
            if dtype is not None and np.asarray(array).dtype != dtype:
                raise CalibrationDataError(f"{kind}: sample {i} input {name!r} is "
                                           f"{np.asarray(array).dtype}, the model expects {dtype}")
            if spec.HasField("shape") and np.ndim(array) != len(spec.shape.dim):
                raise CalibrationDataError(f"{kind}: sample {i} input {name!r} has rank {np.ndim(array)}, "
                                           f"the model expects {len(spec.shape.dim)}")


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def work_dir(out_dir: Path, kind: str) -> Iterator[Path]:
    """A hidden scratch folder inside ``out_dir`` (same filesystem, so publishing is a rename),
    removed on exit whatever happens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{kind}-work-") as tmp:
        yield Path(tmp)


def publish(staged: list[Path], out_dir: Path) -> list[Path]:
    """Move finished files from the work folder into ``out_dir`` (rename each, then fsync)."""
    final = []
    for path in staged:
        target = out_dir / path.name
        os.replace(path, target)
        final.append(target)
    fsync_dir(out_dir)
    return final


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save a model; over protobuf's 2 GiB limit its tensors go to ``{name}.data`` beside it."""
    if model.ByteSize() > PROTO_LIMIT:
        onnx.save_model(model, path, save_as_external_data=True, location=f"{path.name}.data")
        return [path, path.with_name(f"{path.name}.data")]
    onnx.save_model(model, path)
    return [path]


def staged_files(main: Path) -> list[Path]:
    """``main`` and the files written beside it under its name (external data), main first."""
    extra = sorted(p for p in main.parent.iterdir() if p.name.startswith(main.name) and p != main)
    return [main, *extra]
