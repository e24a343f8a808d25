"""`edgesdk package`: load → fix shapes → simplify → build variants → validate (with repair) →
host benchmark → sign and write one .edgepkg. The profile decides which variants are built.

Everything is built in a private temp folder; the package is written atomically at the end, so a
failed run leaves nothing behind in the output folder.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgesdk import __version__
from edgesdk.benchmark import time_interleaved
from edgesdk.errors import (ConfigError, GateFailedError, ModelError, PackagingError, RuntimeUnavailableError,
                            UnsupportedModelError)
from edgesdk.manifest import DEVICE_GATE_KEYS, Manifest, TensorSpec, Variant, runtimes_of
from edgesdk.package import package_filename, write_package
from edgesdk.pipeline import calibration, evaluation
from edgesdk.pipeline.model_io import (LoadedModel, load_model, model_inputs, ops_unsupported,
                                       require_runtime_support, save_model)
from edgesdk.pipeline.progress import Reporter, SilentReporter
from edgesdk.pipeline.repair import Attempt, repair_int8
from edgesdk.pipeline.shapes import fix_input_shapes
from edgesdk.pipeline.simplify import simplify
from edgesdk.pipeline.variant_build import VariantNotApplicable, build_variant
from edgesdk.profiles import VARIANT_KINDS, TargetProfile, VariantSpec
from edgesdk.runtime import Session, open_session, openvino_computes, runtime_versions
from edgesdk.signing import PRIVATE_NAME, default_key_dir, generate_keys, load_private_key
from edgesdk.validation import compare_outputs, evaluate_gate, health_tolerance

# The provider each runtime is validated and timed with on the host (the device measures its own).
HOST_PROVIDER = {"onnxruntime": "CPUExecutionProvider", "openvino": "CPU", "litert": "XNNPACK"}
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


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


def _existing_key(req: PackageRequest, reporter: Reporter) -> Path | None:
    """The key to sign with, loaded now so a bad key fails before any work; None: the default key
    does not exist yet (it is created only when there is a package to sign)."""
    if req.key_path is not None:
        load_private_key(req.key_path)
        return req.key_path
    path = default_key_dir() / PRIVATE_NAME
    if path.exists():
        reporter.info(f"signing with the default key {path}")
        load_private_key(path)
        return path
    return None


def _create_default_key(reporter: Reporter) -> Path:
    pair = generate_keys(default_key_dir())
    reporter.warn(f"no --key given: created a signing key at {pair.private_path} (public: {pair.public_path}); "
                  "give the public key to your devices")
    return pair.private_path


def _run_all(session: Session, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    outputs = []
    for feeds in samples:
        result = session.run(feeds)
        for name, value in result.items():
            if not isinstance(value, np.ndarray):
                raise UnsupportedModelError(
                    f"output {name!r} is a {type(value).__name__}, not a tensor (a ZipMap or sequence output? "
                    "convert scikit-learn models with zipmap=False)")
        outputs.append(result)
    return outputs


class _Pipeline:
    def __init__(self, req: PackageRequest, reporter: Reporter, work: Path) -> None:
        self.req, self.reporter, self.work = req, reporter, work
        self.profile = req.target
        self.skipped: list[dict] = []
        self.dropped: list[dict] = []
        self._unsupported: dict[str, list[str]] = {}

    # -- data and reference ----------------------------------------------------------------------
    def prepare(self, loaded: LoadedModel) -> None:
        r = self.reporter
        self.loaded = loaded
        if loaded.format == "tflite":
            self.model = None
            self.reference_path = loaded.path
            inputs = list(loaded.inputs)
        else:
            r.begin("fix input shapes")
            model = fix_input_shapes(loaded.model, self.req.input_shapes, self.profile.shapes.policy,
                                     self.profile.shapes.batch)
            inputs = model_inputs(model)
            r.end("fix input shapes", self.profile.shapes.policy)
        r.begin("calibration data")
        self.data = calibration.plan_data(inputs, self.req.calibration, self.req.validation,
                                          n_synthetic=self.req.synthetic_samples)
        if self.data.synthetic:
            r.warn("SYNTHETIC inputs in use: " + " ".join(self.data.notes) + " INT8 variants calibrated on random "
                   "data are often wrong and the metrics say little; pass --calibration with real samples.")
        r.end("calibration data", f"{len(self.data.calibration)} calibration, {len(self.data.validation)} "
                                  f"validation samples ({self.data.source})")
        if loaded.format != "tflite":
            r.begin("simplify")
            self.model, self.simplify_report = simplify(model, sample=self.data.calibration[0])
            r.end("simplify", _simplify_detail(self.simplify_report))
            self.reference_path = self.work / "reference.onnx"
            save_model(self.model, self.reference_path)
        ref_runtime = "litert" if loaded.format == "tflite" else "onnxruntime"
        try:
            self.reference = open_session(self.reference_path, ref_runtime, HOST_PROVIDER[ref_runtime])
        except RuntimeUnavailableError as exc:
            raise PackagingError(f"cannot run the reference model on this host: {exc}") from None
        except ModelError:
            # An op the runtime has no kernel for (a custom domain op): name it, not the temp file.
            if loaded.format == "onnx" and ops_unsupported(loaded, ref_runtime):
                require_runtime_support(loaded, ref_runtime)
            raise
        self.inputs: list[TensorSpec] = list(self.reference.inputs)
        r.begin("reference outputs")
        self.reference_outputs = _run_all(self.reference, self.data.validation)
        r.end("reference outputs")
        self._prepare_task_metric()

    def _prepare_task_metric(self) -> None:
        req = self.req
        self.evaluator = None
        self.labels = None
        if req.labels is not None:
            if req.validation is None:
                raise ConfigError("--labels needs --validation: the labels must match the validation samples in order")
            self.labels = evaluation.load_labels(req.labels, len(self.data.validation))
        if req.evaluator:
            self.evaluator = evaluation.load_evaluator(req.evaluator)
            self.evaluator_name = req.evaluator
        elif self.labels is not None:
            self_metrics = compare_outputs(self.reference_outputs, self.reference_outputs)
            class_like = [name for name, m in self_metrics.items() if m.class_like]
            if not class_like:
                raise ConfigError("--labels needs a class-like output (N × classes) or an --evaluator")
            self.evaluator = evaluation.top1_accuracy(class_like[0])
            self.evaluator_name = f"top-1 accuracy of '{class_like[0]}' on --labels"
        self.reference_score = None
        if self.evaluator is not None:
            self.reference_score = evaluation.evaluate_safely(self.evaluator, self.reference_outputs, self.labels,
                                                              self.evaluator_name)
            self.reporter.info(f"reference (fp32) task metric: {self.reference_score:.4f}")

    # -- variants --------------------------------------------------------------------------------
    def _skip_reason(self, spec: VariantSpec) -> str | None:
        info = spec.info
        if self.loaded.format == "tflite":
            return None if spec.kind == "tflite" else "input is a .tflite model: only the LiteRT pass-through applies"
        if spec.kind == "tflite":
            return "no .tflite input (LiteRT variants are passed through, not converted)"
        if info.runtime not in self._unsupported:
            self._unsupported[info.runtime] = ops_unsupported(self.loaded, info.runtime)
        if self._unsupported[info.runtime]:
            return f"ops {', '.join(self._unsupported[info.runtime])} cannot run on {info.runtime}"
        return None

    def validate(self, attempt: Attempt) -> Attempt:
        """Run a built variant on the validation samples and gate it against the reference.

        A device-verified variant whose precision this host cannot compute (bf16 without
        AVX512-BF16) is run with its rounded weights in f32: that catches what the weights lose,
        and the device applies the gate to what it computes (``host_validation: weights-only``).
        """
        built = attempt.built
        provider = HOST_PROVIDER[built.runtime]
        options = dict(built.runtime_options)
        hint = options.get("inference_precision_hint")
        attempt.host_validation = "computed"
        if built.runtime == "openvino" and hint and not openvino_computes(provider, hint):
            options["inference_precision_hint"] = "f32"
            attempt.host_validation = "weights-only"
        session = open_session(built.files[0], built.runtime, provider, options=options)
        outputs = _run_all(session, self.data.validation)
        gate = self.profile.gate_for("fp32" if built.precision == "native" else built.precision)
        metrics = compare_outputs(self.reference_outputs, outputs, spread_ratio_min=gate.spread_ratio_min)
        task = None
        if self.evaluator is not None:
            score = evaluation.evaluate_safely(self.evaluator, outputs, self.labels, self.evaluator_name)
            task = (self.reference_score, score)
        attempt.metrics, attempt.gate, attempt.task, attempt.session = metrics, evaluate_gate(metrics, gate, task), task, session
        return attempt

    def build_and_check(self, spec: VariantSpec) -> Attempt | None:
        r = self.reporter
        reason = self._skip_reason(spec)
        if reason:
            self.skipped.append({"kind": spec.kind, "reason": reason})
            r.info(f"skipped {spec.kind}: {reason}")
            return None
        r.begin(f"variant {spec.kind}")
        out_dir = self.work / "variants" / spec.kind
        source = self.loaded.path if self.loaded.format == "tflite" else self.model

        def attempt(options: dict, exclude: tuple[str, ...], label: str) -> Attempt:
            attempt_dir = out_dir / label
            built = build_variant(spec.kind, options, source, attempt_dir, self.data.calibration, exclude)
            return self.validate(Attempt(label=label, options=options, exclude=exclude, built=built))

        try:
            first = attempt(dict(spec.options), (), "a0")
        except (VariantNotApplicable, UnsupportedModelError) as exc:
            self.skipped.append({"kind": spec.kind, "reason": str(exc)})
            r.end(f"variant {spec.kind}", f"skipped: {exc}")
            return None
        except (PackagingError, ModelError) as exc:
            self.dropped.append({"id": spec.kind, "reason": f"could not be built: {exc}"})
            r.warn(f"dropped {spec.kind}: could not be built ({exc})")
            r.end(f"variant {spec.kind}", "dropped")
            return None
        except RuntimeUnavailableError as exc:
            self.dropped.append({"id": spec.kind, "reason": f"cannot be validated on this host: {exc}"})
            r.end(f"variant {spec.kind}", "dropped: cannot be validated on this host")
            return None
        final, remedies = first, []
        if not first.gate.passed and spec.info.precision == "int8":
            r.info(f"{spec.kind} failed its gate ({'; '.join(first.gate.failures)}): trying remedies")
            final, remedies = repair_int8(first, attempt, reporter=r,
                                          max_float_nodes=int(spec.options.get("max_float_nodes", 8)),
                                          reference_model=self.model, samples=self.data.validation[:8],
                                          budget_s=self.req.repair_budget_s)
        final.remedies = remedies
        if final.gate.passed:
            r.end(f"variant {spec.kind}", f"passed ({final.built.quantized_nodes} quantized nodes)"
                  if spec.info.precision == "int8" else "passed")
            return final
        reason = "; ".join(final.gate.failures)
        self.dropped.append({"id": spec.kind, "reason": f"failed its accuracy gate: {reason}",
                             "metrics": {k: m.to_dict() for k, m in final.metrics.items()},
                             "remedies": remedies})
        r.warn(f"dropped {spec.kind}: failed its accuracy gate ({reason})")
        r.end(f"variant {spec.kind}", "dropped")
        return None


def _simplify_detail(report: dict) -> str:
    if not report.get("applied", False):
        return f"kept original ({report.get('reason', 'no change')})"
    return f"{report.get('nodes_before', '?')} → {report.get('nodes_after', '?')} nodes"


def _host_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(), "system": platform.system(),
            "python": platform.python_version(), "runtimes": runtime_versions()}


def _save_npz(path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    stacked = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
    with open(path, "wb") as handle:
        np.savez(handle, **stacked)


def build_package(req: PackageRequest, reporter: Reporter | None = None) -> PackageResult:
    """Run the whole pipeline for one target and write the signed package. Raises EdgeError."""
    reporter = reporter or SilentReporter()
    warnings: list[str] = []
    if req.bench_runs < 1:
        raise ConfigError("--bench-runs must be ≥ 1")
    if req.labels is not None and req.validation is None:  # checked before any work is done
        raise ConfigError("--labels needs --validation: the labels must match the validation samples in order")
    key_path = _existing_key(req, reporter)
    reporter.begin("load model")
    loaded = load_model(req.model)
    reporter.end("load model", f"{loaded.format}, {loaded.size / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory(prefix="edgesdk-package-") as tmp:
        work = Path(tmp)
        pipe = _Pipeline(req, reporter, work)
        pipe.prepare(loaded)
        if loaded.format == "tflite" and not any(v.kind == "tflite" for v in req.target.variants):
            raise UnsupportedModelError(f"{req.model}: target {req.target.name} has no LiteRT variant; .tflite "
                                        "models package for targets that list `tflite` (e.g. raspberry-pi-5)")
        accepted = [a for spec in req.target.variants if (a := pipe.build_and_check(spec)) is not None]
        if not accepted:
            if pipe.skipped and not pipe.dropped and all("cannot run on" in s["reason"] for s in pipe.skipped):
                raise UnsupportedModelError(f"{req.model}: {pipe.skipped[0]['reason']} — no variant of target "
                                            f"{req.target.name} can run this model")
            raise PackagingError(f"no variant passed its gate for {req.target.name}: "
                                 + "; ".join(f"{d['id']}: {d['reason']}" for d in pipe.dropped + pipe.skipped))
        if req.strict and pipe.dropped:
            raise GateFailedError("--strict: " + "; ".join(f"{d['id']} {d['reason']}" for d in pipe.dropped))
        variants, files = _benchmark_and_describe(pipe, accepted, reporter)
        wanted = req.reference_samples
        if any(VARIANT_KINDS[a.built.kind].device_verified for a in accepted):
            wanted = max(wanted, req.device_reference_samples)
        ref_count = min(wanted, len(pipe.data.validation))
        ref_dir = work / "reference"
        ref_dir.mkdir()
        _save_npz(ref_dir / "inputs.npz", pipe.data.validation[:ref_count])
        _save_npz(ref_dir / "outputs.npz", pipe.reference_outputs[:ref_count])
        files["reference/inputs.npz"] = ref_dir / "inputs.npz"
        files["reference/outputs.npz"] = ref_dir / "outputs.npz"
        total = sum(os.path.getsize(p) for p in files.values())
        budget = req.target.budgets.max_package_mb
        if budget is not None and total > budget * 1e6:
            raise PackagingError(f"package would be {total / 1e6:.1f} MB, over {req.target.name}'s "
                                 f"max_package_mb budget of {budget:g} MB")
        name = _NAME_OK.sub("_", req.name or req.model.stem)
        manifest = Manifest(
            name=name, version=req.version, target=req.target.name,
            source={"filename": req.model.name, "sha256": loaded.sha256, "size": loaded.size,
                    "format": loaded.format, "opset": loaded.opset,
                    "simplify": getattr(pipe, "simplify_report", {})},
            inputs=pipe.inputs, outputs=list(pipe.reference.outputs),
            variants=variants, dropped=pipe.dropped, skipped=pipe.skipped,
            calibration={"source": pipe.data.source, "synthetic": pipe.data.synthetic,
                         "calibration_samples": len(pipe.data.calibration),
                         "validation_samples": len(pipe.data.validation),
                         "reference_samples": ref_count, "notes": list(pipe.data.notes),
                         "task_metric": getattr(pipe, "evaluator_name", None) if pipe.evaluator else None},
            host=_host_info(), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            edgesdk_version=__version__, architecture=req.target.architecture,
            requires=runtimes_of(variants),  # the runtimes a device installs for it (docs/package-format.md)
        )
        reporter.begin("sign and write")
        out_path = Path(req.out_dir) / package_filename(name, req.version, req.target.name)
        key_created = key_path is None
        if key_path is None:
            key_path = _create_default_key(reporter)
        write_package(out_path, manifest, files, load_private_key(key_path))
        reporter.end("sign and write", str(out_path))
        for attempt in accepted:
            if attempt.session is not None:
                attempt.session.close()
    warnings.extend(getattr(reporter, "warnings", []))
    return PackageResult(out_path, manifest, key_path, key_created, warnings)


def _benchmark_and_describe(pipe: _Pipeline, accepted: list[Attempt],
                            reporter: Reporter) -> tuple[list[Variant], dict[str, Path]]:
    reporter.begin("host benchmark")
    feeds = pipe.data.validation[0]
    # The fp32 ORT baseline and every variant are timed in interleaved rounds, so a change of load
    # during the benchmark does not flatter or penalise one of them.
    stats = time_interleaved([pipe.reference] + [a.session for a in accepted], feeds,
                             max_runs=pipe.req.bench_runs, budget_s=10 * (len(accepted) + 1))
    baseline, timed = stats[0].p50_ms, stats[1:]
    variants, files = [], {}
    for attempt, stats in zip(accepted, timed):
        built = attempt.built
        latency = stats.to_dict() | {"provider": HOST_PROVIDER[built.runtime],
                                     "baseline": "onnxruntime fp32 CPU (same run)",
                                     "speedup_vs_fp32": round(baseline / stats.p50_ms, 3) if stats.p50_ms else None}
        vid = built.kind
        rel = [f"variants/{vid}/{p.name}" for p in built.files]
        files.update(dict(zip(rel, built.files)))
        profile = pipe.profile
        metrics = {"outputs": {k: m.to_dict() for k, m in attempt.metrics.items()},
                   "samples": len(pipe.data.validation), "synthetic": pipe.data.synthetic}
        if attempt.task is not None:
            metrics["task"] = {"name": pipe.evaluator_name, "reference": attempt.task[0], "variant": attempt.task[1]}
        kind = VARIANT_KINDS[built.kind]
        gate = profile.gate_for(built.precision)
        device_gate = ({k: v for k, v in dataclasses.asdict(gate).items()
                        if k in DEVICE_GATE_KEYS and v is not None} if kind.device_verified else {})
        if attempt.host_validation == "weights-only":
            latency["note"] = f"this host cannot compute {built.precision}: timed in f32"
        variants.append(Variant(
            id=vid, kind=built.kind, format=kind.format,
            precision=built.precision, runtime=built.runtime, file=rel[0], files=rel,
            providers=[p.provider for p in profile.providers_for(built.runtime, built.precision)],
            runtime_options=dict(built.runtime_options), quantized_nodes=built.quantized_nodes,
            metrics=metrics, gate=attempt.gate.to_dict(), remedies=attempt.remedies,
            host_latency_ms=latency, health_tolerance=health_tolerance(attempt.metrics),
            size=sum(os.path.getsize(p) for p in built.files),
            device_gate=device_gate, host_validation=attempt.host_validation,
        ))
        reporter.info(f"{vid}: p50 {stats.p50_ms:.3f} ms ({latency['speedup_vs_fp32']}× fp32 ORT)")
    reporter.end("host benchmark")
    return variants, files

