"""The one runtime → extra → import name table: it matches pyproject.toml's extras and every runtime
a profile lists, and says the exact pip line for what a package needs and a machine lacks."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from edgesdk.manifest import Manifest, TensorSpec, Variant
from edgesdk.profiles import KNOWN_PROVIDERS, VARIANT_KINDS, all_builtin_profiles, load_builtin
from edgesdk.runtime_extras import (
    RUNTIME_EXTRAS,
    extra_for,
    installed_runtimes,
    missing_hint,
    missing_install,
    package_install,
    pip_command,
    profile_install,
    runtime_needs,
)

REPO = Path(__file__).resolve().parents[2]
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def requirement_names(extra: str) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in EXTRAS[extra]}


@pytest.mark.parametrize("runtime", sorted(RUNTIME_EXTRAS))
def test_each_runtime_extra_exists_in_pyproject_and_installs_that_runtime(runtime: str) -> None:
    row = RUNTIME_EXTRAS[runtime]

    assert row.extra in EXTRAS, f"pyproject.toml has no [{row.extra}] extra for {runtime}"
    assert requirement_names(row.extra) & set(row.distributions), \
        f"[{row.extra}] installs none of {row.distributions}"


def test_every_runtime_a_profile_or_variant_kind_names_has_an_extra() -> None:
    named = set(KNOWN_PROVIDERS) | {k.runtime for k in VARIANT_KINDS.values()}
    named |= {p.runtime for profile in all_builtin_profiles() for p in profile.providers}

    assert named <= set(RUNTIME_EXTRAS)


def test_jetson_extra_leaves_out_pypi_onnxruntime_so_nvidias_build_survives() -> None:
    # Installing PyPI's CPU onnxruntime over NVIDIA's onnxruntime-gpu replaces its `onnxruntime` module.
    assert not {n for n in requirement_names("jetson") if n.startswith("onnxruntime")}
    assert requirement_names("agent") - {"onnxruntime"} <= requirement_names("jetson")


@pytest.mark.parametrize("runtimes, expected", [
    (["onnxruntime"], 'pip install "edgesdk[agent]"'),
    (["openvino"], 'pip install "edgesdk[agent,openvino]"'),
    (["litert", "openvino", "onnxruntime", "openvino"], 'pip install "edgesdk[agent,openvino,litert]"'),
    ([], 'pip install "edgesdk[agent]"'),
])
def test_pip_command_names_agent_first_then_each_extra_once(runtimes: list[str], expected: str) -> None:
    assert pip_command(runtimes) == expected


def test_missing_hint_is_the_line_users_see() -> None:
    assert missing_hint("openvino") == 'openvino is not installed here: pip install "edgesdk[agent,openvino]"'


def test_unknown_runtime_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="onnxruntime, openvino, litert"):
        extra_for("tensorflow")


@pytest.mark.parametrize("name, expected", [
    ("raspberry-pi-5", 'pip install "edgesdk[agent,openvino,litert]"'),
    ("arm64-cpu", 'pip install "edgesdk[agent,litert]"'),
    ("x86-64-cpu", 'pip install "edgesdk[agent,openvino]"'),
])
def test_profile_install_covers_every_runtime_the_profile_lists(name: str, expected: str) -> None:
    assert profile_install(load_builtin(name)) == expected


@pytest.mark.parametrize("name", ["jetson-orin-nano", "jetson-agx-orin"])
def test_jetson_profile_install_points_at_nvidias_build_not_a_pypi_package(name: str) -> None:
    line = profile_install(load_builtin(name))

    assert "onnxruntime-gpu" in line and "not PyPI" in line and "Jetson AI Lab" in line
    assert 'pip install "edgesdk[jetson]"' in line
    assert "edgesdk[agent" not in line


def manifest(*variants: tuple[str, str, list[str]]) -> Manifest:
    """A manifest whose variants are (id, runtime, providers)."""
    return Manifest(name="m", version="1", target="raspberry-pi-5", source={},
                    inputs=[TensorSpec("x", "float32", (1, 2))], outputs=[TensorSpec("y", "float32", (1, 2))],
                    variants=[Variant(id=i, kind=i, format="onnx", precision="fp32", runtime=r,
                                      file=f"variants/{i}/model", providers=p) for i, r, p in variants])


PI5 = manifest(("openvino-fp32", "openvino", ["CPU"]), ("onnx-fp32", "onnxruntime", ["CPUExecutionProvider"]),
               ("openvino-int8", "openvino", ["CPU"]), ("tflite", "litert", ["XNNPACK"]))


def test_needs_on_a_device_with_only_the_agent_extra_name_each_missing_runtime() -> None:
    needs = runtime_needs(PI5, {"onnxruntime": ["CPUExecutionProvider"]})

    assert [(n.runtime, n.variants, n.installed) for n in needs] == [
        ("openvino", ("openvino-fp32", "openvino-int8"), False),
        ("onnxruntime", ("onnx-fp32",), True),
        ("litert", ("tflite",), False)]
    assert needs[0].problem == 'openvino is not installed here: pip install "edgesdk[agent,openvino]"'
    assert needs[1].problem is None
    assert missing_install(needs) == 'pip install "edgesdk[agent,openvino,litert]"'
    assert package_install(PI5) == 'pip install "edgesdk[agent,openvino,litert]"'


def test_needs_with_everything_installed_has_nothing_to_install() -> None:
    needs = runtime_needs(PI5, {"onnxruntime", "openvino", "litert"})

    assert all(n.installed and n.problem is None for n in needs)
    assert missing_install(needs) is None


def test_jetson_package_on_cpu_onnxruntime_says_the_gpu_providers_need_nvidias_build() -> None:
    jetson = manifest(("onnx-fp16", "onnxruntime", ["TensorrtExecutionProvider", "CUDAExecutionProvider"]),
                      ("onnx-fp32", "onnxruntime", ["CUDAExecutionProvider", "CPUExecutionProvider"]))

    [need] = runtime_needs(jetson, {"onnxruntime": ["CPUExecutionProvider"]})

    assert need.installed
    assert need.problem.startswith("onnxruntime here has no TensorrtExecutionProvider, CUDAExecutionProvider: "
                                   "install onnxruntime-gpu")
    assert missing_install([need]) is None  # no pip extra can add it


def test_npu_missing_on_a_pc_is_hardware_not_something_to_install() -> None:
    npu = manifest(("openvino-fp16", "openvino", ["NPU", "GPU", "CPU"]))

    [need] = runtime_needs(npu, {"openvino": ["CPU"]})

    assert need.installed and need.problem is None


def test_installed_runtimes_sees_a_runtime_python_cannot_import_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    before = installed_runtimes()
    if "openvino" not in before:
        pytest.skip("openvino is not installed in this environment")

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError

    assert installed_runtimes() == before - {"openvino"}
