"""The behaviour file: what each release does on each hardware class, and one-line errors for bad files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgesdk.errors import ConfigError
from edgesdk.sim import DEFAULT_BEHAVIOUR, load_behaviour, parse_behaviour
from edgesdk.sim.behaviour import Z95, spread

FILE = {
    "hardware": {"classes": {"jetson-orin-nano": 0.5, "jetson-orin-nx": 0.5}},
    "default": {"p50_ms": 8, "error_rate": 0.01, "by_hardware": {"jetson-orin-nano": {"p50_ms": 16}}},
    "releases": {
        "det": {"provider": "TensorrtExecutionProvider"},
        "det@2.0": {"p50_ms": 12, "p95_ms": 24, "output_drift": 0.5,
                    "by_hardware": {"jetson-orin-nano": {"p50_ms": 30, "sigma": 0.1}}},
    },
}


def test_without_a_file_every_release_runs_at_10_ms_with_a_tenth_of_a_percent_errors() -> None:
    b = DEFAULT_BEHAVIOUR.for_release("anything", "1.0", "some-board")
    assert (b.p50_ms, b.sigma, b.error_rate, b.calls_per_window) == (10.0, 0.25, 0.001, 600.0)


def test_entries_inherit_from_default_then_name_then_release_then_hardware_class() -> None:
    behaviour = parse_behaviour(FILE)
    other = behaviour.for_release("ocr", "1.0", "jetson-orin-nx")
    assert (other.p50_ms, other.error_rate, other.provider) == (8.0, 0.01, "CPUExecutionProvider")
    assert behaviour.for_release("ocr", "1.0", "jetson-orin-nano").p50_ms == 16.0  # default.by_hardware
    v1 = behaviour.for_release("det", "1.0", "jetson-orin-nx")
    assert (v1.p50_ms, v1.provider) == (8.0, "TensorrtExecutionProvider")  # the name's entry
    v2 = behaviour.for_release("det", "2.0", "jetson-orin-nx")
    assert v2.p50_ms == 12.0 and math.isclose(v2.sigma, math.log(2) / Z95) and v2.output_drift == 0.5
    nano = behaviour.for_release("det", "2.0", "jetson-orin-nano")
    assert (nano.p50_ms, nano.sigma, nano.error_rate) == (30.0, 0.1, 0.01)  # sigma there replaces p95


def test_latency_noise_is_off_by_default_and_inherited_like_the_other_numbers() -> None:
    assert (DEFAULT_BEHAVIOUR.for_release("m", "1", None).jitter,
            DEFAULT_BEHAVIOUR.for_release("m", "1", None).device_spread) == (0.0, 0.0)
    behaviour = parse_behaviour({
        "default": {"jitter": 0.15, "by_hardware": {"nano": {"device_spread": 0.1}}},
        "releases": {"det@2.0": {"jitter": 0.3, "by_hardware": {"nano": {"device_spread": 0}}}},
    })
    noise = {(name, version, cls): (b.jitter, b.device_spread)
             for name, version in (("ocr", "1"), ("det", "2.0")) for cls in (None, "nano")
             for b in [behaviour.for_release(name, version, cls)]}
    assert noise == {("ocr", "1", None): (0.15, 0.0), ("ocr", "1", "nano"): (0.15, 0.1),
                     ("det", "2.0", None): (0.3, 0.0), ("det", "2.0", "nano"): (0.3, 0.0)}


def test_p95_gives_the_lognormal_whose_95th_percentile_it_is() -> None:
    b = parse_behaviour({"default": {"p50_ms": 10, "p95_ms": 20}}).for_release("m", "1", None)
    samples = np.random.default_rng(1).lognormal(b.mu, b.sigma, 200_000)
    assert np.percentile(samples, 50) == pytest.approx(10, rel=0.02)
    assert np.percentile(samples, 95) == pytest.approx(20, rel=0.02)


@pytest.mark.parametrize("data, message", [
    ([1, 2], "expected a mapping"),
    ({"defaults": {}}, "defaults: unknown key"),
    ({"default": {"p50": 3}}, "default.p50: unknown key"),
    ({"default": {"p50_ms": 0}}, "default.p50_ms: expected a number > 0"),
    ({"default": {"p50_ms": "fast"}}, "default.p50_ms: expected a number"),
    ({"default": {"error_rate": 1.5}}, "default.error_rate: expected a number >= 0"),
    ({"default": {"sigma": True}}, "default.sigma: expected a number"),
    ({"default": {"sigma": 0.2, "p95_ms": 20}}, "default: give sigma or p95_ms, not both"),
    ({"default": {"p50_ms": 10, "p95_ms": 5}}, "default: p95_ms 5 must be above p50_ms 10"),
    ({"releases": {"det@2.0": {"p95_ms": 5}}}, "releases.det@2.0: p95_ms 5 must be above p50_ms 10"),
    ({"releases": {"my model@1": {}}}, "releases.my model@1: expected NAME or NAME@VERSION"),
    ({"releases": {"det@": {}}}, "releases.det@: expected NAME or NAME@VERSION"),
    ({"releases": {"det": {"by_hardware": {"nano": {"by_hardware": {}}}}}},
     "releases.det.by_hardware.nano.by_hardware: unknown key"),
    ({"releases": {"det": {"provider": ""}}}, "releases.det.provider: expected 1-128 printable characters"),
    ({"releases": {"det": {"outputs": {"logits": {"std": -1}}}}},
     "releases.det.outputs.logits.std: expected a number >= 0"),
    ({"hardware": {"classes": {"nano": -1}}}, "hardware.classes.nano: expected a weight >= 0"),
    ({"hardware": {"classes": {"nano": 0}}}, "hardware.classes: the weights add up to 0"),
    ({"hardware": {"kinds": {}}}, "hardware.kinds: unknown key"),
    ({"labels": {"site": ["berlin"]}}, "labels.site: expected a mapping"),
    ({"labels": {"bad/key": {"x": 1}}}, "labels.bad/key: a label key must be"),
    ({"default": {"jitter": 0.95}}, "default.jitter: expected a number >= 0 and <= 0.9, got 0.95"),
    ({"default": {"jitter": -0.1}}, "default.jitter: expected a number >= 0 and <= 0.9, got -0.1"),
    ({"default": {"by_hardware": {"nano": {"jitter": "15%"}}}},
     "default.by_hardware.nano.jitter: expected a number >= 0 and <= 0.9, got '15%'"),
    ({"releases": {"det": {"device_spread": 1}}}, "releases.det.device_spread: expected a number >= 0 and <= 0.9"),
    ({"releases": {"det@2": {"device_spread": float("nan")}}}, "releases.det@2.device_spread: expected a number"),
])
def test_bad_behaviour_files_fail_in_one_line_naming_the_key(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_behaviour(data, "b.yaml")
    text = str(err.value)
    assert text.startswith("b.yaml: ") and message in text and "\n" not in text


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("default:\n  p50_ms: [1,\n")
    with pytest.raises(ConfigError, match=r"b.yaml: broken YAML \(line"):
        load_behaviour(path)


def test_an_empty_file_is_the_default_behaviour(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("")
    assert load_behaviour(path).for_release("m", "1", None) == DEFAULT_BEHAVIOUR.for_release("m", "1", None)


def test_devices_are_spread_over_classes_in_the_file_proportions_and_shuffled() -> None:
    names = spread({"nano": 0.5, "nx": 0.25, "agx": 0.25}, 1001, np.random.default_rng(0))
    assert len(names) == 1001
    assert sorted({n: names.count(n) for n in set(names)}.items()) == [("agx", 250), ("nano", 501), ("nx", 250)]
    assert names[:500].count("nano") < 400  # not all the first devices of one class
