"""The device gate of device-verified variants: `validation.device_gate_check` and the manifest
fields that carry it (`device_gate`, `host_validation`, `float_nodes`), hostile values included."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgesdk.errors import HealthCheckError, PackageError
from edgesdk.manifest import Manifest, TensorSpec, Variant
from edgesdk.profiles import load_builtin
from edgesdk.validation import device_gate_check

GATE = {"cosine_min": 0.99, "top1_min": 0.97, "spread_ratio_min": 0.5}
RNG = np.random.default_rng(3)
REF = [{"scores": RNG.normal(size=(1, 10)).astype(np.float32)} for _ in range(16)]


def flipped(count: int) -> list[dict[str, np.ndarray]]:
    """The reference, with the top-1 class of the first ``count`` samples moved (a small change)."""
    out = []
    for i, sample in enumerate(REF):
        y = sample["scores"].copy()
        if i < count:
            order = np.argsort(y[0])
            y[0, order[-1]], y[0, order[-2]] = y[0, order[-2]], y[0, order[-1]]
        out.append({"scores": y})
    return out


def test_identical_outputs_pass() -> None:
    assert device_gate_check(REF, REF, GATE).passed


def test_a_single_top1_flip_on_the_small_reference_set_is_forgiven() -> None:
    result = device_gate_check(REF, flipped(1), GATE)
    assert result.passed, result.failures


def test_two_top1_flips_fail_and_say_so() -> None:
    result = device_gate_check(REF, flipped(2), GATE)
    assert not result.passed
    assert any("top-1 agreement" in f for f in result.failures)


def test_nan_output_fails() -> None:
    bad = [{"scores": np.full((1, 10), np.nan, np.float32)} for _ in REF]
    result = device_gate_check(REF, bad, GATE)
    assert not result.passed and "nonfinite" in result.failures[0]


def test_collapsed_output_fails_the_spread_check() -> None:
    # Every sample gives nearly the same scores: cosine can stay high, the spread is gone.
    mean = np.mean([s["scores"] for s in REF], axis=0)
    collapsed = [{"scores": (mean + 0.01 * s["scores"]).astype(np.float32)} for s in REF]
    result = device_gate_check(REF, collapsed, {"cosine_min": 0.0, "spread_ratio_min": 0.5})
    assert not result.passed and any("spread ratio" in f for f in result.failures)


def test_candidate_with_other_outputs_fails_rather_than_raising() -> None:
    result = device_gate_check(REF, [{"other": s["scores"]} for s in REF], GATE)
    assert not result.passed and "missing" in result.failures[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "0.99", None, [0.99]])
def test_gate_value_that_is_not_a_finite_number_raises(value: object) -> None:
    with pytest.raises(HealthCheckError, match="device gate cosine_min must be a finite number"):
        device_gate_check(REF, REF, {"cosine_min": value})


def test_x86_profile_gate_for_bf16_is_its_own_and_other_profiles_fall_back_to_fp16() -> None:
    x86 = load_builtin("x86-64-cpu")
    assert x86.gate_for("bf16").cosine_min == 0.99 and x86.gate_for("bf16").top1_min == 0.97
    nano = load_builtin("jetson-orin-nano")
    assert nano.gate_for("bf16") == nano.gate_for("fp16")


# -- the manifest fields ---------------------------------------------------------------------------
def manifest_bytes(**variant_fields: object) -> bytes:
    variant = Variant(id="openvino-bf16", kind="openvino-bf16", format="openvino-ir", precision="bf16",
                      runtime="openvino", file="variants/openvino-bf16/openvino-bf16.xml", providers=["CPU"],
                      device_gate=dict(GATE))
    manifest = Manifest(name="m", version="1.0.0", target="x86-64-cpu", source={},
                        inputs=[TensorSpec("x", "float32", (1, 3))], outputs=[TensorSpec("y", "float32", (1, 3))],
                        variants=[variant])
    data = manifest.to_dict()
    data["variants"][0].update(variant_fields)
    return json.dumps(data).encode()


def test_device_gate_and_float_nodes_round_trip() -> None:
    raw = manifest_bytes(host_validation="weights-only",
                         float_nodes=[{"node": "head/Sigmoid", "reason": "post-processing"}])
    variant = Manifest.from_bytes(raw).variants[0]
    assert variant.device_gate == GATE and variant.host_validation == "weights-only"
    assert variant.float_nodes == [{"node": "head/Sigmoid", "reason": "post-processing"}]


def test_manifest_without_the_new_fields_still_parses() -> None:
    data = json.loads(manifest_bytes())
    for key in ("device_gate", "host_validation", "float_nodes"):
        del data["variants"][0][key]
    variant = Manifest.from_bytes(json.dumps(data).encode()).variants[0]
    assert variant.device_gate == {} and variant.host_validation == "computed" and variant.float_nodes == []


@pytest.mark.parametrize("fields, where", [
    ({"device_gate": {"cosine_min": "high"}}, "device_gate.cosine_min"),
    ({"device_gate": {"cosine_min": True}}, "device_gate.cosine_min"),
    ({"device_gate": {"cosine_min": 10 ** 400}}, "device_gate.cosine_min"),
    ({"device_gate": {"be_lenient": 1}}, "device_gate.'be_lenient'"),
    ({"device_gate": [0.99]}, "device_gate"),
    ({"host_validation": "trust-me"}, "host_validation"),
    ({"float_nodes": ["head"]}, "float_nodes[0]"),
])
def test_malformed_device_fields_are_refused_naming_the_key(fields: dict, where: str) -> None:
    with pytest.raises(PackageError) as err:
        Manifest.from_bytes(manifest_bytes(**fields))
    message = str(err.value)
    assert f"variants[0].{where}" in message and "\n" not in message
