"""Rollouts as the fleet store keeps them (edgesdk/fleet/rollouts.py), on SQLite and on a real
PostgreSQL (the `store_location` fixture): ids and prefixes, the controller's lease and its
guarded writes, decisions with their evidence; and the output summaries the drift gate reads,
merged into the telemetry rollup across the windows of one 5-minute bucket."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

from edgesdk.errors import ConfigError, FleetError
from edgesdk.fleet import rollouts as R
from edgesdk.fleet.rollout_data import merge_outputs
from edgesdk.fleet.rollout_spec import GateLimits, RolloutSpec
from edgesdk.fleet.store import FleetStore
from edgesdk.fleet.store_schema import ROLLUP_BUCKET_S, ROLLUP_HOUR_S
from edgesdk.protocol.histogram import SCHEME, LatencyHistogram, histogram_of
from edgesdk.protocol.messages import TelemetryWindow
from edgesdk.protocol.outputs import OutputSummary, window_outputs

FLEET = "plant"
PKG_OLD, PKG_NEW = "a" * 64, "b" * 64
T0 = 1_700_000_100.0  # 100 s into a 5-minute bucket (and 1900 s into its hour)
LEASE_S = 30.0


@pytest.fixture
def store(store_location: str) -> Iterator[FleetStore]:
    with FleetStore.open(store_location) as opened:
        yield opened


def spec(version: str = "2.0", **changes) -> RolloutSpec:
    return RolloutSpec(fleet=FLEET, name="det", version=version, waves=("1", "100%"), **changes)


DEVICES = [("d1", "rpi", "raspberry-pi-5", PKG_NEW), ("d2", "jetson", "jetson-orin-nano", PKG_NEW),
           ("d3", "rpi", "raspberry-pi-5", PKG_NEW)]


def create(store: FleetStore, rollout_id: str, now: float = T0, **changes) -> R.RolloutRecord:
    return R.create_rollout(store, spec(**changes), DEVICES, [1, 2], rollout_id=rollout_id, now=now)


def row(store: FleetStore, rollout_id: str) -> tuple:
    return tuple(store.transact(lambda tx: tx.query("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)))[0])


# -- creating and finding ---------------------------------------------------------------------------
def test_create_rollout_stores_the_rollout_its_devices_and_waves(store: FleetStore) -> None:
    made = create(store, "ro-20231114-abc123", max_wait_s=30.0, limits=GateLimits(max_drift=None, min_samples=9))

    assert made == R.get_rollout(store, "ro-20231114-abc123")
    assert (made.state, made.phase, made.wave, made.waves, made.created_at) == (R.PENDING, R.SENDING, 0, 2, T0)
    assert made.spec == spec(max_wait_s=30.0, limits=GateLimits(max_drift=None, min_samples=9))
    assert [(d.device_id, d.wave, d.hardware_class, d.package_id, d.state) for d in
            R.rollout_devices(store, made.id)] == [("d1", 0, "rpi", PKG_NEW, R.WAITING),
                                                   ("d2", 1, "jetson", PKG_NEW, R.WAITING),
                                                   ("d3", 1, "rpi", PKG_NEW, R.WAITING)]
    assert [d.device_id for d in R.rollout_devices(store, made.id, wave=1)] == ["d2", "d3"]
    assert R.rollout_waves(store, made.id) == [R.WaveRecord(0, 1), R.WaveRecord(1, 2)]


def test_create_rollout_refuses_waves_that_do_not_hold_the_devices(store: FleetStore) -> None:
    for sizes in ([1, 1], [3, 1], []):
        with pytest.raises(FleetError, match="do not fill waves"):
            R.create_rollout(store, spec(), DEVICES, sizes, rollout_id="ro-bad")
    assert R.list_rollouts(store) == []


def test_new_rollout_ids_are_dated_and_unique() -> None:
    ids = {R.new_rollout_id(T0) for _ in range(200)}
    assert len(ids) == 200 and all(i.startswith("ro-20231114-") and len(i) == 18 for i in ids)


def test_get_rollout_by_id_or_unique_prefix(store: FleetStore) -> None:
    create(store, "ro-20231114-aaa111")
    create(store, "ro-20231114-aaa222")
    create(store, "ro-20231114-bbb333")

    assert R.get_rollout(store, "ro-20231114-aaa111").id == "ro-20231114-aaa111"
    assert R.get_rollout(store, "ro-20231114-aaa2").id == "ro-20231114-aaa222"
    assert R.get_rollout(store, "ro-20231114-b").id == "ro-20231114-bbb333"
    assert R.get_rollout(store, "ro-20231114-c") is None
    assert R.get_rollout(store, "ro-20231114-aaa1119") is None  # longer than any id
    assert R.get_rollout(store, "%") is None and R.get_rollout(store, "ro-2023_") is None  # no LIKE patterns
    with pytest.raises(ConfigError, match="'ro-20231114-aaa' is ambiguous: ro-20231114-aaa111, ro-20231114-aaa222"):
        R.get_rollout(store, "ro-20231114-aaa")


def test_list_rollouts_newest_first_by_fleet_and_active_only(store: FleetStore) -> None:
    for i, rid in enumerate(("ro-1", "ro-2", "ro-3")):
        create(store, rid, now=T0 + i)
    R.create_rollout(store, RolloutSpec(fleet="other", name="det", version="2.0"), DEVICES[:1], [1],
                     rollout_id="ro-other", now=T0 + 9)
    assert R.acquire_lease(store, "ro-2", "c1", LEASE_S, T0)
    R.RolloutWriter(store, "ro-2", "c1").write(rollout={"state": R.COMPLETED, "finished_at": T0 + 5,
                                                        "outcome": "completed"}, now=T0 + 5)

    assert [r.id for r in R.list_rollouts(store)] == ["ro-other", "ro-3", "ro-2", "ro-1"]
    assert [r.id for r in R.list_rollouts(store, FLEET)] == ["ro-3", "ro-2", "ro-1"]
    assert [r.id for r in R.list_rollouts(store, FLEET, active_only=True)] == ["ro-3", "ro-1"]
    assert [r.id for r in R.list_rollouts(store, active_only=True, limit=2)] == ["ro-other", "ro-3"]
    assert R.get_rollout(store, "ro-2").final


# -- the lease ------------------------------------------------------------------------------------
def test_lease_is_held_by_one_owner_renewed_by_it_and_taken_over_once_it_lapses(store: FleetStore) -> None:
    create(store, "ro-1")

    assert R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0)
    assert not R.acquire_lease(store, "ro-1", "serve-b", LEASE_S, T0 + 10)
    assert R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0 + 20)  # renewed: until T0 + 50
    assert not R.acquire_lease(store, "ro-1", "serve-b", LEASE_S, T0 + 45)
    assert R.get_rollout(store, "ro-1").lease_owner == "serve-a"

    assert R.acquire_lease(store, "ro-1", "serve-b", LEASE_S, T0 + 51)  # serve-a stopped renewing
    assert not R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0 + 52)
    found = R.get_rollout(store, "ro-1")
    assert (found.lease_owner, found.lease_until) == ("serve-b", T0 + 51 + LEASE_S)


def test_released_lease_is_free_at_once_and_only_its_owner_releases_it(store: FleetStore) -> None:
    create(store, "ro-1")
    assert R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0)

    R.release_lease(store, "ro-1", "serve-b")
    assert not R.acquire_lease(store, "ro-1", "serve-b", LEASE_S, T0 + 1)
    R.release_lease(store, "ro-1", "serve-a")
    assert R.acquire_lease(store, "ro-1", "serve-b", LEASE_S, T0 + 2)


def test_no_lease_on_a_finished_rollout_or_an_unknown_one(store: FleetStore) -> None:
    create(store, "ro-1")
    assert R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0)
    R.RolloutWriter(store, "ro-1", "serve-a").write(rollout={"state": R.HALTED, "outcome": "p95"}, now=T0)

    assert not R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0 + 1)
    assert not R.acquire_lease(store, "ro-nope", "serve-a", LEASE_S, T0)


def decision(gate: str = "p95-regression", verdict: str = "fail") -> R.Decision:
    return R.Decision(wave=0, at=T0 + 60, gate=gate, verdict=verdict, summary="p95 on rpi: 13 ms vs 10 ms (+30%)",
                      evidence={"limit": 0.2, "percentile": 95, "min_samples": 500, "classes": {
                          "rpi": {"new": {"calls": 812, "p95_ms": 13.02, "error_rate": None},
                                  "regression_vs_same_devices_old": 0.3012, "verdict": "fail"},
                          "—": {"note": "first install: no old release to compare with", "verdict": "n/a"}},
                          "psi": "inf", "devices": ["d1", "naïve \u2603"], "ok": True, "nothing": None})


def test_writer_without_the_lease_raises_and_writes_nothing(store: FleetStore) -> None:
    create(store, "ro-1")
    before = row(store, "ro-1")
    write = dict(rollout={"state": R.RUNNING, "phase": R.BAKING}, devices=[("d1", {"state": R.SENT, "sent_at": T0})],
                 wave=(0, {"sent_at": T0}), decisions=[decision()], now=T0 + 1)

    with pytest.raises(R.LeaseLost):
        R.RolloutWriter(store, "ro-1", "serve-a").write(**write)  # nobody took the lease yet
    assert R.acquire_lease(store, "ro-1", "serve-b", LEASE_S, T0)
    with pytest.raises(R.LeaseLost, match="held by serve-b"):
        R.RolloutWriter(store, "ro-1", "serve-a").write(**write)

    after = R.get_rollout(store, "ro-1")
    assert (after.state, after.phase, after.updated_at) == (R.PENDING, R.SENDING, T0)
    assert row(store, "ro-1")[:-2] == before[:-2]  # all but the lease columns serve-b just set
    assert R.rollout_devices(store, "ro-1")[0].state == R.WAITING
    assert R.rollout_waves(store, "ro-1")[0].sent_at is None
    assert R.decisions(store, "ro-1") == []


def test_writer_without_any_lease_says_nobody_holds_it(store: FleetStore) -> None:
    create(store, "ro-1")
    with pytest.raises(R.LeaseLost, match="the lease is held by nobody"):
        R.RolloutWriter(store, "ro-1", "serve-a").write(rollout={"state": R.RUNNING})


def test_writer_that_lost_its_lease_to_another_controller_stops(store: FleetStore) -> None:
    create(store, "ro-1")
    assert R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0)
    writer = R.RolloutWriter(store, "ro-1", "serve-a")
    writer.write(rollout={"state": R.RUNNING}, now=T0 + 1)
    assert R.acquire_lease(store, "ro-1", "serve-b", LEASE_S, T0 + LEASE_S + 1)

    with pytest.raises(R.LeaseLost):
        writer.write(rollout={"state": R.HALTED}, decisions=[decision()], now=T0 + LEASE_S + 2)
    assert R.get_rollout(store, "ro-1").state == R.RUNNING and R.decisions(store, "ro-1") == []


def test_writer_with_the_lease_writes_one_transition(store: FleetStore) -> None:
    create(store, "ro-1")
    assert R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0)

    R.RolloutWriter(store, "ro-1", "serve-a").write(
        rollout={"state": R.RUNNING, "phase": R.ACTIVATING, "phase_at": T0 + 1},
        devices=[("d1", {"state": R.SENT, "sent_at": T0 + 1, "statement": '{"serial": 7}'}),
                 ("d3", {"state": R.FAILED, "reason": "refused: expired"})],
        wave=(0, {"sent_at": T0 + 1}), now=T0 + 1)

    found = R.get_rollout(store, "ro-1")
    assert (found.state, found.phase, found.phase_at, found.updated_at) == (R.RUNNING, R.ACTIVATING, T0 + 1, T0 + 1)
    by_id = {d.device_id: d for d in R.rollout_devices(store, "ro-1")}
    assert (by_id["d1"].state, by_id["d1"].sent_at, by_id["d1"].statement) == (R.SENT, T0 + 1, '{"serial": 7}')
    assert (by_id["d3"].state, by_id["d3"].reason) == (R.FAILED, "refused: expired")
    assert by_id["d2"].state == R.WAITING
    assert R.rollout_waves(store, "ro-1")[0].sent_at == T0 + 1


def test_decisions_round_trip_with_their_evidence(store: FleetStore) -> None:
    create(store, "ro-1")
    assert R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0)
    written = [decision("failure-rate", "pass"), decision(), R.Decision(1, T0 + 120, "output-drift", "wait", "w")]

    R.RolloutWriter(store, "ro-1", "serve-a").write(decisions=written[:2], now=T0 + 60)
    R.RolloutWriter(store, "ro-1", "serve-a").write(decisions=written[2:], now=T0 + 120)

    assert R.decisions(store, "ro-1") == written
    assert R.decisions(store, "ro-nope") == []


def test_operator_requests_are_stored_and_refused_once_the_rollout_ended(store: FleetStore) -> None:
    create(store, "ro-1")

    assert R.request(store, "ro-1", paused=True, now=T0 + 5).paused
    resumed = R.request(store, "ro-1", paused=False, abort=True, now=T0 + 6)
    assert (resumed.paused, resumed.abort_requested, resumed.updated_at) == (False, True, T0 + 6)
    with pytest.raises(ConfigError, match="no rollout 'ro-2'"):
        R.request(store, "ro-2", paused=True)

    assert R.acquire_lease(store, "ro-1", "serve-a", LEASE_S, T0)
    R.RolloutWriter(store, "ro-1", "serve-a").write(rollout={"state": R.ABORTED, "outcome": "aborted by the operator"})
    with pytest.raises(FleetError, match="already ended \\(aborted: aborted by the operator\\)"):
        R.request(store, "ro-1", paused=True)


# -- output summaries in the rollup ------------------------------------------------------------------
def summaries(rng: np.random.Generator, calls: int, shift: float) -> dict[str, OutputSummary]:
    """What an agent summarizes over ``calls`` calls: a classifier head and a regression output."""
    logits, boxes = OutputSummary(), OutputSummary()
    for _ in range(calls):
        logits.add(rng.normal(shift, 1.0, size=(1, 5)).astype(np.float32))
        boxes.add(rng.normal(shift, 2.0, size=(1, 8, 4)))
    return {"logits": logits, "boxes": boxes}


def window(seq: int, end: float, outputs: dict[str, OutputSummary], device: str = "d1") -> TelemetryWindow:
    hist = LatencyHistogram()
    hist.record_many([4.0, 5.0, 6.0])
    sent = TelemetryWindow(seq=seq, window_start=end - 30, window_end=end, count=hist.count, errors=0,
                           p50_ms=hist.percentile(50), p95_ms=hist.percentile(95), p99_ms=hist.percentile(99),
                           max_ms=hist.max, histogram=hist.to_bounds(), variant="fp32", provider="CPUExecutionProvider",
                           package_id=PKG_NEW, model="det",
                           extra={"min_ms": hist.min, "histogram_scheme": SCHEME, "histogram_sum_ns": hist.sum_ns,
                                  "outputs": window_outputs(outputs)})
    return TelemetryWindow.from_json(sent.to_json())  # as the collector receives it


def rollup_outputs(store: FleetStore, span: int) -> dict[int, tuple[int, dict[str, OutputSummary]]]:
    """bucket_start -> (windows, merged summaries) of the rollup rows of ``span``."""
    rows = store.transact(lambda tx: tx.query(
        "SELECT r.bucket_start, r.windows, r.outputs FROM telemetry_rollup r JOIN telemetry_series s ON s.id = "
        "r.series_id WHERE r.span = ? AND s.fleet = ? AND s.model = ? ORDER BY r.bucket_start", (span, FLEET, "det")))
    out = {}
    for bucket, windows, text in rows:
        merged: dict[str, OutputSummary] = {}
        merge_outputs(merged, text)
        out[int(bucket)] = (int(windows), merged)
    return out


def merged(*parts: dict[str, OutputSummary]) -> dict[str, OutputSummary]:
    out: dict[str, OutputSummary] = {}
    for part in parts:
        for name, s in part.items():
            out.setdefault(name, OutputSummary()).merge(s)
    return out


def assert_same_summaries(got: dict[str, OutputSummary], expected: dict[str, OutputSummary]) -> None:
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = got[name]
        assert (have.calls, have.count, have.nonfinite, have.argmax) == (want.calls, want.count, want.nonfinite,
                                                                         want.argmax), name
        assert have.mean == pytest.approx(want.mean, rel=1e-9, abs=1e-12)
        assert have.std == pytest.approx(want.std, rel=1e-9)


def test_window_outputs_merge_into_one_rollup_row_per_five_minute_bucket(store: FleetStore) -> None:
    rng = np.random.default_rng(11)
    bucket = math.floor(T0 / ROLLUP_BUCKET_S) * ROLLUP_BUCKET_S
    a, b, c = summaries(rng, 40, 0.0), summaries(rng, 25, 0.5), summaries(rng, 30, 1.0)
    later = summaries(rng, 10, 3.0)

    # two windows of one bucket in one call, a third of it in another (the stored row merged again),
    # and one window of the next bucket
    assert store.add_windows([(FLEET, "d1", window(1, T0 + 10, a)), (FLEET, "d1", window(2, T0 + 40, b))]) == 2
    assert store.add_windows([(FLEET, "d1", window(3, T0 + 70, c)),
                              (FLEET, "d1", window(4, bucket + ROLLUP_BUCKET_S + 30, later))]) == 2
    assert store.add_windows([(FLEET, "d1", window(3, T0 + 70, c))]) == 0  # redelivered: never counted twice

    five = rollup_outputs(store, ROLLUP_BUCKET_S)
    assert sorted(five) == [bucket, bucket + ROLLUP_BUCKET_S]
    windows, got = five[bucket]
    assert windows == 3
    assert_same_summaries(got, merged(a, b, c))
    assert got["logits"].calls == 95 and sum(got["logits"].argmax.values()) == 95
    assert "argmax" not in got["boxes"].to_dict()  # rank 3: no classes, judged by mean/std
    assert_same_summaries(five[bucket + ROLLUP_BUCKET_S][1], later)

    hour = rollup_outputs(store, ROLLUP_HOUR_S)
    assert list(hour) == [bucket - bucket % ROLLUP_HOUR_S] and hour[bucket - bucket % ROLLUP_HOUR_S][0] == 4
    assert_same_summaries(hour[bucket - bucket % ROLLUP_HOUR_S][1], merged(a, b, c, later))


def test_merge_outputs_accumulates_rows_and_skips_what_does_not_parse(store: FleetStore) -> None:
    rng = np.random.default_rng(12)
    a, b = summaries(rng, 20, 0.0), summaries(rng, 20, 2.0)
    store.add_windows([(FLEET, "d1", window(1, T0, a)), (FLEET, "d2", window(1, T0, b, device="d2"))])
    rows = store.transact(lambda tx: tx.query("SELECT r.outputs FROM telemetry_rollup r WHERE r.span = ?",
                                              (ROLLUP_BUCKET_S,)))
    assert len(rows) == 2  # one series per device

    into: dict[str, OutputSummary] = {}
    for (text,) in rows:
        merge_outputs(into, text)
    merge_outputs(into, None)
    merge_outputs(into, "not json")
    merge_outputs(into, '["a list"]')
    merge_outputs(into, '{"boxes": {"count": -1}, "junk": 7}')

    assert_same_summaries(into, merged(a, b))


# -- a device flooding fabricated calls ----------------------------------------------------------------
def latency_window(seq: int, end: float, device: str, package_id: str, median_ms: float, calls: int,
                   rng: np.random.Generator) -> tuple[str, str, TelemetryWindow]:
    hist = LatencyHistogram()
    hist.record_many((rng.lognormal(0, 0.25, calls) * median_ms).tolist())
    sent = TelemetryWindow(seq=seq, window_start=end - 5, window_end=end, count=hist.count, errors=0,
                           p50_ms=hist.percentile(50), p95_ms=hist.percentile(95), p99_ms=hist.percentile(99),
                           max_ms=hist.max, histogram=hist.to_bounds(), variant="fp32", provider="CPUExecutionProvider",
                           package_id=package_id, model="det",
                           extra={"histogram_scheme": SCHEME, "histogram_sum_ns": hist.sum_ns, "min_ms": hist.min})
    return FLEET, device, TelemetryWindow.from_json(sent.to_json())


def test_a_device_flooding_fabricated_fast_calls_cannot_hide_a_regression(store: FleetStore) -> None:
    """Four devices of one class get a release 40 % slower; one of them (compromised) reports a
    hundred times more calls than the others, all fast. Merged as they come, its calls would hide
    the regression; counted at most at three times the median device's weight, they do not, and
    the evidence names it."""
    from edgesdk.fleet.rollout_data import wave_data
    from edgesdk.fleet.rollout_gates import FAIL, latency_gates

    rng = np.random.default_rng(3)
    old, new = "a" * 64, "b" * 64
    devices = ["d1", "d2", "d3", "evil"]
    items = []
    for i, device in enumerate(devices):
        items.append(latency_window(10 * i, T0 - 60, device, old, 10.0, 400, rng))  # before the switch
        calls, median = (40_000, 7.0) if device == "evil" else (400, 14.0)  # after: 40 % slower, or fabricated
        items.append(latency_window(10 * i + 1, T0 + 60, device, new, median, calls, rng))
    store.add_windows(items)
    wave = [R.RolloutDevice(d, 0, "nano", "x86-64-cpu", new, R.ACTIVE, prev_package_id=old, activated_at=T0)
            for d in devices]

    data = wave_data(store, FLEET, "det", 0, wave, {}, new_package={d: new for d in devices}, sent_at=T0,
                     activated_at=T0, now=T0 + 120, lookback_s=600)
    p95 = latency_gates(GateLimits(min_samples=500), data, T0 + 120)[0]

    nano = data.classes["nano"]
    assert nano.new.capped == ["evil"] and nano.old.capped == []
    assert nano.new.calls == 3 * 400 + 3 * 400  # the honest devices', and the flood counted as three times a median
    assert p95.verdict == FAIL and p95.evidence["classes"]["nano"]["new"]["capped_devices"] == ["evil"]
    # The same numbers merged by volume: the flood would have hidden it.
    unweighted = LatencyHistogram()
    for _, _, w in items[1::2]:
        unweighted.merge(histogram_of(w))
    assert unweighted.percentile(95) < nano.old.hist.percentile(95) * 1.2
