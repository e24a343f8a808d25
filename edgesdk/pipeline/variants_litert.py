"""The LiteRT variant: a ``.tflite`` input is shipped as it is (no conversion, no re-quantization).

The file is read with LiteRT (``ai-edge-litert``, which runs on numpy 2 and accepts custom-op
models that the last ``tflite-runtime`` rejects) so a broken file fails here, not on a device, and
its input/output signature and int8 op count go into the result.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgesdk.errors import ModelError, first_line
from edgesdk.pipeline.build_support import config_from_options, publish, work_dir
from edgesdk.pipeline.graph_stats import BuiltVariant
from edgesdk.profiles import VARIANT_KINDS

_INT_TYPES = {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)}
_CONVERSION_OPS = {"QUANTIZE", "DEQUANTIZE"}


@dataclass(frozen=True)
class TFLiteConfig:
    """tflite has nothing to set: the file is passed through."""


class TFLitePassthrough:
    """Copy a .tflite model into the variant folder as ``model.tflite`` and describe it."""

    kind: ClassVar[str] = "tflite"
    Config: ClassVar[type] = TFLiteConfig

    def __init__(self, config: TFLiteConfig | None = None) -> None:
        self.config = config if config is not None else TFLiteConfig()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TFLitePassthrough:
        return cls(config_from_options(cls.Config, cls.kind, options))

    def build(self, source: Path, out_dir: Path, samples: Any = None) -> BuiltVariant:
        source, out_dir = Path(source), Path(out_dir)
        interpreter = _open(source)
        signature = {"inputs": _specs(interpreter.get_input_details()),
                     "outputs": _specs(interpreter.get_output_details())}
        quantized, notes = _int8_op_count(interpreter)
        with work_dir(out_dir, self.kind) as work:
            staged = work / "model.tflite"
            shutil.copyfile(source, staged)
            files = publish([staged], out_dir)
        info = VARIANT_KINDS[self.kind]
        return BuiltVariant(kind=self.kind, files=files, precision=info.precision, runtime=info.runtime,
                            quantized_nodes=quantized, notes=notes, io_signature=signature)


def _open(path: Path) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ModelError(f"{path}: LiteRT is not installed (pip install edgesdk[litert])") from None
    if not path.is_file():
        raise ModelError(f"{path}: no such TFLite file")
    with path.open("rb") as handle:
        if handle.read(8)[4:8] != b"TFL3":
            raise ModelError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        return Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: LiteRT cannot read this TFLite model: {first_line(exc)}") from None


def _specs(details: list[dict]) -> dict[str, dict[str, Any]]:
    specs = {}
    for d in details:
        signature = d.get("shape_signature")
        dims = signature if signature is not None and len(signature) else d["shape"]
        specs[d["name"]] = {"shape": ["?" if int(x) < 0 else int(x) for x in dims],
                            "dtype": np.dtype(d["dtype"]).name}
    return specs


def _int8_op_count(interpreter: Any) -> tuple[int, list[str]]:
    """Ops (other than QUANTIZE/DEQUANTIZE) reading an 8/16-bit integer tensor: 0 for a float model.

    Uses the interpreter's private ``_get_ops_details``; where it is missing the count is 0, noted.
    """
    try:
        dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
        ops = interpreter._get_ops_details()
    except Exception as exc:  # private API: absent or changed in another LiteRT release
        return 0, [f"int8 ops not counted: {first_line(exc)}"]
    count = sum(1 for op in ops if op.get("op_name") not in _CONVERSION_OPS
                and any(dtypes.get(int(i)) in _INT_TYPES for i in op.get("inputs", []) if int(i) >= 0))
    return count, []
