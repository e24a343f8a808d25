"""`edgesdk rollout start|list|status|pause|resume|abort` and the staged `edgesdk rollback`, run with
typer's CliRunner against a real SQLite fleet store in tmp_path, filled through the store's own
API (no broker: these commands only plan and store; the controller in `serve` runs a rollout).

The fleet (`build_store`): six Raspberry Pis and three Jetsons running det, two Pis running only
another model, and in a second fleet one x86 box no release of det has a package for.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesdk.cli.main import app
from edgesdk.fleet import rollouts as R
from edgesdk.fleet.records import ReleaseRecord
from edgesdk.fleet.rollout_gates import WaveData, evaluate
from edgesdk.fleet.rollout_plan import DEFAULT_MAX_METRIC_DROP
from edgesdk.fleet.rollout_spec import (DEFAULT_ACTIVATION_TIMEOUT_S, DEFAULT_BAKE_S, DEFAULT_MIN_SAMPLES,
                                        DEFAULT_WAVES, GateLimits, RolloutSpec, describe_limit, parse_duration)
from edgesdk.fleet.store import FleetStore
from edgesdk.protocol.messages import DeviceState
from tests.fixtures.cli_json import doc_section

FLEET, EDGE = "lab", "edge"
RPI, JETSON, X86 = "raspberry-pi-5", "jetson-orin-nano", "x86-64-cpu"
PKG = {("1.0", RPI): "a1" * 32, ("2.0", RPI): "b1" * 32, ("1.0", JETSON): "a2" * 32, ("2.0", JETSON): "b2" * 32,
       ("cls", RPI): "c1" * 32}
# device -> (site, hardware/target, the det version it runs; None: runs only the `cls` model)
DEVICES = {
    "cam-01": ("berlin", RPI, "2.0"), "cam-02": ("berlin", RPI, "2.0"), "cam-03": ("berlin", RPI, "2.0"),
    "cam-04": ("paris", RPI, "1.0"), "cam-05": ("paris", RPI, "1.0"), "cam-06": ("paris", RPI, "1.0"),
    "cam-07": ("berlin", JETSON, "1.0"), "cam-08": ("paris", JETSON, "1.0"), "cam-09": ("paris", JETSON, "1.0"),
    "aux-01": ("berlin", RPI, None), "aux-02": ("berlin", RPI, None),
}
OLD_SCORE = 0.973


def task_metrics(score: float | None) -> dict:
    """A manifest's per-variant metrics, with the task metric `edgesdk package --labels` measures."""
    variant: dict = {"outputs": {"y": {"cosine": 1.0, "top1_agreement": 1.0}}}
    if score is not None:
        variant["task"] = {"name": "accuracy", "reference": OLD_SCORE, "variant": score}
    return {"onnx-fp32": variant}


def build_store(path: Path, *, new_score: float | None = OLD_SCORE, old_score: float | None = OLD_SCORE,
                devices: dict = DEVICES) -> Path:
    now = time.time()
    with FleetStore.open(path) as store:
        for (version, target), pid in PKG.items():
            name = "cls" if version == "cls" else "det"
            score = new_score if version == "2.0" else old_score
            store.record_release(ReleaseRecord(package_id=pid, name=name, version="1.0" if name == "cls" else version,
                                               target=target, size=2_500_000, published_at=now - 86400,
                                               signer="ab12cd34", metrics=task_metrics(score)))
        for device, (site, hardware, version) in devices.items():
            runs = ("det", version, PKG[(version, hardware)]) if version else ("cls", "1.0", PKG[("cls", RPI)])
            store.record_state(FLEET, state(device, hardware, {"site": site}, *runs), at=now)
        store.record_state(EDGE, state("srv-01", X86, {"site": "lyon"}, "det", "1.0", PKG[("1.0", RPI)]), at=now)
    return path


