"""Compiled-engine caches: a real OpenVINO CPU blob written at the first activation and reused at the
next, keyed so another runtime or machine never loads it, removed with its version, bounded in
size; a cache that cannot be written never fails an install; TensorRT's cache options reach ONNX
Runtime (the provider injected: this machine has no GPU)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

from agent.engine_cache import ENGINES, EngineCache, candidate_folder, uses_engine_cache
from agent.installer import Installer, InstallOutcome
from agent.model_host import ModelHost
from agent.selection import Candidate
from agent.store import VersionStore
from agent.telemetry import LatencyRecorder
from edgesdk import runtime
from edgesdk.errors import InstallError
from edgesdk.fleet.repository import PublishedPackage, publish_package
from edgesdk.manifest import Manifest, TensorSpec, Variant
from edgesdk.package import write_package
from edgesdk.protocol import DeploymentStatement
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from tests.agent.agent_harness import hardware
from tests.fixtures.tiny_models import mlp_model

TRT, ORT_CPU = "TensorrtExecutionProvider", "CPUExecutionProvider"
TOLERANCE = {"cosine_min": 0.999, "max_abs": 1e-3}
MIB = 1 << 20
REAL_ORT_SESSION = onnxruntime.InferenceSession  # before any test swaps in its fake


# -- a signed package of a tiny MLP, with the variants a test asks for -------------------------------
@dataclasses.dataclass(frozen=True)
class Pkg:
    published: PublishedPackage

    @property
    def pid(self) -> str:
        return self.published.package_id

    def statement(self, serial: int = 1) -> DeploymentStatement:
        return self.published.statement("lab", "dev-1", serial)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return generate_keys(tmp_path_factory.mktemp("engine-keys"))


def make_package(root: Path, keys: Any, version: str, variants: list[tuple[str, str, list[str], dict]],
                 seed: int = 0) -> Pkg:
    """variants: (id, runtime, providers, runtime_options); every one runs the same ONNX file."""
    src = root / f"src-{version}"
    model = mlp_model(src / "model.onnx", seed=seed)
    x = np.random.default_rng(seed).normal(size=(2, 1, 64)).astype(np.float32)
    session = REAL_ORT_SESSION(str(model), providers=[ORT_CPU])
    y = np.stack([session.run(None, {"input": sample})[0] for sample in x])
    np.savez(src / "inputs.npz", input=x)
    np.savez(src / "outputs.npz", logits=y)
    manifest = Manifest(
        name="mlp", version=version, target="x86-64-cpu", source={"filename": "model.onnx"},
        inputs=[TensorSpec("input", "float32", (1, 64))], outputs=[TensorSpec("logits", "float32", (1, 10))],
        variants=[Variant(id=vid, kind="onnx-fp32" if rt == "onnxruntime" else "openvino-fp32",
                          format="onnx", precision="fp32", runtime=rt, file="model.onnx", providers=providers,
                          runtime_options=options, health_tolerance=dict(TOLERANCE))
                  for vid, rt, providers, options in variants])
    files = {"model.onnx": model, "reference/inputs.npz": src / "inputs.npz",
             "reference/outputs.npz": src / "outputs.npz"}
    path = write_package(root / f"mlp-{version}.edgepkg", manifest, files, load_private_key(keys.private_path))
    return Pkg(publish_package(path, root / "repo", [load_public_key(keys.public_path)]))


OV_F32 = ("openvino-fp32", "openvino", ["CPU"], {"inference_precision_hint": "f32"})
OV_F32_THROUGHPUT = ("openvino-fp32-tput", "openvino", ["CPU"],
                     {"inference_precision_hint": "f32", "performance_hint": "THROUGHPUT"})
ORT_FP32 = ("onnx-fp32", "onnxruntime", [ORT_CPU], {})


@dataclasses.dataclass
class Device:
    """One agent's install machinery on a data_dir, its events and the cache_dir each session got."""

    data_dir: Path
    installer: Installer
    events: list[tuple[Any, str, dict]]
    opened: list[tuple[str, str, Path | None]]  # (variant file, provider, cache_dir)

    def install(self, pkg: Pkg, serial: int = 1) -> InstallOutcome:
        repo = pkg.published.path

        def fetch(statement: DeploymentStatement, progress: Callable[[float], None]) -> Path:
            copy = self.data_dir.parent / f"download-{statement.package_id[:12]}.edgepkg"
            shutil.copyfile(repo, copy)  # the installer deletes what fetch returns
            return copy

        return self.installer.install(pkg.statement(serial), fetch)

    @property
    def engines(self) -> Path:
        return self.data_dir / ENGINES

    def failures(self) -> list[str]:
        return [kw.get("reason", "") for kind, _, kw in self.events if kind.value == "failed"]

    def close(self) -> None:
        for name in list(self.installer.host.models()):
            model = self.installer.host.swap(name, None)
            if model is not None:
                model.session.close()


