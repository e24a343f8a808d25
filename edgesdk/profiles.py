"""Target profiles: one YAML file per device kind, validated when loaded.

A profile says which runtimes/providers a device can have (in preference order), which variants
the packager builds for it, its shape policy, accuracy gates per precision and size budgets.
Built-in profiles live in the top-level ``targets/`` folder (installed as ``edgesdk.targets``);
a user's own profile is any YAML file following docs/target-profiles.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from edgesdk.errors import ConfigError
from edgesdk.yamlfile import load_yaml_file

# Runtime → the providers (ORT execution providers, OpenVINO devices, LiteRT delegates) we know.
KNOWN_PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "OpenVINOExecutionProvider",
        "XnnpackExecutionProvider",
        "CPUExecutionProvider",
    ),
    "openvino": ("NPU", "GPU", "CPU"),
    "litert": ("XNNPACK", "CPU"),
}

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class VariantKind:
    """What a variant kind is built into: file format, runtime that runs it, and precision.

    ``device_verified``: the precision the variant computes in depends on the device (bf16 needs
    AVX512-BF16/AMX, fp16 compute needs ARMv8.2/GPU/NPU), so the host's validation may have
    measured only the weight rounding. Such a variant carries its gate in the manifest
    (``device_gate``) and the agent applies it on the package's reference data before the variant
    may compete (docs/target-profiles.md, "Device-verified variants").
    """

    format: str
    runtime: str
    precision: str
    device_verified: bool = False


# The variant kinds the packager knows how to build. Profiles name these under `variants`.
VARIANT_KINDS: dict[str, VariantKind] = {
    "onnx-fp32": VariantKind("onnx", "onnxruntime", "fp32"),
    "onnx-fp16": VariantKind("onnx", "onnxruntime", "fp16", device_verified=True),
    "onnx-int8": VariantKind("onnx", "onnxruntime", "int8"),  # static QDQ with calibration
    "onnx-int8-dynamic": VariantKind("onnx", "onnxruntime", "int8"),  # MatMul-heavy graphs only
    "openvino-fp32": VariantKind("openvino-ir", "openvino", "fp32"),
    "openvino-fp16": VariantKind("openvino-ir", "openvino", "fp16", device_verified=True),
    # fp16-compressed IR run with inference precision bf16 (AVX512-BF16/AMX CPUs only)
    "openvino-bf16": VariantKind("openvino-ir", "openvino", "bf16", device_verified=True),
    "openvino-int8": VariantKind("openvino-ir", "openvino", "int8"),  # NNCF post-training
    "tflite": VariantKind("tflite", "litert", "native"),  # .tflite input passed through
}

# Options each variant kind accepts under `variants[].options`, with their types.
VARIANT_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "onnx-fp32": {},
    "onnx-fp16": {"keep_io_types": bool},
    "onnx-int8": {
        "per_channel": bool,
        "activation_symmetric": bool,
        "weight_symmetric": bool,
        "calibration_method": str,
        "max_float_nodes": int,
    },
    "onnx-int8-dynamic": {"min_matmul_fraction": (int, float)},
    "openvino-fp32": {},
    "openvino-fp16": {},
    "openvino-bf16": {},
    "openvino-int8": {
        "preset": str,
        "subset_size": int,
        "fast_bias_correction": bool,
        "model_type": str,  # "transformer"
        "accuracy_control": bool,  # nncf.quantize_with_accuracy_control on the mean output cosine
        "max_drop": (int, float),
        "max_reverted": int,
        "accuracy_samples": int,
    },
    "tflite": {},
}

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class ProviderSpec:
    """One runtime/provider a device of this target may have, with the precisions it should run."""

    runtime: str
    provider: str
    precisions: tuple[str, ...] = ()  # empty: any precision

    def runs(self, runtime: str, precision: str) -> bool:
        return self.runtime == runtime and (not self.precisions or precision in self.precisions
                                            or precision == "native")


@dataclass(frozen=True)
class VariantSpec:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> VariantKind:
        return VARIANT_KINDS[self.kind]


@dataclass(frozen=True)
class Gate:
    """Accuracy gate of one precision. A variant passes when every set threshold holds."""

    cosine_min: float = 0.99  # per output, mean cosine similarity to the fp32 reference
    top1_min: float | None = None  # top-1 agreement, for class-like outputs
    max_abs_error: float | None = None  # per output, worst absolute error
    spread_ratio_min: float = 0.5  # collapse check: std(variant)/std(reference) per channel
    task_metric_drop_max: float | None = None  # with --evaluator: allowed drop (absolute)


@dataclass(frozen=True)
class ShapePolicy:
    policy: str = "dynamic"  # "dynamic" keeps symbolic dims; "static" fixes every dim
    batch: int = 1  # value given to a symbolic batch dim when shapes are fixed


@dataclass(frozen=True)
class Budgets:
    max_package_mb: float | None = None
    max_memory_mb: float | None = None


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    architecture: str
    providers: tuple[ProviderSpec, ...]
    variants: tuple[VariantSpec, ...]
    shapes: ShapePolicy
    gates: dict[str, Gate]
    budgets: Budgets
    board_match: tuple[str, ...] = ()  # substrings of /proc/device-tree/model that identify it
    source: str = ""  # file it was loaded from
    family: str = ""  # `--target FAMILY` builds for every built-in profile of it; default: the name's first word
    aliases: tuple[str, ...] = ()  # other names `--target` takes for the family ("rpi" for raspberry-pi)

    def gate_for(self, precision: str) -> Gate:
        """The gate of ``precision``; bf16 without a gate of its own takes fp16's (both keep an
        8-bit exponent or more and round the mantissa), anything else without one fp32's."""
        if precision == "bf16" and "bf16" not in self.gates:
            precision = "fp16"
        return self.gates.get(precision) or self.gates.get("fp32") or Gate()

    def providers_for(self, runtime: str, precision: str) -> list[ProviderSpec]:
        """The profile's providers that may run a variant of this runtime and precision, in order."""
        return [p for p in self.providers if p.runs(runtime, precision)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TOP_KEYS = {"name", "description", "architecture", "providers", "variants", "shapes", "gates",
             "budgets", "board_match", "family", "aliases"}
_REQUIRED = ("name", "architecture", "providers", "variants")
ARCHITECTURES = ("x86_64", "aarch64")


def _fail(source: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {why}")


def _check_type(source: str, key: str, value: Any, typ: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; a YAML `true` given where a number is expected is still wrong.
    if isinstance(value, bool) and typ is not bool and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise _fail(source, key, f"expected {_tname(typ)}, got {value!r}")
    if not isinstance(value, typ):
        raise _fail(source, key, f"expected {_tname(typ)}, got {type(value).__name__} {value!r}")
    return value


# A family or alias is typed on the command line: lowercase, no spaces, no path separators.
_TARGET_WORD = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _check_target_word(source: str, key: str, value: Any) -> str:
    _check_type(source, key, value, str)
    if not _TARGET_WORD.fullmatch(value):
        raise _fail(source, key, f"{value!r} is not a target name: use 1-64 lowercase letters, digits, '.', '_', '-'")
    return value


def _tname(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


def _check_keys(source: str, where: str, data: dict, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise _fail(source, f"{where}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def parse_profile(data: Any, source: str) -> TargetProfile:
    """Validate a profile's parsed YAML and build it; every error names the file and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a target profile must be a YAML mapping")
    _check_keys(source, "", data, _TOP_KEYS)
    for key in _REQUIRED:
        if key not in data:
            raise _fail(source, key, "missing required key")
    name = _check_type(source, "name", data["name"], str)
    description = _check_type(source, "description", data.get("description", ""), str)
    arch = _check_type(source, "architecture", data["architecture"], str)
    if arch not in ARCHITECTURES:
        raise _fail(source, "architecture", f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")

    providers = []
    for i, entry in enumerate(_check_type(source, "providers", data["providers"], list)):
        where = f"providers[{i}]"
        _check_type(source, where, entry, dict)
        _check_keys(source, where + ".", entry, {"runtime", "provider", "precisions"})
        runtime = _check_type(source, where + ".runtime", entry.get("runtime"), str)
        if runtime not in KNOWN_PROVIDERS:
            raise _fail(source, where + ".runtime",
                        f"unknown runtime {runtime!r} (known: {', '.join(KNOWN_PROVIDERS)})")
        provider = _check_type(source, where + ".provider", entry.get("provider"), str)
        if provider not in KNOWN_PROVIDERS[runtime]:
            raise _fail(source, where + ".provider", f"unknown provider {provider!r} for {runtime} "
                        f"(known: {', '.join(KNOWN_PROVIDERS[runtime])})")
        precisions = tuple(_check_type(source, where + ".precisions", entry.get("precisions", []), list))
        for p in precisions:
            if p not in PRECISIONS:
                raise _fail(source, where + ".precisions", f"unknown precision {p!r}")
        providers.append(ProviderSpec(runtime, provider, precisions))
    if not providers:
        raise _fail(source, "providers", "must list at least one runtime/provider")

    variants = []
    for i, entry in enumerate(_check_type(source, "variants", data["variants"], list)):
        where = f"variants[{i}]"
        if isinstance(entry, str):
            entry = {"kind": entry}
        _check_type(source, where, entry, dict)
        _check_keys(source, where + ".", entry, {"kind", "options"})
        kind = _check_type(source, where + ".kind", entry.get("kind"), str)
        if kind not in VARIANT_KINDS:
            raise _fail(source, where + ".kind",
                        f"unknown variant kind {kind!r} (known: {', '.join(VARIANT_KINDS)})")
        options = _check_type(source, where + ".options", entry.get("options", {}) or {}, dict)
        allowed = VARIANT_OPTIONS[kind]
        _check_keys(source, where + ".options.", options, set(allowed))
        for key, value in options.items():
            _check_type(source, f"{where}.options.{key}", value, allowed[key])
        method = options.get("calibration_method")
        if method is not None and method not in CALIBRATION_METHODS:
            raise _fail(source, where + ".options.calibration_method",
                        f"unknown method {method!r} (known: {', '.join(CALIBRATION_METHODS)})")
        info = VARIANT_KINDS[kind]
        if not any(p.runs(info.runtime, info.precision) for p in providers):
            raise _fail(source, where + ".kind",
                        f"no provider in this profile runs {kind} ({info.runtime} {info.precision})")
        if any(v.kind == kind for v in variants):
            raise _fail(source, where + ".kind", f"variant kind {kind!r} is listed twice")
        variants.append(VariantSpec(kind, dict(options)))
    if not variants:
        raise _fail(source, "variants", "must list at least one variant")

    shapes_data = _check_type(source, "shapes", data.get("shapes", {}) or {}, dict)
    _check_keys(source, "shapes.", shapes_data, {"policy", "batch"})
    policy = _check_type(source, "shapes.policy", shapes_data.get("policy", "dynamic"), str)
    if policy not in ("dynamic", "static"):
        raise _fail(source, "shapes.policy", f"must be 'dynamic' or 'static', got {policy!r}")
    batch = _check_type(source, "shapes.batch", shapes_data.get("batch", 1), int)
    if batch < 1:
        raise _fail(source, "shapes.batch", "must be ≥ 1")

    gates: dict[str, Gate] = {}
    gate_fields = {f.name: f for f in dataclasses.fields(Gate)}
    for precision, gate_data in (_check_type(source, "gates", data.get("gates", {}) or {}, dict)).items():
        where = f"gates.{precision}"
        if precision not in PRECISIONS:
            raise _fail(source, where, f"unknown precision (known: {', '.join(PRECISIONS)})")
        _check_type(source, where, gate_data, dict)
        _check_keys(source, where + ".", gate_data, set(gate_fields))
        values = {}
        for key, value in gate_data.items():
            if value is not None:
                _check_type(source, f"{where}.{key}", value, (int, float))
            values[key] = None if value is None else float(value)
        gates[precision] = Gate(**values)

    budgets_data = _check_type(source, "budgets", data.get("budgets", {}) or {}, dict)
    _check_keys(source, "budgets.", budgets_data, {"max_package_mb", "max_memory_mb"})
    for key, value in budgets_data.items():
        if value is not None:
            _check_type(source, f"budgets.{key}", value, (int, float))
    board = tuple(_check_type(source, "board_match", data.get("board_match", []) or [], list))
    for i, b in enumerate(board):
        _check_type(source, f"board_match[{i}]", b, str)
    if "family" in data:
        family = _check_target_word(source, "family", data["family"])
    else:  # the name's first word ("jetson" of jetson-orin-nano), when it can be one
        first = name.split("-", 1)[0].lower()
        family = first if _TARGET_WORD.fullmatch(first) else ""
    aliases = tuple(_check_target_word(source, f"aliases[{i}]", a)
                    for i, a in enumerate(_check_type(source, "aliases", data.get("aliases", []) or [], list)))

    return TargetProfile(
        name=name, description=description, architecture=arch, providers=tuple(providers),
        variants=tuple(variants), shapes=ShapePolicy(policy, batch), gates=gates,
        budgets=Budgets(**{k: (None if v is None else float(v)) for k, v in budgets_data.items()}),
        board_match=board, source=source, family=family, aliases=aliases,
    )


def load_profile_file(path: str | Path) -> TargetProfile:
    path = Path(path)
    data = load_yaml_file(path, "target profile")
    return parse_profile(data, str(path))


def _builtin_dir():
    return importlib.resources.files("edgesdk.targets")


def builtin_profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_builtin(name: str) -> TargetProfile:
    resource = _builtin_dir() / f"{name}.yaml"
    if not resource.is_file():
        known = ", ".join(builtin_profile_names())
        raise ConfigError(f"unknown target {name!r} (built-in targets: {known}; or give a profile .yaml path)")
    with importlib.resources.as_file(resource) as path:
        profile = load_profile_file(path)
    if profile.name != name:
        raise ConfigError(f"{path}: name: is {profile.name!r} but the file is {name}.yaml")
    return profile


def all_builtin_profiles() -> list[TargetProfile]:
    return [load_builtin(n) for n in builtin_profile_names()]


# -- target names: what `--target` takes ---------------------------------------------------------
@dataclass(frozen=True)
class TargetSelection:
    """What a `--target` argument named: one profile (its name, a unique prefix of it, or a profile
    file), or a family (its name or an alias), which stands for every built-in profile of it."""

    asked: str
    profiles: tuple[TargetProfile, ...]
    family: str | None = None  # set when ``asked`` named a family


@dataclass(frozen=True)
class TargetNames:
    """The names `--target` takes for the built-in profiles: profile names, families, aliases."""

    profiles: dict[str, TargetProfile]
    families: dict[str, tuple[str, ...]]  # family → its profile names, sorted
    aliases: dict[str, str]  # alias → family

    @classmethod
    def of(cls, profiles: list[TargetProfile]) -> TargetNames:
        """Index ``profiles``; a family or alias that would make a name mean two things is refused."""
        by_name = {p.name: p for p in sorted(profiles, key=lambda p: p.name)}
        families: dict[str, list[str]] = {}
        for p in by_name.values():
            if p.family:
                families.setdefault(p.family, []).append(p.name)
        aliases: dict[str, str] = {}
        for p in by_name.values():
            # A family named like one of its own profiles is fine only when it is that profile alone.
            if p.family in by_name and families[p.family] != [p.family]:
                raise ConfigError(f"{p.source}: family: {p.family!r} is also the name of the profile {p.family}")
            for alias in p.aliases:
                if not p.family:
                    raise ConfigError(f"{p.source}: aliases: a profile with aliases needs a family")
                if alias in by_name or alias in families:
                    raise ConfigError(f"{p.source}: aliases: {alias!r} is already a profile or family name")
                if aliases.get(alias, p.family) != p.family:
                    raise ConfigError(f"{p.source}: aliases: {alias!r} already names the family {aliases[alias]}")
                aliases[alias] = p.family
        return cls(by_name, {f: tuple(names) for f, names in families.items()}, aliases)

    def resolve(self, asked: str) -> TargetSelection:
        """A profile name, a family or alias, or a unique prefix of a profile name; else ConfigError
        with the closest names ("did you mean jetson (jetson-agx-orin, jetson-orin-nano)?")."""
        key = asked.strip().lower()
        if not key:
            raise ConfigError(f"empty target name: give one ({self.all_names()}) or the path of a profile .yaml")
        if key in self.profiles:
            return TargetSelection(asked, (self.profiles[key],))
        family = key if key in self.families else self.aliases.get(key)
        if family is not None:
            return TargetSelection(asked, tuple(self.profiles[n] for n in self.families[family]), family)
        matches = [n for n in self.profiles if n.startswith(key)]
        if len(matches) == 1:
            return TargetSelection(asked, (self.profiles[matches[0]],))
        if matches:
            families = {self.profiles[n].family for n in matches}
            family = families.pop() if len(families) == 1 else ""
            whole = f", or the family {family} for all of them" if family else ""
            raise ConfigError(f"target {asked!r} matches {', '.join(matches)}: name one{whole}")
        raise ConfigError(self.unknown(asked))

    def describe(self, name: str) -> str:
        """A family or alias with its profiles ("jetson (jetson-agx-orin, jetson-orin-nano)"), or the name."""
        family = name if name in self.families else self.aliases.get(name)
        if family is None or name in self.profiles:
            return name
        return f"{name} ({', '.join(self.families[family])})"

    def unknown(self, asked: str) -> str:
        key = asked.strip().lower()
        # A family's profile by a short name ("rpi4", "pi-5", "jetson-nano"), profiles holding what was
        # typed ("nano", "cpu"), then names close to it ("jetsn").
        short = [n for word in sorted([*self.families, *self.aliases], key=len, reverse=True)
                 if key.startswith(word) and (rest := key[len(word):].strip("-_ "))
                 for n in self.families[self.aliases.get(word, word)] if n.endswith(rest)]
        holding = [n for n in self.profiles if len(key) >= 3 and key in n]
        close = difflib.get_close_matches(key, [*self.profiles, *self.families, *self.aliases], n=3, cutoff=0.6)
        seen: set[str] = set()
        shown: list[str] = []
        for name in [*short, *holding, *close]:
            # An alias and its family say the same thing: keep the first one.
            family = None if name in self.profiles else self.aliases.get(name, name)
            if (family or name) not in seen:
                seen.add(family or name)
                shown.append(self.describe(name))
        if shown:
            shown = shown[:3]
            said = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
            return f"unknown target {asked!r}: did you mean {said}?"
        return f"unknown target {asked!r} ({self.all_names()}; or the path of a profile .yaml)"

    def all_names(self) -> str:
        def family(name: str) -> str:
            aliases = [a for a, f in self.aliases.items() if f == name]
            return name + (f" (or {', '.join(aliases)})" if aliases else "")

        return (f"built-in targets: {', '.join(self.profiles)}; "
                f"families: {', '.join(family(f) for f in self.families)}")


def builtin_target_names() -> TargetNames:
    return TargetNames.of(all_builtin_profiles())


def _is_path(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) or "/" in target or "\\" in target or Path(target).is_file()


def resolve_targets(target: str) -> TargetSelection:
    """What ``target`` names: a profile file (a path), a built-in profile, or a family of them."""
    if _is_path(target):
        return TargetSelection(target, (load_profile_file(target),))
    return builtin_target_names().resolve(target)


def resolve_target(target: str) -> TargetProfile:
    """One profile: a profile file by path, a built-in by name or unique prefix, or a family of one."""
    selection = resolve_targets(target)
    if len(selection.profiles) != 1:
        names = ", ".join(p.name for p in selection.profiles)
        raise ConfigError(f"target {target!r} is the family of {names}: name one of them")
    return selection.profiles[0]
