"""What `rollout start` is asked, parsed (edgesdk/fleet/rollout_spec.py): waves and their sizes,
durations, gate limits, the stored spec; and the stratified device order of
edgesdk/fleet/rollout_plan.py that the waves cut."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesdk.errors import ConfigError
from edgesdk.fleet.records import NO_VALUE, DeviceRecord
from edgesdk.fleet.rollout_plan import stratified
from edgesdk.fleet.rollout_spec import (DEFAULT_WAVES, MAX_WAVES, GateLimits, RolloutSpec, describe_limit,
                                        parse_duration, parse_limit, parse_waves, wave_sizes)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# -- waves -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("total", "sizes"), [
    (1, [1]),  # one device: the first wave is the whole rollout, the rest are empty and dropped
    (7, [1, 1, 2, 3]),  # 10% of 7 rounds up to 1, already reached: the wave still adds one device
    (100, [1, 9, 40, 50]),
    (5000, [1, 499, 2000, 2500]),
])
def test_default_waves_over_fleets_of_every_size(total: int, sizes: list[int]) -> None:
    got = wave_sizes(parse_waves(DEFAULT_WAVES), total)

    assert got == sizes
    assert sum(got) == total and all(size >= 1 for size in got)


def test_wave_sizes_are_cumulative_targets() -> None:
    """Each entry is the size reached after that wave, not the size of the wave."""
    assert wave_sizes(parse_waves("2,5,100%"), 10) == [2, 3, 5]
    assert wave_sizes(parse_waves("25%,50%,100%"), 8) == [2, 2, 4]
    assert wave_sizes(parse_waves("100%"), 3) == [3]


def test_waves_that_add_no_device_are_dropped() -> None:
    assert wave_sizes(parse_waves("50%,60%,100%"), 2) == [1, 1]  # 60% of 2 is both devices already
    assert wave_sizes(parse_waves("5,10,100%"), 3) == [3]  # counts past the selection: capped
    assert wave_sizes(parse_waves("1,2,3,100%"), 2) == [1, 1]


@FUZZ
@given(st.sets(st.integers(1, 50), max_size=(MAX_WAVES - 1) // 2),
       st.sets(st.integers(1, 99), max_size=(MAX_WAVES - 1) // 2), st.booleans(), st.integers(1, 10_000))
def test_wave_sizes_always_cover_the_selection_with_no_empty_wave(counts: set[int], shares: set[int],
                                                                  counts_first: bool, total: int) -> None:
    # Growing waves (parse_waves refuses others): counts and shares each increasing, in either order.
    parts = [[str(c) for c in sorted(counts)], [f"{p}%" for p in sorted(shares)]]
    head = parts[0] + parts[1] if counts_first else parts[1] + parts[0]
    waves = parse_waves(",".join([*head, "100%"]))

    sizes = wave_sizes(waves, total)

    assert sum(sizes) == total and all(size >= 1 for size in sizes) and len(sizes) <= len(waves)
    assert sizes[0] == min(total, _first_target(waves[0], total))


def _first_target(item: str, total: int) -> int:
    return max(1, math.ceil(total * float(item[:-1]) / 100 - 1e-9)) if item.endswith("%") else int(item)


@pytest.mark.parametrize(("text", "says"), [
    ("", "name at least one wave"),
    (" , ", "name at least one wave"),
    ("10%,5", "the last wave must be 100%"),
    ("1,10%,50%", "the last wave must be 100%"),
    ("0%,100%", "must be a share within 0%..100%"),
    ("101%", "must be a share within 0%..100%"),
    ("nan%,100%", "must be a share within 0%..100%"),
    ("0,100%", "must be at least one device"),
    ("-3,100%", "must be at least one device"),
    ("1.5,100%", "is neither a device count (5) nor a share (10%)"),
    ("ten,100%", "is neither a device count (5) nor a share (10%)"),
    (",".join(["1"] * MAX_WAVES + ["100%"]), f"at most {MAX_WAVES} waves"),
])
def test_bad_waves_are_one_line_errors_naming_the_problem(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_waves(text)
    message = one_line_error(excinfo)
    assert message.startswith("--waves") and says in message


@pytest.mark.parametrize("text", ["50%,10%,100%", "10,5,100%"])
def test_shrinking_waves_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--waves"):
        parse_waves(text)


def test_waves_are_trimmed_and_kept_as_typed() -> None:
    assert parse_waves(" 1 , 10% ,100%") == ("1", "10%", "100%")


# -- durations -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1d", 86400.0), ("250ms", 0.25), ("42", 42.0),
    ("1.5m", 90.0), (" 5 m ", 300.0), ("365d", 365 * 86400.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "--bake") == seconds


@pytest.mark.parametrize(("text", "says"), [
    ("ten minutes", "use a duration like 90s, 10m or 1h"), ("-5s", "use a duration"), ("5w", "use a duration"),
    ("", "use a duration"), ("1e3s", "use a duration"), ("366d", "at most a year"),
    ("9" * 400, "at most a year"),
])
def test_bad_durations_are_one_line_errors_naming_the_option(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_duration(text, "--bake")
    message = one_line_error(excinfo)
    assert message.startswith("--bake") and says in message


# -- limits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [
    ("5%", 0.05), ("0.05", 0.05), ("0", 0.0), ("0%", 0.0), ("150%", 1.5), (" 20% ", 0.20),
    ("off", None), ("OFF", None), ("none", None), ("no", None),
])
def test_parse_limit(text: str, value: float | None) -> None:
    got = parse_limit(text, "--max-p95-regression", 0.2)
    assert got == (None if value is None else pytest.approx(value))


def test_parse_limit_without_a_value_is_the_default() -> None:
    assert parse_limit(None, "--max-p95-regression", 0.2) == 0.2
    assert parse_limit(None, "--max-drift", None, fraction=False) is None


def test_a_plain_number_over_ten_reads_as_a_forgotten_percent_sign() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_limit("20", "--max-p95-regression", 0.2)
    assert one_line_error(excinfo) == "--max-p95-regression '20': looks like a percentage: write 20%"


def test_drift_is_a_plain_number_not_a_fraction() -> None:
    assert parse_limit("20", "--max-drift", 0.2, fraction=False) == 20.0
    assert parse_limit("0.25", "--max-drift", 0.2, fraction=False) == 0.25


@pytest.mark.parametrize(("text", "says"), [
    ("-5%", "must be a number >= 0 (or off)"), ("-0.1", "must be a number >= 0"), ("nan", "must be a number >= 0"),
    ("inf", "must be a number >= 0"), ("nan%", "must be a number >= 0"),
    ("lots", "use a percentage (20%), a fraction (0.2) or off"), ("5 %%", "use a percentage"), ("", "use a percentage"),
])
def test_bad_limits_are_one_line_errors(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_limit(text, "--max-failure-rate", 0.05)
    message = one_line_error(excinfo)
    assert message.startswith("--max-failure-rate") and says in message


@pytest.mark.parametrize(("value", "percent", "text"), [(0.05, True, "5%"), (0.2, True, "20%"), (None, True, "off"),
                                                        (0.25, False, "0.25")])
def test_describe_limit(value, percent: bool, text: str) -> None:
    assert describe_limit(value, percent) == text


# -- the stored spec -------------------------------------------------------------------------------
def test_spec_round_trips_through_json() -> None:
    spec = RolloutSpec(fleet="lab", name="det", version="2.0", kind="rollback", select={"site": "berlin"},
                       devices=("cam-01", "cam-02"), waves=("1", "50%", "100%"), bake_s=90.0,
                       activation_timeout_s=300.0, max_wait_s=45.0, lookback_s=1800.0,
                       limits=GateLimits(max_failure_rate=0.1, max_p95_regression=None, max_p99_regression=0.5,
                                         max_error_rate_rise=0.02, max_drift=None, provider_fallback=False,
                                         min_samples=50))

    again = RolloutSpec.from_dict(json.loads(json.dumps(spec.to_dict())))

    assert again == spec and isinstance(again.devices, tuple) and isinstance(again.waves, tuple)
    assert again.release == "det@2.0" and again.data_wait_s == 45.0


def test_spec_defaults_round_trip_and_unknown_keys_are_ignored() -> None:
    spec = RolloutSpec(fleet="lab", name="det", version="2.0")
    stored = {**spec.to_dict(), "added_later": 1}
    stored["limits"] = {**stored["limits"], "max_new_gate": 0.3}

    again = RolloutSpec.from_dict(stored)

    assert again == spec and again.waves == tuple(DEFAULT_WAVES.split(","))
    assert again.data_wait_s == max(60.0, 2 * spec.bake_s)


# -- stratified device order ------------------------------------------------------------------------
def record(device_id: str, hardware_class: str | None) -> DeviceRecord:
    return DeviceRecord(fleet="lab", device_id=device_id, status="online", last_seen=None, first_seen=None,
                        hardware_class=hardware_class, arch=None, target=None, agent_version=None)


def fleet_of(class_sizes: dict[str | None, int]) -> list[DeviceRecord]:
    return [record(f"{cls or 'none'}-{i:04d}", cls) for cls, n in class_sizes.items() for i in range(n)]


def assert_every_prefix_is_proportional(ordered: list[DeviceRecord]) -> None:
    sizes = Counter(d.hardware_class or NO_VALUE for d in ordered)
    total, seen = len(ordered), Counter()
    for k, d in enumerate(ordered, start=1):
        seen[d.hardware_class or NO_VALUE] += 1
        for cls, n in sizes.items():
            share = k * n / total
            assert abs(seen[cls] - share) <= 1 + 1e-9, f"after {k} devices: {cls} has {seen[cls]}, share {share:.2f}"


def test_stratified_order_reaches_every_class_in_proportion() -> None:
    devices = fleet_of({"raspberry-pi-5": 60, "jetson-orin-nano": 30, "x86": 9, None: 1})

    ordered = stratified(devices, "ro-20250101-abcdef")

    assert sorted(d.device_id for d in ordered) == sorted(d.device_id for d in devices)
    assert_every_prefix_is_proportional(ordered)
    first_ten = Counter(d.hardware_class for d in ordered[:10])
    assert first_ten["raspberry-pi-5"] == 6 and first_ten["jetson-orin-nano"] == 3


@FUZZ
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.text(max_size=12))
def test_every_prefix_of_a_stratified_order_holds_each_class_within_one_of_its_share(sizes: list[int],
                                                                                     seed: str) -> None:
    devices = fleet_of({f"class-{i}": n for i, n in enumerate(sizes)})

    ordered = stratified(devices, seed)

    assert len(ordered) == len(devices) and len({d.device_id for d in ordered}) == len(devices)
    assert_every_prefix_is_proportional(ordered)


def test_stratified_order_is_fixed_by_the_seed_whatever_the_input_order() -> None:
    devices = fleet_of({"a": 20, "b": 13, "c": 4})
    shuffled = devices[:]
    random.Random(3).shuffle(shuffled)

    first = [d.device_id for d in stratified(devices, "ro-1")]
    again = [d.device_id for d in stratified(shuffled, "ro-1")]
    other = [d.device_id for d in stratified(devices, "ro-2")]

    assert first == again
    assert other != first and sorted(other) == sorted(first)
    assert [d.split("-")[0] for d in other] == [d.split("-")[0] for d in first]  # same class pattern, other devices
