"""The registry as an operator uses it: `devices list/show/forget`, `releases list`, and `deploy`,
`rollback` and `undeploy` refusing device ids and fleets the fleet store does not know.

The store is a real SQLite file filled through its own API (`build_fleet`); `forget` runs against
a real Mosquitto, and what it leaves retained is read back by a fresh subscriber behind a marker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgesdk import protocol
from edgesdk.broker import BrokerConfig, parse_broker_url
from edgesdk.fleet.deploy import publish_retained
from edgesdk.fleet.retained import read_retained
from edgesdk.fleet.repository import publish_package
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from tests.edgesdk.fleet.test_report import DEVICES, FLEET, PKG, RPI, Fleet, build_fleet, cli
from tests.fixtures.cli_json import doc_section
from tests.fixtures.packages import random_package

WAIT_S = 10.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return build_fleet(tmp_path_factory.mktemp("registry") / "fleet.db")


@pytest.fixture
def own_fleet(fleet: Fleet, tmp_path: Path) -> Fleet:
    """A copy of the module's store for a test that changes it."""
    shutil.copy(fleet.path, tmp_path / "fleet.db")
    return Fleet(tmp_path / "fleet.db", fleet.anchor, fleet.sent)


def retained(config: BrokerConfig, topic_filter: str, marker_topic: str) -> dict[str, bytes]:
    """Every retained message under ``topic_filter``: `edgesdk.fleet.retained.read_retained`."""
    return read_retained(config, topic_filter, marker_topic, timeout_s=WAIT_S)


def store_args(fleet: Fleet) -> list[str]:
    return ["--store", str(fleet.path)]


# -- devices list / show -------------------------------------------------------------------------------
def test_devices_list_shows_status_what_runs_and_labels(fleet: Fleet) -> None:
    result = cli(["devices", "list", *store_args(fleet)])
    assert result.exit_code == 0, result.output

    rows: dict[str, str] = {}  # a device's row with its continuation lines (wrapped cells, a model per line)
    for line in result.stdout.splitlines()[1:]:
        if line.strip() and not line[0].isspace():
            current = line.split()[0]
            rows[current] = line
        elif line.strip():
            rows[current] += " " + line.strip()
    assert sorted(rows) == sorted(DEVICES)
    assert "online" in rows["cam-02"] and "offline" in rows["cam-05"] and "unknown" in rows["cam-06"]
    assert "det@1.0 (wants det@2.0)" in rows["cam-01"]  # its upgrade failed
    assert "det@2.0" in rows["cam-03"] and "wants" not in rows["cam-03"]
    assert "site=berlin" in rows["cam-01"] and RPI in rows["cam-01"]
    assert "None" not in result.stdout


def test_devices_list_json_is_one_entry_per_device_record(fleet: Fleet) -> None:
    result = cli(["devices", "list", "--json", "--fleet", FLEET, *store_args(fleet)])
    assert result.exit_code == 0, result.output

    got = json.loads(result.stdout)
    assert set(got) == doc_section("devices list --json") == {"devices"}
    by_id = {d["id"]: d for d in got["devices"]}
    assert sorted(by_id) == sorted(DEVICES)
    assert all(set(d) == doc_section("device entries") for d in got["devices"])
    cam1 = by_id["cam-01"]
    assert cam1["labels"] == {"site": "berlin"} and cam1["status"] == "online"
    assert [(m["name"], m["release"], m["package_id"]) for m in cam1["models"]] == [
        ("det", "det@1.0", PKG[("1.0", RPI)])]
    assert [(d["model"], d["release"], d["reached"]) for d in cam1["desired"]] == [("det", "det@2.0", False)]
    assert by_id["cam-02"]["desired"][0]["reached"] is True


def test_devices_list_select_keeps_matching_labels(fleet: Fleet) -> None:
    result = cli(["devices", "list", "--json", "--select", "site=berlin", *store_args(fleet)])
    assert result.exit_code == 0, result.output
    assert [d["id"] for d in json.loads(result.stdout)["devices"]] == ["cam-01", "cam-02", "cam-03"]

    none = cli(["devices", "list", "--select", "site=tokyo", *store_args(fleet)])
    assert none.exit_code == 0 and none.stdout == "" and "no devices" in none.stderr


