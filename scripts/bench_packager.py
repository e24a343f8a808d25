#!/usr/bin/env python3
"""Benchmark `edgesdk package` on real models: wall time, variant sizes, accuracy, speed-up over
fp32 ONNX Runtime, and two peers a user could pick instead of edgesdk.

For each real model × target it builds realistic calibration, validation and held-out sets (see
scripts/bench_common.py: photos, rendered text lines and document pages, real file bytes), runs
`build_package` exactly as the CLI would, then independently of the manifest:
  - re-checks every shipped variant on the held-out set against the original fp32 model on ONNX
    Runtime, with the gate the manifest says applies (a device-verified variant's `device_gate`,
    else the profile's gate for its precision);
  - builds the peers from the original ONNX file, with the same input shapes the packager is given:
      ov-defaults  OpenVINO's default config on CPU (bf16 inference on AVX512-BF16/AMX CPUs),
      nncf-int8    nncf.quantize(openvino.convert_model(onnx), nncf.Dataset(calibration samples))
                   with default parameters, compiled with OpenVINO's defaults,
    and gates them the same way (the bf16 gate, else fp16's, for ov-defaults when it computes in
    bf16/f16; the int8 gate for nncf-int8);
  - times fp32 ORT, every shipped variant and both peers *interleaved* (rounds in a shuffled order,
    ratio per round, median of ratios), because the host is shared and noisy. Every candidate runs
    on one thread (ORT intra_op_num_threads, OpenVINO INFERENCE_NUM_THREADS), and each variant the
    way the agent runs it: its runtime and the `runtime_options` of its manifest entry.

Goals (issue 9): the best variant the agent may run, geomean over the models on x86-64-cpu,
≥ 2.0× fp32 ORT on a CPU with AVX-512 VNNI and BF16 (≥ 1.5× on AVX2-only; the CPU flags pick the
goal) and ahead of both peers; packaging ppocr-rec (21 MB) ≤ 60 s; no shipped variant fails the
held-out re-check.

    .venv/bin/python scripts/bench_packager.py                 # 6 models, x86-64-cpu, both peers
    .venv/bin/python scripts/bench_packager.py --quick         # ~1-2 min: ppocr-cls only
    .venv/bin/python scripts/bench_packager.py --models layout-cdla,ppocr-cls --json-out out/p.json
    .venv/bin/python scripts/bench_packager.py --targets all --peers none
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402

DEFAULT_PACKAGES_DIR = Path(tempfile.gettempdir()) / "edgesdk-bench" / "packages"
# Speed-up goal by CPU tier (bench_common.cpu_tier): VNNI gives INT8 4× fp32's multiply-accumulates
# per instruction and AVX512-BF16 2×; an AVX2-only CPU has neither, hence the lower goal.
SPEEDUP_GOALS = {"avx512-vnni-bf16": 2.0, "avx2": 1.5}
PACKAGE_TIME_GOAL_S = 60.0
PACKAGE_TIME_MODEL = "ppocr-rec"
BASELINE = "fp32 ORT (original)"
PEERS = ("ov-defaults", "nncf-int8")
PEER_LABELS = {"ov-defaults": "OpenVINO defaults", "nncf-int8": "NNCF INT8 (defaults)"}
QUICK_MODEL = "ppocr-cls"
BLOCK_TARGET_MS = 250.0  # timed calls per candidate per round aim at about this much work


class StepReporter:
    """A pipeline Reporter that records how long each step took (and keeps warnings)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.steps: dict[str, float] = {}
        self._open: dict[str, float] = {}
        self.warnings: list[str] = []
        self.lines: list[str] = []
        self.timeline: list[tuple[float, str]] = []  # (seconds since start, line): remedies' cost
        self._t0 = time.perf_counter()

    def begin(self, step: str) -> None:
        self._open[step] = time.perf_counter()
        if self.verbose:
            print(f"    … {step}", file=sys.__stdout__, flush=True)

    def end(self, step: str, detail: str = "") -> None:
        start = self._open.pop(step, None)
        if start is not None:
            self.steps[step] = round(self.steps.get(step, 0.0) + time.perf_counter() - start, 2)
        if self.verbose:
            print(f"    ✓ {step} {detail}", file=sys.__stdout__, flush=True)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.timeline.append((round(time.perf_counter() - self._t0, 1), "WARN " + message[:200]))

    def info(self, message: str) -> None:
        self.lines.append(message)
        self.timeline.append((round(time.perf_counter() - self._t0, 1), message[:200]))


