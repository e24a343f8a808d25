"""Real sample inputs for image models, from the photos scikit-learn ships (no download).

Writes calibration/validation .npz files in the edgesdk format (keyed by input name, samples
stacked on a new leading axis) for an NCHW image model, and optionally orientation labels:
each crop is rotated by a multiple of 90° and labelled with it, for an orientation classifier.

    python scripts/sample_data.py MODEL.onnx --out DIR [--calibration 48] [--validation 32] [--rotations]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def image_crops(n: int, size: tuple[int, int], seed: int = 0, rotations: bool = False,
                normalise: str = "imagenet") -> tuple[np.ndarray, np.ndarray]:
    """``n`` crops of the sample photos as N×1×3×H×W float32, and their clockwise rotation classes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    height, width = size
    out = np.empty((n, 1, 3, height, width), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.shape[:2]) // 3, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = photo[top:top + side, left:left + side]
        crop = np.asarray(Image.fromarray(crop).resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
        if rotations:
            # np.rot90 turns counter-clockwise; the orientation classes (0, 90, 180, 270) count
            # clockwise, so k counter-clockwise quarter turns are class (4 - k) % 4.
            k = i % 4
            crop = np.rot90(crop, k=k).copy() if height == width else crop
            labels[i] = (4 - k) % 4
        if normalise == "imagenet":
            crop = (crop - IMAGENET_MEAN) / IMAGENET_STD
        out[i, 0] = crop.transpose(2, 0, 1)
    return out, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="ONNX image model with one NCHW float input")
    parser.add_argument("--out", type=Path, required=True, help="folder for calibration.npz, validation.npz")
    parser.add_argument("--calibration", type=int, default=48, help="calibration samples")
    parser.add_argument("--validation", type=int, default=32, help="validation samples")
    parser.add_argument("--size", default=None, help="HxW for dynamic spatial dims, e.g. 320x320")
    parser.add_argument("--rotations", action="store_true", help="rotate crops by k×90° and write labels.npy")
    parser.add_argument("--normalise", choices=("imagenet", "unit"), default="imagenet")
    args = parser.parse_args()

    import onnx

    graph = onnx.load(str(args.model), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        parser.error(f"{args.model}: expected one 4-D image input")
    dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim]
    size = tuple(int(x) for x in args.size.split("x")) if args.size else (dims[2], dims[3])
    if None in size:
        parser.error(f"{args.model}: spatial dims are dynamic; pass --size HxW")
    args.out.mkdir(parents=True, exist_ok=True)
    cal, _ = image_crops(args.calibration, size, seed=1, normalise=args.normalise)
    val, labels = image_crops(args.validation, size, seed=2, rotations=args.rotations, normalise=args.normalise)
    np.savez(args.out / "calibration.npz", **{inputs[0].name: cal})
    np.savez(args.out / "validation.npz", **{inputs[0].name: val})
    if args.rotations:
        np.save(args.out / "labels.npy", labels)
    print(f"wrote {args.calibration} calibration and {args.validation} validation samples of "
          f"{inputs[0].name} 1×3×{size[0]}×{size[1]} to {args.out}")


if __name__ == "__main__":
    main()
