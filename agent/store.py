"""Installed package versions on disk, and which one is active for each model name.

    data_dir/
      versions/{package_id}/         an extracted package (complete: renamed into place whole)
      versions/{package_id}.partial  an extraction in progress (removed by recover())
      versions/.trash-*              a version being deleted (renamed first, then removed)
      engines/{package_id}/          the version's compiled-engine caches (agent.engine_cache), removed
                                     with it: `gc` calls its ``on_removed`` for each version it deletes
      active.json                    {"version": 2,
                                      "models": {name: {"active": {...} | null, "previous": {...} | null}},
                                      "removed": {package_id: unix time it was undeployed}}

A device runs one active version per model name, as many names as it holds; each name keeps its
previous version as its fallback, and changing one name's record never changes another's. A
version undeployed stays on disk for a grace period (`gc`), so a redeploy within it needs no
download. The single-model file of older agents ({"active", "previous"}) is read as one name.

Each step that changes what is installed is one atomic rename (a folder, or active.json written
to a temp file, fsynced, renamed, folder fsynced), so an agent killed at any point restarts, after
`recover()`, into the old version or the new one, never a half-written one. `checkpoint` names
each point between steps; tests use it to kill a real process exactly there.

Every file operation is inside `map_os_errors`: a full or read-only disk is a `StorageError`
(an EdgeError the installer reports), never a bare OSError that ends the install thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from edgesdk.atomicfile import atomic_writer, fsync_dir
from edgesdk.errors import InstallError, PackageError, map_os_errors
from edgesdk.manifest import MANIFEST_NAME, Manifest

T = TypeVar("T")
STATE_NAME = "active.json"
PARTIAL = ".partial"
TRASH = ".trash-"
# Package ids become folder names: no separators, no leading dot, never `..`.
PACKAGE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
SELECTION_KEYS = ("variant", "runtime", "provider")

# The named points between steps, in order, for fault-injection tests.
CHECKPOINTS = ("before-extract", "after-extract", "after-rename", "before-replace", "after-replace",
               "trash-renamed")


STATE_VERSION = 2
RecoveryKind = Literal["rolled_back", "abandoned_install", "deactivated", "forgot_previous", "state_reset",
                      "cleaned"]


@dataclass(frozen=True)
class RecoveryNote:
    """One thing `VersionStore.recover()` did, for the installer to report.

    kind:
      rolled_back        the active version was unusable; the previous one is active again
      abandoned_install  an install a crash interrupted was removed (``package_id``: the one being installed)
      deactivated        the active version was unusable and there was no previous one: nothing is active
      forgot_previous    the previous version was unusable and is no longer kept as a fallback
      state_reset        active.json was corrupt: moved aside, started with no active version
      cleaned            a leftover of an interrupted delete or state write was removed (housekeeping)
    ``package_id`` is the version the note is about (for rolled_back/deactivated the unusable one,
    not the one now active); "" where no version is concerned. ``reason`` is one line. ``name``
    is the model name concerned ("" where none is).
    """

    kind: RecoveryKind
    package_id: str
    reason: str
    name: str = ""

    def __str__(self) -> str:
        return self.reason


def check_package_id(package_id: str) -> str:
    if (not isinstance(package_id, str) or not PACKAGE_ID.fullmatch(package_id)
            or package_id.endswith(PARTIAL)):
        raise InstallError(f"invalid package id {package_id!r} (letters, digits, _ . + - only)")
    return package_id


class VersionStore:
    """The versions folder and the active/previous pointers of one agent's data_dir."""

    def __init__(self, data_dir: str | Path, clock: Callable[[], float] = time.time,
                 checkpoint: Callable[[str], None] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.versions_dir = self.data_dir / "versions"
        self.state_path = self.data_dir / STATE_NAME
        self._clock = clock
        self._checkpoint = checkpoint or (lambda name: None)
        self._lock = threading.RLock()  # one mutation at a time; readers need none (atomic renames)
        with map_os_errors(f"create {self.versions_dir}"):
            self.versions_dir.mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------
    def install_dir(self, package_id: str) -> Path:
        return self.versions_dir / check_package_id(package_id)

    def has_version(self, package_id: str) -> bool:
        """The version's folder is complete: its manifest reads and every file it lists has its size."""
        return self.version_problem(package_id) is None

    def version_problem(self, package_id: str) -> str | None:
        """Why the installed version is unusable (sizes only: hashing GBs at every boot is too slow)."""
        folder = self.install_dir(package_id)
        try:
            if not folder.is_dir():
                return "its folder is missing"
            manifest = Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes())
        except FileNotFoundError:
            return f"it has no {MANIFEST_NAME}"
        except OSError as exc:
            return f"its {MANIFEST_NAME} is unreadable ({exc.strerror or type(exc).__name__})"
        except PackageError as exc:
            return f"its {MANIFEST_NAME} is unreadable ({exc})"
        for name, entry in manifest.files.items():
            try:
                path = folder / name
                if path.is_symlink():  # extraction writes regular files only: a link was planted
                    return f"{name} is a symbolic link"
                size = path.stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != entry.size:
                return f"{name} has {size} bytes, the manifest says {entry.size}"
        return None

    def installed(self) -> list[str]:
        with map_os_errors(f"list {self.versions_dir}"):
            return sorted(p.name for p in self.versions_dir.iterdir()
                          if p.is_dir() and PACKAGE_ID.fullmatch(p.name) and not p.name.endswith(PARTIAL))

    def names(self) -> list[str]:
        """The model names with an active version, sorted."""
        return sorted(n for n, slot in self._read_state()["models"].items() if slot["active"])

    def active(self, name: str) -> dict[str, Any] | None:
        return self._slot(self._read_state(), name)["active"]

    def previous(self, name: str) -> dict[str, Any] | None:
        return self._slot(self._read_state(), name)["previous"]

    def in_use(self) -> set[str]:
        """Package ids some name runs or keeps as its fallback."""
        return _referenced(self._read_state())

    # -- changing ------------------------------------------------------------------------------
    def stage(self, package_id: str, extract_fn: Callable[[Path], T]) -> T:
        """Run ``extract_fn(staging_dir)`` and rename the result into versions/{package_id}.

        ``staging_dir`` exists and is empty; `edgesdk.package.extract_package(pkg, staging_dir, keys)`
        fits (it replaces the folder it is given). A version some name runs or keeps is kept as it
        is (same id, same signed content); any other folder of that id is replaced.
        """
        final = self.install_dir(package_id)
        staging = final.with_name(final.name + PARTIAL)
        with self._lock, map_os_errors(f"install {package_id} into {self.versions_dir}"):
            self._discard(staging)
            staging.mkdir()
            self._checkpoint("before-extract")
            try:
                result = extract_fn(staging)
                if not (staging / MANIFEST_NAME).is_file():
                    raise InstallError(f"package {package_id}: extraction left no {MANIFEST_NAME}")
                fsync_dir(staging)
            except BaseException:
                # Cleanup must not hide why the install failed; recover() removes what is left.
                with contextlib.suppress(OSError):
                    self._discard(staging)
                raise
            self._checkpoint("after-extract")
            if final.exists():
                if package_id in self.in_use() and self.has_version(package_id):
                    self._discard(staging)
                    return result
                self._discard(final)
            os.replace(staging, final)
            fsync_dir(self.versions_dir)
            self._checkpoint("after-rename")
            return result

    def activate(self, name: str, package_id: str, selection: dict[str, Any]) -> None:
        """Atomically make ``package_id`` the active version of ``name`` with ``selection``; the
        name's active one becomes its previous. Other names are untouched."""
        for key in SELECTION_KEYS:
            if not isinstance(selection.get(key), str):
                raise InstallError(f"activate {package_id}: selection needs a string {key!r}")
        with self._lock, map_os_errors(f"activate {package_id} in {self.data_dir}"):
            problem = self.version_problem(package_id)
            if problem:
                raise InstallError(f"cannot activate {package_id}: {problem}")
            state = self._read_state()
            slot = self._slot(state, name)
            record = {**selection, "name": name, "package_id": package_id, "activated_at": self._now()}
            current = slot["active"]
            # Re-activating the same package (a new selection) keeps the older previous version.
            previous = slot["previous"] if current and current["package_id"] == package_id else current
            state["models"][name] = {"active": record, "previous": previous}
            state["removed"].pop(package_id, None)
            self._write_state(state)

    def rollback(self, name: str) -> dict[str, Any]:
        """Swap ``name``'s active and previous; raise InstallError (nothing changed) when it has no
        usable previous."""
        with self._lock, map_os_errors(f"roll back {name} in {self.data_dir}"):
            state = self._read_state()
            slot = self._slot(state, name)
            previous = slot["previous"]
            if previous is None:
                raise InstallError(f"{name} has no previous version to roll back to")
            problem = self.version_problem(previous["package_id"])
            if problem:
                raise InstallError(f"cannot roll back {name} to {previous['package_id']}: {problem}")
            record = {**previous, "activated_at": self._now()}
            state["models"][name] = {"active": record, "previous": slot["active"]}
            self._write_state(state)
            return record

    def deactivate(self, name: str) -> list[str]:
        """Forget ``name`` (undeploy): it has no active or previous version any more. Its versions
        that no other name uses are marked removed now; `gc` deletes them after its grace period.
        Returns those package ids (nothing when ``name`` was not installed)."""
        with self._lock, map_os_errors(f"undeploy {name} in {self.data_dir}"):
            state = self._read_state()
            slot = state["models"].pop(name, None)
            if slot is None:
                return []
            still = _referenced(state)
            now = self._clock()
            freed = [r["package_id"] for r in (slot["active"], slot["previous"])
                     if r and r["package_id"] not in still]
            for package_id in freed:
                state["removed"][package_id] = now
            self._write_state(state)
            return freed

    def gc(self, keep: int = 2, grace_s: float = 0.0,
           on_removed: Callable[[str], None] | None = None) -> list[str]:
        """Remove every version that no name runs (``keep`` >= 1) or keeps as its fallback
        (``keep`` >= 2; with 1 the fallbacks are forgotten), except those undeployed less than
        ``grace_s`` ago; and stray staging/trash folders. ``on_removed(package_id)`` runs after
        each version's folder is gone (the installer deletes its engine cache there). Returns the
        package ids removed. Not concurrent with stage() (the installer calls both from its one worker)."""
        if keep < 1:
            raise InstallError(f"gc: keep must be >= 1, got {keep}")
        with self._lock, map_os_errors(f"remove old versions from {self.versions_dir}"):
            state = self._read_state()
            changed = False
            if keep == 1:
                for slot in state["models"].values():
                    if slot["previous"]:
                        slot["previous"], changed = None, True
            kept = _referenced(state)
            now = self._clock()
            graced = {pid for pid, at in state["removed"].items() if now - at < grace_s and pid not in kept}
            removed = [v for v in self.installed() if v not in kept and v not in graced]
            stale = set(state["removed"]) - graced
            if stale:
                state["removed"] = {pid: at for pid, at in state["removed"].items() if pid in graced}
                changed = True
            if changed:  # the state first: it never names a version whose folder is going
                self._write_state(state)
            for package_id in removed:
                self._discard(self.install_dir(package_id))
                if on_removed is not None:
                    on_removed(package_id)
            self._clean_leftovers()
            return removed

    def recover(self) -> list[RecoveryNote]:
        """Run at start: clear leftovers of an interrupted install, and make sure each name's active
        version is complete (else fall back to its previous). Returns what was done, as records."""
        with self._lock, map_os_errors(f"recover {self.data_dir}"):
            report = [self._leftover_note(name) for name in self._clean_leftovers()]
            try:
                raw_state = self._read_raw()
                state = self._read_state()
            except InstallError as exc:
                broken = self.state_path.with_name(f"{STATE_NAME}.corrupt-{int(self._clock())}")
                os.replace(self.state_path, broken)
                report.append(RecoveryNote("state_reset", "", f"{exc}; moved it to {broken.name} and started "
                                                              "with no active version"))
                raw_state, state = None, _empty_state()
            changed = raw_state is not None and raw_state.get("version") != STATE_VERSION  # an older agent's file
            for name in sorted(state["models"]):
                slot = state["models"][name]
                notes, slot = self._recover_slot(name, slot)
                report.extend(notes)
                if notes:
                    changed = True
                    if slot["active"] is None and slot["previous"] is None:
                        del state["models"][name]
                    else:
                        state["models"][name] = slot
            if changed:
                self._write_state(state)
            return report

    def _recover_slot(self, name: str, slot: dict[str, Any]) -> tuple[list[RecoveryNote], dict[str, Any]]:
        report = []
        active, previous = slot["active"], slot["previous"]
        if previous and (problem := self.version_problem(previous["package_id"])):
            report.append(RecoveryNote("forgot_previous", previous["package_id"],
                                       f"{name}: previous version {previous['package_id']} is unusable ({problem}); "
                                       "forgot it", name))
            previous = None
        if active and (problem := self.version_problem(active["package_id"])):
            if previous:
                report.append(RecoveryNote("rolled_back", active["package_id"],
                                           f"{name}: active version {active['package_id']} is unusable ({problem}); "
                                           f"fell back to previous version {previous['package_id']}", name))
                active, previous = {**previous, "activated_at": self._now()}, None
            else:
                report.append(RecoveryNote("deactivated", active["package_id"],
                                           f"{name}: active version {active['package_id']} is unusable ({problem}) "
                                           "and there is no previous version; nothing is active", name))
                active = None
        return report, {"active": active, "previous": previous}

    @staticmethod
    def _leftover_note(name: str) -> RecoveryNote:
        """``{id}.partial`` is an install a crash cut short; trash and temp files are housekeeping."""
        if name.endswith(PARTIAL) and not name.startswith((TRASH, ".")):
            package_id = name[:-len(PARTIAL)]
            return RecoveryNote("abandoned_install", package_id,
                                f"removed unfinished {name}: the install of {package_id} was interrupted")
        return RecoveryNote("cleaned", "", f"removed unfinished {name}")

    # -- internals -----------------------------------------------------------------------------
    def _now(self) -> str:
        return datetime.fromtimestamp(self._clock(), timezone.utc).isoformat(timespec="seconds").replace(
            "+00:00", "Z")

    def _read_raw(self) -> dict[str, Any] | None:
        with map_os_errors(f"read {self.state_path}"):
            try:
                raw = self.state_path.read_bytes()
            except FileNotFoundError:  # caught before map_os_errors sees it: no state yet
                return None
        try:
            data = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InstallError(f"{self.state_path}: corrupt state file ({' '.join(str(exc).split())[:200]})") from None
        except RecursionError:  # json.loads on thousands of nested brackets
            raise InstallError(f"{self.state_path}: corrupt state file (nested too deeply)") from None
        if not isinstance(data, dict):
            raise InstallError(f"{self.state_path}: corrupt state file (not an object)")
        return data

    def _read_state(self) -> dict[str, Any]:
        data = self._read_raw()
        if data is None:
            return _empty_state()
        try:
            if "models" not in data:  # an older agent's single-model file
                data = {"models": {self._legacy_name(data): {k: data.get(k) for k in ("active", "previous")}}}
            models, removed = data.get("models"), data.get("removed", {})
            if not isinstance(models, dict) or not isinstance(removed, dict):
                raise ValueError("'models' and 'removed' must be objects")
            state: dict[str, Any] = {"models": {}, "removed": {}}
            for name, slot in models.items():
                if not isinstance(name, str) or not isinstance(slot, dict):
                    raise ValueError("a model entry is not an object")
                records = {k: slot.get(k) for k in ("active", "previous")}
                for record in records.values():
                    if record is not None and not (isinstance(record, dict)
                                                   and isinstance(record.get("package_id"), str)):
                        raise ValueError("a record without package_id")
                    if record is not None and not PACKAGE_ID.fullmatch(record["package_id"]):
                        raise ValueError("a record with an invalid package_id")
                if records["active"] or records["previous"]:
                    state["models"][name] = records
            for package_id, at in removed.items():
                if PACKAGE_ID.fullmatch(package_id) and isinstance(at, (int, float)) and not isinstance(at, bool):
                    state["removed"][package_id] = float(at)
        except ValueError as exc:
            raise InstallError(f"{self.state_path}: corrupt state file ({' '.join(str(exc).split())[:200]})") from None
        return state

    def _legacy_name(self, data: dict[str, Any]) -> str:
        """The model name of a single-model state file: its active (or previous) version's manifest."""
        for key in ("active", "previous"):
            record = data.get(key)
            if isinstance(record, dict) and isinstance(record.get("package_id"), str) \
                    and PACKAGE_ID.fullmatch(record["package_id"]):
                with contextlib.suppress(OSError, PackageError):
                    folder = self.install_dir(record["package_id"])
                    return Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes()).name
        return "model"

    @staticmethod
    def _slot(state: dict[str, Any], name: str) -> dict[str, Any]:
        return state["models"].get(name) or {"active": None, "previous": None}

    def _write_state(self, state: dict[str, Any]) -> None:
        doc = {"version": STATE_VERSION, "models": state["models"], "removed": state["removed"]}
        data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        with atomic_writer(self.state_path) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            self._checkpoint("before-replace")
        self._checkpoint("after-replace")

    def _discard(self, path: Path) -> None:
        """Delete a folder so that a crash midway never leaves a half-deleted version under its name."""
        if not path.exists():
            return
        trash = path.with_name(f"{TRASH}{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        fsync_dir(path.parent)
        self._checkpoint("trash-renamed")
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_leftovers(self) -> list[str]:
        removed = []
        for entry in self.versions_dir.iterdir():
            if entry.name.endswith(PARTIAL) or entry.name.startswith(TRASH):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
        # atomic_writer's temp files (".active.json.XXXX.tmp") from a write that was killed.
        for entry in self.data_dir.glob(f".{STATE_NAME}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            removed.append(entry.name)
        return sorted(removed)


def _empty_state() -> dict[str, Any]:
    return {"models": {}, "removed": {}}


def _referenced(state: dict[str, Any]) -> set[str]:
    return {r["package_id"] for slot in state["models"].values() for r in (slot["active"], slot["previous"]) if r}
