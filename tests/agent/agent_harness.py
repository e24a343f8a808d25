"""Shared helpers for the agent's integration tests (selection, end to end, faults, CLI).

    package_set(tmp_factory)  signed packages of tiny models, built once per test session:
                              v1 and v2 (x86-64-cpu, different weights), arm (a user profile
                              for aarch64) and untrusted (v1's files signed by a key no agent trusts),
                              all published into one repository folder
    seeded_data_dir(pkgs, d)  an agent data_dir with v1 installed and active (copied from a template
                              installed once), so a fault test starts from "a model is serving"
    agent_settings(...)       an agent.yaml's keys with test-sized timings; write_config writes the
                              YAML, build_config validates it into an AgentConfig
    running_agent(config)     an in-process Agent (injectable broker/factory), started and stopped
    Rig                       one device with v1 installed and serving, its collector (fixture `rig`)
    AgentProcess, ServeProcess  `edge-agent run` and `edgesdk serve` as child processes
    Collector                 an MQTT subscriber on one device's state/events/telemetry/desired
                              that records everything and waits on predicates (no sleeps)
    ReferenceModels           what each package's model answers (onnxruntime on the source model),
                              to tell which version the agent really serves

Everything talks to a real Mosquitto (tests/fixtures/broker.py). Timings are small so the whole
agent suite stays within a few minutes on two cores.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml

from agent.config import AgentConfig, parse_config
from agent.hardware import HardwareInfo, probe_hardware
from edgesdk import protocol
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.fleet.repository import PublishedPackage, RepositoryServer, publish_package
from edgesdk.manifest import Manifest
from edgesdk.pipeline.runner import HOST_PROVIDER
from edgesdk.protocol import (DeploymentStatement, DeviceState, InstallEvent, InstallEventKind, SignedStatement,
                              TelemetryWindow, sign_statement)
from edgesdk.signing import KeyPair, generate_keys, load_private_key, load_public_key

T = TypeVar("T")
FLEET = "lab"
MODEL = "mlp"  # the name of the v1/v2 test packages
DET_MODEL = "det"  # the name of the second model of several-models tests
VENV_BIN = Path(sys.executable).parent
WAIT_S = 30.0  # upper bound of any single wait; a healthy run needs a fraction of it
INPUT = "input"  # the tiny MLP's input name ([1, 64] float32)
INPUT_WIDTH = 64

# A profile a user might write for their own Arm board (not a built-in), for "wrong target" tests.
ARM_PROFILE = {
    "name": "acme-arm-board",
    "description": "A user's own aarch64 board (test profile)",
    "architecture": "aarch64",
    "providers": [{"runtime": "onnxruntime", "provider": "CPUExecutionProvider"}],
    "variants": ["onnx-fp32"],
    "shapes": {"policy": "dynamic", "batch": 1},
    "gates": {"fp32": {"cosine_min": 0.9999, "top1_min": 0.999}},
}


def device_topics(device_id: str) -> dict[str, str]:
    return {"state": protocol.device_state(FLEET, device_id), "events": protocol.device_events(FLEET, device_id),
            "telemetry": protocol.device_telemetry(FLEET, device_id),
            "desired": protocol.device_desired_filter(FLEET, device_id)}


# Secure brokers (tests/fixtures/broker.py SecureMosquitto) by URL: the agent tests run against
# exactly the policy `edgesdk broker config` writes (TLS, passwords, ACL; no anonymous access).
# Test clients on the fleet side log in as `fleet-service`; each agent gets its own credentials.
SECURE_BROKERS: dict[str, Any] = {}


def secure(broker: Any) -> Any:
    """Register a SecureMosquitto so the helpers below log in to it by its URL."""
    SECURE_BROKERS[broker.url] = broker
    return broker


def fast_broker(url: str) -> BrokerConfig:
    """Broker settings for fleet-side test clients: reconnect within a fraction of a second."""
    timings = dict(reconnect_min_s=0.05, reconnect_max_s=0.5, connect_timeout_s=5)
    broker = SECURE_BROKERS.get(url)
    if broker is not None:
        return broker.config(*broker.fleet_service, **timings)
    return parse_broker_url(url, **timings)


def broker_env(url: str) -> dict[str, str]:
    """What `set -a; . fleet-service.env` exports (and the test fleet key), for CLI subprocesses."""
    broker = SECURE_BROKERS.get(url)
    env = dict(broker.env("fleet-service")) if broker is not None else {}
    env["EDGESDK_BROKER"] = url
    if _PACKAGES is not None:
        env["EDGESDK_FLEET_KEY"] = str(_PACKAGES.fleet_keys.private_path)
    return env


def wait_until(predicate: Callable[[], T], timeout: float = WAIT_S, what: str = "condition",
               interval: float = 0.05) -> T:
    """Poll ``predicate`` (bounded, short interval) for state that publishes no event; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)
        time.sleep(interval)


