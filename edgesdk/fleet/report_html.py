"""`edgesdk telemetry report --html FILE`: the report as one self-contained HTML page.

Everything is inside the file: plotly.js inline (about 4.7 MB), each plot's data as JSON, the
tables as HTML. The page loads nothing from the network, so it opens from an air-gapped laptop,
a mail attachment or a CI artifact. The plots:

    latency over time   p50 (dotted) and p95 (solid) per release, per time step
    per-device p95      each device's p95 per release, its peers' p95, outliers ringed in red
    old vs new          per model, the merged latency histograms of its two latest releases
                        (share of calls per bin, log-ms axis, bins of 10 store buckets ≈ 10%)
    install events      each event on the time axis, one row per device, a marker per kind

Device-sent text (reasons, labels, versions) is escaped wherever it lands: in the tables with
`html.escape`, in plot labels too (plotly renders a few HTML tags in text).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgesdk.errors import ConfigError, map_os_errors
from edgesdk.fleet.records import NO_VALUE
from edgesdk.fleet.report import (DeviceLatency, PlotData, Report, ReleaseHistogram, fmt_ago, fmt_count, fmt_ms,
                                  fmt_rate,
                                  fmt_ratio, fmt_time, is_outlier)
from edgesdk.protocol.histogram import OVERFLOW, bucket_range

if TYPE_CHECKING:
    import plotly.graph_objects as go

BIN_BUCKETS = 10  # store buckets (1% wide) per histogram bin in the overlay: ~10.5% wide bins
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
# What the install-event timeline draws per kind (plotly marker symbols, colors); others: grey dots.
EVENT_STYLE = {
    "downloaded": ("circle-open", "#7f8c8d"), "verified": ("circle-open", "#7f8c8d"),
    "extracted": ("circle-open", "#7f8c8d"), "selected": ("diamond", "#2980b9"),
    "health_checked": ("diamond-open", "#2980b9"), "activated": ("circle", "#27ae60"),
    "failed": ("x", "#c0392b"), "rolled_back": ("triangle-down", "#e67e22"), "refused": ("square-x", "#8e44ad"),
    "undeployed": ("circle-x", "#34495e"),
}
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.9em; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #555; } .bad { color: #c0392b; font-weight: 600; } .empty { color: #777; font-style: italic; }
.plot { margin: 8px 0 24px; }
"""


def write_html(report: Report, path: Path) -> None:
    """Write the page atomically (a reader never sees half a file)."""
    from edgesdk.atomicfile import write_text_atomic

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--html {path}: is a folder; name the file to write")
    page = render_html(report)
    with map_os_errors(f"write {path}"):
        write_text_atomic(path, page)