def state(device: str, hardware: str, labels: dict[str, str], model: str, version: str, pid: str) -> DeviceState:
    return DeviceState(device_id=device, online=True, agent_version="0.1.0", target=hardware,
                       hardware={"arch": "aarch64", "board": hardware}, labels=labels, hardware_class=hardware,
                       telemetry_interval_s=60.0,
                       models=[{"name": model, "version": version, "package_id": pid, "variant": "onnx-fp32",
                                "provider": "CPUExecutionProvider", "runtime": "onnxruntime"}])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return build_store(tmp_path / "fleet.db")


def cli(db: Path, *args: str):  # noqa: ANN201
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [*args, "--store", str(db)])
    assert "Traceback" not in result.output, result.output
    return result


def stored(db: Path) -> list[R.RolloutRecord]:
    with FleetStore.open(db) as store:
        return R.list_rollouts(store)


def devices_of(db: Path, rollout_id: str) -> list[R.RolloutDevice]:
    with FleetStore.open(db) as store:
        return R.rollout_devices(store, rollout_id)


def get(db: Path, rollout_id: str) -> R.RolloutRecord:
    with FleetStore.open(db) as store:
        found = R.get_rollout(store, rollout_id)
    assert found is not None
    return found


def assert_one_line_error(result, code: int, *parts: str) -> str:
    assert result.exit_code == code, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: "), result.output
    for part in parts:
        assert part in line, line
    return line


def start(db: Path, *args: str) -> tuple[str, object]:
    """`rollout start det@2.0 ARGS`; its id (the one line on stdout) and the result."""
    result = cli(db, "rollout", "start", "det@2.0", "--fleet", FLEET, *args)
    assert result.exit_code == 0, result.output
    rollout_id = result.stdout.strip()
    assert re.fullmatch(r"ro-\d{8}-[0-9a-f]{6}", rollout_id), result.stdout
    return rollout_id, result


def finish(db: Path, rollout_id: str, state: str = R.COMPLETED, outcome: str = "completed") -> None:
    """Mark a rollout ended, as the controller's last write would leave its row."""
    with FleetStore.open(db) as store:
        store.transact(lambda tx: tx.execute("UPDATE rollouts SET state = ?, phase = ?, finished_at = ?, outcome = ? "
                                             "WHERE id = ?", (state, R.DONE, time.time(), outcome, rollout_id)),
                       write=True)


# -- rollout start --------------------------------------------------------------------------------
def test_start_prints_the_id_and_plan_and_stores_a_pending_rollout_in_stratified_waves(db: Path) -> None:
    rollout_id, result = start(db)

    everyone = list(DEVICES)  # a deploy reaches every selected device, the aux ones as a first install
    sizes = [1, 1, 4, 5]  # 1, 10% of 11 (2), 50% (6), 100% (11)
    assert "rollout of det@2.0: 11 devices in 4 waves (1, 1, 4, 5); bake 600 s" in result.stderr
    assert "release gate passed: accuracy 0.973 vs 0.973" in result.stderr

    rollout = get(db, rollout_id)
    assert (rollout.state, rollout.phase, rollout.kind, rollout.release, rollout.waves) == (
        R.PENDING, R.SENDING, "deploy", "det@2.0", len(sizes))
    assert not rollout.paused and not rollout.abort_requested and rollout.lease_owner is None
    devices = devices_of(db, rollout_id)
    assert sorted(d.device_id for d in devices) == sorted(everyone)
    assert all(d.state == R.WAITING for d in devices)
    assert all(d.package_id == PKG[("2.0", d.target)] and d.hardware_class == d.target for d in devices)
    assert [sum(1 for d in devices if d.wave == w) for w in range(len(sizes))] == sizes
    # stratified: after every wave each hardware class holds its share of the devices, within one
    share = Counter(d.hardware_class for d in devices)
    for w in range(len(sizes)):
        reached = Counter(d.hardware_class for d in devices if d.wave <= w)
        k = sum(reached.values())
        for cls, n in share.items():
            assert abs(reached[cls] - k * n / len(devices)) <= 1, (w, cls, reached)


