"""`edgesdk package` as a new user meets it: third-party output hidden unless --verbose (and quoted
when a third-party call fails), and `--target FAMILY` building one package per profile of it.

The quiet/verbose checks run the installed `edgesdk` script in a subprocess, so prints reach real
file descriptors as they do for a user; the rest use typer's CliRunner. Models are
tests/fixtures/tiny_models.py's MLP, with calibration data, and --bench-runs 1.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from edgesdk import quiet
from edgesdk.cli.main import app
from edgesdk.package import open_package
from tests.fixtures.tiny_models import mlp_model, random_samples, save_samples_npz

runner = CliRunner()

# Lines ONNX Runtime's calibrators print(), its root-logger warning, and NNCF's progress bars.
THIRD_PARTY = ("Collecting tensor data", "Finding optimal threshold", "Number of tensors", "Number of histogram bins",
               "Percentile :", "Please consider to run pre-processing", "Statistics collection",
               "Applying Fast Bias correction", "INFO:nncf", "WARNING:nncf")

# ORT static INT8 with entropy calibration (the calibrator that prints most) and NNCF's INT8.
NOISY_PROFILE = """\
name: noisy
architecture: x86_64
providers:
  - {runtime: onnxruntime, provider: CPUExecutionProvider}
  - {runtime: openvino, provider: CPU}
variants:
  - onnx-fp32
  - kind: onnx-int8
    options: {calibration_method: entropy}
  - openvino-int8
gates:
  int8: {cosine_min: 0.9, top1_min: 0.5}
