"""Staged rollouts against real agents (tests/agent/test_rollouts.py): the pieces its tests share.

    build_slow_release(pkgs, d)  mlp@3.0.0: same input/output shapes as v1, a much wider hidden
                                 layer, so every call is several times slower (measured, not assumed)
    RolloutRig                   a secure Mosquitto, a repository with v1/v2/v3, a fleet store that
                                 knows the releases, and `edgesdk serve --fleet-key` (collector and
                                 rollout controller) as child processes, restartable by collector id
    agent_fleet(rig, n, prefix)  `edge-agent run` child processes seeded with v1, each with a Collector
                                 on its topics, online in the fleet store (an AgentFleet)
    Load                         a paced thread per device calling its /v1/infer

Everything is real: the broker policy `edgesdk broker config` writes, the agents' installs and
telemetry, the collector filling the store, the controller signing and publishing statements, and
the CLI (typer's CliRunner, `--store`) an operator types.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from typer.testing import CliRunner

from agent.client import EdgeClient
from edgesdk.cli.fleet_cmd import record_release
from edgesdk.cli.main import app
from edgesdk.fleet import rollouts as R
from edgesdk.fleet.repository import PublishedPackage, publish_package
from edgesdk.fleet.store import FleetStore
from edgesdk.signing import load_private_key, load_public_key
from tests.agent.agent_harness import (FLEET, MODEL, AgentProcess, BuiltPackage, Collector, PackageSet, ServeProcess,
                                       agent_settings, fast_broker, new_device_id, retained, sample_feeds,
                                       seeded_data_dir, subprocess_env, wait_until, write_config)
from tests.fixtures.broker import free_port

WAIT_S = 60.0  # any one wait on the store; a healthy run needs a fraction of it
CALLS_PER_S = 200  # per device: --min-samples within a short bake (the 2-core host is then ~100 % busy)
# The harness's 3 s stall timeout suits its transfer-fault tests; here `serve` answers blocks on a
# 2-core host that also runs three agents under load, and a stalled download waits ~30 s to retry.
STALL_TIMEOUT_S = 20


# -- the slow release ------------------------------------------------------------------------------
# v1 has 128: 144x the multiply-adds of v1's middle layer, a 10 MB package. Measured on the 2-core
# test host: 0.3-0.5 ms a call alone (v1: 0.02 ms) and a p95 of ~4 ms inside a loaded agent, where
# v1 shows 0.2-1.4 ms (the scheduler's, not the model's): the regression stands well above that noise.
SLOW_HIDDEN = 1536


def build_slow_release(packages: PackageSet, root: Path) -> BuiltPackage:
    """mlp@3.0.0 for x86-64-cpu: v1's input [1, 64] and logits [1, 10], hidden layers of SLOW_HIDDEN,
    signed with the key the test agents trust. Published by the caller (into its own repository).

    Its only variant is onnx-fp32: the int8 variants of so wide an MLP run ~4x faster, too close to
    a loaded host's noise, and a release that ships fp32 alone is an ordinary one."""
    import dataclasses

    from edgesdk.pipeline.runner import PackageRequest, build_package
    from edgesdk.profiles import load_builtin
    from tests.fixtures.tiny_models import mlp_model

    x86 = load_builtin("x86-64-cpu")
    fp32_only = dataclasses.replace(x86, variants=tuple(v for v in x86.variants if v.kind == "onnx-fp32"))
    model = mlp_model(root / "v3.onnx", seed=7, hidden=SLOW_HIDDEN)
    result = build_package(PackageRequest(model=model, target=fp32_only, out_dir=root, name=MODEL, version="3.0.0",
                                          key_path=packages.keys.private_path, bench_runs=3, synthetic_samples=8))
    staging = root / "staging-repo"  # the BuiltPackage wants a PublishedPackage; the rig publishes its own copy
    published = publish_package(result.path, staging, [load_public_key(packages.keys.public_path)])
    return BuiltPackage(result.path, result.manifest, model, published)