def _worst(metrics: dict[str, Any], key: str) -> float | None:
    values = [m.get(key) for m in metrics.values() if m.get(key) is not None]
    return min(values) if values else None


def _gate_for(profile: Any, precision: str) -> Any:
    """The profile's gate for ``precision``; bf16 falls back to fp16's gate (both are 16-bit float
    compute), then to fp32's (TargetProfile.gate_for)."""
    if precision in profile.gates:
        return profile.gates[precision]
    if precision == "bf16" and "fp16" in profile.gates:
        return profile.gates["fp16"]
    return profile.gate_for("fp32" if precision == "native" else precision)


def _variant_gate(profile: Any, variant: Any) -> tuple[Any, str]:
    """The gate the agent applies to a shipped variant, and where it comes from."""
    from edgesdk.profiles import Gate

    device_gate = getattr(variant, "device_gate", None) or {}
    if device_gate:
        return Gate(**device_gate), "device_gate"
    return _gate_for(profile, variant.precision), f"profile {variant.precision}"


def _heldout_check(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]],
                   gate: Any) -> dict[str, Any]:
    from edgesdk.validation import compare_outputs, evaluate_gate

    metrics = compare_outputs(reference, outputs, spread_ratio_min=gate.spread_ratio_min)
    verdict = evaluate_gate(metrics, gate)
    return {"heldout_cosine_min": min(m.cosine for m in metrics.values()),
            "heldout_top1_min": _worst({k: m.to_dict() for k, m in metrics.items()}, "top1_agreement"),
            "heldout_gate_passed": verdict.passed, "heldout_failures": verdict.failures}


# -- peers -----------------------------------------------------------------------------------------
class OvPeer:
    """A compiled OpenVINO model behind the `Session.run` shape (feeds in, {name: array} out).

    Outputs are named after the fp32 ORT session's, by position: both come from the same ONNX
    file, and NNCF's model keeps the output order but not always the tensor names.
    """

    def __init__(self, compiled: Any, output_names: list[str]) -> None:
        if len(compiled.outputs) != len(output_names):
            raise RuntimeError(f"{len(compiled.outputs)} outputs, the ONNX model has {len(output_names)}")
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer(dict(feeds), share_outputs=False)
        return {name: np.asarray(results[port]) for name, port in zip(self.output_names, self.compiled.outputs)}

    def close(self) -> None:
        self.request = self.compiled = None

    @property
    def precision(self) -> str:
        """The inference precision OpenVINO picked ("bf16" on AVX512-BF16/AMX CPUs by default)."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


@dataclass
class PeerBuild:
    name: str
    session: OvPeer | None
    prep_s: float
    error: str | None = None


def _ov_model(onnx_path: Path, shapes: dict[str, tuple[int, ...]], convert: bool) -> Any:
    """The ONNX file as an OpenVINO model, reshaped to the benchmark's fixed input shapes (the same
    shapes the packager is given, so the peers do not pay for dynamic shapes edgesdk removes)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path)) if convert else ov.Core().read_model(str(onnx_path))
    names = {p.get_any_name() for p in model.inputs}
    model.reshape({name: list(shape) for name, shape in shapes.items() if name in names})
    return model


def build_peer(name: str, onnx_path: Path, shapes: dict[str, tuple[int, ...]],
               calibration: list[dict[str, np.ndarray]], output_names: list[str], threads: int) -> PeerBuild:
    """Build one peer; a failure is recorded (the peer is then absent from its geomean)."""
    import openvino as ov

    t0 = time.perf_counter()
    try:
        if name == "ov-defaults":
            model = _ov_model(onnx_path, shapes, convert=False)
        elif name == "nncf-int8":
            import nncf

            logging.getLogger("nncf").setLevel(logging.ERROR)
            model = nncf.quantize(_ov_model(onnx_path, shapes, convert=True), nncf.Dataset(calibration))
        else:
            raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
        # OpenVINO's defaults, one inference thread like every other candidate.
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
        return PeerBuild(name, OvPeer(compiled, output_names), round(time.perf_counter() - t0, 1))
    except Exception as exc:  # a peer failing on a model is a result, not a crash of the benchmark
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return PeerBuild(name, None, round(time.perf_counter() - t0, 1), f"{type(exc).__name__}: {first}")


