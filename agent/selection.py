"""Pick the fastest variant × provider that this device really has and that passes the health check.

For every variant in the package and every provider the profile allows for it that the device
has: open a session (a silent ORT fallback to another provider counts as unavailable), warm up,
time runs within the candidate's share of the budget, rank by median (candidates within the
``SELECTION_NOISE`` margin of the fastest count as ties, decided by profile order, so identical
devices choose alike), then health-check in that order on the package's reference I/O; the first
that passes wins. A device-verified variant (bf16/fp16 compute, `device_gate` in its manifest entry)
first passes its accuracy gate on the reference data here, or it is not timed at all.

With other models active on the device (``neighbours``), the candidates are timed alone and
then with the neighbours running (`agent.neighbours`), ranked by the second timing, and each row
reports the ratio (``interference``): the variant that leaves the cores or the accelerator to the
others can win over the one that is fastest alone. Each row also reports the resident memory its
session took (``resident_mb``: the process's RSS growth while it opened and ran once, never less
than its files' size), which the installer checks against the device's memory budget.

A variant whose runtime is not installed here is no candidate, but it is a row of the table
(status `runtime_missing`, with the pip line that adds the runtime), so a device never drops a
variant silently. A provider missing from an installed runtime (no GPU here) is left out, as before.

Every path the manifest names is resolved inside the version folder before it is opened (the
manifest parser already refuses absolute and `..` paths; this is the second lock, and it also
catches a symbolic link planted in the folder). Errors: a path out of the folder or unreadable
reference data is a `PackageError`, a failing disk a `StorageError`, no usable candidate a
`HealthCheckError`; nothing else leaves `select`.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesdk.benchmark import time_interleaved
from edgesdk.errors import EdgeError, HealthCheckError, PackageError, RuntimeUnavailableError, map_os_errors
from edgesdk.manifest import Manifest
from edgesdk.npz import NPY_READ_LOCK
from edgesdk.protocol.selection_hint import SELECTION_NOISE, SelectionHint, order_within_noise
from edgesdk.runtime_extras import RUNTIME_EXTRAS, missing_hint
from edgesdk.validation import device_gate_check, health_check

from agent.metrics import rss_bytes
from agent.neighbours import Neighbour, NeighbourLoad

SessionFactory = Callable[..., Any]  # (path, runtime, provider, options=..., threads=..., cache_dir=...) -> Session
CacheDirFn = Callable[["Candidate"], "Path | None"]  # where a candidate's compiled engines are kept


@dataclass(frozen=True)
class Candidate:
    variant: str
    runtime: str
    provider: str
    precision: str
    file: str  # path inside the package
    runtime_options: dict = field(default_factory=dict, hash=False, compare=False)
    order: int = 0  # profile preference order (variant index × providers + provider index)


@dataclass
class CandidateResult:
    candidate: Candidate
    # ok | unavailable | load_failed | gate_failed (a device-verified variant failed its gate here)
    # | health_failed | not_checked | selected | runtime_missing
    status: str = "pending"
    p50_ms: float | None = None
    p95_ms: float | None = None
    runs: int = 0
    health: bool | None = None
    detail: str = ""
    p50_alone_ms: float | None = None  # with neighbours: the p50 without them (p50_ms is with them)
    resident_mb: float | None = None  # memory the session took (see the module docstring)

    @property
    def interference(self) -> float | None:
        """p50 with the device's other models running / p50 alone (None: no neighbours)."""
        if self.p50_alone_ms and self.p50_ms is not None:
            return round(self.p50_ms / self.p50_alone_ms, 3)
        return None

    def to_dict(self) -> dict[str, Any]:
        row = {"variant": self.candidate.variant, "runtime": self.candidate.runtime,
               "provider": self.candidate.provider, "precision": self.candidate.precision,
               "status": self.status, "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "runs": self.runs,
               "health": self.health, "detail": self.detail, "resident_mb": self.resident_mb}
        if self.p50_alone_ms is not None:
            row.update(p50_alone_ms=self.p50_alone_ms, interference=self.interference)
        return row