# -- packages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltPackage:
    path: Path  # the .edgepkg as built (kept; the repository holds its own copy)
    manifest: Manifest
    model: Path  # the source ONNX model it was built from
    published: PublishedPackage

    @property
    def pid(self) -> str:
        return self.published.package_id

    def statement(self, device_id: str, **fields: Any) -> DeploymentStatement:
        """An unsigned statement for ``device_id`` (``fields``: serial, rollback, rollout_id, ...)."""
        from edgesdk.fleet.deploy import next_serial

        serial = fields.pop("serial", None) or next_serial()
        return self.published.statement(FLEET, device_id, serial, **fields)


@dataclass(frozen=True)
class PackageSet:
    root: Path
    keys: KeyPair  # the release key every test agent trusts
    fleet_keys: KeyPair  # the fleet key every test agent trusts for deployment statements
    repo: Path  # repository folder holding all four packages
    v1: BuiltPackage
    v2: BuiltPackage
    arm: BuiltPackage  # built for ARM_PROFILE (aarch64)
    untrusted: BuiltPackage  # v1's files, signed by a key no agent trusts
    det: BuiltPackage  # a second model name (DET_MODEL 1.0.0, input [1, 32]) for several-models tests

    def sign(self, statement: DeploymentStatement) -> SignedStatement:
        """``statement`` signed with the fleet key the test agents trust."""
        return sign_statement(statement, load_private_key(self.fleet_keys.private_path))

    def by_pid(self, pid: str) -> BuiltPackage:
        for pkg in (self.v1, self.v2, self.arm, self.untrusted, self.det):
            if pkg.pid == pid:
                return pkg
        raise KeyError(pid)


_LOCK = threading.Lock()
_PACKAGES: PackageSet | None = None
_SEEDED: Path | None = None


def package_set(tmp_factory: pytest.TempPathFactory) -> PackageSet:
    """Build (once per test session, whichever module asks first) and publish the test packages."""
    global _PACKAGES
    with _LOCK:
        if _PACKAGES is None:
            with pytest.MonkeyPatch.context() as mp:
                root = tmp_factory.mktemp("agent-packages")
                mp.setenv("EDGESDK_HOME", str(root / "edgesdk-home"))  # never touch ~/.config
                _PACKAGES = _build_package_set(root)
        return _PACKAGES


