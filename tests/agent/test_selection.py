"""Variant × provider selection: fake sessions with controlled latency on an injected clock (so
ranking is deterministic), then one run on the real ORT CPU and OpenVINO CPU runtimes."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from agent.selection import cache_key, load_reference, select
from edgesdk.errors import HealthCheckError, PackageError, RuntimeUnavailableError
from edgesdk.manifest import Manifest, TensorSpec, Variant
from edgesdk.package import extract_package
from edgesdk.signing import load_public_key
from tests.agent.agent_harness import PackageSet, hardware, package_set

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
ORT = "onnxruntime"
TOLERANCE = {"cosine_min": 0.99, "max_abs": 1e-3}
# Latencies are powers of two (seconds) and the fake clock starts at 0, so every sum is exact in
# binary floating point: equal latencies give bit-equal medians, and ties are real ties.
FAST, MID, SLOW = 2.0**-9, 2.0**-8, 2.0**-7


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def doubled(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The 'model': y = 2x. The reference outputs below are made with it."""
    return {"y": np.asarray(feeds["x"], dtype=np.float32) * 2}


def wrong(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A broken runtime: same shape, wrong numbers (sign flipped)."""
    return {"y": np.asarray(feeds["x"], dtype=np.float32) * -2}


@dataclass
class FakeSession:
    clock: FakeClock
    latency: Callable[[int], float]  # seconds for the n-th run
    outputs: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    input_names: tuple[str, ...] = ("x",)
    output_names: tuple[str, ...] = ("y",)
    runs: int = 0
    closed: bool = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.clock.now += self.latency(self.runs)
        self.runs += 1
        return self.outputs(feeds)

    def close(self) -> None:
        self.closed = True


@dataclass
class Behaviour:
    latency: float | Callable[[int], float] = MID
    outputs: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] = doubled
    unavailable: bool = False  # the factory raises RuntimeUnavailableError (ORT fell back silently)


@dataclass
class FakeFactory:
    """``open_session``'s signature; behaviour per (variant file name, provider)."""

    clock: FakeClock
    behaviours: dict[tuple[str, str], Behaviour]
    opened: list[tuple[str, str]] = field(default_factory=list)
    sessions: dict[tuple[str, str], FakeSession] = field(default_factory=dict)

    def __call__(self, path: Path, runtime: str, provider: str, options: dict | None = None,
                 threads: int | None = None) -> FakeSession:
        key = (Path(path).stem, provider)
        self.opened.append(key)
        behaviour = self.behaviours[key]
        if behaviour.unavailable:
            raise RuntimeUnavailableError(f"onnxruntime fell back from {provider} to CPUExecutionProvider")
        latency = behaviour.latency
        session = FakeSession(self.clock, latency if callable(latency) else (lambda n, s=latency: s),
                              behaviour.outputs)
        self.sessions[key] = session
        return session


def make_manifest(fp16_providers: tuple[str, ...] = (CUDA, CPU)) -> Manifest:
    """Two variants, three candidates when CUDA and CPU are present, in this profile order:
    fp16 on each of ``fp16_providers``, then fp32 on CPU."""
    variants = [
        Variant(id="onnx-fp16", kind="onnx-fp16", format="onnx", precision="fp16", runtime=ORT,
                file="variants/fp16.onnx", providers=list(fp16_providers), health_tolerance=dict(TOLERANCE)),
        Variant(id="onnx-fp32", kind="onnx-fp32", format="onnx", precision="fp32", runtime=ORT,
                file="variants/fp32.onnx", providers=[CPU], health_tolerance=dict(TOLERANCE)),
    ]
    return Manifest(name="doubler", version="1.0.0", target="jetson-orin-nano", source={},
                    inputs=[TensorSpec("x", "float32", (1, 3))], outputs=[TensorSpec("y", "float32", (1, 3))],
                    variants=variants)


@pytest.fixture
def install_dir(tmp_path: Path) -> Path:
    """An installed version's folder: reference inputs (4 samples) and the y = 2x outputs."""
    ref = tmp_path / "version" / "reference"
    ref.mkdir(parents=True)
    x = np.random.default_rng(0).normal(size=(4, 1, 3)).astype(np.float32)
    np.savez(ref / "inputs.npz", x=x)
    np.savez(ref / "outputs.npz", y=x * 2)
    return tmp_path / "version"


AVAILABLE = {ORT: [CUDA, CPU]}
KEY = cache_key("ab" * 32, "hw-fingerprint", {ORT: "1.32.0"})


def run_select(install_dir: Path, behaviours: dict[tuple[str, str], Behaviour], manifest: Manifest | None = None,
               available: dict[str, list[str]] | None = None, cached: dict | None = None,
               key: str = KEY) -> tuple:
    clock = FakeClock()
    factory = FakeFactory(clock, behaviours)
    selection = select(manifest or make_manifest(), install_dir, available or AVAILABLE, key, budget_s=1.0,
                       session_factory=factory, cached=cached, clock=clock)
    return selection, factory


def rows(selection) -> dict[tuple[str, str], dict]:  # noqa: ANN001
    return {(r["variant"], r["provider"]): r for r in (row.to_dict() for row in selection.table)}


def test_fastest_candidate_by_median_wins(install_dir: Path) -> None:
    # fp16@CUDA is fastest on most runs but every 10th run stalls: its mean is the worst, its
    # median the best. Ranking must use the median (one GC pause must not decide the winner).
    spiky = lambda n: 2.0**-2 if n % 10 == 0 else FAST  # noqa: E731
    selection, factory = run_select(install_dir, {
        ("fp16", CUDA): Behaviour(latency=spiky),
        ("fp16", CPU): Behaviour(latency=SLOW),
        ("fp32", CPU): Behaviour(latency=MID),
    })
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp16", CUDA)
    assert not selection.from_cache
    table = rows(selection)
    assert len(table) == 3
    assert table[("onnx-fp16", CUDA)]["status"] == "selected"
    assert table[("onnx-fp16", CUDA)]["p50_ms"] == pytest.approx(FAST * 1000)
    assert table[("onnx-fp32", CPU)]["p50_ms"] == pytest.approx(MID * 1000)
    assert table[("onnx-fp16", CPU)]["p50_ms"] == pytest.approx(SLOW * 1000)
    assert {table[k]["status"] for k in [("onnx-fp16", CPU), ("onnx-fp32", CPU)]} == {"not_checked"}
    assert all(r["runs"] >= 3 for r in table.values())
    # The winner's session is handed over open; every loser's is closed.
    assert selection.session is factory.sessions[("fp16", CUDA)] and not selection.session.closed
    assert factory.sessions[("fp16", CPU)].closed and factory.sessions[("fp32", CPU)].closed


@pytest.mark.parametrize("profile_order, winner", [((CUDA, CPU), CUDA), ((CPU, CUDA), CPU)])
def test_tie_goes_to_profile_order(install_dir: Path, profile_order: tuple[str, str], winner: str) -> None:
    selection, _ = run_select(install_dir, {
        ("fp16", CUDA): Behaviour(latency=FAST),
        ("fp16", CPU): Behaviour(latency=FAST),
        ("fp32", CPU): Behaviour(latency=SLOW),
    }, manifest=make_manifest(profile_order))
    table = rows(selection)
    assert table[("onnx-fp16", CUDA)]["p50_ms"] == table[("onnx-fp16", CPU)]["p50_ms"]  # a real tie
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp16", winner)


def test_skips_fastest_candidate_that_fails_health_check(install_dir: Path) -> None:
    selection, factory = run_select(install_dir, {
        ("fp16", CUDA): Behaviour(latency=FAST, outputs=wrong),
        ("fp16", CPU): Behaviour(latency=SLOW),
        ("fp32", CPU): Behaviour(latency=MID),
    })
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp32", CPU)
    broken = rows(selection)[("onnx-fp16", CUDA)]
    assert broken["status"] == "health_failed" and broken["health"] is False
    assert "cosine" in broken["detail"] or "max abs" in broken["detail"]
    assert rows(selection)[("onnx-fp32", CPU)]["health"] is True
    assert factory.sessions[("fp16", CUDA)].closed
    assert selection.session is factory.sessions[("fp32", CPU)]


def test_raises_health_check_error_naming_every_failed_candidate(install_dir: Path) -> None:
    clock = FakeClock()
    factory = FakeFactory(clock, {
        ("fp16", CUDA): Behaviour(latency=FAST, outputs=wrong),
        ("fp16", CPU): Behaviour(latency=SLOW, outputs=wrong),
        ("fp32", CPU): Behaviour(latency=MID, outputs=lambda feeds: {"y": np.full((1, 3), np.nan, np.float32)}),
    })
    with pytest.raises(HealthCheckError) as caught:
        select(make_manifest(), install_dir, AVAILABLE, KEY, budget_s=1.0, session_factory=factory, clock=clock)
    message = str(caught.value)
    assert "no candidate passed the health check" in message
    for name in (f"onnx-fp16@{CUDA}", f"onnx-fp16@{CPU}", f"onnx-fp32@{CPU}"):
        assert name in message
    assert "nonfinite" in message  # the NaN candidate's own reason is in the line
    assert "\n" not in message
    assert all(session.closed for session in factory.sessions.values())


def test_silent_provider_fallback_is_reported_unavailable(install_dir: Path) -> None:
    selection, _ = run_select(install_dir, {
        ("fp16", CUDA): Behaviour(unavailable=True),
        ("fp16", CPU): Behaviour(latency=SLOW),
        ("fp32", CPU): Behaviour(latency=MID),
    })
    cuda = rows(selection)[("onnx-fp16", CUDA)]
    assert cuda["status"] == "unavailable"
    assert "fell back" in cuda["detail"]
    assert cuda["p50_ms"] is None
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp32", CPU)


def test_providers_missing_on_device_are_not_candidates(install_dir: Path) -> None:
    selection, factory = run_select(install_dir, {
        ("fp16", CPU): Behaviour(latency=SLOW),
        ("fp32", CPU): Behaviour(latency=MID),
    }, available={ORT: [CPU]})
    assert ("fp16", CUDA) not in factory.opened
    assert set(rows(selection)) == {("onnx-fp16", CPU), ("onnx-fp32", CPU)}


def test_no_runtime_for_any_variant_names_what_the_package_needs(install_dir: Path) -> None:
    with pytest.raises(HealthCheckError, match=f"{ORT}:{CUDA}"):
        run_select(install_dir, {}, available={"openvino": ["CPU"]})


def cached_record(variant: str, provider: str, key: str) -> dict:
    return {"variant": variant, "runtime": ORT, "provider": provider, "cache_key": key}


def test_reuses_cached_decision_when_key_matches(install_dir: Path) -> None:
    # The cached winner is not the fastest now: a reuse must not re-benchmark (that is its point).
    behaviours = {("fp16", CUDA): Behaviour(latency=FAST), ("fp16", CPU): Behaviour(latency=SLOW),
                  ("fp32", CPU): Behaviour(latency=MID)}
    selection, factory = run_select(install_dir, behaviours, cached=cached_record("onnx-fp32", CPU, KEY))
    assert selection.from_cache
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp32", CPU)
    assert factory.opened == [("fp32", CPU)]
    assert factory.sessions[("fp32", CPU)].runs == 4  # the health check on the 4 reference inputs only
    assert rows(selection)[("onnx-fp32", CPU)]["status"] == "selected"


def test_reselects_when_cache_key_differs(install_dir: Path) -> None:
    behaviours = {("fp16", CUDA): Behaviour(latency=FAST), ("fp16", CPU): Behaviour(latency=SLOW),
                  ("fp32", CPU): Behaviour(latency=MID)}
    other_key = cache_key("ab" * 32, "another-hardware", {ORT: "1.32.0"})
    selection, factory = run_select(install_dir, behaviours, cached=cached_record("onnx-fp32", CPU, other_key))
    assert not selection.from_cache
    assert sorted(factory.opened) == sorted(behaviours)
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp16", CUDA)


def test_reselects_when_cached_winner_no_longer_passes_health_check(install_dir: Path) -> None:
    behaviours = {("fp16", CUDA): Behaviour(latency=FAST), ("fp16", CPU): Behaviour(latency=SLOW),
                  ("fp32", CPU): Behaviour(latency=MID, outputs=wrong)}
    selection, factory = run_select(install_dir, behaviours, cached=cached_record("onnx-fp32", CPU, KEY))
    assert not selection.from_cache
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp16", CUDA)


# -- real runtimes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> PackageSet:
    return package_set(tmp_path_factory)


def test_selects_working_session_on_real_ort_and_openvino_cpu(packages: PackageSet, tmp_path: Path) -> None:
    installed = tmp_path / "version"
    extract_package(packages.v1.path, installed, [load_public_key(packages.keys.public_path)])
    manifest = packages.v1.manifest
    available = {ORT: [CPU], "openvino": ["CPU"]}
    key = cache_key(packages.v1.pid, hardware().fingerprint(), dict(hardware().runtimes))
    selection = select(manifest, installed, available, key, budget_s=1.0)
    try:
        table = [row.to_dict() for row in selection.table]
        expected = {(v.id, p) for v in manifest.variants for p in v.providers if p in available[v.runtime]}
        assert {(r["variant"], r["provider"]) for r in table} == expected
        assert {r["runtime"] for r in table} == {ORT, "openvino"}  # both runtimes really measured
        for row in table:
            assert row["status"] in ("selected", "not_checked"), row
            assert row["p50_ms"] > 0 and row["runs"] >= 3
        assert [r["status"] for r in table].count("selected") == 1
        winner = next(r for r in table if r["status"] == "selected")
        assert winner["p50_ms"] == min(r["p50_ms"] for r in table)
        ref_in, ref_out = load_reference(installed, manifest)
        got = selection.session.run(ref_in[0])["logits"]
        tolerance = manifest.variant(selection.chosen.variant).health_tolerance["max_abs"]
        assert np.max(np.abs(got - ref_out[0]["logits"])) <= tolerance
        assert selection.cache_key == key and not selection.from_cache
    finally:
        selection.session.close()
    shutil.rmtree(installed)


# -- paths out of the version folder (defence in depth behind the manifest parser) ----------------
ALL_GOOD = {("fp16", CUDA): Behaviour(), ("fp16", CPU): Behaviour(), ("fp32", CPU): Behaviour()}


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "variants/../../outside.onnx"])
def test_variant_path_outside_the_version_folder_is_refused_before_any_session_opens(
        install_dir: Path, path: str) -> None:
    manifest = make_manifest()  # built in memory: the parser's path check never saw it
    manifest.variants[1].file = path
    clock = FakeClock()
    factory = FakeFactory(clock, ALL_GOOD)

    with pytest.raises(PackageError, match="points outside the version folder"):
        select(manifest, install_dir, AVAILABLE, KEY, budget_s=1.0, session_factory=factory, clock=clock)

    assert factory.opened == []