def _peer_precision_gate(profile: Any, name: str, session: OvPeer) -> tuple[str, Any]:
    if name == "nncf-int8":
        return "int8", _gate_for(profile, "int8")
    precision = {"bf16": "bf16", "f16": "fp16"}.get(session.precision, "fp32")
    return precision, _gate_for(profile, precision)


# -- one package -----------------------------------------------------------------------------------
def _timing_plan(run: Any, calls: int, round_warmup: int) -> tuple[int, int, float]:
    """Calls per round and untimed calls per block, from the baseline's latency: about
    BLOCK_TARGET_MS of timed work per block, at least 2 calls. The untimed calls let the previous
    runtime's spinning threads settle (ms), which matters only for fast models."""
    run()
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    ms = (time.perf_counter() - t0) * 1000 / 3
    planned = max(2, min(calls, round(BLOCK_TARGET_MS / max(ms, 1e-3))))
    return planned, (round_warmup if ms < 20 else min(round_warmup, 1)), ms


def package_one(model: str, target_name: str, args: argparse.Namespace, key_path: Path, pub_path: Path,
                out_dir: Path, work: Path) -> dict[str, Any]:
    from edgesdk.errors import RuntimeUnavailableError
    from edgesdk.package import extract_package
    from edgesdk.pipeline.runner import HOST_PROVIDER, PackageRequest, build_package
    from edgesdk.profiles import resolve_target
    from edgesdk.runtime import open_session
    from edgesdk.signing import load_public_key

    profile = resolve_target(target_name)
    model_path = bc.fetch_model(model)
    data_dir = work / f"data-{model}"
    data_dir.mkdir(parents=True, exist_ok=True)
    calib_samples = bc.model_samples(model, args.calibration, "calibration")
    calib = bc.save_npz(data_dir / "calibration.npz", calib_samples)
    valid = bc.save_npz(data_dir / "validation.npz", bc.model_samples(model, args.validation, "validation"))
    test = bc.model_samples(model, args.test, "test")

    req = PackageRequest(model=model_path, target=profile, out_dir=out_dir, name=model, version="1.0.0",
                         calibration=calib, validation=valid, input_shapes=bc.package_input_shapes(model),
                         key_path=key_path)
    reporter = StepReporter(args.verbose)
    log = io.StringIO()
    load = bc.LoadMonitor()
    t0 = time.perf_counter()
    # The quantizers print progress (ORT "Collecting tensor data", NNCF bars): keep the table clean.
    with contextlib.redirect_stdout(log if not args.verbose else sys.stdout):
        result = build_package(req, reporter)
    wall = time.perf_counter() - t0
    package_load = load.result()
    manifest = result.manifest
    row: dict[str, Any] = {
        "model": model, "target": target_name, "model_mb": round(model_path.stat().st_size / 1e6, 2),
        "input_shapes": {k: list(v.shape) for k, v in test[0].items()},
        "package": str(result.path), "package_mb": round(result.path.stat().st_size / 1e6, 2),
        "wall_s": round(wall, 1), "steps_s": reporter.steps, "load_while_packaging": package_load,
        "calibration_samples": args.calibration, "validation_samples": args.validation,
        "test_samples": len(test), "threads": args.threads, "dropped": manifest.dropped,
        "skipped": manifest.skipped, "warnings": reporter.warnings, "timeline": reporter.timeline,
        "variants": [], "peers": [],
    }

    # -- independent checks on a held-out test set -------------------------------------------------
    install = work / f"install-{model}-{target_name}"
    extract_package(result.path, install, [load_public_key(pub_path)])  # also verifies the signature
    baseline = open_session(model_path, "onnxruntime", "CPUExecutionProvider", threads=args.threads)
    reference = [baseline.run(f) for f in test]
    sessions: dict[str, Any] = {BASELINE: baseline}
    for v in manifest.variants:
        gate, gate_source = _variant_gate(profile, v)
        entry: dict[str, Any] = {
            "id": v.id, "runtime": v.runtime, "runtime_options": dict(v.runtime_options),
            "precision": v.precision, "size_mb": round(v.size / 1e6, 2),
            "device_verified": bool(getattr(v, "device_gate", None)),
            "host_validation": getattr(v, "host_validation", "computed"), "heldout_gate": gate_source,
            "quantized_nodes": v.quantized_nodes, "gate_passed": bool(v.gate.get("passed")),
            "cosine_min": _worst(v.metrics.get("outputs", {}), "cosine"),
            "top1_min": _worst(v.metrics.get("outputs", {}), "top1_agreement"),
            "manifest_p50_ms": (v.host_latency_ms or {}).get("p50_ms"),
            "manifest_speedup": (v.host_latency_ms or {}).get("speedup_vs_fp32"),
            "remedies": [r.get("name") for r in v.remedies],
        }
        row["variants"].append(entry)
        try:
            # The way the agent opens it (agent/selection.py): runtime options from the manifest.
            session = open_session(install / v.file, v.runtime, HOST_PROVIDER[v.runtime], options=v.runtime_options,
                                   threads=args.threads)
        except RuntimeUnavailableError as exc:  # e.g. bf16 on a CPU without BF16: the agent skips it too
            entry["unavailable_here"] = str(exc)
            continue
        except Exception as exc:  # a shipped variant that does not even open here is a finding
            entry["heldout_error"] = f"{type(exc).__name__}: {exc}"
            continue
        entry.update(_heldout_check(reference, [session.run(f) for f in test], gate))
        sessions[v.id] = session
    for entry in row["variants"]:
        # What the agent may run here: it passed the packager's gate and, when device-verified, the
        # device's gate (the held-out re-check on this machine stands in for the agent's check).
        entry["agent_may_run"] = bool(entry["gate_passed"] and entry["id"] in sessions
                                      and (not entry["device_verified"] or entry.get("heldout_gate_passed")))

    # -- peers: built from the original ONNX file, gated like a variant -----------------------------
    shapes = {k: tuple(v.shape) for k, v in test[0].items()}
    for name in args.peer_list:
        with contextlib.redirect_stdout(log if not args.verbose else sys.stdout):
            built = build_peer(name, model_path, shapes, calib_samples, baseline.output_names, args.threads)
        peer: dict[str, Any] = {"id": name, "label": PEER_LABELS[name], "prep_s": built.prep_s}
        row["peers"].append(peer)
        if built.session is None:
            peer["error"] = built.error
            continue
        precision, gate = _peer_precision_gate(profile, name, built.session)
        peer.update({"precision": precision, "ov_inference_precision": built.session.precision,
                     "gate": f"profile {precision}"})
        try:
            peer.update(_heldout_check(reference, [built.session.run(f) for f in test], gate))
        except Exception as exc:  # it built but cannot run the samples
            peer["error"] = f"{type(exc).__name__}: {exc}"
            built.session.close()
            continue
        sessions[f"peer:{name}"] = built.session

    # -- interleaved latency: fp32 ORT vs each shipped variant vs each peer -------------------------
    feeds = test[0]
    runners = {name: (lambda s=s: s.run(feeds)) for name, s in sessions.items()}
    calls, round_warmup, first_ms = _timing_plan(runners[BASELINE], args.calls, args.round_warmup)
    load = bc.LoadMonitor()
    timed = bc.interleaved(runners, rounds=args.rounds, calls=calls, warmup=3, budget_s=args.time_budget,
                           round_warmup=round_warmup)
    row["load_while_timing"] = load.result()
    base = timed[BASELINE]
    row["baseline_p50_ms"] = round(base.p50, 3)
    row["timing"] = {"rounds": len(base.rounds), "calls_per_round": calls, "untimed_per_block": round_warmup,
                     "baseline_first_ms": round(first_ms, 2)}
    for entry, key in [*((e, e["id"]) for e in row["variants"]), *((p, f"peer:{p['id']}") for p in row["peers"])]:
        t = timed.get(key)
        if t is not None:
            entry["bench_p50_ms"] = round(t.p50, 3)
            entry["bench_ratio"] = round(t.ratio_to(base), 3)
            entry["bench_round_ratios"] = [round(b / c, 3) for b, c in zip(base.round_p50s, t.round_p50s)]
    for s in sessions.values():
        s.close()

    eligible = [e for e in row["variants"] if e["agent_may_run"] and e.get("bench_ratio") is not None]
    best = max(eligible, key=lambda e: e["bench_ratio"], default=None)
    row["best_variant"] = best["id"] if best else None
    row["best_ratio"] = best["bench_ratio"] if best else None
    held = [e for e in eligible if e.get("heldout_gate_passed")]
    best_held = max(held, key=lambda e: e["bench_ratio"], default=None)
    row["best_ratio_heldout_ok"] = best_held["bench_ratio"] if best_held else None
    manifest_best = max((e for e in row["variants"] if e.get("manifest_speedup")), key=lambda e: e["manifest_speedup"],
                        default=None)
    row["best_manifest_speedup"] = manifest_best["manifest_speedup"] if manifest_best else None
    return row


