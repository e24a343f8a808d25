#!/usr/bin/env python3
"""Benchmark the fleet side on one machine: one Mosquitto, one `edgesdk serve`, one simulator.

1. ingest: how fast the collector stores telemetry windows. Half of a burst of pre-built windows
   (from many device ids) is published at full speed while `serve` collects (*live*: windows
   committed per second, against the raw rate the same publisher reaches with nobody storing,
   measured in the same run); the other half is queued by the broker for the collector's
   persistent session while `serve` is stopped, then collected with nothing else running
   (*drain*). SQLite, then PostgreSQL when its server binaries are here.
2. fleet: `--devices` simulated devices (`edgesdk sim`, one process, one event loop) connect and
   report every `--interval` s; `serve` is SIGKILLed mid-run and restarted with the same store and
   collector id. Windows sent (the simulator's count of PUBACKed windows) must equal windows
   stored: nothing lost, nothing doubled.
3. registry: `edgesdk devices list --json` over the devices of step 2 (goal: under a second).
4. report: `edgesdk telemetry report --by release|device` over `--report-windows` stored windows
   (default 10 million, written through FleetStore.add_windows in batches; the fill is timed too).

    .venv/bin/python scripts/bench_fleet.py                     # the full run (~30 min, 10M windows)
    .venv/bin/python scripts/bench_fleet.py --quick             # ~3 min: 500 devices, 200k windows
    .venv/bin/python scripts/bench_fleet.py --only ingest,fleet --json-out out/fleet.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import (Mosquitto, fmt, machine_info, print_table, raise_file_limit, verdict,  # noqa: E402
                          write_json)

from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url  # noqa: E402
from edgesdk.fleet.store import FleetStore  # noqa: E402
from edgesdk.protocol import TelemetryWindow, device_telemetry  # noqa: E402
from edgesdk.protocol.histogram import SCHEME, LatencyHistogram  # noqa: E402

FLEET = "bench"
BIN = Path(sys.executable).parent


def make_windows(n: int, devices: int, releases: int = 3, seed: int = 0) -> list[tuple[str, TelemetryWindow]]:
    """``n`` real telemetry windows (mergeable histograms of 300 lognormal latencies each) spread
    over ``devices`` device ids and ``releases`` releases; seq per device from 0."""
    rng = np.random.default_rng(seed)
    templates = []
    for r in range(releases):
        for k in range(8):
            hist = LatencyHistogram()
            for value in rng.lognormal(np.log(8.0 + 4 * r), 0.3, 300):
                hist.record(float(value))
            templates.append((r, hist))
    out = []
    seqs = [0] * devices
    t0 = time.time() - 86400
    for i in range(n):
        d = i % devices
        r, hist = templates[(i * 7 + d) % len(templates)]
        seq = seqs[d]
        seqs[d] += 1
        start = t0 + seq * 60.0
        out.append((f"dev-{d:05d}", TelemetryWindow(
            seq=seq, window_start=start, window_end=start + 60.0, count=hist.count, errors=int(d % 97 == 0),
            p50_ms=hist.percentile(50), p95_ms=hist.percentile(95), p99_ms=hist.percentile(99), max_ms=hist.max,
            histogram=hist.to_bounds(), variant="onnx-fp32", provider="CPUExecutionProvider",
            package_id=f"{r:064x}", model="det",
            extra={"histogram_scheme": SCHEME, "histogram_sum_ns": hist.sum_ns, "min_ms": hist.min,
                   "rejected": 0, "mean_ms": hist.mean})))
    return out


class Serve:
    """`edgesdk serve` (repository off-topic here, collector on) as a child process."""

    def __init__(self, broker_url: str, store: str, work: Path, collector_id: str = "bench-collector") -> None:
        self.args = [str(BIN / "edgesdk"), "serve", "--fleet", FLEET, "--repo", str(work / "repo"),
                     "--broker", broker_url, "--store", store, "--collector-id", collector_id, "--verbose"]
        self.env = dict(os.environ, EDGESDK_HOME=str(work / "home"), PYTHONUNBUFFERED="1")
        (work / "repo").mkdir(parents=True, exist_ok=True)
        self.log = work / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        self.log.touch()
        start_size = self.log.stat().st_size
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        # `serve` prints "serving ... collector ..." once its collector is subscribed.
        while "serving " not in self.log.read_bytes()[start_size:].decode(errors="replace"):
            if self.proc.poll() is not None:
                raise SystemExit(f"edgesdk serve exited ({self.proc.returncode}); see {self.log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"edgesdk serve did not start within 60 s; see {self.log}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_count(store_url: str, want: int, timeout_s: float) -> tuple[int, list[tuple[float, int]]]:
    """Poll the store (its row count is the only outward sign of the collector) until ``want``."""
    trace = []
    deadline = time.monotonic() + timeout_s
    with FleetStore.open(store_url) as store:
        while True:
            count = store.window_count(FLEET)
            trace.append((time.monotonic(), count))
            if count >= want or time.monotonic() > deadline:
                return count, trace
            time.sleep(0.25)


def publish_burst(broker_url: str, items: list[tuple[str, TelemetryWindow]], clients: int = 4) -> float:
    """Publish every window (QoS 1) from ``clients`` connections in threads; seconds until all PUBACKed."""
    config = parse_broker_url(broker_url)
    payloads = [(device_telemetry(FLEET, d), w.to_json()) for d, w in items]
    shards = [payloads[i::clients] for i in range(clients)]

    def send(shard: list[tuple[str, bytes]], index: int) -> None:
        client = make_client(f"bench-pub-{index}-{os.getpid()}", config, clean_start=True, max_inflight=1000)
        connect_blocking(client, config)
        infos = [client.publish(topic, payload, qos=1) for topic, payload in shard]
        for info in infos:
            info.wait_for_publish(120)
        disconnect(client)

    threads = [threading.Thread(target=send, args=(s, i)) for i, s in enumerate(shards)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def bench_ingest(work: Path, stores: dict[str, str], n: int) -> list[dict[str, Any]]:
    """Two figures per store: *live* (the publisher and the collector at once, so the publisher's own
    pace bounds it) and *drain* (the windows queued by the broker for the collector's persistent
    session while `serve` was stopped, then collected with nothing else running: its capacity)."""
    items = make_windows(n, devices=min(5000, n))
    half = n // 2
    rows = []
    for backend, url in stores.items():
        with Mosquitto(work / f"mq-ingest-{backend}") as mq:
            raw_s = publish_burst(mq.url, items[:half])  # nobody subscribed: the broker's and publisher's pace
            serve = Serve(mq.url, url, work / f"serve-ingest-{backend}").start()
            try:
                with FleetStore.open(url) as store:
                    before = store.window_count(FLEET)
                publish_burst(mq.url, items[:half])
                live_count, live_trace = wait_count(url, before + half, timeout_s=max(120, n / 200))
            finally:
                serve.stop()
            publish_burst(mq.url, items[half:])  # queued for the collector's session while serve is down
            serve.start()
            try:
                drain_count, drain_trace = wait_count(url, before + n, timeout_s=max(120, n / 200))
            finally:
                serve.stop()
        live = _rate(live_trace, before, before + half)
        drain = _rate(drain_trace, before + half, before + n)
        stored = drain_count - before
        rows.append({"backend": backend, "windows": n, "stored": stored, "raw_publish_per_s": half / raw_s,
                     "live_per_s": live, "drain_per_s": drain, "ratio_to_raw": live / (half / raw_s),
                     "goal_met": drain >= 5000 and stored == n})
    return rows


def _rate(trace: list[tuple[float, int]], start: int, end: int) -> float:
    """Windows per second from the first commit past ``start`` to the poll that saw ``end``."""
    first = next((t for t, c in trace if c > start), trace[0][0])
    last = next((t for t, c in trace if c >= end), trace[-1][0])
    done = min(trace[-1][1], end) - start
    return done / max(last - first, 1e-9)


def bench_fleet(work: Path, store_url: str, devices: int, interval: float, duration: float) -> dict[str, Any]:
    with Mosquitto(work / "mq-fleet") as mq:
        serve = Serve(mq.url, store_url, work / "serve-fleet").start()
        summary_path = work / "sim.json"
        sim = subprocess.Popen(
            [str(BIN / "edgesdk"), "sim", "--devices", str(devices), "--fleet", FLEET, "--broker", mq.url,
             "--telemetry-interval", str(interval), "--duration", str(duration), "--start-with", "det@1.0.0",
             "--connect-rate", "1000", "--json"],
            stdout=open(summary_path, "wb"), stderr=open(work / "sim.log", "wb"),
            env=dict(os.environ, EDGESDK_HOME=str(work / "home")))
        # SIGKILL serve a third of the way in; restart it 10 s later (devices go on reporting).
        time.sleep(duration / 3)
        serve.kill()
        killed_at = time.monotonic()
        time.sleep(10)
        serve.start()
        down_s = time.monotonic() - killed_at
        sim.wait(duration + 120)
        summary = json.loads(summary_path.read_text() or "{}")
        sent = int(summary.get("windows_sent", -1))
        count, _ = wait_count(store_url, sent, timeout_s=120)
        serve.stop()
    # The registry with the machine idle again: the CLI as a user runs it (process start included,
    # median of 3) and the query alone in this process.
    env = dict(os.environ, EDGESDK_HOME=str(work / "home"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        listed = subprocess.run([str(BIN / "edgesdk"), "devices", "list", "--fleet", FLEET, "--json",
                                 "--store", store_url], capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
    list_s = sorted(times)[1]
    with FleetStore.open(store_url) as store:
        t0 = time.perf_counter()
        store.devices(FLEET)
        query_s = time.perf_counter() - t0
    known = len(json.loads(listed.stdout)["devices"]) if listed.returncode == 0 else None
    return {"devices": devices, "connected": summary.get("ever_connected"), "interval_s": interval,
            "duration_s": duration, "serve_down_s": round(down_s, 1), "windows_sent": sent, "windows_stored": count,
            "lost_or_doubled": count - sent, "devices_list_s": list_s, "devices_query_s": query_s,
            "devices_listed": known,
            "list_error": listed.stderr.strip()[:200] if listed.returncode else None}


def bench_report(work: Path, store_url: str, n: int, devices: int) -> dict[str, Any]:
    batch = 20_000
    fill_t0 = time.perf_counter()
    with FleetStore.open(store_url) as store:
        have = store.window_count(FLEET)
        template = make_windows(batch, devices=devices)
        done = have
        while done < n:
            base = done // devices + 1_000_000  # seq offsets past anything already stored
            items = [(FLEET, d, dataclasses.replace(w, seq=base + w.seq, window_start=w.window_start + base * 60.0,
                                                    window_end=w.window_end + base * 60.0))
                     for d, w in template[: min(batch, n - done)]]
            store.add_windows(items)
            done += len(items)
            print(f"\r  filling the store: {done:,}/{n:,} windows", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        total = store.window_count(FLEET)
    fill_s = time.perf_counter() - fill_t0
    timings = {}
    env = dict(os.environ, EDGESDK_HOME=str(work / "home"))
    for by in ("release", "device"):
        t0 = time.perf_counter()
        done_ = subprocess.run([str(BIN / "edgesdk"), "telemetry", "report", "--fleet", FLEET, "--by", by,
                                "--format", "json", "--store", store_url], capture_output=True, text=True, env=env)
        timings[by] = (time.perf_counter() - t0, done_.returncode, done_.stderr.strip()[:200])
    return {"windows": total, "fill_s": fill_s, "fill_per_s": (total - have) / fill_s if total > have else None,
            "report_release_s": timings["release"][0], "report_device_s": timings["device"][0],
            "errors": [t[2] for t in timings.values() if t[1] != 0]}


def postgres_url(work: Path) -> tuple[str | None, Any]:
    """A PostgreSQL server of our own (the test fixture's), or None when it is not installed here."""
    try:
        from tests.fixtures.postgres import PostgresServer, find_postgres_bin
    except ImportError as exc:
        print(f"PostgreSQL not benchmarked: {exc}", file=sys.stderr)
        return None, None
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        print("PostgreSQL not benchmarked: no initdb/postgres binaries here", file=sys.stderr)
        return None, None
    server = PostgresServer(bin_dir)
    server.init()
    server.start()
    return server.url(server.new_database()), server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (~3 min)")
    parser.add_argument("--only", default="ingest,fleet,report", help="comma list of ingest,fleet,report")
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=10.0, help="simulated devices' telemetry interval")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds the simulated fleet runs")
    parser.add_argument("--ingest-windows", type=int, default=50_000)
    parser.add_argument("--report-windows", type=int, default=10_000_000)
    parser.add_argument("--work", type=Path, default=None, help="keep files here (default: a temp folder)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.devices, args.duration, args.ingest_windows, args.report_windows = 500, 40.0, 10_000, 200_000
    only = set(args.only.split(","))
    nofile = raise_file_limit()
    info = machine_info()
    print(f"machine: {info['cpu']} ({info['cores']} cores), flags {' '.join(info['cpu_flags']) or 'none'}, "
          f"open files {nofile}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    pg_url, pg_server = postgres_url(work) if "ingest" in only else (None, None)
    try:
        if "ingest" in only:
            stores = {"sqlite": str(work / "ingest.db")}
            if pg_url:
                stores["postgresql"] = pg_url
            rows = bench_ingest(work, stores, args.ingest_windows)
            results["ingest"] = rows
            print_table("collector ingest (windows/s; live = while publishing, drain = queued windows "
                        "collected with nothing else running; raw = the publisher alone)",
                        ["store", "windows", "stored", "raw publish/s", "live/s", "× raw", "drain/s",
                         "drain ≥ 5000/s, none lost"],
                        [[r["backend"], r["windows"], r["stored"], fmt(r["raw_publish_per_s"], 0),
                          fmt(r["live_per_s"], 0), fmt(r["ratio_to_raw"], 2), fmt(r["drain_per_s"], 0),
                          verdict(r["goal_met"])] for r in rows])
        if "fleet" in only:
            fleet = bench_fleet(work, str(work / "fleet.db"), args.devices, args.interval, args.duration)
            results["fleet"] = fleet
            print_table("simulated fleet, serve SIGKILLed and restarted mid-run",
                        ["devices", "connected", "sent", "stored", "lost/doubled", "serve down s",
                         "devices list s (CLI)", "query s", "< 1 s"],
                        [[fleet["devices"], fleet["connected"], fleet["windows_sent"], fleet["windows_stored"],
                          fleet["lost_or_doubled"], fleet["serve_down_s"], fmt(fleet["devices_list_s"], 2),
                          fmt(fleet["devices_query_s"], 3),
                          verdict(fleet["devices_list_s"] < 1.0 and fleet["devices_listed"] == fleet["devices"])]],
                        note=f"listed {fleet['devices_listed']} devices" + (
                            f"; error: {fleet['list_error']}" if fleet["list_error"] else ""))
        if "report" in only:
            report = bench_report(work, str(work / "report.db"), args.report_windows, devices=min(args.devices, 5000))
            results["report"] = report
            print_table("telemetry report over stored windows (SQLite)",
                        ["windows", "fill s", "fill windows/s", "report by release s", "report by device s"],
                        [[f"{report['windows']:,}", fmt(report["fill_s"], 0), fmt(report["fill_per_s"], 0),
                          fmt(report["report_release_s"], 2), fmt(report["report_device_s"], 2)]],
                        note="; ".join(report["errors"]))
    finally:
        if pg_server is not None:
            pg_server.kill()
            pg_server.remove()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.json_out, results)


if __name__ == "__main__":
    main()