def _build_package_set(root: Path) -> PackageSet:
    from edgesdk.package import extract_package, write_package
    from edgesdk.pipeline.runner import PackageRequest, build_package
    from edgesdk.profiles import load_builtin, parse_profile
    from tests.fixtures.tiny_models import mlp_model

    keys = generate_keys(root / "keys")
    fleet_keys = generate_keys(root / "fleet-keys")
    trusted = [load_public_key(keys.public_path)]
    repo = root / "repo"
    x86 = load_builtin("x86-64-cpu")

    def build(name: str, seed: int, version: str, profile: Any, model_name: str = MODEL, **dims: int) -> BuiltPackage:
        out = root / name
        model = mlp_model(out / f"{name}.onnx", seed=seed, **dims)
        result = build_package(PackageRequest(model=model, target=profile, out_dir=out, name=model_name,
                                              version=version, key_path=keys.private_path, bench_runs=3,
                                              synthetic_samples=8))
        return BuiltPackage(result.path, result.manifest, model, publish_package(result.path, repo, trusted))

    v1 = build("v1", 0, "1.0.0", x86)
    v2 = build("v2", 1, "2.0.0", x86)
    arm = build("arm", 2, "1.0.0", parse_profile(ARM_PROFILE, "acme-arm-board.yaml"))

    # v1's verified files, re-signed with a key no agent trusts (a new version number, so it is
    # a different package id, as an attacker's upload would be).
    rogue = generate_keys(root / "rogue-keys")
    files_dir = root / "untrusted-files"
    opened = extract_package(v1.path, files_dir, trusted)
    manifest = dataclasses.replace(opened.manifest, version="1.0.1")
    pkg = write_package(root / "untrusted" / "mlp-1.0.1-x86-64-cpu.edgepkg", manifest,
                        {name: files_dir / name for name in opened.manifest.files},
                        load_private_key(rogue.private_path))
    # The repository serves what it is given: publish checks structure only for this one.
    untrusted = BuiltPackage(pkg, manifest, v1.model, publish_package(pkg, repo))
    det = build("det", 3, "1.0.0", x86, model_name=DET_MODEL, in_dim=32, hidden=64, out=4)
    return PackageSet(root, keys, fleet_keys, repo, v1, v2, arm, untrusted, det)


