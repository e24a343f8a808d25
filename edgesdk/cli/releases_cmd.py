"""`edgesdk releases list`: the packages published into the fleet store, as ``name@version`` per
target, with each variant's accuracy against the fp32 reference from the manifest."""

from __future__ import annotations

from typing import Any

import typer

from edgesdk.cli.common import console, handle_errors, out, print_json
from edgesdk.cli.devices_cmd import open_store, store_option

app = typer.Typer(help="Releases published to the fleet (name@version per target).", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_releases(
    name: str = typer.Option(None, "--name", help="Only releases of this package name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (docs/cli-json.md)."),
    store: str = store_option(),
) -> None:
    """Published releases, oldest version first: target, size, when, who signed, variant metrics."""
    with open_store(store) as fleet_store:
        releases = fleet_store.releases(name)
        where = fleet_store.url
    if as_json:
        print_json({"releases": [release_json(r) for r in releases]})
        return
    if not releases:
        console.print(f"no releases{f' named {name}' if name else ''} in the store at {where} "
                      "(`edgesdk publish` records them)", markup=False)
        return
    out.print(releases_table(releases))


def variant_summary(metrics: Any) -> dict[str, float | None]:
    """The manifest metrics of one variant, compact: worst cosine and top-1 agreement over its
    outputs, and the task metric (None where not measured)."""
    metrics = metrics if isinstance(metrics, dict) else {}
    outputs = metrics.get("outputs") if isinstance(metrics.get("outputs"), dict) else {}

    def worst(key: str) -> float | None:
        values = [m.get(key) for m in outputs.values() if isinstance(m, dict) and _number(m.get(key))]
        return min(values) if values else None

    task = metrics.get("task") if isinstance(metrics.get("task"), dict) else {}
    return {"min_cosine": worst("cosine"), "min_top1": worst("top1_agreement"),
            "task_metric": task.get("variant") if _number(task.get("variant")) else None}


def release_json(r) -> dict[str, Any]:  # noqa: ANN001 - a ReleaseRecord
    return {"release": r.release, "name": r.name, "version": r.version, "target": r.target, "package_id": r.package_id,
            "size": r.size, "published_at": r.published_at, "signer": r.signer,
            "variants": [{"id": vid, **variant_summary(m)} for vid, m in sorted(r.metrics.items())]}


def releases_table(releases):  # noqa: ANN001, ANN201 - ReleaseRecords -> rich Table
    """One row per variant (the release named on its first row): the packaged metrics side by side,
    fitting 80 columns; package ids, signers and publication times are in `--json`."""
    from rich.table import Table
    from rich.text import Text

    from edgesdk.cli.fleet_cmd import safe_text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("RELEASE", "TARGET", "VARIANT", "COSINE", "TOP-1", "TASK"):
        table.add_column(column, no_wrap=column in ("RELEASE", "TARGET", "VARIANT"),
                         justify="right" if column in ("COSINE", "TOP-1", "TASK") else "left")
    seen: dict[tuple[str, str], int] = {}
    for r in releases:
        seen[(r.release, r.target)] = seen.get((r.release, r.target), 0) + 1
    for r in releases:
        variants = sorted(r.metrics.items()) or [("—", {})]
        # The release and target on its first row, its size under them (on the second row); the
        # package id too when two packages were published as the same release for one target.
        size = _size(r.size) + (f" {r.package_id[:12]}" if seen[(r.release, r.target)] > 1 else "")
        heads = [(Text(safe_text(r.release)), Text(safe_text(r.target))), (Text(f"  {size}", style="dim"), "")]
        for index, (vid, metrics) in enumerate(variants):
            summary = variant_summary(metrics)
            release, target = heads[index] if index < len(heads) else ("", "")
            table.add_row(release, target, Text(safe_text(vid, 64)), _metric(summary["min_cosine"], 4),
                          _metric(summary["min_top1"], 3), _metric(summary["task_metric"], 3))
        if len(variants) == 1:
            table.add_row(*heads[1], "", "", "", "")
    return table


def _metric(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
