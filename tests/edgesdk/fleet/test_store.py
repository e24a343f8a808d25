"""The fleet store: one suite, run on SQLite and on a real PostgreSQL (the `store` fixture).

Telemetry answers are checked against a direct merge of the windows' own histograms, built the
way agent/telemetry.py builds them, so every percentile must match exactly, not approximately.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgesdk.errors import FleetError
from edgesdk.fleet import store_schema
from edgesdk.fleet.records import NO_VALUE, ReleaseRecord
from edgesdk.fleet.store import FleetStore, default_store_path
from edgesdk.fleet.store_queries import rollup_pieces
from edgesdk.fleet.store_schema import ROLLUP_BUCKET_S, decode_histogram, encode_histogram, merge_encoded
from edgesdk.protocol import DeploymentStatement, undeploy_statement
from edgesdk.protocol.histogram import OVERFLOW, SCHEME, LatencyHistogram
from edgesdk.protocol.messages import DeviceState, InstallEvent, InstallEventKind, TelemetryWindow
from tests.fixtures.broker import free_port

FLEET = "plant"
LATEST = store_schema.latest_version()
PKG_A, PKG_B, PKG_X = "a" * 64, "b" * 64, "c" * 64  # det@1.0, det@2.0, a package the store never saw
T0 = 1_700_000_100.0  # 100 s into a 5-minute bucket


@pytest.fixture
def store(store_location: str) -> Iterator[FleetStore]:
    with FleetStore.open(store_location) as opened:
        yield opened


# -- builders ------------------------------------------------------------------------------------
def state(device: str, *, online: bool = True, labels: dict[str, str] | None = None,
          models: tuple[tuple[str, str, str], ...] = (), interval: float | None = 10.0,
          target: str = "x86-64-cpu", hardware_class: str = "generic-x86") -> DeviceState:
    return DeviceState(device_id=device, online=online, agent_version="0.1.0", target=target,
                       hardware={"arch": "x86_64", "cpu": "Test CPU"}, labels=labels or {},
                       hardware_class=hardware_class, telemetry_interval_s=interval,
                       models=[{"name": n, "version": v, "package_id": p, "variant": "fp32",
                                "provider": "CPUExecutionProvider", "runtime": "onnxruntime"} for n, v, p in models])


def window(seq: int, end: float, latencies: list[float], *, package_id: str = PKG_A, model: str = "det",
           provider: str = "CPUExecutionProvider", errors: int = 0) -> tuple[TelemetryWindow, LatencyHistogram]:
    """A window as agent/telemetry.py sends it (through JSON, as the collector receives it)."""
    hist = LatencyHistogram()
    hist.record_many(latencies)
    sent = TelemetryWindow(
        seq=seq, window_start=end - 60, window_end=end, count=hist.count + errors, errors=errors,
        p50_ms=hist.percentile(50), p95_ms=hist.percentile(95), p99_ms=hist.percentile(99), max_ms=hist.max,
        histogram=hist.to_bounds(), variant="fp32", provider=provider, package_id=package_id, model=model,
        extra={"rejected": 0, "mean_ms": hist.mean, "min_ms": hist.min, "histogram_scheme": SCHEME,
               "histogram_sum_ns": hist.sum_ns})
    return TelemetryWindow.from_json(sent.to_json()), hist


def latencies(rng: random.Random, median_ms: float, n: int) -> list[float]:
    return [rng.lognormvariate(0, 0.35) * median_ms for _ in range(n)]


def statement(device: str, serial: int, package_id: str = PKG_A, version: str = "1.0") -> DeploymentStatement:
    return DeploymentStatement(fleet=FLEET, device=device, package_id=package_id, name="det", version=version,
                               target="x86-64-cpu", size=1000, block_size=4096, blocks_digest="d" * 64,
                               serial=serial, issued_at=T0, expires=T0 + 3600)


def release(package_id: str, version: str, name: str = "det", target: str = "x86-64-cpu") -> ReleaseRecord:
    return ReleaseRecord(package_id=package_id, name=name, version=version, target=target, size=1000,
                         published_at=T0, signer="k1", metrics={"fp32": {"p95_ms": 3.5}})


SITES = {"d1": "berlin", "d2": "berlin", "d3": "paris"}
PROVIDERS = {"d1": "CPUExecutionProvider", "d2": "OpenVINOExecutionProvider", "d3": "CPUExecutionProvider"}


Sent = list[tuple[str, TelemetryWindow, LatencyHistogram]]  # (device, window as received, its histogram)


def populate(store: FleetStore, rng: random.Random, buckets: int = 6) -> Sent:
    """Three devices, two releases the store knows and one it does not, windows every 100 s."""
    store.record_release(release(PKG_A, "1.0"))
    store.record_release(release(PKG_B, "2.0"))
    for device, site in SITES.items():
        store.record_state(FLEET, state(device, labels={"site": site}, target="x86-64-cpu" if device != "d3"
                                        else "aarch64-cpu", hardware_class=f"hw-{site}"), at=T0)
    sent = []
    for device in SITES:
        for seq in range(buckets * 3):
            package_id = (PKG_A, PKG_B, PKG_X)[seq % 3] if device != "d3" else PKG_A
            median = {PKG_A: 4.0, PKG_B: 6.0, PKG_X: 9.0}[package_id] * (1.5 if device == "d2" else 1.0)
            w, hist = window(seq, T0 + 100 * seq, latencies(rng, median, rng.randint(0, 40)), package_id=package_id,
                             provider=PROVIDERS[device], errors=int(seq % 4 == 0))
            sent.append((device, w, hist))
    assert store.add_windows((FLEET, d, w) for d, w, _ in sent) == len(sent)
    return sent


def expected_groups(sent: Sent, key_of) -> dict[str, tuple[int, int, int, int, LatencyHistogram]]:
    """key -> (count, errors, devices, windows, merged histogram), merged straight from the windows."""
    groups: dict[str, list] = {}
    for device, w, hist in sent:
        g = groups.setdefault(key_of(device, w), [0, 0, set(), 0, LatencyHistogram()])
        g[0] += w.count
        g[1] += w.errors
        g[2].add(device)
        g[3] += 1
        g[4].merge(hist)
    return {k: (c, e, len(d), n, h) for k, (c, e, d, n, h) in groups.items()}


def assert_stats_equal(got, expected) -> None:
    assert [s.key for s in got] == sorted(expected)
    for s in got:
        count, errors, devices, windows, hist = expected[s.key]
        assert (s.count, s.errors, s.devices, s.windows) == (count, errors, devices, windows), s.key
        assert (s.p50_ms, s.p95_ms, s.p99_ms) == (hist.percentile(50), hist.percentile(95), hist.percentile(99)), s.key


# -- registry ------------------------------------------------------------------------------------
def test_state_upserts_device_keeping_first_seen(store: FleetStore) -> None:
    store.record_state(FLEET, state("d1", labels={"site": "berlin", "line": "3"}, models=(("det", "1.0", PKG_A),)),
                       at=T0)
    store.record_state(FLEET, state("d1", labels={"site": "paris"}, models=(("det", "2.0", PKG_B),
                                                                            ("cls", "1.0", PKG_X))), at=T0 + 50)
    [device] = store.devices(FLEET, now=T0 + 51)
    assert (device.first_seen, device.last_seen, device.status) == (T0, T0 + 50, "online")
    assert device.labels == {"site": "paris"}
    assert [(m.name, m.release, m.package_id) for m in device.models] == [("cls", "cls@1.0", PKG_X),
                                                                           ("det", "det@2.0", PKG_B)]
    assert (device.arch, device.target, device.hardware_class, device.agent_version) == (
        "x86_64", "x86-64-cpu", "generic-x86", "0.1.0")
    assert device.hardware["cpu"] == "Test CPU"


@pytest.mark.parametrize(("interval", "online", "silent_s", "status"), [
    (10.0, True, 29.0, "online"),
    (10.0, True, 31.0, "unknown"),  # past three 10 s windows
    (None, True, 179.0, "online"),  # interval not said: 60 s
    (None, True, 181.0, "unknown"),
    (10.0, False, 1.0, "offline"),
    (10.0, False, 1e6, "offline"),
])
def test_status_from_state_and_silence(store: FleetStore, interval, online, silent_s, status) -> None:
    store.record_state(FLEET, state("d1", online=online, interval=interval), at=T0)
    assert store.device(FLEET, "d1", now=T0 + silent_s).status == status


def test_any_message_keeps_a_device_online_and_touch_creates_nothing(store: FleetStore) -> None:
    store.record_state(FLEET, state("d1", interval=10.0), at=T0)
    store.touch(FLEET, "d1", T0 + 100)
    store.touch(FLEET, "d1", T0 + 50)  # an older message does not move it back
    store.touch(FLEET, "ghost", T0 + 100)
    assert store.device(FLEET, "d1", now=T0 + 120).status == "online"
    assert store.device(FLEET, "d1").last_seen == T0 + 100
    assert store.device(FLEET, "ghost") is None


def test_offline_will_keeps_what_the_last_online_state_said(store: FleetStore) -> None:
    store.record_state(FLEET, state("d1", models=(("det", "2.0", PKG_B),)), at=T0)
    stale_will = state("d1", online=False, models=(("det", "1.0", PKG_A),))  # written when it connected
    store.record_state(FLEET, stale_will, at=T0 + 10)
    device = store.device(FLEET, "d1", now=T0 + 11)
    assert (device.status, device.last_seen, [m.release for m in device.models]) == ("offline", T0 + 10, ["det@2.0"])
    store.record_state(FLEET, state("d9", online=False, models=(("det", "1.0", PKG_A),)), at=T0)  # new: all of it
    assert [m.release for m in store.device(FLEET, "d9").models] == ["det@1.0"]


def test_select_by_labels_needs_every_pair_and_lists_sorted(store: FleetStore) -> None:
    for fleet, device, labels in [("b-fleet", "z1", {"site": "berlin"}), (FLEET, "d2", {"site": "berlin", "line": "2"}),
                                  (FLEET, "d1", {"site": "berlin", "line": "1"}), (FLEET, "d3", {"site": "paris"})]:
        store.record_state(fleet, state(device, labels=labels), at=T0)
    assert [d.device_id for d in store.devices(FLEET, select={"site": "berlin"})] == ["d1", "d2"]
    assert [d.device_id for d in store.devices(FLEET, select={"site": "berlin", "line": "2"})] == ["d2"]
    assert store.devices(FLEET, select={"site": "berlin", "line": "9"}) == []
    assert [(d.fleet, d.device_id) for d in store.devices(select={"site": "berlin"})] == [
        ("b-fleet", "z1"), (FLEET, "d1"), (FLEET, "d2")]
    assert store.fleets() == ["b-fleet", FLEET]


def test_forget_device_drops_it_and_its_desired_but_keeps_history(store: FleetStore) -> None:
    store.record_state(FLEET, state("d1", labels={"site": "berlin"}, models=(("det", "1.0", PKG_A),)), at=T0)
    store.record_desired(FLEET, statement("d1", serial=5))
    store.add_events([(FLEET, "d1", InstallEvent(kind=InstallEventKind.ACTIVATED, package_id=PKG_A, at=T0,
                                                 model="det"))])
    store.add_windows([(FLEET, "d1", window(1, T0, [3.0, 4.0])[0])])
    assert store.forget_device(FLEET, "d1") is True
    assert (store.device(FLEET, "d1"), store.desired(FLEET, "d1"), store.devices(FLEET)) == (None, [], [])
    assert len(store.events(FLEET, device_id="d1")) == 1 and store.window_count(FLEET) == 1
    assert store.forget_device(FLEET, "d1") is False
    store.record_state(FLEET, state("d1"), at=T0 + 5)  # comes back clean: labels and models were dropped with it
    assert store.device(FLEET, "d1").labels == {}


# -- releases ------------------------------------------------------------------------------------
def test_releases_sort_by_version_and_are_named_name_at_version(store: FleetStore) -> None:
    ids = iter(f"{i:064x}" for i in range(1, 100))
    for name, version in [("det", "1.10"), ("det", "1.9"), ("cls", "2.0"), ("det", "1.2.0"), ("det", "1.2.0-rc1")]:
        store.record_release(release(next(ids), version, name=name))
    assert [r.release for r in store.releases()] == ["cls@2.0", "det@1.2.0-rc1", "det@1.2.0", "det@1.9", "det@1.10"]
    assert [r.release for r in store.releases("det")][-1] == "det@1.10"
    [found] = store.find_release("det", "1.2")  # 1.2 = 1.2.0
    assert found.release == "det@1.2.0" and store.release(found.package_id) == found
    assert found.metrics == {"fp32": {"p95_ms": 3.5}}
    assert store.find_release("det", "1.2", target="aarch64-cpu") == []
    store.record_release(release(found.package_id, "1.2.0", target="aarch64-cpu"))  # upsert by package id
    assert store.release(found.package_id).target == "aarch64-cpu" and len(store.releases()) == 5
    assert store.release("f" * 64) is None


# -- desired vs actual ---------------------------------------------------------------------------
def test_desired_newer_serial_wins_and_undeploy_names_no_package(store: FleetStore) -> None:
    store.record_desired(FLEET, statement("d1", serial=5, package_id=PKG_B, version="2.0"))
    store.record_desired(FLEET, statement("d1", serial=3))  # older: ignored
    [wish] = store.desired(FLEET, "d1")
    assert (wish.model, wish.package_id, wish.release, wish.serial) == ("det", PKG_B, "det@2.0", 5)
    store.record_desired(FLEET, undeploy_statement(FLEET, "d1", "det", serial=7, now=T0))
    [wish] = store.desired(FLEET, "d1")
    assert (wish.package_id, wish.release, wish.serial) == (None, None, 7)
    store.clear_desired(FLEET, "d1", "det")
    assert store.desired(FLEET, "d1") == []
    with pytest.raises(FleetError, match="not 'other'"):
        store.record_desired("other", statement("d1", serial=9))


@pytest.mark.parametrize(("running", "wish", "reached"), [
    ((("det", "1.0", PKG_A),), "deploy-a", True),
    ((("det", "1.0", PKG_A),), "deploy-b", False),
    ((), "deploy-a", False),
    ((), "undeploy", True),
    ((("det", "1.0", PKG_A),), "undeploy", False),
])
def test_reached_compares_what_runs_with_what_was_told(store: FleetStore, running, wish, reached) -> None:
    store.record_state(FLEET, state("d1", models=running), at=T0)
    told = (undeploy_statement(FLEET, "d1", "det", serial=2, now=T0) if wish == "undeploy"
            else statement("d1", serial=2, package_id=PKG_A if wish == "deploy-a" else PKG_B))
    store.record_desired(FLEET, told)
    assert store.device(FLEET, "d1").reached() == {"det": reached}


# -- events --------------------------------------------------------------------------------------
def test_events_are_stored_once_and_filtered(store: FleetStore) -> None:
    store.record_release(release(PKG_A, "1.0"))
    batch = [(FLEET, "d1", InstallEvent(kind=InstallEventKind.DOWNLOADING, package_id=PKG_A, at=T0, model="det",
                                        progress=0.5, rollout_id="r1")),
             (FLEET, "d1", InstallEvent(kind=InstallEventKind.ACTIVATED, package_id=PKG_A, at=T0 + 10, model="det")),
             (FLEET, "d2", InstallEvent(kind=InstallEventKind.FAILED, package_id=PKG_X, at=T0 + 20, model="det",
                                        reason="disk full", extra={"retry": True})),
             (FLEET, "d2", InstallEvent(kind=InstallEventKind.REFUSED, package_id="", at=T0 + 30))]
    assert store.add_events(batch) == 4
    assert store.add_events(batch) == 0  # redelivered: nothing new
    everything = store.events(FLEET)
    assert [(e.device_id, e.kind) for e in everything] == [("d1", "downloading"), ("d1", "activated"),
                                                            ("d2", "failed"), ("d2", "refused")]
    assert (everything[0].release, everything[0].progress, everything[0].rollout_id) == ("det@1.0", 0.5, "r1")
    assert (everything[2].release, everything[2].reason, everything[2].extra) == (None, "disk full", {"retry": True})
    assert everything[3].model is None
    assert [e.kind for e in store.events(FLEET, since=T0 + 10, until=T0 + 30)] == ["activated", "failed"]
    assert [e.kind for e in store.events(FLEET, device_id="d2", kinds=["failed"])] == ["failed"]
    assert [e.kind for e in store.events(FLEET, limit=2)] == ["failed", "refused"]  # the latest, oldest first
    assert store.events("other") == [] and store.events(FLEET, kinds=[]) == []


# -- telemetry -----------------------------------------------------------------------------------
def test_a_redelivered_window_is_stored_once(store: FleetStore, store_location: str) -> None:
    rng = random.Random(1)
    windows = [window(seq, T0 + 60 * seq, latencies(rng, 5.0, 20))[0] for seq in range(10)]
    assert store.add_windows((FLEET, "d1", w) for w in windows[:6]) == 6
    with FleetStore.open(store_location) as second_collector:  # another process: its own series lookups
        again = windows[4:] + windows[8:]  # 4, 5, 8 and 9 a second time
        assert second_collector.add_windows((FLEET, "d1", w) for w in again) == 4
    assert store.add_windows((FLEET, "d1", w) for w in windows) == 0
    assert store.add_windows((FLEET, "d2", w) for w in windows[:2]) == 2  # seq is per device
    assert (store.window_count(FLEET), store.window_count(), store.window_count("other")) == (12, 12, 0)
    [stats] = store.telemetry(FLEET, by="model", select=None)
    assert (stats.windows, stats.count) == (12, sum(w.count for w in windows) + windows[0].count + windows[1].count)


def test_a_reinstalled_agent_reusing_seqs_is_not_taken_for_a_redelivery(store: FleetStore) -> None:
    """A device whose data dir was wiped starts its seq at 0 again: windows with an old seq but
    another start time are new windows, stored; the same window again is still stored once."""
    rng = random.Random(2)
    first = [window(seq, T0 + 60 * seq, latencies(rng, 5.0, 20))[0] for seq in range(3)]
    after_reinstall = [window(seq, T0 + 86_400 + 60 * seq, latencies(rng, 5.0, 20))[0] for seq in range(3)]
    assert store.add_windows((FLEET, "d1", w) for w in first) == 3
    assert store.add_windows((FLEET, "d1", w) for w in after_reinstall) == 3
    assert store.add_windows((FLEET, "d1", w) for w in first + after_reinstall) == 0
    assert store.window_count(FLEET) == 6


GROUPINGS = {
    "release": lambda d, w: {PKG_A: "det@1.0", PKG_B: "det@2.0"}.get(w.package_id, f"det@sha256:{PKG_X[:12]}"),
    "device": lambda d, w: d,
    "label:site": lambda d, w: SITES[d],
    "provider": lambda d, w: w.provider,
    "target": lambda d, w: "aarch64-cpu" if d == "d3" else "x86-64-cpu",
    "hardware": lambda d, w: f"hw-{SITES[d]}",
    "label:line": lambda d, w: NO_VALUE,  # no device has it
}


@pytest.mark.parametrize("by", list(GROUPINGS))
def test_telemetry_equals_a_direct_merge_of_the_windows(store: FleetStore, by: str) -> None:
    sent = populate(store, random.Random(7))
    assert_stats_equal(store.telemetry(FLEET, by=by), expected_groups(sent, GROUPINGS[by]))
    merged = store.merged_histogram(FLEET, by=by)
    assert merged == {k: v[4] for k, v in expected_groups(sent, GROUPINGS[by]).items()}  # bit for bit


def test_since_until_and_selectors_pick_whole_buckets(store: FleetStore) -> None:
    sent = populate(store, random.Random(3))
    first = T0 - T0 % ROLLUP_BUCKET_S
    since, until = first + ROLLUP_BUCKET_S, first + 4 * ROLLUP_BUCKET_S
    inside = [s for s in sent if since <= s[1].window_end < until]
    assert 0 < len(inside) < len(sent)
    assert_stats_equal(store.telemetry(FLEET, since=since, until=until, by="device"),
                       expected_groups(inside, GROUPINGS["device"]))
    # a bound inside a bucket takes the whole bucket
    assert store.telemetry(FLEET, since=since + 17, until=until - 0.5, by="device") == \
        store.telemetry(FLEET, since=since, until=until, by="device")
    berlin = [s for s in sent if SITES[s[0]] == "berlin"]
    assert_stats_equal(store.telemetry(FLEET, by="release", select={"site": "berlin"}),
                       expected_groups(berlin, GROUPINGS["release"]))
    assert_stats_equal(store.telemetry(FLEET, by="release", device_ids=["d3"]),
                       expected_groups([s for s in sent if s[0] == "d3"], GROUPINGS["release"]))
    assert store.telemetry(FLEET, since=until + 3600) == [] and store.telemetry("other") == []


def test_latency_series_merges_per_time_bucket(store: FleetStore) -> None:
    sent = populate(store, random.Random(5))
    series = store.latency_series(FLEET, bucket_s=600, by="release")
    for key, points in series.items():
        assert [t for t, _ in points] == sorted(t for t, _ in points)
        for start, stats in points:
            chosen = [s for s in sent if start <= s[1].window_end < start + 600
                      and GROUPINGS["release"](s[0], s[1]) == key]
            assert_stats_equal([stats], expected_groups(chosen, lambda d, w: key))
    assert sum(stats.windows for points in series.values() for _, stats in points) == len(sent)


def test_long_ranges_read_whole_hours_and_exact_edges(store: FleetStore) -> None:
    rng = random.Random(9)
    store.record_release(release(PKG_A, "1.0"))
    store.record_release(release(PKG_B, "2.0"))
    start = T0 - T0 % 3600
    sent = []
    for seq in range(30):  # every 10 minutes for 5 hours
        w, hist = window(seq, start + 600 * seq + 30, latencies(rng, 5.0, rng.randint(0, 30)),
                         package_id=PKG_A if seq % 3 else PKG_B)
        sent.append(("d1", w, hist))
    store.add_windows((FLEET, d, w) for d, w, _ in sent)
    since, until = start + 4800, start + 13200  # 1:20 to 3:40: two whole hours between 5-minute edges
    inside = [s for s in sent if since <= s[1].window_end < until]
    assert_stats_equal(store.telemetry(FLEET, since=since, until=until, by="release"),
                       expected_groups(inside, GROUPINGS["release"]))
    assert_stats_equal(store.telemetry(FLEET, by="release"), expected_groups(sent, GROUPINGS["release"]))
    for step in (3600, 900):  # whole hours read the hourly rows; 15 minutes cannot
        points = store.latency_series(FLEET, since=since, until=until, bucket_s=step, by="device")["d1"]
        assert sum(stats.windows for _, stats in points) == len(inside)
        for at, stats in points:
            assert_stats_equal([stats], expected_groups([s for s in inside if at <= s[1].window_end < at + step],
                                                        lambda d, w: "d1"))


def test_rollup_pieces_hold_each_overlapping_bucket_once() -> None:
    rng = random.Random(4)
    for _ in range(300):
        since = rng.choice([None, rng.uniform(0, 20_000)])
        until = rng.choice([None, rng.uniform(0, 20_000)])
        step = rng.choice([None, 300, 900, 3600, 7200])
        pieces = rollup_pieces(since, until, step)
        for bucket in range(-7200, 30_000, ROLLUP_BUCKET_S):
            holders = sum(low <= (bucket if span == ROLLUP_BUCKET_S else bucket - bucket % span) < high
                          for span, low, high in pieces)
            overlaps = (since is None or bucket + ROLLUP_BUCKET_S > since) and (until is None or bucket < until)
            assert holders == int(overlaps), (since, until, step, bucket, pieces)
        if step is not None and step % 3600:
            assert all(span == ROLLUP_BUCKET_S for span, _, _ in pieces)


def test_all_fleets_group_devices_by_fleet_and_id(store: FleetStore) -> None:
    w, _ = window(1, T0, [2.0, 3.0])
    store.add_windows([(FLEET, "d1", w), ("other", "d1", w)])
    assert [s.key for s in store.telemetry(by="device")] == ["other/d1", f"{FLEET}/d1"]
    assert [s.key for s in store.telemetry(FLEET, by="device")] == ["d1"]
    with pytest.raises(FleetError, match="cannot group telemetry by 'site'"):
        store.telemetry(FLEET, by="site")


def test_windows_a_store_cannot_merge_still_count_their_calls(store: FleetStore) -> None:
    good, hist = window(1, T0, [2.0, 3.0, 4.0])
    foreign = TelemetryWindow.from_dict({**good.__dict__, "seq": 2, "extra": {"histogram_scheme": "hdr/2"}})
    absurd = TelemetryWindow.from_dict({**good.__dict__, "seq": 2 ** 70})  # past 64 bits: not storable
    heartbeat = TelemetryWindow(seq=3, window_start=T0 - 60, window_end=T0, count=0, errors=0)
    assert store.add_windows([(FLEET, "d1", w) for w in (good, foreign, absurd, heartbeat)]) == 3
    [stats] = store.telemetry(FLEET, by="device")  # the heartbeat has no release: no group
    assert (stats.count, stats.windows) == (6, 2) and store.merged_histogram(FLEET)["det@sha256:aaaaaaaaaaaa"] == hist


# -- histogram bytes -----------------------------------------------------------------------------
def test_histogram_bytes_round_trip_exactly() -> None:
    rng = random.Random(11)
    cases = [LatencyHistogram(), LatencyHistogram()]
    cases[1].record_many([rng.lognormvariate(1, 2) for _ in range(5000)] + [0.0, 1e-9, 250_000.0])  # both edges
    big = LatencyHistogram()
    big.counts, big.count, big.sum_ns, big.min, big.max = {5: 2 ** 40, OVERFLOW: 3}, 2 ** 40 + 3, 2 ** 90, 0.004, 1e6
    cases.append(big)  # a count past u32 and a sum past u64
    for hist in cases:
        assert decode_histogram(encode_histogram(hist)) == hist
    parts = [LatencyHistogram() for _ in range(50)]
    for part in parts:
        part.record_many([rng.expovariate(0.2) for _ in range(rng.randint(0, 200))])
    direct = LatencyHistogram()
    for part in parts + [big]:
        direct.merge(part)
    assert merge_encoded(encode_histogram(p) for p in parts + [big]) == direct
    assert len(encode_histogram(parts[0])) == store_schema.HEADER_SIZE + 6 * len(parts[0].counts)  # compact


@pytest.mark.parametrize("damage", [lambda b: b[:10], lambda b: b[:-1], lambda b: b"\x07" + b[1:],
                                    lambda b: b[:33] + (9999).to_bytes(2, "little") + b[35:]])
def test_damaged_histogram_bytes_are_refused(damage) -> None:
    hist = LatencyHistogram()
    hist.record_many([1.0, 2.0, 3.0])
    with pytest.raises(FleetError):
        decode_histogram(damage(encode_histogram(hist)))


# -- schema, opening, concurrency, hostile input -------------------------------------------------
def test_reopening_applies_no_migration_twice(store_location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with FleetStore.open(store_location) as first:
        first.record_state(FLEET, state("d1"), at=T0)
        applied = first._run(lambda tx: tx.query("SELECT version, applied_at FROM schema_version"))
    with FleetStore.open(store_location) as again:
        assert again.schema_version == LATEST and again.device(FLEET, "d1") is not None
        assert again._run(lambda tx: tx.query("SELECT version, applied_at FROM schema_version")) == applied
    step = "CREATE TABLE probe_next (id INTEGER PRIMARY KEY)"
    monkeypatch.setattr(store_schema, "MIGRATIONS", [*store_schema.MIGRATIONS, (LATEST + 1, step)])
    with FleetStore.open(store_location) as upgraded:  # only the new step runs: older tables already exist
        assert upgraded.schema_version == LATEST + 1 and upgraded.device(FLEET, "d1") is not None
    monkeypatch.setattr(store_schema, "MIGRATIONS", store_schema.MIGRATIONS[:LATEST])
    with pytest.raises(FleetError, match=f"schema v{LATEST + 1}, newer than this edgesdk knows"):
        FleetStore.open(store_location)


def test_a_v1_store_with_data_migrates_to_the_latest_schema(store_location: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written by the previous release (schema v1) opens under this one: the later steps
    run once, its devices and telemetry stay, and rollouts can be stored."""
    every_step = store_schema.MIGRATIONS
    monkeypatch.setattr(store_schema, "MIGRATIONS", every_step[:1])
    with FleetStore.open(store_location) as old:
        assert old.schema_version == 1
        old.record_state(FLEET, state("d1"), at=T0)
    monkeypatch.setattr(store_schema, "MIGRATIONS", every_step)
    with FleetStore.open(store_location) as new:
        assert new.schema_version == LATEST >= 2
        assert new.device(FLEET, "d1") is not None
        assert new._run(lambda tx: tx.query("SELECT COUNT(*) FROM rollouts"))[0][0] == 0
        new.add_windows([(FLEET, "d1", window(0, T0, latencies(random.Random(1), 3.0, 50))[0])])
        assert new.window_count(FLEET) == 1


