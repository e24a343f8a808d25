"""One entry point for building any variant kind: dispatch to the kind's builder with its options.

The repair search passes ``exclude`` (nodes to keep in float); it becomes the builder config's
``nodes_to_exclude`` for the kinds that have one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgesdk.errors import ConfigError
from edgesdk.pipeline.graph_stats import BuiltVariant, VariantNotApplicable
from edgesdk.pipeline.variants_litert import TFLitePassthrough
from edgesdk.pipeline.variants_onnx import ONNX_BUILDERS
from edgesdk.pipeline.variants_openvino import OPENVINO_BUILDERS

BUILDERS: dict[str, Any] = {**ONNX_BUILDERS, **OPENVINO_BUILDERS, "tflite": TFLitePassthrough}

__all__ = ["BUILDERS", "BuiltVariant", "VariantNotApplicable", "build_variant"]


def build_variant(kind: str, options: dict[str, Any], source: Any, out_dir: Path,
                  samples: list[dict], exclude: tuple[str, ...] = ()) -> BuiltVariant:
    """Build ``kind`` from ``source`` (an onnx.ModelProto, or a .tflite path for `tflite`) into ``out_dir``."""
    builder_cls = BUILDERS.get(kind)
    if builder_cls is None:
        raise ConfigError(f"no builder for variant kind {kind!r}")
    builder = builder_cls.from_options(dict(options))
    if exclude:
        config = builder.config
        if not any(f.name == "nodes_to_exclude" for f in dataclasses.fields(config)):
            raise VariantNotApplicable(f"{kind}: cannot keep chosen nodes in float")
        builder = builder_cls(dataclasses.replace(config, nodes_to_exclude=tuple(exclude)))
    out_dir.mkdir(parents=True, exist_ok=True)
    return builder.build(source, out_dir, samples)
