"""Prometheus text exposition (format 0.0.4) of the local API: request counters, per-model latency
histograms and quantiles, the active models, connections, uptime and resident memory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.model_host import ModelHost

# Prometheus `le` bounds in ms: spans a 0.1 ms NPU kernel to a 10 s CPU transformer.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)


def rss_bytes() -> int | None:
    """Bytes resident in this process (psutil; None without it)."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render_metrics(host: ModelHost, requests: Mapping[str | None, Mapping[str, int]], uptime_s: float,
                   rss_bytes: int | None, connections: Mapping[str, int] | None = None) -> str:
    """Prometheus text exposition of the API counters, per-model latency histograms and model info.

    ``requests``: model name (None: refused before a model was chosen) -> {"ok": n, "error": n}.
    Every inference family has one series per model (``model="name"``): each model seen since start,
    and each active one (at zero until its first request), so no series mixes two models.
    """
    recorder = host.recorder
    active = host.models()
    names = sorted(set(recorder.models()) | set(active) | {n for n in requests if n is not None})
    stats = {name: recorder.snapshot(name) for name in names}
    lines: list[str] = []

    def family(name: str, kind: str, text: str, samples: list[tuple[str, Any]]) -> None:
        lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
        lines.extend(f"{name}{suffix} {_num(value)}" for suffix, value in samples)

    def labels(*pairs: tuple[str, Any]) -> str:
        return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in pairs) + "}"

    counted = [(labels(("model", n), ("status", s)), requests.get(n, {}).get(s, 0))
               for n in names for s in ("ok", "error")]
    counted.append((labels(("status", "error")), requests.get(None, {}).get("error", 0)))
    family("edge_inference_requests_total", "counter",
           "Inference requests to the local API, by model and outcome (no model: refused before one was chosen).",
           counted)
    family("edge_inference_errors_total", "counter", "Inferences the runtime failed (valid input).",
           [(labels(("model", n)), stats[n][1]) for n in names])
    family("edge_inference_rejected_total", "counter", "Requests refused before the model ran (bad input).",
           [(labels(("model", n)), stats[n][2]) for n in names])
    buckets: list[tuple[str, Any]] = []
    for n in names:
        hist = stats[n][0]
        buckets.extend((f"_bucket{labels(('model', n), ('le', _num(b)))}", count)
                       for b, count in zip(LATENCY_BUCKETS_MS, hist.cumulative_at(LATENCY_BUCKETS_MS)))
        buckets.extend(((f"_bucket{labels(('model', n), ('le', '+Inf'))}", hist.count),
                        (f"_sum{labels(('model', n))}", hist.sum), (f"_count{labels(('model', n))}", hist.count)))
    family("edge_inference_latency_ms", "histogram", "Model run time of successful inferences since start.", buckets)
    quantiles = [(labels(("model", n), ("quantile", q)), stats[n][0].percentile(q * 100))
                 for n in names for q in (0.5, 0.95, 0.99)]
    family("edge_inference_latency_quantile_ms", "gauge", "Latency quantiles since start (within 0.5%).",
           [(suffix, v) for suffix, v in quantiles if v is not None])
    family("edge_model_active", "gauge", "1 while at least one model is active.", [("", int(bool(active)))])
    family("edge_models_active", "gauge", "Models active on this device.", [("", len(active))])
    family("edge_model_info", "gauge", "The active models, one sample each.", [
        (labels(("package", m.package_id), ("name", m.name), ("version", m.version), ("variant", m.variant),
                ("provider", m.provider), ("runtime", m.runtime)), 1) for m in active.values()])
    if connections is not None:
        family("edge_api_connections", "gauge", "Open connections to the local API, by state.",
               [(labels(("state", s)), connections.get(s, 0)) for s in ("idle", "busy")])
        family("edge_api_refused_total", "counter",
               "Connections the API closed on a limit (timeouts, too many connections).",
               [("", connections.get("refused", 0))])
    family("edge_agent_uptime_seconds", "gauge", "Seconds since the API started.", [("", round(uptime_s, 3))])
    if rss_bytes is not None:
        family("process_resident_memory_bytes", "gauge", "Resident memory of the agent process.",
               [("", rss_bytes)])
    return "\n".join(lines) + "\n"
