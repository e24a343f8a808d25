"""The one table of runtimes: which pip extra installs each, which module it imports as, and the
exact `pip install` line a user types to add it.

`edgesdk inspect`, `edge-agent doctor` and the agent's selection table all say "openvino is not
installed here: pip install "edgesdk[agent,openvino]"" from this table, and pyproject.toml's extras
must match it, and every runtime a profile lists must have a row (tests/edgesdk/test_runtime_extras.py).

GPU builds are not extras. PyPI's onnxruntime-gpu is not built against JetPack's CUDA/TensorRT; a
Jetson needs NVIDIA's JetPack build of onnxruntime-gpu (Jetson AI Lab's pip index), which also
installs the `onnxruntime` module. Installing PyPI's CPU `onnxruntime` over it (what the `agent` extra does) replaces those
files and the TensorRT/CUDA providers disappear, so a Jetson installs the `jetson` extra: the agent
without an onnxruntime requirement.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgesdk.manifest import Manifest
from edgesdk.profiles import TargetProfile


@dataclass(frozen=True)
class RuntimeExtra:
    """How one runtime gets onto a device."""

    runtime: str  # the name profiles and manifests use: onnxruntime | openvino | litert
    extra: str  # the edgesdk extra that installs it, next to `agent`
    import_names: tuple[str, ...]  # modules that provide it; any one will do
    distributions: tuple[str, ...]  # distributions that provide it, for version lookups (first found wins)

    @property
    def pip(self) -> str:
        return pip_command([self.runtime])


# Order is the order extras are written in a pip line.
RUNTIME_EXTRAS: dict[str, RuntimeExtra] = {
    # The `agent` extra already brings onnxruntime (the one runtime every profile lists).
    "onnxruntime": RuntimeExtra("onnxruntime", "agent", ("onnxruntime",),
                                ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")),
    "openvino": RuntimeExtra("openvino", "openvino", ("openvino",), ("openvino",)),
    # tflite_runtime is LiteRT's former name; edgesdk.runtime still loads it when it is what is there.
    "litert": RuntimeExtra("litert", "litert", ("ai_edge_litert", "tflite_runtime"),
                           ("ai-edge-litert", "tflite-runtime")),
}

# ORT providers that only a vendor's own onnxruntime build has: no edgesdk extra can install them.
VENDOR_PROVIDERS: dict[str, str] = {
    "TensorrtExecutionProvider": "onnxruntime-gpu",
    "CUDAExecutionProvider": "onnxruntime-gpu",
}
VENDOR_BUILD_HINT = ("install onnxruntime-gpu built for this GPU (on a Jetson: NVIDIA's JetPack wheel from the "
                     "Jetson AI Lab pip index, not PyPI), then pip install \"edgesdk[jetson]\" so pip keeps it")


def extra_for(runtime: str) -> RuntimeExtra:
    """The table's row for ``runtime``; a KeyError names the runtimes it knows."""
    try:
        return RUNTIME_EXTRAS[runtime]
    except KeyError:
        raise KeyError(f"no extra installs runtime {runtime!r} (known: {', '.join(RUNTIME_EXTRAS)})") from None


def pip_command(runtimes: Iterable[str]) -> str:
    """The one `pip install` line that adds every runtime in ``runtimes`` to a device's agent."""
    wanted = {extra_for(r).extra for r in runtimes}
    extras = ["agent"] + [row.extra for row in RUNTIME_EXTRAS.values() if row.extra in wanted and row.extra != "agent"]
    return f'pip install "edgesdk[{",".join(extras)}]"'


def missing_hint(runtime: str) -> str:
    """`openvino is not installed here: pip install "edgesdk[agent,openvino]"`."""
    return f"{runtime} is not installed here: {extra_for(runtime).pip}"


def vendor_hint(providers: Iterable[str]) -> str | None:
    """What to install for providers only a vendor build has (None when there are none)."""
    vendor = [p for p in providers if p in VENDOR_PROVIDERS]
    return f"for {', '.join(vendor)}: {VENDOR_BUILD_HINT}" if vendor else None