def test_concurrent_writers_and_readers_neither_fail_nor_double_count(store: FleetStore) -> None:
    rng = random.Random(2)
    # devices w0..w3, and every thread also sends w0's windows again: each must land exactly once
    per_device = {f"w{i}": [window(seq, T0 + 30 * seq, latencies(rng, 3.0, 5))[0] for seq in range(60)]
                  for i in range(4)}
    errors: list[str] = []
    start = threading.Barrier(5)

    def writer(device: str) -> None:
        try:
            start.wait(timeout=30)
            mine = per_device[device]
            for batch in range(0, len(mine), 10):
                store.add_windows([(FLEET, device, w) for w in mine[batch:batch + 10]] +
                                  [(FLEET, "w0", w) for w in per_device["w0"][batch:batch + 10]])
                store.record_state(FLEET, state(device), at=T0 + batch)
                store.add_events([(FLEET, device, InstallEvent(kind=InstallEventKind.DOWNLOADING, package_id=PKG_A,
                                                               at=T0 + batch))])
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(f"{device}: {type(exc).__name__}: {exc}")

    def reader() -> None:
        try:
            start.wait(timeout=30)
            for _ in range(10):
                store.devices(FLEET)
                store.telemetry(FLEET, by="device")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"reader: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=writer, args=(d,)) for d in per_device] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert store.window_count(FLEET) == 240 and len(store.events(FLEET)) == 24
    assert {s.key: s.windows for s in store.telemetry(FLEET, by="device")} == {d: 60 for d in per_device}
    assert {s.key: s.count for s in store.telemetry(FLEET, by="device")} == {
        d: sum(w.count for w in ws) for d, ws in per_device.items()}