def test_start_stores_the_spec_it_was_given(db: Path) -> None:
    rollout_id, _ = start(db, "--select", "site=paris", "--waves", "1,100%", "--bake", "90s", "--min-samples", "50",
                          "--max-p95-regression", "off", "--max-drift", "0.3", "--allow-provider-fallback",
                          "--max-wait", "5m", "--activation-timeout", "1h")

    spec = get(db, rollout_id).spec
    assert spec == RolloutSpec(fleet=FLEET, name="det", version="2.0", select={"site": "paris"}, waves=("1", "100%"),
                               bake_s=90.0, activation_timeout_s=3600.0, max_wait_s=300.0,
                               limits=GateLimits(max_p95_regression=None, max_drift=0.3, provider_fallback=False,
                                                 min_samples=50))
    assert sorted(d.device_id for d in devices_of(db, rollout_id)) == ["cam-04", "cam-05", "cam-06", "cam-08",
                                                                         "cam-09"]


def test_start_with_explicit_devices_takes_only_those(db: Path) -> None:
    rollout_id, _ = start(db, "--device", "cam-07", "--device", "cam-01", "--waves", "100%")
    assert sorted(d.device_id for d in devices_of(db, rollout_id)) == ["cam-01", "cam-07"]


def test_start_json_prints_the_status_document(db: Path) -> None:
    result = cli(db, "rollout", "start", "det@2.0", "--fleet", FLEET, "--json")
    assert result.exit_code == 0, result.output

    got = json.loads(result.stdout)
    assert got["state"] == "pending" and got["release"] == "det@2.0" and got["devices"] == len(DEVICES)
    assert [r.id for r in stored(db)] == [got["id"]]


@pytest.mark.parametrize(("args", "code", "says"), [
    (["det@3.0"], 2, ["det@3.0 is not published (published: det@1.0, det@2.0)"]),
    (["yolo@1.0"], 2, ["yolo@1.0 is not published", "no release named 'yolo'"]),
    (["det@2.0", "--select", "site=tokyo"], 2, ["no device in fleet lab matching site=tokyo"]),
    (["det@2.0", "--device", "cam-99"], 2, ["unknown device cam-99 in fleet lab"]),
    (["det@2.0", "--device", "cam-04", "--select", "site=berlin"], 2, ["unknown device cam-04 in fleet lab matching "
                                                                       "site=berlin"]),
    (["det@2.0", "--fleet", EDGE], 2, ["det@2.0 has no package for target x86-64-cpu (srv-01)",
                                       "published for jetson-orin-nano, raspberry-pi-5"]),
    (["det@2.0", "--waves", "10%,5"], 2, ["--waves '10%,5'", "the last wave must be 100%"]),
    (["det@2.0", "--waves", "1,0%,100%"], 2, ["--waves", "must be a share within 0%..100%"]),
    (["det@2.0", "--waves", "ten,100%"], 2, ["--waves", "neither a device count"]),
    (["det@2.0", "--bake", "ten minutes"], 2, ["--bake 'ten minutes': use a duration like 90s, 10m or 1h"]),
    (["det@2.0", "--activation-timeout", "2y"], 2, ["--activation-timeout"]),
    (["det@2.0", "--max-wait", "soon"], 2, ["--max-wait"]),
    (["det@2.0", "--max-p95-regression", "20"], 2, ["--max-p95-regression '20': looks like a percentage: write 20%"]),
    (["det@2.0", "--max-failure-rate", "-5%"], 2, ["--max-failure-rate '-5%': must be a number >= 0"]),
    (["det@2.0", "--max-error-rate-rise", "lots"], 2, ["--max-error-rate-rise 'lots'"]),
    (["det@2.0", "--max-drift", "nan"], 2, ["--max-drift 'nan'"]),
    (["det@2.0", "--max-metric-drop", "-1"], 2, ["--max-metric-drop '-1'"]),
    (["det@2.0", "--select", "site"], 2, ["--select 'site': use key=value"]),
    (["det"], 2, ["'det': name the release as NAME@VERSION, e.g. det@2.0.0"]),
    (["det@"], 2, ["name the release as NAME@VERSION"]),
    (["@2.0"], 2, ["name the release as NAME@VERSION"]),
    (["det@1.0", "--select", "site=berlin"], 2, ["det@1.0 is below the det@2.0 that cam-01", "edgesdk rollback det "
                                                "--to 1.0"]),
], ids=["unpublished", "unknown-name", "no-match", "unknown-device", "device-outside-select", "no-package",
        "waves-last", "waves-zero", "waves-word", "bake", "activation", "max-wait", "limit-percent",
        "limit-negative", "limit-word", "drift-nan", "metric-drop", "select", "no-version", "empty-version",
        "empty-name", "downgrade"])