def test_symbolic_link_planted_in_the_version_folder_is_refused(install_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.onnx").write_bytes(b"not from the package")
    (install_dir / "variants").mkdir()
    (install_dir / "variants" / "fp32.onnx").symlink_to(tmp_path / "elsewhere.onnx")

    with pytest.raises(PackageError, match="variant onnx-fp32 file 'variants/fp32.onnx' points outside"):
        run_select(install_dir, ALL_GOOD)


def test_reference_path_outside_the_version_folder_is_refused(install_dir: Path) -> None:
    manifest = make_manifest()
    manifest.reference = {"inputs": "../../inputs.npz", "outputs": "reference/outputs.npz"}

    with pytest.raises(PackageError, match="reference.inputs '../../inputs.npz' points outside"):
        load_reference(install_dir, manifest)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a zip", b"\x93NUMPY garbage", "empty-npz"])
def test_damaged_reference_data_is_a_package_error(install_dir: Path, content) -> None:
    target = install_dir / "reference" / "inputs.npz"
    if content == "empty-npz":
        np.savez(target, x=np.zeros((0, 3), np.float32))
    else:
        target.write_bytes(content)

    with pytest.raises(PackageError, match="reference/inputs.npz"):
        load_reference(install_dir, make_manifest())


def test_cached_winner_whose_runtime_raises_its_own_error_is_reselected(install_dir: Path) -> None:
    def crash(feeds):  # noqa: ANN001, ANN202 - what onnxruntime raises is not an EdgeError
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

    cached = {"cache_key": KEY, "variant": "onnx-fp16", "runtime": ORT, "provider": CUDA}
    behaviours = {**ALL_GOOD, ("fp16", CUDA): Behaviour(latency=FAST, outputs=crash)}

    selection, _ = run_select(install_dir, behaviours, cached=cached)

    assert not selection.from_cache
    assert (selection.chosen.variant, selection.chosen.provider) != ("onnx-fp16", CUDA)


# -- a variant whose runtime is not installed is a row, not silence (issue 11) ---------------------
def with_openvino_variant() -> Manifest:
    manifest = make_manifest()
    manifest.variants.insert(0, Variant(id="openvino-fp32", kind="openvino-fp32", format="openvino-ir",
                                        precision="fp32", runtime="openvino", file="variants/ov.xml",
                                        providers=["CPU"], health_tolerance=dict(TOLERANCE)))
    return manifest


def test_variant_whose_runtime_is_not_installed_is_a_row_with_the_pip_line(install_dir: Path) -> None:
    behaviours = {("fp16", CUDA): Behaviour(latency=FAST), ("fp16", CPU): Behaviour(latency=SLOW),
                  ("fp32", CPU): Behaviour(latency=MID)}

    selection, factory = run_select(install_dir, behaviours, manifest=with_openvino_variant())

    row = rows(selection)[("openvino-fp32", "CPU")]
    assert row["status"] == "runtime_missing"
    assert row["detail"] == 'openvino is not installed here: pip install "edgesdk[agent,openvino]"'
    assert (row["runtime"], row["p50_ms"], row["health"]) == ("openvino", None, None)
    assert ("ov", "CPU") not in factory.opened
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp16", CUDA)


def test_cached_decision_still_reports_the_variant_whose_runtime_is_missing(install_dir: Path) -> None:
    behaviours = {("fp16", CUDA): Behaviour(latency=FAST), ("fp16", CPU): Behaviour(latency=SLOW),
                  ("fp32", CPU): Behaviour(latency=MID)}

    selection, _ = run_select(install_dir, behaviours, manifest=with_openvino_variant(),
                              cached=cached_record("onnx-fp32", CPU, KEY))

    assert selection.from_cache
    assert rows(selection)[("openvino-fp32", "CPU")]["status"] == "runtime_missing"


def test_no_installed_runtime_for_any_variant_says_which_pip_line_adds_one(install_dir: Path) -> None:
    with pytest.raises(HealthCheckError, match=r'onnxruntime is not installed here: pip install "edgesdk\[agent\]"'):
        run_select(install_dir, {}, available={"openvino": ["CPU"]})


# -- beside the device's other models ------------------------------------------------------------
def _neighbours_running() -> bool:
    return any(t.name == "edge-agent-neighbours" for t in threading.enumerate())


class _Neighbour:
    """Another active model's session: takes a little wall time per call, or raises."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("neighbour session broke")
        threading.Event().wait(0.0005)  # stands for the neighbour's own inference work
        return {"z": np.zeros(1, np.float32)}


def test_candidates_are_ranked_by_their_latency_beside_the_other_models(install_dir: Path) -> None:
    """fp16@CUDA is the fastest alone but shares the GPU with the neighbour and slows 4x; fp32@CPU
    is slower alone but unaffected: with a neighbour running, fp32@CPU wins, and each row reports
    the p50 alone and the ratio (interference)."""
    from agent.neighbours import Neighbour

    contended = lambda n: SLOW * 2 if _neighbours_running() else FAST  # noqa: E731
    clock = FakeClock()
    factory = FakeFactory(clock, {
        ("fp16", CUDA): Behaviour(latency=contended),
        ("fp16", CPU): Behaviour(latency=SLOW),
        ("fp32", CPU): Behaviour(latency=MID),
    })
    neighbour, broken = _Neighbour(), _Neighbour(fail=True)
    selection = select(make_manifest(), install_dir, AVAILABLE, KEY, budget_s=1.0, session_factory=factory,
                       clock=clock, neighbours=[Neighbour("broken", broken, {"x": np.zeros(1)}),
                                                Neighbour("ocr", neighbour, {"x": np.zeros(1)})])

    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp32", CPU)
    assert selection.neighbours == ("broken", "ocr")
    table = rows(selection)
    gpu = table[("onnx-fp16", CUDA)]
    assert gpu["p50_alone_ms"] == pytest.approx(FAST * 1000) and gpu["p50_ms"] == pytest.approx(SLOW * 2000)
    assert gpu["interference"] == pytest.approx(8.0)
    assert table[("onnx-fp32", CPU)]["interference"] == pytest.approx(1.0)
    assert broken.calls == 1  # the first call raised: that neighbour was dropped, the selection went on
    assert not _neighbours_running()


def test_without_other_models_rows_report_no_interference(install_dir: Path) -> None:
    selection, _ = run_select(install_dir, {
        ("fp16", CUDA): Behaviour(latency=FAST), ("fp16", CPU): Behaviour(latency=SLOW),
        ("fp32", CPU): Behaviour(latency=MID)})
    assert selection.neighbours == ()
    assert all("interference" not in row for row in rows(selection).values())


def test_each_candidate_reports_its_resident_memory_never_below_its_files(install_dir: Path) -> None:
    """RSS growth while the session opened and ran once; a probe that saw none still counts the
    variant's files (here: none listed, so 0), and a probe that saw 3 MiB reports 3 MiB."""
    readings = iter([100 << 20, 103 << 20] * 10)
    clock = FakeClock()
    factory = FakeFactory(clock, {("fp16", CUDA): Behaviour(latency=FAST), ("fp16", CPU): Behaviour(latency=SLOW),
                                  ("fp32", CPU): Behaviour(latency=MID)})
    selection = select(make_manifest(), install_dir, AVAILABLE, KEY, budget_s=1.0, session_factory=factory,
                       clock=clock, rss_probe=lambda: next(readings))
    assert {row["resident_mb"] for row in rows(selection).values()} == {3.0}
    assert selection.resident_mb == 3.0
