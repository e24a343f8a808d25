"""The manifest's `requires` (runtime → variant ids): written by the packager, derived for manifests
written before it existed, and refused when it disagrees with the variants."""

from __future__ import annotations

import copy
import json

import pytest

from edgesdk.errors import PackageError
from edgesdk.manifest import Manifest, TensorSpec, Variant, runtimes_of


def pi5_manifest(requires: dict | None = None) -> Manifest:
    variants = [Variant(id=i, kind=i, format=f, precision="fp32", runtime=r, file=f"variants/{i}/model")
                for i, f, r in [("onnx-fp32", "onnx", "onnxruntime"), ("openvino-fp32", "openvino-ir", "openvino"),
                                ("onnx-int8", "onnx", "onnxruntime"), ("tflite", "tflite", "litert")]]
    return Manifest(name="m", version="1", target="raspberry-pi-5", source={}, inputs=[TensorSpec("x", "float32", (1,))],
                    outputs=[TensorSpec("y", "float32", (1,))], variants=variants,
                    requires=requires if requires is not None else runtimes_of(variants))


EXPECTED = {"onnxruntime": ["onnx-fp32", "onnx-int8"], "openvino": ["openvino-fp32"], "litert": ["tflite"]}


def test_requires_written_by_the_packager_reads_back() -> None:
    manifest = pi5_manifest()

    again = Manifest.from_bytes(manifest.to_bytes())

    assert json.loads(manifest.to_bytes())["requires"] == EXPECTED
    assert again.requires == EXPECTED and again.required_runtimes() == EXPECTED


def test_manifest_written_before_requires_existed_still_reads_and_derives_it() -> None:
    data = pi5_manifest().to_dict()
    del data["requires"]

    old = Manifest.from_bytes(json.dumps(data).encode())

    assert old.requires == {}
    assert old.required_runtimes() == EXPECTED


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("openvino"), "leaves out variant 'openvino-fp32'"),
    (lambda r: r["onnxruntime"].append("onnx-fp16"), "no variant 'onnx-fp16'"),
    (lambda r: r["litert"].append("onnx-fp32"), "runs on onnxruntime, not litert"),
    (lambda r: r["onnxruntime"].append("onnx-int8"), "listed twice"),
    (lambda r: r.update(openvino=[]), "requires.openvino: names no variant"),
    (lambda r: r.update(openvino="openvino-fp32"), "requires.openvino: expected list"),
    (lambda r: r["litert"].__setitem__(0, 7), r"requires.litert\[0\]: expected string"),
])
def test_requires_that_disagrees_with_the_variants_is_refused(change, message: str) -> None:
    requires = copy.deepcopy(EXPECTED)
    change(requires)
    raw = pi5_manifest(requires).to_bytes()

    with pytest.raises(PackageError, match=message):
        Manifest.from_bytes(raw)


def test_requires_that_is_not_an_object_is_refused() -> None:
    data = pi5_manifest().to_dict() | {"requires": ["onnxruntime"]}

    with pytest.raises(PackageError, match="requires: expected object"):
        Manifest.from_bytes(json.dumps(data).encode())