def test_start_refuses_with_one_line_and_stores_nothing(db: Path, args: list[str], code: int,
                                                        says: list[str]) -> None:
    if "--fleet" not in args:
        args = [*args, "--fleet", FLEET]

    result = cli(db, "rollout", "start", *args)

    assert_one_line_error(result, code, *says)
    assert result.stdout == "" and stored(db) == []


# -- the release gate ---------------------------------------------------------------------------------
def test_release_gate_refuses_a_release_whose_task_metric_dropped(tmp_path: Path) -> None:
    db = build_store(tmp_path / "fleet.db", new_score=0.153)

    result = cli(db, "rollout", "start", "det@2.0", "--fleet", FLEET)

    line = assert_one_line_error(result, 2, "release gate: det@2.0 scores accuracy 0.153", "82.00 points below",
                                 "det@1.0 (0.973)", "the limit is 1", "--max-metric-drop", "--force")
    assert line.count("0.973") == 1
    assert stored(db) == []


def test_release_gate_can_be_forced(tmp_path: Path) -> None:
    db = build_store(tmp_path / "fleet.db", new_score=0.153)

    rollout_id, result = start(db, "--force")

    assert "release gate: det@2.0 scores accuracy 0.153" in result.stderr and "forced" in result.stderr
    assert [r.id for r in stored(db)] == [rollout_id]


@pytest.mark.parametrize(("new_score", "args", "note"), [
    (0.965, [], "release gate passed: accuracy 0.965 vs 0.973 for det@1.0 on jetson-orin-nano (-0.80 points)"),
    (0.953, ["--max-metric-drop", "2.5"], "release gate passed: accuracy 0.953 vs 0.973"),
    (0.153, ["--max-metric-drop", "off"], "release gate off (--max-metric-drop off)"),
    (0.990, [], "(+1.70 points)"),
], ids=["within-default", "within-raised-limit", "off", "improved"])
def test_release_gate_passes_within_the_limit_or_when_off(tmp_path: Path, new_score: float, args: list[str],
                                                          note: str) -> None:
    db = build_store(tmp_path / "fleet.db", new_score=new_score)

    rollout_id, result = start(db, *args)

    assert note in result.stderr and "forced" not in result.stderr
    assert [r.id for r in stored(db)] == [rollout_id]


@pytest.mark.parametrize(("new_score", "old_score", "missing"), [(None, None, "neither release"),
                                                                 (0.9, None, "det@1.0"), (None, 0.9, "the candidate")])
def test_release_gate_without_task_metrics_proceeds_with_a_note(tmp_path: Path, new_score, old_score,
                                                                missing: str) -> None:
    db = build_store(tmp_path / "fleet.db", new_score=new_score, old_score=old_score)

    rollout_id, result = start(db)

    assert "release gate: nothing to compare" in result.stderr and "no task metric to compare" in result.stderr
    assert f"({missing} was packaged without --labels/--evaluator)" in result.stderr
    assert [r.id for r in stored(db)] == [rollout_id]


