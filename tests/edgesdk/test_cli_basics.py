"""The `edgesdk` command's basics: keys, targets, verify, inspect. Every failure is one line, never a traceback."""

from __future__ import annotations

import io
import json
import os
import random
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesdk.cli import common
from edgesdk.cli.main import app
from edgesdk.errors import ConfigError, KeyFileError, PackageError
from edgesdk.manifest import Manifest, TensorSpec, Variant
from edgesdk.package import write_package
from edgesdk.profiles import builtin_profile_names
from edgesdk.signing import generate_keys, key_id, load_private_key, load_public_key

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
# A folder name long enough that any error naming a file inside it is wider than a terminal.
DEEP = "a-rather-long-folder-name-for-packages/" * 3


@pytest.fixture(autouse=True)
def terminal_80_columns(monkeypatch):
    """Rich sizes output to the terminal; pin the usual 80 columns so results do not depend on who runs."""
    monkeypatch.setattr(common.console, "width", 80)
    monkeypatch.setattr(common.out, "width", 80)


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_clean_failure(result, exit_code: int) -> None:
    """A failure the CLI handled: the documented exit code, an error line, and no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error:"), result.output
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------
# Packages to verify and inspect (built with the Python API; `edgesdk package` is tested elsewhere)


def build_package(folder: Path, private_key_path: Path, *, signed: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fp32.onnx").write_bytes(os.urandom(3000))
    (folder / "int8.onnx").write_bytes(os.urandom(1000))
    variants = [
        Variant(id="onnx-fp32", kind="onnx-fp32", format="onnx", precision="fp32", runtime="onnxruntime",
                file="variants/onnx-fp32/model.onnx", files=["variants/onnx-fp32/model.onnx"],
                metrics={"outputs": {"logits": {"cosine": 1.0, "top1_agreement": 1.0}}},
                gate={"passed": True, "failures": []},
                host_latency_ms={"p50_ms": 2.5, "p95_ms": 2.9, "speedup_vs_fp32": 1.0}, size=3000),
        Variant(id="onnx-int8", kind="onnx-int8", format="onnx", precision="int8", runtime="onnxruntime",
                file="variants/onnx-int8/model.onnx", files=["variants/onnx-int8/model.onnx"],
                quantized_nodes=12,
                metrics={"outputs": {"logits": {"cosine": 0.9931, "top1_agreement": 0.97},
                                     "boxes": {"cosine": 0.9987}}},
                gate={"passed": True, "failures": []},
                host_latency_ms={"p50_ms": 1.25, "p95_ms": 1.5, "speedup_vs_fp32": 2.0}, size=1000),
    ]
    manifest = Manifest(
        name="tiny", version="1.2.0", target="x86-64-cpu",
        source={"filename": "tiny.onnx", "sha256": "0" * 64, "size": 3000, "format": "onnx"},
        inputs=[TensorSpec("x", "float32", (1, 4))],
        outputs=[TensorSpec("logits", "float32", (1, 2)), TensorSpec("boxes", "float32", (1, 4))],
        variants=variants,
        dropped=[{"id": "onnx-int8-dynamic", "reason": "cosine 0.91 < 0.98"}],
        skipped=[{"kind": "tflite", "reason": "input is not a .tflite model"}],
    )
    files = {"variants/onnx-fp32/model.onnx": folder / "fp32.onnx",
             "variants/onnx-int8/model.onnx": folder / "int8.onnx"}
    pkg = write_package(folder / "tiny-1.2.0-x86-64-cpu.edgepkg", manifest, files,
                        load_private_key(private_key_path))
    if not signed:
        with tarfile.open(pkg) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.name != "manifest.sig"]
        with tarfile.open(pkg, "w") as dst:
            for info, data in members:
                dst.addfile(info, io.BytesIO(data))
    return pkg


@pytest.fixture
def keypair(tmp_path: Path):
    return generate_keys(tmp_path / "keys")


@pytest.fixture
def package(tmp_path: Path, keypair) -> Path:
    return build_package(tmp_path / DEEP, keypair.private_path)


def flip_model_byte(pkg: Path) -> None:
    with tarfile.open(pkg) as tar:
        offset = tar.getmember("variants/onnx-fp32/model.onnx").offset_data + 7
    raw = bytearray(pkg.read_bytes())
    raw[offset] ^= 0xFF
    pkg.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------
# keys


def test_keys_generate_writes_a_private_key_only_its_owner_can_read(tmp_path: Path):
    out = tmp_path / "keys"

    result = runner.invoke(app, ["keys", "generate", "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((out / "signing.key").stat().st_mode) == 0o600
    public = load_public_key(out / "signing.pub")
    assert key_id(public) in "".join(result.output.split())


def test_keys_generate_refuses_to_overwrite_without_force(tmp_path: Path, keypair):
    before = keypair.private_path.read_bytes()

    result = runner.invoke(app, ["keys", "generate", "--out", str(keypair.private_path.parent)])

    assert_clean_failure(result, KeyFileError.exit_code)
    assert keypair.private_path.read_bytes() == before


def test_keys_generate_force_replaces_the_key(tmp_path: Path, keypair):
    result = runner.invoke(app, ["keys", "generate", "--out", str(keypair.private_path.parent), "--force"])

    assert result.exit_code == 0, result.output
    assert key_id(load_public_key(keypair.public_path)) != keypair.key_id


# ---------------------------------------------------------------------------------------------
# targets


def test_targets_list_json_has_every_builtin_profile():
    result = runner.invoke(app, ["targets", "list", "--json"])

    assert result.exit_code == 0, result.output
    targets = json.loads(result.stdout)
    assert len(targets) == 7  # DESIGN.md §2's six, and arm64-cpu (issue 11)
    assert [t["name"] for t in targets] == builtin_profile_names()
    for t in targets:
        assert t["architecture"] in ("x86_64", "aarch64")
        assert t["variants"] and t["providers"]


def test_targets_list_shows_every_builtin_name_in_full():
    result = runner.invoke(app, ["targets", "list"])

    assert result.exit_code == 0, result.output
    for name in builtin_profile_names():
        assert name in result.stdout


def test_targets_list_shows_the_generic_arm64_cpu_profile():
    result = runner.invoke(app, ["targets", "list", "--json"])

    assert result.exit_code == 0, result.output
    arm = {t["name"]: t for t in json.loads(result.stdout)}["arm64-cpu"]
    assert arm["architecture"] == "aarch64"
    assert arm["providers"] == ["onnxruntime:CPUExecutionProvider", "litert:XNNPACK"]
    assert arm["variants"] == ["onnx-fp32", "onnx-int8", "onnx-int8-dynamic", "onnx-fp16", "tflite"]


def test_targets_show_builtin_profile():
    result = runner.invoke(app, ["targets", "show", "raspberry-pi-5"])

    assert result.exit_code == 0, result.output
    assert "raspberry-pi-5" in result.stdout
    assert "onnx-int8" in result.stdout


def test_targets_show_json_is_the_validated_profile():
    result = runner.invoke(app, ["targets", "show", "intel-core-ultra-npu", "--json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "intel-core-ultra-npu"
    assert data["shapes"] == {"policy": "static", "batch": 1}
    assert [p["provider"] for p in data["providers"]][:3] == ["NPU", "GPU", "CPU"]


def test_targets_show_user_profile_file(tmp_path: Path):
    path = tmp_path / "my-board.yaml"
    path.write_text("name: my-board\narchitecture: aarch64\n"
                    "providers: [{runtime: onnxruntime, provider: CPUExecutionProvider}]\nvariants: [onnx-fp32]\n")

    result = runner.invoke(app, ["targets", "show", str(path), "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "my-board"


BROKEN_PROFILES = {
    # case → (file text or None for "no such file", text the error must contain)
    "broken-yaml": ("name: b\narchitecture: aarch64\n  providers: x\n", "line 3"),
    "unknown-key": ("name: b\ncolour: blue\n", "colour"),
    "unknown-runtime": ("name: b\narchitecture: aarch64\nproviders: [{runtime: tensorflow, provider: CPU}]\n"
                        "variants: [onnx-fp32]\n", "providers[0].runtime"),
    "missing-file": (None, "not found"),
}


def _broken_profile(folder: Path, case: str) -> Path:
    text, _ = BROKEN_PROFILES[case]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad.yaml"
    if text is not None:
        path.write_text(text)
    return path


@pytest.mark.parametrize("case", BROKEN_PROFILES)
def test_targets_show_broken_profile_fails_cleanly(tmp_path: Path, case: str):
    path = _broken_profile(tmp_path, case)

    result = runner.invoke(app, ["targets", "show", str(path)])

    assert_clean_failure(result, ConfigError.exit_code)
    squashed = "".join(result.stderr.split())  # tolerate wrapping here; the next test checks it
    assert "bad.yaml" in squashed and BROKEN_PROFILES[case][1].replace(" ", "") in squashed


@pytest.mark.parametrize("case", BROKEN_PROFILES)
def test_targets_show_broken_profile_error_is_one_line(tmp_path: Path, case: str):
    path = _broken_profile(tmp_path / DEEP, case)

    result = runner.invoke(app, ["targets", "show", str(path)])

    assert len(nonempty_lines(result.output)) == 1, result.output


def test_unknown_target_name_fails_cleanly():
    result = runner.invoke(app, ["targets", "show", "no-such-board"])

    assert_clean_failure(result, ConfigError.exit_code)
    assert "x86-64-cpu" in "".join(result.stderr.split())


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_accepts_a_good_package(package: Path, keypair):
    result = runner.invoke(app, ["verify", str(package), "--public-key", str(keypair.public_path)])

    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_verify_json_names_the_signer(package: Path, keypair):
    result = runner.invoke(app, ["verify", str(package), "--public-key", str(keypair.public_path), "--json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert data["signed_by"] == keypair.key_id
    assert (data["name"], data["version"], data["files"]) == ("tiny", "1.2.0", 2)


def _tampered(tmp_path, package, keypair):
    flip_model_byte(package)
    return package, keypair.public_path


def _unknown_key(tmp_path, package, keypair):
    return package, generate_keys(tmp_path / DEEP / "stranger").public_path


def _key_not_a_key(tmp_path, package, keypair):
    bogus = tmp_path / DEEP / "notakey.pub"
    bogus.write_text("this is not a public key\n")
    return package, bogus


def _missing_package(tmp_path, package, keypair):
    return tmp_path / DEEP / "nope.edgepkg", keypair.public_path


def _not_a_package(tmp_path, package, keypair):
    fake = tmp_path / DEEP / "fake.edgepkg"
    fake.write_bytes(random.Random(7).randbytes(2048))
    return fake, keypair.public_path


def _unsigned(tmp_path, package, keypair):
    return build_package(tmp_path / DEEP / "unsigned", keypair.private_path, signed=False), keypair.public_path


VERIFY_FAILURES = {
    # case → (setup, exit code)
    "tampered-package": (_tampered, PackageError.exit_code),
    "unknown-key": (_unknown_key, PackageError.exit_code),
    "key-file-not-a-key": (_key_not_a_key, KeyFileError.exit_code),
    "missing-package-file": (_missing_package, PackageError.exit_code),
    "not-a-package": (_not_a_package, PackageError.exit_code),
    "unsigned-package": (_unsigned, PackageError.exit_code),
}


@pytest.mark.parametrize("case", VERIFY_FAILURES)
def test_verify_refuses_bad_package_or_key_cleanly(tmp_path: Path, package: Path, keypair, case: str):
    setup, code = VERIFY_FAILURES[case]
    pkg, pub = setup(tmp_path, package, keypair)

    result = runner.invoke(app, ["verify", str(pkg), "--public-key", str(pub)])

    assert_clean_failure(result, code)


@pytest.mark.parametrize("case", VERIFY_FAILURES)
def test_verify_error_is_one_line(tmp_path: Path, package: Path, keypair, case: str):
    setup, _ = VERIFY_FAILURES[case]
    pkg, pub = setup(tmp_path, package, keypair)

    result = runner.invoke(app, ["verify", str(pkg), "--public-key", str(pub)])

    assert len(nonempty_lines(result.output)) == 1, result.output


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_json_has_the_stable_fields(package: Path):
    result = runner.invoke(app, ["inspect", str(package), "--json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["name"], data["version"], data["target"]) == ("tiny", "1.2.0", "x86-64-cpu")
    rows = {v["id"]: v for v in data["variants"]}
    assert list(rows) == ["onnx-fp32", "onnx-int8"]
    int8 = rows["onnx-int8"]
    assert (int8["format"], int8["precision"], int8["size"], int8["quantized_nodes"]) == ("onnx", "int8", 1000, 12)
    assert int8["min_cosine"] == pytest.approx(0.9931)  # the worst of its outputs
    assert int8["p50_ms"] == pytest.approx(1.25)
    assert int8["gate_passed"] is True
    assert rows["onnx-fp32"]["quantized_nodes"] == 0
    assert data["dropped"] == [{"id": "onnx-int8-dynamic", "reason": "cosine 0.91 < 0.98"}]
    assert data["skipped"] == [{"kind": "tflite", "reason": "input is not a .tflite model"}]


def test_inspect_with_public_key_names_the_signer(package: Path, keypair):
    result = runner.invoke(app, ["inspect", str(package), "--json", "--public-key", str(keypair.public_path)])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["signed_by"] == keypair.key_id


def test_inspect_refuses_unsigned_package(tmp_path: Path, keypair):
    pkg = build_package(tmp_path / "unsigned", keypair.private_path, signed=False)

    result = runner.invoke(app, ["inspect", str(pkg), "--json"])

    assert_clean_failure(result, PackageError.exit_code)


def test_inspect_refuses_tampered_package_even_without_a_key(package: Path):
    flip_model_byte(package)

    result = runner.invoke(app, ["inspect", str(package), "--json"])

    assert_clean_failure(result, PackageError.exit_code)


# ---------------------------------------------------------------------------------------------
# The real command, in its own process


def _edgesdk_script() -> Path:
    script = Path(sys.executable).with_name("edgesdk")
    if not script.exists():
        pytest.skip(f"no edgesdk console script next to {sys.executable} (package not installed here)")
    return script


def test_console_script_help_runs():
    result = subprocess.run([str(_edgesdk_script()), "--help"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    for command in ("keys", "targets", "verify", "inspect"):
        assert command in result.stdout


def test_console_script_error_is_one_line_on_stderr_with_exit_code(tmp_path: Path):
    result = subprocess.run([str(_edgesdk_script()), "targets", "show", "nope.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == ConfigError.exit_code
    assert result.stdout == ""
    assert nonempty_lines(result.stderr) == ["error: nope.yaml: target profile file not found"]


def test_cli_loads_without_the_host_extra(tmp_path: Path):
    # A device installs `edgesdk[agent]`: no onnx, onnxslim, openvino or nncf. verify/inspect must still work.
    code = ("import sys\n"
            "for m in ('onnx', 'onnxslim', 'openvino', 'nncf'): sys.modules[m] = None\n"
            "sys.argv = ['edgesdk', 'targets', 'list', '--json']\n"
            "from edgesdk.cli.main import main\n"
            "main()\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == len(builtin_profile_names())


def test_keys_generate_fleet_role_writes_fleet_key_files(tmp_path: Path):
    result = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path), "--role", "fleet"])

    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "fleet.key").stat().st_mode) == 0o600
    assert key_id(load_public_key(tmp_path / "fleet.pub")) in "".join(result.output.split())
    assert not (tmp_path / "signing.key").exists()


def test_keys_generate_defaults_to_the_default_key_folder(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EDGESDK_HOME", str(tmp_path / "home"))

    result = runner.invoke(app, ["keys", "generate", "--role", "root"])

    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "keys" / "root.key").is_file()


def test_keys_generate_unknown_role_fails_cleanly(tmp_path: Path):
    result = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path), "--role", "admin"])

    assert_clean_failure(result, ConfigError.exit_code)
    assert list(tmp_path.iterdir()) == []
