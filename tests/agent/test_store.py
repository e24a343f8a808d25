"""VersionStore: an agent killed at any point of an install restarts into the old or the new version.

The kill tests run a real child process that stages and activates a real signed package, stop it
with SIGKILL at a named point (Mender's Killed_in_<State> cases), then recover in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.store import RecoveryNote, VersionStore
from edgesdk.errors import InstallError, SignatureError
from edgesdk.manifest import MANIFEST_NAME, Manifest, TensorSpec, Variant
from edgesdk.package import extract_package, write_package
from edgesdk.signing import generate_keys, load_private_key, load_public_key

ROOT = Path(__file__).resolve().parents[2]
SELECTION = {"variant": "onnx-fp32", "runtime": "onnxruntime", "provider": "CPUExecutionProvider"}

CHILD = r"""
import os, sys, tarfile
from agent.store import RecoveryNote, VersionStore
from edgesdk.package import extract_package
from edgesdk.signing import load_public_key

data_dir, package, public_key, package_id, action = sys.argv[1:6]
kill_at = os.environ["EDGE_AGENT_KILL_AT"]

def checkpoint(name):
    print(name, flush=True)
    if name == kill_at:
        os.read(0, 1)  # wait here for SIGKILL; the parent never writes to stdin

def extract(dest):
    if kill_at == "mid-extract":  # killed with the manifest and one file of two on disk
        with tarfile.open(package) as tar:
            for name in ("manifest.json", "manifest.sig", "model.onnx"):
                tar.extract(name, dest, filter="data")
        checkpoint("mid-extract")
    return extract_package(package, dest, [load_public_key(public_key)])

store = VersionStore(data_dir, checkpoint=checkpoint)
if action == "install":
    store.stage(package_id, extract)
    store.activate("detector", package_id, {"variant": "onnx-fp32", "runtime": "onnxruntime",
                                "provider": "CPUExecutionProvider"})
elif action == "rollback":
    store.rollback("detector")
elif action == "gc":
    store.gc(keep=2)
