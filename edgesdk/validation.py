"""Compare a variant's outputs to the fp32 reference, gate variants, and health-check a device run.

numpy only: the device agent imports this for its health check. One cosine number is not enough
(a quantized detector's class scores all became 0.0 at cosine 0.997), so every output also gets
top-1 agreement (class-like outputs), exact match (integer outputs), a NaN/Inf count and a
per-channel spread check that sees a channel collapse to a constant.

Errors: on the host (`compare_outputs`, `evaluate_gate`) a mismatch is a `PackagingError`. On the
device, `health_check` returns a failed `HealthResult` when the candidate's outputs differ (names,
shapes, values) and raises `HealthCheckError` when the check cannot run at all (no or malformed
reference outputs, a malformed tolerance): never a PackagingError, which is the packager's error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from edgesdk.errors import HealthCheckError, PackagingError

if TYPE_CHECKING:  # profiles pulls in yaml; the agent's health check needs only numpy
    from edgesdk.profiles import Gate

Outputs = Mapping[str, np.ndarray]

MAX_CLASSES = 100_000  # a last axis longer than this is not a class axis (OCR has ~18.7 k classes)
SPREAD_RATIO_MIN = 0.5  # default of profiles.Gate.spread_ratio_min
# A position whose reference top-1 beats its runner-up by less than this fraction of the sample's
# largest |score| is a near-tie: which of the two wins is rounding, in fp32 too, so a flip there is
# not counted. Detector score maps are mostly background anchors whose scores all sit near 0: their
# top-1 is noise (bf16 "lost" 4 % top-1 on a layout detector at cosine 0.9995, all of it there).
TIE_MARGIN = 0.01


@dataclass(frozen=True)
class OutputMetrics:
    """How one output of a candidate compares with the reference over all samples."""

    name: str
    cosine: float  # mean over samples of the flattened output's cosine similarity
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None = None  # class-like outputs: fraction of argmax positions equal
    class_like: bool = False
    min_spread_ratio: float | None = None  # min over channels of std(candidate)/std(reference)
    collapsed_channels: int = 0  # channels whose spread ratio is below spread_ratio_min
    nonfinite: int = 0  # NaN/Inf in the candidate where the reference has none
    exact_match: float | None = None  # integer outputs: fraction of elements equal
    disagreements: int = 0  # argmax positions (class-like) or elements (integer) that differ
    reference_absmax: float = 0.0  # largest |reference| value: the output's scale
    spread_axis: int | None = None  # the axis whose slices the spread check reported
    samples: int = 0
    tied_positions: int = 0  # class-like: positions left out of top-1 agreement as near-ties (TIE_MARGIN)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: NaN/Inf become None (json.dumps would write invalid NaN tokens)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: list[str] = field(default_factory=list)  # one line each, naming the output
    task: dict[str, float] | None = None  # {"reference", "variant", "drop"} when an evaluator ran

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": list(self.failures), "task": self.task}


@dataclass(frozen=True)
class HealthResult:
    passed: bool
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # {"outputs": {name: metrics}, "tolerance"}

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": list(self.failures), "details": self.details}


# -- comparing ------------------------------------------------------------------------------------
def compare_outputs(reference: Sequence[Outputs], candidate: Sequence[Outputs],
                    spread_ratio_min: float = SPREAD_RATIO_MIN) -> dict[str, OutputMetrics]:
    """Per-output metrics of ``candidate`` against ``reference``, sample by sample (same order)."""
    if not reference:
        raise PackagingError("compare_outputs: no reference samples")
    if len(reference) != len(candidate):
        raise PackagingError(f"compare_outputs: {len(reference)} reference samples but "
                             f"{len(candidate)} candidate samples")
    names = list(reference[0])
    for i, (ref, cand) in enumerate(zip(reference, candidate)):
        for name in names:
            if name not in ref:
                raise PackagingError(f"output {name!r}: missing from reference sample {i}")
            if name not in cand:
                raise PackagingError(f"output {name!r}: missing from candidate sample {i}")
        for name in cand:
            if name not in names:
                raise PackagingError(f"output {name!r}: in candidate sample {i} but not in the reference")
    return {name: _compare_output(name, [np.asarray(r[name]) for r in reference],
                                  [np.asarray(c[name]) for c in candidate], spread_ratio_min)
            for name in names}


def _compare_output(name: str, refs: list[np.ndarray], cands: list[np.ndarray],
                    spread_ratio_min: float) -> OutputMetrics:
    for i, (r, c) in enumerate(zip(refs, cands)):
        for side, a in (("reference", r), ("candidate", c)):
            if a.dtype.kind not in "biufc":  # strings, objects, datetimes: nothing to compare numerically
                raise PackagingError(f"output {name!r}: {side} dtype {a.dtype} is not numeric (sample {i})")
        if r.shape != c.shape:
            raise PackagingError(f"output {name!r}: candidate shape {c.shape} differs from reference "
                                 f"{r.shape} (sample {i})")
    integer = refs[0].dtype.kind in "iub"
    ndim = refs[0].ndim
    class_like = (not integer and ndim in (2, 3)
                  and all(r.ndim == ndim and 2 <= r.shape[-1] <= MAX_CLASSES for r in refs))
    cosines: list[float] = []
    max_abs = abs_sum = ref_absmax = 0.0
    count = nonfinite = equal = elements = hits = positions = tied = 0
    for r, c in zip(refs, cands):
        rf, cf = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
        if np.isfinite(rf).all() and np.isfinite(cf).all():  # the usual case: no masks to build
            bad, both_r, both_c, finite_ref = 0, rf, cf, rf
        else:
            # Where the reference itself is NaN/Inf (e.g. a -inf mask) and the candidate matches, agree.
            same_nonfinite = ~np.isfinite(rf) & ((rf == cf) | (np.isnan(rf) & np.isnan(cf)))
            bad = int(np.count_nonzero(~np.isfinite(cf) & ~same_nonfinite))
            both = np.isfinite(rf) & np.isfinite(cf)
            both_r, both_c, finite_ref = rf[both], cf[both], rf[np.isfinite(rf)]
        nonfinite += bad
        diff = np.abs(both_r - both_c)
        if bad:
            max_abs = math.inf
        elif diff.size:
            max_abs = max(max_abs, float(diff.max()))
        abs_sum += float(diff.sum())
        count += diff.size
        if finite_ref.size:
            ref_absmax = max(ref_absmax, float(np.abs(finite_ref).max()))
        cosines.append(math.nan if bad else _cosine(both_r, both_c))
        if integer:
            equal += int(np.count_nonzero(r == c))
            elements += r.size
        if class_like and r.size:
            decided = _decided_positions(r)
            tied += int(decided.size - np.count_nonzero(decided))
            hits += int(np.count_nonzero((np.argmax(r, axis=-1) == np.argmax(c, axis=-1)) & decided))
            positions += int(np.count_nonzero(decided))
    min_ratio, collapsed, axis = (None, 0, None) if integer else _spread(refs, cands, spread_ratio_min)
    return OutputMetrics(
        name=name,
        cosine=float(np.mean(cosines)),
        max_abs_error=max_abs,
        mean_abs_error=math.inf if nonfinite else (abs_sum / count if count else 0.0),
        top1_agreement=(hits / positions if positions else None) if class_like else None,
        class_like=class_like,
        min_spread_ratio=min_ratio,
        collapsed_channels=collapsed,
        nonfinite=nonfinite,
        exact_match=(equal / elements if elements else 1.0) if integer else None,
        disagreements=(elements - equal) if integer else (positions - hits),
        reference_absmax=ref_absmax,
        spread_axis=axis,
        samples=len(refs),
        tied_positions=tied,
    )


def _decided_positions(ref: np.ndarray) -> np.ndarray:
    """Per position (all axes but the last), whether the reference's top-1 is not a near-tie."""
    values = ref if np.isfinite(ref).all() else np.where(np.isfinite(ref), ref, 0.0)
    top2 = np.partition(values, -2, axis=-1)[..., -2:].astype(np.float64)
    scale = float(np.abs(values).max()) if values.size else 0.0
    return (top2[..., 1] - top2[..., 0]) > TIE_MARGIN * scale


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity; two all-zero vectors are identical (1.0), one zero vector scores 0.0."""
    if np.array_equal(a, b):
        return 1.0
    scale = max(float(np.abs(a).max()) if a.size else 0.0, float(np.abs(b).max()) if b.size else 0.0)
    if scale == 0.0:
        return 1.0
    if not 1e-100 < scale < 1e100:  # keeps the dot products from overflowing (or vanishing)
        a, b = a / scale, b / scale
    na, nb = math.sqrt(float(np.dot(a, a))), math.sqrt(float(np.dot(b, b)))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def _spread(refs: list[np.ndarray], cands: list[np.ndarray],
            threshold: float) -> tuple[float | None, int, int | None]:
    """Collapse check: per channel, std(candidate)/std(reference) across samples and other axes.

    The channel axis is the last one for rank-2 outputs (N×C), axis 1 for NCHW (rank ≥ 4). Rank-3
    outputs get both: N×T×C sequences have classes last, but a detector's 1×84×8400 has them on
    axis 1, and checking only the last axis would miss the case this check exists for. The axis
    with the most collapsed channels is reported.

    A channel counts when its reference std is above 1e-6 of its own largest |value| (float noise
    on a constant channel does not). Its own, not the output's: a detector's scores (std ~1e-3)
    share a tensor with box coordinates (~1e3), and are exactly what int8 flattens.
    """
    ndim = refs[0].ndim
    axes: list[int | None] = {0: [None], 1: [None], 2: [1], 3: [2, 1]}.get(ndim, [1])
    worst: tuple[float | None, int, int | None] = (None, 0, None)
    for axis in axes:
        ref_stats, cand_stats = _channel_stats(refs, axis), _channel_stats(cands, axis)
        if ref_stats is None or cand_stats is None:
            continue  # the channel count varies between samples: no per-channel statistics
        (ref_std, ref_absmax), (cand_std, _) = ref_stats, cand_stats
        ratios = spread_ratios(ref_std, ref_absmax, cand_std)
        if not ratios.size:
            continue
        result = (float(ratios.min()), int(np.count_nonzero(ratios < threshold)), axis)
        if worst[0] is None or (result[1], -result[0]) > (worst[1], -worst[0]):
            worst = result
    return worst


def spread_ratios(ref_std: np.ndarray, ref_absmax: np.ndarray, cand_std: np.ndarray) -> np.ndarray:
    """std(candidate)/std(reference) of the channels that count (see `_spread`), finite ones only."""
    meaningful = (ref_std > 1e-6 * (ref_absmax + 1e-12)) & (ref_std > 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = cand_std[meaningful] / ref_std[meaningful]
    return ratios[np.isfinite(ratios)]


def _channel_stats(arrays: list[np.ndarray], axis: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (std, max |value|) over all samples and other axes, merged sample by sample.

    Chan et al.'s merge keeps memory at one sample and stays exact where sum-of-squares cancels.
    """
    n = mean = m2 = absmax = None
    for a in arrays:
        x = a.astype(np.float64)
        x = x.reshape(-1, 1) if axis is None else np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
        if np.isfinite(x).all():  # the usual case: plain reductions, several times faster than nan*
            nb = np.full(x.shape[1], float(x.shape[0]))
            mb = x.mean(axis=0) if x.shape[0] else np.zeros(x.shape[1])
            m2b = ((x - mb) ** 2).sum(axis=0)
            amax = np.abs(x).max(axis=0, initial=0.0)
        else:
            x = np.where(np.isfinite(x), x, np.nan)
            nb = np.count_nonzero(~np.isnan(x), axis=0).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                mb = np.where(nb > 0, np.nansum(x, axis=0) / np.maximum(nb, 1), 0.0)
                m2b = np.nansum((x - mb) ** 2, axis=0)
                amax = np.nanmax(np.abs(x), axis=0, initial=0.0)
        if n is None:
            n, mean, m2, absmax = nb, mb, m2b, amax
            continue
        if nb.shape != n.shape:
            return None
        absmax = np.maximum(absmax, amax)
        total = n + nb
        safe = np.maximum(total, 1)
        delta = mb - mean
        mean = mean + delta * nb / safe
        m2 = m2 + m2b + delta ** 2 * n * nb / safe
        n = total
    if n is None:
        return None
    return np.sqrt(m2 / np.maximum(n, 1)), absmax


