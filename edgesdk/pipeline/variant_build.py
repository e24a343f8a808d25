"""One entry point for building any variant kind: dispatch to the kind's builder with its options.

The pipeline passes ``exclude`` (nodes to keep in float: the model's post-processing for every
INT8 build, plus the repair's sensitive nodes); it becomes the builder config's
``nodes_to_exclude`` for the kinds that have one. ``cache`` (one per package) lets the INT8
builders that calibrate reuse what an earlier attempt computed (edgesdk.pipeline.calibration_cache).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

from edgesdk.errors import ConfigError
from edgesdk.pipeline.calibration_cache import QuantCache
from edgesdk.pipeline.graph_stats import BuiltVariant, VariantNotApplicable
from edgesdk.pipeline.variants_litert import TFLitePassthrough
from edgesdk.pipeline.variants_onnx import ONNX_BUILDERS
from edgesdk.pipeline.variants_openvino import OPENVINO_BUILDERS

BUILDERS: dict[str, Any] = {**ONNX_BUILDERS, **OPENVINO_BUILDERS, "tflite": TFLitePassthrough}

__all__ = ["BUILDERS", "BuiltVariant", "VariantNotApplicable", "build_variant", "takes_exclude"]


def takes_exclude(kind: str) -> bool:
    """Whether ``kind``'s builder can keep chosen nodes in float (its config has nodes_to_exclude)."""
    builder_cls = BUILDERS.get(kind)
    return builder_cls is not None and any(f.name == "nodes_to_exclude"
                                           for f in dataclasses.fields(builder_cls.Config))


def build_variant(kind: str, options: dict[str, Any], source: Any, out_dir: Path,
                  samples: list[dict], exclude: tuple[str, ...] = (),
                  cache: QuantCache | None = None) -> BuiltVariant:
    """Build ``kind`` from ``source`` (an onnx.ModelProto, or a .tflite path for `tflite`) into ``out_dir``."""
    builder_cls = BUILDERS.get(kind)
    if builder_cls is None:
        raise ConfigError(f"no builder for variant kind {kind!r}")
    config = builder_cls.from_options(dict(options)).config
    if exclude:
        if not takes_exclude(kind):
            raise VariantNotApplicable(f"{kind}: cannot keep chosen nodes in float")
        config = dataclasses.replace(config, nodes_to_exclude=tuple(exclude))
    # Only builders that calibrate take the cache (the ONNX builders' constructor has it).
    takes_cache = cache is not None and "cache" in inspect.signature(builder_cls).parameters
    builder = builder_cls(config, cache=cache) if takes_cache else builder_cls(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    return builder.build(source, out_dir, samples)