def test_release_gate_on_a_first_install_has_nothing_to_compare(tmp_path: Path) -> None:
    db = build_store(tmp_path / "fleet.db", new_score=0.153)

    _, result = start(db, "--select", "site=berlin", "--device", "aux-01", "--waves", "100%")

    assert "release gate: nothing replaced (a first install)" in result.stderr


# -- rollout list / status ----------------------------------------------------------------------------
def add_decisions(db: Path, rollout_id: str) -> list[R.Decision]:
    """What the controller writes after judging wave 1: every gate's decision, under its lease."""
    with FleetStore.open(db) as store:
        now = time.time()
        assert R.acquire_lease(store, rollout_id, "test-controller", 60.0, now)
        wave0 = R.rollout_devices(store, rollout_id, wave=0)
        data = WaveData(wave=0, devices=[replace(d, state=R.ACTIVE) for d in wave0])
        rollout = R.get_rollout(store, rollout_id)
        assert rollout is not None
        decisions = evaluate(rollout.spec.limits, data, now)
        R.RolloutWriter(store, rollout_id, "test-controller").write(
            rollout={"state": R.RUNNING, "phase": R.BAKING, "phase_at": now},
            devices=[(d.device_id, {"state": R.ACTIVE, "activated_at": now}) for d in wave0],
            wave=(0, {"sent_at": now - 60, "settled_at": now - 30}), decisions=decisions, now=now)
    return decisions


def test_list_shows_rollouts_newest_first_as_a_table_and_as_json(db: Path) -> None:
    first, _ = start(db, "--select", "site=berlin")
    second, _ = start(db, "--select", "site=paris", "--waves", "100%")
    with FleetStore.open(db) as store:  # make the order certain: the first one an hour older
        store.transact(lambda tx: tx.execute("UPDATE rollouts SET created_at = created_at - 3600 WHERE id = ?",
                                             (first,)), write=True)
    assert cli(db, "rollout", "pause", second).exit_code == 0

    table = cli(db, "rollout", "list")
    as_json = cli(db, "rollout", "list", "--json")

    assert table.exit_code == 0 and as_json.exit_code == 0, table.output + as_json.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "RELEASE", "KIND", "STATE", "WAVE", "DEVICES", "STARTED", "OUTCOME"]
    assert [line.split()[0] for line in lines[1:]] == [second, first]
    assert lines[1].split()[1:6] == ["det@2.0", "deploy", "pending", "(paused)", "1/1"]
    got = json.loads(as_json.stdout)["rollouts"]
    assert [r["id"] for r in got] == [second, first]
    assert set(got[0]) == doc_section("edgesdk rollout list --json")  # docs/cli-json.md, exactly
    assert (got[0]["paused"], got[0]["devices"], got[0]["wave"], got[1]["devices"]) == (True, 5, 1, 6)


def test_list_without_rollouts_says_so(db: Path) -> None:
    result = cli(db, "rollout", "list")
    assert result.exit_code == 0 and result.stdout == "" and "no rollouts yet" in result.stderr
    assert json.loads(cli(db, "rollout", "list", "--json").stdout) == {"rollouts": []}


def test_status_json_has_spec_waves_counts_and_decisions(db: Path) -> None:
    rollout_id, _ = start(db, "--select", "site=berlin", "--waves", "1,50%,100%")
    decisions = add_decisions(db, rollout_id)

    result = cli(db, "rollout", "status", rollout_id, "--json")

    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["id"] == rollout_id and got["state"] == "running" and got["phase"] == "baking"
    assert RolloutSpec.from_dict(got["spec"]) == get(db, rollout_id).spec
    assert got["counts"] == {"active": 1, "waiting": 5}
    assert [(w["wave"], w["size"], w["counts"]) for w in got["waves_detail"]] == [
        (1, 1, {"active": 1}), (2, 2, {"waiting": 2}), (3, 3, {"waiting": 3})]
    assert got["waves_detail"][0]["sent_at"] is not None and got["waves_detail"][1]["sent_at"] is None
    assert [(d["wave"], d["gate"], d["verdict"], d["summary"], d["evidence"]) for d in got["decisions"]] == [
        (1, d.gate, d.verdict, d.summary, d.evidence) for d in decisions]
    assert len(got["device_states"]) == 6
    assert set(got) == doc_section("edgesdk rollout status [ID] --json")  # docs/cli-json.md, exactly