def render_html(report: Report) -> str:
    """The whole page as text."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ConfigError("--html needs plotly: pip install \"edgesdk[fleet]\"") from None
    title = f"edgesdk telemetry report — {report.fleet or 'all fleets'}"
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(title)}</title><style>{CSS}</style>",
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>", "</head><body>",
        f"<h1>{_e(title)}</h1>", _summary(report),
    ]
    parts += _section("Latency by " + report.by, _groups_table(report))
    parts += _section("Outliers", _outliers_table(report))
    parts += _section("Devices not online", _offline_table(report))
    parts += _section("Install failures", _failures_table(report))
    if report.plots is not None:
        for figure_id, heading, figure in _figures(report, report.plots):
            parts += _section(heading, _plot(figure, figure_id) if figure is not None else
                              "<p class=\"empty\">no data in this time range</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -- tables ---------------------------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape(NO_VALUE if value is None else str(value), quote=True)


def _section(heading: str, body: str) -> list[str]:
    return [f"<h2>{_e(heading)}</h2>", body]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int] = frozenset(),
           empty: str = "none") -> str:
    if not rows:
        return f"<p class=\"empty\">{_e(empty)}</p>"
    cls = lambda i: " class=\"num\"" if i in numeric else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(r: Report) -> str:
    select = ", ".join(f"{k}={v}" for k, v in sorted(r.select.items())) or "all devices"
    return (f"<p class=\"meta\">{_e(fmt_time(r.since))} → {_e(fmt_time(r.until))} · grouped by {_e(r.by)} · "
            f"{_e(select)} · outlier: p95 &gt; {r.factor:g}× its peers, ≥ {r.min_calls} calls each side · "
            f"generated {_e(fmt_time(r.generated_at))}</p>")


def _groups_table(r: Report) -> str:
    rows = [[g.key, fmt_count(g.count), fmt_rate(g.error_rate), fmt_ms(g.p50_ms), fmt_ms(g.p95_ms),
             fmt_ms(g.p99_ms), fmt_count(g.devices), fmt_count(g.windows)] for g in r.groups]
    return _table([r.by, "calls", "errors", "p50 ms", "p95 ms", "p99 ms", "devices", "windows"], rows,
                  set(range(1, 8)), "no telemetry in this time range")


def _outliers_table(r: Report) -> str:
    rows = [[d.device_id, d.release, d.hardware_class, fmt_ms(d.p95_ms), fmt_ms(d.peers_p95_ms), fmt_ratio(d.ratio),
             fmt_count(d.count), str(d.peers)] for d in r.outliers]
    return _table(["device", "release", "hardware", "p95 ms", "peers' p95 ms", "ratio", "calls", "peers"], rows,
                  {3, 4, 5, 6, 7}, "no device is an outlier")


def _offline_table(r: Report) -> str:
    rows = [[d.device_id, d.fleet, d.status, fmt_time(d.last_seen), fmt_ago(d.last_seen, r.generated_at),
             d.hardware_class, ", ".join(f"{k}={v}" for k, v in sorted(d.labels.items())) or NO_VALUE]
            for d in (*r.offline, *r.unknown)]
    return _table(["device", "fleet", "status", "last seen", "", "hardware", "labels"], rows,
                  empty="every device is online")


def _failures_table(r: Report) -> str:
    rows = [[fmt_time(e.at), e.device_id, e.kind, e.release or e.model, e.reason] for e in reversed(r.install_failures)]
    return _table(["at", "device", "kind", "release", "reason"], rows, empty="no install failures")


# -- plots ----------------------------------------------------------------------------------------------
def _plot(figure: go.Figure, figure_id: str) -> str:
    figure.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=30, b=50), height=420,
                         legend=dict(orientation="h", y=-0.18))
    return ("<div class=\"plot\">" + figure.to_html(include_plotlyjs=False, full_html=False, div_id=figure_id,
                                                    config=PLOT_CONFIG) + "</div>")


def _figures(r: Report, plots: PlotData) -> list[tuple[str, str, Any]]:
    """(div id, heading, figure or None when there is nothing to draw), in page order."""
    return [
        ("latency-over-time", f"Latency over time per release (p50 dotted, p95 solid; {plots.series_step_s // 60} "
         "min steps; rollouts marked)", latency_over_time(plots.series, plots.series_step_s, plots.rollout_marks)),
        ("device-p95", "p95 per device and release (outliers ringed)", device_p95(r.device_latency, r.factor,
                                                                                  r.min_calls)),
        ("old-vs-new", "Old vs new release: latency histograms", old_vs_new(plots.compared)),
        ("install-events", "Install events", install_events(plots.timeline)),
    ]


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def latency_over_time(series: dict[str, list[tuple[float, Any]]], step_s: float,  # noqa: ANN201 - Figure or None
                      marks: Sequence[Any] = ()):
    """p50 and p95 lines per release; a line breaks where a release has no telemetry for a step.
    Rollout moments (`report.RolloutMark`) are markers along the time axis: waves sent, halts, ends."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    points = {k: [(t, s) for t, s in v if s.p95_ms is not None] for k, v in series.items()}
    points = {k: v for k, v in points.items() if v}
    if not points:
        return None
    fig = go.Figure()
    for i, (release, rows) in enumerate(sorted(points.items())):
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        x: list[str | None] = []
        p95: list[float | None] = []
        p50: list[float | None] = []
        extra: list[list[int] | None] = []
        for j, (t, s) in enumerate(rows):
            if j and t - rows[j - 1][0] > step_s:  # a gap: no point between, so the line stops
                x.append(_utc(rows[j - 1][0] + step_s))
                p95.append(None)
                p50.append(None)
                extra.append(None)
            x.append(_utc(t))
            p95.append(s.p95_ms)
            p50.append(s.p50_ms)
            extra.append([s.count, s.devices])
        name = _e(release)
        fig.add_trace(go.Scatter(x=x, y=p95, mode="lines+markers", name=f"{name} p95", legendgroup=name,
                                 line=dict(color=color), customdata=extra, connectgaps=False,
                                 hovertemplate=f"{name}<br>%{{x}} UTC<br>p95 %{{y:.3g}} ms<br>%{{customdata[0]}} "
                                 "calls, %{customdata[1]} devices<extra></extra>"))
        fig.add_trace(go.Scatter(x=x, y=p50, mode="lines", name=f"{name} p50", legendgroup=name, connectgaps=False,
                                 line=dict(color=color, dash="dot"),
                                 hovertemplate=f"{name}<br>%{{x}} UTC<br>p50 %{{y:.3g}} ms<extra></extra>"))
    for kind, (symbol, color) in ROLLOUT_MARKERS.items():
        chosen = [m for m in marks if m.kind == kind]
        if chosen:
            fig.add_trace(go.Scatter(
                x=[_utc(m.at) for m in chosen], y=[0] * len(chosen), mode="markers", name=f"rollout: {kind}",
                marker=dict(symbol=symbol, size=14, color=color), text=[_e(_clip(m.text, 300)) for m in chosen],
                hovertemplate="%{x} UTC<br>%{text}<extra></extra>"))
    fig.update_yaxes(title_text="latency (ms)", rangemode="tozero")
    fig.update_xaxes(title_text="time (UTC)")
    return fig


