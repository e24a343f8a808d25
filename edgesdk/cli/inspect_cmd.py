"""`edgesdk inspect` and `edgesdk verify`: read a package's manifest, check its hashes and signature."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgesdk.cli.common import console, handle_errors, out, print_json
from edgesdk.errors import SignatureError
from edgesdk.manifest import Manifest
from edgesdk.package import OpenedPackage, check_files, open_package, verify_package
from edgesdk.runtime_extras import installed_runtimes, missing_install, package_install, runtime_needs
from edgesdk.signing import load_public_key


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _variant_rows(manifest: Manifest) -> list[dict]:
    rows = []
    for v in manifest.variants:
        outputs = v.metrics.get("outputs", {}) if isinstance(v.metrics, dict) else {}
        cosines = [m.get("cosine") for m in outputs.values() if m.get("cosine") is not None]
        top1 = [m.get("top1_agreement") for m in outputs.values() if m.get("top1_agreement") is not None]
        lat = v.host_latency_ms or {}
        rows.append({
            "id": v.id, "format": v.format, "precision": v.precision, "runtime": v.runtime,
            "size": v.size, "quantized_nodes": v.quantized_nodes,
            "min_cosine": min(cosines) if cosines else None, "min_top1": min(top1) if top1 else None,
            "task_metric": v.metrics.get("task", {}).get("variant") if isinstance(v.metrics, dict) else None,
            "p50_ms": lat.get("p50_ms"), "speedup_vs_fp32": lat.get("speedup_vs_fp32"),
            "gate_passed": v.gate.get("passed"), "remedies": [r.get("name") for r in v.remedies],
        })
    return rows


def inspect_json(manifest: Manifest, signer: str | None) -> dict:
    needs = runtime_needs(manifest, installed_runtimes())
    return {"name": manifest.name, "version": manifest.version, "target": manifest.target,
            "schema_version": manifest.schema_version, "signed_by": signer,
            "source": manifest.source, "calibration": manifest.calibration,
            "inputs": [s.__dict__ | {"shape": list(s.shape)} for s in manifest.inputs],
            "outputs": [s.__dict__ | {"shape": list(s.shape)} for s in manifest.outputs],
            "variants": _variant_rows(manifest), "dropped": manifest.dropped, "skipped": manifest.skipped,
            "host": manifest.host,
            # Runtimes the variants need (manifest `requires`), each installed here or not; the pip
            # line a device needs for all of them, and the one that adds what this machine lacks.
            "requires": [n.to_dict() for n in needs], "device_install": package_install(manifest),
            "missing_runtimes": [n.runtime for n in needs if not n.installed],
            "install_missing": missing_install(needs)}


def print_variants_table(manifest: Manifest) -> None:
    table = Table(title=f"{manifest.name} {manifest.version} for {manifest.target}", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    table.add_column("variant", no_wrap=True)
    table.add_column("prec", no_wrap=True, min_width=4)
    for col in ("MB", "q-nodes", "cosine", "top-1", "task", "p50 ms", "×fp32"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in _variant_rows(manifest):
        table.add_row(r["id"], r["precision"], f"{r['size'] / 1e6:.2f}", str(r["quantized_nodes"]),
                      _fmt(r["min_cosine"]), _fmt(r["min_top1"], 3), _fmt(r["task_metric"], 3),
                      _fmt(r["p50_ms"], 3), "—" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}×")
    out.print(table)
    for r in _variant_rows(manifest):
        if any(r["remedies"]):
            out.print(f"[cyan]repaired[/] {r['id']}: {', '.join(x for x in r['remedies'] if x)}")
    for d in manifest.dropped:
        out.print(f"[yellow]dropped[/] {d.get('id')}: {d.get('reason')}")
    for s in manifest.skipped:
        out.print(f"[dim]skipped {s.get('kind')}: {s.get('reason')}[/]")
    runtimes = "; ".join(f"{r}: {', '.join(ids)}" for r, ids in manifest.required_runtimes().items())
    out.print(f"runtimes ({escape(runtimes)}) — on the device: {escape(package_install(manifest))}")
    if manifest.calibration.get("synthetic"):
        out.print("[bold yellow]metrics were measured on SYNTHETIC inputs: they say little about real accuracy[/]")


def inspect(package: Path = typer.Argument(..., help="The .edgepkg file."),
            public_key: list[Path] = typer.Option([], "--public-key", help="Also check the signature against this key (repeatable)."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output (see docs/cli-json.md).")) -> None:
    """Show a package's variants: format, precision, size, accuracy metrics and host latency.

    Every file's size and sha256 are checked against the manifest; an unsigned package is refused.
    """
    handle_errors(_inspect)(package, public_key, as_json)


def print_missing_here(manifest: Manifest) -> None:
    """Which of the package's runtimes this machine lacks, each with the pip line that adds it."""
    needs = runtime_needs(manifest, installed_runtimes())
    for need in needs:
        if not need.installed:
            out.print(f"[yellow]missing here[/] {need.runtime} ({', '.join(need.variants)}): {escape(need.install)}")
    install = missing_install(needs)
    if install and sum(not n.installed for n in needs) > 1:
        out.print(f"to add them all: {escape(install)}")


def _inspect(package: Path, public_keys: list[Path], as_json: bool) -> None:
    keys = [load_public_key(p) for p in public_keys]
    opened = verify_package(package, keys) if keys else _verify_unsigned_ok(package)
    if as_json:
        print_json(inspect_json(opened.manifest, opened.signer))
        return
    print_variants_table(opened.manifest)
    print_missing_here(opened.manifest)
    if not keys:
        out.print("[dim]signature present, not checked (pass --public-key to check it)[/]")
    else:
        out.print(f"signature ok (key {opened.signer})")


def _verify_unsigned_ok(package: Path) -> OpenedPackage:
    """Without a key: refuse an unsigned package, and check every file's size and sha256."""
    with open_package(package) as opened:
        if opened.signature is None:
            raise SignatureError(f"{package}: package is unsigned (no manifest.sig)")
        check_files(opened)
    return opened


def verify(package: Path = typer.Argument(..., help="The .edgepkg file."),
           public_key: list[Path] = typer.Option(..., "--public-key", help="Trusted Ed25519 public key (repeatable)."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Exit 0 only if the signature is from a trusted key and every file's size and sha256 hold."""
    handle_errors(_verify)(package, public_key, as_json)


def _verify(package: Path, public_keys: list[Path], as_json: bool) -> None:
    keys = [load_public_key(p) for p in public_keys]
    opened = verify_package(package, keys)
    if as_json:
        print_json({"ok": True, "signed_by": opened.signer, "files": len(opened.manifest.files),
                    "name": opened.manifest.name, "version": opened.manifest.version,
                    "target": opened.manifest.target})
    else:
        out.print(f"ok: {package} — signed by key {opened.signer}, {len(opened.manifest.files)} files verified")