print("done", flush=True)
"""


@pytest.fixture
def keys(tmp_path: Path):
    pair = generate_keys(tmp_path / "keys")
    return load_private_key(pair.private_path), pair.public_path


def make_package(tmp_path: Path, keys, version: str, size: int = 4096, name: str = "detector") -> Path:
    private, _ = keys
    src = tmp_path / f"src-{name}-{version}"
    src.mkdir()
    (src / "model.onnx").write_bytes(version.encode() * (size // len(version)))
    (src / "weights.bin").write_bytes(os.urandom(size))
    manifest = Manifest(
        name=name, version=version, target="x86-64-cpu", source={"filename": "m.onnx"},
        inputs=[TensorSpec("x", "float32", (1, 3))], outputs=[TensorSpec("y", "float32", (1, 2))],
        variants=[Variant(id="onnx-fp32", kind="onnx-fp32", format="onnx", precision="fp32",
                          runtime="onnxruntime", file="model.onnx", files=["model.onnx", "weights.bin"])])
    return write_package(tmp_path / f"{name}-{version}.edgepkg", manifest,
                         {"model.onnx": src / "model.onnx", "weights.bin": src / "weights.bin"}, private)


def install(store: VersionStore, package_id: str, package: Path, keys, name: str = "detector") -> None:
    store.stage(package_id, lambda dest: extract_package(package, dest, [load_public_key(keys[1])]))
    store.activate(name, package_id, SELECTION)


def assert_complete(folder: Path) -> None:
    """Every file the manifest lists is there with its exact sha256."""
    manifest = Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes())
    for name, entry in manifest.files.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry.sha256, name


def assert_no_leftovers(data_dir: Path) -> None:
    names = [p.name for p in (data_dir / "versions").iterdir()] + [p.name for p in data_dir.iterdir()]
    assert not [n for n in names if n.endswith(".partial") or n.startswith(".trash-") or n.endswith(".tmp")]


def run_child_killed_at(data_dir: Path, package: Path, public_key: Path, kill_at: str,
                        action: str = "install", package_id: str = "detector-2") -> list[str]:
    """Run the child until it reports ``kill_at``, SIGKILL it there; return the points it passed."""
    env = {**os.environ, "EDGE_AGENT_KILL_AT": kill_at, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir), str(package), str(public_key),
                             package_id, action], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if seen[-1] == kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    proc.stdin.close(), proc.stdout.close(), proc.stderr.close()
    if kill_at in seen:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0 and seen[-1] == "done", stderr
    return seen


@pytest.fixture
def installed_old(tmp_path: Path, keys):
    """A data dir whose active version is detector-1, and a signed detector-2 package to install."""
    data_dir = tmp_path / "data"
    install(VersionStore(data_dir), "detector-1", make_package(tmp_path, keys, "1.0"), keys)
    return data_dir, make_package(tmp_path, keys, "2.0")


@pytest.mark.parametrize("kill_at, expected_active", [
    ("before-extract", "detector-1"),
    ("mid-extract", "detector-1"),
    ("after-extract", "detector-1"),
    ("after-rename", "detector-1"),
    ("before-replace", "detector-1"),
    ("after-replace", "detector-2"),
    ("never", "detector-2"),  # not killed: the install completes
])
def test_killed_during_install_restarts_into_old_or_new_version(
        installed_old, keys, kill_at: str, expected_active: str) -> None:
    data_dir, package = installed_old

    passed = run_child_killed_at(data_dir, package, keys[1], kill_at)
    store = VersionStore(data_dir)  # the restarted agent
    report = store.recover()

    assert kill_at == "never" or passed[-1] == kill_at
    active = store.active("detector")
    assert active is not None and active["package_id"] == expected_active
    assert_complete(store.install_dir(active["package_id"]))
    if expected_active == "detector-2":
        assert store.previous("detector")["package_id"] == "detector-1"
    if store.install_dir("detector-2").exists():  # never a half version under its final name
        assert_complete(store.install_dir("detector-2"))
    assert_no_leftovers(data_dir)
    assert all(isinstance(note, RecoveryNote) for note in report)
    if kill_at in ("mid-extract", "after-extract"):  # the crash cut an install of detector-2 short
        assert [(n.kind, n.package_id) for n in report] == [("abandoned_install", "detector-2")]

    install(store, "detector-2", package, keys)  # the agent retries the install, and it works
    assert store.active("detector")["package_id"] == "detector-2"
    assert store.previous("detector")["package_id"] == "detector-1"


@pytest.mark.parametrize("kill_at", ["before-replace", "after-replace"])
def test_killed_during_rollback_leaves_one_of_the_two_versions_active(
        installed_old, keys, kill_at: str) -> None:
    data_dir, package = installed_old
    install(VersionStore(data_dir), "detector-2", package, keys)

    run_child_killed_at(data_dir, package, keys[1], kill_at, action="rollback")
    store = VersionStore(data_dir)
    store.recover()

    expected = "detector-2" if kill_at == "before-replace" else "detector-1"
    assert store.active("detector")["package_id"] == expected
    assert_complete(store.install_dir(expected))
    assert_no_leftovers(data_dir)


def test_killed_during_gc_leaves_each_version_complete_or_gone(installed_old, keys, tmp_path: Path) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "detector-2", package, keys)
    install(store, "detector-3", make_package(tmp_path, keys, "3.0"), keys)  # detector-1 now unused

    run_child_killed_at(data_dir, package, keys[1], "trash-renamed", action="gc")
    store = VersionStore(data_dir)
    report = store.recover()

    assert store.installed() == ["detector-2", "detector-3"]
    assert any(".trash-detector-1" in note.reason and note.kind == "cleaned" for note in report)
    assert store.active("detector")["package_id"] == "detector-3"
    assert_no_leftovers(data_dir)


def test_rollback_swaps_active_and_previous(installed_old, keys) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir, clock=lambda: 1_700_000_000.0)
    install(store, "detector-2", package, keys)

    restored = store.rollback("detector")

    assert restored["package_id"] == "detector-1" and restored["provider"] == "CPUExecutionProvider"
    assert restored["activated_at"] == "2023-11-14T22:13:20Z"
    assert store.active("detector") == restored
    assert store.previous("detector")["package_id"] == "detector-2"
    state = json.loads((data_dir / "active.json").read_text())
    assert set(state) == {"version", "models", "removed"} and set(state["models"]) == {"detector"}


def test_rollback_without_previous_fails_and_changes_nothing(installed_old) -> None:
    data_dir, _ = installed_old
    store = VersionStore(data_dir)
    before = (data_dir / "active.json").read_bytes()

    with pytest.raises(InstallError, match="no previous version"):
        store.rollback("detector")

    assert (data_dir / "active.json").read_bytes() == before


def test_rollback_to_a_deleted_version_fails(installed_old, keys) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "detector-2", package, keys)
    (store.install_dir("detector-1") / "weights.bin").unlink()

    with pytest.raises(InstallError, match="cannot roll back detector to detector-1: weights.bin is missing"):
        store.rollback("detector")
    assert store.active("detector")["package_id"] == "detector-2"


@pytest.mark.parametrize("damage, why", [
    (lambda folder: os.rename(folder, folder.with_name("moved-away")), "its folder is missing"),
    (lambda folder: (folder / MANIFEST_NAME).unlink(), "it has no manifest.json"),
    (lambda folder: (folder / "weights.bin").write_bytes(b"short"), "weights.bin has 5 bytes"),
])
def test_recover_falls_back_to_previous_when_active_folder_is_broken(installed_old, keys, damage, why) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "detector-2", package, keys)
    damage(store.install_dir("detector-2"))

    report = VersionStore(data_dir).recover()

    assert store.active("detector")["package_id"] == "detector-1" and store.previous("detector") is None
    assert len(report) == 1 and why in report[0].reason
    assert report[0].kind == "rolled_back" and report[0].package_id == "detector-2"  # the broken one
    assert "fell back to previous version detector-1" in report[0].reason


def test_recover_with_broken_active_and_no_previous_leaves_nothing_active(installed_old) -> None:
    data_dir, _ = installed_old
    store = VersionStore(data_dir)
    (store.install_dir("detector-1") / MANIFEST_NAME).unlink()

    report = store.recover()

    assert store.active("detector") is None
    assert report == [RecoveryNote("deactivated", "detector-1", report[0].reason, "detector")]
    assert "no previous version" in report[0].reason


def test_recover_moves_a_corrupt_state_file_aside(installed_old) -> None:
    data_dir, _ = installed_old
    (data_dir / "active.json").write_bytes(b"\xff\x00{not json")

    report = VersionStore(data_dir).recover()

    assert report[0].kind == "state_reset" and "corrupt state file" in report[0].reason
    assert VersionStore(data_dir).active("detector") is None
    assert list(data_dir.glob("active.json.corrupt-*"))


def test_recover_on_a_clean_store_reports_nothing(installed_old) -> None:
    data_dir, _ = installed_old
    assert VersionStore(data_dir).recover() == []


def test_failed_extraction_leaves_nothing_and_keeps_the_active_version(installed_old, tmp_path: Path) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    stranger = load_public_key(generate_keys(tmp_path / "other").public_path)

    with pytest.raises(SignatureError):
        store.stage("detector-2", lambda dest: extract_package(package, dest, [stranger]))

    assert store.installed() == ["detector-1"]
    assert store.active("detector")["package_id"] == "detector-1"
    assert_no_leftovers(data_dir)


def test_activate_refuses_an_incomplete_version(installed_old, keys) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    store.stage("detector-2", lambda dest: extract_package(package, dest, [load_public_key(keys[1])]))
    (store.install_dir("detector-2") / "model.onnx").unlink()

    with pytest.raises(InstallError, match="cannot activate detector-2: model.onnx is missing"):
        store.activate("detector", "detector-2", SELECTION)
    with pytest.raises(InstallError, match="selection needs a string 'provider'"):
        store.activate("detector", "detector-1", {"variant": "onnx-fp32", "runtime": "onnxruntime"})
    assert store.active("detector")["package_id"] == "detector-1"


@pytest.mark.parametrize("package_id", ["../evil", "a/b", ".hidden", "x.partial", "", "a" * 200])
def test_hostile_package_id_never_becomes_a_path(tmp_path: Path, package_id: str) -> None:
    store = VersionStore(tmp_path / "data")

    with pytest.raises(InstallError, match="invalid package id"):
        store.stage(package_id, lambda dest: None)
    assert store.installed() == []


def test_reactivating_the_same_version_keeps_the_older_previous(installed_old, keys) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "detector-2", package, keys)

    store.activate("detector", "detector-2", {**SELECTION, "provider": "OpenVINOExecutionProvider"})

    assert store.active("detector")["provider"] == "OpenVINOExecutionProvider"
    assert store.previous("detector")["package_id"] == "detector-1"


def test_gc_keeps_active_and_previous_and_removes_the_rest(installed_old, keys, tmp_path: Path) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "detector-2", package, keys)
    install(store, "detector-3", make_package(tmp_path, keys, "3.0"), keys)
    (data_dir / "versions" / "detector-4.partial").mkdir()

    removed = store.gc()

    assert removed == ["detector-1"]
    assert store.installed() == ["detector-2", "detector-3"]
    assert_no_leftovers(data_dir)


def test_gc_reports_each_removed_version_after_its_folder_is_gone(installed_old, keys, tmp_path: Path) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "detector-2", package, keys)
    install(store, "detector-3", make_package(tmp_path, keys, "3.0"), keys)  # detector-1 now unused
    seen: list[tuple[str, bool]] = []

    removed = store.gc(on_removed=lambda pid: seen.append((pid, store.install_dir(pid).exists())))

    assert removed == ["detector-1"]
    assert seen == [("detector-1", False)]  # the installer deletes its engine cache here


def test_gc_with_keep_one_forgets_the_previous_version(installed_old, keys) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "detector-2", package, keys)

    assert store.gc(keep=1) == ["detector-1"]
    assert store.previous("detector") is None
    with pytest.raises(InstallError):
        store.gc(keep=0)


def test_staging_an_installed_unused_version_replaces_it_whole(installed_old, keys) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    store.stage("detector-2", lambda dest: extract_package(package, dest, [load_public_key(keys[1])]))
    (store.install_dir("detector-2") / "weights.bin").write_bytes(b"damaged")

    store.stage("detector-2", lambda dest: extract_package(package, dest, [load_public_key(keys[1])]))

    assert_complete(store.install_dir("detector-2"))


# -- several model names ---------------------------------------------------------------------------

def _other_package(tmp_path: Path, keys, name: str, version: str) -> Path:
    return make_package(tmp_path, keys, version, name=name)


def test_each_name_has_its_own_active_and_previous_version(installed_old, keys, tmp_path: Path) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "recogniser-1", _other_package(tmp_path, keys, "recogniser", "1.0"), keys, name="recogniser")
    install(store, "detector-2", package, keys)

    assert store.names() == ["detector", "recogniser"]
    assert store.active("recogniser")["package_id"] == "recogniser-1" and store.previous("recogniser") is None
    assert store.active("detector")["package_id"] == "detector-2"
    assert store.previous("detector")["package_id"] == "detector-1"

    store.rollback("detector")  # one name's rollback never moves another
    assert store.active("detector")["package_id"] == "detector-1"
    assert store.active("recogniser")["package_id"] == "recogniser-1"
    with pytest.raises(InstallError, match="recogniser has no previous version"):
        store.rollback("recogniser")


def test_gc_keeps_every_names_versions(installed_old, keys, tmp_path: Path) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "recogniser-1", _other_package(tmp_path, keys, "recogniser", "1.0"), keys, name="recogniser")
    install(store, "detector-2", package, keys)
    install(store, "detector-3", make_package(tmp_path, keys, "3.0"), keys)

    assert store.gc() == ["detector-1"]
    assert store.installed() == ["detector-2", "detector-3", "recogniser-1"]


def test_an_undeployed_name_keeps_its_disk_for_the_grace_period_then_frees_it(installed_old, keys,
                                                                              tmp_path: Path) -> None:
    data_dir, package = installed_old
    now = [1000.0]
    store = VersionStore(data_dir, clock=lambda: now[0])
    install(store, "recogniser-1", _other_package(tmp_path, keys, "recogniser", "1.0"), keys, name="recogniser")

    assert store.deactivate("recogniser") == ["recogniser-1"]
    assert store.names() == ["detector"] and store.active("recogniser") is None
    assert store.gc(grace_s=600) == [] and "recogniser-1" in store.installed()
    now[0] += 601
    assert store.gc(grace_s=600) == ["recogniser-1"]
    assert store.installed() == ["detector-1"] and store.active("detector")["package_id"] == "detector-1"
    assert store.deactivate("recogniser") == []  # not installed: nothing to do


def test_redeploying_within_the_grace_period_keeps_the_version(installed_old, keys, tmp_path: Path) -> None:
    data_dir, _ = installed_old
    now = [1000.0]
    store = VersionStore(data_dir, clock=lambda: now[0])
    store.deactivate("detector")
    store.activate("detector", "detector-1", SELECTION)  # back before the grace period ran out
    now[0] += 10_000

    assert store.gc(grace_s=600) == []
    assert store.active("detector")["package_id"] == "detector-1"


def test_a_single_model_state_file_of_an_older_agent_is_read_as_its_models_name(installed_old) -> None:
    data_dir, _ = installed_old
    record = {**SELECTION, "package_id": "detector-1", "activated_at": "2026-01-01T00:00:00Z"}
    (data_dir / "active.json").write_text(json.dumps({"active": record, "previous": None}))

    store = VersionStore(data_dir)
    assert store.recover() == []
    assert store.names() == ["detector"] and store.active("detector")["package_id"] == "detector-1"
    assert json.loads((data_dir / "active.json").read_text())["version"] == 2  # rewritten in the new form


def test_a_broken_version_of_one_name_rolls_back_only_that_name(installed_old, keys, tmp_path: Path) -> None:
    data_dir, package = installed_old
    store = VersionStore(data_dir)
    install(store, "recogniser-1", _other_package(tmp_path, keys, "recogniser", "1.0"), keys, name="recogniser")
    install(store, "detector-2", package, keys)
    (store.install_dir("detector-2") / "weights.bin").unlink()

    report = VersionStore(data_dir).recover()

    assert [(n.kind, n.name) for n in report] == [("rolled_back", "detector")]
    assert store.active("detector")["package_id"] == "detector-1"
    assert store.active("recogniser")["package_id"] == "recogniser-1"