@dataclass
class Selection:
    chosen: Candidate
    session: Any  # the chosen candidate's open session, ready to serve
    table: list[CandidateResult]
    cache_key: str
    from_cache: bool = False
    neighbours: tuple[str, ...] = ()  # the other active models the timing ran beside
    from_hint: bool = False  # started from the fleet's ranking and confirmed its top candidates
    hint_devices: int = 0  # how many devices that ranking came from

    @property
    def chosen_row(self) -> CandidateResult | None:
        return next((r for r in self.table if r.candidate == self.chosen and r.status == "selected"), None)

    @property
    def resident_mb(self) -> float | None:
        row = self.chosen_row
        return None if row is None else row.resident_mb

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.chosen.variant, "runtime": self.chosen.runtime, "provider": self.chosen.provider,
                "cache_key": self.cache_key, "from_cache": self.from_cache, "neighbours": list(self.neighbours),
                "from_hint": self.from_hint, "hint_devices": self.hint_devices,
                "resident_mb": self.resident_mb, "noise_threshold": SELECTION_NOISE,
                "table": [r.to_dict() for r in self.table]}


def runtime_missing_rows(manifest: Manifest, available: dict[str, list[str]]) -> list[CandidateResult]:
    """One table row per variant whose runtime is not installed here, naming the pip line that adds it."""
    rows = []
    for variant in manifest.variants:
        if variant.runtime in available:
            continue
        detail = (missing_hint(variant.runtime) if variant.runtime in RUNTIME_EXTRAS
                  else f"{variant.runtime} is not installed here (no edgesdk extra installs it)")
        provider = variant.providers[0] if variant.providers else ""
        rows.append(CandidateResult(Candidate(variant.id, variant.runtime, provider, variant.precision, variant.file),
                                    "runtime_missing", detail=detail))
    return rows


def list_candidates(manifest: Manifest, available: dict[str, list[str]]) -> tuple[list[Candidate], list[dict]]:
    """Every variant × provider the package allows and this device has; and what was left out, why."""
    found, missing = [], []
    order = 0
    for variant in manifest.variants:
        for provider in variant.providers:
            order += 1
            if provider in available.get(variant.runtime, []):
                found.append(Candidate(variant.id, variant.runtime, provider, variant.precision, variant.file,
                                       dict(variant.runtime_options), order))
            else:
                missing.append({"variant": variant.id, "runtime": variant.runtime, "provider": provider,
                                "reason": "not on this device"})
    return found, missing


def path_inside(install_dir: Path, relative: str, what: str) -> Path:
    """``install_dir / relative``, refused with PackageError unless it resolves inside ``install_dir``."""
    root = Path(install_dir).resolve()
    with map_os_errors(f"resolve {what} in {install_dir}"):
        target = (root / relative).resolve()
    if root not in target.parents:
        raise PackageError(f"{install_dir}: {what} {relative!r} points outside the version folder")
    return target


# What np.load raises on a damaged or hostile .npz besides OSError (zip, header and pickle checks).
_NPZ_ERRORS = (ValueError, zipfile.BadZipFile, EOFError, KeyError, IndexError, TypeError, OverflowError,
               RecursionError, UnicodeError, NotImplementedError)