def fastest_p50_ms(packages: PackageSet, pkg: BuiltPackage, folder: Path, runs: int = 300) -> float:
    """The p50 of the package's fastest variant on this host (what the agent's selection picks),
    timed as the agent times a call: around the session's run only."""
    from edgesdk.package import extract_package
    from edgesdk.pipeline.runner import HOST_PROVIDER
    from edgesdk.runtime import open_session

    if not folder.exists():
        extract_package(pkg.path, folder, [load_public_key(packages.keys.public_path)])
    feeds = sample_feeds(11)
    best = float("inf")
    for variant in pkg.manifest.variants:
        session = open_session(folder / variant.file, variant.runtime, HOST_PROVIDER[variant.runtime],
                               options=variant.runtime_options)
        try:
            for _ in range(20):
                session.run(feeds)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(feeds)
                times.append((time.perf_counter() - start) * 1000.0)
            best = min(best, float(np.percentile(times, 50)))
        finally:
            session.close()
    return best


# -- the fleet service -----------------------------------------------------------------------------
@dataclass
class RolloutRig:
    """A secure broker, a repository and fleet store with v1, v2 and v3, and `edgesdk serve` processes
    by collector id (the first one, PRIMARY, runs unless a test stops it)."""

    broker: Any
    packages: PackageSet
    slow: BuiltPackage  # mlp@3.0.0
    tmp: Path
    repo: Path
    store: Path
    env: dict[str, str]
    published: dict[str, PublishedPackage]  # version -> as published into `repo`
    serves: dict[str, Any] = field(default_factory=dict)  # collector id -> running ServeProcess
    leases: dict[str, float] = field(default_factory=dict)  # collector id -> its --rollout-lease

    PRIMARY = "rollouts-a"

    @classmethod
    @contextmanager
    def running(cls, broker: Any, packages: PackageSet, slow: BuiltPackage, tmp: Path) -> Iterator[RolloutRig]:
        repo, store_path = tmp / "repo", tmp / "fleet.db"
        trusted = [load_public_key(packages.keys.public_path)]
        published = {}
        with FleetStore.open(store_path) as store:
            for pkg in (packages.v1, packages.v2, slow):
                one = publish_package(pkg.path, repo, trusted)
                record_release(one, store)
                published[one.version] = one
        rig = cls(broker, packages, slow, tmp, repo, store_path, subprocess_env(tmp / "home", broker.url), published)
        try:
            rig.start_serve(cls.PRIMARY)
            yield rig
        finally:
            rig.abort_unfinished()
            for serve in rig.serves.values():
                serve.terminate()

    # -- serve processes --
    def start_serve(self, collector_id: str, lease_s: float = 3.0) -> Any:
        """`edgesdk serve --fleet-key K --store DB --collector-id ID --rollout-lease S`, ready. A lease
        of 3 s (the minimum) by default: a serve that dies hands its rollouts over within seconds."""
        serve = ServeProcess(self.broker.url, self.repo, self.env, "--fleet-key",
                             str(self.packages.fleet_keys.private_path), "--store", str(self.store),
                             "--collector-id", collector_id, "--rollout-lease", f"{lease_s:g}").wait_ready()
        self.serves[collector_id] = serve
        self.leases[collector_id] = lease_s
        return serve

    def stop_serve(self, collector_id: str) -> None:
        """SIGTERM: a clean stop."""
        self.serves.pop(collector_id).terminate()

    def kill_serve(self, collector_id: str) -> None:
        """SIGKILL: no clean stop, no lease released, the collector's session left to the broker."""
        serve = self.serves.pop(collector_id)
        serve.kill()
        assert serve.proc.returncode == -9

    def ensure_primary(self, lease_s: float = 3.0) -> None:
        """Every test starts with the primary serve running with ``lease_s`` and no other (a fault
        test may have killed it, another started it with a longer lease)."""
        for collector_id, serve in list(self.serves.items()):
            if serve.proc.poll() is not None:
                del self.serves[collector_id]
            elif collector_id != self.PRIMARY or self.leases[collector_id] != lease_s:
                self.stop_serve(collector_id)
        if self.PRIMARY not in self.serves:
            self.start_serve(self.PRIMARY, lease_s)

    def abort_unfinished(self) -> None:
        """A test that failed half-way leaves no rollout for the next test's controller to drive."""
        with FleetStore.open(self.store) as store:
            for rollout in R.list_rollouts(store, FLEET, active_only=True):
                R.request(store, rollout.id, abort=True)

    # -- the CLI --
    def cli(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, [*args, "--store", str(self.store)], env=self.env, catch_exceptions=False)
        return result.exit_code, result.output

    def start_rollout(self, release: str, devices: Sequence[str], *args: str,
                      wait: bool = True) -> tuple[int, str, str]:
        """`edgesdk rollout start RELEASE --fleet lab --device ... ARGS [--wait]`: (exit code, output, rollout id)."""
        device_args = [a for d in devices for a in ("--device", d)]
        code, output = self.cli("rollout", "start", release, "--fleet", FLEET, *device_args, *args,
                                *(["--wait"] if wait else []))
        rollout_id = next((line for line in output.splitlines() if line.startswith("ro-")), None)
        assert rollout_id is not None, output
        return code, output, rollout_id

    # -- the store, read as the tests' ground truth --
    def rollout(self, rollout_id: str) -> tuple[R.RolloutRecord, list[R.RolloutDevice], list[R.Decision],
                                                list[R.WaveRecord]]:
        with FleetStore.open(self.store) as store:
            found = R.get_rollout(store, rollout_id)
            assert found is not None
            return found, R.rollout_devices(store, found.id), R.decisions(store, found.id), \
                R.rollout_waves(store, found.id)

    def wait_rollout(self, rollout_id: str, predicate: Callable[[R.RolloutRecord], bool], what: str,
                     timeout: float = WAIT_S) -> R.RolloutRecord:
        """Poll the store until ``predicate(rollout)``: the controller is another process."""
        with FleetStore.open(self.store) as store:
            def check() -> R.RolloutRecord | None:
                found = R.get_rollout(store, rollout_id)
                return found if found is not None and predicate(found) else None
            return wait_until(check, timeout, what, interval=0.2)

    def running_versions(self, devices: Sequence[str]) -> dict[str, str | None]:
        with FleetStore.open(self.store) as store:
            known = {d.device_id: d for d in store.devices(FLEET)}
        return {d: (known[d].model(MODEL).version if d in known and known[d].model(MODEL) else None) for d in devices}

    def events(self, device_id: str, kind: str) -> list[Any]:
        with FleetStore.open(self.store) as store:
            return store.events(FLEET, device_id=device_id, kinds=[kind])