def installed_runtimes() -> set[str]:
    """Runtimes whose module is importable here, found without importing it (openvino takes a second)."""
    found = set()
    for row in RUNTIME_EXTRAS.values():
        for name in row.import_names:
            try:
                if importlib.util.find_spec(name) is not None:
                    found.add(row.runtime)
                    break
            except (ImportError, ValueError):  # a broken parent package, or a module with no spec
                continue
    return found


@dataclass(frozen=True)
class RuntimeNeed:
    """One runtime a package's variants need, and whether this machine has it."""

    runtime: str
    variants: tuple[str, ...]  # ids of the package's variants that run on it
    installed: bool
    install: str  # the pip line that adds it (for a vendor-only provider, what to install instead)
    problem: str | None = None  # None: nothing to install for it here

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "variants": list(self.variants), "installed": self.installed,
                "extra": RUNTIME_EXTRAS[self.runtime].extra if self.runtime in RUNTIME_EXTRAS else None,
                "install": self.install, "problem": self.problem}


def runtime_needs(manifest: Manifest, available: Mapping[str, Iterable[str]] | Iterable[str]) -> list[RuntimeNeed]:
    """What ``manifest``'s variants need against what is here, one row per runtime in manifest order.

    ``available`` is runtime → providers present (the agent's probe), or just the runtimes installed
    (`installed_runtimes()`); with providers, a runtime that is here but lacks a provider only a
    vendor build has (Jetson's TensorRT/CUDA) is a problem too.
    """
    providers = ({r: set(p) for r, p in available.items()} if isinstance(available, Mapping)
                 else {r: None for r in available})
    by_id = {v.id: v for v in manifest.variants}
    needs = []
    for runtime, ids in manifest.required_runtimes().items():
        wanted = list(dict.fromkeys(p for i in ids if i in by_id for p in by_id[i].providers))
        known = runtime in RUNTIME_EXTRAS
        # A package for GPU providers wants the vendor's build: PyPI's would run its CPU variants only.
        vendor = vendor_hint(wanted)
        install = vendor or (extra_for(runtime).pip if known else f"no edgesdk extra installs {runtime}")
        if runtime not in providers:
            problem = f"{runtime} is not installed here: {install}"
            needs.append(RuntimeNeed(runtime, tuple(ids), False, install, problem))
            continue
        present = providers[runtime]
        lacking = [p for p in wanted if present is not None and p not in present and p in VENDOR_PROVIDERS]
        problem = f"{runtime} here has no {', '.join(lacking)}: {VENDOR_BUILD_HINT}" if lacking else None
        needs.append(RuntimeNeed(runtime, tuple(ids), True, install, problem))
    return needs


def missing_install(needs: Iterable[RuntimeNeed]) -> str | None:
    """One pip line adding every missing runtime an extra can install; None when none is missing."""
    missing = [n.runtime for n in needs if not n.installed and n.runtime in RUNTIME_EXTRAS
               and n.install == extra_for(n.runtime).pip]  # vendor builds are not a pip extra
    return pip_command(missing) if missing else None


def install_line(runtimes: Iterable[str], providers: Iterable[str]) -> str:
    """What a device installs for these runtimes and providers: one pip line, or the vendor build first."""
    known = [r for r in dict.fromkeys(runtimes) if r in RUNTIME_EXTRAS]
    if vendor_hint(providers):
        others = [RUNTIME_EXTRAS[r].extra for r in known if r != "onnxruntime"]
        also = f"; for {', '.join(others)}: pip install \"edgesdk[jetson,{','.join(others)}]\"" if others else ""
        return VENDOR_BUILD_HINT + also
    return pip_command(known)


def package_install(manifest: Manifest) -> str:
    """What a device installs to run every variant of ``manifest``."""
    return install_line(manifest.required_runtimes(), (p for v in manifest.variants for p in v.providers))


def profile_install(profile: TargetProfile) -> str:
    """What a device of ``profile`` installs to run every runtime the profile lists (README's table)."""
    return install_line((p.runtime for p in profile.providers), (p.provider for p in profile.providers))
