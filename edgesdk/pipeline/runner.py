"""`edgesdk package`: run the passes of `edgesdk.pipeline.passes` over one `PackContext` and
return the signed package. The profile decides which variants are built.

    signing key → load model → fix input shapes → calibration data → simplify → reference outputs
    → post-processing → variants (build, validate, repair each kind) → host benchmark
    → reference samples → manifest → sign and write

Every pass is timed; the timeline (seconds per pass, and per variant kind) goes into the
manifest's ``host.packaging``, the result and the CLI's output. Everything is built in a private
temp folder; the package is written atomically at the end, so a failed run leaves nothing behind
in the output folder.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from edgesdk.errors import ConfigError
from edgesdk.pipeline.calibration_cache import QuantCache
from edgesdk.pipeline.context import HOST_PROVIDER, PackageRequest, PackageResult, PackContext
from edgesdk.pipeline.passes import PASSES, Pass
from edgesdk.pipeline.progress import PassTime, Reporter, SilentReporter

__all__ = ["HOST_PROVIDER", "PackageRequest", "PackageResult", "build_package", "run_passes"]


def run_passes(ctx: PackContext, passes: Sequence[Pass]) -> None:
    """Run ``passes`` in order over ``ctx``, each timed into ``ctx.timeline`` (and shown as a step
    unless it is a hidden one). A pass that raises ends the run there."""
    reporter = ctx.reporter
    for step in passes:
        if not step.applies(ctx):
            continue
        if step.shown:
            reporter.begin(step.name)
        started = time.perf_counter()
        detail = step.run(ctx) or ""
        ctx.timeline.append(PassTime(step.name, round(time.perf_counter() - started, 3), detail))
        if step.shown:
            reporter.end(step.name, detail)


def check_request(req: PackageRequest) -> None:
    """What can be refused before any work (and before a default key is created)."""
    if req.bench_runs < 1:
        raise ConfigError("--bench-runs must be ≥ 1")
    if req.labels is not None and req.validation is None:
        raise ConfigError("--labels needs --validation: the labels must match the validation samples in order")


def build_package(req: PackageRequest, reporter: Reporter | None = None) -> PackageResult:
    """Run the whole pipeline for one target and write the signed package. Raises EdgeError."""
    reporter = reporter or SilentReporter()
    check_request(req)
    with tempfile.TemporaryDirectory(prefix="edgesdk-package-") as tmp:
        work = Path(tmp)
        ctx = PackContext(req=req, reporter=reporter, work=work, quant_cache=QuantCache(work / "quant-cache"))
        try:
            run_passes(ctx, PASSES)
        finally:
            _close_sessions(ctx)
    warnings = list(getattr(reporter, "warnings", []))
    return PackageResult(ctx.out_path, ctx.manifest, ctx.key_path, ctx.key_created, warnings, list(ctx.timeline))


def _close_sessions(ctx: PackContext) -> None:
    for attempt in ctx.accepted:
        if attempt.session is not None:
            attempt.session.close()
            attempt.session = None
    if ctx.reference is not None:
        ctx.reference.close()
        ctx.reference = None