# -- gating ---------------------------------------------------------------------------------------
def evaluate_gate(metrics: Mapping[str, OutputMetrics], gate: Gate,
                  task: tuple[float, float] | None = None, forgive_disagreements: int = 0) -> GateResult:
    """Check every output against ``gate``; ``task`` is (reference, variant) score, higher is better.

    Integer outputs (labels) are gated on exact match against top1_min, not on cosine or absolute
    error: a label's cosine or "error" in label units means nothing. ``forgive_disagreements``:
    top-1/exact agreement below top1_min passes when at most this many positions differ (the
    device's small reference set, where one near-tie swings agreement by 1/N).
    """
    failures: list[str] = []
    for name, m in metrics.items():
        where = f"output {name!r}"
        if m.nonfinite:
            failures.append(f"{where}: {m.nonfinite} nonfinite values (NaN/Inf)")
            continue
        forgiven = m.disagreements <= forgive_disagreements
        if m.exact_match is not None:
            if gate.top1_min is not None and m.exact_match < gate.top1_min and not forgiven:
                failures.append(f"{where}: exact match {m.exact_match:.4f} < {gate.top1_min}")
            continue
        if not m.cosine >= gate.cosine_min:
            failures.append(f"{where}: cosine {m.cosine:.4f} < {gate.cosine_min}")
        if gate.max_abs_error is not None and m.max_abs_error > gate.max_abs_error:
            failures.append(f"{where}: max abs error {m.max_abs_error:.4g} > {gate.max_abs_error}")
        if (m.class_like and gate.top1_min is not None and m.top1_agreement is not None
                and m.top1_agreement < gate.top1_min and not forgiven):
            failures.append(f"{where}: top-1 agreement {m.top1_agreement:.4f} < {gate.top1_min}")
        if m.min_spread_ratio is not None and m.min_spread_ratio < gate.spread_ratio_min:
            # collapsed_channels was counted at compare time; its threshold may differ from this gate's
            count = f"{m.collapsed_channels} collapsed channels " if m.collapsed_channels else ""
            failures.append(f"{where}: {count}(spread ratio {m.min_spread_ratio:.2f} "
                            f"< {gate.spread_ratio_min})")
    task_info = None
    if task is not None:
        ref_score, var_score = float(task[0]), float(task[1])
        drop = ref_score - var_score
        task_info = {"reference": ref_score, "variant": var_score, "drop": drop}
        if not (math.isfinite(ref_score) and math.isfinite(var_score)):
            failures.append(f"task metric is not finite (reference {ref_score}, variant {var_score})")
        elif gate.task_metric_drop_max is not None and drop > gate.task_metric_drop_max:
            failures.append(f"task metric dropped {drop:.4f} ({ref_score:.4f} → {var_score:.4f}) "
                            f"> {gate.task_metric_drop_max}")
    return GateResult(passed=not failures, failures=failures, task=task_info)


