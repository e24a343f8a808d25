"""`edge-agent` as a user meets it: a bad config or a missing status is one line and a non-zero
exit, never a traceback; --help names the commands."""

from __future__ import annotations

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
            "trusted_keys": [str(keys.public_path)]}


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
