"""`edgesdk telemetry report --html` opened in a real headless Chromium with the network cut off:
the page renders every plot (plotly's SVG in the DOM), throws no JavaScript error, draws real
pixels, and shows device-sent text as text.

JavaScript errors are caught by a probe injected into the test's own copy of the page: it turns
uncaught errors, rejected promises, console.error and alert() into console lines that Chromium
prints with ``--enable-logging=stderr`` (it prints every console message there, at one level).
Two negative controls prove the probe sees an error: a page that throws, and the report with its
inline plotly.js swapped for a CDN link (which cannot load here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgesdk.fleet.report_html import histogram_bins
from edgesdk.fleet.store import FleetStore
from edgesdk.protocol.histogram import LatencyHistogram
from edgesdk.protocol.messages import InstallEvent, InstallEventKind
from tests.edgesdk.fleet.test_report import FLEET, PKG, RPI, SLOW, Fleet, build_fleet, cli

PLOTS = ("latency-over-time", "device-p95", "old-vs-new", "install-events")
ERROR_MARK = "EDGESDK-JS-ERROR"
CHROMIUM_TIMEOUT_S = 90
PROBE = f"""<script>
window.addEventListener('error', function (e) {{ console.log('{ERROR_MARK} ' + e.message); }});
window.addEventListener('unhandledrejection', function (e) {{ console.log('{ERROR_MARK} rejected ' + e.reason); }});
(function () {{
  var original = console.error;
  console.error = function () {{ console.log('{ERROR_MARK} console.error ' + Array.prototype.join.call(arguments, ' '));
                                 return original.apply(console, arguments); }};
}})();
window.alert = function (m) {{ console.log('{ERROR_MARK} alert ' + m); }};
</script>"""
HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium): the HTML report is untested",
                        pytrace=False)
        pytest.skip("chromium is not installed: the HTML report is checked in a real browser only where it is")
    return path


def run_chromium(page: Path, tmp_path: Path, *action: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``page`` with no network at all (every host name fails to resolve)."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    args = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--no-first-run", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={profile}", "--virtual-time-budget=10000", *action, page.as_uri()]
    result = subprocess.run(args, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def js_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and (ERROR_MARK in line or "Uncaught" in line)]


def probed_copy(page: Path, folder: Path, text: str | None = None) -> Path:
    """The page with the error probe first in <head> (so it sees every later script)."""
    html = page.read_text(encoding="utf-8") if text is None else text
    copy = folder / f"probed-{page.name}"
    copy.write_text(html.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    return copy


def dump_dom(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    result = run_chromium(probed_copy(page, tmp_path), tmp_path, "--dump-dom")
    return result.stdout, js_errors(result.stderr)


def plot_divs(dom: str) -> dict[str, str]:
    """Plot div id -> the DOM between it and the next plot (what plotly drew into it)."""
    starts = sorted((dom.find(f'id="{p}"'), p) for p in PLOTS if f'id="{p}"' in dom)
    return {p: dom[at:(starts[i + 1][0] if i + 1 < len(starts) else len(dom))] for i, (at, p) in enumerate(starts)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return build_fleet(tmp_path_factory.mktemp("fleet-html") / "fleet.db")


def write_report(store: Path, out: Path, *args: str) -> Path:
    result = cli(["telemetry", "report", "--fleet", FLEET, "--store", str(store), "--since", "1d",
                  "--html", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


# -- in the browser ------------------------------------------------------------------------------------
def test_report_page_renders_every_plot_without_a_javascript_error(fleet: Fleet, tmp_path: Path) -> None:
    page = write_report(fleet.path, tmp_path / "report.html")

    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", html)  # nothing fetched: plotly is inline
    dom, errors = dump_dom(page, tmp_path)

    assert errors == []
    drawn = plot_divs(dom)
    assert set(drawn) == set(PLOTS)
    for plot, part in drawn.items():
        assert 'class="main-svg"' in part, f"plot {plot} was not drawn"
    assert SLOW in drawn["device-p95"] and "outlier" in drawn["device-p95"]
    assert "det@1.0" in drawn["old-vs-new"] and "det@2.0" in drawn["old-vs-new"]
    assert "failed" in drawn["install-events"]


def test_report_page_screenshot_has_the_plots_pixels(fleet: Fleet, tmp_path: Path) -> None:
    page = write_report(fleet.path, tmp_path / "report.html")
    shot = tmp_path / "report.png"

    run_chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1400,3600", "--hide-scrollbars")

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (3600, 1400)
    not_white = (pixels < 235).any(axis=2)
    assert not_white.mean() > 0.02, "the page is blank"
    # The outlier ring is drawn in #c0392b and the new release's histogram in #2980b9: both on screen.
    for rgb in ((0xC0, 0x39, 0x2B), (0x29, 0x80, 0xB9)):
        close = (np.abs(pixels - np.array(rgb)) <= 12).all(axis=2)
        assert close.sum() > 30, f"no pixels of colour {rgb}"


def test_device_sent_text_is_shown_as_text_in_the_page(fleet: Fleet, tmp_path: Path) -> None:
    store_path = tmp_path / "hostile.db"
    shutil.copy(fleet.path, store_path)
    with FleetStore.open(store_path) as store:
        store.add_events([(FLEET, "cam-02", InstallEvent(kind=InstallEventKind.FAILED, package_id=PKG[("2.0", RPI)],
                                                         at=fleet.anchor - 900, model="det", reason=HOSTILE))])
    page = write_report(store_path, tmp_path / "hostile.html")

    html = page.read_text(encoding="utf-8")
    assert HOSTILE not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    dom, errors = dump_dom(page, tmp_path)
    assert errors == []  # no alert() ran, from the table or the plot's hover text


# -- the probe itself can fail --------------------------------------------------------------------------
def test_probe_reports_an_uncaught_error(tmp_path: Path) -> None:
    page = tmp_path / "throws.html"
    page.write_text("<!DOCTYPE html><html><head></head><body><script>null.boom();</script></body></html>")
    _, errors = dump_dom(page, tmp_path)
    assert errors and any("null" in e for e in errors)


def test_probe_reports_a_page_whose_plotly_would_come_from_a_cdn(fleet: Fleet, tmp_path: Path) -> None:
    page = write_report(fleet.path, tmp_path / "report.html")
    html = page.read_text(encoding="utf-8")
    start = html.index('<script type="text/javascript">')
    end = html.index("</script>", start) + len("</script>")
    cdn = tmp_path / "cdn.html"
    cdn.write_text(html[:start] + '<script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script>' + html[end:],
                   encoding="utf-8")

    dom, errors = dump_dom(cdn, tmp_path)
    assert any("Plotly is not defined" in e for e in errors)
    assert all('class="main-svg"' not in part for part in plot_divs(dom).values())


# -- without a browser ----------------------------------------------------------------------------------
def test_an_empty_range_writes_a_page_that_says_so(fleet: Fleet, tmp_path: Path) -> None:
    page = write_report(fleet.path, tmp_path / "empty.html", "--since", "2001-01-01", "--until", "2001-01-02")
    html = page.read_text(encoding="utf-8")
    assert html.count("no data in this time range") == len(PLOTS)
    assert "no telemetry in this time range" in html


def test_html_to_a_folder_fails_in_one_line(fleet: Fleet, tmp_path: Path) -> None:
    result = cli(["telemetry", "report", "--store", str(fleet.path), "--html", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


def test_histogram_bins_share_sums_to_one_and_edges_grow() -> None:
    hist = LatencyHistogram()
    hist.record_many([1.0, 1.01, 2.0, 5.0, 5.0, 80.0, 0.0001])
    x, y = histogram_bins(hist)
    assert sum(y) == pytest.approx(1.0) and y[-1] == 0.0
    assert all(a < b for a, b in zip(x, x[1:]))
    assert histogram_bins(LatencyHistogram()) == ([], [])



def test_rollouts_are_marked_on_the_latency_plot(tmp_path: Path) -> None:
    """A halted rollout in the store: its wave sent and its halt are markers on the latency plot,
    drawn in the browser with no JavaScript error; its outcome (device-sent reasons can be in it)
    is escaped."""
    from edgesdk.fleet import rollouts as R
    from edgesdk.fleet.rollout_spec import RolloutSpec

    fleet = build_fleet(tmp_path / "fleet.db")
    with FleetStore.open(fleet.path) as store:
        spec = RolloutSpec(fleet=FLEET, name="det", version="2.0", waves=("1", "100%"))
        R.create_rollout(store, spec, [("cam-01", RPI, RPI, PKG[("2.0", RPI)]), ("cam-02", RPI, RPI, PKG[("2.0", RPI)])],
                         [1, 1], rollout_id="ro-html-1", now=fleet.anchor - 900)
        assert R.acquire_lease(store, "ro-html-1", "test", 60, fleet.anchor - 900)
        writer = R.RolloutWriter(store, "ro-html-1", "test")
        writer.write(wave=(0, {"sent_at": fleet.anchor - 890}), now=fleet.anchor - 890)
        writer.write(rollout={"state": R.HALTED, "phase": R.DONE, "finished_at": fleet.anchor - 600,
                              "outcome": f"wave 1: p95-regression: {HOSTILE}"}, now=fleet.anchor - 600)
    page = write_report(fleet.path, tmp_path / "report.html")

    html = page.read_text(encoding="utf-8")
    assert "ro-html-1 det@2.0: wave 1 of 2 sent (1 devices)" in html and "<script>alert(2)" not in html
    dom, errors = dump_dom(page, tmp_path)
    assert errors == []
    latency = plot_divs(dom)["latency-over-time"]
    assert "rollout: wave" in latency and "rollout: halted" in latency
