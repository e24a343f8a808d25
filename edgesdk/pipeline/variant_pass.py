"""The `variants` pass: build each variant kind of the profile, validate it against the fp32
reference, repair a failing INT8 one, and keep it or record why not.

Each kind is timed on its own in the timeline (``variant <kind>``, within ``variants``).
INT8 builds start with the model's post-processing nodes in float (`PackContext.post_processing`)
and share one calibration cache; an INT8 attempt is judged on its first validation samples first
and stopped there when they already prove a gate failure (edgesdk.pipeline.gate_bounds).
"""

from __future__ import annotations

import time

import numpy as np

from edgesdk.errors import ModelError, PackagingError, RuntimeUnavailableError, UnsupportedModelError
from edgesdk.pipeline import evaluation
from edgesdk.pipeline.context import HOST_PROVIDER, PackContext
from edgesdk.pipeline.gate_bounds import prefix_failures, prefix_size
from edgesdk.pipeline.model_io import ops_unsupported
from edgesdk.pipeline.progress import PassTime
from edgesdk.pipeline.repair import Attempt, close_attempt, repair_int8
from edgesdk.pipeline.variant_build import VariantNotApplicable, build_variant, takes_exclude
from edgesdk.profiles import VariantSpec
from edgesdk.runtime import Session, open_session, openvino_computes
from edgesdk.validation import GateResult, compare_outputs, evaluate_gate

REPAIR_REASON = "kept in float by the repair: among the quantized nodes that add the most error"


