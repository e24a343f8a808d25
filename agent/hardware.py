"""What this device is: CPU, board, memory, runtimes and providers; and which target profile fits.

Every source the probe reads (/proc/device-tree/model, /proc/cpuinfo, /proc/meminfo,
/etc/os-release, the machine name, the runtime probes) is a parameter, so a test on a PC can fake
a Raspberry Pi or a Jetson. Nothing here names a target: `detect_target` matches the profiles' own
data (board_match, architecture, preferred provider).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgesdk.profiles import TargetProfile, all_builtin_profiles

# platform.machine() spellings → the names target profiles use.
ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64",
                "aarch64": "aarch64", "arm64": "aarch64", "armv8l": "aarch64"}

# /proc/cpuinfo flag (x86 `flags`, Arm `Features`) → the name we report. Only flags that change
# which variant runs fastest: VNNI/AMX and Arm dot-product make INT8 pay off, fp16 arithmetic
# makes FP16 variants worth trying on a CPU.
CPU_FLAGS = {
    "avx2": "avx2", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
    "amx_tile": "amx", "amx_int8": "amx", "amx_bf16": "amx", "avx512_fp16": "fp16",
    "asimd": "neon", "neon": "neon", "asimddp": "asimddp", "asimdhp": "fp16", "fphp": "fp16",
    "i8mm": "i8mm", "sve": "sve",
}

# Arm `CPU implementer`/`CPU part` → core name (aarch64 /proc/cpuinfo has no "model name").
ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd04"): "Cortex-A35", ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0a"): "Cortex-A75", ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0d"): "Cortex-A77",
    ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd44"): "Cortex-X1",
    ("0x41", "0xd46"): "Cortex-A510", ("0x41", "0xd47"): "Cortex-A710", ("0x41", "0xd4d"): "Cortex-A715",
    ("0x4e", "0x004"): "NVIDIA Carmel",
}

# Runtime → the distributions that provide it, first found wins (Jetson ships onnxruntime-gpu).
RUNTIME_DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "openvino": ("openvino",),
    "litert": ("ai-edge-litert", "tflite-runtime"),
}

# Providers that are plain CPU execution; a profile whose preferred provider is one of these is a
# generic fallback, one whose preferred provider is an accelerator is specific to that hardware.
CPU_PROVIDERS = {"CPUExecutionProvider", "CPU", "XNNPACK"}


@dataclass(frozen=True)
class HardwareInfo:
    arch: str  # x86_64 | aarch64 (other machines as platform.machine() says)
    cpu_model: str
    cpu_count: int
    cpu_flags: tuple[str, ...]  # sorted subset of CPU_FLAGS' values
    ram_mb: int
    board: str | None  # /proc/device-tree/model without the trailing NUL; None on PCs
    os: str
    kernel: str
    python: str
    runtimes: dict[str, str] = field(default_factory=dict)  # runtime → version
    providers: dict[str, list[str]] = field(default_factory=dict)  # runtime → providers present

    def has_provider(self, runtime: str, provider: str) -> bool:
        """True when ``provider`` is present; OpenVINO numbers devices ("GPU.0", "GPU.1")."""
        return any(p == provider or p.split(".", 1)[0] == provider for p in self.providers.get(runtime, ()))

    def fingerprint(self) -> str:
        """Stable sha256 of what decides the selection; a change invalidates the cached decision."""
        key = {"arch": self.arch, "cpu_model": self.cpu_model, "cpu_flags": sorted(self.cpu_flags),
               "board": self.board, "runtimes": dict(sorted(self.runtimes.items())),
               "providers": {r: sorted(p) for r, p in sorted(self.providers.items())}}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cpu_flags"] = list(self.cpu_flags)
        data["providers"] = {r: list(p) for r, p in self.providers.items()}
        return data


def probe_hardware(device_tree_model: Path = Path("/proc/device-tree/model"),
                   cpuinfo: Path = Path("/proc/cpuinfo"),
                   providers_fn: Callable[[], dict[str, list[str]]] | None = None,
                   versions_fn: Callable[[], dict[str, str]] | None = None,
                   machine: str | None = None,
                   meminfo: Path = Path("/proc/meminfo"),
                   os_release: Path = Path("/etc/os-release")) -> HardwareInfo:
    """Look at this machine (or at the faked files and functions given)."""
    arch = normalise_arch(machine if machine is not None else platform.machine())
    cpu = parse_cpuinfo(_read_text(cpuinfo))
    try:
        raw_board = device_tree_model.read_bytes()
    except OSError:
        raw_board = b""
    board = raw_board.replace(b"\x00", b"").decode("utf-8", "replace").strip() or None
    providers = (providers_fn or _default_providers)()
    return HardwareInfo(
        arch=arch, cpu_model=cpu["model"] or platform.processor() or "unknown",
        cpu_count=cpu["count"] or os.cpu_count() or 1, cpu_flags=cpu["flags"],
        ram_mb=_ram_mb(meminfo), board=board, os=_os_name(os_release), kernel=platform.release(),
        python=platform.python_version(), runtimes=dict((versions_fn or runtime_versions)()),
        providers={r: list(p) for r, p in providers.items()},
    )


def normalise_arch(machine: str) -> str:
    return ARCH_ALIASES.get(machine.lower(), machine.lower())


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model name, processor count and the relevant flags from /proc/cpuinfo's text."""
    model, count, raw_flags, implementer, part = "", 0, set(), "", ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            count += 1
        elif key == "model name" and not model:
            model = value
        elif key in ("flags", "features"):
            raw_flags.update(value.split())
        elif key == "cpu implementer" and not implementer:
            implementer = value.lower()
        elif key == "cpu part" and not part:
            part = value.lower()
    if not model and implementer:
        model = ARM_PARTS.get((implementer, part), f"Arm implementer {implementer} part {part}")
    flags = tuple(sorted({CPU_FLAGS[f] for f in raw_flags if f in CPU_FLAGS}))
    return {"model": model, "count": count, "flags": flags}