# Rollout moments on the latency plot: (plotly marker symbol, color) per kind.
ROLLOUT_MARKERS = {"wave": ("triangle-up", "#1f77b4"), "completed": ("star", "#2ca02c"), "halted": ("x", "#d62728")}


def device_p95(rows: Sequence[DeviceLatency], factor: float, min_calls: int):  # noqa: ANN201
    """Per device, its p95 for each release it ran (a dot) and its peers' p95 (a dash, same color)."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    rows = [d for d in rows if d.p95_ms is not None]
    if not rows:
        return None
    multi_fleet = len({d.fleet for d in rows}) > 1
    label = (lambda d: f"{d.fleet}/{d.device_id}") if multi_fleet else (lambda d: d.device_id)
    fig = go.Figure()
    for i, release in enumerate(sorted({d.release for d in rows})):
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        mine = [d for d in rows if d.release == release]
        name = _e(release)
        fig.add_trace(go.Scatter(
            x=[label(d) for d in mine], y=[d.p95_ms for d in mine], mode="markers", name=name, legendgroup=name,
            marker=dict(size=10, color=color),
            customdata=[[_e(d.hardware_class), fmt_ms(d.peers_p95_ms), fmt_ratio(d.ratio), d.count] for d in mine],
            hovertemplate=f"%{{x}} · {name}<br>p95 %{{y:.3g}} ms<br>peers on %{{customdata[0]}}: "
            "%{customdata[1]} ms (%{customdata[2]})<br>%{customdata[3]} calls<extra></extra>"))
        with_peers = [d for d in mine if d.peers_p95_ms is not None]
        if with_peers:
            fig.add_trace(go.Scatter(
                x=[label(d) for d in with_peers], y=[d.peers_p95_ms for d in with_peers], mode="markers",
                name=f"{name}: peers' p95", legendgroup=name,
                marker=dict(symbol="line-ew-open", size=20, color=color, line=dict(width=2, color=color)),
                hovertemplate=f"%{{x}}: its peers on {name}, p95 %{{y:.3g}} ms<extra></extra>"))
    outliers = [d for d in rows if is_outlier(d, factor, min_calls)]
    if outliers:
        fig.add_trace(go.Scatter(x=[label(d) for d in outliers], y=[d.p95_ms for d in outliers],
                                 mode="markers+text", name=f"outlier (> {factor:g}× peers)",
                                 text=[fmt_ratio(d.ratio) for d in outliers], textposition="top center",
                                 marker=dict(symbol="circle-open", size=22, color="#c0392b", line=dict(width=3)),
                                 hovertemplate="%{x}: outlier, %{text} its peers<extra></extra>"))
    fig.update_yaxes(title_text="p95 latency (ms)", rangemode="tozero")
    fig.update_xaxes(title_text="device", type="category")
    return fig


def histogram_bins(hist) -> tuple[list[float], list[float]]:  # noqa: ANN001 - a LatencyHistogram
    """(bin low edges in ms, share of calls per bin) with `BIN_BUCKETS` store buckets per bin, every
    bin from the first to the last non-empty one, then the last bin's high edge at 0 (so a step line
    closes). The underflow and overflow buckets each stay one bin."""
    if not hist.count:
        return [], []
    shares: dict[int, int] = {}
    for index, n in hist.counts.items():
        b = -1 if index == 0 else (10**6 if index == OVERFLOW else (index - 1) // BIN_BUCKETS)
        shares[b] = shares.get(b, 0) + n
    inner = [b for b in shares if 0 <= b < 10**6]
    bins = sorted(set(shares) | (set(range(min(inner), max(inner) + 1)) if inner else set()))

    def low(b: int) -> float:
        if b == -1:
            return 0.0
        if b == 10**6:
            return bucket_range(OVERFLOW)[0]
        return bucket_range(b * BIN_BUCKETS + 1)[0]

    def high(b: int) -> float:
        if b == -1:
            return bucket_range(0)[1]
        if b == 10**6:
            return bucket_range(OVERFLOW)[0] * 1.1
        return bucket_range(min(OVERFLOW - 1, b * BIN_BUCKETS + BIN_BUCKETS))[1]

    x = [max(low(b), bucket_range(0)[1] / 2) for b in bins] + [high(bins[-1])]  # a log axis has no 0
    y = [shares.get(b, 0) / hist.count for b in bins] + [0.0]
    return x, y


def old_vs_new(compared: dict[str, tuple[ReleaseHistogram, ...]]):  # noqa: ANN201
    import plotly.graph_objects as go

    if not compared:
        return None
    fig = go.Figure()
    colors = ("#7f8c8d", "#2980b9")  # old grey, new blue
    for name, pair in compared.items():
        for i, rh in enumerate(pair):
            x, y = histogram_bins(rh.histogram)
            role = "new" if i == len(pair) - 1 and len(pair) > 1 else ("old" if len(pair) > 1 else "only")
            p95 = rh.histogram.percentile(95)
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines", line_shape="hv", fill="tozeroy", opacity=0.6,
                line=dict(color=colors[i if len(pair) > 1 else 1], width=2),
                name=f"{_e(rh.release)} ({role}, {fmt_count(rh.histogram.count)} calls, p95 {fmt_ms(p95)} ms)",
                hovertemplate=f"{_e(rh.release)}<br>from %{{x:.3g}} ms: %{{y:.1%}} of calls<extra></extra>"))
    fig.update_xaxes(type="log", title_text="latency (ms, log scale)")
    fig.update_yaxes(title_text="share of calls", tickformat=".0%", rangemode="tozero")
    return fig


def install_events(events) -> Any:  # noqa: ANN001 - EventRecords
    import plotly.graph_objects as go

    if not events:
        return None
    fig = go.Figure()
    by_kind: dict[str, list] = {}
    for e in events:
        by_kind.setdefault(e.kind, []).append(e)
    multi_fleet = len({e.fleet for e in events}) > 1
    for kind, items in sorted(by_kind.items()):
        symbol, color = EVENT_STYLE.get(kind, ("circle", "#95a5a6"))
        fig.add_trace(go.Scatter(
            x=[_utc(e.at) for e in items],
            y=[f"{e.fleet}/{e.device_id}" if multi_fleet else e.device_id for e in items],
            mode="markers", name=_e(kind), marker=dict(symbol=symbol, color=color, size=12, line=dict(width=2)),
            customdata=[[_e(e.release or e.model), _e(_clip(e.reason))] for e in items],
            hovertemplate=f"%{{y}} {_e(kind)}<br>%{{x}} UTC<br>%{{customdata[0]}}<br>%{{customdata[1]}}"
            "<extra></extra>"))
    fig.update_xaxes(title_text="time (UTC)")
    fig.update_yaxes(title_text="device", type="category")
    return fig


def _clip(text: str | None, limit: int = 200) -> str:
    if not text:
        return ""
    return text if len(text) <= limit else text[:limit] + "…"
