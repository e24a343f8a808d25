"""agent.yaml: the sample loads; every bad value fails at load time with one line naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from agent.config import AgentConfig, load_config
from edgesdk.errors import ConfigError
from edgesdk.signing import generate_keys

SAMPLE = Path(__file__).resolve().parents[2] / "agent" / "data" / "agent.sample.yaml"


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A config folder with the files a full config refers to: keys, TLS files, a password file."""
    generate_keys(tmp_path / "keys")
    (tmp_path / "keys" / "signing.pub").rename(tmp_path / "keys" / "release.pub")
    shutil.copy(tmp_path / "keys" / "release.pub", tmp_path / "keys" / "fleet.pub")
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "device.pem", "device.key"):
        (tmp_path / "certs" / name).write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "broker-password").write_text("s3cret\n")
    (tmp_path / "not-a-key.pub").write_text("hello\n")
    return tmp_path


def write(config_dir: Path, **overrides: object) -> Path:
    data: dict[str, object] = {"device_id": "pi5-01", "trusted_keys": ["keys/release.pub"],
                               "fleet_keys": ["keys/fleet.pub"]}
    data.update(overrides)
    for key in [k for k, v in data.items() if v is DROP]:
        del data[key]
    path = config_dir / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


DROP = object()


def test_sample_config_loads_with_its_documented_defaults(config_dir: Path) -> None:
    shutil.copy(SAMPLE, config_dir / "agent.yaml")

    config = load_config(config_dir / "agent.yaml")

    assert isinstance(config, AgentConfig)
    assert config.device_id == "pi5-line3-cam01"
    assert config.fleet == "default"
    assert (config.broker_host, config.broker_port, config.broker_tls) == ("127.0.0.1", 1883, False)
    assert config.trusted_keys == (config_dir.resolve() / "keys" / "release.pub",)
    assert len(config.public_keys) == 1
    assert (config.api_host, config.api_port) == ("127.0.0.1", 8700)
    assert config.telemetry_interval_s == 60 and config.selection_budget_s == 30
    assert config.spool_max_windows == 10000 and config.stall_timeout_s == 60
    assert config.data_dir == Path("/var/lib/edge-agent") and config.target is None
    assert config.log_level == "info"
    assert config.engine_cache_mb == 2048


def test_sample_config_documents_every_key() -> None:
    from agent.config import KEYS, TLS_KEYS

    text = SAMPLE.read_text()
    for key in KEYS + TLS_KEYS:
        assert f"{key}:" in text, key


def test_full_tls_config_resolves_paths_against_the_config_folder(config_dir: Path) -> None:
    path = write(config_dir, broker="mqtts://broker.example:8884",
                 tls={"ca": "certs/ca.pem", "cert": "certs/device.pem", "key": "certs/device.key"},
                 username="pi5-01", password_file="secrets/broker-password", data_dir="state",
                 target="raspberry-pi-5", api="[::1]:0", log_level="DEBUG")

    config = load_config(path)

    base = config_dir.resolve()
    assert config.broker_tls and config.broker_port == 8884
    assert config.tls is not None and config.tls.ca == base / "certs" / "ca.pem"
    assert config.password == "s3cret"
    assert config.data_dir == base / "state"
    assert config.target_profile is not None and config.target_profile.name == "raspberry-pi-5"
    assert (config.api_host, config.api_port) == ("::1", 0)
    assert config.log_level == "debug"


def test_target_may_be_a_profile_file_beside_the_config(config_dir: Path) -> None:
    profile = Path(__file__).resolve().parents[2] / "targets" / "jetson-orin-nano.yaml"
    shutil.copy(profile, config_dir / "my-board.yaml")

    config = load_config(write(config_dir, target="my-board.yaml"))

    assert config.target == str(config_dir.resolve() / "my-board.yaml")
    assert config.target_profile is not None and config.target_profile.name == "jetson-orin-nano"


