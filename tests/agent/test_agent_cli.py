"""`edge-agent` as a user meets it: a bad config or a missing status is one line and a non-zero
exit, never a traceback; --help names the commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgesdk.signing import generate_keys
from tests.agent.agent_harness import run_cli, subprocess_env, write_config


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(tmp_path / "home")


def valid_settings(tmp_path: Path) -> dict:
    keys = generate_keys(tmp_path / "keys")
    return {"device_id": "cli-dev", "broker": "mqtt://127.0.0.1:1", "data_dir": str(tmp_path / "data"),
            "trusted_keys": [str(keys.public_path)], "fleet_keys": [str(keys.public_path)]}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_run_rejects_config_with_unknown_key_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    config = write_config(tmp_path / "bad.yaml", valid_settings(tmp_path) | {"telemetry_intervall_s": 5})
    result = run_cli(["edge-agent", "run", "--config", str(config)], env, timeout=30)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "telemetry_intervall_s" in lines[0] and "unknown key" in lines[0] and "bad.yaml" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "data").exists()  # refused before doing anything


def test_run_with_missing_config_file_says_so_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli(["edge-agent", "run", "--config", str(tmp_path / "nope.yaml")], env, timeout=30)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "nope.yaml" in lines[0] and "not found" in lines[0], result.stderr


def test_status_before_agent_ever_ran_says_so_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    config = write_config(tmp_path / "agent.yaml", valid_settings(tmp_path))
    result = run_cli(["edge-agent", "status", "--config", str(config)], env, timeout=30)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "no status yet" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_help_lists_run_doctor_and_status(env: dict[str, str]) -> None:
    result = run_cli(["edge-agent", "--help"], env, timeout=30)
    assert result.returncode == 0, result.stderr
    commands = {line.strip(" │").split()[0] for line in result.stdout.splitlines()
                if line.strip(" │") and line.strip(" │").split()[0] in ("run", "doctor", "status")}
    assert commands == {"run", "doctor", "status"}


def test_doctor_with_config_reports_unreachable_broker_and_fails(tmp_path: Path, env: dict[str, str]) -> None:
    config = write_config(tmp_path / "agent.yaml", valid_settings(tmp_path))  # broker on port 1: refused
    result = run_cli(["edge-agent", "doctor", "--config", str(config), "--json"], env)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["broker"]["ok"] is False
    assert "cannot reach broker mqtt://127.0.0.1:1: connection refused" in report["broker"]["problem"]


def test_doctor_with_config_says_broker_reachable(tmp_path: Path, env: dict[str, str], secure_mosquitto) -> None:
    username, password = secure_mosquitto.provision("cli-dev")
    config = write_config(tmp_path / "agent.yaml", valid_settings(tmp_path) | {
        "broker": secure_mosquitto.url, "tls": {"ca": str(secure_mosquitto.ca)}, "username": username,
        "password": password})
    result = run_cli(["edge-agent", "doctor", "--config", str(config), "--json"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["broker"] == {"ok": True, "problem": None}


def test_doctor_with_config_reports_wrong_password(tmp_path: Path, env: dict[str, str], secure_mosquitto) -> None:
    secure_mosquitto.provision("cli-dev")
    config = write_config(tmp_path / "agent.yaml", valid_settings(tmp_path) | {
        "broker": secure_mosquitto.url, "tls": {"ca": str(secure_mosquitto.ca)}, "username": "cli-dev",
        "password": "wrong"})
    result = run_cli(["edge-agent", "doctor", "--config", str(config), "--json"], env)
    assert result.returncode == 1
    assert "refused the connection" in json.loads(result.stdout)["broker"]["problem"]


def test_agent_pointed_at_a_dead_broker_says_so_at_each_retry(tmp_path: Path, env: dict[str, str]) -> None:
    from tests.agent.agent_harness import AgentProcess, wait_until

    config = write_config(tmp_path / "agent.yaml", valid_settings(tmp_path) | {"api": "127.0.0.1:0"})
    with AgentProcess(config, tmp_path / "agent.log", env) as agent:
        wait_until(lambda: agent.log().count("cannot reach broker mqtt://127.0.0.1:1: connection refused; "
                                             "retrying in") >= 2, timeout=30, what="two logged retries")
        assert agent.terminate() == 0


# -- doctor on boards it does not know by name, --strict, --package (issue 11) ---------------------
ORANGE_PI_CPUINFO = "".join(
    f"processor\t: {n}\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
    f"asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: {part}\n\n"
    for n, part in enumerate(["0xd05"] * 4 + ["0xd0b"] * 4))


def board_files(tmp_path: Path, model: str, cpuinfo: str = ORANGE_PI_CPUINFO) -> list[str]:
    (tmp_path / "model").write_text(model)
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    return ["--cpuinfo", str(tmp_path / "cpuinfo"), "--device-tree-model", str(tmp_path / "model")]


def test_doctor_on_an_unknown_arm_board_picks_arm64_cpu_and_says_why(tmp_path: Path, env: dict[str, str]) -> None:
    args = board_files(tmp_path, "Orange Pi 5\x00")

    result = run_cli(["edge-agent", "doctor", "--json", "--strict", "--machine", "aarch64", *args], env)

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["target"] == "arm64-cpu"
    assert report["target_reason"] == ('arm64-cpu: aarch64, no board profile matched /proc/device-tree/model '
                                       '"Orange Pi 5", generic CPU profile; CPU Cortex-A55 + Cortex-A76 x8, '
                                       'features asimddp fp16 neon')
    assert report["problems"] == []


@pytest.mark.parametrize("strict, code", [(False, 0), (True, 1)])
def test_doctor_with_no_matching_profile_says_so_and_fails_only_under_strict(
        tmp_path: Path, env: dict[str, str], strict: bool, code: int) -> None:
    args = board_files(tmp_path, "SiFive HiFive Unmatched A00\x00", "processor\t: 0\nisa\t: rv64imafdc\n")

    result = run_cli(["edge-agent", "doctor", "--machine", "riscv64", *args, *(["--strict"] if strict else [])], env)

    assert result.returncode == code, result.stdout + result.stderr
    assert "no target profile matches this device" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_doctor_package_names_the_runtime_this_device_lacks_and_strict_fails(
        tmp_path: Path, env: dict[str, str]) -> None:
    from edgesdk.manifest import Manifest, TensorSpec, Variant

    folder = tmp_path / "version"
    folder.mkdir()
    variants = [Variant(id="onnx-fp32", kind="onnx-fp32", format="onnx", precision="fp32", runtime="onnxruntime",
                        file="variants/onnx-fp32/model.onnx", providers=["CPUExecutionProvider"]),
                Variant(id="openvino-fp32", kind="openvino-fp32", format="openvino-ir", precision="fp32",
                        runtime="openvino", file="variants/openvino-fp32/model.xml", providers=["CPU"])]
    manifest = Manifest(name="m", version="1", target="raspberry-pi-5", source={}, variants=variants,
                        inputs=[TensorSpec("x", "float32", (1, 2))], outputs=[TensorSpec("y", "float32", (1, 2))],
                        requires={"onnxruntime": ["onnx-fp32"], "openvino": ["openvino-fp32"]})
    (folder / "manifest.json").write_bytes(manifest.to_bytes())
    args = board_files(tmp_path, "Raspberry Pi 5 Model B Rev 1.0\x00")
    # This process cannot import openvino, as on a Pi installed with only the `agent` extra.
    code = ("import sys; sys.modules['openvino'] = None; sys.argv[0] = 'edge-agent'; "
            "from agent.cli import main; main()")
    command = [sys.executable, "-c", code, "doctor", "--machine", "aarch64", *args, "--package", str(folder)]

    plain = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=120)
    strict = subprocess.run([*command, "--strict"], capture_output=True, text=True, env=env, timeout=120)

    assert plain.returncode == 0, plain.stdout + plain.stderr
    report = json.loads(plain.stdout)
    assert report["target"] == "raspberry-pi-5"
    assert report["package"]["missing"] == ["openvino"]
    assert report["package"]["install"] == 'pip install "edgesdk[agent,openvino]"'
    assert 'openvino is not installed here: pip install "edgesdk[agent,openvino]"' in report["problems"]
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert 'pip install "edgesdk[agent,openvino]"' in " ".join(strict.stdout.split())


def test_doctor_package_that_is_not_there_fails_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli(["edge-agent", "doctor", "--package", str(tmp_path / "nope.edgepkg")], env)

    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "nope.edgepkg" in lines[0] and "not found" in lines[0], result.stderr
