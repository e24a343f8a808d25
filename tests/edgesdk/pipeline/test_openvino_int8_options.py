"""openvino-int8's NNCF options (bias correction, model type, accuracy control), its float_nodes
record, and their place in target profiles.

What NNCF was really asked is read back from the IR: NNCF writes its parameters into the model's
rt_info ("nncf" → "quantization"), which survives saving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgesdk.errors import ConfigError
from edgesdk.pipeline.graph_stats import FLOAT_BY_REQUEST, split_float_nodes
from edgesdk.pipeline.postprocess import postprocess_nodes
from edgesdk.pipeline.variant_build import build_variant
from edgesdk.pipeline.variants_openvino import (
    OPENVINO_BUILDERS, OpenVinoInt8Builder, OpenVinoInt8Config, OutputCosineMetric,
)
from edgesdk.profiles import load_profile_file
from tests.edgesdk.pipeline.test_postprocess import yolov8_head_model
from tests.edgesdk.pipeline.test_variants_openvino import conv_net, cosine, images, run_ir, run_ort

ov = pytest.importorskip("openvino")


def nncf_params(xml: Path) -> dict[str, str]:
    model = ov.Core().read_model(str(xml))
    keys = ("fast_bias_correction", "model_type", "preset", "max_drop")
    return {k: model.get_rt_info(["nncf", "quantization", k]).astype(str)
            for k in keys if model.has_rt_info(["nncf", "quantization", k])}


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"model_type": "cnn"}, "model_type 'cnn'"),
    ({"max_drop": 0.0}, "max_drop must be between 0 and 1"),
    ({"max_drop": 1.5}, "max_drop must be between 0 and 1"),
    ({"max_drop": True}, "max_drop must be between 0 and 1"),
    ({"max_reverted": 0}, "max_reverted must be an integer >= 1"),
    ({"accuracy_samples": 2.5}, "accuracy_samples must be an integer >= 1"),
    ({"nodes_to_exclude": "conv1"}, "not a string"),
    ({"nodes_to_exclude": [("conv1", "a", "b")]}, "neither a node name nor"),
    ({"nodes_to_exclude": [""]}, "empty node name"),
])
def test_bad_config_is_refused_when_built(options, message):
    with pytest.raises(ConfigError, match=message):
        OpenVinoInt8Config(**options)


def test_profile_options_reach_the_config():
    builder = OPENVINO_BUILDERS["openvino-int8"].from_options(
        {"fast_bias_correction": False, "model_type": "transformer", "accuracy_control": True,
         "max_drop": 0.005, "max_reverted": 4, "accuracy_samples": 8})
    cfg = builder.config
    assert (cfg.fast_bias_correction, cfg.model_type, cfg.accuracy_control) == (False, "transformer", True)
    assert (cfg.max_drop, cfg.max_reverted, cfg.accuracy_samples) == (0.005, 4, 8)


def _profile(tmp_path: Path, options: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"""name: p
description: test
architecture: x86_64
providers: [{{runtime: openvino, provider: CPU}}]
variants:
  - kind: openvino-int8
    options: {options}
gates:
  int8: {{cosine_min: 0.98}}