def load_reference(install_dir: Path, manifest: Manifest) -> tuple[list[dict], list[dict]]:
    """The package's reference inputs and fp32 outputs, as lists of per-sample dicts."""

    def unstack(key: str) -> list[dict[str, np.ndarray]]:
        relative = manifest.reference.get(key)
        if not isinstance(relative, str):
            raise PackageError(f"{install_dir}: the manifest names no reference {key}")
        path = path_inside(install_dir, relative, f"reference.{key}")
        try:
            with map_os_errors(f"read {path}"), NPY_READ_LOCK, np.load(path, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except _NPZ_ERRORS as exc:
            raise PackageError(f"{path}: unreadable reference {key} ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]})") from None
        except AttributeError:  # a plain .npy holds one array, not named samples
            raise PackageError(f"{path}: reference {key} is not an .npz of named arrays") from None
        if not arrays or any(a.ndim == 0 for a in arrays.values()):
            raise PackageError(f"{path}: reference {key} has no samples (empty, or a scalar array)")
        count = min(a.shape[0] for a in arrays.values())
        if count == 0:
            raise PackageError(f"{path}: reference {key} has no samples")
        return [{k: a[i] for k, a in arrays.items()} for i in range(count)]

    return unstack("inputs"), unstack("outputs")


def cache_key(package_id: str, hardware_fingerprint: str, runtime_versions: dict[str, str]) -> str:
    raw = json.dumps([package_id, hardware_fingerprint, runtime_versions], sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()


def _open(factory: SessionFactory, install_dir: Path, c: Candidate, threads: int | None,
          cache_dir_for: CacheDirFn | None = None) -> Any:
    path = path_inside(install_dir, c.file, f"variant {c.variant} file")
    cache_dir = cache_dir_for(c) if cache_dir_for is not None else None
    if cache_dir is None:
        return factory(path, c.runtime, c.provider, options=c.runtime_options, threads=threads)
    return factory(path, c.runtime, c.provider, options=c.runtime_options, threads=threads, cache_dir=cache_dir)


RssProbe = Callable[[], "int | None"]  # bytes resident in this process now, or None when unknown


def files_mb(install_dir: Path, manifest: Manifest, variant_id: str) -> float:
    """Size on disk of a variant's files: a floor for what its session holds in memory."""
    variant = manifest.variant(variant_id)
    total = 0
    for relative in dict.fromkeys([variant.file, *variant.files]):
        entry = manifest.files.get(relative)
        total += entry.size if entry is not None else 0
    return round(total / (1 << 20), 3)


# Precisions whose result depends on the device: a variant of one must carry a device gate.
DEVICE_VERIFIED_PRECISIONS = ("bf16",)


def _health(session: Any, manifest: Manifest, c: Candidate, ref_in: list[dict], ref_out: list[dict]) -> tuple[bool, str]:
    outputs = [session.run(feeds) for feeds in ref_in]
    variant = manifest.variant(c.variant)
    result = health_check(ref_out, outputs, variant.health_tolerance)
    if result.passed and variant.device_gate:
        result = device_gate_check(ref_out, outputs, variant.device_gate)
    return bool(result.passed), "; ".join(result.failures)


def _device_verify(session: Any, manifest: Manifest, c: Candidate, ref_in: list[dict],
                   ref_out: list[dict]) -> str | None:
    """Why a device-verified candidate fails its gate on this device (None: it passes, or it is
    not device-verified). Run before the candidate is timed, so a variant that computes wrongly
    here never competes."""
    variant = manifest.variant(c.variant)
    if not variant.device_gate:
        if variant.precision in DEVICE_VERIFIED_PRECISIONS:
            return f"a {variant.precision} variant must carry a device gate; this one has none"
        return None
    result = device_gate_check(ref_out, [session.run(feeds) for feeds in ref_in], variant.device_gate)
    return None if result.passed else "; ".join(result.failures)


def rank(results: Sequence[CandidateResult], noise: float = SELECTION_NOISE,
         preference: Callable[[CandidateResult], Any] | None = None) -> list[CandidateResult]:
    """The timed candidates in the order they are health-checked: those within ``noise`` of the
    fastest median first, by ``preference`` (default: profile order); then the rest by median.
    Tied rows' ``detail`` says why they stand where they do."""
    timed = [r for r in results if r.status == "ok" and r.p50_ms is not None]
    band, rest = order_within_noise(timed, lambda r: r.p50_ms, preference or (lambda r: r.candidate.order), noise)
    if len(band) > 1:
        fastest = min(r.p50_ms for r in band)
        why = "the fleet's ranking" if preference is not None else "profile order"
        for r in band:
            r.detail = (f"{r.p50_ms / fastest:.3f}x the fastest median: within the {noise:.0%} noise "
                        f"margin, ranked by {why}")
    return band + rest


# With the fleet's ranking for this hardware class: how many of its top candidates the device
# confirms, and the share of the selection budget it spends on them.
HINT_CONFIRM = 2
HINT_BUDGET_FRACTION = 0.25


def select(manifest: Manifest, install_dir: Path, available: dict[str, list[str]], key: str,
           budget_s: float = 30.0, session_factory: SessionFactory | None = None,
           cached: dict | None = None, threads: int | None = None,
           clock: Callable[[], float] = time.perf_counter, neighbours: Sequence[Neighbour] = (),
           rss_probe: RssProbe | None = None, cache_dir_for: CacheDirFn | None = None,
           hint: SelectionHint | None = None) -> Selection:
    """Benchmark every candidate within ``budget_s`` and return the fastest healthy one.

    ``cached`` is an earlier decision for the same ``key`` (package, hardware, runtime versions):
    its winner is re-opened and health-checked without benchmarking; if that fails, select afresh.
    ``hint``: the fleet's ranking for this device's hardware class and runtime versions (the caller
    checks that it applies): only its top ``HINT_CONFIRM`` candidates are timed, within
    ``HINT_BUDGET_FRACTION`` of the budget, and ties within the noise margin go the fleet's way;
    when none of them passes here, every candidate is searched as without a hint.
    ``neighbours``: the device's other active models; the candidates are then timed alone and
    beside them (half the budget each), and ranked by the second timing.
    ``cache_dir_for``: the engine-cache folder of a candidate (None: no cache), passed to the
    session factory as ``cache_dir``.
    """
    names = tuple(n.name for n in neighbours)
    if session_factory is None:
        from edgesdk.runtime import open_session as session_factory  # lazy: imports onnxruntime
    candidates, missing = list_candidates(manifest, available)
    # Refuse a package that points out of its folder before any runtime opens anything.
    for variant in manifest.variants:
        for relative in dict.fromkeys([variant.file, *variant.files]):
            path_inside(install_dir, relative, f"variant {variant.id} file")
    absent = runtime_missing_rows(manifest, available)
    if not candidates:
        hints = "".join(f"; {row.detail}" for row in {r.candidate.runtime: r for r in absent}.values())
        raise HealthCheckError(f"no variant of {manifest.name} {manifest.version} can run here: the package needs "
                               + ", ".join(sorted({f"{m['runtime']}:{m['provider']}" for m in missing})) + hints)
    ref_in, ref_out = load_reference(install_dir, manifest)
    search = _Search(manifest, install_dir, session_factory, threads, cache_dir_for, ref_in, ref_out,
                     clock, neighbours, rss_probe or rss_bytes)
    if cached and cached.get("cache_key") == key:
        hit = next((c for c in candidates if (c.variant, c.runtime, c.provider)
                    == (cached.get("variant"), cached.get("runtime"), cached.get("provider"))), None)
        if hit is not None:
            session = None
            try:
                session = _open(session_factory, install_dir, hit, threads, cache_dir_for)
                ok, _ = _health(session, manifest, hit, ref_in, ref_out)
                if ok:
                    table = [CandidateResult(hit, "selected", detail="cached decision",
                                             resident_mb=cached.get("resident_mb"))]
                    table += [CandidateResult(c, "not_checked", detail="cached decision") for c in candidates if c != hit]
                    return Selection(hit, session, table + absent, key, from_cache=True, neighbours=names)
                session.close()
            except PackageError:
                raise  # the package itself is hostile or broken: no fresh selection can help
            except Exception:  # a runtime can raise its own types too; any failure means select afresh
                if session is not None:
                    session.close()
    if hint is not None:
        position = {(r.variant, r.provider): i for i, r in enumerate(hint.ranking)}
        top = sorted((c for c in candidates if (c.variant, c.provider) in position),
                     key=lambda c: position[(c.variant, c.provider)])[:HINT_CONFIRM]
        if top:
            results, chosen, session = search.run(top, budget_s * HINT_BUDGET_FRACTION,
                                                  lambda r: position[(r.candidate.variant, r.candidate.provider)])
            if chosen is not None:
                rest = [CandidateResult(c, "not_checked", detail=f"not timed: the fleet's ranking for this hardware "
                                        f"class ({hint.devices} devices) has it below its top {len(top)}")
                        for c in candidates if c not in top]
                return Selection(chosen, session, results + rest + absent, key, neighbours=names,
                                 from_hint=True, hint_devices=hint.devices)
    results, chosen, session = search.run(candidates, budget_s, None)
    if chosen is None:
        summary = "; ".join(f"{r.candidate.variant}@{r.candidate.provider}: {r.status} {r.detail}".strip()
                            for r in results + absent)
        raise HealthCheckError(f"no candidate passed the health check ({summary})")
    return Selection(chosen, session, results + absent, key, neighbours=names)


@dataclass
class _Search:
    """Open, verify, time and health-check a set of candidates (one selection's fixed context)."""

    manifest: Manifest
    install_dir: Path
    factory: SessionFactory
    threads: int | None
    cache_dir_for: CacheDirFn | None
    ref_in: list[dict]
    ref_out: list[dict]
    clock: Callable[[], float]
    neighbours: Sequence[Neighbour]
    rss: RssProbe

    def run(self, candidates: Sequence[Candidate], budget_s: float,
            preference: Callable[[CandidateResult], Any] | None) -> tuple[list[CandidateResult], Candidate | None, Any]:
        """(every candidate's row, the winner or None, the winner's open session or None). Every
        other session is closed."""
        results = [CandidateResult(c) for c in candidates]
        sessions = {r.candidate: s for r in results if (s := self._open_verified(r)) is not None}
        timed = [r for r in results if r.candidate in sessions]
        # Interleaved rounds, so a change of load during selection does not pick the winner.
        runners = [sessions[r.candidate] for r in timed]
        feeds = self.ref_in[0]
        if self.neighbours and runners:
            alone = time_interleaved(runners, feeds, warmup=2, max_runs=100, budget_s=budget_s / 2, clock=self.clock)
            with NeighbourLoad(self.neighbours):
                stats = time_interleaved(runners, feeds, warmup=2, max_runs=100, budget_s=budget_s / 2,
                                         clock=self.clock)
            for res, st in zip(timed, alone):
                res.p50_alone_ms = st.p50_ms
        else:
            stats = time_interleaved(runners, feeds, warmup=2, max_runs=200, budget_s=budget_s, clock=self.clock)
        for res, st in zip(timed, stats):
            res.status, res.p50_ms, res.p95_ms, res.runs = "ok", st.p50_ms, st.p95_ms, st.runs
        chosen = None
        for res in rank(results, preference=preference):
            if chosen is not None:
                res.status = "not_checked"
                continue
            try:
                ok, detail = _health(sessions[res.candidate], self.manifest, res.candidate, self.ref_in, self.ref_out)
            except Exception as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            res.health = ok
            if ok:
                res.status = "selected"
                chosen = res.candidate
            else:
                res.status, res.detail = "health_failed", detail
        for c, session in sessions.items():
            if c != chosen:
                session.close()
        return results, chosen, sessions.get(chosen) if chosen is not None else None

    def _open_verified(self, res: CandidateResult) -> Any:
        """The candidate's session, run once and (device-verified variants) gated; None when it
        cannot compete here, with the row saying why."""
        c = res.candidate
        before = self.rss()
        try:
            session = _open(self.factory, self.install_dir, c, self.threads, self.cache_dir_for)
        except RuntimeUnavailableError as exc:  # missing, or ORT silently fell back to another provider
            res.status, res.detail = "unavailable", str(exc)
            return None
        except EdgeError as exc:
            res.status, res.detail = "load_failed", str(exc)
            return None
        try:
            session.run(self.ref_in[0])  # a candidate that cannot run the reference input is out now
        except Exception as exc:  # a runtime can fail at run time in many ways; record it, go on
            res.status, res.detail = "load_failed", str(exc) if isinstance(exc, EdgeError) else \
                f"{type(exc).__name__}: {exc}"
            session.close()
            return None
        try:
            refused = _device_verify(session, self.manifest, c, self.ref_in, self.ref_out)
        except HealthCheckError as exc:  # the manifest's gate or reference is unusable
            refused = str(exc)
        except Exception as exc:
            refused = f"{type(exc).__name__}: {exc}"
        if refused is not None:
            res.status, res.detail, res.health = "gate_failed", f"device gate: {refused}", False
            session.close()
            return None
        after = self.rss()
        grew = (after - before) / (1 << 20) if before is not None and after is not None else 0.0
        res.resident_mb = round(max(grew, files_mb(self.install_dir, self.manifest, c.variant)), 3)
        return session


def selection_record(selection: Selection) -> dict:
    """What is cached and reported: the winner, the key and the whole table."""
    return selection.to_dict() | {"chosen": asdict(selection.chosen)}