@pytest.mark.parametrize("overrides, key, why", [
    ({"brokr": "mqtt://x"}, "brokr", "unknown key"),
    ({"device_id": DROP}, "device_id", "missing required key"),
    ({"device_id": "pi/5"}, "device_id", "MQTT client id"),
    ({"device_id": "x" * 65}, "device_id", "1-64 letters, digits"),
    ({"device_id": 42}, "device_id", "got 42"),
    ({"fleet": "a b"}, "fleet", "got 'a b'"),
    ({"broker": "tcp://host:1883"}, "broker", "must start with mqtt:// or mqtts://"),
    ({"broker": "mqtt://host:99999"}, "broker", "bad URL"),
    ({"tls": {"ca": "certs/ca.pem"}}, "tls", "only allowed with an mqtts:// broker"),
    ({"broker": "mqtts://h", "tls": {"ca": "certs/missing.pem"}}, "tls.ca", "file not found"),
    ({"broker": "mqtts://h", "tls": {"cafile": "certs/ca.pem"}}, "tls.cafile", "unknown key"),
    ({"broker": "mqtts://h", "tls": {"cert": "certs/device.pem"}}, "tls.key", "needs both"),
    ({"password": "a", "password_file": "secrets/broker-password"}, "password_file", "not both"),
    ({"password_file": "secrets/nope"}, "password_file", "file not found"),
    ({"device_id": "-cam"}, "device_id", "starting with a letter or digit"),
    ({"device_id": "cam:01"}, "device_id", "1-64 letters, digits"),
    ({"fleet_keys": DROP}, "fleet_keys", "missing required key"),
    ({"labels": {"site": ["a"]}}, "labels.site", "short text value"),
    ({"trust_root": "keys/release.pub"}, "trust_root", "not a TUF root document"),
    ({"trusted_keys": DROP}, "trusted_keys", "missing required key"),
    ({"trusted_keys": []}, "trusted_keys", "non-empty list"),
    ({"trusted_keys": "keys/release.pub"}, "trusted_keys", "non-empty list"),
    ({"trusted_keys": ["keys/release.pub", "keys/gone.pub"]}, "trusted_keys[1]", "file not found"),
    ({"trusted_keys": ["not-a-key.pub"]}, "trusted_keys[0]", "not-a-key.pub: not a PEM public key"),
    ({"trusted_keys": ["keys/signing.key"]}, "trusted_keys[0]", "signing.key: not a PEM public key"),
    ({"api": "8700"}, "api", "expected host:port"),
    ({"api": "localhost:http"}, "api", "expected host:port"),
    ({"telemetry_interval_s": "abc"}, "telemetry_interval_s", "expected a number > 0, got 'abc'"),
    ({"telemetry_interval_s": 0}, "telemetry_interval_s", "expected a number > 0, got 0"),
    ({"selection_budget_s": True}, "selection_budget_s", "expected a number > 0, got True"),
    ({"stall_timeout_s": -1}, "stall_timeout_s", "expected a number > 0"),
    ({"spool_max_windows": 2.5}, "spool_max_windows", "expected an integer >= 1"),
    ({"spool_max_windows": 0}, "spool_max_windows", "expected an integer >= 1"),
    ({"target": "commodore-64"}, "target", "unknown target 'commodore-64'"),
    ({"target": "nope.yaml"}, "target", "target profile file not found"),
    ({"log_level": "loud"}, "log_level", "expected one of debug"),
    ({"data_dir": 5}, "data_dir", "expected a non-empty string"),
    ({"engine_cache_mb": -1}, "engine_cache_mb", "expected a number >= 0, got -1"),
    ({"engine_cache_mb": "2G"}, "engine_cache_mb", "expected a number >= 0, got '2G'"),
])
def test_bad_config_fails_with_one_line_naming_file_and_key(
        config_dir: Path, overrides: dict, key: str, why: str) -> None:
    path = write(config_dir, **overrides)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: "), message
    assert why in message, message


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="agent config file not found"):
        load_config(tmp_path / "agent.yaml")


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: pi\nbroker: [unclosed\nfleet: x\n")

    with pytest.raises(ConfigError, match=r"broken YAML \(line 3"):
        load_config(path)


def test_config_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("- device_id\n")

    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)


def test_engine_cache_mb_0_turns_the_engine_cache_off(config_dir: Path) -> None:
    from agent.engine_cache import EngineCache

    config = load_config(write(config_dir, engine_cache_mb=0))

    assert config.engine_cache_mb == 0
    assert not EngineCache(config_dir / "engines", config.engine_cache_mb).enabled
