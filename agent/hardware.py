"""What this device is: CPU, board, memory, runtimes and providers; and which target profile fits.

Every source the probe reads (/proc/device-tree/model, /proc/cpuinfo, /proc/meminfo,
/etc/os-release, the machine name, the runtime probes) is a parameter, as a file or as its text,
so a test on a PC can fake a Raspberry Pi, a Jetson, an Orange Pi or a Graviton. Nothing here
names a target: `choose_target` matches the profiles' own data (board_match, architecture,
preferred provider) and says why it chose what it chose, CPU features included.
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

from edgesdk.errors import ConfigError
from edgesdk.manifest import Manifest
from edgesdk.profiles import TargetProfile, all_builtin_profiles, load_builtin
from edgesdk.runtime_extras import RUNTIME_EXTRAS, missing_install, pip_command, runtime_needs, vendor_hint

# platform.machine() spellings → the names target profiles use.
ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64",
                "aarch64": "aarch64", "arm64": "aarch64", "armv8l": "aarch64"}

# /proc/cpuinfo flag (x86 `flags`, Arm `Features`) → the name we report. Only flags that change
# which variant runs fastest: VNNI/AMX and Arm dot-product make INT8 pay off, fp16 arithmetic
# makes FP16 variants worth trying on a CPU. Arm's fp16 is two flags, see ARM_FP16.
CPU_FLAGS = {
    "avx2": "avx2", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
    "amx_tile": "amx", "amx_int8": "amx", "amx_bf16": "amx", "avx512_fp16": "fp16",
    "asimd": "neon", "neon": "neon", "asimddp": "asimddp", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
}
# ARMv8.2 half precision: `fphp` (scalar) and `asimdhp` (vector). ORT's MLAS uses its fp16 kernels
# only with the vector one; we say fp16 only when the CPU reports both, as every ARMv8.2 core does.
ARM_FP16 = frozenset({"fphp", "asimdhp"})

# What an Arm CPU feature means for the variants of an aarch64 package (doctor's `cpu_notes`).
ARM_FEATURE_NOTES = {
    "asimddp": ("dot product (asimddp): INT8 matmuls use SDOT/UDOT, INT8 variants usually win",
                "no dot product (asimddp): INT8 gains are modest"),
    "fp16": ("fp16 arithmetic (fphp+asimdhp): fp16 variants can beat fp32",
             "no fp16 arithmetic: fp16 variants run through casts and rarely win"),
    "sve": ("SVE: wider vector kernels where the runtime has them", None),
    "i8mm": ("i8mm: INT8 matrix-multiply instructions (dynamic INT8 matmuls gain most)", None),
}

# Arm `CPU implementer`/`CPU part` → core name (aarch64 /proc/cpuinfo has no "model name").
ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd04"): "Cortex-A35", ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0a"): "Cortex-A75", ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0d"): "Cortex-A77",
    ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd44"): "Cortex-X1",
    ("0x41", "0xd46"): "Cortex-A510", ("0x41", "0xd47"): "Cortex-A710", ("0x41", "0xd4d"): "Cortex-A715",
    ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1", ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd48"): "Cortex-X2", ("0x41", "0xd4b"): "Cortex-A78C",
    ("0x41", "0xd4e"): "Cortex-X3", ("0x41", "0xd80"): "Cortex-A520", ("0x41", "0xd81"): "Cortex-A720",
    ("0x4e", "0x004"): "NVIDIA Carmel",
}

# Runtime → the distributions that provide it, first found wins (Jetson ships onnxruntime-gpu);
# from the one runtime table, edgesdk/runtime_extras.py.
RUNTIME_DISTRIBUTIONS = {r: row.distributions for r, row in RUNTIME_EXTRAS.items()}
DEVICE_TREE_MODEL = "/proc/device-tree/model"

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

    @property
    def hardware_class(self) -> str:
        """What the fleet compares latencies and selections within: the board, else the CPU model."""
        return self.board or self.cpu_model or self.arch

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


def probe_hardware(device_tree_model: Path = Path(DEVICE_TREE_MODEL),
                   cpuinfo: Path = Path("/proc/cpuinfo"),
                   providers_fn: Callable[[], dict[str, list[str]]] | None = None,
                   versions_fn: Callable[[], dict[str, str]] | None = None,
                   machine: str | None = None,
                   meminfo: Path = Path("/proc/meminfo"),
                   os_release: Path = Path("/etc/os-release"),
                   *, cpuinfo_text: str | None = None,
                   device_tree_text: bytes | str | None = None) -> HardwareInfo:
    """Look at this machine (or at the faked files, texts and functions given).

    ``cpuinfo_text`` and ``device_tree_text`` replace the files' contents when given; an empty
    ``device_tree_text`` is a machine without a device tree (a PC, a Graviton server).
    """
    arch = normalise_arch(machine if machine is not None else platform.machine())
    cpu = parse_cpuinfo(_read_text(cpuinfo) if cpuinfo_text is None else cpuinfo_text)
    if device_tree_text is not None:
        raw_board = device_tree_text.encode() if isinstance(device_tree_text, str) else bytes(device_tree_text)
    else:
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
    model, count, raw_flags, implementer = "", 0, set(), ""
    cores: dict[tuple[str, str], None] = {}  # (implementer, part) of each core kind, in order
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
        elif key == "cpu implementer":
            implementer = value.lower()
        elif key == "cpu part":
            cores[(implementer, value.lower())] = None
    if not model and cores:
        # big.LITTLE boards (RK3588: Cortex-A55 + Cortex-A76) name every core kind.
        model = " + ".join(ARM_PARTS.get(c, f"Arm implementer {c[0]} part {c[1]}") for c in cores)
    names = {CPU_FLAGS[f] for f in raw_flags if f in CPU_FLAGS}
    if ARM_FP16 <= raw_flags:
        names.add("fp16")
    flags = tuple(sorted(names))
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
    """The one provider probe, `edgesdk.runtime.available_providers` (the daemon first calls
    `isolate_runtime_probe`, so probing loads no runtime into the agent)."""
    from edgesdk.runtime import available_providers

    return available_providers()


@dataclass(frozen=True)
class TargetChoice:
    """The profile that fits this device (None: none does) and, in one line, why."""

    profile: TargetProfile | None
    reason: str

    @property
    def name(self) -> str | None:
        return self.profile.name if self.profile else None


def choose_target(hw: HardwareInfo, profiles: Iterable[TargetProfile] | None = None) -> TargetChoice:
    """The profile that fits this device: a board match first, else a profile for its architecture.

    Without a board match, profiles of the device's architecture that have no board_match are
    candidates: a generic CPU profile (first provider a CPU one: `x86-64-cpu`, `arm64-cpu`) fits any
    CPU of its architecture, an accelerator profile (an Intel NPU) only when its first provider is
    present, and then wins over the generic one. Ties go to the name, for stability.
    """
    profiles = list(all_builtin_profiles() if profiles is None else profiles)
    cpu = cpu_summary(hw)
    where = f'{DEVICE_TREE_MODEL} "{hw.board}"' if hw.board else f"no {DEVICE_TREE_MODEL}"
    if hw.board:
        for profile in profiles:
            for match in profile.board_match:
                if match in hw.board:
                    return TargetChoice(profile, f'{profile.name}: {where} matches board_match "{match}"; {cpu}')
    candidates = []
    for profile in profiles:
        if profile.board_match or profile.architecture != hw.arch or not profile.providers:
            continue
        first = profile.providers[0]
        generic = first.provider in CPU_PROVIDERS
        if generic or hw.has_provider(first.runtime, first.provider):
            candidates.append((generic, profile.name, profile))
    no_board = f"no board profile matched {where}" if hw.board else f"{where} (not a device-tree board)"
    if candidates:
        generic, _, profile = min(candidates, key=lambda c: c[:2])
        first = profile.providers[0]
        how = "generic CPU profile" if generic else f"its first provider {first.runtime}:{first.provider} is here"
        return TargetChoice(profile, f"{profile.name}: {hw.arch}, {no_board}, {how}; {cpu}")
    arches = sorted({p.architecture for p in profiles})
    why = (f"no profile without board_match is for {hw.arch}" if hw.arch in arches
           else f"no profile is for {hw.arch} (profiles cover {', '.join(arches) or 'nothing'})")
    return TargetChoice(None, f"no target profile matches this device: {no_board}, {why}; {cpu}")


def detect_target(hw: HardwareInfo, profiles: Iterable[TargetProfile] | None = None) -> TargetProfile | None:
    """The profile that fits this device, or None (`choose_target` says why)."""
    return choose_target(hw, profiles).profile


def cpu_summary(hw: HardwareInfo) -> str:
    """`CPU Cortex-A76 x4, features asimddp fp16 neon`: the part of a target reason about the CPU."""
    return f"CPU {hw.cpu_model} x{hw.cpu_count}, features {' '.join(hw.cpu_flags) or 'none of note'}"


def cpu_notes(hw: HardwareInfo) -> list[str]:
    """What this CPU's features mean for an aarch64 package's variants (empty on other machines)."""
    if hw.arch != "aarch64":
        return []
    notes = []
    for feature, (present, absent) in ARM_FEATURE_NOTES.items():
        note = present if feature in hw.cpu_flags else absent
        if note:
            notes.append(note)
    return notes


def check_target(hw: HardwareInfo, profile: TargetProfile) -> list[str]:
    """Why a package built for ``profile`` cannot run here; empty when it can."""
    problems = []
    if profile.architecture != hw.arch:
        problems.append(f"package target {profile.name} is {profile.architecture}; this device is {hw.arch}")
    if not any(hw.has_provider(p.runtime, p.provider) for p in profile.providers):
        wanted = ", ".join(f"{p.runtime}/{p.provider}" for p in profile.providers)
        found = ", ".join(f"{r}/{p}" for r, ps in sorted(hw.providers.items()) for p in ps) or "none"
        missing = [r for r in dict.fromkeys(p.runtime for p in profile.providers)
                   if r not in hw.providers and r in RUNTIME_EXTRAS]
        vendor = vendor_hint([p.provider for p in profile.providers])
        hint = f" ({vendor})" if vendor else (f" ({pip_command(missing)} adds {', '.join(missing)})" if missing else "")
        problems.append(f"package target {profile.name} runs on {wanted}; this device has {found}{hint}")
    return problems


def package_report(hw: HardwareInfo, manifest: Manifest) -> dict[str, Any]:
    """What a package needs that this device lacks: per runtime, installed or not, and the pip line."""
    needs = runtime_needs(manifest, hw.providers)
    try:
        fit = check_target(hw, load_builtin(manifest.target))
    except ConfigError:  # a user's own profile: the manifest carries its architecture
        fit = ([f"package target {manifest.target} is {manifest.architecture}; this device is {hw.arch}"]
               if manifest.architecture and manifest.architecture != hw.arch else [])
    return {"name": manifest.name, "version": manifest.version, "target": manifest.target,
            "runtimes": [n.to_dict() for n in needs], "missing": [n.runtime for n in needs if not n.installed],
            "install": missing_install(needs),
            "problems": fit + [n.problem for n in needs if n.problem]}


def doctor_report(hw: HardwareInfo, profiles: Iterable[TargetProfile] | None = None,
                  manifest: Manifest | None = None) -> dict[str, Any]:
    """JSON-safe summary for `edge-agent doctor` and the device's retained state message.

    With ``manifest``, also which runtimes that package needs are missing here (`package`), and
    their problems join the report's.
    """
    choice = choose_target(hw, profiles)
    report = {
        "hardware": hw.to_dict(),
        "fingerprint": hw.fingerprint(),
        "target": choice.name,
        "target_reason": choice.reason,
        "cpu_notes": cpu_notes(hw),
        "problems": check_target(hw, choice.profile) if choice.profile else ["no target profile matches this device"],
    }
    if manifest is not None:
        report["package"] = package_report(hw, manifest)
        report["problems"] += report["package"]["problems"]
    return report


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
