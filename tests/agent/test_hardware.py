"""Hardware probe and target detection, on faked Pi/Jetson/Intel files and on this machine for real."""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import pytest

from agent.hardware import HardwareInfo, check_target, choose_target, detect_target, doctor_report, probe_hardware
from edgesdk.profiles import load_builtin

PI5_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

"""
PI5_TAIL = "Revision\t: d04170\nSerial\t\t: 0123456789abcdef\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
ORIN_CORE = PI5_CORE.replace("0xd0b", "0xd42").replace("0x4\n", "0x1\n")
X86_CORE = """processor\t: {n}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) Ultra 7 155H
flags\t\t: fpu sse sse2 avx avx2 fma avx_vnni avx512f avx512_vnni amx_tile amx_int8 sha_ni

"""
MEMINFO = "MemTotal:        8245612 kB\nMemFree:         7000000 kB\n"


def fake_device(tmp_path: Path, model: bytes | None, cpuinfo: str) -> dict:
    if model is not None:
        (tmp_path / "model").write_bytes(model)
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "os-release").write_text('NAME="Debian"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    return dict(device_tree_model=tmp_path / "model", cpuinfo=tmp_path / "cpuinfo",
                meminfo=tmp_path / "meminfo", os_release=tmp_path / "os-release",
                versions_fn=lambda: {"onnxruntime": "1.20.1"})


def test_raspberry_pi_5_is_detected_from_its_device_tree_and_cpuinfo(tmp_path: Path) -> None:
    files = fake_device(tmp_path, b"Raspberry Pi 5 Model B Rev 1.0\x00",
                        "".join(PI5_CORE.format(n=i) for i in range(4)) + PI5_TAIL)

    hw = probe_hardware(**files, machine="aarch64",
                        providers_fn=lambda: {"onnxruntime": ["CPUExecutionProvider"]})

    assert hw.arch == "aarch64"
    assert hw.board == "Raspberry Pi 5 Model B Rev 1.0"
    assert hw.cpu_model == "Cortex-A76" and hw.cpu_count == 4
    assert hw.cpu_flags == ("asimddp", "fp16", "neon")
    assert hw.ram_mb == 8052 and hw.os == "Debian GNU/Linux 12 (bookworm)"
    target = detect_target(hw)
    assert target is not None and target.name == "raspberry-pi-5"
    assert check_target(hw, target) == []


@pytest.mark.parametrize("model, expected", [
    (b"NVIDIA Jetson Orin Nano Developer Kit\x00", "jetson-orin-nano"),
    (b"Jetson AGX Orin\x00", "jetson-agx-orin"),
    (b"Raspberry Pi 4 Model B Rev 1.5\x00", "raspberry-pi-4"),
])
def test_board_in_the_device_tree_picks_its_profile(tmp_path: Path, model: bytes, expected: str) -> None:
    files = fake_device(tmp_path, model, "".join(ORIN_CORE.format(n=i) for i in range(6)))

    hw = probe_hardware(**files, machine="arm64", providers_fn=lambda: {
        "onnxruntime": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]})

    assert hw.arch == "aarch64"
    assert detect_target(hw).name == expected


def test_jetson_cpu_is_named_from_its_part_number(tmp_path: Path) -> None:
    files = fake_device(tmp_path, b"NVIDIA Jetson Orin Nano Developer Kit\x00",
                        "".join(ORIN_CORE.format(n=i) for i in range(6)))

    hw = probe_hardware(**files, machine="aarch64", providers_fn=dict)

    assert hw.cpu_model == "Cortex-A78AE" and hw.cpu_count == 6


@pytest.mark.parametrize("providers, expected", [
    ({"openvino": ["CPU", "GPU", "NPU"], "onnxruntime": ["CPUExecutionProvider"]}, "intel-core-ultra-npu"),
    ({"openvino": ["CPU", "GPU.0", "GPU.1"], "onnxruntime": ["CPUExecutionProvider"]}, "x86-64-cpu"),
    ({"onnxruntime": ["CPUExecutionProvider"]}, "x86-64-cpu"),
])
def test_pc_without_board_is_detected_from_its_providers(tmp_path: Path, providers: dict, expected: str) -> None:
    files = fake_device(tmp_path, None, "".join(X86_CORE.format(n=i) for i in range(16)))

    hw = probe_hardware(**files, machine="AMD64", providers_fn=lambda: providers)

    assert hw.arch == "x86_64" and hw.board is None
    assert hw.cpu_model == "Intel(R) Core(TM) Ultra 7 155H"
    assert hw.cpu_flags == ("amx", "avx2", "avx512_vnni", "avx512f", "avx_vnni")
    assert detect_target(hw).name == expected


def test_unknown_board_on_unknown_architecture_has_no_target(tmp_path: Path) -> None:
    files = fake_device(tmp_path, b"SiFive HiFive Unmatched A00\x00", "processor\t: 0\nisa\t: rv64imafdc\n")

    hw = probe_hardware(**files, machine="riscv64", providers_fn=lambda: {"onnxruntime": ["CPUExecutionProvider"]})

    assert detect_target(hw) is None
    assert doctor_report(hw)["problems"] == ["no target profile matches this device"]


def test_real_probe_finds_this_pc_and_onnxruntime_cpu() -> None:
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("this check describes the x86-64 CI machine")

    hw = probe_hardware()

    assert hw.arch == "x86_64"
    assert "CPUExecutionProvider" in hw.providers["onnxruntime"]
    assert "onnxruntime" in hw.runtimes and hw.cpu_count >= 1 and hw.ram_mb > 0
    assert detect_target(hw) is not None
    json.dumps(doctor_report(hw))  # JSON-safe


def test_aarch64_package_on_a_pc_reports_the_architecture_mismatch() -> None:
    hw = HardwareInfo(arch="x86_64", cpu_model="Intel", cpu_count=8, cpu_flags=("avx2",), ram_mb=16000,
                      board=None, os="Linux", kernel="6.8", python="3.11",
                      runtimes={"onnxruntime": "1.20.1"}, providers={"onnxruntime": ["CPUExecutionProvider"]})

    problems = check_target(hw, load_builtin("raspberry-pi-5"))

    assert problems == ["package target raspberry-pi-5 is aarch64; this device is x86_64"]
    assert check_target(hw, load_builtin("x86-64-cpu")) == []


def test_package_whose_providers_are_all_missing_is_reported() -> None:
    hw = HardwareInfo(arch="x86_64", cpu_model="Intel", cpu_count=8, cpu_flags=(), ram_mb=16000,
                      board=None, os="Linux", kernel="6.8", python="3.11", runtimes={}, providers={})

    problems = check_target(hw, load_builtin("x86-64-cpu"))

    assert len(problems) == 1 and "this device has none" in problems[0]


def test_fingerprint_is_stable_and_changes_with_runtime_version_or_providers(tmp_path: Path) -> None:
    files = fake_device(tmp_path, b"Raspberry Pi 5 Model B Rev 1.0\x00", PI5_CORE.format(n=0))
    providers = {"onnxruntime": ["CPUExecutionProvider"]}
    hw = probe_hardware(**files, machine="aarch64", providers_fn=lambda: providers)
    again = probe_hardware(**files, machine="aarch64", providers_fn=lambda: providers)

    upgraded = dataclasses.replace(hw, runtimes={"onnxruntime": "1.21.0"})
    with_xnnpack = dataclasses.replace(hw, providers={"onnxruntime": ["XnnpackExecutionProvider",
                                                                      "CPUExecutionProvider"]})
    more_ram = dataclasses.replace(hw, ram_mb=hw.ram_mb * 2)  # not part of the decision

    assert hw.fingerprint() == again.fingerprint()
    assert len(hw.fingerprint()) == 64
    assert upgraded.fingerprint() != hw.fingerprint()
    assert with_xnnpack.fingerprint() != hw.fingerprint()
    assert more_ram.fingerprint() == hw.fingerprint()


# -- the provider probe (issue 9: idle RSS): no runtime is loaded into the agent to probe it ---------
PROBE_CHILD = """
import json, sys
from agent.hardware import probe_hardware
from edgesdk.runtime import isolate_runtime_probe
isolate_runtime_probe()  # as the agent does
hw = probe_hardware()
print(json.dumps({"providers": hw.providers,
                  "loaded": sorted(m for m in ("onnxruntime", "openvino", "ai_edge_litert", "tflite_runtime")
                                   if m in sys.modules)}))