def test_status_text_shows_state_gates_waves_and_decisions(db: Path) -> None:
    rollout_id, _ = start(db, "--select", "site=berlin", "--waves", "1,50%,100%", "--max-drift", "off")
    add_decisions(db, rollout_id)

    result = cli(db, "rollout", "status", rollout_id[:-2])  # a unique prefix will do

    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith(f"rollout {rollout_id}: deploy det@2.0 in fleet {FLEET}\n")
    assert "state     running, wave 1/3 baking since" in text
    assert ("gates     failures ≤ 5%, p95 ≤ +20%, p99 ≤ +30%, errors ≤ +1%, drift PSI ≤ off, "
            "provider fallback halts; 500 calls per side; bake 600 s") in text
    assert "devices   5 waiting, 1 active" in text
    assert re.search(r"^1\s+1\s+\S.*\s+1 active$", text, re.M)
    assert re.search(r"^1\s+failure-rate\s+pass\s+0 of 1 devices with an outcome failed", text, re.M)
    assert re.search(r"^1\s+output-drift\s+n/a\s+off$", text, re.M)


def test_status_defaults_to_the_latest_rollout_of_the_fleet(db: Path) -> None:
    with FleetStore.open(db) as store:
        old = R.create_rollout(store, RolloutSpec(fleet=FLEET, name="det", version="1.0"),
                               [("cam-04", RPI, RPI, PKG[("1.0", RPI)])], [1], now=time.time() - 3600)
    latest, _ = start(db, "--select", "site=paris")

    result = cli(db, "rollout", "status", "--json", "--fleet", FLEET)
    none_here = cli(db, "rollout", "status", "--fleet", EDGE)

    assert json.loads(result.stdout)["id"] == latest != old.id
    assert_one_line_error(none_here, 2, f"no rollout in fleet {EDGE} yet")


def test_status_of_an_unknown_or_ambiguous_id_is_one_line(db: Path) -> None:
    with FleetStore.open(db) as store:
        for suffix in ("aaaa01", "aaaa02"):
            R.create_rollout(store, RolloutSpec(fleet=FLEET, name="det", version="2.0"),
                             [("cam-04", RPI, RPI, PKG[("2.0", RPI)])], [1], rollout_id=f"ro-20250101-{suffix}")

    assert_one_line_error(cli(db, "rollout", "status", "ro-nope"), 2, "no rollout 'ro-nope'", "rollout list")
    assert_one_line_error(cli(db, "rollout", "status", "ro-20250101-aaaa"), 2, "is ambiguous")
    assert cli(db, "rollout", "status", "ro-20250101-aaaa02").exit_code == 0


def test_status_of_a_halted_rollout_exits_4(db: Path) -> None:
    rollout_id, _ = start(db)
    finish(db, rollout_id, R.HALTED, "p95 on raspberry-pi-5: +48% (limit +20%)")

    result = cli(db, "rollout", "status", rollout_id)

    assert result.exit_code == 4 and "outcome   p95 on raspberry-pi-5: +48% (limit +20%)" in result.stdout


