"""Host commands against hostile input and bad paths: device text is printed literally, any payload
is survived, and an output path that cannot work fails in one line before any work is done."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.cli.main import app

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 20.0
runner = CliRunner()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def window(seq: int, variant: str = "onnx-fp32", provider: str = "CPUExecutionProvider") -> bytes:
    return protocol.TelemetryWindow(seq=seq, window_start=1.0, window_end=2.0, count=5, errors=1, p50_ms=1.0,
                                    p95_ms=2.0, p99_ms=3.0, max_ms=4.0, variant=variant,
                                    provider=provider).to_json()


class Publisher:
    """A plain MQTT client on the test broker that publishes at QoS 1 and waits for each PUBACK."""

    def __init__(self, url: str, **credentials) -> None:
        self.config = parse_broker_url(url, **credentials)
        self.client = make_client(unique("pub"), self.config, clean_start=True)

    def __enter__(self) -> Publisher:
        connect_blocking(self.client, self.config)
        return self

    def __exit__(self, *exc: object) -> None:
        disconnect(self.client)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)


class Watch:
    """`edgesdk telemetry watch` in a subprocess, its stdout read line by line with bounded waits."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgesdk.cli.main", "telemetry", "watch", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300", **(env or {})})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str) -> str:
        while True:
            line = self.lines.get(timeout=WAIT_S)
            if line is None:
                raise AssertionError(f"watch ended before printing {text!r}; it printed {self.seen}; "
                                     f"stderr: {self.process.stderr.read()}")  # type: ignore[union-attr]
            self.seen.append(line)
            if text in line:
                return line

    def finish(self) -> tuple[int, list[str], str]:
        code = self.process.wait(WAIT_S)
        while (line := self.lines.get(timeout=WAIT_S)) is not None:
            self.seen.append(line)
        return code, self.seen, self.process.stderr.read()  # type: ignore[union-attr]


# -- telemetry watch -----------------------------------------------------------------------------


def test_watch_prints_markup_literally(mosquitto_session):
    fleet, dev = unique("f"), unique("dev")
    variant, provider = "[bold red]v1[/bold red]", "[link=https://evil.example]CPU[/link]"
    reason = "[blink]disk[/] :skull: \x1b[2Jcleared"
    with Publisher(mosquitto_session.url) as device:  # retained: the watch gets them when it subscribes
        device.publish(protocol.device_state(fleet, dev), protocol.DeviceState(
            device_id=dev, online=True, active_variant=variant, provider=provider).to_json(), retain=True)
        device.publish(protocol.device_telemetry(fleet, dev), window(3, variant, provider), retain=True)
        watch = Watch("--broker", mosquitto_session.url, "--fleet", fleet, "--count", "2")
        watch.wait_for(f"{dev} telemetry #3")
        device.publish(protocol.device_events(fleet, dev), protocol.InstallEvent(
            kind=protocol.InstallEventKind.FAILED, package_id="ab" * 32, at=1.0, reason=reason).to_json())
        device.publish(protocol.device_telemetry(fleet, dev), window(4))

        code, lines, stderr = watch.finish()

    assert code == 0, stderr
    text = "\n".join(lines)
    assert f"{variant} on {provider}" in text  # state and telemetry lines, markup as typed
    assert "[blink]disk[/] :skull: \\x1b[2Jcleared" in text  # no emoji, the escape sequence escaped
    assert "\x1b" not in text


def test_watch_survives_malformed_payloads(mosquitto_session):
    fleet, dev = unique("f"), unique("dev")
    telemetry = protocol.device_telemetry(fleet, dev)
    with Publisher(mosquitto_session.url) as device:
        device.publish(protocol.device_state(fleet, dev),
                       protocol.DeviceState(device_id=dev, online=True).to_json(), retain=True)
        watch = Watch("--broker", mosquitto_session.url, "--fleet", fleet, "--count", "1")
        watch.wait_for(f"{dev} state: online")  # subscribed

        hostile = [b"[1,2,3]", b"\xff\xfe\x00garbage", b'{"seq":"x"}', b"null", b'{"seq": 1}',
                   b"[" * 100_000, b'{"seq": 1e999, "window_start": 0, "window_end": 1, "count": 1, "errors": 0}']
        for payload in hostile:
            device.publish(telemetry, payload)
        for leaf in ("events", "state"):
            device.publish(f"{protocol.fleet_root(fleet)}/devices/{dev}/{leaf}", b"[1,2,3]")
        device.publish(telemetry, window(9))

        code, lines, stderr = watch.finish()

    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert sum("malformed" in line for line in lines) == len(hostile) + 2
    assert any(f"{dev} telemetry #9: 5 calls, 1 errors" in line for line in lines)


def test_watch_reads_broker_settings_from_the_environment(secure_mosquitto_session):
    broker = secure_mosquitto_session
    fleet, dev = unique("f"), unique("dev")
    user, password = broker.provision(dev)
    with _secure_publisher(broker, user, password) as device:
        device.publish(protocol.device_telemetry(fleet, dev), window(2), retain=True)
    env = broker.env("operator")  # only what `set -a; . operator.env` exports

    result = runner.invoke(app, ["telemetry", "watch", "--fleet", fleet, "--count", "1"], env=env)

    assert result.exit_code == 0, result.output
    assert f"{dev} telemetry #2" in result.stdout


