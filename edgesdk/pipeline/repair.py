"""Bounded repair of an INT8 variant that failed its accuracy gate.

Remedies, in order, each a rebuild plus a fresh validation, stopping at the first that passes:
per-channel weights (if off) → another calibration method → leave the quantized nodes with the
largest error jump in float (a sensitivity search over 1, 2, 4 … `max_float_nodes` nodes). The
search stops when ``budget_s`` is spent. Every try is recorded for the manifest, so a user can
see what was done to make the variant pass (or why it was dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesdk.errors import EdgeError
from edgesdk.pipeline.progress import Reporter
from edgesdk.validation import compare_outputs

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


AttemptFn = Callable[[dict, tuple[str, ...], str], Attempt]


def _record(name: str, attempt: Attempt | None, error: str | None = None) -> dict:
    rec: dict[str, Any] = {"name": name}
    if attempt is not None:
        rec |= {"options": attempt.options, "float_nodes": list(attempt.exclude), "passed": bool(attempt.gate.passed),
                "failures": list(attempt.gate.failures), "quantized_nodes": attempt.built.quantized_nodes}
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
                clock: Callable[[], float] = time.monotonic) -> tuple[Attempt, list[dict]]:
    """Try the remedies for ``first``; return the first passing attempt (or the best tried) and the log."""
    kind = first.built.kind
    remedies: list[dict] = []
    best = first
    tries = 0
    deadline = clock() + budget_s

    def spent() -> bool:
        """True once the budget is spent; the log then says so (once)."""
        if clock() < deadline:
            return False
        if not remedies or remedies[-1].get("name") != "budget":
            remedies.append({"name": "budget", "passed": False,
                             "error": f"repair budget of {budget_s:g} s spent; remaining remedies not tried"})
        return True

    def run(name: str, options: dict, exclude: tuple[str, ...]) -> Attempt | None:
        nonlocal tries, best
        if spent():
            return None
        tries += 1
        try:
            attempt = attempt_fn(options, exclude, f"r{tries}")
        except EdgeError as exc:
            remedies.append(_record(name, None, str(exc)))
            reporter.info(f"  remedy {name}: failed to build ({exc})")
            return None
        remedies.append(_record(name, attempt))
        reporter.info(f"  remedy {name}: {'passed' if attempt.gate.passed else '; '.join(attempt.gate.failures)}")
        if attempt.gate.passed:
            _close(best)
            best = attempt
            return attempt
        if len(attempt.gate.failures) <= len(best.gate.failures):
            _close(best)
            best = attempt
        else:
            _close(attempt)
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
        count = 1
        while count <= limit:  # 1, 2, 4 … and the limit itself (5 of 5, not stop at 4)
            exclude = tuple(ranked[:count])
            if (done := run(f"{count} most sensitive node(s) in float", options, exclude)) is not None:
                return done, remedies
            if count == limit:
                break
            count = min(count * 2, limit)
    return best, remedies


def _close(attempt: Attempt) -> None:
    if attempt.session is not None:
        attempt.session.close()
        attempt.session = None


def _ort_quantized_op_types() -> frozenset[str]:
    """Op types ORT's static QDQ quantizer quantizes by default (what quantize_static uses)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QDQRegistry) | frozenset(QLinearOpsRegistry)


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

    def outputs_of(model: Any) -> list[dict[str, np.ndarray]]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        existing = {o.name for o in m.graph.output}
        for name in names:
            if name not in existing:
                m.graph.output.append(onnx.ValueInfoProto(name=name))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep tensors addressable
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return [dict(zip(names, sess.run(names, feeds))) for feeds in samples]

    try:
        ref_out, q_out = outputs_of(reference_model), outputs_of(int8)
    except Exception:  # ranking is best effort: a model ORT cannot expose tensors of gets no search
        return []
    errors = {}
    for name in names:
        a = np.concatenate([np.asarray(o[name], dtype=np.float64).ravel() for o in ref_out])
        b = np.concatenate([np.asarray(o[name], dtype=np.float64).ravel() for o in q_out])
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        errors[name] = 1.0 - (float(a @ b) / denom if denom > 0 else (1.0 if not a.any() and not b.any() else 0.0))
        # Cosine does not see a collapsed channel (a detector's scores all 0.0 at cosine 0.9997)
        # but the gate does: a channel whose spread vanished counts as error too.
        try:
            spread = compare_outputs([{name: o[name]} for o in ref_out],
                                     [{name: o[name]} for o in q_out])[name].min_spread_ratio
        except EdgeError:
            spread = None
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