""")
    return path


def test_profile_accepts_the_new_options(tmp_path):
    profile = load_profile_file(_profile(tmp_path, "{fast_bias_correction: false, model_type: transformer, "
                                              "accuracy_control: true, max_drop: 0.01, max_reverted: 8}"))
    assert profile.variants[0].options["accuracy_control"] is True


@pytest.mark.parametrize("options, key", [
    ("{accuracy_control: 1}", "accuracy_control"),
    ("{fast_bias_correction: yes please}", "fast_bias_correction"),
    ("{max_drop: true}", "max_drop"),
])
def test_profile_rejects_wrong_option_types(tmp_path, options, key):
    with pytest.raises(ConfigError, match=key):
        load_profile_file(_profile(tmp_path, options))


# -- float_nodes ---------------------------------------------------------------------------------


def test_split_float_nodes_takes_names_and_pairs():
    names, records = split_float_nodes(["a", ("b", "why b"), {"node": "c", "reason": "why c"}, "a"], "k")
    assert names == ("a", "b", "c")
    assert records == [{"node": "a", "reason": FLOAT_BY_REQUEST}, {"node": "b", "reason": "why b"},
                       {"node": "c", "reason": "why c"}]


def test_float_nodes_recorded_with_reasons(tmp_path):
    data = images(8, seed=1)
    built = build_variant("openvino-int8", {}, conv_net(), tmp_path, data,
                          exclude=("conv1", ("fc", "after the last conv")))
    assert built.float_nodes == [{"node": "conv1", "reason": FLOAT_BY_REQUEST},
                                 {"node": "fc", "reason": "after the last conv"}]
    plain = build_variant("openvino-int8", {}, conv_net(), tmp_path / "plain", data)
    assert plain.float_nodes == [] and plain.quantized_nodes > built.quantized_nodes


def test_yolov8_postprocessing_stays_float_in_the_ir(tmp_path):
    """The postprocess list passed as exclude: no FakeQuantize feeds the Sigmoid, the DFL projection
    or the head convs, while the backbone convs are int8; each node is in float_nodes with its reason."""
    model = yolov8_head_model()
    post = postprocess_nodes(model)
    rng = np.random.default_rng(0)
    data = [{"images": rng.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(8)]
    built = build_variant("openvino-int8", {}, model, tmp_path, data, exclude=tuple(post))
    assert built.float_nodes == [{"node": n, "reason": r} for n, r in post]
    ir = ov.Core().read_model(str(built.files[0]))

    def fed_by_fake_quantize(op) -> bool:
        return any(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs())

    # OpenVINO splits a biased Conv into "<name>/WithoutBiases" (the Convolution) and "<name>" (Add).
    by_name = {op.get_friendly_name(): op for op in ir.get_ops()}
    kept = ("scores", "dfl.conv", "head0/WithoutBiases", "head1/WithoutBiases", "head2/WithoutBiases")
    assert [by_name[n].get_type_name() for n in kept] == ["Sigmoid"] + ["Convolution"] * 4
    assert not any(fed_by_fake_quantize(by_name[n]) for n in kept)
    assert fed_by_fake_quantize(by_name["c4/WithoutBiases"]) and fed_by_fake_quantize(by_name["c5/WithoutBiases"])


# -- NNCF options ----------------------------------------------------------------------------------


def test_bias_correction_and_model_type_are_passed_to_nncf(tmp_path):
    cfg = OpenVinoInt8Config(fast_bias_correction=False, model_type="transformer", preset="mixed")
    built = OpenVinoInt8Builder(cfg).build(conv_net(), tmp_path / "a", images(8, seed=1))
    assert nncf_params(built.files[0]) == {"fast_bias_correction": "False", "model_type": "transformer",
                                           "preset": "mixed"}
    assert any("full bias correction" in n and "model_type transformer" in n for n in built.notes)
    default = OpenVinoInt8Builder().build(conv_net(), tmp_path / "b", images(8, seed=1))
    assert nncf_params(default.files[0])["fast_bias_correction"] == "True"


def test_accuracy_control_reverts_ops_until_the_cosine_holds(tmp_path):
    """With a drop budget far below what plain INT8 costs, NNCF reverts ops to float: fewer int8 ops,
    outputs closer to fp32, and the note says where the metric ended."""
    model, calib, test = conv_net(), images(16, seed=1), images(16, seed=2)
    plain = OpenVinoInt8Builder().build(model, tmp_path / "plain", calib)
    cfg = OpenVinoInt8Config(accuracy_control=True, max_drop=1e-5, max_reverted=2, accuracy_samples=8)
    controlled = OpenVinoInt8Builder(cfg).build(model, tmp_path / "ac", calib)
    assert nncf_params(controlled.files[0])["max_drop"] == "1e-05"
    assert 0 < controlled.quantized_nodes < plain.quantized_nodes
    reference = run_ort(model, test)
    assert cosine(run_ir(controlled.files[0], test), reference) >= cosine(run_ir(plain.files[0], test), reference)
    assert any(n.startswith("accuracy control on 8 samples") for n in controlled.notes)


class _FakeCompiled:
    """Stands in for an ov.CompiledModel: returns ``scale`` × the sample as both outputs."""

    def __init__(self, flip_second: bool = False) -> None:
        self.flip_second = flip_second

    def __call__(self, feeds):
        x = feeds["x"]
        return {"a": x, "b": -x if self.flip_second else x}


def test_output_cosine_metric_is_the_worst_outputs_mean_cosine():
    samples = [{"x": np.array([1.0, 2.0, 3.0], np.float32) * (i + 1)} for i in range(3)]
    refs = [{"a": s["x"], "b": s["x"]} for s in samples]
    metric = OutputCosineMetric(samples, refs)
    value, per_item = metric(_FakeCompiled(), [0, 1, 2])
    assert value == pytest.approx(1.0) and per_item == pytest.approx([1.0, 1.0, 1.0])
    value, per_item = metric(_FakeCompiled(flip_second=True), [1])
    assert value == pytest.approx(-1.0) and per_item == pytest.approx([-1.0])
    assert metric.last == pytest.approx(1.0)  # only a pass over all samples updates it
    assert metric.calls == 2
