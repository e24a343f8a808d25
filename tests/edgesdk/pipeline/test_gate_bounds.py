"""Early stop of an INT8 attempt: a prefix of the validation samples may prove a gate failure.

The rules must never stop a variant that passes on the full set. Tests check that both ways on
random outputs: whatever the prefix proves fails the full gate even when every later sample is
perfect, and a variant that passes the full gate is never stopped.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgesdk.pipeline.gate_bounds import prefix_failures, prefix_size
from edgesdk.profiles import Gate
from edgesdk.validation import compare_outputs, evaluate_gate

INT8 = Gate(cosine_min=0.98, top1_min=0.95, spread_ratio_min=0.5)


def logits(n: int, seed: int, classes: int = 10) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"logits": rng.normal(0, 1, (1, classes)).astype(np.float32)} for _ in range(n)]


def noisy(outputs: list[dict[str, np.ndarray]], scale: float, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (v + rng.normal(0, scale, v.shape)).astype(v.dtype) for k, v in o.items()} for o in outputs]


def judge(reference, candidate, first: int, gate: Gate = INT8) -> tuple[list[str], bool]:
    """(failures the first ``first`` samples prove, whether the full set passes the gate)."""
    partial = compare_outputs(reference[:first], candidate[:first], gate.spread_ratio_min)
    full = evaluate_gate(compare_outputs(reference, candidate, gate.spread_ratio_min), gate)
    return prefix_failures(partial, gate, reference), full.passed


@pytest.mark.parametrize("total, expected", [(32, 8), (16, 4), (100, 25), (5, 4), (4, 4), (3, 3), (1, 1)])
def test_prefix_is_a_quarter_of_the_samples_and_at_least_four(total, expected):
    assert prefix_size(total) == expected


@pytest.mark.parametrize("scale", [0.05, 0.2, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("seed", range(6))
def test_what_the_prefix_proves_fails_even_when_every_later_sample_is_perfect(scale, seed):
    reference = logits(32, seed)
    first = prefix_size(32)
    # The worst case for a stop: the prefix is noisy, all later samples equal the reference.
    candidate = noisy(reference[:first], scale, seed + 100) + [dict(o) for o in reference[first:]]

    proven, full_passes = judge(reference, candidate, first)

    if proven:
        assert not full_passes, proven


@pytest.mark.parametrize("scale", [0.01, 0.05, 0.1, 0.2, 0.4])
@pytest.mark.parametrize("seed", range(6))
def test_a_variant_that_passes_the_full_gate_is_never_stopped(scale, seed):
    reference = logits(32, seed)
    candidate = noisy(reference, scale, seed + 200)

    proven, full_passes = judge(reference, candidate, prefix_size(32))

    if full_passes:
        assert proven == []


def test_cosine_far_below_the_gate_on_the_prefix_stops_the_attempt():
    reference = logits(32, seed=1)
    candidate = [{"logits": -o["logits"]} for o in reference[:8]] + reference[8:]  # cosine -1, then perfect

    proven, full_passes = judge(reference, candidate, 8)

    assert not full_passes
    assert any("cosine at most" in f and "on the first 8 of 32 samples" in f for f in proven)


def test_cosine_slightly_low_on_the_prefix_does_not_stop_it():
    # Mean cosine 0.95 on 8 samples: 24 perfect ones would lift the mean to 0.9875 ≥ 0.98.
    reference = logits(32, seed=2, classes=1000)
    candidate = noisy(reference[:8], 0.32, seed=3) + reference[8:]
    partial = compare_outputs(reference[:8], candidate[:8])
    assert 0.9 < partial["logits"].cosine < 0.97  # the setup is what the test says

    assert not any("cosine" in f for f in prefix_failures(partial, INT8, reference))


def test_nan_in_the_prefix_stops_the_attempt():
    reference = logits(32, seed=4)
    candidate = [dict(o) for o in reference]
    candidate[0] = {"logits": np.full((1, 10), np.nan, np.float32)}

    proven, full_passes = judge(reference, candidate, 8)

    assert not full_passes
    assert proven == ["output 'logits': 10 nonfinite values (NaN/Inf) on the first 8 of 32 samples"]


def test_top1_flips_in_the_prefix_stop_it_only_when_no_rest_could_recover():
    reference = logits(32, seed=5)
    # 32 positions, top1_min 0.95: two flips cap agreement at 30/32 = 0.9375, one at 0.969.
    for flips, stopped in ((1, False), (2, True)):
        candidate = [dict(o) for o in reference]
        for i in range(flips):
            candidate[i] = {"logits": -reference[i]["logits"]}
        partial = compare_outputs(reference[:8], candidate[:8])

        proven = [f for f in prefix_failures(partial, INT8, reference) if "top-1" in f]

        assert bool(proven) is stopped, (flips, proven)


def test_integer_outputs_are_bounded_on_exact_match():
    reference = [{"label": np.array([i % 3], np.int64)} for i in range(32)]
    candidate = [{"label": np.array([7], np.int64)} for _ in range(8)] + reference[8:]

    proven, full_passes = judge(reference, candidate, 8)

    assert not full_passes
    assert proven and "exact match at most" in proven[0]


def test_collapse_on_the_prefix_alone_never_stops_an_attempt():
    # Later samples can restore a channel's spread, so the collapse check waits for all of them.
    rng = np.random.default_rng(6)
    reference = [{"scores": rng.normal(0, 1, (1, 4, 8)).astype(np.float32)} for _ in range(32)]
    candidate = [{"scores": np.zeros((1, 4, 8), np.float32) + 0.1} for _ in range(8)] + reference[8:]
    partial = compare_outputs(reference[:8], candidate[:8])
    assert partial["scores"].collapsed_channels > 0

    proven = prefix_failures(partial, Gate(cosine_min=-1.0), reference)
    assert not any("collapsed" in f or "spread" in f for f in proven)


def test_top1_is_not_bounded_when_a_later_sample_is_not_class_like():
    # The full set's output is not class-like (a later sample has one class): no top-1 check to fail.
    reference = logits(8, seed=7) + [{"logits": np.ones((1, 1), np.float32)}]
    candidate = [{"logits": -o["logits"]} for o in reference[:4]] + reference[4:]
    partial = compare_outputs(reference[:4], candidate[:4])
    assert partial["logits"].class_like

    assert not any("top-1" in f for f in prefix_failures(partial, Gate(cosine_min=-1.0, top1_min=0.95), reference))


def test_max_abs_error_over_the_limit_in_the_prefix_stops_it():
    reference = logits(32, seed=8)
    candidate = [{"logits": reference[0]["logits"] + 5.0}] + reference[1:]
    gate = Gate(cosine_min=-1.0, max_abs_error=1.0)

    proven, full_passes = judge(reference, candidate, 8, gate)

    assert not full_passes
    assert proven and "max abs error" in proven[0]