"""


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch):
    """edgesdk.runtime's probe as a process that has loaded no runtime sees it; restored after."""
    from edgesdk import runtime

    monkeypatch.setattr(runtime, "_runtime_loaded", lambda name: False)
    runtime.isolate_runtime_probe()
    runtime._probe_providers.cache_clear()
    yield runtime
    runtime.isolate_runtime_probe(enabled=False)
    runtime._probe_providers.cache_clear()


def test_probing_the_providers_loads_no_runtime_and_agrees_with_each_runtime() -> None:
    import subprocess
    import sys

    from edgesdk import runtime

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", PROBE_CHILD], capture_output=True, text=True, cwd=root,
                          timeout=300, check=True)
    seen = json.loads(done.stdout.splitlines()[-1])

    assert seen["loaded"] == []
    asked_here = {r: list(p) for r in runtime.RUNTIMES if (p := runtime._probe_here(r)) is not None}
    assert seen["providers"] == asked_here  # one probe: the same answer as each runtime in-process
    assert "CPUExecutionProvider" in seen["providers"]["onnxruntime"]


def test_the_probe_cache_is_used_while_its_key_holds(fresh_probe, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = fresh_probe
    cache = tmp_path / "runtime-probe.json"
    runtime.isolate_runtime_probe(cache)
    real = runtime.available_providers()
    assert json.loads(cache.read_text())["providers"] == real

    doc = json.loads(cache.read_text())
    doc["providers"]["onnxruntime"] = ["PlantedExecutionProvider"]  # only a reader of the file sees this
    cache.write_text(json.dumps(doc))
    runtime._probe_providers.cache_clear()
    assert runtime.available_providers()["onnxruntime"] == ["PlantedExecutionProvider"]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # part of the key: the answer may differ now
    runtime._probe_providers.cache_clear()
    assert runtime.available_providers() == real
    assert json.loads(cache.read_text())["providers"] == real


def test_a_runtime_that_kills_the_probe_child_is_left_out_and_not_cached(fresh_probe, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = fresh_probe
    # The child answers for onnxruntime, then dies as a crashing device plugin would (SIGABRT).
    monkeypatch.setattr(runtime, "_CHILD_PROBE", "import json, os\n"
                        "print(json.dumps(['onnxruntime', ['CPUExecutionProvider']]), flush=True)\nos.abort()\n")
    monkeypatch.setattr(runtime, "_installed_runtimes", lambda: ["onnxruntime", "openvino"])
    runtime.isolate_runtime_probe(tmp_path / "runtime-probe.json")

    found = runtime.available_providers()

    assert found == {"onnxruntime": ["CPUExecutionProvider"]}
    assert not (tmp_path / "runtime-probe.json").exists()  # the next start probes again


def test_a_child_that_cannot_probe_at_all_falls_back_to_probing_here(fresh_probe,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = fresh_probe
    monkeypatch.setattr(runtime, "_CHILD_PROBE", "import sys\nsys.exit(3)\n")  # e.g. edgesdk not importable

    found = runtime.available_providers()

    assert "CPUExecutionProvider" in found["onnxruntime"]


# -- ARM boards by capability (issue 11): cpuinfo and device-tree text fed in directly --------------
ARM_FEATURES_V82 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                    "asimddp")
GRAVITON3_FEATURES = (ARM_FEATURES_V82 + " jscvt fcma sha3 sm3 sm4 sha512 sve asimdfhm dit uscat ilrcpc flagm "
                      "ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng")
A53_FEATURES = "fp asimd evtstrm crc32 cpuid"


def arm_cpuinfo(cores: list[tuple[str, str]]) -> str:
    """/proc/cpuinfo of an aarch64 machine: one (CPU part, Features) per core."""
    return "".join(f"processor\t: {n}\nBogoMIPS\t: 48.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                   f"CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: {part}\nCPU revision\t: 1\n\n"
                   for n, (part, features) in enumerate(cores))


ORANGE_PI_5 = arm_cpuinfo([("0xd05", ARM_FEATURES_V82)] * 4 + [("0xd0b", ARM_FEATURES_V82)] * 4)  # RK3588
GRAVITON3 = arm_cpuinfo([("0xd40", GRAVITON3_FEATURES)] * 4)
PI5 = arm_cpuinfo([("0xd0b", ARM_FEATURES_V82)] * 4)
ORIN = arm_cpuinfo([("0xd42", ARM_FEATURES_V82)] * 6)
PI3 = arm_cpuinfo([("0xd03", A53_FEATURES)] * 4)
ORT_CPU = {"onnxruntime": ["CPUExecutionProvider"]}


def arm_device(cpuinfo: str, model: str, providers: dict | None = None) -> HardwareInfo:
    return probe_hardware(machine="aarch64", cpuinfo_text=cpuinfo, device_tree_text=model,
                          providers_fn=lambda: dict(ORT_CPU if providers is None else providers),
                          versions_fn=lambda: {"onnxruntime": "1.20.1"})


@pytest.mark.parametrize("cpuinfo, model, target, reason", [
    (ORANGE_PI_5, "Orange Pi 5\x00", "arm64-cpu",
     'arm64-cpu: aarch64, no board profile matched /proc/device-tree/model "Orange Pi 5", generic CPU profile; '
     "CPU Cortex-A55 + Cortex-A76 x8, features asimddp fp16 neon"),
    (GRAVITON3, "", "arm64-cpu",
     "arm64-cpu: aarch64, no /proc/device-tree/model (not a device-tree board), generic CPU profile; "
     "CPU Neoverse-V1 x4, features asimddp fp16 i8mm neon sve"),
    (PI5, "Raspberry Pi 5 Model B Rev 1.0\x00", "raspberry-pi-5",
     'raspberry-pi-5: /proc/device-tree/model "Raspberry Pi 5 Model B Rev 1.0" matches board_match '
     '"Raspberry Pi 5"; CPU Cortex-A76 x4, features asimddp fp16 neon'),
    (ORIN, "NVIDIA Jetson Orin Nano Developer Kit\x00", "jetson-orin-nano",
     'jetson-orin-nano: /proc/device-tree/model "NVIDIA Jetson Orin Nano Developer Kit" matches board_match '
     '"Orin Nano"; CPU Cortex-A78AE x6, features asimddp fp16 neon'),
])
def test_target_choice_says_which_profile_and_why(cpuinfo: str, model: str, target: str, reason: str) -> None:
    hw = arm_device(cpuinfo, model)

    choice = choose_target(hw)

    assert choice.name == target
    assert choice.reason == reason
    report = doctor_report(hw)
    assert (report["target"], report["target_reason"]) == (target, reason)


def test_unknown_arm_board_without_dot_product_still_gets_arm64_cpu_and_the_note_says_int8_gains_are_modest() -> None:
    hw = arm_device(PI3, "Raspberry Pi 3 Model B Plus Rev 1.3\x00")

    report = doctor_report(hw)

    assert report["target"] == "arm64-cpu" and report["problems"] == []
    assert hw.cpu_flags == ("neon",)
    assert "no dot product (asimddp): INT8 gains are modest" in report["cpu_notes"]
    assert "no fp16 arithmetic: fp16 variants run through casts and rarely win" in report["cpu_notes"]


def test_graviton_notes_name_its_int8_fp16_and_sve_features() -> None:
    notes = doctor_report(arm_device(GRAVITON3, ""))["cpu_notes"]

    assert any(n.startswith("dot product (asimddp)") for n in notes)
    assert any(n.startswith("fp16 arithmetic") for n in notes)
    assert any(n.startswith("SVE") for n in notes) and any(n.startswith("i8mm") for n in notes)


@pytest.mark.parametrize("features, has_fp16", [
    ("fp asimd fphp asimdhp", True),
    ("fp asimd fphp", False),  # scalar half precision only: ORT's fp16 kernels need the vector one
    ("fp asimd asimdhp", False),
])
def test_arm_fp16_needs_both_scalar_and_vector_half_precision(features: str, has_fp16: bool) -> None:
    hw = arm_device(arm_cpuinfo([("0xd0b", features)]), "")

    assert ("fp16" in hw.cpu_flags) is has_fp16


def test_arm_board_without_any_runtime_gets_arm64_cpu_and_the_pip_line_that_adds_one() -> None:
    hw = arm_device(ORANGE_PI_5, "Orange Pi 5\x00", providers={})

    report = doctor_report(hw)

    assert report["target"] == "arm64-cpu"
    [problem] = report["problems"]
    assert problem.endswith('this device has none (pip install "edgesdk[agent,litert]" adds onnxruntime, litert)')


def test_unknown_architecture_reason_names_what_the_profiles_cover(tmp_path: Path) -> None:
    hw = probe_hardware(machine="riscv64", cpuinfo_text="processor\t: 0\nisa\t: rv64imafdc\n",
                        device_tree_text="SiFive HiFive Unmatched A00\x00", providers_fn=lambda: dict(ORT_CPU))

    choice = choose_target(hw)

    assert choice.profile is None
    assert choice.reason.startswith('no target profile matches this device: no board profile matched '
                                    '/proc/device-tree/model "SiFive HiFive Unmatched A00", no profile is for '
                                    "riscv64 (profiles cover aarch64, x86_64)")


def test_doctor_with_a_raspberry_pi_package_names_each_runtime_the_pi_lacks() -> None:
    from tests.edgesdk.test_runtime_extras import PI5 as PI5_PACKAGE

    hw = arm_device(PI5, "Raspberry Pi 5 Model B Rev 1.0\x00")

    report = doctor_report(hw, manifest=PI5_PACKAGE)

    package = report["package"]
    assert package["missing"] == ["openvino", "litert"]
    assert package["install"] == 'pip install "edgesdk[agent,openvino,litert]"'
    assert 'openvino is not installed here: pip install "edgesdk[agent,openvino]"' in report["problems"]
    assert 'litert is not installed here: pip install "edgesdk[agent,litert]"' in report["problems"]
    json.dumps(report)


def test_doctor_with_an_x86_package_on_an_arm_board_says_the_architecture_differs() -> None:
    from tests.edgesdk.test_runtime_extras import manifest

    x86 = manifest(("onnx-fp32", "onnxruntime", ["CPUExecutionProvider"]))
    x86.target = "x86-64-cpu"

    report = doctor_report(arm_device(PI5, ""), manifest=x86)

    assert report["package"]["problems"] == ["package target x86-64-cpu is x86_64; this device is aarch64"]
