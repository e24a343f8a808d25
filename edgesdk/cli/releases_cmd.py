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


def variants_cell(metrics: dict[str, Any]) -> str:
    """'onnx-fp32 cos 1.0000 top1 1.000 task 0.970' per variant, one line each."""
    from edgesdk.cli.fleet_cmd import safe_text

    lines = []
    for vid, m in sorted(metrics.items()):
        s = variant_summary(m)
        parts = [safe_text(vid, 64)]
        for label, key, digits in (("cos", "min_cosine", 4), ("top1", "min_top1", 3), ("task", "task_metric", 3)):
            if s[key] is not None:
                parts.append(f"{label} {s[key]:.{digits}f}")
        lines.append(" ".join(parts))
    return "\n".join(lines) or "—"


def releases_table(releases):  # noqa: ANN001, ANN201 - ReleaseRecords -> rich Table
    from rich.table import Table
    from rich.text import Text

    from edgesdk.cli.fleet_cmd import safe_text
    from edgesdk.fleet.report import fmt_time

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("RELEASE", "TARGET", "SIZE", "PUBLISHED", "PACKAGE", "SIGNER", "VARIANTS"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for r in releases:
        table.add_row(Text(safe_text(r.release)), Text(safe_text(r.target)), _size(r.size), fmt_time(r.published_at),
                      r.package_id[:12], Text(safe_text(r.signer or "—")), Text(variants_cell(r.metrics)))
    return table


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