"""


@pytest.fixture(autouse=True)
def edgesdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "edgesdk-home"
    monkeypatch.setenv("EDGESDK_HOME", str(home))
    return home


@pytest.fixture
def mlp(tmp_path: Path) -> tuple[Path, Path]:
    """The MLP and 32 calibration samples for its input."""
    model = mlp_model(tmp_path / "mlp.onnx")
    calibration = save_samples_npz(tmp_path / "cal.npz", {"input": random_samples((1, 64), 32)})
    return model, calibration


def edgesdk_script() -> Path:
    script = Path(sys.executable).with_name("edgesdk")
    if not script.exists():
        pytest.skip(f"no edgesdk console script next to {sys.executable} (package not installed here)")
    return script


def run_edgesdk(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(edgesdk_script()), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, COLUMNS="100"))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------
# Third-party output: hidden, shown with --verbose, quoted on failure


def test_third_party_output_is_hidden_and_verbose_shows_it_on_stderr(mlp, tmp_path):
    model, calibration = mlp
    profile = tmp_path / "noisy.yaml"
    profile.write_text(NOISY_PROFILE, encoding="utf-8")
    common = (model, "--target", profile, "--calibration", calibration, "--bench-runs", "1")

    hidden = run_edgesdk("package", *common, "--out", tmp_path / "hidden", cwd=tmp_path)
    shown = run_edgesdk("package", *common, "--out", tmp_path / "shown", "--verbose", "--json", cwd=tmp_path)

    assert hidden.returncode == 0, hidden.stderr
    printed = hidden.stdout + hidden.stderr
    assert [line for line in THIRD_PARTY if line in printed] == []
    assert "✓ variant onnx-int8" in hidden.stderr and "✓ variant openvino-int8" in hidden.stderr  # ours still shows
    assert "wrote " in hidden.stderr
    assert shown.returncode == 0, shown.stderr
    assert "Collecting tensor data" in shown.stderr  # ORT's print()
    assert "Statistics collection" in shown.stderr  # NNCF's progress bar
    assert json.loads(shown.stdout)["target"] == "noisy"  # and never on stdout, even with --verbose


def test_failing_third_party_call_quotes_its_last_hidden_line(mlp, tmp_path, monkeypatch):
    import onnxruntime.quantization

    def quantize_static_that_fails(*args, **kwargs):
        print("Collecting tensor data and making histogram ...")
        print("Finding optimal threshold for each tensor using 'entropy' algorithm ...")
        raise RuntimeError("simulated calibration failure")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", quantize_static_that_fails)
    model, calibration = mlp
    out = tmp_path / "out"

    result = runner.invoke(app, ["package", str(model), "--target", "jetson", "--calibration", str(calibration),
                                 "--strict", "--bench-runs", "1", "--out", str(out)])

    assert result.exit_code == 1, result.output
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: jetson-agx-orin: --strict: onnx-int8")  # which profile of the family failed
    assert "quantize_static failed: simulated calibration failure (its last output: " in line
    assert "Finding optimal threshold for each tensor" in line and "run with --verbose for all of it" in line
    assert "Collecting tensor data" not in result.output  # quoted once, never printed
    assert not out.exists() or list(out.iterdir()) == []


def test_quiet_captures_print_warnings_logging_and_handlers_bound_to_the_terminal(capsys):
    # A logger like NNCF's: its handler holds the sys.stdout of the moment it was made.
    bound = logging.getLogger("test_package_ux.bound")
    handler = logging.StreamHandler(sys.stdout)
    bound.addHandler(handler)
    bound.propagate = False
    bound.setLevel(logging.INFO)  # not the root's level, which other tests' imports may have raised
    ours = Console(stderr=True, highlight=False)
    try:
        with quiet.third_party_quiet(verbose=False, keep=(ours,)) as captured:
            print("Collecting tensor data and making histogram ...")
            print("Statistics collection", file=sys.stderr)
            bound.warning("INFO:nncf:bound handler line")
            import warnings
            warnings.warn("a torch-style warning", UserWarning, stacklevel=1)
            ours.print("our progress line")
        assert captured is not None
        text = captured.since()
    finally:
        bound.removeHandler(handler)

    seen = capsys.readouterr()
    assert seen.out == "" and seen.err == "our progress line\n"
    for line in ("Collecting tensor data", "Statistics collection", "bound handler line", "a torch-style warning"):
        assert line in text
    assert handler.stream is sys.stdout  # the handler writes where it did before


def test_verbose_sends_third_party_stdout_to_stderr(capsys):
    with quiet.third_party_quiet(verbose=True) as captured:
        print("Collecting tensor data and making histogram ...")

    seen = capsys.readouterr()
    assert captured is None
    assert seen.out == "" and "Collecting tensor data" in seen.err


def test_output_hint_quotes_the_last_line_since_the_mark_without_control_characters():
    assert quiet.output_hint(0) == ""  # not quiet: nothing was hidden

    with quiet.third_party_quiet(verbose=False):
        print("an earlier variant's output")
        mark = quiet.output_mark()
        assert quiet.output_hint(mark) == ""
        print("Finding optimal threshold\x1b[31m ...\r\n\n")
        hint = quiet.output_hint(mark)

    assert hint == " (its last output: 'Finding optimal threshold ...'; run with --verbose for all of it)"


def test_handler_made_while_quiet_is_not_left_writing_into_the_capture():
    # nncf creates its handler when first imported, which happens inside the quiet block.
    late = logging.getLogger("test_package_ux.late")
    late.propagate = False
    try:
        with quiet.third_party_quiet(verbose=False):
            handler = logging.StreamHandler(sys.stdout)
            late.addHandler(handler)
        assert handler.stream is sys.__stdout__
    finally:
        late.handlers.clear()


# ---------------------------------------------------------------------------------------------
# --target FAMILY


def test_family_builds_one_package_per_profile_and_json_is_a_list(mlp, tmp_path):
    model, calibration = mlp
    out = tmp_path / "out"

    result = runner.invoke(app, ["package", str(model), "--target", "jetson", "--calibration", str(calibration),
                                 "--name", "cam.v2", "--version", "2.0.0-rc1+b5", "--bench-runs", "1",
                                 "--out", str(out), "--json"])

    assert result.exit_code == 0, result.output
    documents = json.loads(result.stdout)
    assert [d["target"] for d in documents] == ["jetson-agx-orin", "jetson-orin-nano"]
    assert [d["key_created"] for d in documents] == [True, False]  # one default key signs both
    assert sorted(p.name for p in out.iterdir()) == ["cam.v2-2.0.0-rc1+b5-jetson-agx-orin.edgepkg",
                                                     "cam.v2-2.0.0-rc1+b5-jetson-orin-nano.edgepkg"]
    for document in documents:
        with open_package(document["package"]) as opened:
            manifest = opened.manifest
        assert (manifest.name, manifest.version, manifest.target) == ("cam.v2", "2.0.0-rc1+b5", document["target"])


def test_family_prints_a_line_per_profile(mlp, tmp_path):
    model, calibration = mlp
    out = tmp_path / "out"

    result = runner.invoke(app, ["package", str(model), "--target", "jetson", "--calibration", str(calibration),
                                 "--bench-runs", "1", "--out", str(out)])

    assert result.exit_code == 0, result.output
    summary = result.stderr[result.stderr.index("wrote 2 packages for jetson:"):].splitlines()[1:]
    assert [line.split() for line in summary] == [
        ["jetson-agx-orin", str(out / "mlp-1.0.0-jetson-agx-orin.edgepkg")],
        ["jetson-orin-nano", str(out / "mlp-1.0.0-jetson-orin-nano.edgepkg")]]


@pytest.mark.parametrize("target, expected", [("jetson-orin", "jetson-orin-nano"), ("npu", "intel-core-ultra-npu")],
                         ids=["unique-prefix", "family-of-one"])
def test_narrowed_target_builds_one_package(mlp, tmp_path, target, expected):
    model, calibration = mlp
    out = tmp_path / "out"

    result = runner.invoke(app, ["package", str(model), "--target", target, "--calibration", str(calibration),
                                 "--bench-runs", "1", "--out", str(out), "--json"])

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    # A profile named (here by prefix) gives an object; a family, even of one, a list.
    (document,) = document if target == "npu" else [document]
    assert document["target"] == expected
    assert [p.name for p in out.iterdir()] == [f"mlp-1.0.0-{expected}.edgepkg"]


def test_targets_show_family_lists_its_profiles():
    human = runner.invoke(app, ["targets", "show", "rpi"])
    as_json = runner.invoke(app, ["targets", "show", "raspberry-pi", "--json"])

    assert human.exit_code == 0, human.output
    assert "family raspberry-pi" in human.stdout
    assert "raspberry-pi-4" in human.stdout and "raspberry-pi-5" in human.stdout
    assert as_json.exit_code == 0, as_json.output
    assert [p["name"] for p in json.loads(as_json.stdout)] == ["raspberry-pi-4", "raspberry-pi-5"]


def test_targets_list_shows_the_family_of_each_profile():
    human = runner.invoke(app, ["targets", "list"])
    as_json = runner.invoke(app, ["targets", "list", "--json"])

    assert human.exit_code == 0, human.output
    rows = {line.split()[0]: line.split()[1] for line in human.stdout.splitlines()
            if line.strip() and line.split()[0] in ("jetson-orin-nano", "raspberry-pi-4", "x86-64-cpu")}
    assert rows == {"jetson-orin-nano": "jetson", "raspberry-pi-4": "raspberry-pi", "x86-64-cpu": "x86-64"}
    families = {t["name"]: (t["family"], t["aliases"]) for t in json.loads(as_json.stdout)}
    assert families["raspberry-pi-5"] == ("raspberry-pi", ["rpi", "pi"])
    assert families["jetson-agx-orin"] == ("jetson", [])
