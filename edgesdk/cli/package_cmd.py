"""`edgesdk package`: build, validate, sign and write one .edgepkg per target (a family names several)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgesdk.cli.common import console, escape, fail, handle_errors, print_json
from edgesdk.errors import ConfigError, EdgeError
from edgesdk.protocol import ID_RULE, is_valid_id

if TYPE_CHECKING:
    from edgesdk.pipeline.runner import PackageRequest, PackageResult

# A version is part of the package's file name and of `name@version` everywhere: no spaces, no '/',
# no control characters. '+' is allowed for semver build metadata (1.2.0+build.5).
VERSION_RULE = "1-64 letters, digits, '.', '_', '-', '+', starting with a letter or digit (e.g. 1.2.0 or 1.3.0-rc1)"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_NAME_FROM_FILE = re.compile(r"[^A-Za-z0-9._-]+")  # the runner's rule for a name taken from the file name
NAME_WHY = "a model name is an MQTT topic level (devices/{id}/desired/{name}), so it must be " + ID_RULE


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
    target: str = typer.Option(..., "--target", "-t", help="A built-in target (see `edgesdk targets list`; a "
                               "unique prefix will do), a family such as jetson or raspberry-pi (one package "
                               "per profile of it), or the path of your own profile .yaml."),
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
    name: str = typer.Option(None, "--name", help="Model name devices know it by (default: the model file's "
                             "name): 1-64 letters, digits, '.', '_', '-'."),
    version: str = typer.Option("1.0.0", "--version", help="Package version, e.g. 1.2.0 or 1.3.0-rc1."),
    out: Path = typer.Option(Path("."), "--out", help="Folder to write NAME-VERSION-TARGET.edgepkg into."),
    strict: bool = typer.Option(False, "--strict", help="Fail if any variant is dropped by its accuracy gate."),
    bench_runs: int = typer.Option(30, "--bench-runs", help="Timed runs per variant in the host benchmark."),
    repair_budget: float = typer.Option(60.0, "--repair-budget", help="Seconds the repair of one failing INT8 "
                                        "variant may take (0: no repair)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout (see docs/cli-json.md); "
                                 "a list when --target names a family."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show what ONNX Runtime, NNCF and OpenVINO print "
                                 "(calibration progress, warnings); hidden by default."),
) -> None:
    """Optimize, quantize and validate MODEL for a target; write a signed .edgepkg (one per profile of a family).

    Every variant the target profile lists is built, compared with the fp32 original on validation
    inputs (cosine, max error, top-1 agreement, collapse check, optional task metric) and dropped if
    it fails its gate after bounded repairs. The package holds the passing variants, a manifest with
    every metric, and reference inputs/outputs for the device's health check.
    """
    from edgesdk.atomicfile import check_output_folder

    # Before any work: a package that took minutes to build must not then fail to be written.
    check_output_folder(out, "--out")
    name = package_name(model, name)
    check_version(version)

    from edgesdk.pipeline.runner import PackageRequest
    from edgesdk.pipeline.shapes import parse_input_shapes
    from edgesdk.profiles import resolve_targets

    selection = resolve_targets(target)
    shapes = parse_input_shapes(input_shape)
    several = len(selection.profiles) > 1
    results: list[PackageResult] = []
    for i, profile in enumerate(selection.profiles, 1):
        if several and not as_json:
            console.print(f"[bold]{escape(profile.name)}[/] [dim]({i} of {len(selection.profiles)} in "
                          f"{escape(str(selection.family))})[/]")
        request = PackageRequest(
            model=model, target=profile, out_dir=out, name=name, version=version, calibration=calibration,
            validation=validation, input_shapes=shapes, evaluator=evaluator, labels=labels, key_path=key,
            strict=strict, bench_runs=bench_runs, repair_budget_s=repair_budget,
        )
        try:
            result = _build(request, as_json, verbose)
        except EdgeError as exc:
            if not several:
                raise
            written = f" ({len(results)} written before it: {', '.join(str(r.path) for r in results)})" \
                if results else ""
            fail(escape(f"{profile.name}: {exc}{written}"), exc.exit_code)
        results.append(result)
        if not as_json:
            _print_result(result)
    if as_json:
        documents = [_json_of(r) for r in results]
        # A family is a list even when it has one profile: the shape follows what was asked for.
        print_json(documents if selection.family is not None else documents[0])
    elif several:
        console.print(f"[bold green]wrote {len(results)} packages[/] for {escape(str(selection.family))}:")
        width = max(len(r.manifest.target) for r in results)
        for r in results:
            console.print(f"  {escape(r.manifest.target.ljust(width))}  {escape(str(r.path))}")


def package_name(model: Path, name: str | None) -> str:
    """--name, or the name taken from the model file's name; ConfigError when it cannot be a model name."""
    if name is not None:
        if not is_valid_id(name):
            raise ConfigError(f"invalid --name {name!r}: {NAME_WHY}")
        return name
    derived = _NAME_FROM_FILE.sub("_", model.stem)
    if not is_valid_id(derived):
        raise ConfigError(f"the model file's name gives the model name {derived!r}, which is not valid: "
                          f"pass --name ({NAME_WHY})")
    return derived


def check_version(version: str) -> str:
    if not _VERSION.fullmatch(version):
        raise ConfigError(f"invalid --version {version!r}: a package version is {VERSION_RULE}")
    return version


def _build(request: PackageRequest, as_json: bool, verbose: bool) -> PackageResult:
    """One target: the pipeline with our progress list, third-party output hidden unless verbose."""
    from edgesdk.pipeline.runner import build_package
    from edgesdk.quiet import third_party_quiet

    with Progress(SpinnerColumn(finished_text=""), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False, disable=as_json) as progress:
        reporter = RichReporter(progress)
        quiet_before = progress.console.quiet
        if as_json:
            progress.console.quiet = True  # warnings go into the JSON's "warnings"
        try:
            # stdout is for the result only: ORT's calibrators print() their progress and NNCF draws
            # progress bars on stdout, which broke `--json | jq` on every x86-64-cpu run. Hidden, or
            # with --verbose sent to stderr; our progress console is pinned to the real stderr.
            with third_party_quiet(verbose, keep=(progress.console,)):
                return build_package(request, reporter)
        finally:
            # The console is shared: left quiet, the `error:` line of a failure (and of every
            # later command in this process) was never printed.
            progress.console.quiet = quiet_before


def _print_result(result: PackageResult) -> None:
    from edgesdk.cli.inspect_cmd import print_variants_table
    from edgesdk.pipeline.progress import timeline_line

    print_variants_table(result.manifest)
    if result.timeline:
        console.print(f"[dim]time per pass: {escape(timeline_line(result.timeline))}[/]")
    console.print(f"[bold green]wrote[/] {escape(str(result.path))} (signed with {escape(str(result.key_path))})")


def _json_of(result: PackageResult) -> dict[str, Any]:
    from edgesdk.cli.inspect_cmd import inspect_json

    # The seconds per pass are in host.packaging (the manifest's, so `inspect --json` shows them too).
    return {"package": str(result.path), "key": str(result.key_path), "key_created": result.key_created,
            "warnings": result.warnings, **inspect_json(result.manifest, None)}