# -- the device health check ----------------------------------------------------------------------
def health_tolerance(metrics: Mapping[str, OutputMetrics]) -> dict[str, float]:
    """The tolerance the on-device health check uses for this variant, from its host metrics.

    The device runs the variant on another provider than the host measured (TensorRT, CUDA, NPU,
    XNNPACK), so its outputs legitimately differ a bit more; the check exists to catch a broken
    runtime (garbage, NaN, wrong layout), not to re-gate accuracy. Hence the margins:
    - cosine_min: worst host cosine − 0.01, clamped to [0.5, 1] (broken runtimes land far lower);
    - max_abs: 2 × worst host max abs error + 1 % of that output's reference scale + 1e-4, so an
      fp32 variant (host error ~1e-6) is not failed by fp16/TF32 rounding on a GPU;
    - top1_min: worst host top-1/exact agreement − 0.1; health_check also forgives a single flip,
      since the reference set is small and one near-tie swings agreement by 1/N.
    """
    cosines = [m.cosine for m in metrics.values() if m.exact_match is None and math.isfinite(m.cosine)]
    abs_bounds = [2.0 * m.max_abs_error + 0.01 * m.reference_absmax for m in metrics.values()
                  if m.exact_match is None and math.isfinite(m.max_abs_error)]
    agreements = [m.top1_agreement if m.class_like else m.exact_match for m in metrics.values()]
    agreements = [a for a in agreements if a is not None]
    tolerance: dict[str, float] = {}
    if cosines:
        tolerance["cosine_min"] = round(min(1.0, max(0.5, min(cosines) - 0.01)), 6)
    if abs_bounds:
        tolerance["max_abs"] = float(max(abs_bounds) + 1e-4)
    if agreements:
        tolerance["top1_min"] = round(max(0.0, min(agreements) - 0.1), 6)
    return tolerance


