"""Two small models that work in sequence, for the demo's two-model device.

    digit-orientation  8x8 digit image (any of 4 rotations) -> which rotation (0/90/180/270 degrees)
    digit-reader       8x8 upright digit image -> which digit (0-9)

A client on the device feeds each image to the first, turns it upright by the answer, and feeds
the result to the second: a detector-and-recogniser pipeline in miniature. Both are scikit-learn
MLPs trained on scikit-learn's own handwritten digits (no download), written as plain ONNX
(MatMul/Add/Relu, logits out). For each model this writes the ONNX file and the packager's
calibration, validation and label files; plus a held-out set of rotated digits with both labels
for the client.

    python scripts/digit_models.py --out out/demo/digits
    python scripts/digit_models.py --reader-only --seed 1 --out out/demo/reader-1.1          # a retrain
    python scripts/digit_models.py --reader-only --hidden 1024,1024 --out out/demo/reader-1.2  # as good, slower
    python scripts/digit_models.py --reader-only --shuffle-labels --out out/demo/reader-1.3    # broken training

``--reader-only`` writes one more digit-reader (the demo's releases for its staged rollouts) from
the same split of the data, so its validation set and labels are the first one's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ROTATIONS = 4  # quarter turns


def rotated(images: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Each [8, 8] image turned counter-clockwise by its number of quarter turns."""
    return np.stack([np.rot90(img, k) for img, k in zip(images, turns)])


def mlp_to_onnx(clf, input_name: str, output_name: str, path: Path) -> Path:  # noqa: ANN001 - sklearn MLPClassifier
    """A fitted MLPClassifier (relu hidden layers) as ONNX: input [1, 64] float32 -> logits [1, classes]."""
    nodes, inits = [], []
    current = input_name
    layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        last = i == layers - 1
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [output_name if last else f"z{i}"])]
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i}"]))
            current = f"h{i}"
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                                             [1, int(clf.coefs_[-1].shape[1])])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and held-out digits (300, stratified): images scaled to 0..1, and their labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # 0..1
    return train_test_split(images, digits.target, test_size=300, stratify=digits.target, random_state=seed)


def build_reader(out: Path, seed: int, hidden: tuple[int, ...], shuffle_labels: bool) -> float:
    """Another digit-reader, trained with ``seed`` and ``hidden`` layers (on shuffled labels when
    asked: what a broken training run ships), with the same validation data as `build`'s."""
    from sklearn.neural_network import MLPClassifier

    train, test, y_train, y_test = split()
    labels = np.random.default_rng(seed).permutation(y_train) if shuffle_labels else y_train
    reader = MLPClassifier(hidden_layer_sizes=hidden, max_iter=600, random_state=seed).fit(train.reshape(-1, 64),
                                                                                          labels)
    out.mkdir(parents=True, exist_ok=True)
    up_test = test.reshape(-1, 64).astype(np.float32)
    calib = np.random.default_rng(seed).choice(len(train), 64, replace=False)
    mlp_to_onnx(reader, "image", "logits", out / "digit-reader.onnx")
    np.savez(out / "calibration.npz", image=train[calib].reshape(-1, 1, 64).astype(np.float32))
    np.savez(out / "validation.npz", image=up_test.reshape(-1, 1, 64))
    np.save(out / "labels.npy", np.asarray(y_test, dtype=np.int64))
    return float(reader.score(up_test, y_test))


def build(out: Path, seed: int = 0) -> dict[str, float]:
    from sklearn.neural_network import MLPClassifier

    out.mkdir(parents=True, exist_ok=True)
    train, test, y_train, y_test = split(seed)
    rng = np.random.default_rng(seed)
    # Every training image in all four rotations for the orientation model; upright for the reader.
    turns_train = np.repeat(np.arange(ROTATIONS), len(train))
    rot_train = rotated(np.tile(train, (ROTATIONS, 1, 1)), turns_train).reshape(-1, 64)
    orientation = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=400, random_state=seed).fit(rot_train, turns_train)
    reader = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed).fit(train.reshape(-1, 64), y_train)

    turns_test = rng.integers(0, ROTATIONS, len(test))
    rot_test = rotated(test, turns_test).reshape(-1, 64).astype(np.float32)
    up_test = test.reshape(-1, 64).astype(np.float32)
    scores = {"digit-orientation": float(orientation.score(rot_test, turns_test)),
              "digit-reader": float(reader.score(up_test, y_test))}

    calib = rng.choice(len(train), 64, replace=False)
    datasets = {
        "digit-orientation": (orientation, rotated(train[calib], rng.integers(0, ROTATIONS, 64)).reshape(-1, 64),
                              rot_test, turns_test),
        "digit-reader": (reader, train[calib].reshape(-1, 64), up_test, y_test),
    }
    for name, (clf, calibration, validation, labels) in datasets.items():
        folder = out / name
        folder.mkdir(exist_ok=True)
        mlp_to_onnx(clf, "image", "logits", folder / f"{name}.onnx")
        np.savez(folder / "calibration.npz", image=calibration.astype(np.float32).reshape(-1, 1, 64))
        np.savez(folder / "validation.npz", image=validation.astype(np.float32).reshape(-1, 1, 64))
        np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    np.savez(out / "pipeline.npz", image=rot_test, turns=turns_test, digit=y_test.astype(np.int64))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the two models and their data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reader-only", action="store_true", help="write one digit-reader into --out")
    parser.add_argument("--hidden", default="64", help="--reader-only: hidden layer sizes, e.g. 1024,1024")
    parser.add_argument("--shuffle-labels", action="store_true", help="--reader-only: train on shuffled labels")
    args = parser.parse_args()
    if args.reader_only:
        hidden = tuple(int(h) for h in args.hidden.split(","))
        score = build_reader(args.out, args.seed, hidden, args.shuffle_labels)
        print(f"digit-reader (hidden {args.hidden}, seed {args.seed}"
              f"{', shuffled labels' if args.shuffle_labels else ''}): held-out accuracy {score:.3f}")
        return
    for name, score in build(args.out, args.seed).items():
        print(f"{name}: scikit-learn accuracy on held-out digits {score:.3f}")


if __name__ == "__main__":
    main()
