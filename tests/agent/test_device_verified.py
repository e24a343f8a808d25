"""Device-verified variants (bf16/fp16 compute): the packager ships the profile's gate with them,
and the agent applies it on the package's reference data before such a candidate is timed.

Fake sessions (as in test_selection) show the order of checks; real packages of a trained digits
CNN, run on the real OpenVINO CPU plugin, show the whole path, with the BF16 capability taken away
by the same check `open_session` makes on a CPU that lacks it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

import edgesdk.runtime as runtime
from agent.selection import SELECTION_NOISE, CandidateResult, Candidate, rank, select
from edgesdk.manifest import Manifest, TensorSpec, Variant
from edgesdk.package import extract_package
from edgesdk.pipeline.runner import PackageRequest, build_package
from edgesdk.profiles import parse_profile
from edgesdk.signing import generate_keys, load_public_key
from tests.agent.test_selection import (CPU, ORT, TOLERANCE, Behaviour, FakeClock, FakeFactory, doubled,
                                        install_dir, rows)
from tests.fixtures.digits_cnn import build_digits_cnn

__all__ = ["install_dir"]  # the fixture, re-used from test_selection

BF16_GATE = {"cosine_min": 0.99, "top1_min": 0.97, "spread_ratio_min": 0.5}
FAST, SLOW = 2.0**-9, 2.0**-7


def bf16_manifest(device_gate: dict | None = None, precision: str = "bf16") -> Manifest:
    """fp32 on ORT CPU, and a bf16 variant (listed second) on OpenVINO CPU."""
    variants = [
        Variant(id="onnx-fp32", kind="onnx-fp32", format="onnx", precision="fp32", runtime=ORT,
                file="variants/fp32.onnx", providers=[CPU], health_tolerance=dict(TOLERANCE)),
        Variant(id="openvino-bf16", kind="openvino-bf16", format="openvino-ir", precision=precision,
                runtime="openvino", file="variants/bf16.xml", providers=["CPU"],
                health_tolerance={"cosine_min": 0.5},  # loose: the device gate must do the work
                device_gate=dict(BF16_GATE if device_gate is None else device_gate)),
    ]
    return Manifest(name="doubler", version="1.0.0", target="x86-64-cpu", source={},
                    inputs=[TensorSpec("x", "float32", (1, 3))], outputs=[TensorSpec("y", "float32", (1, 3))],
                    variants=variants)


def skewed(feeds):  # noqa: ANN001, ANN201
    """A runtime that computes roughly right (cosine ~0.95: passes the loose health tolerance)
    but not within the bf16 gate."""
    x = np.asarray(feeds["x"], dtype=np.float32)
    return {"y": x * 2 + np.float32(0.7) * np.roll(x, 1, axis=-1)}


def run(install_dir: Path, manifest: Manifest, bf16: Behaviour):  # noqa: ANN201
    clock = FakeClock()
    factory = FakeFactory(clock, {("fp32", CPU): Behaviour(latency=SLOW), ("bf16", "CPU"): bf16})
    available = {ORT: [CPU], "openvino": ["CPU"]}
    return select(manifest, install_dir, available, "k", budget_s=1.0, session_factory=factory,
                  clock=clock), factory


def test_bf16_candidate_that_computes_wrongly_here_is_never_timed(install_dir: Path) -> None:
    selection, factory = run(install_dir, bf16_manifest(), Behaviour(latency=FAST, outputs=skewed))
    table = rows(selection)
    row = table[("openvino-bf16", "CPU")]
    assert row["status"] == "gate_failed" and row["health"] is False
    assert row["detail"].startswith("device gate: output 'y': cosine")
    assert row["runs"] == 0 and row["p50_ms"] is None  # it did not compete, though 4x faster
    # it ran the first reference sample (can it run at all?) and then the whole reference set
    assert factory.sessions[("bf16", "CPU")].runs == 1 + 4 and factory.sessions[("bf16", "CPU")].closed
    assert selection.chosen.variant == "onnx-fp32"


def test_bf16_candidate_within_its_gate_competes_and_wins_when_faster(install_dir: Path) -> None:
    selection, _ = run(install_dir, bf16_manifest(), Behaviour(latency=FAST, outputs=doubled))
    assert selection.chosen.variant == "openvino-bf16"
    assert rows(selection)[("openvino-bf16", "CPU")]["status"] == "selected"


def test_bf16_variant_without_a_device_gate_is_refused_not_trusted(install_dir: Path) -> None:
    # A package whose bf16 variant carries no gate (an old or a careless packager): the host could
    # not have checked what this device computes, so the device refuses to run it.
    selection, _ = run(install_dir, bf16_manifest(device_gate={}), Behaviour(latency=FAST, outputs=doubled))
    row = rows(selection)[("openvino-bf16", "CPU")]
    assert row["status"] == "gate_failed"
    assert "must carry a device gate" in row["detail"]
    assert selection.chosen.variant == "onnx-fp32"


def test_cached_bf16_decision_is_verified_again_with_the_device_gate(install_dir: Path) -> None:
    # The device re-opens its cached winner on a restart; a runtime update that breaks bf16 must
    # not be served because it once passed.
    cached = {"cache_key": "k", "variant": "openvino-bf16", "runtime": "openvino", "provider": "CPU"}
    clock = FakeClock()
    factory = FakeFactory(clock, {("fp32", CPU): Behaviour(latency=SLOW),
                                  ("bf16", "CPU"): Behaviour(latency=FAST, outputs=skewed)})
    selection = select(bf16_manifest(), install_dir, {ORT: [CPU], "openvino": ["CPU"]}, "k", budget_s=1.0,
                       session_factory=factory, cached=cached, clock=clock)
    assert not selection.from_cache and selection.chosen.variant == "onnx-fp32"


# -- the noise margin -------------------------------------------------------------------------------
def _row(variant: str, order: int, p50: float) -> CandidateResult:
    return CandidateResult(Candidate(variant, ORT, CPU, "fp32", f"{variant}.onnx", order=order),
                           status="ok", p50_ms=p50)


@pytest.mark.parametrize("second_ratio, first", [(1.0 + SELECTION_NOISE * 0.6, "a"), (1.0 + SELECTION_NOISE * 2, "b")])
def test_a_difference_within_the_noise_margin_goes_to_profile_order(second_ratio: float, first: str) -> None:
    # "a" comes first in the profile but is slower by `second_ratio`.
    ranked = rank([_row("a", 1, 10.0 * second_ratio), _row("b", 2, 10.0), _row("c", 3, 50.0)])
    assert ranked[0].candidate.variant == first
    assert ranked[-1].candidate.variant == "c"
    if first == "a":
        assert "noise margin" in ranked[0].detail


def test_identical_devices_measuring_within_noise_pick_the_same_variant() -> None:
    # Three "identical devices" time the same two candidates with ±2 % jitter that reverses their
    # order: without the margin each would keep its own fastest.
    rng = np.random.default_rng(7)
    picks = set()
    for _ in range(50):
        a, b = 10.0 * (1 + rng.uniform(-0.02, 0.02)), 10.0 * (1 + rng.uniform(-0.02, 0.02))
        picks.add(rank([_row("int8", 2, a), _row("fp32", 1, b)])[0].candidate.variant)
    assert picks == {"fp32"}


# -- real packages, real OpenVINO -----------------------------------------------------------------
PROFILE = """
name: bf16-box
description: test profile, fp32 and bf16 only
architecture: x86_64
providers:
  - {runtime: onnxruntime, provider: CPUExecutionProvider}
  - {runtime: openvino, provider: CPU}
