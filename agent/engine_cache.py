"""Compiled-engine caches per installed version: OpenVINO's CACHE_DIR, ONNX Runtime TensorRT's
engine and timing caches, so the second activation of a model skips the compile.

    data_dir/engines/{package_id}/{variant}--{provider}--{digest}/   one candidate's compiled engines
    data_dir/engines/.trash-*                                         a folder being deleted

``digest`` is the first 16 hex digits of a sha256 over the selection's cache key (package,
hardware fingerprint, runtime versions; `agent.selection.cache_key`) with the variant and the
provider, so a runtime upgrade or a new accelerator starts an empty folder instead of loading an
engine built for another setup. A package's folder goes with its version (`remove_package`, from
the store's gc), and the whole cache is bounded (`enforce_limit`): package folders that no model
runs are evicted least recently used first.

The cache is an optimisation. Any error creating or writing a folder (a full disk, a read-only
data_dir) means that session runs without one, with a warning; an install never fails for it.
(OpenVINO itself recompiles over a truncated blob and carries on when it cannot write one.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from edgesdk.errors import describe_os_error
from edgesdk.runtime import ort_cache_options

from agent.store import PACKAGE_ID, check_package_id

log = logging.getLogger("edge-agent")
ENGINES = "engines"  # the cache's folder in data_dir
DEFAULT_MAX_MB = 2048.0  # agent.yaml engine_cache_mb; one compiled CNN is 1-3x its weights (ppocr-rec: 11 MB)
TRASH = ".trash-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")
_NAME_MAX = 64  # of the variant and of the provider part of a folder name


class CandidateLike(Protocol):
    """What the cache needs of an `agent.selection.Candidate`."""

    variant: str
    runtime: str
    provider: str


def uses_engine_cache(runtime: str, provider: str) -> bool:
    """Whether a session of ``runtime``/``provider`` keeps compiled engines in a cache folder:
    OpenVINO on every device, ONNX Runtime where `edgesdk.runtime.ort_cache_options` has options
    for the provider (TensorRT). Other candidates get no folder."""
    if runtime == "openvino":
        return True
    return runtime == "onnxruntime" and bool(ort_cache_options(provider, Path(".")))


def candidate_folder(variant: str, provider: str, cache_key: str) -> str:
    """``{variant}--{provider}--{digest}``: readable, safe as one path component, unique per candidate."""
    digest = hashlib.sha256(f"{cache_key}\0{variant}\0{provider}".encode()).hexdigest()[:16]
    return f"{_safe(variant)}--{_safe(provider)}--{digest}"


def _safe(name: str) -> str:
    cleaned = _UNSAFE.sub("_", name)[:_NAME_MAX] or "_"
    return "_" + cleaned[1:] if cleaned.startswith(".") else cleaned  # never hidden, never ".."


class EngineCache:
    """The engines folder of one agent's data_dir, bounded to ``max_mb`` (0: no cache at all)."""

    def __init__(self, root: str | Path, max_mb: float = DEFAULT_MAX_MB) -> None:
        self.root = Path(root)
        self.max_mb = max_mb

    @property
    def enabled(self) -> bool:
        return self.max_mb > 0

    def dir_for(self, package_id: str, candidate: CandidateLike, cache_key: str) -> Path | None:
        """The cache folder of ``candidate`` of version ``package_id`` under ``cache_key``, created;
        None when the candidate's runtime keeps no engines, the cache is off, or the folder cannot
        be written (then a warning, and the session compiles as if there were no cache)."""
        if not self.enabled or not uses_engine_cache(candidate.runtime, candidate.provider):
            return None
        package_dir = self.root / check_package_id(package_id)
        folder = package_dir / candidate_folder(candidate.variant, candidate.provider, cache_key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _check_writable(folder)
            os.utime(package_dir)  # last use, for the least-recently-used eviction
        except OSError as exc:
            log.warning("engine cache off for %s %s on %s: cannot write %s (%s)", package_id[:12],
                        candidate.variant, candidate.provider, folder, describe_os_error(exc))
            return None
        return folder

    def remove_package(self, package_id: str) -> bool:
        """Delete version ``package_id``'s engines (whatever the cache's size); True if there were any."""
        return self._remove(self.root / check_package_id(package_id))

    def retain(self, package_id: str, keep: Path | None) -> list[str]:
        """Delete ``package_id``'s candidate folders except ``keep`` (the chosen candidate's): the
        others were compiled during the selection and are only needed by another one."""
        package_dir = self.root / check_package_id(package_id)
        removed = []
        for entry in self._entries(package_dir):
            if keep is None or entry.name != keep.name:
                if self._remove(entry):
                    removed.append(entry.name)
        return removed

    def prune(self, installed: Iterable[str]) -> list[str]:
        """Delete the engines of versions that are not installed any more (a crash between removing
        a version and its engines leaves them), and leftovers of interrupted deletes."""
        installed = set(installed)
        removed = []
        for entry in self._entries(self.root):
            if entry.name.startswith(TRASH):
                self._remove(entry, trash=False)
            elif PACKAGE_ID.fullmatch(entry.name) and entry.name not in installed and self._remove(entry):
                removed.append(entry.name)
        return removed

    def usage_mb(self) -> dict[str, float]:
        """MB per package folder now."""
        return {e.name: round(_tree_bytes(e) / (1 << 20), 3) for e in self._package_dirs()}

    def enforce_limit(self, keep: Iterable[str] = ()) -> list[str]:
        """Evict whole package folders, least recently used first, until the cache fits ``max_mb``;
        never those of ``keep`` (the versions the device runs). With the cache off, every folder
        goes. Returns the package ids evicted."""
        keep = set(keep)
        folders = [(e, _tree_bytes(e), _mtime(e)) for e in self._package_dirs()]
        limit = self.max_mb * (1 << 20)
        total = sum(size for _, size, _ in folders)
        evicted = []
        for entry, size, _ in sorted(folders, key=lambda f: (f[2], f[0].name)):
            if total <= limit and self.enabled:
                break
            if entry.name in keep and self.enabled:
                continue
            if self._remove(entry):
                total -= size
                evicted.append(entry.name)
        if self.enabled and total > limit:
            log.warning("engine cache holds %.1f MB for the active models, over its %g MB bound "
                        "(engine_cache_mb); they keep their engines", total / (1 << 20), self.max_mb)
        return evicted

    # -- internals -----------------------------------------------------------------------------
    def _package_dirs(self) -> list[Path]:
        return [e for e in self._entries(self.root) if PACKAGE_ID.fullmatch(e.name) and e.is_dir()]

    @staticmethod
    def _entries(folder: Path) -> list[Path]:
        try:
            return sorted(e for e in folder.iterdir() if not e.is_symlink())
        except OSError:  # no cache yet, or unreadable: nothing to do
            return []

    def _remove(self, path: Path, trash: bool = True) -> bool:
        """Rename ``path`` aside into the cache's root, then delete it: a crash midway leaves a
        trash folder (`prune` clears it), never a half-deleted one a session might take for a cache."""
        try:
            if not path.exists():
                return False
            if trash:
                moved = self.root / f"{TRASH}{path.name}-{uuid.uuid4().hex[:8]}"
                os.replace(path, moved)
                path = moved
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return True
        except OSError as exc:
            log.warning("cannot delete engine cache %s: %s", path, describe_os_error(exc))
            return False


def _check_writable(folder: Path) -> None:
    """Raise OSError unless a file can be written in ``folder`` (as root, permissions never say no,
    but a full or read-only disk does)."""
    probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _tree_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
