"""The `edge-agent` command: run the daemon, report what this device has, show what it runs."""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import typer

from edgesdk.errors import ConfigError, EdgeError

app = typer.Typer(name="edge-agent", help="The edgesdk device agent: installs signed model packages from the "
                  "fleet, picks the fastest healthy variant × provider here, serves it on a local API and "
                  "reports latency.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


# rich is imported when something is printed, not by `edge-agent run` (whose output is logging):
# it costs the daemon ~5 MiB of resident memory for nothing.
@functools.cache
def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _fail(exc: EdgeError) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(exc.exit_code)


@app.command()
def run(config: Path = typer.Option(..., "--config", "-c", help="Agent config YAML (see agent.sample.yaml)."),
        log_level: str = typer.Option(None, "--log-level", help="Override the config's log_level.")) -> None:
    """Run the daemon until SIGTERM or SIGINT (then it marks the device offline and exits 0)."""
    from agent.config import load_config
    from agent.daemon import run_agent

    try:
        cfg = load_config(config)
        logging.basicConfig(level=(log_level or cfg.log_level).upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        run_agent(cfg, stop)
    except EdgeError as exc:
        _fail(exc)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           config: Path = typer.Option(None, "--config", "-c", help="Also check this agent config and try its "
                                       "broker connection (exit 1 when the broker cannot be reached)."),
           package: Path = typer.Option(None, "--package", "-p", help="Also say which runtimes this package "
                                        "(.edgepkg, or an installed version folder / its manifest.json) needs "
                                        "that this device lacks, with the pip line that adds them."),
           strict: bool = typer.Option(False, "--strict", help="Exit 1 when the report lists any problem: no "
                                       "target profile matches, or a runtime the --package needs is missing."),
           cpuinfo: Path = typer.Option(None, "--cpuinfo", help="Read this file instead of /proc/cpuinfo (what "
                                        "would a board get, from its captured cpuinfo?)."),
           device_tree_model: Path = typer.Option(None, "--device-tree-model", help="Read this file instead of "
                                                  "/proc/device-tree/model; an empty file is a board without one."),
           machine: str = typer.Option(None, "--machine", help="CPU architecture instead of this machine's "
                                       "(aarch64, x86_64), with --cpuinfo.")) -> None:
    """What this device has: arch, CPU features, RAM, board, runtimes and providers, matching target and why.

    Without --strict it exits 0 whatever it finds (except an unreachable --config broker); the
    report says what is wrong.
    """
    from agent.hardware import doctor_report, probe_hardware

    broker_problem = None
    try:
        if config is not None:
            from agent.config import load_config

            broker_problem = check_broker(load_config(config))
        manifest = read_manifest(package) if package is not None else None
        probe: dict = {"machine": machine}
        if cpuinfo is not None:
            probe["cpuinfo"] = cpuinfo
        if device_tree_model is not None:
            probe["device_tree_model"] = device_tree_model
        report = doctor_report(probe_hardware(**probe), manifest=manifest)
    except EdgeError as exc:
        _fail(exc)
    if config is not None:
        report["broker"] = {"ok": broker_problem is None, "problem": broker_problem}
        if broker_problem:
            report.setdefault("problems", []).append(broker_problem)
    failed = bool(broker_problem) or (strict and bool(report.get("problems")))
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
        raise typer.Exit(1 if failed else 0)
    from rich.table import Table

    out = _console()
    hw = report.get("hardware", report)
    table = Table(title="edge-agent doctor", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("found")
    for key in ("arch", "cpu_model", "cpu_count", "cpu_flags", "ram_mb", "board", "os", "kernel", "python"):
        if key in hw:
            value = hw[key]
            table.add_row(key, ", ".join(value) if isinstance(value, (list, tuple)) else str(value))
    for runtime, version in (hw.get("runtimes") or {}).items():
        providers = (hw.get("providers") or {}).get(runtime, [])
        table.add_row(runtime, f"{version} — {', '.join(providers) or 'no providers'}")
    table.add_row("target", str(report.get("target")))
    table.add_row("why", escape(str(report.get("target_reason", ""))))
    for note in report.get("cpu_notes", []):
        table.add_row("cpu note", escape(note))
    pkg = report.get("package")
    if pkg:
        table.add_row("package", escape(f"{pkg['name']} {pkg['version']} for {pkg['target']}"))
        for need in pkg["runtimes"]:
            state = "installed" if need["installed"] else "[red]missing[/]"
            table.add_row(f"needs {need['runtime']}", f"{state} — {escape(', '.join(need['variants']))}")
        if pkg.get("install"):
            table.add_row("install", escape(pkg["install"]))
    if "broker" in report:
        table.add_row("broker", "reachable, login accepted" if report["broker"]["ok"] else "[red]unreachable[/]")
    for problem in report.get("problems", []):
        table.add_row("problem", f"[yellow]{escape(str(problem))}[/]")
    out.print(table)
    if failed:
        raise typer.Exit(1)


def read_manifest(path: Path):  # noqa: ANN201 - edgesdk.manifest.Manifest, imported lazily
    """The manifest of an .edgepkg, of an installed version folder, or a manifest.json file.

    Only the manifest is read (parsed by the hardened parser, signature not checked): doctor
    reports what the package says it needs, and hashing a large package would be slow on a Pi.
    """
    from edgesdk.errors import map_os_errors
    from edgesdk.manifest import MANIFEST_NAME, Manifest
    from edgesdk.package import open_package

    if path.is_dir():
        path = path / MANIFEST_NAME
    if path.name == MANIFEST_NAME or path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"{path}: not found")
        with map_os_errors(f"read {path}"):
            return Manifest.from_bytes(path.read_bytes())
    if not path.is_file():
        raise ConfigError(f"{path}: not found")
    with open_package(path, require_signature=False) as opened:
        return opened.manifest


def check_broker(cfg) -> str | None:  # noqa: ANN001 - AgentConfig
    """Connect to the config's broker as the agent would (TLS, login) with a short deadline and
    disconnect; None when that works, else the one-line reason."""
    import uuid

    from agent.daemon import broker_config_of
    from edgesdk.broker import connect_blocking, disconnect, make_client

    broker = broker_config_of(cfg).with_timeouts(connect_timeout_s=5.0)
    # Not the device's own client id: a running agent must not be kicked off by its doctor.
    client = make_client(f"{cfg.device_id}-doctor-{uuid.uuid4().hex[:6]}", broker, clean_start=True)
    try:
        connect_blocking(client, broker)
    except EdgeError as exc:
        return str(exc)
    disconnect(client)
    return None


@app.command()
def status(config: Path = typer.Option(..., "--config", "-c", help="Agent config YAML (for data_dir)."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Per model: the active release, variant and provider, its fallback, and its last selection's
    benchmark table (with the interference measured beside the other models)."""
    from agent.config import load_config

    try:
        cfg = load_config(config)
        path = cfg.data_dir / "status.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no status yet (has the agent run with this data_dir?)") from None
        except ValueError:
            raise ConfigError(f"{path}: status file is not valid JSON") from None
    except EdgeError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    out = _console()
    models = data.get("models") or {}
    if not models:
        out.print("models: none active")
    budget = data.get("memory_budget_mb")
    if budget:
        held = sum(float((m.get("active") or {}).get("resident_mb") or 0) for m in models.values())
        out.print(f"memory: {held:.1f} MB of a {budget:g} MB budget held by the active models")
    for name, entry in models.items():
        _print_model(name, entry)


def _print_model(name: str, entry: dict) -> None:
    """One model's block: what is active, its fallback, its last error and its selection table."""
    from rich import box
    from rich.table import Table

    out = _console()
    active, previous = entry.get("active"), entry.get("previous")
    out.print()
    if active:
        memory = f", {active['resident_mb']:.1f} MB" if isinstance(active.get("resident_mb"), (int, float)) else ""
        out.print(f"[bold]{active['name']}@{active['version']}[/] active ({active['package_id'][:12]}) — "
                  f"variant {active['variant']} on {active['runtime']}:{active['provider']}{memory}")
    else:
        out.print(f"[bold]{name}[/]: not active")
    if previous:
        out.print(f"  fallback: {previous['package_id'][:12]} ({previous.get('variant', '—')})")
    if entry.get("last_error"):
        out.print(f"  [yellow]last error:[/] {entry['last_error']}")
    selection = entry.get("last_selection") or {}
    if selection.get("table"):
        beside = selection.get("neighbours") or []
        title = f"{name}: last selection (variant × provider; ms, MB)"
        if beside:
            title += f", timed beside {', '.join(beside)}"
        table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
        # Beside other models the two extra columns (p50 alone, the ratio) replace runs and health
        # (a failed health check shows as the status) so the table fits 80 columns.
        columns = (["variant", "provider", "status", "p50", "alone", "×", "p95", "MB"] if beside else
                   ["variant", "provider", "status", "p50", "p95", "runs", "health", "MB"])
        for col in columns:
            table.add_column(col, no_wrap=True, justify="left" if col in ("variant", "provider", "status",
                                                                           "health") else "right")
        for row in selection["table"]:
            if beside:
                ratio = row.get("interference")
                cells = [row["variant"], _short(row["runtime"], row["provider"]), row["status"],
                         _ms(row.get("p50_ms")), _ms(row.get("p50_alone_ms")),
                         "—" if ratio is None else f"{ratio:.2f}", _ms(row.get("p95_ms")), _mb(row.get("resident_mb"))]
            else:
                cells = [row["variant"], _short(row["runtime"], row["provider"]), row["status"],
                         _ms(row.get("p50_ms")), _ms(row.get("p95_ms")), str(row.get("runs", "")),
                         {True: "pass", False: "FAIL", None: "—"}[row.get("health")], _mb(row.get("resident_mb"))]
            table.add_row(*cells)
        out.print(table)
        for row in selection["table"]:
            if row.get("detail"):
                out.print(f"[dim]{row['variant']} on {row['provider']}: {row['detail']}[/]")


def _mb(value: float | None) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{value:.1f}"


def _short(runtime: str, provider: str) -> str:
    """'onnxruntime', 'CUDAExecutionProvider' → 'ort:CUDA' (fits an 80-column table)."""
    name = {"onnxruntime": "ort", "openvino": "ov"}.get(runtime, runtime)
    return f"{name}:{provider.removesuffix('ExecutionProvider')}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
