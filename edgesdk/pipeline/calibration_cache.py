"""What the INT8 builds of one package share, so a repair attempt re-quantizes and never recalibrates.

Measured on ppocr-rec (21 MB, 32 samples, 2 cores): a static INT8 build is ~8 s of minmax
calibration (percentile: ~40 s) and ~6 s of quantizing; every repair attempt recalibrated.
Activation ranges depend only on the model given to the calibrator, the calibration method, the
op types calibrated and the samples — not on ``nodes_to_exclude`` or per-channel weights — so they
are computed once per such key and reused by every later attempt. The ranges are kept with
onnxruntime's own cache (``quantize_static(calibration_cache_path=...)``, which stores its
``TensorsData`` as JSON and loads it back with the dtypes intact); the pre-processed model
(``quant_pre_process``, deterministic) is kept beside it.

A cache lives in the run's private temp folder and goes with it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def file_digest(paths: Iterable[Path]) -> str:
    """sha256 over the bytes of ``paths`` in order (a model and its external data)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def samples_digest(samples: Sequence[dict[str, np.ndarray]]) -> str:
    """sha256 over every sample's input names, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for feeds in samples:
        for name in sorted(feeds):
            array = np.ascontiguousarray(feeds[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class QuantCache:
    """Pre-processed models and calibration ranges, keyed by what they depend on."""

    folder: Path
    # what was reused, for the timeline and tests: "preprocess" / "ranges" → hits
    hits: dict[str, int] = field(default_factory=dict)
    _preprocessed: dict[str, tuple[Path | None, tuple[str, ...]]] = field(default_factory=dict)
    _samples: dict[int, tuple[Sequence[dict[str, np.ndarray]], str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    # -- quant_pre_process output -----------------------------------------------------------------
    def preprocessed(self, key: str) -> tuple[Path | None, tuple[str, ...]] | None:
        """The pre-processed model stored under ``key`` (None inside: pre-processing failed, use
        the model as given) and the notes its run wrote; None when nothing is stored."""
        found = self._preprocessed.get(key)
        if found is not None:
            self.hits["preprocess"] = self.hits.get("preprocess", 0) + 1
        return found

    def store_preprocessed(self, key: str, model: Path | None, notes: Sequence[str]) -> Path | None:
        """Keep a copy of ``model`` (a single-file model; None: pre-processing failed) under ``key``."""
        target = None
        if model is not None:
            target = self.folder / f"preprocessed-{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"
            shutil.copyfile(model, target)
        self._preprocessed[key] = (target, tuple(notes))
        return target

    # -- calibration ranges ---------------------------------------------------------------------------
    def ranges_path(self, model_key: str, method: str, op_types: Sequence[str] | None,
                    samples: Sequence[dict[str, np.ndarray]]) -> Path:
        """Where onnxruntime keeps the ranges of this (model, method, op types, samples)."""
        ops = ",".join(sorted(op_types)) if op_types else "default"
        key = hashlib.sha256(f"{model_key}|{method}|{ops}|{self._samples_key(samples)}".encode()).hexdigest()
        path = self.folder / f"ranges-{method}-{key[:32]}.json"
        if path.exists():
            self.hits["ranges"] = self.hits.get("ranges", 0) + 1
        return path

    def _samples_key(self, samples: Sequence[dict[str, np.ndarray]]) -> str:
        # The same list object is passed to every attempt: hash it once (its arrays are not
        # modified in place by the pipeline; a new list is hashed anew).
        known = self._samples.get(id(samples))
        if known is not None and known[0] is samples:
            return known[1]
        digest = samples_digest(samples)
        self._samples[id(samples)] = (samples, digest)
        return digest