def run_all(session: Session, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """``session`` on every sample; a non-tensor output (ZipMap, sequence) is refused by name."""
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


def run_variants(ctx: PackContext) -> str:
    """Every kind of the profile, in its order; each one ends accepted, dropped or skipped."""
    for spec in ctx.profile.variants:
        started = time.perf_counter()
        detail = check_kind(ctx, spec)
        ctx.timeline.append(PassTime(f"variant {spec.kind}", round(time.perf_counter() - started, 3),
                                     detail, within="variants"))
    return f"{len(ctx.accepted)} kept, {len(ctx.dropped)} dropped, {len(ctx.skipped)} skipped"


def skip_reason(ctx: PackContext, spec: VariantSpec) -> str | None:
    """Why ``spec`` does not apply to this model at all (None: build it)."""
    if ctx.is_tflite:
        return None if spec.kind == "tflite" else "input is a .tflite model: only the LiteRT pass-through applies"
    if spec.kind == "tflite":
        return "no .tflite input (LiteRT variants are passed through, not converted)"
    runtime = spec.info.runtime
    if runtime not in ctx.unsupported:
        ctx.unsupported[runtime] = ops_unsupported(ctx.loaded, runtime)
    if ctx.unsupported[runtime]:
        return f"ops {', '.join(ctx.unsupported[runtime])} cannot run on {runtime}"
    return None


def validate(ctx: PackContext, attempt: Attempt, early: bool = False) -> Attempt:
    """Run a built variant on the validation samples and gate it against the reference.

    ``early``: judge the first samples first, and stop there when they prove a failure that the
    rest cannot undo (the attempt then records ``stopped_at``). A device-verified variant whose
    precision this host cannot compute (bf16 without AVX512-BF16) is run with its rounded weights
    in f32: that catches what the weights lose, and the device applies the gate to what it
    computes (``host_validation: weights-only``).
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
    attempt.session = session
    samples, reference = ctx.data.validation, ctx.reference_outputs
    gate = ctx.profile.gate_for("fp32" if built.precision == "native" else built.precision)
    first = prefix_size(len(samples)) if early else len(samples)
    outputs = run_all(session, samples[:first])
    if first < len(samples):
        partial = compare_outputs(reference[:first], outputs, spread_ratio_min=gate.spread_ratio_min)
        proven = prefix_failures(partial, gate, reference)
        if proven:
            attempt.metrics, attempt.gate, attempt.stopped_at = partial, GateResult(False, proven), first
            return attempt
        outputs += run_all(session, samples[first:])
    metrics = compare_outputs(reference, outputs, spread_ratio_min=gate.spread_ratio_min)
    task = None
    if ctx.evaluator is not None:
        score = evaluation.evaluate_safely(ctx.evaluator, outputs, ctx.labels, ctx.evaluator_name)
        task = (ctx.reference_score, score)
    attempt.metrics, attempt.gate, attempt.task = metrics, evaluate_gate(metrics, gate, task), task
    return attempt


def check_kind(ctx: PackContext, spec: VariantSpec) -> str:
    """Build, validate and (INT8) repair one kind; the outcome goes to ctx.accepted/dropped/skipped.
    Returns the timeline's detail for it."""
    r = ctx.reporter
    reason = skip_reason(ctx, spec)
    if reason:
        ctx.skipped.append({"kind": spec.kind, "reason": reason})
        r.info(f"skipped {spec.kind}: {reason}")
        return "skipped"
    step = f"variant {spec.kind}"
    r.begin(step)
    out_dir = ctx.work / "variants" / spec.kind
    source = ctx.loaded.path if ctx.is_tflite else ctx.model
    int8 = spec.info.precision == "int8"
    # Post-processing stays in float in every INT8 build; the repair adds its own picks to it.
    base = list(ctx.post_processing) if int8 and takes_exclude(spec.kind) else []

    def attempt(options: dict, extra: tuple[str, ...], label: str) -> Attempt:
        kept = {name for name, _ in base}
        exclude = base + [(name, REPAIR_REASON) for name in extra if name not in kept]
        built = build_variant(spec.kind, options, source, out_dir / label, ctx.data.calibration,
                              tuple(exclude), cache=ctx.quant_cache)
        found = Attempt(label=label, options=options, exclude=tuple(name for name, _ in exclude), built=built)
        return validate(ctx, found, early=int8)

    started = time.monotonic()
    try:
        first = attempt(dict(spec.options), (), "a0")
    except (VariantNotApplicable, UnsupportedModelError) as exc:
        ctx.skipped.append({"kind": spec.kind, "reason": str(exc)})
        r.end(step, f"skipped: {exc}")
        return "skipped"
    except (PackagingError, ModelError) as exc:
        ctx.dropped.append({"id": spec.kind, "reason": f"could not be built: {exc}"})
        r.warn(f"dropped {spec.kind}: could not be built ({exc})")
        r.end(step, "dropped")
        return "dropped: could not be built"
    except RuntimeUnavailableError as exc:
        ctx.dropped.append({"id": spec.kind, "reason": f"cannot be validated on this host: {exc}"})
        r.end(step, "dropped: cannot be validated on this host")
        return "dropped: cannot be validated on this host"
    final, remedies = first, []
    if not first.gate.passed and int8:
        r.info(f"{spec.kind} failed its gate ({'; '.join(first.gate.failures)}): trying remedies")
        final, remedies = repair_int8(first, attempt, reporter=r,
                                      max_float_nodes=int(spec.options.get("max_float_nodes", 8)),
                                      reference_model=ctx.model, samples=ctx.data.validation[:8],
                                      budget_s=ctx.req.repair_budget_s,
                                      first_seconds=time.monotonic() - started)
    final.remedies = remedies
    if final.gate.passed:
        ctx.accepted.append(final)
        detail = f"passed ({final.built.quantized_nodes} quantized nodes)" if int8 else "passed"
        r.end(step, detail)
        return detail
    close_attempt(final)
    reason = "; ".join(final.gate.failures)
    ctx.dropped.append({"id": spec.kind, "reason": f"failed its accuracy gate: {reason}",
                        "metrics": {k: m.to_dict() for k, m in final.metrics.items()},
                        "remedies": remedies})
    r.warn(f"dropped {spec.kind}: failed its accuracy gate ({reason})")
    r.end(step, "dropped")
    return "dropped: failed its accuracy gate"
