"""`edgesdk targets`: the target profiles."""

from __future__ import annotations

import typer
from rich.table import Table

from edgesdk.cli.common import handle_errors, out, print_json
from edgesdk.profiles import all_builtin_profiles, resolve_target

app = typer.Typer(help="List and show target profiles (built-in or your own YAML file).", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_targets(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the built-in target profiles."""
    profiles = all_builtin_profiles()
    if as_json:
        print_json([{"name": p.name, "architecture": p.architecture, "description": p.description,
                     "variants": [v.kind for v in p.variants],
                     "providers": [f"{s.runtime}:{s.provider}" for s in p.providers]} for p in profiles])
        return
    table = Table(title="Built-in targets")
    table.add_column("name", no_wrap=True)
    for col in ("arch", "providers (preference order)", "variants", "shapes"):
        table.add_column(col)
    for p in profiles:
        table.add_row(p.name, p.architecture, "\n".join(f"{s.runtime}:{s.provider}" for s in p.providers),
                      "\n".join(v.kind for v in p.variants), p.shapes.policy)
    out.print(table)


@app.command("show")
@handle_errors
def show(name: str = typer.Argument(..., help="Built-in target name or path to a profile .yaml."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show one profile, validated, with every key."""
    profile = resolve_target(name)
    data = profile.to_dict()
    if as_json:
        print_json(data)
        return
    out.print(f"[bold]{profile.name}[/] — {profile.description} ({profile.architecture})")
    out.print(f"source: {profile.source}")
    table = Table(title="providers (preference order)")
    table.add_column("runtime")
    table.add_column("provider")
    table.add_column("precisions")
    for s in profile.providers:
        table.add_row(s.runtime, s.provider, ", ".join(s.precisions) or "any")
    out.print(table)
    vt = Table(title="variants built")
    vt.add_column("kind")
    vt.add_column("options")
    for v in profile.variants:
        vt.add_row(v.kind, ", ".join(f"{k}={val}" for k, val in v.options.items()))
    out.print(vt)
    gt = Table(title="accuracy gates")
    for col in ("precision", "cosine_min", "top1_min", "max_abs_error", "spread_ratio_min", "task_metric_drop_max"):
        gt.add_column(col)
    for prec, g in profile.gates.items():
        gt.add_row(prec, *(str(getattr(g, c)) for c in ("cosine_min", "top1_min", "max_abs_error",
                                                         "spread_ratio_min", "task_metric_drop_max")))
    out.print(gt)
    out.print(f"shapes: {profile.shapes.policy} (batch {profile.shapes.batch}); budgets: "
              f"package ≤ {profile.budgets.max_package_mb} MB, memory ≤ {profile.budgets.max_memory_mb} MB")