@dataclass
class ReferenceModels:
    """Every shipped variant of v1 and v2, run on this host: what a correct agent may answer.

    The agent serves whichever variant its selection picked (an int8 one too), so an answer is
    "v1's" when it equals (to float rounding) what one of v1's variants gives on the same input.
    """

    packages: PackageSet

    def __post_init__(self) -> None:
        from edgesdk.package import extract_package
        from edgesdk.runtime import open_session
        from edgesdk.signing import load_public_key

        trusted = [load_public_key(self.packages.keys.public_path)]
        self._variants: dict[str, list[Any]] = {}
        for name in ("v1", "v2", "det"):
            pkg = getattr(self.packages, name)
            folder = self.packages.root / "reference" / name
            if not folder.exists():
                extract_package(pkg.path, folder, trusted)
            self._variants[name] = [
                open_session(folder / v.file, v.runtime, HOST_PROVIDER[v.runtime], options=v.runtime_options)
                for v in pkg.manifest.variants]

    def expected(self, pkg: BuiltPackage, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The package's fp32 variant's answer."""
        name = "v1" if pkg.pid == self.packages.v1.pid else "v2"
        return next(iter(self._variants[name][0].run(dict(feeds)).values()))

    def which(self, logits: np.ndarray, feeds: Mapping[str, np.ndarray]) -> str | None:
        """'v1' / 'v2' / 'det' when ``logits`` is exactly what one of that package's variants answers, else None."""
        logits = np.asarray(logits)
        for name, sessions in self._variants.items():
            width = self.packages.det.manifest.inputs[0].shape[-1] if name == "det" else INPUT_WIDTH
            if any(np.shape(v)[-1] != width for v in feeds.values()):
                continue  # feeds of another model's shape: not this package's answer
            for session in sessions:
                answer = next(iter(session.run(dict(feeds)).values()))
                if answer.shape == logits.shape and np.allclose(logits, answer, rtol=1e-4, atol=1e-5):
                    return name
        return None


def sample_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {INPUT: np.random.default_rng(seed).normal(size=(1, 64)).astype(np.float32)}


def det_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    """An input for the second model (DET_MODEL takes [1, 32]: the mlp's [1, 64] is a 400 there)."""
    return {INPUT: np.random.default_rng(seed).normal(size=(1, 32)).astype(np.float32)}


_HARDWARE: HardwareInfo | None = None


def hardware() -> HardwareInfo:
    """This machine's probe, once (each probe loads every runtime)."""
    global _HARDWARE
    if _HARDWARE is None:
        _HARDWARE = probe_hardware()
    return _HARDWARE


def seeded_data_dir(packages: PackageSet, dest: Path) -> Path:
    """Copy a data_dir in which v1 is installed, active and its selection cached, to ``dest``."""
    global _SEEDED
    with _LOCK:
        if _SEEDED is None:
            _SEEDED = _seed(packages, packages.root / "seeded-data")
    shutil.copytree(_SEEDED, dest)
    return dest


def _seed(packages: PackageSet, data_dir: Path) -> Path:
    from agent.installer import Installer, InstallOutcome
    from agent.model_host import ModelHost
    from agent.store import VersionStore
    from agent.telemetry import LatencyRecorder
    from edgesdk.runtime import available_providers

    events: list[tuple[InstallEventKind, dict]] = []
    host = ModelHost(LatencyRecorder(packages.root / "seed-telemetry" / "state.json"))
    installer = Installer(VersionStore(data_dir), host, [load_public_key(packages.keys.public_path)], hardware(),
                          available_providers(), lambda kind, pid, **kw: events.append((kind, kw)), budget_s=0.6)

    def fetch(statement: DeploymentStatement, progress: Callable[[float], None]) -> Path:
        copy = packages.root / "seed-download.edgepkg"  # the installer deletes what fetch returns
        shutil.copyfile(packages.v1.path, copy)
        return copy

    if installer.install(packages.v1.statement("seed"), fetch) is not InstallOutcome.ACTIVE:
        raise AssertionError(f"seeding v1 failed: {events}")
    model = host.swap(MODEL, None)
    if model is not None:
        model.session.close()
    return data_dir


# -- agent configuration -------------------------------------------------------------------------
def agent_settings(packages: PackageSet, broker_url: str, data_dir: Path, device_id: str, *,
                   api: str = "127.0.0.1:0", **overrides: Any) -> dict[str, Any]:
    """The keys of an agent.yaml with test-sized timings; ``overrides`` replace or add keys."""
    settings: dict[str, Any] = {
        "device_id": device_id, "fleet": FLEET, "broker": broker_url, "data_dir": str(data_dir),
        "trusted_keys": [str(packages.keys.public_path)], "fleet_keys": [str(packages.fleet_keys.public_path)],
        "api": api,
        "telemetry_interval_s": 0.5, "selection_budget_s": 1, "stall_timeout_s": 3, "log_level": "info",
    }
    broker = SECURE_BROKERS.get(broker_url)
    if broker is not None:  # what `edgesdk devices provision` writes: CA, login as the device id
        username, password = broker.provision(device_id)
        settings.update({"tls": {"ca": str(broker.ca)}, "username": username, "password": password})
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(settings), sort_keys=False), encoding="utf-8")
    return path


def build_config(settings: Mapping[str, Any], base_dir: Path) -> AgentConfig:
    return parse_config(dict(settings), "test-agent.yaml", base_dir)


def new_device_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the fleet side ------------------------------------------------------------------------------
@contextmanager
def repository(broker_url: str, repo_dir: Path) -> Iterator[RepositoryServer]:
    broker = SECURE_BROKERS.get(broker_url)
    group = broker.share_group if broker is not None else protocol.SHARE_GROUP
    with RepositoryServer(fast_broker(broker_url), FLEET, repo_dir, share_group=group) as server:
        yield server


def publish_desired(broker_url: str, device_id: str, payload: bytes, timeout_s: float = 10.0,
                    name: str = MODEL) -> None:
    """Write the device's retained desired message for model ``name`` (any bytes: tests also send garbage)."""
    config = fast_broker(broker_url)
    client = make_client(f"test-fleet-{uuid.uuid4().hex[:8]}", config, clean_start=True)
    connect_blocking(client, config)
    try:
        info = client.publish(protocol.device_desired(FLEET, device_id, name), payload, qos=1, retain=True)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise AssertionError("broker did not acknowledge the desired message")
    finally:
        disconnect(client)