def test_devices_show_prints_runtimes_and_desired_vs_actual(fleet: Fleet) -> None:
    result = cli(["devices", "show", "cam-01", *store_args(fleet)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime 1.20.1 (CPUExecutionProvider)" in result.stdout
    assert "det@2.0 … pending" in result.stdout and "site=berlin" in result.stdout

    as_json = json.loads(cli(["devices", "show", "cam-01", "--json", *store_args(fleet)]).stdout)
    assert as_json["id"] == "cam-01" and as_json["runtimes"]["onnxruntime"]["version"] == "1.20.1"
    assert set(as_json) == doc_section("device entries") | {"hardware", "runtimes", "telemetry_interval_s"}


def test_devices_show_of_an_unknown_id_names_the_known_ones(fleet: Fleet) -> None:
    result = cli(["devices", "show", "cam-99", "--fleet", FLEET, *store_args(fleet)])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: unknown device cam-99 in fleet lab (known: cam-01, cam-02, cam-03, "
                                     "cam-04, cam-05, cam-06)")


def test_reading_commands_never_create_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESDK_HOME", str(tmp_path / "home"))
    typo = tmp_path / "flet.db"
    for args in (["devices", "list"], ["releases", "list"], ["telemetry", "report"], ["devices", "show", "cam-01"]):
        result = cli([*args, "--store", str(typo)])
        assert result.exit_code == 2 and result.output.strip() == (
            f"error: --store {typo}: no such fleet store (`edgesdk serve` and `edgesdk publish` with this --store "
            "create it)")
    assert not typo.exists()
    default = cli(["devices", "list"])
    assert default.exit_code == 2 and "no fleet store at" in default.output and "yet" in default.output
    assert not (tmp_path / "home").exists()


# -- releases list ---------------------------------------------------------------------------------------
def test_releases_list_table_and_json(fleet: Fleet) -> None:
    table = cli(["releases", "list", *store_args(fleet)])
    assert table.exit_code == 0, table.output
    lines = [line for line in table.stdout.splitlines() if line.startswith("det@")]
    assert [line.split()[:2] for line in lines] == [["det@1.0", "jetson-orin-nano"], ["det@1.0", RPI],
                                                    ["det@2.0", "jetson-orin-nano"], ["det@2.0", RPI]]
    assert "2.5 MB" in table.stdout and any(line.split()[-4:] == ["onnx-int8", "0.9991", "0.995", "0.962"]
                                                for line in table.stdout.splitlines())

    got = json.loads(cli(["releases", "list", "--json", "--name", "det", *store_args(fleet)]).stdout)
    assert set(got) == doc_section("releases list --json")
    assert all(set(r) == doc_section("release entries") for r in got["releases"])
    first = got["releases"][1]
    assert (first["release"], first["target"], first["package_id"], first["size"]) == (
        "det@1.0", RPI, PKG[("1.0", RPI)], 2_500_000)
    assert first["variants"] == [{"id": "onnx-fp32", "min_cosine": 1.0, "min_top1": 1.0, "task_metric": None},
                                 {"id": "onnx-int8", "min_cosine": 0.9991, "min_top1": 0.995, "task_metric": 0.962}]
    assert json.loads(cli(["releases", "list", "--json", "--name", "ocr", *store_args(fleet)]).stdout) == {
        "releases": []}


# -- deploy refuses what the store does not know ----------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("repo")
    release, fleet_key = generate_keys(tmp / "release"), generate_keys(tmp / "fleet")
    pkg = random_package(tmp / "det.edgepkg", load_private_key(release.private_path), size=4096, name="det",
                         version="1.0")
    publish_package(pkg, tmp / "repo", [load_public_key(release.public_path)])
    return {"repo": str(tmp / "repo"), "fleet_key": str(fleet_key.private_path)}


def command(kind: str, repo: dict, fleet_name: str, *devices: str) -> list[str]:
    targets = [a for d in devices for a in ("--device", d)]
    return {
        "deploy": ["deploy", "det@1.0", "--repo", repo["repo"]],
        "rollback": ["rollback", "det", "--to", "1.0", "--immediate", "--repo", repo["repo"]],
        "undeploy": ["undeploy", "det", "--wait", "0"],
    }[kind] + [*targets, "--fleet", fleet_name, "--fleet-key", repo["fleet_key"]]


@pytest.mark.parametrize("kind, verb", [("deploy", "deploy"), ("rollback", "roll back"), ("undeploy", "undeploy")])
def test_unknown_device_is_refused_in_one_line(fleet: Fleet, repo: dict, kind: str, verb: str) -> None:
    result = cli([*command(kind, repo, FLEET, "cam-01", "cam-99"), *store_args(fleet),
                  "--broker", "mqtt://127.0.0.1:1"])  # never reached: refused before any connection

    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: unknown device cam-99 in fleet lab (known: cam-01, cam-02, cam-03, "
                                     f"cam-04, cam-05, cam-06; pass --allow-unknown to {verb} anyway)")


def test_unknown_fleet_is_refused_naming_the_known_fleets(fleet: Fleet, repo: dict) -> None:
    result = cli([*command("deploy", repo, "prod", "cam-01"), *store_args(fleet)])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: unknown fleet prod (known fleets: lab; pass --allow-unknown to deploy "
                                     "anyway)")


def test_deploy_without_a_store_says_the_ids_cannot_be_checked(repo: dict, tmp_path: Path) -> None:
    result = cli([*command("deploy", repo, FLEET, "cam-01"), "--store", str(tmp_path / "none.db")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "no such fleet store" in result.output and "pass --allow-unknown to deploy anyway" in result.output


def test_allow_unknown_skips_the_check(fleet: Fleet, repo: dict, mosquitto) -> None:
    known = cli([*command("deploy", repo, FLEET, "cam-02"), *store_args(fleet), "--broker", mosquitto.url])
    assert known.exit_code == 0, known.output

    result = cli([*command("deploy", repo, FLEET, "cam-99"), "--allow-unknown", *store_args(fleet),
                  "--broker", mosquitto.url])
    assert result.exit_code == 0, result.output
    assert "unknown device" not in result.output and "desired det@1.0" in result.output
    topic = protocol.device_desired(FLEET, "cam-99", "det")
    assert topic in retained(parse_broker_url(mosquitto.url), topic, topic)


# -- forget -----------------------------------------------------------------------------------------------
def seed_retained(config: BrokerConfig, device: str) -> list[str]:
    topics = [protocol.device_state(FLEET, device), protocol.device_desired(FLEET, device, "det"),
              protocol.device_desired(FLEET, device, "ocr")]
    for topic in topics:
        publish_retained(config, topic, b'{"anything": "retained"}')
    return topics


def test_forget_clears_state_and_every_desired_topic_and_the_store_entry(own_fleet: Fleet, mosquitto) -> None:
    config = parse_broker_url(mosquitto.url)
    seed_retained(config, "cam-02")
    kept = seed_retained(config, "cam-04")
    root = protocol.fleet_root(FLEET)

    result = cli(["devices", "forget", "cam-02", "--fleet", FLEET, *store_args(own_fleet), "--broker", mosquitto.url])

    assert result.exit_code == 0, result.output
    assert ("forgot cam-02 in fleet lab: cleared 3 retained message(s) (desired/det, desired/ocr, state)"
            in result.stdout)
    assert "removed from the store" in result.stdout and "was online" in result.stderr
    assert retained(config, f"{root}/devices/cam-02/#", f"{root}/devices/cam-02/marker") == {}
    assert sorted(retained(config, f"{root}/devices/+/#", f"{root}/devices/x/marker")) == sorted(kept)
    listed = json.loads(cli(["devices", "list", "--json", *store_args(own_fleet)]).stdout)["devices"]
    assert [d["id"] for d in listed] == ["cam-01", "cam-03", "cam-04", "cam-05", "cam-06"]
    # History stays: its telemetry still counts in the report.
    report = json.loads(cli(["telemetry", "report", "--fleet", FLEET, "--by", "device", "--since", "1d",
                             "--format", "json", *store_args(own_fleet)]).stdout)
    assert "cam-02" in [g["key"] for g in report["groups"]]


def test_forget_of_a_device_known_nowhere_fails_and_store_only_leaves_the_broker(own_fleet: Fleet, mosquitto) -> None:
    unknown = cli(["devices", "forget", "cam-99", "--fleet", FLEET, *store_args(own_fleet), "--broker", mosquitto.url])
    assert unknown.exit_code == 1
    assert "unknown device cam-99 in fleet lab (known: cam-01" in unknown.output
    assert "nothing retained for it on the broker" in unknown.output

    config = parse_broker_url(mosquitto.url)
    seeded = seed_retained(config, "cam-03")
    result = cli(["devices", "forget", "cam-03", "--fleet", FLEET, "--store-only", *store_args(own_fleet)])
    assert result.exit_code == 0, result.output
    assert "broker left as it was (--store-only)" in result.stdout
    root = protocol.fleet_root(FLEET)
    assert sorted(retained(config, f"{root}/devices/cam-03/#", f"{root}/devices/cam-03/m")) == sorted(seeded)


def test_forget_needs_a_login_that_may_write_device_topics(own_fleet: Fleet, secure_mosquitto) -> None:
    service = secure_mosquitto.config(*secure_mosquitto.fleet_service)
    seeded = seed_retained(service, "cam-02")

    def forget(identity: tuple[str, str]):  # noqa: ANN202
        return cli(["devices", "forget", "cam-02", "--fleet", FLEET, *store_args(own_fleet),
                    "--broker", secure_mosquitto.url, "--ca", str(secure_mosquitto.ca),
                    "--username", identity[0], "--password", identity[1]])

    refused = forget(secure_mosquitto.operator)
    assert refused.exit_code == 1
    assert len(refused.output.strip().splitlines()) == 1 and "refused" in refused.output
    assert "fleet-service" in refused.output
    assert "cam-02" in [d["id"] for d in json.loads(cli(["devices", "list", "--json",
                                                         *store_args(own_fleet)]).stdout)["devices"]]

    done = forget(secure_mosquitto.fleet_service)
    assert done.exit_code == 0, done.output
    assert f"cleared {len(seeded)} retained message(s)" in done.stdout
    root = protocol.fleet_root(FLEET)
    assert retained(service, f"{root}/devices/cam-02/#", f"{root}/devices/cam-02/marker") == {}

