"""OpenVINO IR variant builders: fp32, fp16 (compressed weights) and INT8 via NNCF.

Each converts the ONNX model with ``openvino.convert_model`` and writes ``{kind}.xml`` + ``.bin``
(main file first). The IR keeps the ONNX input/output names, so feeds by name work unchanged.

Inference precision is part of the variant (``runtime_options``), because OpenVINO's CPU plugin
runs in **bf16 by default** on CPUs with AVX512-BF16/AMX, which alone cost one classifier 9 % top-1
agreement (MODELS.md). So fp32 and int8 pin ``f32`` (int8 layers still run int8; the rest stays
f32). fp16 asks for ``f16``: GPU, NPU and fp16-capable CPUs (ARM, AMX-FP16) then compute in f16,
which is what the device does, so validating with the variant's own options measures it. A CPU
without native f16 silently runs f32 (measured on the AVX2 build host: hint f16 → f32), and there
host validation measures only the fp16 weight rounding. ``HOST_REFERENCE_OPTIONS`` is what an f32
reference run of any IR should use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from edgesdk.errors import ConfigError, PackagingError, UnsupportedModelError
from edgesdk.pipeline.build_support import (
    Samples, check_samples, config_from_options, param, publish, real_inputs, save_onnx, work_dir,
)
from edgesdk.pipeline.graph_stats import (
    BuiltVariant, VariantNotApplicable, count_openvino_quantized, ensure_node_names, first_line,
    ml_op_types,
)
from edgesdk.profiles import VARIANT_KINDS
from edgesdk.quiet import output_hint, output_mark

HOST_REFERENCE_OPTIONS: dict[str, str] = {"inference_precision_hint": "f32"}
PRESETS = ("performance", "mixed")
# OpenVINO prefixes the useful line with assertion boilerplate; these lines say nothing.
_BOILERPLATE = re.compile(r"^(Check '.*' failed at .*|FrontEnd API failed with \w+:?|"
                          r"Model wasn't fully converted\..*|Summary:|Loading input model)$")


def openvino_reason(exc: BaseException) -> str:
    """The informative line of an OpenVINO error: its "Summary:" if it has one, else the first
    line that is not assertion boilerplate ("Check 'false' failed at ...")."""
    lines = [ln.strip().lstrip("- ").strip() for ln in str(exc).splitlines() if ln.strip()]
    if "Summary:" in lines:
        summary = lines[len(lines) - lines[::-1].index("Summary:"):]
        if summary:
            return "; ".join(summary)[:300]
    useful = [ln for ln in lines if not _BOILERPLATE.match(ln)]
    return (useful or lines or [type(exc).__name__])[0][:300]


def refuse_ml_graph_openvino(model: onnx.ModelProto, kind: str) -> None:
    ops = ml_op_types(model)
    if ops:
        # Checked with skl2onnx models on OpenVINO 2026.4: "No conversion rule found for operations:
        # ai.onnx.ml.LinearClassifier, ai.onnx.ml.Scaler"; ZipMap outputs fail even to load.
        raise VariantNotApplicable(f"{kind}: classic-ML graph (ai.onnx.ml ops: {', '.join(ops)}); "
                                   "OpenVINO's ONNX frontend has no conversion rule for them")


def convert_onnx(model: onnx.ModelProto, work: Path, kind: str, notes: list[str]) -> Any:
    """ONNX → ``openvino.Model`` with the ONNX input/output names on its tensors."""
    import openvino as ov

    src = work / "input.onnx"
    save_onnx(model, src)
    try:
        ov_model = ov.convert_model(str(src))
    except Exception as exc:  # OpConversionFailure, GeneralFailure, RuntimeError ...
        raise UnsupportedModelError(f"{kind}: OpenVINO cannot convert the model: "
                                    f"{openvino_reason(exc)}") from None
    _keep_names(ov_model.inputs, real_inputs(model), "input", notes)
    _keep_names(ov_model.outputs, [o.name for o in model.graph.output], "output", notes)
    return ov_model


def _keep_names(ports: Any, names: list[str], what: str, notes: list[str]) -> None:
    if len(ports) != len(names):
        raise PackagingError(f"OpenVINO model has {len(ports)} {what}s where the ONNX model has {len(names)}")
    for port, name in zip(ports, names):
        before = sorted(port.get_names())
        if name not in before:
            port.get_tensor().set_names({name, *before})
            notes.append(f"{what} {name!r} given back its ONNX name (OpenVINO named it {before})")


def save_ir(ov_model: Any, work: Path, kind: str, compress_to_fp16: bool) -> list[Path]:
    """``{kind}.xml`` + ``.bin`` in the work folder, checked to compile on the host CPU."""
    import openvino as ov

    xml = work / "ir" / f"{kind}.xml"
    xml.parent.mkdir()
    try:
        ov.save_model(ov_model, str(xml), compress_to_fp16=compress_to_fp16)
        core = ov.Core()
        core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as exc:
        raise PackagingError(f"{kind}: OpenVINO IR does not save or load: {openvino_reason(exc)}") \
            from None
    return [xml, xml.with_suffix(".bin")]


class _OpenVinoBuilder:
    kind: ClassVar[str]
    Config: ClassVar[type]
    compress_to_fp16: ClassVar[bool] = False
    runtime_options: ClassVar[dict[str, str]] = HOST_REFERENCE_OPTIONS

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> _OpenVinoBuilder:
        return cls(config_from_options(cls.Config, cls.kind, options))

    def build(self, model: onnx.ModelProto, out_dir: Path, samples: Samples | None = None) -> BuiltVariant:
        refuse_ml_graph_openvino(model, self.kind)
        out_dir, notes = Path(out_dir), []
        model = ensure_node_names(model)  # OpenVINO names ops after ONNX nodes: ignored scopes need it
        with work_dir(out_dir, self.kind) as work:
            ov_model = convert_onnx(model, work, self.kind, notes)
            ov_model = self.transform(ov_model, model, samples, notes)
            staged = save_ir(ov_model, work, self.kind, self.compress_to_fp16)
            quantized = 0
            if VARIANT_KINDS[self.kind].precision == "int8":
                quantized = count_openvino_quantized(staged[0])
                if quantized == 0:
                    raise VariantNotApplicable(f"{self.kind}: 0 ops quantized by NNCF")
                notes.append(f"{quantized} ops consume int8 data")
            files = publish(staged, out_dir)
        info = VARIANT_KINDS[self.kind]
        return BuiltVariant(kind=self.kind, files=files, precision=info.precision, runtime=info.runtime,
                            quantized_nodes=quantized, runtime_options=dict(self.runtime_options),
                            notes=notes)

    def transform(self, ov_model: Any, model: onnx.ModelProto, samples: Samples | None,
                  notes: list[str]) -> Any:
        """Hook between conversion and saving (NNCF quantization); the base saves as converted."""
        return ov_model


@dataclass(frozen=True)
class OpenVinoFp32Config:
    """openvino-fp32 has nothing to set."""


class OpenVinoFp32Builder(_OpenVinoBuilder):
    """IR with fp32 weights, run with inference precision pinned to f32."""

    kind = "openvino-fp32"
    Config = OpenVinoFp32Config


@dataclass(frozen=True)
class OpenVinoFp16Config:
    """openvino-fp16 has nothing to set."""


class OpenVinoFp16Builder(_OpenVinoBuilder):
    """IR with fp16-compressed weights (half the size), run with an f16 precision hint."""

    kind = "openvino-fp16"
    Config = OpenVinoFp16Config
    compress_to_fp16 = True
    runtime_options = {"inference_precision_hint": "f16"}


@dataclass(frozen=True)
class OpenVinoBf16Config:
    """openvino-bf16 has nothing to set."""


class OpenVinoBf16Builder(_OpenVinoBuilder):
    """IR with fp16-compressed weights (half the size; exact for bf16, whose mantissa is shorter),
    run with an inference precision hint bf16: AVX512-BF16/AMX CPUs compute in bf16, about 2× f32
    on such CPUs (MODELS.md). A CPU without BF16 cannot run it (the session refuses, see
    `edgesdk.runtime.openvino_computes`), so a host without BF16 validates only the weights and the
    device applies the gate (``device_verified``)."""

    kind = "openvino-bf16"
    Config = OpenVinoBf16Config
    compress_to_fp16 = True
    runtime_options = {"inference_precision_hint": "bf16"}


@dataclass(frozen=True)
class OpenVinoInt8Config:
    preset: str = param("performance", "NNCF preset: 'performance' (symmetric activations, "
                                       "fastest) or 'mixed' (asymmetric activations, for "
                                       "activations not centred on 0)")
    subset_size: int = param(300, "calibration samples NNCF uses (at most the number given)")
    nodes_to_exclude: tuple[str, ...] = param((), "ONNX node names left in float (NNCF ignored scope)")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"openvino-int8: preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.subset_size < 1:
            raise ConfigError(f"openvino-int8: subset_size must be >= 1, got {self.subset_size}")
        if isinstance(self.nodes_to_exclude, str):
            raise ConfigError("openvino-int8: nodes_to_exclude must be a sequence of node names")
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))


class OpenVinoInt8Builder(_OpenVinoBuilder):
    """INT8 IR by NNCF post-training quantization over the calibration samples."""

    kind = "openvino-int8"
    Config = OpenVinoInt8Config

    def transform(self, ov_model: Any, model: onnx.ModelProto, samples: Samples | None,
                  notes: list[str]) -> Any:
        import nncf

        cfg = self.config
        check_samples(model, samples or [], self.kind)
        ignored = None
        if cfg.nodes_to_exclude:
            # OpenVINO names an op after its ONNX node, sometimes with a suffix ("conv0/WithoutBiases").
            patterns = [f"^{re.escape(n)}(/.*)?$" for n in cfg.nodes_to_exclude]
            op_names = [op.get_friendly_name() for op in ov_model.get_ops()]
            missing = [n for n, p in zip(cfg.nodes_to_exclude, patterns)
                       if not any(re.match(p, o) for o in op_names)]
            if missing:
                notes.append(f"nodes_to_exclude not in the OpenVINO model: {', '.join(missing[:10])}")
            ignored = nncf.IgnoredScope(patterns=patterns, validate=False)
        preset = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                  "mixed": nncf.QuantizationPreset.MIXED}[cfg.preset]
        subset = min(cfg.subset_size, len(samples))
        mark = output_mark()
        try:
            quantized = nncf.quantize(ov_model, nncf.Dataset(samples, _as_feeds), preset=preset,
                                      subset_size=subset, ignored_scope=ignored)
        except Exception as exc:  # nncf raises its own errors and whatever OpenVINO raised
            raise PackagingError(f"{self.kind}: nncf.quantize failed: {first_line(exc)}{output_hint(mark)}") from None
        notes.append(f"NNCF preset {cfg.preset}, {subset} calibration samples")
        return quantized


def _as_feeds(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NNCF transform: a feed dict is already what the compiled model takes (inputs by name)."""
    return sample


OPENVINO_BUILDERS: dict[str, type[_OpenVinoBuilder]] = {
    b.kind: b for b in (OpenVinoFp32Builder, OpenVinoFp16Builder, OpenVinoBf16Builder, OpenVinoInt8Builder)
}