def make_device(data_dir: Path, keys: Any, *, engine_cache_mb: float = 2048, hw: Any = None,
                available: dict | None = None, factory: Callable[..., Any] | None = None,
                grace_s: float = 0.0) -> Device:
    events: list[tuple[Any, str, dict]] = []
    opened: list[tuple[str, str, Path | None]] = []
    inner = factory or runtime.open_session

    def recording_factory(path: Path, rt: str, provider: str, **kwargs: Any) -> Any:
        opened.append((Path(path).name, provider, kwargs.get("cache_dir")))
        return inner(path, rt, provider, **kwargs)

    host = ModelHost(LatencyRecorder(data_dir.parent / f"{data_dir.name}-telemetry" / "state.json"))
    installer = Installer(VersionStore(data_dir), host, [load_public_key(keys.public_path)], hw or hardware(),
                          available or runtime.available_providers(),
                          lambda kind, pid, **kw: events.append((kind, pid, kw)), budget_s=0.2,
                          session_factory=recording_factory, undeploy_grace_s=grace_s,
                          engine_cache=EngineCache(data_dir / ENGINES, engine_cache_mb))
    return Device(data_dir, installer, events, opened)


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[list[Device]]:
    made: list[Device] = []
    yield made
    for device in made:
        device.close()


def blobs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.blob"))


def candidate_dirs(engines: Path, pid: str) -> list[Path]:
    return sorted(p for p in (engines / pid).iterdir() if p.is_dir())


# -- OpenVINO CPU, for real ------------------------------------------------------------------------
def test_second_activation_reuses_the_openvino_blob_of_the_first(tmp_path: Path, keys: Any,
                                                                  devices: list[Device]) -> None:
    pkg = make_package(tmp_path, keys, "1.0.0", [OV_F32])
    first = make_device(tmp_path / "data", keys)
    devices.append(first)

    assert first.install(pkg) is InstallOutcome.ACTIVE, first.failures()
    (folder,) = candidate_dirs(first.engines, pkg.pid)
    (blob,) = blobs(folder)
    before = blob.stat()
    assert [cache for _, _, cache in first.opened] == [folder]  # the session was given the folder
    first.close()

    # The agent restarts: the cached decision is re-opened, from the blob.
    again = make_device(tmp_path / "data", keys)
    devices.append(again)
    assert again.installer.restore() == []
    assert again.installer.host.get("mlp") is not None
    assert [cache for _, _, cache in again.opened] == [folder]
    assert blobs(folder) == [blob]  # one blob: reused, not a second compile beside it
    after = blob.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_other_runtime_versions_or_hardware_get_another_folder(tmp_path: Path, keys: Any,
                                                                devices: list[Device]) -> None:
    pkg = make_package(tmp_path, keys, "1.0.0", [OV_F32])
    hw = hardware()
    first = make_device(tmp_path / "data", keys, hw=hw)
    devices.append(first)
    assert first.install(pkg) is InstallOutcome.ACTIVE, first.failures()
    (old,) = candidate_dirs(first.engines, pkg.pid)
    first.close()

    for changed in (dataclasses.replace(hw, runtimes={**hw.runtimes, "openvino": "2099.1.0"}),
                    dataclasses.replace(hw, cpu_flags=tuple(sorted({*hw.cpu_flags, "amx"} - {"avx2"})))):
        device = make_device(tmp_path / "data", keys, hw=changed)
        devices.append(device)
        device.installer.restore()  # the cached decision's key no longer matches: a fresh selection
        device.close()
        (_, _, cache), = device.opened
        assert cache is not None and cache.parent == old.parent and cache != old
        assert blobs(cache), "the new key's folder holds its own compiled blob"


