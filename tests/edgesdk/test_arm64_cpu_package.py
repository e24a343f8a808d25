"""The generic `arm64-cpu` target, packaged on this x86 host: `edgesdk package` builds a valid signed
package whose manifest says which runtimes it needs, every variant matches the reference outputs on
the real onnxruntime/LiteRT, and `edgesdk inspect` names what this machine lacks with the pip line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgesdk.cli import common
from edgesdk.cli.main import app
from edgesdk.manifest import Manifest
from edgesdk.package import extract_package, open_package
from edgesdk.runtime import open_session
from edgesdk.signing import generate_keys, load_public_key
from edgesdk.validation import health_check
from tests.fixtures.tiny_models import mlp_model, tflite_dense_model

runner = CliRunner()


@pytest.fixture(autouse=True)
def edgesdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "edgesdk-home"
    monkeypatch.setenv("EDGESDK_HOME", str(home))
    monkeypatch.setattr(common.console, "width", 200)
    monkeypatch.setattr(common.out, "width", 200)
    return home


def package(model: Path, out: Path, key: Path, *extra: str):
    return runner.invoke(app, ["package", str(model), "--target", "arm64-cpu", "--out", str(out), "--key", str(key),
                               "--bench-runs", "1", *extra])


def check_every_variant_against_the_reference(pkg: Path, public: Path, dest: Path) -> Manifest:
    """Verify and extract as a device does, then run each variant on its real runtime."""
    extract_package(pkg, dest, [load_public_key(public)])
    manifest = Manifest.from_bytes((dest / "manifest.json").read_bytes())
    with np.load(dest / manifest.reference["inputs"]) as ins, np.load(dest / manifest.reference["outputs"]) as outs:
        ref_in = [{k: ins[k][i] for k in ins.files} for i in range(len(ins[ins.files[0]]))]
        ref_out = [{k: outs[k][i] for k in outs.files} for i in range(len(outs[outs.files[0]]))]
    for variant in manifest.variants:
        session = open_session(dest / variant.file, variant.runtime, variant.providers[0],
                               options=variant.runtime_options)
        try:
            result = health_check(ref_out, [session.run(feeds) for feeds in ref_in], variant.health_tolerance)
        finally:
            session.close()
        assert result.passed, f"{variant.id}: {result.failures}"
    return manifest


def test_onnx_model_packages_for_arm64_cpu_on_an_x86_host(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys")
    model = mlp_model(tmp_path / "tiny.onnx")  # MatMul-only: the dynamic INT8 kind applies too

    result = package(model, tmp_path / "out", keys.private_path, "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    pkg = Path(data["package"])
    assert pkg.name == "tiny-1.0.0-arm64-cpu.edgepkg"
    assert [v["id"] for v in data["variants"]] == ["onnx-fp32", "onnx-int8", "onnx-int8-dynamic", "onnx-fp16"]
    assert data["skipped"] == [{"kind": "tflite",
                                "reason": "no .tflite input (LiteRT variants are passed through, not converted)"}]
    assert data["device_install"] == 'pip install "edgesdk[agent]"'
    with open_package(pkg, [load_public_key(keys.public_path)]) as opened:
        manifest = opened.manifest
    assert (manifest.target, manifest.architecture) == ("arm64-cpu", "aarch64")
    assert manifest.requires == {"onnxruntime": ["onnx-fp32", "onnx-int8", "onnx-int8-dynamic", "onnx-fp16"]}
    assert {v.id: v.providers for v in manifest.variants} == {
        i: ["CPUExecutionProvider"] for i in manifest.requires["onnxruntime"]}
    check_every_variant_against_the_reference(pkg, keys.public_path, tmp_path / "device")


def test_tflite_model_passes_through_for_litert_on_arm64_cpu(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    keys = generate_keys(tmp_path / "keys")
    weights = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    model = tflite_dense_model(tmp_path / "dense.tflite", weights)

    result = package(model, tmp_path / "out", keys.private_path, "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [v["id"] for v in data["variants"]] == ["tflite"]
    assert data["requires"][0]["runtime"] == "litert" and data["requires"][0]["variants"] == ["tflite"]
    assert data["device_install"] == 'pip install "edgesdk[agent,litert]"'
    manifest = check_every_variant_against_the_reference(Path(data["package"]), keys.public_path, tmp_path / "device")
    assert manifest.variants[0].providers == ["XNNPACK"]


def test_inspect_names_the_runtime_this_machine_lacks_and_the_pip_line(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    keys = generate_keys(tmp_path / "keys")
    result = runner.invoke(app, ["package", str(mlp_model(tmp_path / "tiny.onnx")), "--target", "raspberry-pi-5",
                                 "--out", str(tmp_path / "out"), "--key", str(keys.private_path), "--bench-runs", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    pkg = json.loads(result.stdout)["package"]
    monkeypatch.setitem(sys.modules, "openvino", None)  # this machine, as far as Python can tell, has no OpenVINO

    as_json = runner.invoke(app, ["inspect", pkg, "--json"])
    text = runner.invoke(app, ["inspect", pkg])

    assert as_json.exit_code == 0 and text.exit_code == 0, as_json.output + text.output
    data = json.loads(as_json.stdout)
    needs = {n["runtime"]: n for n in data["requires"]}
    assert needs["openvino"]["installed"] is False
    assert needs["openvino"]["variants"] == ["openvino-fp32", "openvino-int8"]
    assert needs["openvino"]["install"] == 'pip install "edgesdk[agent,openvino]"'
    assert needs["onnxruntime"]["installed"] is True
    assert data["missing_runtimes"] == ["openvino"]
    assert data["install_missing"] == 'pip install "edgesdk[agent,openvino]"'
    assert 'missing here openvino (openvino-fp32, openvino-int8): pip install "edgesdk[agent,openvino]"' \
        in text.stdout
