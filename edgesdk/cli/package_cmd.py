"""`edgesdk package`: build, validate, sign and write one .edgepkg for one target."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgesdk.cli.common import console, escape, handle_errors, print_json


class RichReporter:
    """Renders the pipeline's passes as a live list: spinner while running, ✓ and detail when done."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.warnings: list[str] = []

    def begin(self, step: str) -> None:
        self.started[step] = time.perf_counter()
        self.tasks[step] = self.progress.add_task(escape(step), total=1)

    def end(self, step: str, detail: str = "") -> None:
        task = self.tasks.get(step)
        if task is None:
            return
        elapsed = time.perf_counter() - self.started[step]
        text = f"[green]✓[/] {escape(step)}" + (f" [dim]— {escape(detail)}[/]" if detail else "")
        self.progress.update(task, completed=1, description=f"{text} [dim]({elapsed:.1f}s)[/]")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.progress.console.print(f"[bold yellow]warning:[/] {escape(message)}")

    def info(self, message: str) -> None:
        self.progress.console.print(f"[dim]{escape(message)}[/]")


@handle_errors
def package(
    model: Path = typer.Argument(..., help="The trained model: an .onnx file (external data next to it is "
                                           "found) or a .tflite file (passed through for LiteRT targets)."),
    target: str = typer.Option(..., "--target", "-t", help="Built-in target name (see `edgesdk targets list`) "
                                                          "or the path of your own profile .yaml."),
    calibration: Path = typer.Option(None, "--calibration", help=".npz keyed by input name (samples stacked on a "
                                     "new leading axis: N × the input's shape), a .npy for one input, or a folder of them."),
    validation: Path = typer.Option(None, "--validation", help="Validation samples in the same format; default: "
                                    "a held-out quarter of --calibration."),
    input_shape: list[str] = typer.Option([], "--input-shape", help="Fix an input's shape: name=1x3x224x224 "
                                          "(repeatable; required for dynamic dims on static-shape targets)."),
    evaluator: str = typer.Option(None, "--evaluator", help="Task metric module:function (or file.py:function) "
                                  "called as fn(outputs, labels) -> float, higher is better."),
    labels: Path = typer.Option(None, "--labels", help="Labels for --validation samples (.npy, or .npz with "
                                "'labels'): gates on real top-1 accuracy."),
    key: Path = typer.Option(None, "--key", help="Ed25519 private key to sign with; default: "
                             "$EDGESDK_HOME/keys/signing.key or ~/.config/edgesdk/keys/signing.key, created on first use."),
    name: str = typer.Option(None, "--name", help="Package name (default: the model file's name)."),
    version: str = typer.Option("1.0.0", "--version", help="Package version."),
    out: Path = typer.Option(Path("."), "--out", help="Folder to write NAME-VERSION-TARGET.edgepkg into."),
    strict: bool = typer.Option(False, "--strict", help="Fail if any variant is dropped by its accuracy gate."),
    bench_runs: int = typer.Option(30, "--bench-runs", help="Timed runs per variant in the host benchmark."),
    repair_budget: float = typer.Option(60.0, "--repair-budget", help="Seconds the repair of one failing INT8 "
                                        "variant may take (0: no repair)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout (see docs/cli-json.md)."),
) -> None:
    """Optimize, quantize and validate MODEL for one target; write a signed .edgepkg.

    Every variant the target profile lists is built, compared with the fp32 original on validation
    inputs (cosine, max error, top-1 agreement, collapse check, optional task metric) and dropped if
    it fails its gate after bounded repairs. The package holds the passing variants, a manifest with
    every metric, and reference inputs/outputs for the device's health check.
    """
    from edgesdk.atomicfile import check_output_folder

    # Before any work: a package that took minutes to build must not then fail to be written.
    check_output_folder(out, "--out")

    from edgesdk.cli.inspect_cmd import inspect_json, print_variants_table
    from edgesdk.pipeline.runner import PackageRequest, build_package
    from edgesdk.pipeline.shapes import parse_input_shapes
    from edgesdk.profiles import resolve_target

    profile = resolve_target(target)
    request = PackageRequest(
        model=model, target=profile, out_dir=out, name=name, version=version, calibration=calibration,
        validation=validation, input_shapes=parse_input_shapes(input_shape), evaluator=evaluator,
        labels=labels, key_path=key, strict=strict, bench_runs=bench_runs, repair_budget_s=repair_budget,
    )
    with Progress(SpinnerColumn(finished_text=""), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False, disable=as_json) as progress:
        reporter = RichReporter(progress)
        quiet_before = progress.console.quiet
        if as_json:
            progress.console.quiet = True  # warnings go into the JSON's "warnings"
        try:
            # stdout is for the result only: ORT's calibrators print() their progress and NNCF
            # draws progress bars on stdout, which broke `--json | jq` on every x86-64-cpu run.
            with contextlib.redirect_stdout(sys.stderr):
                result = build_package(request, reporter)
        finally:
            # The console is shared: left quiet, the `error:` line of a failure (and of every
            # later command in this process) was never printed.
            progress.console.quiet = quiet_before
    if as_json:
        print_json({"package": str(result.path), "key": str(result.key_path), "key_created": result.key_created,
                    "warnings": result.warnings, **inspect_json(result.manifest, None)})
        return
    print_variants_table(result.manifest)
    console.print(f"[bold green]wrote[/] {result.path} (signed with {result.key_path})")