def test_only_the_chosen_candidates_engines_are_kept(tmp_path: Path, keys: Any, devices: list[Device]) -> None:
    pkg = make_package(tmp_path, keys, "1.0.0", [OV_F32, OV_F32_THROUGHPUT, ORT_FP32])
    device = make_device(tmp_path / "data", keys)
    devices.append(device)

    assert device.install(pkg) is InstallOutcome.ACTIVE, device.failures()

    given = [cache for _, _, cache in device.opened]
    assert len({c for c in given if c is not None}) == 2 and given.count(None) == 1  # OpenVINO x2; ORT CPU none
    chosen = device.installer.host.get("mlp")
    kept = candidate_dirs(device.engines, pkg.pid)
    if chosen.runtime == "openvino":
        assert [p.name.split("--")[0] for p in kept] == [chosen.variant]
    else:
        assert kept == []


def test_engines_are_removed_with_their_version(tmp_path: Path, keys: Any, devices: list[Device]) -> None:
    pkg = make_package(tmp_path, keys, "1.0.0", [OV_F32])
    device = make_device(tmp_path / "data", keys, grace_s=0.0)
    devices.append(device)
    assert device.install(pkg) is InstallOutcome.ACTIVE, device.failures()
    assert blobs(device.engines / pkg.pid)

    device.installer.undeploy("mlp")

    assert not (device.data_dir / "versions" / pkg.pid).exists()
    assert not (device.engines / pkg.pid).exists()
    assert [p.name for p in device.engines.iterdir()] == []  # nothing left aside either


def test_engines_of_a_version_gone_without_them_are_pruned(tmp_path: Path, keys: Any, devices: list[Device]) -> None:
    orphan = "f" * 64  # engines left by a crash between deleting a version and its engines
    (tmp_path / "data" / ENGINES / orphan / "x--CPU--0").mkdir(parents=True)
    (tmp_path / "data" / ENGINES / orphan / "x--CPU--0" / "1.blob").write_bytes(b"0" * 100)
    device = make_device(tmp_path / "data", keys)
    devices.append(device)

    device.installer.collect_garbage()

    assert not (device.engines / orphan).exists()


def test_the_bound_evicts_other_versions_engines_never_the_active_ones(tmp_path: Path, keys: Any,
                                                                       devices: list[Device]) -> None:
    v1 = make_package(tmp_path, keys, "1.0.0", [OV_F32], seed=0)
    v2 = make_package(tmp_path, keys, "2.0.0", [OV_F32], seed=1)
    device = make_device(tmp_path / "data", keys, engine_cache_mb=0.001)  # 1 KB: less than any blob
    devices.append(device)

    assert device.install(v1) is InstallOutcome.ACTIVE, device.failures()
    assert blobs(device.engines / v1.pid), "the active version keeps its engines, even over the bound"
    assert device.install(v2, serial=2) is InstallOutcome.ACTIVE, device.failures()

    assert (device.data_dir / "versions" / v1.pid).is_dir()  # v1 is still the fallback...
    assert not (device.engines / v1.pid).exists()  # ...but its engines went for the bound
    assert blobs(device.engines / v2.pid)


