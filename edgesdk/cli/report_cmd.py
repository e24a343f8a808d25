"""`edgesdk telemetry report`: merged latency and errors per group over a time range, outliers,
devices not online and install failures, from the fleet store; as a table, JSON, CSV and a
self-contained HTML page (`edgesdk.fleet.report`, `edgesdk.fleet.report_html`).

The `telemetry` sub-app lives in fleet_cmd (with `telemetry watch`); `register` adds `report` to it.
"""

from __future__ import annotations

import enum
import sys
import time
from pathlib import Path

import typer

from edgesdk.cli.common import console, handle_errors, out, print_json
from edgesdk.cli.devices_cmd import open_store, store_option
from edgesdk.errors import ConfigError
from edgesdk.fleet.report import DEFAULT_FACTOR, DEFAULT_MIN_CALLS, DEFAULT_SINCE


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"


@handle_errors
def report(
    fleet: str = typer.Option(None, "--fleet", help="Only this fleet (default: every fleet)."),
    since: str = typer.Option(DEFAULT_SINCE, "--since", help="Start: a duration back from now (30m, 1h, 2d, 1w) or "
                              "an ISO date/time (2024-05-01, 2024-05-01T12:00; UTC unless it has an offset)."),
    until: str = typer.Option(None, "--until", help="End, as --since (default: now)."),
    by: str = typer.Option("release", "--by", help="Group by release, device, target, provider, model, hardware "
                           "or label:KEY."),
    select: list[str] = typer.Option([], "--select", help="key=value: only devices with this label (repeatable)."),
    fmt: Format = typer.Option(Format.table, "--format", help="table (terminal), json or csv (the groups)."),
    html: Path = typer.Option(None, "--html", help="Also write a self-contained HTML page with plots to this file."),
    outlier_factor: float = typer.Option(DEFAULT_FACTOR, "--outlier-factor", help="A device is an outlier when its "
                                         "p95 is above this many times its peers' (same release and hardware)."),
    min_calls: int = typer.Option(DEFAULT_MIN_CALLS, "--min-calls", min=1, help="Calls a device and its peers each "
                                  "need before it can be called an outlier."),
    store: str = store_option(),
) -> None:
    """Latency and errors per release, device, label... over a time range, with outliers.

    p50/p95/p99 come from the merged histograms of the group's telemetry windows: exact for the
    whole group, never an average of per-device percentiles. Then the outliers (a device's p95
    against its peers on the same release and hardware), the devices not online now, and the
    install failures in the range. --html writes a self-contained page with plots.
    """
    from edgesdk.fleet.report import build_report, parse_select, parse_when
    from edgesdk.fleet.store_queries import check_group_by
    from edgesdk.errors import FleetError

    now = time.time()
    start = parse_when(since, now, "--since")
    end = now if until is None else parse_when(until, now, "--until")
    try:
        check_group_by(by)
    except FleetError as exc:
        raise ConfigError(f"--by: {exc}") from None
    wanted = parse_select(select)
    if html is not None and html.is_dir():
        raise ConfigError(f"--html {html}: is a folder; name the file to write")
    with open_store(store) as fleet_store:
        result = build_report(fleet_store, fleet=fleet, since=start, until=end, by=by, select=wanted,
                              factor=outlier_factor, min_calls=min_calls, plots=html is not None, now=now)
    if html is not None:
        from edgesdk.fleet.report_html import write_html

        write_html(result, html)
        console.print(f"wrote {html}", markup=False)
    if fmt is Format.json:
        print_json(result.to_json())
    elif fmt is Format.csv:
        sys.stdout.write(result.to_csv())
        sys.stdout.flush()
    else:
        print_tables(result)


def print_tables(r) -> None:  # noqa: ANN001 - a Report
    from rich.table import Table
    from rich.text import Text

    from edgesdk.cli.devices_cmd import cell_text
    from edgesdk.fleet.report import fmt_ago, fmt_count, fmt_ms, fmt_rate, fmt_ratio, fmt_time

    select = " ".join(f"{k}={v}" for k, v in sorted(r.select.items()))
    out.print(Text(f"{r.fleet or 'all fleets'} · {fmt_time(r.since)} → {fmt_time(r.until)} · by {r.by}"
                   f"{' · ' + select if select else ''}", style="bold"))

    def table(*columns: str, numeric: int = 0) -> Table:
        t = Table(box=None, pad_edge=False, header_style="bold")
        for i, c in enumerate(columns):
            t.add_column(c, justify="right" if numeric and i >= len(columns) - numeric else "left")
        return t

    if r.groups:
        groups = table(r.by.upper(), "CALLS", "ERRORS", "P50 MS", "P95 MS", "P99 MS", "DEVICES", "WINDOWS", numeric=7)
        for g in r.groups:
            groups.add_row(cell_text(g.key), fmt_count(g.count), fmt_rate(g.error_rate), fmt_ms(g.p50_ms),
                           fmt_ms(g.p95_ms), fmt_ms(g.p99_ms), fmt_count(g.devices), fmt_count(g.windows))
        out.print(groups)
    else:
        out.print("no telemetry in this time range", markup=False)

    out.print(Text(f"\noutliers (p95 > {r.factor:g}× peers on the same release and hardware, ≥ {r.min_calls} calls "
                   "each)", style="bold"))
    if r.outliers:
        rows = table("DEVICE", "RELEASE", "HARDWARE", "P95 MS", "PEERS P95 MS", "RATIO", "CALLS", "PEERS", numeric=5)
        for d in r.outliers:
            rows.add_row(cell_text(d.device_id), cell_text(d.release), cell_text(d.hardware_class), fmt_ms(d.p95_ms),
                         fmt_ms(d.peers_p95_ms), fmt_ratio(d.ratio), fmt_count(d.count), str(d.peers))
        out.print(rows)
    else:
        out.print("none", markup=False)

    out.print(Text("\ndevices not online", style="bold"))
    if r.offline or r.unknown:
        rows = table("DEVICE", "FLEET", "STATUS", "LAST SEEN", "HARDWARE")
        for d in (*r.offline, *r.unknown):
            rows.add_row(cell_text(d.device_id), cell_text(d.fleet), d.status, fmt_ago(d.last_seen, r.generated_at),
                         cell_text(d.hardware_class))
        out.print(rows)
    else:
        out.print("none", markup=False)

    out.print(Text("\ninstall failures", style="bold"))
    if r.install_failures:
        rows = table("AT", "DEVICE", "KIND", "RELEASE", "REASON")
        for e in reversed(r.install_failures):  # newest first
            rows.add_row(fmt_time(e.at), cell_text(e.device_id), cell_text(e.kind), cell_text(e.release or e.model),
                         cell_text(e.reason))
        out.print(rows)
    else:
        out.print("none", markup=False)


def register(telemetry_app: typer.Typer) -> None:
    """Add `report` to the `telemetry` sub-app (created in fleet_cmd, next to `watch`)."""
    telemetry_app.command("report")(report)