HOSTILE = "x' OR '1'='1'); DROP TABLE devices; --"


def test_quotes_and_odd_bytes_in_values_are_data_not_sql(store: FleetStore) -> None:
    store.record_state(FLEET, state("d1", labels={"site": HOSTILE, "note": "nul\x00here", "odd": "\ud800"}), at=T0)
    store.record_state(FLEET, state("d2", labels={"site": "berlin"}), at=T0)
    store.record_state(HOSTILE, state(HOSTILE), at=T0)
    assert [d.device_id for d in store.devices(FLEET, select={"site": HOSTILE})] == ["d1"]
    assert store.devices(FLEET, select={"site": "x' OR '1'='1"}) == []
    assert store.devices(FLEET, select={HOSTILE: "berlin"}) == []
    labels = store.device(FLEET, "d1").labels
    assert labels["site"] == HOSTILE and labels["note"] == "nul\ufffdhere" and labels["odd"] == "?"
    assert store.device(HOSTILE, HOSTILE).device_id == HOSTILE and len(store.devices()) == 3
    store.add_events([(FLEET, "d1", InstallEvent(kind=InstallEventKind.FAILED, package_id=HOSTILE, at=T0,
                                                 reason="bad\x00byte", model=HOSTILE))])
    [event] = store.events(FLEET)
    assert (event.package_id, event.reason, event.model) == (HOSTILE, "bad\ufffdbyte", HOSTILE)
    w, hist = window(1, T0, [1.0, 2.0], model=HOSTILE, provider="p\x00")
    store.add_windows([(FLEET, "d1", w)])
    assert store.merged_histogram(FLEET, by=f"label:{HOSTILE}") == {NO_VALUE: hist}
    assert [s.key for s in store.telemetry(FLEET, by="provider")] == ["p\ufffd"]


def test_open_names_the_problem_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FleetError, match="use a file path or postgresql://"):
        FleetStore.open("mysql://root:hunter2@db/fleet")
    pytest.importorskip("psycopg")
    url = f"postgresql://edge:hunter2@127.0.0.1:{free_port()}/fleet?password=hunter2"  # nothing listens there
    with pytest.raises(FleetError) as caught:
        FleetStore.open(url)
    assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)
    monkeypatch.setenv("EDGESDK_HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / "fleet.db"
    with FleetStore.open() as default:
        assert default.url == f"sqlite://{tmp_path / 'home' / 'fleet.db'}" and default.dialect == "sqlite"
    with FleetStore.open(f"sqlite://{tmp_path / 'home' / 'fleet.db'}") as same:
        assert same.schema_version == LATEST
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(FleetError, match="dir.db"):
        FleetStore.open(tmp_path / "dir.db")