# -- the devices -----------------------------------------------------------------------------------
@dataclass
class Device:
    id: str
    url: str  # its local API
    process: AgentProcess
    col: Collector
    baseline: bytes = b""  # the v1 statement retained on its desired/mlp before any rollout

    def client(self) -> EdgeClient:
        return EdgeClient(self.url, timeout_s=10)

    def retained_desired(self, broker_url: str) -> bytes | None:
        from edgesdk import protocol

        return retained(broker_url, protocol.device_desired(FLEET, self.id, MODEL))


class Load:
    """One thread per device calling its /v1/infer at ``rate`` calls a second (paced, so the three
    agents, `serve` and this process share two cores the same way before and during a rollout, and
    the latency cohorts compared are measured under the same load). Counts calls and failures."""

    def __init__(self, devices: Sequence[Device], rate: float = CALLS_PER_S) -> None:
        self.devices, self.period = list(devices), 1.0 / rate
        self.calls = {d.id: 0 for d in devices}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(d,), daemon=True) for d in devices]

    def _run(self, device: Device) -> None:
        client = device.client()
        due = time.monotonic()
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                client.infer(sample_feeds(i % 16))
            except Exception as exc:  # noqa: BLE001 - recorded; the tests assert there are none
                self.failures.append(f"{device.id}: {type(exc).__name__}: {exc}")
            self.calls[device.id] += 1
            due += self.period
            late = due - time.monotonic()
            if late > 0:
                self._stop.wait(late)  # pacing, not waiting for an event
            else:
                due = time.monotonic()  # behind: do not burst to catch up

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


