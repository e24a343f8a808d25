"""`edgesdk serve` runs the collector (on by default) as a child process, against a real Mosquitto
and a SQLite fleet store in tmp. A SIGKILL loses no window: what the dead serve had not committed
and what devices sent while it was down wait in its persistent session, and the restarted serve
(same store, same collector id) stores each window exactly once. `publish` records the release."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from typer.testing import CliRunner

from edgesdk.broker import parse_broker_url
from edgesdk.cli.main import app
from edgesdk.fleet.store import FleetStore
from edgesdk.manifest import Manifest, TensorSpec, Variant
from edgesdk.package import write_package
from edgesdk.signing import generate_keys, load_private_key
from tests.edgesdk.fleet.test_collector import FakeDevice
from tests.fixtures.broker import free_port
from tests.fixtures.serve import ServeProcess

FLEET = "coll"  # FakeDevice publishes under test_collector's fleet
WAIT_S = 30.0


def Serve(broker_url: str, tmp: Path, *args: str) -> ServeProcess:  # noqa: N802
    """`edgesdk serve` for this module's fleet, started and ready (tests/fixtures/serve.py)."""
    (tmp / "repo").mkdir(exist_ok=True)
    env = {**os.environ, "EDGESDK_HOME": str(tmp / "home")}
    env.pop("EDGESDK_SHARE_GROUP", None)
    return ServeProcess(broker_url, tmp / "repo", env, FLEET, *args).wait_ready(WAIT_S)


@contextmanager
def serving(broker_url: str, tmp: Path, *args: str) -> Iterator[ServeProcess]:
    serve = Serve(broker_url, tmp, *args)
    try:
        yield serve
    finally:
        serve.kill()


def wait_count(store: FleetStore, at_least: int, timeout: float = WAIT_S) -> int:
    """Poll the store (the only outward sign of another process's collector), bounded."""
    deadline = time.monotonic() + timeout
    while (count := store.window_count(FLEET)) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} windows stored, expected {at_least} within {timeout} s")
        time.sleep(0.02)
    return count


def test_sigkill_and_restart_loses_no_window_and_stores_none_twice(mosquitto, tmp_path: Path) -> None:
    config = parse_broker_url(mosquitto.url)
    db = tmp_path / "fleet.db"
    args = ("--store", str(db), "--collector-id", "serve-under-test")
    device = FakeDevice(config, "dev-1")
    with FleetStore.open(db) as store:
        try:
            serve = Serve(mosquitto.url, tmp_path, *args)
            first_half_sent = threading.Event()

            def stream() -> None:  # 200 windows, paced, so the kill lands mid-stream
                for seq in range(200):
                    device.windows([seq])
                    time.sleep(0.004)
                first_half_sent.set()

            sender = threading.Thread(target=stream, daemon=True)
            sender.start()
            stored_before_kill = wait_count(store, 20)
            serve.kill()
            assert not first_half_sent.is_set(), "the stream ended before the kill: nothing was mid-stream"
            sender.join(WAIT_S)
            device.windows(range(200, 400))  # serve is down: these wait in its session

            with serving(mosquitto.url, tmp_path, *args) as again:
                assert wait_count(store, 400) == 400
                assert again.terminate() == 0  # SIGTERM: commit, acknowledge, close the store
            assert store.window_count(FLEET) == 400
            assert 20 <= stored_before_kill < 400
            assert any("store closed" in line for line in again.lines), again.lines
        finally:
            device.close()


def test_no_collector_runs_the_repository_alone(mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    with serving(mosquitto.url, tmp_path, "--no-collector", "--store", str(db)) as serve:
        assert any("collector off" in line for line in serve.lines), serve.lines
        device = FakeDevice(parse_broker_url(mosquitto.url), "dev-1")
        device.windows(range(5))
        device.close()
        assert serve.terminate() == 0
    assert not db.exists()  # no collector: the store was never opened


def test_serve_prints_the_collector_line_with_verbose(mosquitto, tmp_path: Path) -> None:
    with serving(mosquitto.url, tmp_path, "--store", str(tmp_path / "fleet.db"), "--verbose") as serve:
        device = FakeDevice(parse_broker_url(mosquitto.url), "dev-1")
        device.windows(range(3))
        device.close()
        deadline = time.monotonic() + WAIT_S
        while not any(line.startswith("collector: received 3,") for line in serve.lines):
            assert time.monotonic() < deadline and serve.proc.poll() is None, serve.lines
            time.sleep(0.1)  # the line comes every 5 s: no event to wait on in another process
        assert serve.terminate() == 0
    line = next(line for line in serve.lines if line.startswith("collector: received 3,"))
    assert "stored 3, duplicates 0, malformed 0" in line


def test_publish_records_the_release_with_the_manifests_metrics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESDK_HOME", str(tmp_path / "home"))
    keys = generate_keys(tmp_path / "keys")
    (tmp_path / "model.onnx").write_bytes(os.urandom(4096))
    metrics = {"outputs": {"y": {"cosine": 0.9991, "max_abs": 0.012}}}
    manifest = Manifest(name="det", version="2.1", target="x86-64-cpu", source={"filename": "model.onnx"},
                        inputs=[TensorSpec("x", "float32", (1, 4))], outputs=[TensorSpec("y", "float32", (1, 2))],
                        variants=[Variant(id="onnx-int8", kind="int8", format="onnx", precision="int8",
                                          runtime="onnxruntime", file="model.onnx", files=["model.onnx"],
                                          metrics=metrics)])
    pkg = write_package(tmp_path / "det.edgepkg", manifest, {"model.onnx": tmp_path / "model.onnx"},
                        load_private_key(keys.private_path))
    db = tmp_path / "fleet.db"

    result = CliRunner().invoke(app, ["publish", str(pkg), "--repo", str(tmp_path / "repo"), "--public-key",
                                      str(keys.public_path), "--store", str(db)])

    assert result.exit_code == 0, result.output
    with FleetStore.open(db) as store:
        [release] = store.releases("det")
    assert (release.release, release.target, release.size) == ("det@2.1", "x86-64-cpu", pkg.stat().st_size)
    assert release.metrics == {"onnx-int8": metrics}
    assert release.signer is not None


def test_publish_into_an_unreachable_store_publishes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESDK_HOME", str(tmp_path / "home"))
    keys = generate_keys(tmp_path / "keys")
    pkg = tmp_path / "det.edgepkg"
    pkg.write_bytes(b"not opened: the store fails first")
    port = free_port()  # nothing listens there

    result = CliRunner().invoke(app, ["publish", str(pkg), "--repo", str(tmp_path / "repo"), "--public-key",
                                      str(keys.public_path), "--store", f"postgresql://u@127.0.0.1:{port}/x"])

    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fleet store" in lines[0], result.stderr
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