# -- pause / resume / abort ---------------------------------------------------------------------------
def test_pause_resume_and_abort_set_the_requests(db: Path) -> None:
    rollout_id, _ = start(db)

    paused = cli(db, "rollout", "pause", rollout_id)
    assert paused.exit_code == 0 and paused.stdout.startswith(f"{rollout_id}: pause requested")
    assert get(db, rollout_id).paused

    resumed = cli(db, "rollout", "resume", rollout_id[:12])
    assert resumed.exit_code == 0 and not get(db, rollout_id).paused

    aborted = cli(db, "rollout", "abort", rollout_id)
    assert aborted.exit_code == 0 and "abort requested" in aborted.stdout
    after = get(db, rollout_id)
    assert after.abort_requested and not after.paused and after.state == R.PENDING  # the controller acts on it


@pytest.mark.parametrize("verb", ["pause", "resume", "abort"])
def test_requests_on_a_finished_rollout_are_refused(db: Path, verb: str) -> None:
    rollout_id, _ = start(db)
    finish(db, rollout_id)
    before = get(db, rollout_id)

    result = cli(db, "rollout", verb, rollout_id)

    assert_one_line_error(result, 1, f"rollout {rollout_id} already ended (completed: completed)")
    assert get(db, rollout_id) == before


def test_requests_on_an_unknown_rollout_are_one_line(db: Path) -> None:
    assert_one_line_error(cli(db, "rollout", "pause", "ro-nope"), 2, "no rollout 'ro-nope'")


# -- rollback ---------------------------------------------------------------------------------------
def test_rollback_stores_a_rollback_rollout_over_the_devices_that_run_the_model(db: Path) -> None:
    result = cli(db, "rollback", "det", "--to", "1.0", "--fleet", FLEET, "--select", "site=berlin")

    assert result.exit_code == 0, result.output
    rollout_id = result.stdout.strip()
    assert "rollback to det@1.0: 4 devices in 2 waves (1, 3)" in result.stderr
    assert "release gate skipped" in result.stderr
    rollout = get(db, rollout_id)
    assert (rollout.kind, rollout.release, rollout.spec.kind) == ("rollback", "det@1.0", "rollback")
    assert rollout.spec.limits.max_drift is None and rollout.spec.bake_s == 120.0
    devices = devices_of(db, rollout_id)
    assert sorted(d.device_id for d in devices) == ["cam-01", "cam-02", "cam-03", "cam-07"]  # not aux-01/02
    assert all(d.package_id == PKG[("1.0", d.target)] for d in devices)


def test_rollback_of_a_model_no_selected_device_runs_is_refused(db: Path) -> None:
    result = cli(db, "rollback", "det", "--to", "1.0", "--fleet", FLEET, "--device", "aux-01")

    assert_one_line_error(result, 2, "no selected device runs det: nothing to roll back")
    assert stored(db) == []


def test_immediate_rollback_needs_devices_and_a_repository(db: Path, tmp_path: Path) -> None:
    without_device = cli(db, "rollback", "det", "--to", "1.0", "--immediate", "--repo", str(tmp_path))
    without_repo = cli(db, "rollback", "det", "--to", "1.0", "--immediate", "--device", "cam-01")

    for result in (without_device, without_repo):
        assert_one_line_error(result, 2, "--immediate needs --device (repeatable) and --repo")
    assert stored(db) == []


# -- help ------------------------------------------------------------------------------------------
def option_help(args: list[str]) -> dict[str, str]:
    """Each option's help text from `--help` (rich's panel: continuation lines joined)."""
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    options: dict[str, str] = {}
    current = None
    for line in result.output.splitlines():
        body = line.strip().strip("│").strip()
        match = re.match(r"(--[a-z0-9-]+)\s+(.*)", body)
        if match:
            current = match.group(1)
            options[current] = match.group(2)
        elif current and body and not body.startswith(("╰", "╭")):
            options[current] += " " + body
    return options


