"""`edge-agent` as a user meets it: a bad config or a missing status is one line and a non-zero
exit, never a traceback; --help names the commands."""

from __future__ import annotations

import json
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
