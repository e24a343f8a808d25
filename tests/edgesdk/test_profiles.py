"""Target profiles: the built-ins load, and every invalid profile fails at load time naming file and key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgesdk.errors import ConfigError
from edgesdk.profiles import (
    TargetNames,
    all_builtin_profiles,
    builtin_profile_names,
    builtin_target_names,
    load_builtin,
    load_profile_file,
    parse_profile,
    resolve_target,
    resolve_targets,
)

REPO = Path(__file__).resolve().parents[2]
# DESIGN.md §2: the profiles every build must ship, and the generic aarch64 one (issue 11).
REQUIRED_TARGETS = {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "jetson-agx-orin",
                    "intel-core-ultra-npu", "x86-64-cpu", "arm64-cpu"}

# A small valid user profile; each bad case below changes one thing in it.
VALID: dict[str, Any] = {
    "name": "my-board",
    "description": "a test board",
    "architecture": "aarch64",
    "providers": [{"runtime": "onnxruntime", "provider": "CPUExecutionProvider"}],
    "variants": ["onnx-fp32", {"kind": "onnx-int8", "options": {"per_channel": True}}],
    "shapes": {"policy": "dynamic", "batch": 1},
    "gates": {"int8": {"cosine_min": 0.98}},
    "budgets": {"max_package_mb": 100},
}


def write_profile(tmp_path: Path, data: Any, name: str = "my-board.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def with_change(path: tuple, value: Any) -> dict[str, Any]:
    """A copy of VALID with the value at ``path`` (keys/indexes) set to ``value``."""
    data = copy.deepcopy(VALID)
    node = data
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return data


def without(key: str) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    del data[key]
    return data


# ---------------------------------------------------------------------------------------------
# Built-in profiles


def test_ships_every_profile_the_design_requires():
    assert REQUIRED_TARGETS <= set(builtin_profile_names())


def test_builtin_names_are_the_yaml_files_in_targets_folder():
    assert builtin_profile_names() == sorted(p.stem for p in (REPO / "targets").glob("*.yaml"))


@pytest.mark.parametrize("yaml_path", sorted((REPO / "targets").glob("*.yaml")), ids=lambda p: p.stem)
def test_builtin_profile_loads_and_its_name_matches_its_file(yaml_path: Path):
    profile = load_profile_file(yaml_path)

    assert profile.name == yaml_path.stem
    assert load_builtin(yaml_path.stem).name == yaml_path.stem


@pytest.mark.parametrize("profile", all_builtin_profiles(), ids=lambda p: p.name)
def test_builtin_profile_has_an_explicit_gate_for_each_precision_it_builds(profile):
    for variant in profile.variants:
        precision = "fp32" if variant.info.precision == "native" else variant.info.precision
        assert precision in profile.gates, f"{profile.name}: {variant.kind} has no gates.{precision}"


def test_npu_profile_fixes_every_shape():
    profile = load_builtin("intel-core-ultra-npu")

    assert profile.shapes.policy == "static"
    assert profile.shapes.batch == 1


@pytest.mark.parametrize("name", ["jetson-orin-nano", "jetson-agx-orin"])
def test_jetson_int8_is_symmetric_for_tensorrt(name: str):
    # TensorRT's explicit quantization accepts only zero-point-0 QDQ.
    options = {v.kind: v.options for v in load_builtin(name).variants}["onnx-int8"]

    assert options["activation_symmetric"] is True
    assert options["weight_symmetric"] is True


def test_arm64_cpu_is_the_one_aarch64_profile_without_a_board_match():
    # The agent falls back to it on any aarch64 board no profile names (Orange Pi, Graviton, ...).
    generic = [p.name for p in all_builtin_profiles() if p.architecture == "aarch64" and not p.board_match]

    assert generic == ["arm64-cpu"]


def test_arm64_cpu_builds_cpu_variants_the_agent_extra_and_litert_run():
    profile = load_builtin("arm64-cpu")

    assert [v.kind for v in profile.variants] == ["onnx-fp32", "onnx-int8", "onnx-int8-dynamic", "onnx-fp16", "tflite"]
    assert {p.runtime for p in profile.providers} == {"onnxruntime", "litert"}  # no OpenVINO extra needed
    assert profile.providers[0].provider == "CPUExecutionProvider"  # generic: detection needs no accelerator
    int8 = {v.kind: v.options for v in profile.variants}["onnx-int8"]
    assert (int8["activation_symmetric"], int8["weight_symmetric"]) == (False, True)  # u8/s8: optimum's arm64
    assert {v.kind: v.options for v in profile.variants}["onnx-fp16"] == {"keep_io_types": True}


@pytest.mark.parametrize("target, runtime, precision, expected", [
    ("jetson-orin-nano", "onnxruntime", "int8", ["TensorrtExecutionProvider", "CPUExecutionProvider"]),
    ("jetson-orin-nano", "onnxruntime", "fp16", ["TensorrtExecutionProvider", "CUDAExecutionProvider"]),
    ("jetson-orin-nano", "onnxruntime", "fp32", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("intel-core-ultra-npu", "openvino", "fp16", ["NPU", "GPU", "CPU"]),
    ("intel-core-ultra-npu", "openvino", "fp32", ["CPU"]),
    ("intel-core-ultra-npu", "onnxruntime", "fp32", ["CPUExecutionProvider"]),
    ("raspberry-pi-5", "openvino", "int8", ["CPU"]),
    ("raspberry-pi-5", "litert", "native", ["XNNPACK"]),
    ("x86-64-cpu", "litert", "native", []),
    ("arm64-cpu", "onnxruntime", "fp16", ["CPUExecutionProvider"]),
    ("arm64-cpu", "litert", "native", ["XNNPACK"]),
])
def test_providers_for_keeps_the_profile_preference_order(target, runtime, precision, expected):
    providers = load_builtin(target).providers_for(runtime, precision)

    assert [p.provider for p in providers] == expected


# ---------------------------------------------------------------------------------------------
# User profiles


def test_resolve_target_loads_a_user_profile_by_path(tmp_path: Path):
    path = write_profile(tmp_path, VALID)

    profile = resolve_target(str(path))

    assert profile.name == "my-board"
    assert profile.source == str(path)
    assert [v.kind for v in profile.variants] == ["onnx-fp32", "onnx-int8"]
    assert profile.variants[1].options == {"per_channel": True}


def test_resolve_target_loads_an_existing_file_without_yaml_suffix(tmp_path: Path):
    path = write_profile(tmp_path, VALID, name="board-profile")

    assert resolve_target(str(path)).name == "my-board"


def test_unknown_target_name_lists_the_builtins():
    with pytest.raises(ConfigError) as err:
        resolve_target("no-such-board")

    message = str(err.value)
    assert "no-such-board" in message
    for name in REQUIRED_TARGETS:
        assert name in message


def test_missing_profile_file_names_the_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as err:
        resolve_target(str(path))

    assert str(path) in str(err.value)
    assert "not found" in str(err.value)


BAD_PROFILES = [
    # (case id, profile data, key the message must name)
    ("unknown-top-level-key", with_change(("colour",), "blue"), "colour"),
    ("missing-required-key", without("providers"), "providers"),
    ("unknown-architecture", with_change(("architecture",), "riscv64"), "architecture"),
    ("unknown-variant-option", with_change(("variants", 1, "options", "bogus"), 1), "variants[1].options.bogus"),
    ("option-on-kind-without-options",
     with_change(("variants", 0), {"kind": "onnx-fp32", "options": {"keep_io_types": True}}),
     "variants[0].options.keep_io_types"),
    ("string-for-a-number", with_change(("shapes", "batch"), "one"), "shapes.batch"),
    ("true-for-a-number-in-gates", with_change(("gates", "int8", "cosine_min"), True), "gates.int8.cosine_min"),
    ("true-for-a-number-in-budgets", with_change(("budgets", "max_package_mb"), True), "budgets.max_package_mb"),
    ("string-for-an-int-option", with_change(("variants", 1, "options", "max_float_nodes"), "3"),
     "variants[1].options.max_float_nodes"),
    ("true-for-an-int-option", with_change(("variants", 1, "options", "max_float_nodes"), True),
     "variants[1].options.max_float_nodes"),
    ("string-for-a-bool-option", with_change(("variants", 1, "options", "per_channel"), "perhaps"),
     "variants[1].options.per_channel"),
    ("unknown-calibration-method", with_change(("variants", 1, "options", "calibration_method"), "magic"),
     "variants[1].options.calibration_method"),
    ("unknown-runtime", with_change(("providers", 0, "runtime"), "tensorflow"), "providers[0].runtime"),
    ("unknown-provider", with_change(("providers", 0, "provider"), "CoreMLExecutionProvider"),
     "providers[0].provider"),
    ("provider-of-another-runtime",
     with_change(("providers", 0), {"runtime": "openvino", "provider": "CPUExecutionProvider"}),
     "providers[0].provider"),
    ("unknown-provider-precision", with_change(("providers", 0, "precisions"), ["fp8"]), "providers[0].precisions"),
    ("unknown-variant-kind", with_change(("variants", 0), "onnx-int4"), "variants[0].kind"),
    ("variant-no-provider-runs", with_change(("variants",), ["onnx-fp32", "openvino-fp16"]), "variants[1].kind"),
    ("variant-excluded-by-provider-precisions",
     with_change(("providers", 0, "precisions"), ["fp32"]), "variants[1].kind"),
    ("duplicate-variant-kind", with_change(("variants",), ["onnx-fp32", {"kind": "onnx-fp32"}]), "variants[1].kind"),
    ("bad-shapes-policy", with_change(("shapes", "policy"), "fixed"), "shapes.policy"),
    ("zero-batch", with_change(("shapes", "batch"), 0), "shapes.batch"),
    ("unknown-gate-precision", with_change(("gates", "int4"), {"cosine_min": 0.9}), "gates.int4"),
    ("unknown-gate-key", with_change(("gates", "int8", "cosine"), 0.9), "gates.int8.cosine"),
    ("family-with-a-space", with_change(("family",), "my board"), "family"),
    ("family-in-capitals", with_change(("family",), "Jetson"), "family"),
    ("family-not-a-string", with_change(("family",), ["jetson"]), "family"),
    ("aliases-not-a-list", with_change(("aliases",), "rpi"), "aliases"),
    ("alias-with-a-slash", with_change(("aliases",), ["boards/pi"]), "aliases[0]"),
]


@pytest.mark.parametrize("data, key", [c[1:] for c in BAD_PROFILES], ids=[c[0] for c in BAD_PROFILES])
def test_invalid_profile_fails_at_load_naming_file_and_key(tmp_path: Path, data, key):
    path = write_profile(tmp_path, data)

    with pytest.raises(ConfigError) as err:
        load_profile_file(path)

    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert key in message
    assert "\n" not in message


@pytest.mark.parametrize("text, line", [
    ("name: b\narchitecture: aarch64\n  providers: x\n", 3),
    ("name: b\narchitecture: aarch64\nproviders: [\n\tx]\n", 4),
    ("name: b\narchitecture: aarch64\nproviders:\n  - {runtime: onnxruntime, provider: X\n"
     "variants: [onnx-fp32]\n", 5),
], ids=["bad-indent", "tab", "unclosed-flow-mapping"])
def test_broken_yaml_names_file_and_line(tmp_path: Path, text: str, line: int):
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as err:
        load_profile_file(path)

    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert f"line {line}" in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", "- onnx-fp32\n- onnx-int8\n", "just a string\n"],
                         ids=["empty", "list", "scalar"])
def test_profile_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str):
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as err:
        load_profile_file(path)

    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Target names: families, aliases, prefixes, and what an unknown name suggests


def test_every_builtin_profile_declares_its_family():
    # The families are data (DESIGN.md §1: nothing in code lists targets by name).
    for path in sorted((REPO / "targets").glob("*.yaml")):
        assert "family" in yaml.safe_load(path.read_text(encoding="utf-8")), path.name


def test_builtin_families_group_the_profiles_by_device_kind():
    names = builtin_target_names()

    assert names.families == {
        "arm64": ("arm64-cpu",), "intel": ("intel-core-ultra-npu",),
        "jetson": ("jetson-agx-orin", "jetson-orin-nano"), "raspberry-pi": ("raspberry-pi-4", "raspberry-pi-5"),
        "x86-64": ("x86-64-cpu",)}
    assert set(names.profiles) == set(builtin_profile_names())


RESOLVES = [
    # (what the user typed, the profiles it names, the family it named or None)
    ("jetson", ["jetson-agx-orin", "jetson-orin-nano"], "jetson"),
    ("Jetson", ["jetson-agx-orin", "jetson-orin-nano"], "jetson"),
    ("raspberry-pi", ["raspberry-pi-4", "raspberry-pi-5"], "raspberry-pi"),
    ("rpi", ["raspberry-pi-4", "raspberry-pi-5"], "raspberry-pi"),
    ("pi", ["raspberry-pi-4", "raspberry-pi-5"], "raspberry-pi"),
    ("intel", ["intel-core-ultra-npu"], "intel"),
    ("npu", ["intel-core-ultra-npu"], "intel"),
    ("x86", ["x86-64-cpu"], "x86-64"),
    ("x86-64", ["x86-64-cpu"], "x86-64"),
    ("arm64", ["arm64-cpu"], "arm64"),
    ("aarch64", ["arm64-cpu"], "arm64"),
    ("jetson-orin-nano", ["jetson-orin-nano"], None),
    ("jetson-orin", ["jetson-orin-nano"], None),  # a unique prefix narrows to one profile
    ("jetson-agx", ["jetson-agx-orin"], None),
    ("raspberry-pi-5", ["raspberry-pi-5"], None),
    (" x86-64-cpu ", ["x86-64-cpu"], None),
]


@pytest.mark.parametrize("asked, expected, family", RESOLVES, ids=[r[0].strip() or "blank" for r in RESOLVES])
def test_target_name_resolves_to_profiles(asked: str, expected: list[str], family: str | None):
    selection = resolve_targets(asked)

    assert [p.name for p in selection.profiles] == expected
    assert selection.family == family


UNKNOWN = [
    # (what the user typed, the whole one-line message)
    ("jetsn", "unknown target 'jetsn': did you mean jetson (jetson-agx-orin, jetson-orin-nano)?"),
    ("rpi5", "unknown target 'rpi5': did you mean raspberry-pi-5 or rpi (raspberry-pi-4, raspberry-pi-5)?"),
    ("nano", "unknown target 'nano': did you mean jetson-orin-nano?"),
    ("jetson-", "target 'jetson-' matches jetson-agx-orin, jetson-orin-nano: name one, or the family jetson "
                "for all of them"),
    ("raspberry", "target 'raspberry' matches raspberry-pi-4, raspberry-pi-5: name one, or the family "
                  "raspberry-pi for all of them"),
]


@pytest.mark.parametrize("asked, message", UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_or_ambiguous_target_suggests_names_in_one_line(asked: str, message: str):
    with pytest.raises(ConfigError) as err:
        resolve_targets(asked)

    assert str(err.value) == message


def test_target_with_no_close_name_lists_profiles_families_and_aliases():
    with pytest.raises(ConfigError) as err:
        resolve_targets("quantum-toaster")

    message = str(err.value)
    assert message.startswith("unknown target 'quantum-toaster' (built-in targets: ")
    assert "raspberry-pi (or rpi, pi)" in message and "jetson" in message
    assert "\n" not in message


def test_resolve_target_refuses_a_family_of_several_profiles_and_takes_a_family_of_one():
    with pytest.raises(ConfigError) as err:
        resolve_target("jetson")

    assert "jetson-agx-orin, jetson-orin-nano: name one of them" in str(err.value)
    assert resolve_target("npu").name == "intel-core-ultra-npu"


def test_path_that_does_not_exist_is_read_as_a_profile_file(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        resolve_targets(str(tmp_path / "boards" / "mine"))

    assert "not found" in str(err.value)


def test_user_profile_family_defaults_to_first_word_of_its_name(tmp_path: Path):
    profile = resolve_target(str(write_profile(tmp_path, VALID)))

    assert (profile.family, profile.aliases) == ("my", ())


def _profile(name: str, family: str | None = None, aliases: list[str] | None = None) -> Any:
    data = with_change(("name",), name)
    if family is not None:
        data["family"] = family
    if aliases is not None:
        data["aliases"] = aliases
    return parse_profile(data, f"{name}.yaml")


CLASHES = [
    # (profiles, file and key the message must start with)
    ([_profile("board-a", "board", ["ba"]), _profile("board-b", "board", ["ba"]), _profile("bay-1")],
     None),  # no clash: both board profiles may repeat the family's alias
    ([_profile("board-a", "board", ["board-b"]), _profile("board-b", "other")], "board-a.yaml: aliases:"),
    ([_profile("board-a", "board", ["b"]), _profile("kit-a", "kit", ["b"])], "kit-a.yaml: aliases:"),
    ([_profile("board-a", "board", ["kit"]), _profile("kit-a", "kit")], "board-a.yaml: aliases:"),
    ([_profile("board-a", "board-b"), _profile("board-b", "board-b"), _profile("board-c", "board-b")],
     "board-a.yaml: family:"),
]


@pytest.mark.parametrize("profiles, prefix", CLASHES, ids=["no-clash", "alias-is-a-profile-name",
                                                           "alias-in-two-families", "alias-is-a-family",
                                                           "family-is-a-profile-name"])
def test_a_name_that_would_mean_two_things_is_refused(profiles, prefix: str | None):
    if prefix is None:
        names = TargetNames.of(profiles)
        assert [p.name for p in names.resolve("ba").profiles] == ["board-a", "board-b"]
        assert names.resolve("bay").family == "bay"  # the default family: the name's first word
        return
    with pytest.raises(ConfigError) as err:
        TargetNames.of(profiles)

    assert str(err.value).startswith(prefix)


def test_builtin_target_names_have_no_clash():
    # TargetNames.of raises on a clash; the built-ins must load as a set.
    names = builtin_target_names()

    assert names.aliases == {"aarch64": "arm64", "npu": "intel", "rpi": "raspberry-pi", "pi": "raspberry-pi",
                             "x86": "x86-64", "x86_64": "x86-64"}