def health_check(reference_outputs: Sequence[Outputs], outputs: Sequence[Outputs],
                 tolerance: Mapping[str, float]) -> HealthResult:
    """Compare a device run on the package's reference inputs with the stored reference outputs.

    Fails on any NaN/Inf, on cosine below ``cosine_min``, max abs error above ``max_abs`` and
    top-1/exact agreement below ``top1_min`` (with more than one position differing). A missing
    tolerance key skips that check; a name or shape mismatch fails the check rather than raising.
    Raises `HealthCheckError` when the check cannot run: no reference samples, a reference that is
    not numeric arrays by name, or a tolerance value that is not a finite number.
    """
    tolerance = _check_tolerance(tolerance)
    metrics = _device_metrics(reference_outputs, outputs, {"tolerance": dict(tolerance)})
    if isinstance(metrics, HealthResult):
        return metrics
    failures: list[str] = []
    cos_min, abs_max, top1_min = (tolerance.get(k) for k in ("cosine_min", "max_abs", "top1_min"))
    for name, m in metrics.items():
        where = f"output {name!r}"
        if m.nonfinite:
            failures.append(f"{where}: {m.nonfinite} nonfinite values (NaN/Inf)")
            continue
        if m.exact_match is None:
            if cos_min is not None and not m.cosine >= cos_min:
                failures.append(f"{where}: cosine {m.cosine:.4f} < {cos_min}")
            if abs_max is not None and not m.max_abs_error <= abs_max:
                failures.append(f"{where}: max abs error {m.max_abs_error:.4g} > {abs_max:.4g}")
        agreement = m.top1_agreement if m.class_like else m.exact_match
        if top1_min is not None and agreement is not None and agreement < top1_min and m.disagreements > 1:
            failures.append(f"{where}: agreement {agreement:.4f} < {top1_min} ({m.disagreements} differ)")
    details = {"outputs": {name: m.to_dict() for name, m in metrics.items()}, "tolerance": dict(tolerance)}
    return HealthResult(passed=not failures, failures=failures, details=details)


