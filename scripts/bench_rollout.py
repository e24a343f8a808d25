#!/usr/bin/env python3
"""Benchmark staged rollouts on one machine: one Mosquitto, one `edgesdk serve` (repository and
collector), one simulator process with `--devices` devices, and the rollout controller in this
process (so its CPU time is its own thread's, `RolloutController.cpu_s`).

1. good: det@2.0 (behaves as det@1.0) over every device, waves 1%,10%,100%: wall time from start
   to `completed`, the controller's CPU, and whether every device ended up on det@2.0.
2. slow: det@3.0 is 30 % slower at p95 on one hardware class (nano) only: the rollout must halt in
   the first wave (the first that reaches nano: waves are stratified by class), touch no device
   beyond it, and put every touched device back on det@2.0. Reported: seconds from the wave's
   activation (every device of the wave active) to the halt decision and to the last confirmed
   rollback.
3. noise: `--noise-rollouts` good rollouts (det@2.1, 2.2, ...) on `--noise-devices` devices with
   ±15 % per-window latency jitter and ±10 % spread between devices: false halts must be 0.

    .venv/bin/python scripts/bench_rollout.py                      # 5,000 devices, 20 noisy rollouts (~20 min)
    .venv/bin/python scripts/bench_rollout.py --quick              # 500 devices, 3 noisy rollouts (~4 min)
    .venv/bin/python scripts/bench_rollout.py --json-out out/rollout.json
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import (Mosquitto, fmt, machine_info, print_table, raise_file_limit, verdict,  # noqa: E402
                          write_json)

from edgesdk.broker import parse_broker_url  # noqa: E402
from edgesdk.cli.fleet_cmd import record_release  # noqa: E402
from edgesdk.fleet import rollouts as R  # noqa: E402
from edgesdk.fleet.repository import publish_package  # noqa: E402
from edgesdk.fleet.rollout_controller import RolloutController  # noqa: E402
from edgesdk.fleet.rollout_plan import plan_rollout  # noqa: E402
from edgesdk.fleet.rollout_spec import GateLimits, RolloutSpec, parse_waves  # noqa: E402
from edgesdk.fleet.store import FleetStore  # noqa: E402
from edgesdk.signing import generate_keys, load_private_key, load_public_key  # noqa: E402
from tests.fixtures.packages import random_package  # noqa: E402

FLEET = "bench"
BIN = Path(sys.executable).parent
CLASSES = {"nano": 0.5, "orin": 0.5}


def behaviour(noise: bool) -> dict[str, Any]:
    default: dict[str, Any] = {"p50_ms": 10, "sigma": 0.25, "error_rate": 0.001, "install_s": 2,
                               "calls_per_window": 300, "provider": "CUDAExecutionProvider"}
    if noise:
        default.update({"jitter": 0.15, "device_spread": 0.10})
    return {"hardware": {"classes": CLASSES}, "default": default,
            "releases": {"det@3.0": {"by_hardware": {"nano": {"p50_ms": 13}}}}}  # p95 x1.3 on nano only


def terminate(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM (a clean stop: offline states, commits), SIGKILL after ``wait_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()


class Serve:
    def __init__(self, url: str, store: Path, repo: Path, work: Path) -> None:
        self.log = work / "serve.log"
        self.proc = subprocess.Popen(
            [str(BIN / "edgesdk"), "serve", "--fleet", FLEET, "--repo", str(repo), "--broker", url, "--store",
             str(store), "--collector-id", "bench-collector", "--no-rollouts"],
            env=dict(os.environ, EDGESDK_HOME=str(work / "home"), PYTHONUNBUFFERED="1"),
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "serving " not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"edgesdk serve did not start; see {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        terminate(self.proc, 30)


class Sim:
    def __init__(self, url: str, devices: int, interval: float, repo: Path, fleet_pub: Path, work: Path,
                 noise: bool, prefix: str) -> None:
        path = work / f"behaviour-{prefix}.yaml"
        path.write_text(yaml.safe_dump(behaviour(noise)))
        self.proc = subprocess.Popen(
            [str(BIN / "edgesdk"), "sim", "--devices", str(devices), "--fleet", FLEET, "--broker", url,
             "--prefix", prefix, "--telemetry-interval", str(interval), "--start-with", "det@1.0", "--repo",
             str(repo), "--behaviour", str(path), "--fleet-key-pub", str(fleet_pub), "--connect-rate", "1000",
             "--progress", "0"],
            env=dict(os.environ, EDGESDK_HOME=str(work / "home")), stdout=subprocess.DEVNULL,
            stderr=open(work / f"sim-{prefix}.log", "wb"))

    def stop(self) -> None:
        terminate(self.proc, 60)


def wait_online(store: FleetStore, prefix: str, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = sum(1 for d in store.devices(FLEET) if d.device_id.startswith(prefix) and d.status == "online"
                     and d.models)
        if online >= n:
            return
        time.sleep(1)
    raise SystemExit(f"only {online} of {n} simulated devices registered within {timeout} s")


def run_rollout(store: FleetStore, controller: RolloutController, version: str, prefix: str, bake_s: float,
                min_samples: int, waves: str) -> dict[str, Any]:
    devices = tuple(sorted(d.device_id for d in store.devices(FLEET) if d.device_id.startswith(prefix)))
    spec = RolloutSpec(fleet=FLEET, name="det", version=version, devices=devices, waves=parse_waves(waves),
                       bake_s=bake_s, activation_timeout_s=120, max_wait_s=max(60.0, 4 * bake_s),
                       limits=GateLimits(min_samples=min_samples))
    rid = R.new_rollout_id()
    plan = plan_rollout(store, spec, rollout_id=rid, max_metric_drop=None)
    cpu0 = controller.cpu_s
    started = time.monotonic()
    R.create_rollout(store, spec, plan.devices, plan.sizes, rollout_id=rid)
    while True:
        rollout = R.get_rollout(store, rid)
        assert rollout is not None
        if rollout.final:
            break
        time.sleep(0.5)  # the controller runs in its own thread
    wall = time.monotonic() - started
    rows = R.rollout_devices(store, rid)
    waves_done = R.rollout_waves(store, rid)
    decisions = R.decisions(store, rid)
    halt = next((d for d in decisions if d.verdict in ("fail", "inconclusive")), None)
    halted_wave = halt.wave if halt else None
    settled = waves_done[halted_wave].settled_at if halt is not None else None
    running = {d.device_id: next((m.version for m in d.models if m.name == "det"), None)
               for d in store.devices(FLEET) if d.device_id in set(devices)}
    touched = [d for d in rows if d.state not in (R.WAITING,)]
    timing = [{"wave": w.wave + 1, "size": w.size,
               "settle_s": None if w.settled_at is None or w.sent_at is None else round(w.settled_at - w.sent_at, 1),
               "judged_after_settle_s": None if w.evaluated_at is None or w.settled_at is None
               else round(w.evaluated_at - w.settled_at, 1)} for w in waves_done]
    return {"rollout": rid, "version": version, "devices": len(devices), "waves": [w.size for w in waves_done],
            "wave_timing": timing,
            "state": rollout.state, "outcome": rollout.outcome, "wall_s": wall,
            "controller_cpu_s": controller.cpu_s - cpu0, "halted_wave": None if halted_wave is None else halted_wave + 1,
            "halt_gate": halt.gate if halt else None, "halt_summary": halt.summary if halt else None,
            "halt_after_activation_s": None if halt is None or settled is None else halt.at - settled,
            "rolled_back_after_activation_s": None if halt is None or settled is None or rollout.finished_at is None
            else rollout.finished_at - settled,
            "touched": len(touched), "touched_waves": sorted({d.wave + 1 for d in touched}),
            "rolled_back": sum(1 for d in rows if d.state == R.ROLLED_BACK),
            "on_version": sum(1 for v in running.values() if v == version), "running": running}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=5.0, help="telemetry interval of the devices (s)")
    parser.add_argument("--bake", type=float, default=20.0)
    parser.add_argument("--min-samples", type=int, default=500)
    parser.add_argument("--noise-rollouts", type=int, default=20)
    parser.add_argument("--noise-devices", type=int, default=500)
    parser.add_argument("--noise-bake", type=float, default=10.0, help="bake of the noisy rollouts (s)")
    parser.add_argument("--quick", action="store_true", help="500 devices, 3 noisy rollouts")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.devices, args.noise_rollouts, args.noise_devices = 500, 3, 200
    nofile = raise_file_limit()
    info = machine_info()
    print(f"open files {nofile}; machine: {info['cpu']} ({info['cores']} cores), flags {' '.join(info['cpu_flags']) or 'none'}")
    results: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        work = Path(tmp)
        release, fleet = generate_keys(work / "keys"), generate_keys(work / "keys", role="fleet")
        repo, store_path = work / "repo", work / "fleet.db"
        versions = ["1.0", "2.0", "3.0", *(f"2.{i}" for i in range(1, args.noise_rollouts + 1))]
        with FleetStore.open(store_path) as store:
            for version in versions:
                pkg = random_package(work / f"det-{version}.edgepkg", load_private_key(release.private_path),
                                     size=4096, name="det", version=version)
                record_release(publish_package(pkg, repo, [load_public_key(release.public_path)]), store)
        with Mosquitto(work / "mq") as mq, FleetStore.open(store_path) as store:
            serve = Serve(mq.url, store_path, repo, work)
            controller = RolloutController(parse_broker_url(mq.url), FLEET, store, repo,
                                           load_private_key(fleet.private_path), owner="bench")
            controller.start()
            try:
                sim = Sim(mq.url, args.devices, args.interval, repo, fleet.public_path, work, noise=False,
                          prefix="sim")
                t0 = time.monotonic()
                wait_online(store, "sim", args.devices)
                print(f"{args.devices} devices online and registered in {time.monotonic() - t0:.0f} s")
                good = run_rollout(store, controller, "2.0", "sim", args.bake, args.min_samples, "1%,10%,100%")
                print(f"good: {good['state']} in {good['wall_s']:.0f} s")
                slow = run_rollout(store, controller, "3.0", "sim", args.bake, args.min_samples, "1%,10%,100%")
                print(f"slow: {slow['state']} — {slow['outcome']}")
                sim.stop()
                noisy_sim = Sim(mq.url, args.noise_devices, args.interval, repo, fleet.public_path, work, noise=True,
                                prefix="noise")
                wait_online(store, "noise", args.noise_devices)
                noisy = []
                for i in range(1, args.noise_rollouts + 1):
                    result = run_rollout(store, controller, f"2.{i}", "noise", args.noise_bake, args.min_samples,
                                         "1%,10%,100%")
                    noisy.append(result)
                    print(f"noise {i}/{args.noise_rollouts}: {result['state']} in {result['wall_s']:.0f} s"
                          + (f" — {result['outcome']}" if result["state"] != "completed" else ""))
                noisy_sim.stop()
            finally:
                controller.stop()
                serve.stop()
    for r in (good, slow, *noisy):
        r.pop("running", None)
    false_halts = sum(1 for r in noisy if r["state"] != "completed")
    slow_ok = (slow["state"] == "halted" and slow["halt_gate"] == "p95-regression" and slow["halted_wave"] == 1
               and slow["touched_waves"] == [1] and slow["rolled_back"] == slow["touched"])
    print_table("staged rollouts (simulated fleet)", ["case", "devices", "waves", "result", "wall s",
                                                      "controller CPU s", "goal", "met"], [
        ["good release, every device on it", good["devices"], good["waves"], good["outcome"], fmt(good["wall_s"], 1),
         fmt(good["controller_cpu_s"], 2), "completed, all on 2.0",
         verdict(good["state"] == "completed" and good["on_version"] == good["devices"])],
        ["30 % slower p95 on nano", slow["devices"], slow["waves"],
         f"halted in wave {slow['halted_wave']} ({slow['halt_gate']}); touched {slow['touched']}, rolled back "
         f"{slow['rolled_back']}", fmt(slow["wall_s"], 1), fmt(slow["controller_cpu_s"], 2),
         "halt in wave 1, only it touched, all back", verdict(slow_ok)],
        [f"{len(noisy)} good rollouts, ±15 % jitter", args.noise_devices, noisy[0]["waves"] if noisy else "—",
         f"{false_halts} false halts", fmt(sum(r["wall_s"] for r in noisy) / max(len(noisy), 1), 1) + " each",
         fmt(sum(r["controller_cpu_s"] for r in noisy) / max(len(noisy), 1), 2) + " each", "0 false halts",
         verdict(false_halts == 0)],
    ], note=f"slow: halt {fmt(slow['halt_after_activation_s'], 1)} s and full rollback "
            f"{fmt(slow['rolled_back_after_activation_s'], 1)} s after wave {slow['halted_wave']} activated "
            f"(bake {args.bake:g} s, telemetry every {args.interval:g} s); evidence: {slow['halt_summary']}")
    results.update({"good": good, "slow": slow, "noise": noisy, "false_halts": false_halts})
    write_json(args.json_out, results)


if __name__ == "__main__":
    threading.excepthook = lambda a: print(f"thread {a.thread.name}: {a.exc_value}", file=sys.stderr)
    main()
