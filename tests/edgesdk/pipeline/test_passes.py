"""The pipeline as a list of passes: every pass timed into the result, the manifest and the CLI;
an INT8 attempt stopped on its first validation samples when they prove it fails.

Tiny models and a user profile (ORT CPU: onnx-fp32 + onnx-int8) keep each package a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgesdk.cli.main import app
from edgesdk.pipeline.context import PackageRequest, PackContext
from edgesdk.pipeline.passes import PASSES, Pass
from edgesdk.pipeline.progress import PassTime, SilentReporter, timeline_line
from edgesdk.pipeline.runner import build_package, run_passes
from edgesdk.profiles import load_profile_file
from tests.fixtures.tiny_models import mlp_model, random_samples, save_samples_npz

BENCH_RUNS = 2


def write_profile(path: Path, int8_options: str | None) -> Path:
    """ORT CPU only: onnx-fp32, plus onnx-int8 with ``int8_options`` if given."""
    variants = "  - onnx-fp32\n" + (f"  - kind: onnx-int8\n    options: {int8_options}\n" if int8_options else "")
    path.write_text("name: test-cpu\narchitecture: x86_64\nproviders:\n"
                    "  - {runtime: onnxruntime, provider: CPUExecutionProvider}\n"
                    f"variants:\n{variants}gates:\n  fp32: {{cosine_min: 0.9999, top1_min: 0.999}}\n"
                    "  int8: {cosine_min: 0.98, top1_min: 0.95, spread_ratio_min: 0.5}\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def edgesdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "edgesdk-home"
    monkeypatch.setenv("EDGESDK_HOME", str(home))
    return home


@pytest.fixture
def mlp(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = mlp_model(tmp_path / "mlp.onnx")
    calibration = save_samples_npz(tmp_path / "cal.npz", {"input": random_samples((1, 64), 32, seed=1)})
    validation = save_samples_npz(tmp_path / "val.npz", {"input": random_samples((1, 64), 32, seed=2)})
    return model, calibration, validation


def package(tmp_path: Path, model: Path, calibration: Path, validation: Path, int8: str | None = "{}",
            reporter=None):
    profile = load_profile_file(write_profile(tmp_path / "p.yaml", int8))
    return build_package(PackageRequest(model=model, target=profile, out_dir=tmp_path / "out", calibration=calibration,
                                        validation=validation, bench_runs=BENCH_RUNS), reporter)


def test_every_pass_is_timed_in_order_and_each_variant_kind_within_variants(mlp, tmp_path):
    reporter = SilentReporter()

    result = package(tmp_path, *mlp, reporter=reporter)

    names = [t.name for t in result.timeline if t.within is None]
    assert names == [p.name for p in PASSES]  # an ONNX model with an INT8 kind: every pass applies
    kinds = [t for t in result.timeline if t.within == "variants"]
    assert [t.name for t in kinds] == ["variant onnx-fp32", "variant onnx-int8"]
    variants = next(t for t in result.timeline if t.name == "variants")
    assert sum(t.seconds for t in kinds) <= variants.seconds + 0.01
    assert all(t.seconds >= 0 for t in result.timeline)
    # Shown passes are reported as steps; bookkeeping passes are timed but not shown.
    begun = [line.removeprefix("begin ") for line in reporter.lines if line.startswith("begin ")]
    assert begun == ["load model", "fix input shapes", "calibration data", "simplify", "reference outputs",
                     "post-processing", "variant onnx-fp32", "variant onnx-int8", "host benchmark", "sign and write"]


def test_manifest_carries_the_seconds_of_every_pass_before_it(mlp, tmp_path):
    result = package(tmp_path, *mlp)

    packaging = result.manifest.host["packaging"]
    recorded = [p["name"] for p in packaging["passes"]]
    assert recorded == [t.name for t in result.timeline][:len(recorded)]
    assert recorded[-1] == "reference samples"  # the manifest pass writes it, signing follows
    assert packaging["total_s"] == pytest.approx(
        sum(p["seconds"] for p in packaging["passes"] if "within" not in p), abs=0.02)
    assert {"name", "seconds"} <= set(packaging["passes"][0])


def test_runner_skips_passes_that_do_not_apply_and_stops_at_a_failing_one(tmp_path):
    ran: list[str] = []

    def record(name: str):
        def run(ctx: PackContext) -> str:
            ran.append(name)
            if name == "boom":
                raise RuntimeError("stop here")
            return f"{name} done"
        return run

    passes = [Pass("a", record("a")), Pass("skipped", record("skipped"), applies=lambda ctx: False),
              Pass("hidden", record("hidden"), shown=False), Pass("boom", record("boom")),
              Pass("never", record("never"))]
    reporter = SilentReporter()
    ctx = PackContext(req=None, reporter=reporter, work=tmp_path)

    with pytest.raises(RuntimeError, match="stop here"):
        run_passes(ctx, passes)

    assert ran == ["a", "hidden", "boom"]
    assert [(t.name, t.detail) for t in ctx.timeline] == [("a", "a done"), ("hidden", "hidden done")]
    assert reporter.lines == ["begin a", "end a a done", "begin boom"]


def test_timeline_line_lists_top_level_passes_over_a_twentieth_of_a_second_and_the_total():
    timeline = [PassTime("load model", 1.26), PassTime("signing key", 0.001), PassTime("variants", 20.0),
                PassTime("variant onnx-int8", 19.5, within="variants"), PassTime("host benchmark", 3.0)]

    assert timeline_line(timeline) == "load model 1.3s · variants 20.0s · host benchmark 3.0s — total 24.3s"
    assert timeline_line([PassTime("signing key", 0.001)]) == "total 0.0s"


# -- early stop of a hopeless INT8 attempt ----------------------------------------------------------


@pytest.fixture
def outlier_calibration(tmp_path: Path, mlp) -> Path:
    """Calibration data with one sample 10⁴× larger: minmax ranges then span ±10⁴, and every
    normal activation quantizes to the same level — the int8 outputs say nothing."""
    samples = random_samples((1, 64), 32, seed=1)
    samples[0] *= 1e4
    return save_samples_npz(tmp_path / "outlier-cal.npz", {"input": samples})


def test_hopeless_int8_attempt_is_stopped_on_its_first_samples(mlp, outlier_calibration, tmp_path):
    model, _, validation = mlp

    result = package(tmp_path, model, outlier_calibration, validation, int8="{max_float_nodes: 0}")

    (dropped,) = result.manifest.dropped
    assert dropped["id"] == "onnx-int8"
    assert "on the first 8 of 32 samples" in dropped["reason"] and "at most" in dropped["reason"]
    assert dropped["metrics"]["logits"]["samples"] == 8  # what the verdict was judged on
    for remedy in dropped["remedies"]:
        if remedy.get("failures") and "at most" in remedy["failures"][0]:
            assert remedy["stopped_after_samples"] == 8
    assert [v.id for v in result.manifest.variants] == ["onnx-fp32"]


def test_an_int8_variant_that_passes_is_judged_on_every_sample(mlp, tmp_path):
    result = package(tmp_path, *mlp)

    int8 = {v.id: v for v in result.manifest.variants}["onnx-int8"]
    assert int8.gate["passed"] is True
    assert int8.metrics["outputs"]["logits"]["samples"] == 32


# -- the CLI shows the timeline --------------------------------------------------------------------


def test_cli_prints_the_time_per_pass_and_json_carries_it(mlp, tmp_path):
    model, calibration, validation = mlp
    runner = CliRunner()
    profile = write_profile(tmp_path / "p.yaml", None)
    common = ["package", str(model), "--target", str(profile), "--calibration", str(calibration),
              "--validation", str(validation), "--bench-runs", "1"]

    human = runner.invoke(app, common + ["--out", str(tmp_path / "human")])
    as_json = runner.invoke(app, common + ["--out", str(tmp_path / "json"), "--json"])

    assert human.exit_code == 0, human.output
    assert "time per pass: " in human.stderr and "sign and write" in human.stderr
    assert as_json.exit_code == 0, as_json.output
    passes = json.loads(as_json.stdout)["host"]["packaging"]["passes"]
    assert [p["name"] for p in passes][:3] == ["signing key", "load model", "fix input shapes"]
    assert all(isinstance(p["seconds"], float) for p in passes)


def test_the_outlier_sample_really_breaks_minmax_int8(mlp, outlier_calibration, tmp_path):
    # Guards the fixture above: without the outlier the same model's int8 passes.
    model, calibration, validation = mlp
    (tmp_path / "good").mkdir()
    good = package(tmp_path / "good", model, calibration, validation, int8="{max_float_nodes: 0}")
    assert [v.id for v in good.manifest.variants] == ["onnx-fp32", "onnx-int8"]
    assert np.load(outlier_calibration)["input"].max() > 1e3
