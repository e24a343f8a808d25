"""Calibration/validation data: files checked against the model inputs, synthetic data, the plan."""

from __future__ import annotations

import numpy as np
import pytest

from edgesdk.errors import CalibrationDataError, ConfigError
from edgesdk.manifest import TensorSpec
from edgesdk.pipeline.calibration import (
    load_samples,
    plan_data,
    save_samples,
    synthetic_samples,
)

IMAGE = TensorSpec("image", "float32", ("batch", 3, 8, 8))
IDS = TensorSpec("ids", "int32", (1, "seq"))
INPUTS = [IMAGE, IDS]


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good(path, n=4, seq=5):
    rng = np.random.default_rng(0)
    return _npz(path, image=rng.random((n, 1, 3, 8, 8), dtype=np.float32),
                ids=rng.integers(0, 100, (n, 1, seq)).astype(np.int32))


def test_loads_npz_into_one_feed_per_sample(tmp_path):
    samples = load_samples(_good(tmp_path / "cal.npz", n=4), INPUTS)

    assert len(samples) == 4
    assert set(samples[0]) == {"image", "ids"}
    assert samples[0]["image"].shape == (1, 3, 8, 8) and samples[0]["image"].dtype == np.float32
    assert samples[3]["ids"].shape == (1, 5) and samples[3]["ids"].dtype == np.int32


def test_save_samples_writes_what_load_samples_reads(tmp_path):
    samples = synthetic_samples(INPUTS, 3, seed=1)
    save_samples(samples, tmp_path / "ref.npz")
    again = load_samples(tmp_path / "ref.npz", INPUTS)
    assert len(again) == 3
    np.testing.assert_array_equal(again[2]["ids"], samples[2]["ids"])


def test_loads_npy_for_single_input_model(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((6, 1, 3, 8, 8), np.float32))
    assert len(load_samples(tmp_path / "x.npy", [IMAGE])) == 6


