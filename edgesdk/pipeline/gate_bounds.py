"""Gate failures that the first k validation samples already prove, whatever the other N − k give.

An INT8 attempt is validated on a prefix of the samples first (`prefix_size`); when one of these
bounds fails, the attempt is stopped there. Each rule is arithmetic, so it can never drop a variant
that would pass on the full set (the gate is a conjunction: one failed check fails it):

- nonfinite values: the full count is at least the prefix's, and any is a failure;
- cosine (mean over samples, each ≤ 1): full mean ≤ (k·mean_k + (N − k)) / N;
- top-1 agreement (class-like outputs) and exact match (integer outputs): full agreement
  ≤ 1 − disagreements_k / positions_N, where positions_N counts every position of the N reference
  outputs (the gate leaves near-ties out of both hits and positions, so its own count is smaller
  and the true bound tighter: counting all of them only makes the stop rarer);
- max abs error (a max): full ≥ prefix.

The collapse check (per-channel spread over all samples) and a task metric are not bounded by a
prefix (later samples can restore a channel's spread), so they never stop an attempt early.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from edgesdk.profiles import Gate
from edgesdk.validation import MAX_CLASSES, OutputMetrics

Outputs = Mapping[str, np.ndarray]
# The full mean is computed by numpy in float64; a bound must clear the threshold by more than its
# rounding (~1e-16 relative) before it counts as proof.
COSINE_SLACK = 1e-9
MIN_PREFIX = 4  # fewer samples prove little and cost a second comparison


def prefix_size(total: int) -> int:
    """How many samples an INT8 attempt is checked on first: a quarter, at least MIN_PREFIX;
    ``total`` when that leaves nothing to skip."""
    k = max(MIN_PREFIX, total // 4)
    return total if k >= total else k


def prefix_failures(partial: Mapping[str, OutputMetrics], gate: Gate, reference: Sequence[Outputs]) -> list[str]:
    """Failures ``partial`` (metrics of the first k samples) proves for all ``len(reference)``.

    ``reference``: the reference outputs of every validation sample, prefix first. Empty list:
    the prefix proves nothing, validate on the rest.
    """
    total = len(reference)
    failures: list[str] = []
    for name, m in partial.items():
        k = m.samples
        where = f"output {name!r}"
        on = f"on the first {k} of {total} samples"
        if m.nonfinite:
            failures.append(f"{where}: {m.nonfinite} nonfinite values (NaN/Inf) {on}")
            continue
        refs = [np.asarray(r[name]) for r in reference]
        if m.exact_match is not None:
            elements = sum(r.size for r in refs)
            best = 1.0 - m.disagreements / elements if elements else 1.0
            if gate.top1_min is not None and best < gate.top1_min:
                failures.append(f"{where}: exact match at most {best:.4f} < {gate.top1_min} "
                                f"({m.disagreements} elements differ {on})")
            continue
        best_cosine = (k * m.cosine + (total - k)) / total
        if math.isfinite(best_cosine) and best_cosine < gate.cosine_min - COSINE_SLACK:
            failures.append(f"{where}: cosine at most {best_cosine:.4f} < {gate.cosine_min} "
                            f"(mean {m.cosine:.4f} {on})")
        if gate.max_abs_error is not None and m.max_abs_error > gate.max_abs_error:
            failures.append(f"{where}: max abs error {m.max_abs_error:.4g} > {gate.max_abs_error} ({on})")
        if gate.top1_min is not None and m.class_like and _class_like(refs):
            positions = sum(r.size // r.shape[-1] for r in refs)
            best = 1.0 - m.disagreements / positions if positions else 1.0
            if best < gate.top1_min:
                failures.append(f"{where}: top-1 agreement at most {best:.4f} < {gate.top1_min} "
                                f"({m.disagreements} positions differ {on})")
    return failures


def _class_like(refs: list[np.ndarray]) -> bool:
    """The full set's class-likeness, as `edgesdk.validation` decides it: the prefix alone could
    say class-like where a later sample's shape makes the output not class-like (then the full
    gate has no top-1 check to fail)."""
    if not refs or refs[0].dtype.kind in "iub":
        return False
    ndim = refs[0].ndim
    return ndim in (2, 3) and all(r.ndim == ndim and 2 <= r.shape[-1] <= MAX_CLASSES for r in refs)