variants: [onnx-fp32, openvino-bf16]
gates:
  fp32: {cosine_min: 0.9999, top1_min: 0.999}
  bf16: {cosine_min: 0.99, top1_min: 0.97, spread_ratio_min: 0.5}
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return build_digits_cnn(tmp_path_factory.mktemp("digits"))


def _package(digits, out: Path):  # noqa: ANN001, ANN201
    keys = generate_keys(out / "keys")
    result = build_package(PackageRequest(model=digits.path, target=parse_profile(yaml.safe_load(PROFILE), "bf16-box.yaml"),
                                          out_dir=out, calibration=digits.calibration_npz,
                                          validation=digits.validation_npz, key_path=keys.private_path,
                                          bench_runs=3))
    installed = out / "installed"
    extract_package(result.path, installed, [load_public_key(keys.public_path)])
    return result, installed


def test_packager_ships_bf16_with_its_gate_and_more_reference_samples(digits, tmp_path: Path) -> None:
    result, installed = _package(digits, tmp_path)
    bf16 = result.manifest.variant("openvino-bf16")
    assert bf16.device_gate == BF16_GATE
    assert bf16.runtime_options == {"inference_precision_hint": "bf16"}
    assert bf16.host_validation == ("computed" if runtime.openvino_computes("CPU", "bf16") else "weights-only")
    assert result.manifest.variant("onnx-fp32").device_gate == {}
    assert result.manifest.calibration["reference_samples"] == PackageRequest.device_reference_samples
    ref = np.load(installed / "reference" / "inputs.npz")
    assert ref["image"].shape[0] == PackageRequest.device_reference_samples