def _device_metrics(reference_outputs: Sequence[Outputs], outputs: Sequence[Outputs], details: dict[str, Any],
                    spread_ratio_min: float = SPREAD_RATIO_MIN) -> dict[str, OutputMetrics] | HealthResult:
    """The candidate's metrics against the package's reference, or the failed result saying why
    they cannot be computed (a candidate that gives other outputs fails; a bad reference raises)."""
    _check_reference(reference_outputs)
    if len(outputs) != len(reference_outputs) or not all(isinstance(o, Mapping) for o in outputs):
        return HealthResult(passed=False, failures=[
            f"the candidate gave {len(outputs)} results for {len(reference_outputs)} reference samples"
            if len(outputs) != len(reference_outputs) else "a candidate result is not a mapping of outputs"],
            details=details)
    try:
        return compare_outputs(reference_outputs, outputs, spread_ratio_min=spread_ratio_min)
    except PackagingError as exc:  # the reference was checked above: the candidate's outputs differ
        return HealthResult(passed=False, failures=[str(exc)], details=details)
    except (TypeError, ValueError) as exc:  # numpy on a candidate output it cannot convert
        return HealthResult(passed=False, failures=[f"candidate outputs cannot be compared: {exc}"],
                            details=details)


def device_gate_check(reference_outputs: Sequence[Outputs], outputs: Sequence[Outputs],
                      device_gate: Mapping[str, float]) -> HealthResult:
    """The accuracy gate of a device-verified variant, applied on the device to what it computes.

    ``device_gate`` is the manifest's (the profile's gate for the precision: cosine_min, top1_min,
    max_abs_error, spread_ratio_min). The same `evaluate_gate` the packager applies, on the
    package's reference samples, forgiving a single top-1 flip (see `evaluate_gate`). Raises
    `HealthCheckError` on a gate value that is not a finite number or a reference that is not usable.
    """
    from edgesdk.profiles import Gate  # profiles is data loading; validation stays importable alone

    gate_values: dict[str, float] = {}
    for key in ("cosine_min", "top1_min", "max_abs_error", "spread_ratio_min"):
        if key in device_gate:
            gate_values[key] = _finite_number(device_gate[key], f"device gate {key}")
    gate = Gate(**gate_values)
    details: dict[str, Any] = {"device_gate": dict(gate_values)}
    metrics = _device_metrics(reference_outputs, outputs, details, gate.spread_ratio_min)
    if isinstance(metrics, HealthResult):
        return metrics
    result = evaluate_gate(metrics, gate, forgive_disagreements=1)
    details["outputs"] = {name: m.to_dict() for name, m in metrics.items()}
    return HealthResult(passed=result.passed, failures=list(result.failures), details=details)


