"""The fleet's selection ranking per hardware class: built from the devices' `selected` tables in a
real store (SQLite and PostgreSQL), carried in signed statements, parsed as untrusted input, and
used by the agent's selection to confirm the top candidates instead of timing every one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.selection import HINT_CONFIRM, select
from edgesdk.errors import ProtocolError
from edgesdk.fleet.selection_hints import class_rankings, hints_for, rank_tables
from edgesdk.fleet.store import FleetStore
from edgesdk.protocol import DeploymentStatement, DeviceState, InstallEvent, InstallEventKind
from edgesdk.protocol.selection_hint import SELECTION_NOISE, SelectionHint
from tests.agent.test_selection import CPU, CUDA, Behaviour, FakeClock, FakeFactory, install_dir, make_manifest, rows

__all__ = ["install_dir"]

FLEET = "f1"
PKG = "ab" * 32
XEON, PI = "Intel Xeon 8480", "Raspberry Pi 5 Model B Rev 1.0"
RUNTIMES = {"onnxruntime": {"version": "1.32.0", "providers": [CPU]}, "openvino": {"version": "2026.4.1"}}


@pytest.fixture
def store(store_location: str) -> Iterator[FleetStore]:
    s = FleetStore.open(store_location)
    yield s
    s.close()


def table(*rows: tuple[str, str, float | None, str]) -> list[dict]:
    return [{"variant": v, "provider": p, "p50_ms": ms, "status": st} for v, p, ms, st in rows]


def add_device(store: FleetStore, device: str, hardware_class: str | None, runtimes: dict = RUNTIMES,
               selected: list[dict] | None = None, at: float = 1000.0) -> None:
    store.record_state(FLEET, DeviceState(device_id=device, online=True, hardware_class=hardware_class,
                                          runtimes=runtimes), at=at)
    if selected is not None:
        store.add_events([(FLEET, device, InstallEvent(kind=InstallEventKind.SELECTED, package_id=PKG, at=at,
                                                       model="m", table=selected))])


FP32_SLOW = table(("onnx-fp32", CPU, 10.0, "not_checked"), ("openvino-bf16", "CPU", 4.0, "selected"))


def test_ranking_is_the_median_over_the_class_and_each_device_counts_once(store: FleetStore) -> None:
    add_device(store, "x1", XEON, selected=FP32_SLOW)
    add_device(store, "x2", XEON, selected=table(("onnx-fp32", CPU, 11.0, "not_checked"),
                                                 ("openvino-bf16", "CPU", 4.4, "selected")))
    # x3 first reported bf16 slower (an old selection), then again: only its latest table counts
    add_device(store, "x3", XEON, selected=table(("onnx-fp32", CPU, 9.0, "selected"),
                                                 ("openvino-bf16", "CPU", 90.0, "not_checked")), at=1000.0)
    store.add_events([(FLEET, "x3", InstallEvent(kind=InstallEventKind.SELECTED, package_id=PKG, at=2000.0,
                                                 model="m", table=FP32_SLOW))])
    add_device(store, "p1", PI, selected=table(("onnx-fp32", CPU, 30.0, "selected"),
                                               ("openvino-bf16", "CPU", None, "unavailable")))
    add_device(store, "new-xeon", XEON)  # no selection yet: gets the Xeon ranking
    add_device(store, "new-pi", PI)
    add_device(store, "odd", XEON, runtimes={"onnxruntime": {"version": "1.31.0"}})  # other runtime versions
    hints = hints_for(store, FLEET, PKG, ["new-xeon", "new-pi", "odd", "unknown-device"])
    assert set(hints) == {"new-xeon", "new-pi"}
    xeon = SelectionHint.from_dict(hints["new-xeon"])
    assert xeon.devices == 3 and xeon.hardware_class == XEON
    assert xeon.runtimes == {"onnxruntime": "1.32.0", "openvino": "2026.4.1"}
    assert [(r.variant, r.p50_ms) for r in xeon.ranking] == [("openvino-bf16", 4.0), ("onnx-fp32", 10.0)]
    pi = SelectionHint.from_dict(hints["new-pi"])
    assert [(r.variant, r.provider) for r in pi.ranking] == [("onnx-fp32", CPU)]  # unavailable there: not ranked
    assert hints_for(store, FLEET, "cd" * 32, ["new-xeon"]) == {}  # another package has no ranking yet


def test_within_the_noise_margin_the_fleet_ranks_by_profile_order() -> None:
    close = 10.0 * (1 + SELECTION_NOISE / 2)
    ranking = rank_tables([table(("onnx-fp32", CPU, close, "selected"), ("onnx-int8", CPU, 10.0, "not_checked"))])
    assert [r.variant for r in ranking] == ["onnx-fp32", "onnx-int8"]


@pytest.mark.parametrize("hostile", [
    "not a list", [None, 1, "row"], [{"variant": "v", "provider": "CPU", "p50_ms": float("nan"), "status": "ok"}],
    [{"variant": "v", "provider": "CPU", "p50_ms": True, "status": "ok"}],
    [{"variant": "v\x1b[31m", "provider": "CPU", "p50_ms": 1.0, "status": "ok"}],
    [{"variant": "v" * 500, "provider": "CPU", "p50_ms": 1.0, "status": "ok"}],
    [{"variant": "v", "provider": "CPU", "p50_ms": -1.0, "status": "ok"}],
    [{"variant": "v", "provider": "CPU", "p50_ms": 10 ** 400, "status": "ok"}],
    [{"variant": "v", "provider": "CPU", "p50_ms": 1.0, "status": "health_failed"}],
])
def test_a_hostile_device_table_is_skipped_without_raising(hostile: object) -> None:
    assert rank_tables([hostile]) == []  # type: ignore[list-item]


def test_a_device_listing_a_candidate_many_times_counts_once() -> None:
    # one flooding device claims the slow fp32 is fast 50 times; two honest devices disagree
    flood = table(*[("onnx-fp32", CPU, 1.0, "ok")] * 50)
    honest = table(("onnx-fp32", CPU, 10.0, "ok"), ("openvino-bf16", "CPU", 4.0, "selected"))
    ranking = rank_tables([flood, honest, honest])
    assert ranking[0].variant == "openvino-bf16" and ranking[1].p50_ms == 10.0


def test_device_without_a_hardware_class_gets_no_hint(store: FleetStore) -> None:
    add_device(store, "x1", None, selected=FP32_SLOW)
    add_device(store, "x2", None)
    assert class_rankings(store.devices(FLEET), store.events(FLEET, package_id=PKG)) == {}
    assert hints_for(store, FLEET, PKG, ["x2"]) == {}


# -- the statement ---------------------------------------------------------------------------------
HINT = {"hardware_class": XEON, "runtimes": {"onnxruntime": "1.32.0"}, "devices": 3,
        "ranking": [{"variant": "openvino-bf16", "provider": "CPU", "p50_ms": 4.0}]}


def statement(**changes: object) -> dict:
    data = {"fleet": FLEET, "device": "d1", "package_id": PKG, "name": "m", "version": "1.0", "target": "x86-64-cpu",
            "size": 100, "block_size": 65536, "blocks_digest": "cd" * 32, "serial": 1, "issued_at": 1.0,
            "expires": 2.0, "selection_hint": HINT}
    data.update(changes)
    return data


def test_statement_carries_the_hint_and_old_statements_have_none() -> None:
    parsed = DeploymentStatement.from_json(json.dumps(statement()))
    assert parsed.hint == SelectionHint.from_dict(HINT) and parsed.hint.applies_to(XEON, {"onnxruntime": "1.32.0"})
    assert not parsed.hint.applies_to(XEON, {"onnxruntime": "1.31.0"}) and not parsed.hint.applies_to(PI, {})
    old = statement()
    del old["selection_hint"]
    assert DeploymentStatement.from_json(json.dumps(old)).hint is None


def _with(**changes: object) -> dict:
    return {**HINT, **changes}


@pytest.mark.parametrize("hint, field", [
    ("fast", "selection_hint"), (_with(devices=0), "devices"), (_with(devices=True), "devices"),
    (_with(ranking=[]), "ranking"), (_with(ranking=[{"variant": "v"}]), "ranking[0]"),
    (_with(ranking=[{"variant": "v", "provider": "CPU", "p50_ms": -1}]), "p50_ms"),
    (_with(ranking=[{"variant": "v", "provider": "CPU", "p50_ms": 10 ** 400}]), "p50_ms"),
    (_with(ranking=[{"variant": "v", "provider": "CPU", "p50_ms": 1.0}] * 2), "listed twice"),
    (_with(ranking=[{"variant": "v", "provider": "CPU", "p50_ms": 1.0}] * 33), "ranking"),
    (_with(hardware_class="x" * 129), "hardware_class"), (_with(hardware_class="\x1b[2J"), "hardware_class"),
    (_with(runtimes={"onnxruntime": 1.32}), "runtimes"), (_with(extra="field"), "unknown field"),
])
def test_malformed_hint_makes_the_statement_invalid_with_one_line(hint: object, field: str) -> None:
    raw = json.dumps(statement(selection_hint=hint))
    with pytest.raises(ProtocolError) as err:
        DeploymentStatement.from_json(raw, "devices/d1/desired/m")
    assert field in str(err.value) and "\n" not in str(err.value)


def test_undeploy_statement_cannot_carry_a_hint() -> None:
    data = statement(undeploy=True, package_id="", version="", target="", size=0, block_size=0, blocks_digest="")
    with pytest.raises(ProtocolError, match="selection_hint"):
        DeploymentStatement.from_json(json.dumps(data))


# -- the device's side -----------------------------------------------------------------------------
def hinted(*ranking: tuple[str, str]) -> SelectionHint:
    return SelectionHint(XEON, {}, tuple(SelectionHint.from_dict(_with(ranking=[
        {"variant": v, "provider": p, "p50_ms": 1.0} for v, p in ranking])).ranking), 3)


def run_hinted(install_dir: Path, behaviours: dict, hint: SelectionHint):  # noqa: ANN201
    clock = FakeClock()
    factory = FakeFactory(clock, behaviours)
    selection = select(make_manifest(), install_dir, {"onnxruntime": [CUDA, CPU]}, "k", budget_s=1.0,
                       session_factory=factory, clock=clock, hint=hint)
    return selection, factory


FAST, MID, SLOW = 2.0**-9, 2.0**-8, 2.0**-7


def test_device_confirms_only_the_fleets_top_candidates(install_dir: Path) -> None:
    hint = hinted(("onnx-fp16", CUDA), ("onnx-fp32", CPU), ("onnx-fp16", CPU))
    selection, factory = run_hinted(install_dir, {("fp16", CUDA): Behaviour(latency=FAST),
                                                  ("fp32", CPU): Behaviour(latency=MID),
                                                  ("fp16", CPU): Behaviour(latency=SLOW)}, hint)
    assert selection.from_hint and selection.hint_devices == 3
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp16", CUDA)
    assert set(factory.opened) == {("fp16", CUDA), ("fp32", CPU)}  # HINT_CONFIRM of them, not the third
    assert HINT_CONFIRM == 2
    skipped = rows(selection)[("onnx-fp16", CPU)]
    assert skipped["status"] == "not_checked" and "fleet's ranking" in skipped["detail"]
    assert selection.to_dict()["from_hint"] is True


def test_a_clearly_faster_second_candidate_wins_over_the_fleets_first(install_dir: Path) -> None:
    # The fleet ranks fp32 first; this device measures fp16@CUDA at half its time: it says so.
    hint = hinted(("onnx-fp32", CPU), ("onnx-fp16", CUDA))
    selection, _ = run_hinted(install_dir, {("fp16", CUDA): Behaviour(latency=FAST),
                                            ("fp32", CPU): Behaviour(latency=MID),
                                            ("fp16", CPU): Behaviour(latency=SLOW)}, hint)
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp16", CUDA)
    assert selection.from_hint


def test_within_noise_the_fleets_choice_wins_over_profile_order(install_dir: Path) -> None:
    # fp32@CPU and fp16@CUDA measure the same here; profile order would pick fp16@CUDA (listed first),
    # the fleet's ranking puts fp32 first: identical devices follow the fleet.
    hint = hinted(("onnx-fp32", CPU), ("onnx-fp16", CUDA))
    selection, _ = run_hinted(install_dir, {("fp16", CUDA): Behaviour(latency=MID),
                                            ("fp32", CPU): Behaviour(latency=MID),
                                            ("fp16", CPU): Behaviour(latency=SLOW)}, hint)
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp32", CPU)
    assert "fleet's ranking" in rows(selection)[("onnx-fp32", CPU)]["detail"]


def test_hinted_candidates_that_fail_here_fall_back_to_a_full_search(install_dir: Path) -> None:
    hint = hinted(("onnx-fp16", CUDA))
    selection, factory = run_hinted(install_dir, {("fp16", CUDA): Behaviour(unavailable=True),
                                                  ("fp32", CPU): Behaviour(latency=MID),
                                                  ("fp16", CPU): Behaviour(latency=FAST)}, hint)
    assert not selection.from_hint
    assert (selection.chosen.variant, selection.chosen.provider) == ("onnx-fp16", CPU)
    assert ("fp32", CPU) in factory.opened


def test_hint_naming_only_unknown_candidates_is_a_full_search(install_dir: Path) -> None:
    hint = hinted(("onnx-int4", "NPU"))
    selection, _ = run_hinted(install_dir, {("fp16", CUDA): Behaviour(latency=FAST),
                                            ("fp32", CPU): Behaviour(latency=MID),
                                            ("fp16", CPU): Behaviour(latency=SLOW)}, hint)
    assert not selection.from_hint and selection.chosen.provider == CUDA