@dataclass
class AgentFleet:
    rig: RolloutRig
    devices: list[Device]

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def by_id(self, device_id: str) -> Device:
        return next(d for d in self.devices if d.id == device_id)

    def wait_baseline(self, calls: int, timeout: float = WAIT_S) -> None:
        """Wait until the store holds ``calls`` calls of v1 per device: the *same devices before*
        baseline the latency gates compare the new release with."""
        v1 = self.rig.packages.v1.manifest.version
        with FleetStore.open(self.rig.store) as store:
            def enough() -> bool:
                stats = {g.key: g.count for g in store.telemetry(FLEET, by="device", device_ids=self.ids)}
                return all(stats.get(d, 0) >= calls for d in self.ids)
            wait_until(enough, timeout, f"{calls} calls of mlp@{v1} per device in the fleet store", interval=0.2)


@contextmanager
def agent_fleet(rig: RolloutRig, n: int, prefix: str,
                overrides: Mapping[int, Mapping[str, Any]] | None = None) -> Iterator[AgentFleet]:
    """``n`` `edge-agent run` processes, each seeded with mlp@1.0.0 active and told so by a signed
    v1 statement (retained on its desired/mlp: what a device untouched by a rollout still holds),
    online in the fleet store. ``overrides``: agent.yaml keys for device i."""
    from edgesdk.fleet.deploy import deploy

    overrides = overrides or {}
    packages = rig.packages
    with ExitStack() as stack:
        devices = []
        for i in range(n):
            device_id = new_device_id(f"{prefix}{i}")
            folder = rig.tmp / device_id
            port = free_port()
            config = write_config(folder / "agent.yaml", agent_settings(
                packages, rig.broker.url, seeded_data_dir(packages, folder / "data"), device_id,
                api=f"127.0.0.1:{port}", **{"stall_timeout_s": STALL_TIMEOUT_S, **overrides.get(i, {})}))
            col = stack.enter_context(Collector(rig.broker.url, device_id))
            process = stack.enter_context(AgentProcess(config, folder / "agent.log", subprocess_env(
                folder / "home", rig.broker.url)))
            devices.append(Device(device_id, f"http://127.0.0.1:{port}", process, col))
        v1 = packages.v1
        for d in devices:
            d.col.wait_state(lambda s: s.online and s.active_package == v1.pid, what=f"{d.id} online on v1")
        signed = deploy(fast_broker(rig.broker.url), FLEET, [d.id for d in devices], rig.published["1.0.0"],
                        load_private_key(packages.fleet_keys.private_path))
        for d in devices:
            d.baseline = signed[d.id].to_json()
            d.col.wait_for(lambda c, b=d.baseline: b in c.raw["desired"], what=f"{d.id}'s v1 statement")
        with FleetStore.open(rig.store) as store:
            def registered() -> bool:
                known = {r.device_id: r for r in store.devices(FLEET)}
                return all(d.id in known and known[d.id].status == "online" and known[d.id].model(MODEL) is not None
                           and known[d.id].model(MODEL).package_id == v1.pid for d in devices)
            wait_until(registered, WAIT_S, "every agent online on v1 in the fleet store", interval=0.2)
        try:
            yield AgentFleet(rig, devices)
        finally:
            for d in devices:
                if d.process.proc.poll() is None:
                    d.process.terminate()