def _secure_publisher(broker, user: str, password: str) -> Publisher:
    from edgesdk.broker import TlsConfig

    return Publisher(broker.url, tls=TlsConfig(ca_file=broker.ca), username=user, password=password)


def test_command_line_option_wins_over_the_environment(secure_mosquitto_session):
    broker = secure_mosquitto_session
    env = {**broker.env("operator"), "EDGESDK_BROKER_PASSWORD": "wrong"}
    fleet, dev = unique("f"), unique("dev")
    user, password = broker.provision(dev)
    with _secure_publisher(broker, user, password) as device:
        device.publish(protocol.device_telemetry(fleet, dev), window(5), retain=True)

    refused = runner.invoke(app, ["telemetry", "watch", "--fleet", fleet, "--count", "1"], env=env)
    accepted = runner.invoke(app, ["telemetry", "watch", "--fleet", fleet, "--count", "1",
                                   "--password", broker.operator[1]], env=env)

    assert refused.exit_code != 0 and refused.stderr.startswith("error:") and "refused" in refused.stderr
    assert accepted.exit_code == 0, accepted.output


def test_password_file_replaces_password_on_the_command_line(secure_mosquitto_session, tmp_path: Path):
    broker = secure_mosquitto_session
    fleet, dev = unique("f"), unique("dev")
    user, password = broker.provision(dev)
    with _secure_publisher(broker, user, password) as device:
        device.publish(protocol.device_telemetry(fleet, dev), window(6), retain=True)
    secret = tmp_path / "operator.password"
    secret.write_text(broker.operator[1] + "\n")
    env = {k: v for k, v in broker.env("operator").items() if k != "EDGESDK_BROKER_PASSWORD"}

    result = runner.invoke(app, ["telemetry", "watch", "--fleet", fleet, "--count", "1",
                                 "--password-file", str(secret)], env=env)

    assert result.exit_code == 0, result.output
    assert f"{dev} telemetry #6" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--password-file", "{tmp}/missing"], "no such file"),
    (["--password-file", "{tmp}/empty"], "empty"),
    (["--password-file", "{tmp}/empty", "--password", "x"], "not both"),
])
def test_password_file_problems_fail_in_one_line(tmp_path: Path, args, message):
    (tmp_path / "empty").write_text("")
    argv = ["telemetry", "watch", "--broker", "mqtt://127.0.0.1:1", "--username", "u",
            *[a.format(tmp=tmp_path) for a in args]]
    result = runner.invoke(app, argv, env={"EDGESDK_BROKER_PASSWORD": ""})
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_password_help_warns_that_the_command_line_is_visible():
    result = runner.invoke(app, ["telemetry", "watch", "--help"], env={"COLUMNS": "300"})
    assert "visible to other users" in " ".join(result.stdout.split())


# -- output paths: one line before any work ----------------------------------------------------


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: chmod 0555 for a normal user; root ignores modes,
    so for root a path on a file system that refuses it (/sys)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = Path("/sys")
    try:
        (folder / "edgesdk-probe").mkdir()
    except OSError:
        return folder
    pytest.skip("no unwritable folder on this machine")


def output_cases() -> list:
    def keys(path: str) -> list[str]:
        return ["keys", "generate", "--out", path]

    def publish(path: str) -> list[str]:
        return ["publish", "{pkg}", "--repo", path, "--public-key", "{pkg}"]

    def package(path: str) -> list[str]:
        return ["package", "{pkg}", "--target", "x86-64-cpu", "--out", path]

    def broker(path: str) -> list[str]:
        return ["broker", "config", "--out", path]

    cases = []
    for name, command in (("keys", keys), ("publish", publish), ("package", package), ("broker", broker)):
        cases += [pytest.param(command, "{file}", "not a folder", id=f"{name}-out-is-a-file"),
                  pytest.param(command, "{file}/sub", "is not a folder", id=f"{name}-parent-is-a-file"),
                  pytest.param(command, "{ro}", "cannot write", id=f"{name}-read-only-folder"),
                  pytest.param(command, "{ro}/sub", "cannot create", id=f"{name}-inside-read-only-folder")]
    return cases


@pytest.mark.parametrize("command, path, message", output_cases())
def test_unusable_output_path_fails_in_one_line_before_any_work(tmp_path: Path, monkeypatch, command, path,
                                                                 message):
    monkeypatch.setenv("EDGESDK_HOME", str(tmp_path / "home"))
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    pkg = tmp_path / "model.onnx"
    pkg.write_bytes(b"not really a model or package: reading it would fail with another message")
    read_only = unwritable_folder(tmp_path)
    argv = [a.format(file=a_file, ro=read_only, pkg=pkg) for a in command(path)]
    before = sorted(p.name for p in tmp_path.iterdir())

    result = runner.invoke(app, argv)

    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert ("--out" in lines[0]) or ("--repo" in lines[0])  # the path was checked first, not the input
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written (no key folder either)


def test_keys_generate_creates_missing_parent_folders(tmp_path: Path):
    out = tmp_path / "new" / "deeper" / "keys"
    result = runner.invoke(app, ["keys", "generate", "--out", str(out), "--role", "root"])
    assert result.exit_code == 0, result.output
    assert (out / "root.key").is_file() and (out / "root.pub").is_file()
