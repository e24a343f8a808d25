"""A normal (non-editable) install ships the target profiles and finds them without the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIRED_TARGETS = {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "jetson-agx-orin",
                    "intel-core-ultra-npu", "x86-64-cpu", "arm64-cpu"}
# Build outputs, caches and the test suite are not part of the distribution.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist",
                                    ".pytest_cache", "out", "tests", "*.edgepkg")


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def _build_wheel(src: Path, out: Path) -> Path:
    # Isolated build first (setuptools/wheel come from the configured index or the local wheel cache);
    # without isolation the venv's own setuptools needs the `wheel` package, which it may lack.
    attempts = [("wheel", "--no-deps", "-w", str(out), str(src)),
                ("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))]
    logs = []
    for args in attempts:
        result = _pip(*args, cwd=src.parent)
        wheels = sorted(out.glob("edgesdk-*.whl"))
        if result.returncode == 0 and wheels:
            return wheels[0]
        logs.append(f"$ pip {' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    pytest.fail("could not build a wheel:\n" + "\n".join(logs))


@pytest.mark.slow
def test_non_editable_install_finds_every_target_profile(tmp_path: Path):
    # Build from a copy, so the build leaves nothing in the working tree others are editing.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    profiles = sorted(p.stem for p in (REPO / "targets").glob("*.yaml"))
    assert REQUIRED_TARGETS <= set(profiles)

    wheel = _build_wheel(src, tmp_path / "dist")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next((zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"edgesdk/targets/{p}.yaml" for p in profiles} <= names
    assert "edgesdk = edgesdk.cli.main:main" in entry_points
    # Every device extra the runtime table names (edgesdk/runtime_extras.py) is in the wheel.
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert {"agent", "openvino", "litert", "jetson"} <= extras

    site = tmp_path / "site"
    result = _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import json, edgesdk\n"
            "from edgesdk.profiles import all_builtin_profiles\n"
            "print(json.dumps({'file': edgesdk.__file__, 'names': [p.name for p in all_builtin_profiles()]}))\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["file"]).is_relative_to(site), f"imported {found['file']}, not the installed copy"
    assert found["names"] == profiles
    assert len(found["names"]) == 7  # arm64-cpu (issue 11) is the seventh
