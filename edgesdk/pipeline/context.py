"""What the packaging passes share: the request, the context every pass reads and writes, and the result.

`PackContext` declares every field a pass may set, each with its type and the pass that sets it,
so no state appears outside ``__init__`` and a pass's inputs are readable from the field list.
`PackageRequest` and `PackageResult` are the public API (re-exported by `edgesdk.pipeline.runner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgesdk.manifest import Manifest, TensorSpec, Variant
from edgesdk.pipeline.calibration import DataPlan
from edgesdk.pipeline.calibration_cache import QuantCache
from edgesdk.pipeline.model_io import LoadedModel
from edgesdk.pipeline.progress import PassTime, Reporter
from edgesdk.pipeline.repair import Attempt
from edgesdk.profiles import TargetProfile
from edgesdk.runtime import Session

Feeds = dict[str, np.ndarray]
# The provider each runtime is validated and timed with on the host (the device measures its own).
HOST_PROVIDER = {"onnxruntime": "CPUExecutionProvider", "openvino": "CPU", "litert": "XNNPACK"}


@dataclass(frozen=True)
class PackageRequest:
    """Everything `edgesdk package` was asked to do."""

    model: Path
    target: TargetProfile
    out_dir: Path = Path(".")
    name: str | None = None  # default: the model file's stem
    version: str = "1.0.0"
    calibration: Path | None = None
    validation: Path | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    evaluator: str | None = None  # module:function, see edgesdk.pipeline.evaluation
    labels: Path | None = None
    key_path: Path | None = None  # private key; None: the default key (created on first use)
    strict: bool = False  # any dropped variant fails the run
    bench_runs: int = 30  # host benchmark runs per variant (informational)
    reference_samples: int = 4  # samples shipped for the device's health check
    # ... at least this many when a variant is device-verified: the device applies the accuracy
    # gate on them (cosine, top-1, collapse), which needs more samples than a health check.
    device_reference_samples: int = 16
    synthetic_samples: int = 32
    repair_budget_s: float = 60.0  # time the repair of one failing INT8 variant may take


@dataclass
class PackageResult:
    path: Path
    manifest: Manifest
    key_path: Path
    key_created: bool
    warnings: list[str]
    # Seconds per pass, in order (the manifest's host.packaging holds the same up to signing).
    timeline: list[PassTime] = field(default_factory=list)


@dataclass
class PackContext:
    """The state the passes share. Each field names the pass that sets it; None/empty until then."""

    req: PackageRequest
    reporter: Reporter
    work: Path  # private temp folder of this run; the package is written elsewhere at the end
    # "signing key": the key to sign with when it exists already (None: create the default one)
    key_path: Path | None = None
    key_created: bool = False
    # "load model"
    loaded: LoadedModel | None = None
    # "fix input shapes", then "simplify": the ONNX graph every variant is built from
    model: Any = None  # onnx.ModelProto; None for a .tflite input
    simplify_report: dict[str, Any] = field(default_factory=dict)
    # "calibration data"
    data: DataPlan | None = None
    # "reference outputs"
    reference_path: Path | None = None
    reference: Session | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    reference_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    evaluator: Callable[..., float] | None = None
    evaluator_name: str | None = None
    labels: Any = None
    reference_score: float | None = None
    # "post-processing": nodes every INT8 build keeps in float, as (node, reason)
    post_processing: list[tuple[str, str]] = field(default_factory=list)
    # shared by the INT8 builds and repairs: pre-processed model and calibration ranges
    quant_cache: QuantCache | None = None
    # "variants"
    accepted: list[Attempt] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # runtime → ops it lacks
    # "host benchmark"
    variants: list[Variant] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # path in the package → file here
    # "reference samples"
    reference_count: int = 0
    # "manifest", "sign and write"
    manifest: Manifest | None = None
    out_path: Path | None = None
    # every pass, timed by the runner (and each variant kind, timed inside "variants")
    timeline: list[PassTime] = field(default_factory=list)

    @property
    def profile(self) -> TargetProfile:
        return self.req.target

    @property
    def is_tflite(self) -> bool:
        return self.loaded is not None and self.loaded.format == "tflite"