def deploy(broker_url: str, device_id: str, pkg: BuiltPackage, rollout_id: str | None = None,
           rollback: bool = False) -> SignedStatement:
    """What `edgesdk deploy` does: a statement signed with the test fleet key, retained."""
    from edgesdk.fleet.deploy import deploy as fleet_deploy

    packages = _PACKAGES
    if packages is None:
        raise AssertionError("package_set() has not run")
    key = load_private_key(packages.fleet_keys.private_path)
    return fleet_deploy(fast_broker(broker_url), FLEET, [device_id], pkg.published, key, rollout_id=rollout_id,
                        rollback=rollback)[device_id]


class Collector:
    """Records one device's state, events and telemetry as they arrive; `wait_for` a predicate.

    ``persistent`` (default): an MQTT session the broker keeps (clean_start False), so messages
    published while this client is away (a broker restart from its saved database) are queued for
    it, not lost. Events and telemetry are QoS 1.
    """

    LEAVES = ("state", "events", "telemetry", "desired")

    def __init__(self, broker_url: str, device_id: str, *, persistent: bool = True) -> None:
        self.device_id = device_id
        self.config = fast_broker(broker_url)
        self._cond = threading.Condition()
        self.events: list[InstallEvent] = []
        self.telemetry: list[TelemetryWindow] = []
        self.states: list[DeviceState] = []
        self.raw: dict[str, list[bytes]] = {leaf: [] for leaf in self.LEAVES}
        self.errors: list[str] = []  # messages that did not parse: a protocol bug in the agent
        self._subscribed = threading.Event()
        self.subacks = 0  # subscriptions acknowledged (one per connect)
        self.client = make_client(f"test-collector-{uuid.uuid4().hex[:10]}", self.config,
                                  clean_start=not persistent, session_expiry_s=3600)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> Collector:
        connect_blocking(self.client, self.config)
        if not self._subscribed.wait(10):
            raise AssertionError("broker did not acknowledge the collector's subscription")
        return self

    def stop(self) -> None:
        disconnect(self.client)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: Any, reason: Any, props: object) -> None:
        if not reason.is_failure:
            client.subscribe([(topic, 1) for topic in device_topics(self.device_id).values()])

    def _on_subscribe(self, *args: object) -> None:
        with self._cond:
            self.subacks += 1
            self._cond.notify_all()
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        parsed = protocol.parse_device_topic(FLEET, msg.topic)
        leaf = parsed[1].split("/", 1)[0] if parsed else msg.topic.rsplit("/", 1)[-1]
        with self._cond:
            self.raw[leaf].append(msg.payload)
            try:
                if leaf == "events":
                    self.events.append(InstallEvent.from_json(msg.payload, msg.topic))
                elif leaf == "telemetry":
                    self.telemetry.append(TelemetryWindow.from_json(msg.payload, msg.topic))
                elif leaf == "state" and msg.payload:
                    self.states.append(DeviceState.from_json(msg.payload, msg.topic))
            except Exception as exc:  # recorded, and asserted empty by the tests
                self.errors.append(f"{msg.topic}: {exc}")
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Collector], T], timeout: float = WAIT_S, what: str = "") -> T:
        """Block until ``predicate(self)`` is truthy (evaluated under the lock at each message)."""
        with self._cond:
            value = self._cond.wait_for(lambda: predicate(self), timeout)
        if not value:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what or predicate}; "
                        f"events so far: {self.describe_events()}", pytrace=False)
        return value

    # -- views (call under wait_for, or after it) --
    def of_kind(self, kind: InstallEventKind, package_id: str | None = None) -> list[InstallEvent]:
        return [e for e in list(self.events) if e.kind == kind and (package_id is None or e.package_id == package_id)]

    def wait_event(self, kind: InstallEventKind, package_id: str | None = None, timeout: float = WAIT_S,
                   after: int = 0) -> InstallEvent:
        """The first ``kind`` event (of ``package_id``) among events[after:]."""
        def found(c: Collector) -> InstallEvent | None:
            return next((e for e in c.events[after:] if e.kind == kind
                         and (package_id is None or e.package_id == package_id)), None)
        what = f"a {kind.value} event" + (f" for {package_id[:12]}" if package_id else "")
        return self.wait_for(found, timeout, what)

    def wait_state(self, predicate: Callable[[DeviceState], bool], timeout: float = WAIT_S,
                   what: str = "a state message") -> DeviceState:
        return self.wait_for(lambda c: next((s for s in reversed(c.states) if predicate(s)), None), timeout, what)

    def settle(self, windows: int = 2, timeout: float = WAIT_S) -> None:
        """Wait for ``windows`` more telemetry windows: everything the agent published before them
        has arrived (one client, QoS 1, in order), so counting events afterwards is final."""
        with self._cond:
            start = max((w.seq for w in self.telemetry), default=-1)
        self.wait_for(lambda c: any(w.seq >= start + windows for w in c.telemetry), timeout,
                      f"{windows} more telemetry windows")

    def unique_windows(self) -> dict[int, TelemetryWindow]:
        """Telemetry by seq (delivery is at least once: a window re-sent after a reconnect counts once)."""
        with self._cond:
            return {w.seq: w for w in self.telemetry}

    def describe_events(self) -> str:
        return ", ".join(f"{e.kind.value}({e.package_id[:8]}{': ' + e.reason if e.reason else ''})"
                         for e in list(self.events)) or "none"


