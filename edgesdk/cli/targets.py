"""`edgesdk targets`: the target profiles."""

from __future__ import annotations

import typer
from rich import box
from rich.table import Table

from edgesdk.cli.common import handle_errors, out, print_json
from edgesdk.profiles import TargetProfile, builtin_target_names, resolve_targets

app = typer.Typer(help="List and show target profiles (built-in or your own YAML file).", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_targets(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the built-in target profiles and their families (`--target FAMILY` builds for each)."""
    names = builtin_target_names()
    profiles = list(names.profiles.values())
    if as_json:
        print_json([{"name": p.name, "family": p.family, "aliases": _aliases(names.aliases, p.family),
                     "architecture": p.architecture, "description": p.description,
                     "variants": [v.kind for v in p.variants],
                     "providers": [f"{s.runtime}:{s.provider}" for s in p.providers]} for p in profiles])
        return
    also = "; ".join(f"{f} = {', '.join(_aliases(names.aliases, f))}" for f in names.families
                     if _aliases(names.aliases, f))
    table = Table(title="Built-in targets", caption=f"--target takes a name, a unique prefix of one, or a family "
                  f"(one package per profile of it; {also}). Providers: preferred first.", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for col in ("name", "family", "arch", "variants", "providers", "shapes"):
        table.add_column(col, no_wrap=col not in ("providers", "variants"), overflow="fold")
    for p in profiles:
        table.add_row(p.name, p.family, p.architecture, "\n".join(v.kind for v in p.variants),
                      _providers_cell(p), p.shapes.policy)
    out.print(table)


def _providers_cell(profile: TargetProfile) -> str:
    """One line per run of the same runtime ("onnxruntime: Tensorrt, CUDA, CPU"): wraps at spaces.
    "ExecutionProvider" ends every ORT provider name; `targets show` prints them in full."""
    runs: list[tuple[str, list[str]]] = []
    for s in profile.providers:
        if not runs or runs[-1][0] != s.runtime:
            runs.append((s.runtime, []))
        runs[-1][1].append(s.provider.removesuffix("ExecutionProvider"))
    return "\n".join(f"{runtime}: {', '.join(names)}" for runtime, names in runs)


def _aliases(aliases: dict[str, str], family: str) -> list[str]:
    return [a for a, f in aliases.items() if f == family] if family else []


@app.command("show")
@handle_errors
def show(name: str = typer.Argument(..., help="Built-in target name or path to a profile .yaml."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show one profile, validated, with every key; for a family, list its profiles."""
    selection = resolve_targets(name)
    if selection.family is not None:
        _show_family(selection.family, list(selection.profiles), as_json)
        return
    (profile,) = selection.profiles
    data = profile.to_dict()
    if as_json:
        print_json(data)
        return
    out.print(f"[bold]{profile.name}[/] — {profile.description} ({profile.architecture})")
    out.print(f"source: {profile.source}")
    if profile.family:
        out.print(f"family: {profile.family}")
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


def _show_family(family: str, profiles: list[TargetProfile], as_json: bool) -> None:
    if as_json:
        print_json([p.to_dict() for p in profiles])
        return
    table = Table(title=f"family {family}: `--target {family}` builds one package for each")
    for col in ("name", "arch", "description", "variants"):
        table.add_column(col, no_wrap=col == "name")
    for p in profiles:
        table.add_row(p.name, p.architecture, p.description, "\n".join(v.kind for v in p.variants))
    out.print(table)
    out.print(f"[dim]every key of one: edgesdk targets show {profiles[0].name}[/]")
