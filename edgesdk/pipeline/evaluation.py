"""Task metrics for the accuracy gate: a user's `--evaluator module:function`, or top-1 with `--labels`.

An evaluator is ``fn(outputs: list[dict[str, np.ndarray]], labels: np.ndarray | None) -> float``
(higher is better), called with the outputs of one variant over the validation samples, in order.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgesdk.errors import CalibrationDataError, ConfigError

Evaluator = Callable[[list[dict[str, np.ndarray]], "np.ndarray | None"], float]


def load_evaluator(spec: str) -> Evaluator:
    """Import ``module:function`` (a module name on sys.path, or a path to a .py file)."""
    if ":" not in spec:
        raise ConfigError(f"--evaluator {spec!r}: expected module:function")
    module_name, func_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"--evaluator {spec!r}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(f"edgesdk_evaluator_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[module_spec.name] = module  # type: ignore[union-attr]
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # an evaluator module can fail in any way while importing
        raise ConfigError(f"--evaluator {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"--evaluator {spec!r}: {module_name} has no function {func_name!r}")
    return func


def load_labels(path: Path, expected: int) -> np.ndarray:
    """Labels for the validation samples: a .npy array or an .npz with a `labels` array, N long."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CalibrationDataError(f"{path}: labels file not found") from None
    except (ValueError, OSError) as exc:
        raise CalibrationDataError(f"{path}: not a .npy/.npz labels file ({exc})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        if "labels" not in loaded.files:
            raise CalibrationDataError(f"{path}: npz has no 'labels' array (has {', '.join(loaded.files)})")
        labels = loaded["labels"]
    else:
        labels = loaded
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != expected:
        raise CalibrationDataError(f"{path}: {labels.shape[0]} labels for {expected} validation samples")
    return labels


def top1_accuracy(output_name: str) -> Evaluator:
    """The built-in task metric with --labels: top-1 accuracy of one class-like output."""

    def evaluate(outputs: list[dict[str, np.ndarray]], labels: np.ndarray | None) -> float:
        if labels is None:
            raise ConfigError("top-1 accuracy needs --labels")
        predicted = np.concatenate([np.asarray(o[output_name]).reshape(-1, np.asarray(o[output_name]).shape[-1])
                                    .argmax(axis=-1) for o in outputs])
        return float(np.mean(predicted == labels[: predicted.shape[0]]))

    return evaluate


def evaluate_safely(evaluator: Evaluator, outputs: list[dict[str, np.ndarray]], labels: np.ndarray | None,
                    spec: str) -> float:
    try:
        score = evaluator(outputs, labels)
    except Exception as exc:  # the user's code; report it in one line
        raise ConfigError(f"evaluator {spec} failed: {type(exc).__name__}: {exc}") from None
    try:
        return float(score)
    except (TypeError, ValueError):
        raise ConfigError(f"evaluator {spec} returned {score!r}, expected a number") from None