HEALTH_TOLERANCE_KEYS = ("cosine_min", "max_abs", "top1_min")


def _finite_number(value: Any, what: str) -> float:
    """``value`` from a package as a finite float (not a bool or a string), else HealthCheckError."""
    try:
        number = float(value) if not isinstance(value, (bool, np.bool_, str, bytes)) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise HealthCheckError(f"health check: {what} must be a finite number, got {str(value)[:40]!r}")
    return number


def _check_tolerance(tolerance: Any) -> dict[str, float]:
    """The tolerance comes from a package: every known key must be a finite number (not a bool)."""
    if not isinstance(tolerance, Mapping):
        raise HealthCheckError(f"health check: tolerance must be a mapping, got {type(tolerance).__name__}")
    checked: dict[str, float] = {}
    for key in HEALTH_TOLERANCE_KEYS:
        if key not in tolerance:
            continue
        checked[key] = _finite_number(tolerance[key], f"tolerance {key}")
    return checked


def _check_reference(reference: Any) -> None:
    """The package's reference outputs: at least one sample, each a mapping of name → numeric array."""
    if not isinstance(reference, Sequence) or not reference:
        raise HealthCheckError("health check: the package has no reference outputs")
    names = None
    for i, sample in enumerate(reference):
        if not isinstance(sample, Mapping) or not sample:
            raise HealthCheckError(f"health check: reference sample {i} is not a mapping of outputs")
        if names is None:
            names = set(sample)
        elif set(sample) != names:
            raise HealthCheckError(f"health check: reference sample {i} names other outputs than sample 0")
        for name, value in sample.items():
            dtype = getattr(value, "dtype", None)
            if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc":
                raise HealthCheckError(f"health check: reference output {name!r} (sample {i}) is not a numeric array")