@pytest.mark.parametrize("fault", ["engines-is-a-file", "package-folder-is-a-file"])
def test_an_unwritable_cache_never_fails_an_install(tmp_path: Path, keys: Any, devices: list[Device],
                                                    fault: str, caplog: pytest.LogCaptureFixture) -> None:
    pkg = make_package(tmp_path, keys, "1.0.0", [OV_F32])
    data = tmp_path / "data"
    data.mkdir()
    # A plain file where a folder must go: mkdir fails with the OSError a read-only or full disk
    # gives (permissions would not stop these tests, which may run as root).
    if fault == "engines-is-a-file":
        (data / ENGINES).write_bytes(b"")
    else:
        (data / ENGINES).mkdir()
        (data / ENGINES / pkg.pid).write_bytes(b"")
    device = make_device(data, keys)
    devices.append(device)

    with caplog.at_level("WARNING", logger="edge-agent"):
        assert device.install(pkg) is InstallOutcome.ACTIVE, device.failures()

    assert [cache for _, _, cache in device.opened] == [None]
    assert any("engine cache off" in r.getMessage() for r in caplog.records)


def test_engine_cache_mb_0_turns_the_cache_off_and_empties_it(tmp_path: Path, keys: Any,
                                                             devices: list[Device]) -> None:
    pkg = make_package(tmp_path, keys, "1.0.0", [OV_F32])
    first = make_device(tmp_path / "data", keys)
    devices.append(first)
    assert first.install(pkg) is InstallOutcome.ACTIVE, first.failures()
    first.close()

    off = make_device(tmp_path / "data", keys, engine_cache_mb=0)
    devices.append(off)
    off.installer.restore()

    assert [cache for _, _, cache in off.opened] == [None]
    assert list(off.engines.iterdir()) == []


# -- TensorRT, the provider injected ---------------------------------------------------------------
def test_ort_cache_options_are_tensorrt_engine_and_timing_caches(tmp_path: Path) -> None:
    options = runtime.ort_cache_options(TRT, tmp_path)

    assert options == {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path),
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": str(tmp_path)}
    assert runtime.ort_cache_options(ORT_CPU, tmp_path) == {}
    assert runtime.ort_cache_options(TRT, None) == {}
    assert uses_engine_cache("onnxruntime", TRT) and uses_engine_cache("openvino", "NPU")
    assert not uses_engine_cache("onnxruntime", ORT_CPU) and not uses_engine_cache("litert", "XNNPACK")


class FakeTensorRtSession:
    """onnxruntime.InferenceSession as a TensorRT build would be: it records the providers it was
    given (with their options) and runs on the CPU."""

    created: list[list[Any]] = []

    def __init__(self, path: str, sess_options: Any = None, providers: list[Any] | None = None) -> None:
        FakeTensorRtSession.created.append(list(providers or []))
        self._real = REAL_ORT_SESSION(path, sess_options, providers=[ORT_CPU])
        self._provider = (providers or [ORT_CPU])[0]
        self._provider = self._provider[0] if isinstance(self._provider, tuple) else self._provider

    def get_providers(self) -> list[str]:
        return [self._provider, ORT_CPU]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_installer_gives_a_tensorrt_candidate_its_cache_and_the_options_reach_onnxruntime(
        tmp_path: Path, keys: Any, devices: list[Device], monkeypatch: pytest.MonkeyPatch) -> None:
    available = {"onnxruntime": [TRT, ORT_CPU]}
    monkeypatch.setattr(runtime, "_probe_providers", lambda: {r: tuple(p) for r, p in available.items()})
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeTensorRtSession)
    FakeTensorRtSession.created = []
    pkg = make_package(tmp_path, keys, "1.0.0", [("onnx-fp32", "onnxruntime", [TRT, ORT_CPU],
                                                   {"provider_options": {"trt_fp16_enable": False}})])
    hw = dataclasses.replace(hardware(), providers={r: list(p) for r, p in available.items()})
    device = make_device(tmp_path / "data", keys, hw=hw, available=available)
    devices.append(device)

    assert device.install(pkg) is InstallOutcome.ACTIVE, device.failures()

    caches = {provider: cache for _, provider, cache in device.opened}
    key = device.installer.last_selection["mlp"]["cache_key"]
    expected = device.engines / pkg.pid / candidate_folder("onnx-fp32", TRT, key)
    assert caches == {TRT: expected, ORT_CPU: None}
    trt_providers = [p for p in FakeTensorRtSession.created if isinstance(p[0], tuple) and p[0][0] == TRT]
    assert trt_providers, FakeTensorRtSession.created
    (name, options), = trt_providers[0]
    assert options == {"trt_fp16_enable": False, **runtime.ort_cache_options(TRT, expected)}