def test_agent_verifies_bf16_on_the_device_and_lets_it_compete(digits, tmp_path: Path) -> None:
    if not runtime.openvino_computes("CPU", "bf16"):
        pytest.skip("this CPU has no BF16: see the capability-removed test")
    result, installed = _package(digits, tmp_path)
    selection = select(result.manifest, installed, {ORT: [CPU], "openvino": ["CPU"]}, "k", budget_s=1.0)
    try:
        row = rows(selection)[("openvino-bf16", "CPU")]
        assert row["status"] in ("selected", "not_checked") and row["runs"] >= 3, row
    finally:
        selection.session.close()


def test_device_without_bf16_reports_the_variant_unavailable_and_runs_fp32(
        digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, installed = _package(digits, tmp_path)
    # The same check open_session makes on an AVX2-only CPU, whose capabilities lack BF16.
    monkeypatch.setitem(runtime.OV_PRECISION_CAPABILITY, "bf16", "BF16-NOT-ON-THIS-CPU")
    selection = select(result.manifest, installed, {ORT: [CPU], "openvino": ["CPU"]}, "k", budget_s=1.0)
    try:
        row = rows(selection)[("openvino-bf16", "CPU")]
        assert row["status"] == "unavailable" and "cannot compute in bf16" in row["detail"]
        assert selection.chosen.variant == "onnx-fp32"
    finally:
        selection.session.close()


def test_host_without_bf16_validates_weights_only_and_says_so(
        digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(runtime.OV_PRECISION_CAPABILITY, "bf16", "BF16-NOT-ON-THIS-CPU")
    result, _ = _package(digits, tmp_path)
    bf16 = result.manifest.variant("openvino-bf16")
    assert bf16.host_validation == "weights-only"
    assert bf16.device_gate == BF16_GATE  # the device still applies the gate
    assert "cannot compute bf16" in bf16.host_latency_ms["note"]


def test_real_bf16_session_with_a_gate_it_cannot_meet_is_refused(digits, tmp_path: Path) -> None:
    if not runtime.openvino_computes("CPU", "bf16"):
        pytest.skip("this CPU has no BF16")
    result, installed = _package(digits, tmp_path)
    # bf16 rounds every activation: its max error on real logits is far above 1e-6.
    strict = dataclasses.replace(result.manifest.variant("openvino-bf16"),
                                 device_gate={"cosine_min": 0.99, "max_abs_error": 1e-6})
    manifest = dataclasses.replace(result.manifest, variants=[
        strict if v.id == "openvino-bf16" else v for v in result.manifest.variants])
    selection = select(manifest, installed, {ORT: [CPU], "openvino": ["CPU"]}, "k", budget_s=1.0)
    try:
        row = rows(selection)[("openvino-bf16", "CPU")]
        assert row["status"] == "gate_failed" and "max abs error" in row["detail"]
    finally:
        selection.session.close()
