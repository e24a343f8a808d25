"""The telemetry report built from a real SQLite fleet store filled through its own API: six
devices on two hardware classes, two releases of one model, one device of the new release five
times slower than its peers, a failed install, one device offline and one silent.

Every number the report shows is checked against a direct merge of the windows' own histograms
(built as agent/telemetry.py builds them), through `edgesdk telemetry report` as a user runs it.
`build_fleet` is shared with the registry and HTML tests.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesdk.cli.main import app
from edgesdk.fleet.records import ReleaseRecord
from edgesdk.fleet.report import (build_report, fmt_ms, histogram_without, latest_two, parse_select, parse_when,
                                  series_step)
from edgesdk.fleet.store import FleetStore
from edgesdk.errors import ConfigError
from edgesdk.protocol import DeploymentStatement
from edgesdk.protocol.histogram import SCHEME, LatencyHistogram
from edgesdk.protocol.messages import DeviceState, InstallEvent, InstallEventKind, TelemetryWindow
from tests.fixtures.cli_json import doc_section

FLEET = "lab"
RPI, JETSON = "raspberry-pi-5", "jetson-orin-nano"
PKG = {("1.0", RPI): "a1" * 32, ("2.0", RPI): "b1" * 32, ("1.0", JETSON): "a2" * 32, ("2.0", JETSON): "b2" * 32}
# device -> (site, hardware class, release version it runs now, median ms now)
DEVICES = {
    "cam-01": ("berlin", RPI, "1.0", 10.0),  # its upgrade to 2.0 failed
    "cam-02": ("berlin", RPI, "2.0", 8.0),
    "cam-03": ("berlin", RPI, "2.0", 40.0),  # the slow one: 5x its peers
    "cam-04": ("paris", RPI, "2.0", 8.0),
    "cam-05": ("paris", JETSON, "2.0", 2.0),  # offline now (its Will)
    "cam-06": ("paris", JETSON, "1.0", 3.0),  # silent for an hour: unknown
}
SLOW = "cam-03"
FAILURE_REASON = "health check failed: cosine 0.91 below 0.99"
WINDOWS_NOW = 20  # one a minute, the last 20 minutes before the anchor
SAMPLES = 60


@dataclass
class Sent:
    device: str
    release: str
    end: float
    count: int
    errors: int
    hist: LatencyHistogram


@dataclass
class Fleet:
    """What went into the store, to compute what the report must say."""

    path: Path
    anchor: float  # a 5-minute bucket boundary; every window ends before it
    sent: list[Sent] = field(default_factory=list)

    def store(self) -> FleetStore:
        return FleetStore.open(self.path)

    def expected(self, key_of, since: float | None = None) -> dict[str, tuple[int, int, LatencyHistogram, set]]:
        """key -> (count, errors, merged histogram, devices) of the windows the store selects for
        ``since`` (whole 5-minute buckets: a window counts when its bucket starts at or after
        since's bucket)."""
        out: dict[str, list] = {}
        for s in self.sent:
            if since is not None and s.end // 300 * 300 < since // 300 * 300:
                continue
            g = out.setdefault(key_of(s), [0, 0, LatencyHistogram(), set()])
            g[0] += s.count
            g[1] += s.errors
            g[2].merge(s.hist)
            g[3].add(s.device)
        return {k: tuple(v) for k, v in out.items()}


def hw(device: str) -> str:
    return DEVICES[device][1]


def make_window(seq: int, end: float, latencies: list[float], package_id: str,
                errors: int = 0) -> tuple[TelemetryWindow, LatencyHistogram]:
    """A window as agent/telemetry.py sends it, through JSON as the collector receives it."""
    hist = LatencyHistogram()
    hist.record_many(latencies)
    sent = TelemetryWindow(
        seq=seq, window_start=end - 60, window_end=end, count=hist.count + errors, errors=errors,
        p50_ms=hist.percentile(50), p95_ms=hist.percentile(95), p99_ms=hist.percentile(99), max_ms=hist.max,
        histogram=hist.to_bounds(), variant="onnx-int8", provider="CPUExecutionProvider", package_id=package_id,
        model="det", extra={"min_ms": hist.min, "histogram_scheme": SCHEME, "histogram_sum_ns": hist.sum_ns})
    return TelemetryWindow.from_json(sent.to_json()), hist


def statement(device: str, version: str, serial: int, at: float) -> DeploymentStatement:
    pid = PKG[(version, hw(device))]
    return DeploymentStatement(fleet=FLEET, device=device, package_id=pid, name="det", version=version,
                               target=hw(device), size=1000, block_size=4096, blocks_digest="d" * 64, serial=serial,
                               issued_at=at, expires=at + 86400)


def build_fleet(path: Path, seed: int = 7) -> Fleet:
    """Fill a SQLite store at ``path`` through the store's own API (what the collector calls)."""
    rng = random.Random(seed)
    now = time.time()
    fleet = Fleet(path, anchor=now // 300 * 300)
    a = fleet.anchor
    with FleetStore.open(path) as store:
        for (version, target), pid in PKG.items():
            store.record_release(ReleaseRecord(
                package_id=pid, name="det", version=version, target=target,
                size=2_500_000 if target == RPI else 9_000_000,
                published_at=a - 86400 + (3600 if version == "2.0" else 0), signer="ab12cd34",
                metrics={"onnx-fp32": {"outputs": {"y": {"cosine": 1.0, "top1_agreement": 1.0}}},
                         "onnx-int8": {"outputs": {"y": {"cosine": 0.9991, "top1_agreement": 0.995}},
                                       "task": {"variant": 0.962}}}))
        windows: list[tuple[str, str, TelemetryWindow]] = []
        seqs = {d: 0 for d in DEVICES}

        def add(device: str, version: str, end: float, median: float, errors: int = 0) -> None:
            latencies = [rng.lognormvariate(0, 0.2) * median for _ in range(SAMPLES)]
            w, hist = make_window(seqs[device], end, latencies, PKG[(version, hw(device))], errors)
            seqs[device] += 1
            windows.append((FLEET, device, w))
            fleet.sent.append(Sent(device, f"det@{version}", end, w.count, w.errors, hist))

        for device, (site, hardware, version, median) in DEVICES.items():
            offset = 3600 if device == "cam-06" else 0
            if version == "2.0" and hardware == RPI:  # ran 1.0 two hours ago, before the upgrade
                for k in range(1, 11):
                    add(device, "1.0", a - 7200 - 60 * k - 7, 9.0)
            for k in range(1, WINDOWS_NOW + 1):
                add(device, version, a - offset - 60 * k - 7, median, errors=int(device == "cam-04" and k % 5 == 0))
        assert store.add_windows(windows) == len(windows)

        for device, (site, hardware, version, median) in DEVICES.items():
            at = now - (3600 if device == "cam-06" else 5)
            store.record_state(FLEET, DeviceState(
                device_id=device, online=True, agent_version="0.1.0", target=hardware,
                hardware={"arch": "aarch64", "board": hardware}, labels={"site": site}, hardware_class=hardware,
                telemetry_interval_s=60.0, runtimes={"onnxruntime": {"version": "1.20.1",
                                                                     "providers": ["CPUExecutionProvider"]}},
                models=[{"name": "det", "version": version, "package_id": PKG[(version, hardware)],
                         "variant": "onnx-int8", "provider": "CPUExecutionProvider", "runtime": "onnxruntime"}]),
                at=at)
            if device != "cam-06":
                store.record_desired(FLEET, statement(device, "2.0", 100 + seqs[device], a - 1800))
        store.record_state(FLEET, DeviceState(device_id="cam-05", online=False), at=now - 2)

        events = []
        for device in ("cam-02", "cam-03", "cam-04", "cam-05"):
            pid = PKG[("2.0", hw(device))]
            for i, kind in enumerate((InstallEventKind.DOWNLOADING, InstallEventKind.VERIFIED,
                                      InstallEventKind.SELECTED, InstallEventKind.ACTIVATED)):
                events.append((FLEET, device, InstallEvent(kind=kind, package_id=pid, at=a - 1500 + 10 * i,
                                                           model="det")))
        events.append((FLEET, "cam-01", InstallEvent(kind=InstallEventKind.DOWNLOADING, package_id=PKG[("2.0", RPI)],
                                                      at=a - 1450, model="det")))
        events.append((FLEET, "cam-01", InstallEvent(kind=InstallEventKind.FAILED, package_id=PKG[("2.0", RPI)],
                                                      at=a - 1400, model="det", reason=FAILURE_REASON)))
        store.add_events(events)
    return fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return build_fleet(tmp_path_factory.mktemp("fleet") / "fleet.db")


def cli(args: list[str]):  # noqa: ANN201
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert "Traceback" not in result.output, result.output
    return result


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def report_json(fleet: Fleet, *args: str) -> dict:
    result = cli(["telemetry", "report", "--fleet", FLEET, "--store", str(fleet.path), "--since", "1d",
                  "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


GROUPINGS = {
    "release": lambda s: s.release,
    "device": lambda s: s.device,
    "label:site": lambda s: DEVICES[s.device][0],
    "hardware": lambda s: hw(s.device),
}


# -- the numbers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("by", list(GROUPINGS))
def test_report_groups_equal_a_direct_merge_of_the_windows(fleet: Fleet, by: str) -> None:
    got = report_json(fleet, "--by", by)

    expected = fleet.expected(GROUPINGS[by])
    assert [g["key"] for g in got["groups"]] == sorted(expected)
    for g in got["groups"]:
        count, errors, hist, devices = expected[g["key"]]
        assert (g["count"], g["errors"], g["devices"]) == (count, errors, len(devices)), g["key"]
        assert (g["p50_ms"], g["p95_ms"], g["p99_ms"]) == (
            hist.percentile(50), hist.percentile(95), hist.percentile(99)), g["key"]
        assert g["error_rate"] == pytest.approx(errors / count)
    assert got["by"] == by and got["fleet"] == FLEET


def test_csv_has_the_same_numbers_as_json(fleet: Fleet) -> None:
    as_json = report_json(fleet, "--by", "device")
    result = cli(["telemetry", "report", "--fleet", FLEET, "--store", str(fleet.path), "--since", "1d",
                  "--by", "device", "--format", "csv"])
    assert result.exit_code == 0, result.output

    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["device"] for r in rows] == [g["key"] for g in as_json["groups"]]
    for row, g in zip(rows, as_json["groups"]):
        assert int(row["count"]) == g["count"] and int(row["errors"]) == g["errors"]
        assert float(row["p95_ms"]) == g["p95_ms"] and float(row["p99_ms"]) == g["p99_ms"]


def test_the_slow_device_is_the_one_outlier_against_its_peers_without_itself(fleet: Fleet) -> None:
    got = report_json(fleet)

    assert [o["device"] for o in got["outliers"]] == [SLOW]
    outlier = got["outliers"][0]
    peers = LatencyHistogram()
    own = LatencyHistogram()
    for s in fleet.sent:
        if s.release == "det@2.0" and hw(s.device) == RPI:
            (own if s.device == SLOW else peers).merge(s.hist)
    assert outlier["p95_ms"] == own.percentile(95)
    # rel: the rest's min/max are bucket edges (exact ones are not stored per device), ≤ one 1% bucket
    assert outlier["peers_p95_ms"] == pytest.approx(peers.percentile(95), rel=0.006)
    assert outlier["ratio"] > 4 and outlier["peers"] == 2 and outlier["release"] == "det@2.0"
    # The naive rule (against the group's own p95, the slow device included) would miss it: it is a
    # third of the group's calls, so the group's p95 is its own.
    group = next(g for g in report_json(fleet, "--by", "release")["groups"] if g["key"] == "det@2.0")
    assert outlier["p95_ms"] < 2 * group["p95_ms"]


def test_report_json_has_exactly_the_documented_keys(fleet: Fleet) -> None:
    got = report_json(fleet)

    assert set(got) == doc_section("telemetry report --format json")
    assert all(set(g) == doc_section("report groups") for g in got["groups"])
    assert got["outliers"] and all(set(o) == doc_section("report outliers") for o in got["outliers"])
    assert got["install_failures"] and all(set(f) == doc_section("install failures") for f in got["install_failures"])
    assert set(got["devices"]) == {"offline", "unknown"}
    assert all(set(d) == doc_section("device entries") for d in got["devices"]["offline"] + got["devices"]["unknown"])


def test_outlier_rule_needs_enough_calls(fleet: Fleet) -> None:
    assert report_json(fleet, "--min-calls", str(SAMPLES * WINDOWS_NOW + 1))["outliers"] == []
    assert report_json(fleet, "--outlier-factor", "10")["outliers"] == []


def test_offline_unknown_devices_and_install_failures(fleet: Fleet) -> None:
    got = report_json(fleet)

    assert [d["id"] for d in got["devices"]["offline"]] == ["cam-05"]
    assert [d["id"] for d in got["devices"]["unknown"]] == ["cam-06"]
    assert [(f["device"], f["kind"], f["release"], f["reason"]) for f in got["install_failures"]] == [
        ("cam-01", "failed", "det@2.0", FAILURE_REASON)]


def test_since_keeps_only_the_buckets_in_range(fleet: Fleet) -> None:
    since = fleet.anchor - 3600  # after the 1.0 windows of two hours ago, before the last hour's
    got = report_json(fleet, "--since", iso(since))

    expected = fleet.expected(GROUPINGS["release"], since=since)
    assert {g["key"]: g["count"] for g in got["groups"]} == {k: v[0] for k, v in expected.items()}
    everything = {g["key"]: g["count"] for g in report_json(fleet)["groups"]}
    assert everything["det@1.0"] > expected["det@1.0"][0]  # the old windows were left out
    assert got["install_failures"] and got["since"] == pytest.approx(since)
    later = report_json(fleet, "--since", iso(fleet.anchor - 1200))
    assert later["install_failures"] == []  # the failure was 1400 s before the anchor


def test_select_keeps_only_matching_devices(fleet: Fleet) -> None:
    got = report_json(fleet, "--by", "device", "--select", "site=paris")

    assert [g["key"] for g in got["groups"]] == ["cam-04", "cam-05", "cam-06"]
    assert got["install_failures"] == []  # cam-01 is in berlin


def test_table_prints_formatted_numbers_and_never_none(fleet: Fleet) -> None:
    result = cli(["telemetry", "report", "--fleet", FLEET, "--store", str(fleet.path), "--since", "1d"])
    assert result.exit_code == 0, result.output
    text = result.stdout

    assert not re.search(r"\b(None|nan|NaN|inf)\b", text), text
    expected = fleet.expected(GROUPINGS["release"])
    for release, (count, errors, hist, _) in expected.items():
        line = next(line for line in text.splitlines() if line.startswith(release))
        assert f"{count:,}" in line and fmt_ms(hist.percentile(95)) in line
    assert SLOW in text.split("outliers")[1].split("devices not online")[0]
    # The reason cell may wrap (the CLI's console width is fixed when it is first imported).
    assert FAILURE_REASON in " ".join(text.split()) and "cam-06" in text and "unknown" in text


@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "--since 'yesterday': use a duration like 30m"),
    (["--by", "colour"], "cannot group telemetry by 'colour'"),
    (["--select", "site"], "--select 'site': use key=value"),
    (["--since", "1h", "--until", "2h"], "the time range is empty"),
    (["--format", "xml"], "xml"),
])
def test_bad_report_options_fail_in_one_line(fleet: Fleet, args: list[str], message: str) -> None:
    result = cli(["telemetry", "report", "--store", str(fleet.path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


# -- the pure parts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, back", [("30m", 1800), ("1h", 3600), ("2d", 172800), ("1w", 604800), ("45s", 45),
                                        ("1.5h", 5400)])
def test_durations_count_back_from_now(text: str, back: float) -> None:
    assert parse_when(text, 1_000_000.0) == 1_000_000.0 - back


def test_iso_dates_are_utc_unless_they_say_otherwise() -> None:
    assert parse_when("2024-05-01", 0) == datetime(2024, 5, 1, tzinfo=timezone.utc).timestamp()
    assert parse_when("2024-05-01T12:00Z", 0) == datetime(2024, 5, 1, 12, tzinfo=timezone.utc).timestamp()
    assert parse_when("2024-05-01T14:00+02:00", 0) == datetime(2024, 5, 1, 12, tzinfo=timezone.utc).timestamp()


def test_select_items_parse_and_conflicts_are_refused() -> None:
    assert parse_select(["site=berlin", "line=a=b"]) == {"site": "berlin", "line": "a=b"}
    with pytest.raises(ConfigError, match="site given twice"):
        parse_select(["site=a", "site=b"])


def test_histogram_without_a_part_is_the_rest() -> None:
    rng = random.Random(1)
    a, b = LatencyHistogram(), LatencyHistogram()
    a.record_many(rng.uniform(1, 5) for _ in range(500))
    b.record_many(rng.uniform(20, 50) for _ in range(100))
    total = a.copy()
    total.merge(b)

    rest = histogram_without(total, b)
    assert rest.counts == a.counts and rest.count == a.count and rest.sum_ns == a.sum_ns
    for q in (50, 95, 99):
        assert rest.percentile(q) == pytest.approx(a.percentile(q), rel=0.006)
    assert histogram_without(total, total).count == 0


def test_latest_two_orders_versions_as_numbers_and_skips_unnamed_releases() -> None:
    h = LatencyHistogram()
    h.record(1.0)
    merged = {"det@1.9": h, "det@1.10": h, "det@1.2": h, "ocr@3": h, "det@sha256:abcdef012345": h}
    got = latest_two(merged)
    assert [r.release for r in got["det"]] == ["det@1.9", "det@1.10"]
    assert [r.release for r in got["ocr"]] == ["ocr@3"]


@pytest.mark.parametrize("value, text", [(None, "—"), (math.nan, "—"), (0.01234, "0.012"), (3.456, "3.46"),
                                         (45.67, "45.7"), (1234.5, "1,234")])
def test_latencies_print_with_about_three_digits(value, text: str) -> None:
    assert fmt_ms(value) == text


def test_series_step_gives_about_120_points_in_whole_buckets() -> None:
    assert series_step(0, 3600) == 300
    assert series_step(0, 7 * 86400) % 300 == 0 and 7 * 86400 / series_step(0, 7 * 86400) <= 120


def test_build_report_without_plots_reads_no_plot_data(fleet: Fleet) -> None:
    with fleet.store() as store:
        report = build_report(store, fleet=FLEET, since=fleet.anchor - 86400, until=time.time())
    assert report.plots is None and report.outliers[0].device_id == SLOW