def test_rejects_npy_for_multi_input_model(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((6, 1, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationDataError, match=r"x\.npy: .*single-input"):
        load_samples(tmp_path / "x.npy", INPUTS)


def test_folder_concatenates_files_in_name_order(tmp_path):
    for name, value in (("b.npz", 2.0), ("a.npz", 1.0)):
        _npz(tmp_path / name, image=np.full((2, 1, 3, 8, 8), value, np.float32),
             ids=np.zeros((2, 1, 3), np.int32))
    (tmp_path / "notes.txt").write_text("ignored")

    samples = load_samples(tmp_path, INPUTS)

    assert [float(s["image"].flat[0]) for s in samples] == [1.0, 1.0, 2.0, 2.0]


def test_symbolic_dims_match_any_size(tmp_path):
    samples = load_samples(_good(tmp_path / "c.npz", seq=17), INPUTS)
    assert samples[0]["ids"].shape == (1, 17)


@pytest.mark.parametrize("arrays, fragments", [
    ({"image": np.zeros((2, 1, 3, 8, 8), np.float32), "ids": np.zeros((2, 1, 4), np.int32),
      "label": np.zeros(2)}, ["unknown input name(s) 'label'", "model inputs: image, ids"]),
    ({"image": np.zeros((2, 1, 3, 8, 8), np.float32)}, ["missing input(s) 'ids'"]),
    ({"image": np.zeros((2, 1, 3, 9, 8), np.float32), "ids": np.zeros((2, 1, 4), np.int32)},
     ["input 'image'", "expected shape N×batch×3×8×8, got 2×1×3×9×8"]),
    ({"image": np.zeros((1, 3, 8, 8), np.float32), "ids": np.zeros((2, 1, 4), np.int32)},
     ["input 'image'", "new leading axis"]),
    ({"image": np.zeros((2, 1, 3, 8, 8), np.float32), "ids": np.full((2, 1, 4), 0.5)},
     ["input 'ids'", "float64 data cannot feed an input of dtype int32", "non-integer"]),
    ({"image": np.zeros((2, 1, 3, 8, 8), np.float32), "ids": np.full((2, 1, 4), 2**40, np.int64)},
     ["input 'ids'", "outside"]),
    ({"image": np.zeros((2, 1, 3, 8, 8), np.complex64), "ids": np.zeros((2, 1, 4), np.int32)},
     ["input 'image'", "complex64"]),
    ({"image": np.zeros((3, 1, 3, 8, 8), np.float32), "ids": np.zeros((2, 1, 4), np.int32)},
     ["different numbers of samples", "image: 3", "ids: 2"]),
    ({"image": np.zeros((0, 1, 3, 8, 8), np.float32), "ids": np.zeros((0, 1, 4), np.int32)},
     ["no samples"]),
], ids=["unknown-name", "missing-name", "shape", "no-sample-axis", "float-for-int", "int-overflow",
        "complex", "different-n", "empty"])
def test_rejects_bad_data_naming_file_and_input(tmp_path, arrays, fragments):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationDataError) as exc:
        load_samples(path, INPUTS)
    text = str(exc.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in text[len(str(path)):], text


def test_casts_safe_dtypes(tmp_path):
    path = _npz(tmp_path / "c.npz", image=np.ones((2, 1, 3, 8, 8), np.int64),  # int → float is fine
                ids=np.full((2, 1, 4), 7.0))  # integral floats → int is fine
    samples = load_samples(path, INPUTS)
    assert samples[0]["image"].dtype == np.float32 and samples[0]["ids"].dtype == np.int32
    assert int(samples[1]["ids"][0, 0]) == 7


@pytest.mark.parametrize("content", [b"hello, not numpy", b"PK\x03\x04broken zip"], ids=["text", "bad-zip"])
def test_rejects_file_that_is_not_npz(tmp_path, content):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(CalibrationDataError, match="data.npz: not"):
        load_samples(path, INPUTS)


def test_rejects_pickled_object_arrays(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, image=np.array([object()] * 2, dtype=object), ids=np.zeros((2, 1, 4), np.int32))
    with pytest.raises(CalibrationDataError, match="obj.npz"):
        load_samples(path, INPUTS)


def test_rejects_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CalibrationDataError, match="not found"):
        load_samples(tmp_path / "nope.npz", INPUTS)
    with pytest.raises(CalibrationDataError, match="no .npz or .npy"):
        load_samples(tmp_path, INPUTS)


def test_synthetic_samples_follow_the_documented_rules():
    specs = [TensorSpec("img", "float32", ("n", 3, "h", "w")), TensorSpec("tokens", "int64", ("n", "seq")),
             TensorSpec("mask", "int64", ("n", "seq")), TensorSpec("feat", "float16", (1, "d")),
             TensorSpec("q", "int8", (4,)), TensorSpec("flag", "bool", ())]

    samples = synthetic_samples(specs, 2, seed=3)

    s = samples[0]
    assert s["img"].shape == (1, 3, 224, 224) and s["img"].dtype == np.float32
    assert 0.0 <= s["img"].min() and s["img"].max() < 1.0  # image-like: uniform [0, 1)
    assert s["tokens"].shape == s["mask"].shape == (1, 32)
    assert s["tokens"].min() >= 0 and s["tokens"].max() < 256
    assert s["feat"].dtype == np.float16 and s["feat"].min() < 0  # standard normal
    assert s["q"].dtype == np.int8 and s["q"].min() >= 0
    assert s["flag"].dtype == np.bool_ and s["flag"].shape == ()
    assert not np.array_equal(samples[0]["img"], samples[1]["img"])
    again = synthetic_samples(specs, 2, seed=3)
    np.testing.assert_array_equal(again[1]["tokens"], samples[1]["tokens"])


def test_synthetic_shapes_override_wins():
    samples = synthetic_samples([IMAGE], 1, shapes_override={"image": (2, 3, 8, 8)})
    assert samples[0]["image"].shape == (2, 3, 8, 8)


def test_synthetic_refuses_string_inputs():
    with pytest.raises(CalibrationDataError, match="'text'"):
        synthetic_samples([TensorSpec("text", "str", (1,))], 1)


def test_plan_without_data_is_synthetic_and_says_so():
    plan = plan_data(INPUTS, n_synthetic=4)

    assert plan.source == "synthetic" and plan.synthetic
    assert len(plan.calibration) == 4 and len(plan.validation) == 4
    assert not np.array_equal(plan.calibration[0]["image"], plan.validation[0]["image"])
    assert any("synthetic" in note for note in plan.notes)
    assert plan.describe()["synthetic"] is True


def test_plan_holds_out_validation_from_calibration(tmp_path):
    plan = plan_data(INPUTS, calibration_path=_good(tmp_path / "c.npz", n=8), holdout=0.25)

    assert plan.source == "split" and not plan.synthetic
    assert len(plan.validation) == 2 and len(plan.calibration) == 6
    val = {s["image"].tobytes() for s in plan.validation}
    assert not val & {s["image"].tobytes() for s in plan.calibration}


def test_plan_with_single_sample_uses_it_for_both(tmp_path):
    plan = plan_data(INPUTS, calibration_path=_good(tmp_path / "c.npz", n=1))
    assert len(plan.calibration) == len(plan.validation) == 1
    assert any("both" in note for note in plan.notes)


def test_plan_uses_given_validation_file_and_caps_calibration(tmp_path):
    plan = plan_data(INPUTS, calibration_path=_good(tmp_path / "c.npz", n=10),
                     validation_path=_good(tmp_path / "v.npz", n=3), max_calibration=4)
    assert plan.source == "file" and not plan.synthetic
    assert len(plan.calibration) == 4 and len(plan.validation) == 3


def test_plan_rejects_bad_holdout():
    with pytest.raises(ConfigError, match="holdout"):
        plan_data(INPUTS, holdout=1.0)