# -- summary and report ----------------------------------------------------------------------------
def _peer(row: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((p for p in row.get("peers", []) if p["id"] == name and p.get("bench_ratio") is not None), None)


def summarise(rows: list[dict[str, Any]], machine: dict[str, Any], peers: tuple[str, ...],
              threads: int = 1) -> dict[str, Any]:
    tier = bc.cpu_tier(machine.get("cpu_flags") or [])
    goal = SPEEDUP_GOALS.get(tier)
    x86 = [r for r in rows if r["target"] == "x86-64-cpu" and "error" not in r]
    gm = bc.geomean(r["best_ratio"] for r in x86 if r.get("best_ratio"))
    gm_held = bc.geomean(r["best_ratio_heldout_ok"] for r in x86 if r.get("best_ratio_heldout_ok"))
    gm_manifest = bc.geomean(r["best_manifest_speedup"] for r in x86 if r.get("best_manifest_speedup"))
    peer_summary: dict[str, Any] = {}
    for name in peers:
        measured = [(r, p) for r in x86 if (p := _peer(r, name)) is not None]
        accurate = [(r, p) for r, p in measured if p.get("heldout_gate_passed")]
        gm_all = bc.geomean(p["bench_ratio"] for _, p in measured)
        gm_accurate = bc.geomean(p["bench_ratio"] for _, p in accurate)
        ours_accurate = bc.geomean(r["best_ratio"] for r, _ in accurate if r.get("best_ratio"))
        peer_summary[name] = {
            "label": PEER_LABELS[name],
            "geomean_all": gm_all if measured else None,
            "models": [r["model"] for r, _ in measured],
            # Only the models where the peer passed its gate, and ours over the same models.
            "geomean_accurate_only": gm_accurate if accurate else None,
            "ours_geomean_on_accurate_models": ours_accurate if accurate else None,
            "accurate_models": [r["model"] for r, _ in accurate],
            "failed_gate": [f"{r['model']}: {'; '.join(p.get('heldout_failures') or [])}" for r, p in measured
                            if not p.get("heldout_gate_passed")],
            "errors": [f"{r['model']}: {p['error']}" for r in x86 for p in r.get("peers", [])
                       if p["id"] == name and p.get("error")],
            "models_where_ours_faster": [r["model"] for r, p in measured
                                         if r.get("best_ratio") and r["best_ratio"] > p["bench_ratio"]],
            # Ahead, strictly: our geomean above the peer's over all models, its inaccurate results
            # included (its speed as a user who does not check accuracy gets it). And like for like:
            # over the models where the peer is accurate.
            "ours_ahead": (gm > gm_all) if measured and x86 else None,
            "ours_ahead_where_peer_accurate": (ours_accurate > gm_accurate) if accurate else None,
        }
    shipped = [(r["model"], r["target"], v) for r in rows if "error" not in r for v in r["variants"]]
    failing_manifest = [f"{m}/{t}/{v['id']}" for m, t, v in shipped if not v.get("gate_passed")]
    failing_heldout = [f"{m}/{t}/{v['id']}: {'; '.join(v.get('heldout_failures') or [v.get('heldout_error', '')])}"
                       for m, t, v in shipped if "unavailable_here" not in v and not v.get("heldout_gate_passed")]
    unavailable = [f"{m}/{t}/{v['id']}: {v['unavailable_here']}" for m, t, v in shipped if "unavailable_here" in v]
    rec = next((r for r in rows if r["model"] == PACKAGE_TIME_MODEL and "error" not in r), None)
    ok_rows = [r for r in rows if "error" not in r]
    slowest = max(ok_rows, key=lambda r: r["wall_s"], default=None)
    return {
        "cpu_flags": machine.get("cpu_flags"),
        "cpu_tier": tier,
        "threads": threads,
        "speedup_geomean_x86": gm if x86 else None,
        "speedup_geomean_x86_manifest": gm_manifest if x86 else None,
        "speedup_geomean_x86_heldout_ok": gm_held if x86 else None,
        "speedup_goal": goal,
        "speedup_goal_met": (gm >= goal) if x86 and goal else None,
        "speedup_models": [r["model"] for r in x86],
        "best_variants": {r["model"]: r.get("best_variant") for r in x86},
        "peers": peer_summary,
        "ahead_of_peers_goal_met": (all(p["ours_ahead"] for p in peer_summary.values())
                                    if peer_summary and all(p["ours_ahead"] is not None for p in peer_summary.values())
                                    else None),
        "ahead_of_accurate_peers_goal_met": (
            all(p["ours_ahead_where_peer_accurate"] is not False for p in peer_summary.values())
            if peer_summary else None),
        "shipped_variants": len(shipped),
        "shipped_failing_manifest_gate": failing_manifest,
        "shipped_failing_heldout_gate": failing_heldout,
        "shipped_not_runnable_here": unavailable,
        "no_failing_variant_goal_met": (not failing_manifest and not failing_heldout) if shipped else None,
        "package_time_model": PACKAGE_TIME_MODEL,
        "package_time_s": rec["wall_s"] if rec else None,
        "package_time_target": rec["target"] if rec else None,
        "package_time_goal_s": PACKAGE_TIME_GOAL_S,
        "package_time_goal_met": (rec["wall_s"] <= PACKAGE_TIME_GOAL_S) if rec else None,
        "package_time_slowest": f"{slowest['model']}/{slowest['target']} {slowest['wall_s']} s" if slowest else None,
        "errors": [f"{r['model']}/{r['target']}: {r['error']}" for r in rows if "error" in r],
    }


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _gate_cell(entry: dict[str, Any]) -> str:
    if "unavailable_here" in entry:
        return "not runnable here"
    if entry.get("heldout_error"):
        return "ERROR"
    held = "pass" if entry.get("heldout_gate_passed") else "FAIL"
    return f"{'pass' if entry.get('gate_passed') else 'FAIL'}/{held}" + (" (device)" if entry["device_verified"] else "")


def print_model_table(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"\n{r['model']} → {r['target']}: ERROR {r['error']}")
        return
    rows = [[BASELINE, "onnxruntime", bc.fmt(r["model_mb"]), "", "", "reference",
             bc.fmt(r.get("baseline_p50_ms")), "1.00×", ""]]
    for v in r["variants"]:
        mark = " ★" if v["id"] == r.get("best_variant") else ""
        runs_as = v["runtime"] + (f" ({_options(v['runtime_options'])})" if v["runtime_options"] else "")
        rows.append([v["id"] + mark, runs_as, bc.fmt(v["size_mb"]), v["quantized_nodes"] or "",
                     bc.fmt(v.get("heldout_cosine_min"), 5), _gate_cell(v), bc.fmt(v.get("bench_p50_ms")),
                     bc.fmt(v.get("bench_ratio"), 2, "×"), bc.fmt(v.get("manifest_speedup"), 2, "×")])
    for p in r["peers"]:
        if p.get("error"):
            rows.append([f"peer: {p['label']}", "openvino", "", "", "", "ERROR (below)", "", "", ""])
            continue
        verdict = "pass" if p.get("heldout_gate_passed") else "FAIL"
        rows.append([f"peer: {p['label']}", f"openvino defaults, computes {p['ov_inference_precision']}", "", "",
                     bc.fmt(p.get("heldout_cosine_min"), 5), f"{verdict} ({p['precision']} gate)",
                     bc.fmt(p.get("bench_p50_ms")), bc.fmt(p.get("bench_ratio"), 2, "×"), f"built in {p['prep_s']} s"])
    t = r.get("timing", {})
    bc.print_table(
        f"{r['model']} ({r['model_mb']} MB, input {r['input_shapes']}) → {r['target']}: packaged in {r['wall_s']} s, "
        f"{len(r['variants'])} shipped, {len(r['dropped'])} dropped; {r['threads']} thread; "
        f"{t.get('rounds')} rounds × {t.get('calls_per_round')} calls",
        ["candidate", "runs as (runtime_options from the manifest)", "MB", "q-nodes", "held-out cos min",
         "gate pkg/held-out", "p50 ms", "× fp32", "manifest ×"], rows,
        note="★ best variant the agent may run here (passed its gate; a device-verified one also the held-out "
             "re-check on this CPU). Peers: the same held-out samples and gate; failures listed under 'goals'.")


def print_report(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    for r in rows:
        print_model_table(r)
    bc.print_table("variants not shipped", ["model", "target", "variant", "why"],
                   [[r["model"], r["target"], d.get("id") or d.get("kind"), ("dropped: " if "id" in d else "skipped: ")
                     + d["reason"][:160]] for r in rows if "error" not in r for d in r["dropped"] + r["skipped"]])
    bc.print_table("packaging steps", ["model", "target", "pack s", "slowest steps (s)"],
                   [[r["model"], r["target"], bc.fmt(r["wall_s"], 1),
                     ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.get("steps_s", {}).items(),
                                                                 key=lambda kv: -kv[1])[:3])]
                    for r in rows if "error" not in r])
    s = summary
    peer_rows = []
    for name, p in s["peers"].items():
        peer_rows.append([
            f"ahead of {p['label']}, all {len(p['models'])} models (its inaccurate ones too)",
            f"ours {bc.fmt(s['speedup_geomean_x86'], 2, '×')} vs {bc.fmt(p['geomean_all'], 2, '×')} "
            f"(ours faster on {len(p['models_where_ours_faster'])} of {len(p['models'])})",
            "ours > peer", bc.verdict(p["ours_ahead"])])
        peer_rows.append([
            f"ahead of {p['label']} where it is accurate ({len(p['accurate_models'])} of {len(p['models'])} models)",
            f"ours {bc.fmt(p['ours_geomean_on_accurate_models'], 2, '×')} vs "
            f"{bc.fmt(p['geomean_accurate_only'], 2, '×')}" + (f" ({', '.join(p['accurate_models'])})"
                                                               if p["accurate_models"] else ""),
            "ours > peer", bc.verdict(p["ours_ahead_where_peer_accurate"])])
    goal = s["speedup_goal"]
    goals = [
        [f"best variant the agent may run vs fp32 ORT, geomean of {len(s['speedup_models'])} (x86-64-cpu, "
         f"{s['threads']} thread)",
         f"{bc.fmt(s['speedup_geomean_x86'], 2, '×')} (held-out-passing only: "
         f"{bc.fmt(s['speedup_geomean_x86_heldout_ok'], 2, '×')}; manifest: "
         f"{bc.fmt(s['speedup_geomean_x86_manifest'], 2, '×')})",
         f"≥ {goal:g}× ({s['cpu_tier']})" if goal else f"none for {s['cpu_tier']}", bc.verdict(s["speedup_goal_met"])],
        *peer_rows,
        ["shipped variants failing their gate", f"{len(s['shipped_failing_heldout_gate'])} of {s['shipped_variants']} "
         f"on the held-out re-check (packager's gate: {len(s['shipped_failing_manifest_gate'])}; not runnable on "
         f"this CPU: {len(s['shipped_not_runnable_here'])})", "0", bc.verdict(s["no_failing_variant_goal_met"])],
        [f"packaging {PACKAGE_TIME_MODEL} (21 MB), one target", bc.fmt(s["package_time_s"], 1, " s")
         + f" (slowest: {s['package_time_slowest']})", f"≤ {PACKAGE_TIME_GOAL_S:g} s",
         bc.verdict(s["package_time_goal_met"])],
    ]
    bc.print_table(f"goals (CPU flags: {' '.join(s['cpu_flags'] or []) or 'none'})",
                   ["goal", "measured", "target", "verdict"], goals,
                   note="Each peer twice: its geomean over every model, accurate or not, and over only the models "
                        "where it passed the gate (ours over the same models beside it).")
    for line in s["shipped_failing_heldout_gate"]:
        print(f"  held-out gate failure: {line}")
    for p in s["peers"].values():
        for line in p["failed_gate"]:
            print(f"  {p['label']} fails the gate on {line}")
        for line in p["errors"]:
            print(f"  {p['label']} could not be built: {line}")
    for line in s["errors"]:
        print(f"  error: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", default=",".join(bc.PACKAGER_MODELS),
                        help=f"comma-separated pinned models (default: %(default)s; optional: {', '.join(bc.OPTIONAL_MODELS)})")
    parser.add_argument("--targets", default="x86-64-cpu",
                        help="comma-separated target profiles, or 'all' for every built-in (default: %(default)s)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers timed beside our variants, or 'none' (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="inference threads of every candidate, baseline and peers alike (default: %(default)s)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration samples (default: %(default)s)")
    parser.add_argument("--validation", type=int, default=32, help="validation samples (default: %(default)s)")
    parser.add_argument("--test", type=int, default=32, help="held-out test samples for the re-check (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=40,
                        help="interleaved timing rounds, each candidate in a shuffled order (default: %(default)s)")
    parser.add_argument("--round-warmup", type=int, default=3,
                        help="untimed calls before each candidate's block in every round: ORT and OpenVINO "
                             "threads spin after a run and slow the next runtime; 1 for models over 20 ms "
                             "(default: %(default)s)")
    parser.add_argument("--calls", type=int, default=5,
                        help=f"timed calls per candidate per round at most; fewer (≥ 2) where {BLOCK_TARGET_MS:g} ms "
                             "of work is reached sooner (default: %(default)s)")
    parser.add_argument("--time-budget", type=float, default=30.0,
                        help="seconds of interleaved timing per package, at least 2 rounds (default: %(default)s)")
    parser.add_argument("--packages-dir", type=Path, default=DEFAULT_PACKAGES_DIR,
                        help="where packages and the bench signing key go; bench_agent.py reuses them "
                             "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"~1-2 min: {QUICK_MODEL} only, 16/16/8 samples, ≤ 8 s of timing")
    parser.add_argument("--json-out", type=Path, default=None, help="write all results as JSON here")
    parser.add_argument("--verbose", action="store_true", help="show the pipeline's steps and quantizer output")
    args = parser.parse_args(argv)
    if args.quick:
        if args.models == ",".join(bc.PACKAGER_MODELS):
            args.models = QUICK_MODEL
        args.calibration, args.validation, args.test = min(args.calibration, 16), min(args.validation, 16), min(args.test, 8)
        args.rounds, args.time_budget = min(args.rounds, 20), min(args.time_budget, 8.0)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    args.peer_list = () if args.peers.strip() == "none" else tuple(p.strip() for p in args.peers.split(",") if p.strip())
    unknown = [p for p in args.peer_list if p not in PEERS]
    if unknown:
        parser.error(f"unknown peer {unknown[0]!r} (known: {', '.join(PEERS)}, or 'none')")

    bc.quiet_native_logs()
    from edgesdk.profiles import builtin_profile_names
    from edgesdk.signing import generate_keys

    targets = builtin_profile_names() if args.targets == "all" else [t.strip() for t in args.targets.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.packages_dir.mkdir(parents=True, exist_ok=True)
    keys_dir = args.packages_dir / "keys"
    if not (keys_dir / "signing.key").exists():
        generate_keys(keys_dir)
    machine = bc.machine_info()
    tier = bc.cpu_tier(machine["cpu_flags"])
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {bc.os.getloadavg()}, "
          f"other processes using ~{bc.other_processes_cpu()} cores")
    print(f"CPU flags: {' '.join(machine['cpu_flags']) or 'none'} → tier {tier}, speed-up goal "
          f"{bc.fmt(SPEEDUP_GOALS.get(tier), 1, '×')}; {args.threads} inference thread(s); peers: "
          f"{', '.join(args.peer_list) or 'none'}")
    load = bc.LoadMonitor()
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgesdk-bench-pack-") as tmp:
        for model in models:
            for target in targets:
                print(f"packaging {model} for {target} …", flush=True)
                try:
                    row = package_one(model, target, args, keys_dir / "signing.key", keys_dir / "signing.pub",
                                      args.packages_dir, Path(tmp))
                    peers = ", ".join(f"{p['id']} {bc.fmt(p.get('bench_ratio'), 2, '×')}"
                                      f"{'' if p.get('heldout_gate_passed') else ' (inaccurate)'}" for p in row["peers"])
                    print(f"  {row['wall_s']:.1f} s, {len(row['variants'])} shipped, {len(row['dropped'])} dropped; "
                          f"best {row.get('best_variant')} {bc.fmt(row.get('best_ratio'), 2, '×')}"
                          f"{'; peers ' + peers if peers else ''}", flush=True)
                except Exception as exc:  # one model failing must not lose the others' numbers
                    row = {"model": model, "target": target, "error": f"{type(exc).__name__}: {exc}"}
                    print(f"  ERROR {row['error']}", flush=True)
                rows.append(row)
    summary = summarise(rows, machine, args.peer_list, args.threads)
    print_report(rows, summary)
    overall = load.result()
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {overall['loadavg_start']} → "
          f"{overall['loadavg_end']}, CPU busy {overall.get('cpu_busy_pct')} %, steal {overall.get('cpu_steal_pct')} %")
    bc.write_json(args.json_out, {"benchmark": "packager", "argv": sys.argv[1:], "args": vars(args),
                                  "machine": machine, "load": overall, "results": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