def runtime_versions() -> dict[str, str]:
    """Runtime → installed version, from package metadata (no import: openvino is slow to load)."""
    found = {}
    for runtime, dists in RUNTIME_DISTRIBUTIONS.items():
        for dist in dists:
            try:
                found[runtime] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def _default_providers() -> dict[str, list[str]]:
    try:
        from edgesdk.runtime import available_providers  # written alongside; may not exist yet
    except (ImportError, AttributeError):
        return probe_providers()
    return available_providers()


def probe_providers() -> dict[str, list[str]]:
    """Ask each installed runtime what it can run on; a runtime that fails to load is left out."""
    found: dict[str, list[str]] = {}
    try:
        import onnxruntime
        found["onnxruntime"] = list(onnxruntime.get_available_providers())
    except Exception:  # noqa: BLE001 - a broken wheel (missing CUDA libs) must not stop the agent
        pass
    try:
        import openvino
        found["openvino"] = list(openvino.Core().available_devices)
    except Exception:  # noqa: BLE001 - e.g. an NPU driver that fails to initialise
        pass
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        found["litert"] = ["XNNPACK"]  # LiteRT's CPU path is the XNNPACK delegate by default
    except Exception:  # noqa: BLE001
        pass
    return found


def detect_target(hw: HardwareInfo, profiles: Iterable[TargetProfile] | None = None) -> TargetProfile | None:
    """The profile that fits this device: a board match first, else a profile for its architecture.

    Without a board match, profiles of the device's architecture that have no board_match are
    candidates when their preferred provider is present; one whose preferred provider is an
    accelerator (an Intel NPU) wins over a generic CPU profile. Ties go to the name, for stability.
    """
    profiles = list(all_builtin_profiles() if profiles is None else profiles)
    if hw.board:
        for profile in profiles:
            if any(match in hw.board for match in profile.board_match):
                return profile
    candidates = []
    for profile in profiles:
        if profile.board_match or profile.architecture != hw.arch or not profile.providers:
            continue
        first = profile.providers[0]
        if hw.has_provider(first.runtime, first.provider):
            candidates.append((first.provider in CPU_PROVIDERS, profile.name, profile))
    return min(candidates, key=lambda c: c[:2])[2] if candidates else None


def check_target(hw: HardwareInfo, profile: TargetProfile) -> list[str]:
    """Why a package built for ``profile`` cannot run here; empty when it can."""
    problems = []
    if profile.architecture != hw.arch:
        problems.append(f"package target {profile.name} is {profile.architecture}; this device is {hw.arch}")
    if not any(hw.has_provider(p.runtime, p.provider) for p in profile.providers):
        wanted = ", ".join(f"{p.runtime}/{p.provider}" for p in profile.providers)
        found = ", ".join(f"{r}/{p}" for r, ps in sorted(hw.providers.items()) for p in ps) or "none"
        problems.append(f"package target {profile.name} runs on {wanted}; this device has {found}")
    return problems


def doctor_report(hw: HardwareInfo, profiles: Iterable[TargetProfile] | None = None) -> dict[str, Any]:
    """JSON-safe summary for `edge-agent doctor` and the device's retained state message."""
    target = detect_target(hw, profiles)
    return {
        "hardware": hw.to_dict(),
        "fingerprint": hw.fingerprint(),
        "target": target.name if target else None,
        "problems": check_target(hw, target) if target else ["no target profile matches this device"],
    }


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _ram_mb(meminfo: Path) -> int:
    for line in _read_text(meminfo).splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) // 1024  # kB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        return 0


def _os_name(os_release: Path) -> str:
    for line in _read_text(os_release).splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return f"{platform.system()} {platform.release()}".strip()