def test_start_help_lists_every_gate_option_with_its_default() -> None:
    """The defaults shown are the ones the code applies (GateLimits, rollout_spec, rollout_plan)."""
    options = option_help(["rollout", "start"])
    limits = GateLimits()

    for option, value in [("--max-failure-rate", limits.max_failure_rate),
                          ("--max-p95-regression", limits.max_p95_regression),
                          ("--max-p99-regression", limits.max_p99_regression),
                          ("--max-error-rate-rise", limits.max_error_rate_rise)]:
        assert f"(default {describe_limit(value)})" in options[option], options[option]
    assert f"(default {describe_limit(limits.max_drift, percent=False)};" in options["--max-drift"]
    assert f"[default: {DEFAULT_MIN_SAMPLES}]" in options["--min-samples"]
    assert f"[default: {DEFAULT_MAX_METRIC_DROP:g}]" in options["--max-metric-drop"]
    assert f"[default: {DEFAULT_WAVES}]" in options["--waves"]
    assert "(default: twice --bake, at least 60s)" in options["--max-wait"]
    assert limits.provider_fallback and "Do not halt" in options["--allow-provider-fallback"]
    for option, seconds in [("--bake", DEFAULT_BAKE_S), ("--activation-timeout", DEFAULT_ACTIVATION_TIMEOUT_S)]:
        shown = re.search(r"\[default: ([^\]]+)\]", options[option])
        assert shown and parse_duration(shown.group(1), option) == seconds, options[option]
    assert "--force" in options


# -- hostile text from devices ------------------------------------------------------------------------
ANSI = "\x1b[31mRED\x1b[0m"
MARKUP = "[bold red]loud[/] [link=https://evil.example]click[/link]"
EMOJI = ":skull:"


def hostile_rollout(db: Path) -> str:
    """A rollout, started with the CLI, over devices whose id, class, providers and failure reason
    carry terminal escapes, rich markup and emoji codes (the store keeps what devices send)."""
    hostile = [f"evil{ANSI}", f"mark{MARKUP}", f"emo{EMOJI}"]
    with FleetStore.open(db) as store:
        for device in hostile:
            s = state(device, RPI, {"site": "berlin", "note": "hostile"}, "det", "1.0", PKG[("1.0", RPI)])
            store.record_state(FLEET, replace(s, hardware_class=f"{RPI}{ANSI}{MARKUP}"), at=time.time())
    rollout_id, _ = start(db, "--select", "note=hostile", "--waves", "100%")
    with FleetStore.open(db) as store:
        assert R.acquire_lease(store, rollout_id, "test-controller", 60.0, time.time())
        reason = f"health check failed {ANSI} {MARKUP} {EMOJI}"
        R.RolloutWriter(store, rollout_id, "test-controller").write(
            rollout={"state": R.RUNNING},
            devices=[(d, {"state": R.FAILED, "reason": reason, "prev_provider": f"CPU{ANSI}", "new_provider": MARKUP})
                     for d in hostile],
            wave=(0, {"sent_at": time.time()}))
    assert sorted(d.device_id for d in devices_of(db, rollout_id)) == sorted(hostile)
    return rollout_id


def test_hostile_device_text_prints_markup_literally(db: Path) -> None:
    rollout_id = hostile_rollout(db)

    result = cli(db, "rollout", "status", rollout_id, "--devices")

    assert result.exit_code == 0, result.output
    assert f"mark{MARKUP}" in result.stdout  # rich markup is not interpreted
    assert result.stdout.count("[bold red]loud[/]") >= 3  # id, class, provider


def test_hostile_device_text_never_reaches_the_terminal_as_escapes(db: Path) -> None:
    rollout_id = hostile_rollout(db)

    result = cli(db, "rollout", "status", rollout_id, "--devices")

    assert "\x1b" not in result.stdout
    assert "evil\\x1b[31mRED\\x1b[0m" in result.stdout  # shown escaped, as `devices list` shows it


def test_hostile_device_text_keeps_emoji_codes_literal(db: Path) -> None:
    rollout_id = hostile_rollout(db)

    result = cli(db, "rollout", "status", rollout_id, "--devices")

    assert f"emo{EMOJI}" in result.stdout and "\N{SKULL}" not in result.stdout
