"""The passes of `edgesdk package`, in order, each a small named function over the shared `PackContext`.

    signing key → load model → fix input shapes → calibration data → simplify → reference outputs
    → post-processing → variants → host benchmark → reference samples → manifest → sign and write

A pass reads the context fields earlier passes set and sets its own (see `PackContext`); it
returns a one-line detail for the progress list and the timeline, and raises EdgeError to stop
the run. `PASSES` is the list the runner loops over; `applies` skips a pass that has nothing to
do (no shapes to fix for a .tflite input), `shown` False keeps a sub-second bookkeeping pass out
of the progress list (it is still timed).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesdk import __version__
from edgesdk.benchmark import time_interleaved
from edgesdk.errors import (ConfigError, GateFailedError, ModelError, PackagingError, RuntimeUnavailableError,
                            UnsupportedModelError)
from edgesdk.manifest import DEVICE_GATE_KEYS, Manifest, Variant, runtimes_of
from edgesdk.package import package_filename, write_package
from edgesdk.pipeline import calibration, evaluation
from edgesdk.pipeline.context import HOST_PROVIDER, PackContext
from edgesdk.pipeline.model_io import load_model, model_inputs, ops_unsupported, require_runtime_support, save_model
from edgesdk.pipeline.postprocess import postprocess_nodes
from edgesdk.pipeline.progress import timeline_record
from edgesdk.pipeline.shapes import fix_input_shapes
from edgesdk.pipeline.simplify import simplify
from edgesdk.pipeline.variant_pass import run_all, run_variants
from edgesdk.profiles import VARIANT_KINDS
from edgesdk.runtime import open_session, runtime_versions
from edgesdk.signing import PRIVATE_NAME, default_key_dir, generate_keys, load_private_key
from edgesdk.validation import compare_outputs, health_tolerance

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Pass:
    """One step of the pipeline: a name (shown and timed), the function, and when it applies."""

    name: str
    run: Callable[[PackContext], str | None]
    applies: Callable[[PackContext], bool] = lambda ctx: True
    shown: bool = True


# -- preparing ---------------------------------------------------------------------------------------

def signing_key(ctx: PackContext) -> str:
    """The key to sign with, loaded now so a bad key fails before any work; the default key is
    created only at the end, when there is a package to sign."""
    req = ctx.req
    if req.key_path is not None:
        load_private_key(req.key_path)
        ctx.key_path = req.key_path
        return str(req.key_path)
    path = default_key_dir() / PRIVATE_NAME
    if path.exists():
        ctx.reporter.info(f"signing with the default key {path}")
        load_private_key(path)
        ctx.key_path = path
        return str(path)
    return "none yet: the default key is created when the package is written"


def load(ctx: PackContext) -> str:
    ctx.loaded = loaded = load_model(ctx.req.model)
    if loaded.format == "tflite" and not any(v.kind == "tflite" for v in ctx.profile.variants):
        raise UnsupportedModelError(f"{ctx.req.model}: target {ctx.profile.name} has no LiteRT variant; .tflite "
                                    "models package for targets that list `tflite` (e.g. raspberry-pi-5)")
    return f"{loaded.format}, {loaded.size / 1e6:.1f} MB"


def is_onnx(ctx: PackContext) -> bool:
    return not ctx.is_tflite


def fix_shapes(ctx: PackContext) -> str:
    shapes = ctx.profile.shapes
    ctx.model = fix_input_shapes(ctx.loaded.model, ctx.req.input_shapes, shapes.policy, shapes.batch)
    return shapes.policy


def calibration_data(ctx: PackContext) -> str:
    req = ctx.req
    inputs = list(ctx.loaded.inputs) if ctx.is_tflite else model_inputs(ctx.model)
    ctx.data = data = calibration.plan_data(inputs, req.calibration, req.validation, n_synthetic=req.synthetic_samples)
    if data.synthetic:
        ctx.reporter.warn("SYNTHETIC inputs in use: " + " ".join(data.notes) + " INT8 variants calibrated on "
                          "random data are often wrong and the metrics say little; pass --calibration with "
                          "real samples.")
    return f"{len(data.calibration)} calibration, {len(data.validation)} validation samples ({data.source})"


def simplify_model(ctx: PackContext) -> str:
    ctx.model, ctx.simplify_report = simplify(ctx.model, sample=ctx.data.calibration[0])
    report = ctx.simplify_report
    if not report.get("applied", False):
        return f"kept original ({report.get('reason', 'no change')})"
    return f"{report.get('nodes_before', '?')} → {report.get('nodes_after', '?')} nodes"


def reference_outputs(ctx: PackContext) -> str:
    """Open the fp32 reference, run it on the validation samples, and score it with the task metric."""
    loaded = ctx.loaded
    if ctx.is_tflite:
        ctx.reference_path, runtime = loaded.path, "litert"
    else:
        ctx.reference_path, runtime = ctx.work / "reference.onnx", "onnxruntime"
        save_model(ctx.model, ctx.reference_path)
    try:
        ctx.reference = open_session(ctx.reference_path, runtime, HOST_PROVIDER[runtime])
    except RuntimeUnavailableError as exc:
        raise PackagingError(f"cannot run the reference model on this host: {exc}") from None
    except ModelError:
        # An op the runtime has no kernel for (a custom domain op): name it, not the temp file.
        if loaded.format == "onnx" and ops_unsupported(loaded, runtime):
            require_runtime_support(loaded, runtime)
        raise
    ctx.inputs = list(ctx.reference.inputs)
    ctx.reference_outputs = run_all(ctx.reference, ctx.data.validation)
    _task_metric(ctx)
    return "" if ctx.reference_score is None else f"task metric {ctx.reference_score:.4f}"


def _task_metric(ctx: PackContext) -> None:
    req = ctx.req
    if req.labels is not None:
        if req.validation is None:
            raise ConfigError("--labels needs --validation: the labels must match the validation samples in order")
        ctx.labels = evaluation.load_labels(req.labels, len(ctx.data.validation))
    if req.evaluator:
        ctx.evaluator, ctx.evaluator_name = evaluation.load_evaluator(req.evaluator), req.evaluator
    elif ctx.labels is not None:
        self_metrics = compare_outputs(ctx.reference_outputs, ctx.reference_outputs)
        class_like = [name for name, m in self_metrics.items() if m.class_like]
        if not class_like:
            raise ConfigError("--labels needs a class-like output (N × classes) or an --evaluator")
        ctx.evaluator = evaluation.top1_accuracy(class_like[0])
        ctx.evaluator_name = f"top-1 accuracy of '{class_like[0]}' on --labels"
    if ctx.evaluator is not None:
        ctx.reference_score = evaluation.evaluate_safely(ctx.evaluator, ctx.reference_outputs, ctx.labels,
                                                         ctx.evaluator_name)
        ctx.reporter.info(f"reference (fp32) task metric: {ctx.reference_score:.4f}")


def builds_int8(ctx: PackContext) -> bool:
    return is_onnx(ctx) and any(spec.info.precision == "int8" for spec in ctx.profile.variants)


def post_processing(ctx: PackContext) -> str:
    """The nodes after the model's last convolution that decode its result (sigmoid/softmax,
    box decode, concat of heads, DFL): every INT8 build keeps them in float."""
    ctx.post_processing = postprocess_nodes(ctx.model)
    if not ctx.post_processing:
        return "none found"
    return f"{len(ctx.post_processing)} node(s) kept in float for INT8: " + \
        ", ".join(n for n, _ in ctx.post_processing[:6]) + (" …" if len(ctx.post_processing) > 6 else "")


# -- after the variants ------------------------------------------------------------------------------

def gate_outcome(ctx: PackContext) -> str:
    """Stop when nothing passed, or with --strict when anything was dropped."""
    req = ctx.req
    if not ctx.accepted:
        if ctx.skipped and not ctx.dropped and all("cannot run on" in s["reason"] for s in ctx.skipped):
            raise UnsupportedModelError(f"{req.model}: {ctx.skipped[0]['reason']} — no variant of target "
                                        f"{ctx.profile.name} can run this model")
        raise PackagingError(f"no variant passed its gate for {ctx.profile.name}: "
                             + "; ".join(f"{d['id']}: {d['reason']}" for d in ctx.dropped + ctx.skipped))
    if req.strict and ctx.dropped:
        raise GateFailedError("--strict: " + "; ".join(f"{d['id']} {d['reason']}" for d in ctx.dropped))
    return f"{len(ctx.accepted)} variant(s) kept"


def host_benchmark(ctx: PackContext) -> str:
    """Time the fp32 ORT baseline and every kept variant in interleaved rounds (so a change of load
    during the benchmark does not flatter or penalise one of them), and describe each for the manifest."""
    accepted, reporter = ctx.accepted, ctx.reporter
    stats = time_interleaved([ctx.reference] + [a.session for a in accepted], ctx.data.validation[0],
                             max_runs=ctx.req.bench_runs, budget_s=10 * (len(accepted) + 1))
    baseline, timed = stats[0].p50_ms, stats[1:]
    for attempt, stat in zip(accepted, timed):
        built = attempt.built
        latency = stat.to_dict() | {"provider": HOST_PROVIDER[built.runtime],
                                    "baseline": "onnxruntime fp32 CPU (same run)",
                                    "speedup_vs_fp32": round(baseline / stat.p50_ms, 3) if stat.p50_ms else None}
        if attempt.host_validation == "weights-only":
            latency["note"] = f"this host cannot compute {built.precision}: timed in f32"
        ctx.variants.append(_describe(ctx, attempt, latency))
        reporter.info(f"{built.kind}: p50 {stat.p50_ms:.3f} ms ({latency['speedup_vs_fp32']}× fp32 ORT)")
    return f"fp32 ORT p50 {baseline:.2f} ms"


def _describe(ctx: PackContext, attempt, latency: dict) -> Variant:
    built, profile = attempt.built, ctx.profile
    rel = [f"variants/{built.kind}/{p.name}" for p in built.files]
    ctx.files.update(dict(zip(rel, built.files)))
    metrics = {"outputs": {k: m.to_dict() for k, m in attempt.metrics.items()},
               "samples": len(ctx.data.validation), "synthetic": ctx.data.synthetic}
    if attempt.task is not None:
        metrics["task"] = {"name": ctx.evaluator_name, "reference": attempt.task[0], "variant": attempt.task[1]}
    kind = VARIANT_KINDS[built.kind]
    gate = profile.gate_for(built.precision)
    device_gate = ({k: v for k, v in dataclasses.asdict(gate).items()
                    if k in DEVICE_GATE_KEYS and v is not None} if kind.device_verified else {})
    return Variant(
        id=built.kind, kind=built.kind, format=kind.format,
        precision=built.precision, runtime=built.runtime, file=rel[0], files=rel,
        providers=[p.provider for p in profile.providers_for(built.runtime, built.precision)],
        runtime_options=dict(built.runtime_options), quantized_nodes=built.quantized_nodes,
        metrics=metrics, gate=attempt.gate.to_dict(), remedies=attempt.remedies,
        host_latency_ms=latency, health_tolerance=health_tolerance(attempt.metrics),
        size=sum(os.path.getsize(p) for p in built.files),
        device_gate=device_gate, host_validation=attempt.host_validation,
        float_nodes=list(built.float_nodes),  # post-processing and repair picks, with reasons
    )


def reference_samples(ctx: PackContext) -> str:
    """Reference inputs/outputs for the device's health check (and its gate of device-verified
    variants), then the package size budget."""
    req = ctx.req
    wanted = req.reference_samples
    if any(VARIANT_KINDS[a.built.kind].device_verified for a in ctx.accepted):
        wanted = max(wanted, req.device_reference_samples)
    ctx.reference_count = count = min(wanted, len(ctx.data.validation))
    folder = ctx.work / "reference"
    folder.mkdir()
    _save_npz(folder / "inputs.npz", ctx.data.validation[:count])
    _save_npz(folder / "outputs.npz", ctx.reference_outputs[:count])
    ctx.files["reference/inputs.npz"] = folder / "inputs.npz"
    ctx.files["reference/outputs.npz"] = folder / "outputs.npz"
    total = sum(os.path.getsize(p) for p in ctx.files.values())
    budget = ctx.profile.budgets.max_package_mb
    if budget is not None and total > budget * 1e6:
        raise PackagingError(f"package would be {total / 1e6:.1f} MB, over {ctx.profile.name}'s "
                             f"max_package_mb budget of {budget:g} MB")
    return f"{count} samples, package {total / 1e6:.1f} MB"


def _save_npz(path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    stacked = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
    with open(path, "wb") as handle:
        np.savez(handle, **stacked)


def manifest(ctx: PackContext) -> str:
    req, loaded, data = ctx.req, ctx.loaded, ctx.data
    name = _NAME_OK.sub("_", req.name or req.model.stem)
    # The passes so far and their seconds travel with the package (signing itself is not in it).
    host = _host_info() | {"packaging": timeline_record(ctx.timeline)}
    ctx.manifest = Manifest(
        name=name, version=req.version, target=ctx.profile.name,
        source={"filename": req.model.name, "sha256": loaded.sha256, "size": loaded.size,
                "format": loaded.format, "opset": loaded.opset, "simplify": ctx.simplify_report},
        inputs=ctx.inputs, outputs=list(ctx.reference.outputs),
        variants=ctx.variants, dropped=ctx.dropped, skipped=ctx.skipped,
        calibration={"source": data.source, "synthetic": data.synthetic,
                     "calibration_samples": len(data.calibration), "validation_samples": len(data.validation),
                     "reference_samples": ctx.reference_count, "notes": list(data.notes),
                     "task_metric": ctx.evaluator_name if ctx.evaluator else None},
        host=host, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        edgesdk_version=__version__, architecture=ctx.profile.architecture,
        requires=runtimes_of(ctx.variants),  # the runtimes a device installs for it (docs/package-format.md)
    )
    return f"{len(ctx.variants)} variant(s)"


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


def sign_and_write(ctx: PackContext) -> str:
    req = ctx.req
    ctx.out_path = Path(req.out_dir) / package_filename(ctx.manifest.name, req.version, ctx.profile.name)
    if ctx.key_path is None:
        pair = generate_keys(default_key_dir())
        ctx.reporter.warn(f"no --key given: created a signing key at {pair.private_path} (public: "
                          f"{pair.public_path}); give the public key to your devices")
        ctx.key_path, ctx.key_created = pair.private_path, True
    write_package(ctx.out_path, ctx.manifest, ctx.files, load_private_key(ctx.key_path))
    return str(ctx.out_path)


PASSES: tuple[Pass, ...] = (
    Pass("signing key", signing_key, shown=False),
    Pass("load model", load),
    Pass("fix input shapes", fix_shapes, applies=is_onnx),
    Pass("calibration data", calibration_data),
    Pass("simplify", simplify_model, applies=is_onnx),
    Pass("reference outputs", reference_outputs),
    Pass("post-processing", post_processing, applies=builds_int8),
    Pass("variants", run_variants, shown=False),  # each kind is shown and timed on its own
    Pass("gate outcome", gate_outcome, shown=False),
    Pass("host benchmark", host_benchmark),
    Pass("reference samples", reference_samples, shown=False),
    Pass("manifest", manifest, shown=False),
    Pass("sign and write", sign_and_write),
)