# -- the cache on its own --------------------------------------------------------------------------
def fill(root: Path, package_id: str, mb: float, age_s: float) -> Path:
    folder = root / package_id / "v--CPU--0"
    folder.mkdir(parents=True)
    (folder / "1.blob").write_bytes(b"\0" * int(mb * MIB))
    stamp = 1_700_000_000 - age_s
    os.utime(root / package_id, (stamp, stamp))
    return root / package_id


def test_enforce_limit_evicts_least_recently_used_first_and_keeps_the_active(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / ENGINES, max_mb=2.5)
    oldest_active = fill(cache.root, "a" * 64, 1, age_s=300)
    old = fill(cache.root, "b" * 64, 1, age_s=200)
    newer = fill(cache.root, "c" * 64, 1, age_s=100)

    evicted = cache.enforce_limit(keep={"a" * 64})

    assert evicted == ["b" * 64]
    assert oldest_active.exists() and newer.exists() and not old.exists()
    assert sum(cache.usage_mb().values()) <= 2.5


def test_using_a_folder_makes_it_recent(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / ENGINES, max_mb=1.5)
    candidate = Candidate("openvino-fp32", "openvino", "CPU", "fp32", "m.onnx")
    fill(cache.root, "b" * 64, 1, age_s=100)
    folder = cache.dir_for("a" * 64, candidate, "k" * 64)
    assert folder is not None
    (folder / "1.blob").write_bytes(b"\0" * MIB)
    stamp = 1_700_000_000 - 300  # then a is the older one again...
    os.utime(cache.root / ("a" * 64), (stamp, stamp))

    assert cache.dir_for("a" * 64, candidate, "k" * 64) == folder  # ...until a session uses it
    assert cache.enforce_limit() == ["b" * 64]


def test_names_are_checked_and_made_safe(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / ENGINES)
    odd = Candidate("../../etc/x y", "openvino", ".hidden/GPU", "fp32", "m.onnx")

    folder = cache.dir_for("p" * 64, odd, "k" * 64)

    assert folder is not None and folder.parent == cache.root / ("p" * 64)
    assert "/" not in folder.name and not folder.name.startswith(".")
    with pytest.raises(InstallError, match="invalid package id"):
        cache.dir_for("../versions", odd, "k" * 64)
    with pytest.raises(InstallError, match="invalid package id"):
        cache.remove_package(".trash-x")


def test_a_session_factory_without_cache_dir_still_installs(tmp_path: Path, keys: Any, devices: list[Device]) -> None:
    pkg = make_package(tmp_path, keys, "1.0.0", [OV_F32])
    calls: list[str] = []

    def old_factory(path: Path, runtime_name: str, provider: str, options: Any = None, threads: Any = None) -> Any:
        calls.append(provider)  # written before engine caches: no cache_dir parameter
        return runtime.open_session(path, runtime_name, provider, options=options, threads=threads)

    device = make_device(tmp_path / "data", keys)
    device.installer = Installer(device.installer.store, device.installer.host,
                                 [load_public_key(keys.public_path)], hardware(), runtime.available_providers(),
                                 lambda kind, pid, **kw: device.events.append((kind, pid, kw)), budget_s=0.2,
                                 session_factory=old_factory, engine_cache=EngineCache(device.engines))
    devices.append(device)

    assert device.install(pkg) is InstallOutcome.ACTIVE, device.failures()
    assert calls == ["CPU"] and not device.engines.exists()
