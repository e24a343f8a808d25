"""The install sequence (DESIGN §6): fetch → verify → extract → check target → select → check the
memory budget → activate; per model name, as many names as the device holds.

Each install concerns one model name: its versions, its fallback, its selection cache and its
events (``model``); the other active models keep serving throughout, and the new model's
candidates are timed beside them (`agent.neighbours`). Any failure leaves the name's previous
version active and serving, and is reported as one `failed` event with a one-line reason. An
install whose resident memory, added to the other models', would exceed the device's budget is
refused before the switch, with the numbers. Compiled engines (OpenVINO blobs, TensorRT engines)
are kept per version and candidate in `agent.engine_cache`, so the next activation skips the
compile; they go with the version and stay within the cache's bound. The fetch is a parameter (the daemon passes its MQTT transfer;
tests can pass a local copy), and so are the hardware facts, the providers and the session
factory, so every step can be driven with faults injected.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesdk.atomicfile import write_bytes_atomic, write_text_atomic
from edgesdk.errors import ConfigError, EdgeError, InstallError, TransferStalledError, TrustError, map_os_errors
from edgesdk.manifest import MANIFEST_NAME, Manifest
from edgesdk.package import extract_package
from edgesdk.profiles import TargetProfile, load_builtin
from edgesdk.protocol import DeploymentStatement, InstallEventKind
from edgesdk.protocol.selection_hint import SelectionHint

from agent.engine_cache import EngineCache
from agent.hardware import HardwareInfo, check_target
from agent.model_host import ActiveModel, ModelHost, prepare_feeds
from agent.neighbours import Neighbour
from agent.selection import Selection, cache_key, load_reference, select
from agent.store import VersionStore

log = logging.getLogger("edge-agent")
EmitFn = Callable[..., None]  # emit(kind: InstallEventKind, package_id: str, **fields)
FetchFn = Callable[[DeploymentStatement, Callable[[float], None]], Path]
KeysFn = Callable[[], list]  # the release keys trusted now (a trust root may rotate them)
DRAIN_TIMEOUT_S = 10.0
UNDEPLOY_GRACE_S = 24 * 3600.0  # an undeployed model's files stay this long (a redeploy needs no download)
# Written into a version's folder after its .edgepkg bytes were checked against the package id,
# so a version folder can later be tied to the statement that names it (mix-and-match check).
ORIGIN_NAME = ".edgesdk-origin.json"


class InstallOutcome(enum.Enum):
    """How `Installer.install` ended."""

    ACTIVE = "active"  #: the statement's package is the active, serving version
    FAILED = "failed"  #: refused or failed; the previous version serves; reported as `failed`
    RETRY = "retry"  #: the transfer stalled (repository gone or too slow): try again later


class Installer:
    """Owns the version store and the model host's active models."""

    def __init__(self, store: VersionStore, host: ModelHost, trusted_keys: list | KeysFn, hardware: HardwareInfo,
                 available: dict[str, list[str]], emit: EmitFn, *, profile: TargetProfile | None = None,
                 budget_s: float = 30.0, session_factory: Callable[..., Any] | None = None,
                 clock: Callable[[], float] = time.time, memory_budget_mb: float | None = None,
                 undeploy_grace_s: float = UNDEPLOY_GRACE_S, rss_probe: Callable[[], int | None] | None = None,
                 engine_cache: EngineCache | None = None) -> None:
        self.store, self.host = store, host
        self._release_keys: KeysFn = trusted_keys if callable(trusted_keys) else (lambda keys=list(trusted_keys): keys)
        self.hardware, self.available, self.emit = hardware, available, emit
        self.profile, self.budget_s, self.session_factory, self.clock = profile, budget_s, session_factory, clock
        if memory_budget_mb is None and profile is not None:
            memory_budget_mb = profile.budgets.max_memory_mb
        self.memory_budget_mb = memory_budget_mb
        self.undeploy_grace_s = undeploy_grace_s
        self.rss_probe = rss_probe
        # None: sessions compile from scratch every time. A factory written before engine caches
        # (no ``cache_dir`` parameter) keeps working, without one.
        self.engine_cache = engine_cache if _takes_cache_dir(session_factory) else None
        self.status_path = store.data_dir / "status.json"
        self.last_selection: dict[str, dict[str, Any]] = {}  # per model name
        self.last_error: dict[str, str] = {}  # per model name: the last install failure, until one succeeds

    # -- start-up ------------------------------------------------------------------------------
    def restore(self) -> list[tuple[InstallEventKind, str, str, str]]:
        """At start: repair the store after a crash, then load and health-check each name's active
        version (one name failing never keeps another from starting).

        Returns what happened as (event kind, package id, reason, model name) for the daemon to report.
        """
        # What recovery did, as events: a broken active version rolled back; an install a crash
        # interrupted, a state reset, a forgotten fallback as failed; housekeeping is only logged.
        report = [(InstallEventKind.ROLLED_BACK if note.kind == "rolled_back" else InstallEventKind.FAILED,
                   note.package_id, note.reason, note.name) for note in self.store.recover() if note.kind != "cleaned"]
        for name in self.store.names():
            report += self._restore_one(name)
        self._bound_engine_cache()  # engine_cache_mb may have shrunk since the last run
        self._write_status()
        return report

    def _restore_one(self, name: str) -> list[tuple[InstallEventKind, str, str, str]]:
        report = []
        for _ in range(2):  # the active version, then (if it no longer passes) the previous one
            active = self.store.active(name)
            if not active:
                break
            package_id = active["package_id"]
            try:
                manifest = self._manifest(package_id)
                selection = self._select(name, package_id, manifest, cached=active)
                self._serve(name, package_id, manifest, selection)
                return report
            except EdgeError as exc:
                self.last_error[name] = f"active version {name} {package_id[:12]} no longer starts: {exc}"
                report.append((InstallEventKind.FAILED, package_id, self.last_error[name], name))
                try:
                    self.store.rollback(name)
                except InstallError:
                    break
                back = self.store.active(name)["package_id"]
                report.append((InstallEventKind.ROLLED_BACK, back, f"{name}: rolled back to {back[:12]}", name))
        return report

    # -- the install sequence ------------------------------------------------------------------
    @property
    def trusted_keys(self) -> list:
        return self._release_keys()

    def active_version(self, name: str) -> str | None:
        """The version of package ``name`` this device runs (None: it runs no such package)."""
        model = self.host.get(name)
        return model.version if model is not None else None

    def install(self, statement: DeploymentStatement, fetch: FetchFn) -> InstallOutcome:
        """Install what ``statement`` names. Failures are reported (one `failed` event), never raised."""
        pid, rollout, name = statement.package_id, statement.rollout_id, statement.name
        active = self.store.active(name)
        if active and active["package_id"] == pid and self.host.get(name) is not None:
            return InstallOutcome.ACTIVE
        emit = lambda kind, **kw: self.emit(kind, pid, rollout_id=rollout, model=name, **kw)  # noqa: E731
        try:
            # A version folder is used only if it can be tied to the package id (its origin
            # record); one left by an older agent or poisoned is fetched and verified again
            # (`stage` replaces a folder that is neither active nor previous).
            if not self.store.has_version(pid) or self._origin_problem(pid) is not None:
                self._download_and_extract(statement, fetch, emit)
                problem = self._origin_problem(pid)
                if problem is not None:
                    raise TrustError(f"version {pid[:12]} cannot be tied to its package id: {problem}")
            manifest = self._manifest(pid)
            self._check_statement_matches(statement, manifest)
            self._check_target(manifest)
            selection = self._select(name, pid, manifest, cached=None, hint=self._applicable_hint(statement))
            try:
                self._check_memory(name, manifest, selection)
            except InstallError:
                selection.session.close()
                raise
            emit(InstallEventKind.SELECTED, table=[r.to_dict() for r in selection.table],
                 extra={"variant": selection.chosen.variant, "provider": selection.chosen.provider,
                        "from_cache": selection.from_cache, "neighbours": list(selection.neighbours),
                        "resident_mb": selection.resident_mb, "from_hint": selection.from_hint})
            emit(InstallEventKind.HEALTH_CHECKED)
            self._activate(name, pid, manifest, selection, emit)
            self._bound_engine_cache(pid, selection)
            return InstallOutcome.ACTIVE
        except TransferStalledError as exc:
            self.last_error[name] = f"{name} {pid[:12]}: {exc}"
            emit(InstallEventKind.FAILED, reason=f"{exc} (will retry)", extra={"retry": True})
            self._write_status()
            return InstallOutcome.RETRY
        except EdgeError as exc:
            self.last_error[name] = f"{name} {pid[:12]}: {exc}"
            emit(InstallEventKind.FAILED, reason=str(exc))
            self._write_status()
            return InstallOutcome.FAILED

    def undeploy(self, name: str, rollout_id: str | None = None) -> None:
        """Unload model ``name`` (its requests in flight finish first) and forget its versions; their
        files go after the grace period (`collect_garbage`). Reported as one `undeployed` event;
        nothing to do for a name not installed (reported the same, so the operator's wait ends)."""
        old = self.host.swap(name, None)
        if old is not None:
            self.host.drain(old, DRAIN_TIMEOUT_S)
            old.session.close()
        freed = self.store.deactivate(name)
        self.last_selection.pop(name, None)
        self.last_error.pop(name, None)
        self._write_status()
        removed = self.collect_garbage()  # with no grace period, the disk is free before the event
        self.emit(InstallEventKind.UNDEPLOYED, old.package_id if old else "", model=name, rollout_id=rollout_id,
                  extra={"freed_after_s": self.undeploy_grace_s, "versions": freed, "removed": removed})

    def collect_garbage(self) -> list[str]:
        """Remove versions no name uses any more (undeployed ones once their grace period is over)."""
        cache = self.engine_cache
        try:
            removed = self.store.gc(keep=2, grace_s=self.undeploy_grace_s,
                                    on_removed=None if cache is None else cache.remove_package)
        except (EdgeError, OSError):
            return []
        if cache is not None:
            with contextlib.suppress(EdgeError, OSError):
                cache.prune(self.store.installed())  # engines whose version went without them (a crash)
        return removed

    def _download_and_extract(self, statement: DeploymentStatement, fetch: FetchFn, emit: Callable[..., None]) -> None:
        pid = statement.package_id
        emit(InstallEventKind.DOWNLOADING, progress=0.0)
        last = [0.0]

        def progress(fraction: float) -> None:
            if fraction - last[0] >= 0.1 or fraction >= 1.0:  # an event per 10 %
                last[0] = fraction
                emit(InstallEventKind.DOWNLOADING, progress=round(min(fraction, 1.0), 3))

        package_path = fetch(statement, progress)
        # The fetcher checked the whole file against the statement's sha256; check here too, at
        # the point of use, since the fetch is a parameter (a cached or copied file must match).
        digest = _sha256_file(package_path)
        if digest != pid:
            with contextlib.suppress(OSError):
                package_path.unlink()
            raise TrustError(f"mix-and-match refused: the package bytes hash to {digest[:12]}, "
                             f"the statement names {pid[:12]}")
        emit(InstallEventKind.DOWNLOADED)

        def extract(staging: Path):
            opened = extract_package(package_path, staging, self.trusted_keys)
            origin = {"package_id": pid, "manifest_sha256": _sha256_file(staging / MANIFEST_NAME)}
            with map_os_errors(f"write {staging / ORIGIN_NAME}"):
                write_bytes_atomic(staging / ORIGIN_NAME, json.dumps(origin).encode())
            return opened

        opened = self.store.stage(pid, extract)
        emit(InstallEventKind.VERIFIED, extra={"signed_by": opened.signer})
        emit(InstallEventKind.EXTRACTED)
        with contextlib.suppress(OSError):
            package_path.unlink()

    def _origin_problem(self, pid: str) -> str | None:
        """Why versions/{pid} cannot be tied to package id ``pid`` (None: it can)."""
        folder = self.store.install_dir(pid)
        try:
            origin = json.loads((folder / ORIGIN_NAME).read_bytes())
            manifest_digest = _sha256_file(folder / MANIFEST_NAME)
        except (OSError, ValueError) as exc:
            return f"no readable {ORIGIN_NAME} ({type(exc).__name__})"
        if not isinstance(origin, dict) or origin.get("package_id") != pid:
            return f"{ORIGIN_NAME} names another package"
        if origin.get("manifest_sha256") != manifest_digest:
            return f"{MANIFEST_NAME} changed after it was verified"
        return None

    @staticmethod
    def _check_statement_matches(statement: DeploymentStatement, manifest: Manifest) -> None:
        """The signed statement and the signed manifest must name the same package."""
        for field in ("name", "version", "target"):
            said, got = getattr(statement, field), getattr(manifest, field)
            if said != got:
                raise TrustError(f"mix-and-match refused: the statement names {field} {said!r}, the package "
                                 f"is {got!r}")

    def _activate(self, name: str, pid: str, manifest: Manifest, selection: Selection,
                  emit: Callable[..., None]) -> None:
        old = self._serve(name, pid, manifest, selection)
        record = self._selection_record(selection)
        try:
            self.store.activate(name, pid, record)
            self._smoke_test(name, pid, manifest)
        except EdgeError as exc:
            # Back to what served before: the old model object is still loaded.
            new = self.host.swap(name, old)
            if new is not None:
                new.session.close()
            with contextlib.suppress(InstallError):
                if (self.store.active(name) or {}).get("package_id") == pid:
                    self.store.rollback(name)
            emit(InstallEventKind.ROLLED_BACK, reason=f"new version failed after the switch: {exc}")
            raise InstallError(f"activation failed and was rolled back: {exc}") from None
        if old is not None and old.session is not selection.session:
            self.host.drain(old, DRAIN_TIMEOUT_S)
            old.session.close()
        self.last_error.pop(name, None)
        emit(InstallEventKind.ACTIVATED, extra={"variant": selection.chosen.variant,
                                                "provider": selection.chosen.provider})
        self._write_status()
        self.collect_garbage()

    def _smoke_test(self, name: str, pid: str, manifest: Manifest) -> None:
        """One inference on the now-active model, on a reference input, after the switch.

        On its session, with the feeds checked as a request's are, but not through
        `ModelHost.infer`: that records the call in the telemetry window, and this call is the
        agent's own, not an application's request (the fleet would count one per install).
        """
        ref_in, _ = load_reference(self.store.install_dir(pid), manifest)
        model = self.host.get(name)
        if model is None or model.package_id != pid:
            raise InstallError(f"version {pid[:12]} is not the active model after the switch")
        try:
            model.session.run(prepare_feeds(model, ref_in[0]))
        except EdgeError:
            raise
        except Exception as exc:  # runtimes raise their own types; any of them fails the switch
            raise InstallError(f"smoke test of {model.variant} on {model.provider} failed: "
                               f"{type(exc).__name__}: {exc}") from None

    # -- pieces --------------------------------------------------------------------------------
    def _manifest(self, pid: str) -> Manifest:
        path = self.store.install_dir(pid) / MANIFEST_NAME
        try:
            return Manifest.from_bytes(path.read_bytes())
        except OSError as exc:
            raise InstallError(f"version {pid[:12]}: cannot read {MANIFEST_NAME}: {exc.strerror}") from None

    def _check_target(self, manifest: Manifest) -> None:
        if self.profile is not None and manifest.target != self.profile.name:
            raise InstallError(f"package is for target {manifest.target}; this device is configured as "
                               f"{self.profile.name}")
        try:
            profile = self.profile if self.profile is not None else load_builtin(manifest.target)
        except ConfigError:  # a user's own profile: the manifest carries its architecture
            if manifest.architecture and manifest.architecture != self.hardware.arch:
                raise InstallError(f"package target {manifest.target} is {manifest.architecture}; this device "
                                   f"is {self.hardware.arch}") from None
            return
        problems = check_target(self.hardware, profile)
        if problems:
            raise InstallError(f"package target {manifest.target} does not fit this device: {problems[0]}")

    def _check_memory(self, name: str, manifest: Manifest, selection: Selection) -> None:
        """Refuse, before the switch, an install that would take the models past the memory budget.
        The version it replaces does not count (it is unloaded after the switch)."""
        budget = self.memory_budget_mb
        need = selection.resident_mb
        if budget is None or need is None:
            return
        others = {n: self._resident_mb(m) for n, m in self.host.models().items() if n != name}
        used = sum(others.values())
        if used + need > budget:
            held = ", ".join(f"{n} {mb:.1f} MB" for n, mb in others.items()) or "no other model"
            raise InstallError(f"memory budget refused {manifest.name}@{manifest.version} "
                               f"({selection.chosen.variant} on {selection.chosen.provider}): it needs {need:.1f} MB, "
                               f"the other models hold {used:.1f} MB ({held}), the budget is {budget:g} MB")

    @staticmethod
    def _resident_mb(model: ActiveModel) -> float:
        value = model.extra.get("resident_mb")
        return float(value) if isinstance(value, (int, float)) else 0.0

    def _neighbours(self, name: str) -> list[Neighbour]:
        """The other active models, each with its first reference input, for interference timing."""
        out = []
        for other, model in self.host.models().items():
            if other == name:
                continue
            try:
                manifest = self._manifest(model.package_id)
                ref_in, _ = load_reference(self.store.install_dir(model.package_id), manifest)
                out.append(Neighbour(other, model.session, prepare_feeds(model, ref_in[0])))
            except EdgeError:  # a neighbour without usable reference input is timed without
                continue
        return out

    def _applicable_hint(self, statement: DeploymentStatement) -> SelectionHint | None:
        """The statement's fleet ranking when it was measured on this hardware class with these
        runtime versions; None otherwise (the device then searches every candidate)."""
        hint = statement.hint
        if hint is None or not hint.applies_to(self.hardware.hardware_class, dict(self.hardware.runtimes)):
            return None
        return hint

    def _select(self, name: str, pid: str, manifest: Manifest, cached: dict | None,
                hint: SelectionHint | None = None) -> Selection:
        key = cache_key(pid, self.hardware.fingerprint(), dict(self.hardware.runtimes))
        cached = cached or self._cached_selection(name, pid)
        cache = self.engine_cache
        selection = select(manifest, self.store.install_dir(pid), self.available, key, budget_s=self.budget_s,
                           session_factory=self.session_factory, cached=cached,
                           neighbours=self._neighbours(name), rss_probe=self.rss_probe,
                           cache_dir_for=None if cache is None else (lambda c: cache.dir_for(pid, c, key)),
                           hint=hint)
        self.last_selection[name] = self._selection_record(selection) | {"package_id": pid}
        return selection

    def _bound_engine_cache(self, pid: str | None = None, selection: Selection | None = None) -> None:
        """After an activation: drop the engines of the candidates that lost (``pid``'s), then evict
        the least recently used versions' engines beyond the bound. Never fails an install."""
        cache = self.engine_cache
        if cache is None:
            return
        try:
            if pid is not None and selection is not None:
                cache.retain(pid, cache.dir_for(pid, selection.chosen, selection.cache_key))
            evicted = cache.enforce_limit(keep={m.package_id for m in self.host.models().values()})
        except (EdgeError, OSError):  # the cache is an optimisation (its own errors are warnings)
            return
        if evicted:
            log.info("engine cache: evicted the engines of %s (over %g MB)",
                     ", ".join(p[:12] for p in evicted), cache.max_mb)

    def _cached_selection(self, name: str, pid: str) -> dict | None:
        for record in (self.store.active(name), self.store.previous(name)):
            if record and record.get("package_id") == pid:
                return record
        return None

    @staticmethod
    def _selection_record(selection: Selection) -> dict[str, Any]:
        return {"variant": selection.chosen.variant, "runtime": selection.chosen.runtime,
                "provider": selection.chosen.provider, "cache_key": selection.cache_key,
                "resident_mb": selection.resident_mb, "neighbours": list(selection.neighbours),
                "table": [r.to_dict() for r in selection.table]}

    def _serve(self, name: str, pid: str, manifest: Manifest, selection: Selection) -> ActiveModel | None:
        if manifest.name != name:
            raise InstallError(f"version {pid[:12]} is package {manifest.name!r}, not {name!r}")
        model = ActiveModel(session=selection.session, package_id=pid, name=manifest.name,
                            version=manifest.version, variant=selection.chosen.variant,
                            provider=selection.chosen.provider, runtime=selection.chosen.runtime,
                            inputs=tuple(manifest.inputs), outputs=tuple(manifest.outputs),
                            extra={"selection": [r.to_dict() for r in selection.table],
                                   "resident_mb": selection.resident_mb})
        return self.host.swap(name, model)

    def status(self) -> dict[str, Any]:
        """Per model name: what is active, its fallback, the last selection and the last error."""
        models: dict[str, Any] = {}
        for name in sorted(set(self.store.names()) | set(self.host.models()) | set(self.last_error)):
            model = self.host.get(name)
            models[name] = {
                "active": None if model is None else {
                    "package_id": model.package_id, "name": model.name, "version": model.version,
                    "release": model.release, "variant": model.variant, "runtime": model.runtime,
                    "provider": model.provider, "resident_mb": model.extra.get("resident_mb")},
                "previous": self.store.previous(name),
                "last_selection": self.last_selection.get(name),
                "last_error": self.last_error.get(name),
            }
        return {"models": models, "memory_budget_mb": self.memory_budget_mb, "updated_at": self.clock()}

    def _write_status(self) -> None:
        """`edge-agent status` reads this file, so it works whether or not the daemon runs."""
        with contextlib.suppress(OSError):
            write_text_atomic(self.status_path, json.dumps(self.status(), indent=1, default=str))


def _takes_cache_dir(factory: Callable[..., Any] | None) -> bool:
    """Whether ``factory`` (None: `edgesdk.runtime.open_session`) accepts ``cache_dir=``."""
    if factory is None:
        return True
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume open_session's
        return True
    return any(p.name == "cache_dir" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with map_os_errors(f"read {path}"), open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