def retained(broker_url: str, topic: str, timeout: float = 10.0) -> bytes | None:
    """The retained message on ``topic`` as a fresh subscriber sees it (None: none within ``timeout``)."""
    got: list[bytes] = []
    done = threading.Event()
    config = fast_broker(broker_url)
    client = make_client(f"test-retained-{uuid.uuid4().hex[:8]}", config, clean_start=True)

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.on_connect = lambda c, *args: c.subscribe(topic, qos=1)
    connect_blocking(client, config)
    try:
        done.wait(timeout)
    finally:
        disconnect(client)
    return got[0] if got else None


# -- processes -----------------------------------------------------------------------------------
def subprocess_env(home: Path, broker_url: str | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess; with ``broker_url``, the fleet service's login to it."""
    env = dict(os.environ)
    if broker_url is not None:
        env.update(broker_env(broker_url))
    env["EDGESDK_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("http_proxy", None)
    env.pop("HTTP_PROXY", None)
    return env


class AgentProcess:
    """`edge-agent run --config` as a child process, output in a log file."""

    def __init__(self, config_path: Path, log_path: Path, env: Mapping[str, str]) -> None:
        self.config_path, self.log_path = config_path, log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([str(VENV_BIN / "edge-agent"), "run", "--config", str(config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=dict(env))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._log.close()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


def run_cli(args: list[str], env: Mapping[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (edge-agent, edgesdk) and capture its output."""
    return subprocess.run([str(VENV_BIN / args[0]), *args[1:]], capture_output=True, text=True, env=dict(env),
                          timeout=timeout)



def ServeProcess(broker_url: str, repo_dir: Path, env: Mapping[str, str], *args: str) -> Any:  # noqa: N802
    """`edgesdk serve` for this harness's fleet (tests/fixtures/serve.py)."""
    from tests.fixtures.serve import ServeProcess as Serve

    return Serve(broker_url, repo_dir, env, FLEET, *args)


@contextmanager
def running_agent(config: AgentConfig, broker: BrokerConfig | None = None, **kwargs: Any) -> Iterator[Any]:
    """An in-process `Agent`, started (API on a free port), stopped on exit."""
    from agent.daemon import Agent, broker_config_of

    # The agent logs in with its own config (on a secure broker: its device login, never the
    # fleet service's), with reconnect timings for tests.
    broker = broker or broker_config_of(config).with_timeouts(reconnect_min_s=0.05, reconnect_max_s=0.5,
                                                              connect_timeout_s=5)
    agent = Agent(config, broker=broker, hardware=hardware(), api_port=0, **kwargs)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


# -- one device serving v1 (fixture `rig` in conftest.py) ---------------------------------------
@dataclass
class Rig:
    """One device: a data_dir where v1 is installed and active, its settings, a collector, the repository."""

    broker: Any
    packages: PackageSet
    refs: ReferenceModels
    tmp: Path
    device: str
    data_dir: Path
    col: Collector

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return agent_settings(self.packages, self.broker.url, self.data_dir, self.device, **overrides)

    def config(self, **overrides: Any):  # noqa: ANN201
        return build_config(self.settings(**overrides), self.tmp)

    def served(self, url: str, seed: int = 3) -> str | None:
        feeds = sample_feeds(seed)
        return self.refs.which(_edge_client(url, timeout_s=10).infer(feeds)["logits"], feeds)

    def wait_v1_online(self) -> None:
        self.col.wait_state(lambda s: s.online and s.active_package == self.packages.v1.pid, what="v1 online")

    def only_failure(self, package_id: str) -> InstallEvent:
        """The one `failed` event of this install: wait for it, let later messages arrive, count."""
        failed = self.col.wait_event(InstallEventKind.FAILED, package_id)
        self.col.settle()
        failures = self.col.of_kind(InstallEventKind.FAILED)
        assert failures == [failed], f"expected one failed event, got {self.col.describe_events()}"
        assert failed.reason and "\n" not in failed.reason and "Traceback" not in failed.reason
        return failed

    def persist_broker_state(self) -> None:
        """From here on a broker restart, even after a kill, comes back with what the broker held at
        the last clean stop, including this collector's subscription: messages for it published
        before it has reconnected are queued for it, not lost."""
        for _ in range(2):  # the second clean stop saves the collector's re-made subscription
            acks = self.col.subacks
            self.broker.restart()
            self.col.wait_for(lambda c: c.subacks > acks, what="the collector to subscribe again")

    def kill_during_install(self, pkg: BuiltPackage, kill_at: InstallEventKind) -> tuple[Path, dict[str, str], str]:
        """Run the agent as a process (serving v1), deploy ``pkg`` and SIGKILL the agent at the
        install's ``kill_at`` event. Returns (config, env, API url) for the restart. Call it with
        the repository running."""
        from tests.fixtures.broker import free_port

        api_port = free_port()
        config = write_config(self.tmp / "agent.yaml", self.settings(api=f"127.0.0.1:{api_port}"))
        env = subprocess_env(self.tmp / "home", self.broker.url)
        with AgentProcess(config, self.tmp / "agent-1.log", env) as first:
            self.wait_v1_online()
            deploy(self.broker.url, self.device, pkg)
            self.col.wait_event(kill_at, pkg.pid)
            first.kill()  # SIGKILL: no cleanup, whatever step the install was at
            assert first.proc.returncode == -9
        return config, env, f"http://127.0.0.1:{api_port}"

    def publish(self, signed: SignedStatement) -> None:
        """Put ``signed`` on this device's desired topic of its model (retained), as the fleet service would."""
        publish_desired(self.broker.url, self.device, signed.to_json(), name=signed.statement.name)

    def publish_for(self, name: str, signed: SignedStatement) -> None:
        """Put ``signed`` on the desired topic of model ``name`` (a misfiled statement, if it names another)."""
        publish_desired(self.broker.url, self.device, signed.to_json(), name=name)

    def assert_v1_still_serving(self, agent: Any) -> None:
        assert self.served(agent.api.url) == "v1"
        assert agent.store.active(MODEL)["package_id"] == self.packages.v1.pid
        assert agent.status()["installs"][MODEL]["active"]["package_id"] == self.packages.v1.pid
        assert self.col.of_kind(InstallEventKind.ACTIVATED) == []


def _edge_client(url: str, timeout_s: float):  # noqa: ANN202
    from agent.client import EdgeClient

    return EdgeClient(url, timeout_s=timeout_s)
