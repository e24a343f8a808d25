"""Simplify and fold constants (onnxslim), checked against the original before it is kept.

onnxslim is taken only when its result passes the ONNX checker, keeps the model's inputs and
outputs, and gives the same outputs as the original in onnxruntime on one random input. Otherwise
the original is kept, with its `Constant` nodes folded into initializers (`quantize_dynamic`
fails on models whose weights are Constant nodes), and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgesdk.pipeline.calibration import Feeds, synthetic_samples
from edgesdk.pipeline.graph_stats import fold_constant_nodes_counted
from edgesdk.pipeline.model_io import EXTERNAL_DATA_THRESHOLD, iter_nodes, model_inputs

_LONG_DIM = 256  # second try for dynamic non-batch dims (silero VAD needs ≥ 128 samples)
_REASON_MAX = 300  # characters of an error kept in the report


@dataclass(frozen=True)
class SimplifyConfig:
    """How `simplify` checks onnxslim's result."""

    verify: bool = True  # run original and simplified in onnxruntime on one random input
    rtol: float = 1e-4  # relative tolerance; absolute slack is rtol × the output's largest value
    seed: int = 0  # of the random input


def simplify(model: onnx.ModelProto, config: SimplifyConfig | None = None,
             sample: Feeds | None = None) -> tuple[onnx.ModelProto, dict]:
    """onnxslim's simplified model when it checks out, else the original with Constants folded.

    ``sample`` (one real input, e.g. the first calibration sample) is tried first when checking
    outputs; random inputs follow. The report: applied, reason (why not applied, else None),
    nodes_before, nodes_after, constants_folded (fallback only). ``model`` is never modified.
    """
    config = config or SimplifyConfig()
    before = _count_nodes(model)
    slimmed, reason = _slim(model)
    if slimmed is not None:
        reason = _interface_change(model, slimmed) or _checker_failure(slimmed)
    if slimmed is not None and reason is None and config.verify:
        reason = _verify(model, slimmed, config, sample)
    if slimmed is not None and reason is None:
        return slimmed, {"applied": True, "reason": None, "nodes_before": before,
                         "nodes_after": _count_nodes(slimmed)}
    folded, constants_folded = fold_constant_nodes_counted(model)
    return folded, {"applied": False, "reason": reason, "nodes_before": before,
                    "nodes_after": _count_nodes(folded), "constants_folded": constants_folded}


def _slim(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str | None]:
    if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        return None, "model is over 1.8 GB; onnxslim works on in-memory protobufs under 2 GB"
    try:
        import onnxslim
    except ImportError:
        return None, "onnxslim is not installed"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnxslim edits the model it is given (it drops initializers from inputs)
    try:
        slimmed = onnxslim.slim(copy)
    except Exception as exc:  # onnxslim fails in many ways on real models; the original stays
        return None, f"onnxslim failed: {_first_line(exc)}"
    if not isinstance(slimmed, onnx.ModelProto):
        return None, "onnxslim returned no model"
    return slimmed, None


def _interface_change(original: onnx.ModelProto, slimmed: onnx.ModelProto) -> str | None:
    for what in ("input", "output"):
        old, new = _interface(original, what), _interface(slimmed, what)
        if old != new:
            return f"onnxslim changed the model's {what}s ({', '.join(old)} → {', '.join(new)})"
    return None


def _interface(model: onnx.ModelProto, what: str) -> list[str]:
    graph = model.graph
    if what == "output":
        return [f"{v.name}:{v.type.tensor_type.elem_type}" for v in graph.output]
    initializers = {t.name for t in graph.initializer}
    return [f"{v.name}:{v.type.tensor_type.elem_type}" for v in graph.input if v.name not in initializers]


def _checker_failure(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as exc:
        return f"onnxslim's model fails the ONNX checker: {_first_line(exc)}"
    return None


def _verify(original: onnx.ModelProto, slimmed: onnx.ModelProto, config: SimplifyConfig,
            sample: Feeds | None) -> str | None:
    """None when both models give the same outputs on one random input, else why not."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's own graph optimisations off: compare what onnxslim did, not what ORT would redo.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # a failing random input is expected and reported; no log spam
    try:
        reference = ort.InferenceSession(original.SerializeToString(), options,
                                         providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"not verified: onnxruntime cannot load the original model: {_first_line(exc)}"
    expected, feeds, error = None, None, ""
    for candidate in ([sample] if sample else []) + _candidate_feeds(original, config.seed):
        try:
            expected = reference.run(None, candidate)
            feeds = candidate
            break
        except Exception as exc:  # e.g. random token ids out of an embedding's range
            error = error or _first_line(exc)  # the first failure says most
    if feeds is None:
        return f"not verified: the original model fails on a random input: {error}"
    try:
        session = ort.InferenceSession(slimmed.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)
    except Exception as exc:
        return f"onnxruntime cannot run onnxslim's model: {_first_line(exc)}"
    for output, want, have in zip(reference.get_outputs(), expected, got):
        why = _difference(want, have, config.rtol)
        if why:
            return f"onnxslim's model changed output '{output.name}': {why}"
    return None


def _candidate_feeds(model: onnx.ModelProto, seed: int) -> list[Feeds]:
    """Random inputs to try in turn: the calibration module's defaults, longer dynamic dims
    (audio front-ends reject 32 samples), then zeros (index-like inputs that random values
    overflow)."""
    inputs = model_inputs(model)
    try:
        first = synthetic_samples(inputs, 1, seed=seed)[0]
        longer = synthetic_samples(inputs, 1, seed=seed, other_dim=_LONG_DIM)[0]
    except Exception:  # an input synthetic data cannot cover (strings): nothing to run
        return []
    return [first, longer, {name: np.zeros_like(value) for name, value in first.items()}]


def _difference(want: Any, have: Any, rtol: float) -> str | None:
    if not isinstance(want, np.ndarray) or not isinstance(have, np.ndarray):
        return None if want == have else "values differ"
    if want.shape != have.shape:
        return f"shape {have.shape} instead of {want.shape}"
    if want.dtype.kind not in "fc":
        return None if np.array_equal(want, have) else "values differ"
    if want.size == 0:
        return None
    atol = rtol * float(np.nanmax(np.abs(want), initial=0.0))
    if np.allclose(have, want, rtol=rtol, atol=atol, equal_nan=True):
        return None
    diff = float(np.nanmax(np.abs(have.astype(np.float64) - want.astype(np.float64))))
    return f"max abs difference {diff:.3g} (tolerance {rtol:g} relative)"


def _count_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for _ in iter_nodes(model))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= _REASON_MAX else line[: _REASON_MAX - 1] + "…"
