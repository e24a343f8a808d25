"""One inference-session interface over onnxruntime, OpenVINO and LiteRT.

The host packager (validation, host benchmark) and the device agent (selection, serving) both run
models through `open_session`. The runtimes are imported inside functions, so `import
edgesdk.runtime` stays light on a device that has only one of them installed.

Every `Session.run` may be called from many threads at once (the agent's API serves concurrent
callers through one session); each runtime gets there its own way:

- onnxruntime: ``InferenceSession.run`` is thread-safe; calls run in parallel.
- OpenVINO: an infer request serves one call at a time ("Infer Request is busy" otherwise), so the
  session lends each call a request from a pool that grows on demand up to ``max_parallel_runs``.
  The CPU plugin's intermediate buffers belong to its streams, not to requests, so an extra
  request costs only its input/output tensors (measured: 8 more on a 1024-2048-2048 MLP, +3 MB).
- LiteRT: an interpreter is not thread-safe (inputs, resizes and invoke share its tensors), so
  calls take turns under a lock. One interpreter per caller would run them in parallel, but each
  would repack the weights for XNNPACK and hold its own tensor arena: N times the memory, for
  little gain on the few-core devices LiteRT serves, where one interpreter already uses them all.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgesdk.errors import CalibrationDataError, ConfigError, EdgeError, ModelError, RuntimeUnavailableError
from edgesdk.manifest import TensorSpec

RUNTIMES = ("onnxruntime", "openvino", "litert")

# Options each runtime accepts in `open_session(options=...)` (a variant's `runtime_options`).
RUNTIME_OPTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("graph_optimization_level", "provider_options"),
    "openvino": ("inference_precision_hint", "performance_hint"),
    "litert": (),
}
OV_PRECISION_HINTS = ("f32", "f16", "bf16")
# OpenVINO infer requests per session at most; callers beyond it wait for a free one. The agent's
# API admits fewer inferences at once than this (ApiLimits.max_concurrency), so it is never reached there.
DEFAULT_MAX_PARALLEL_RUNS = 16
_ORT_OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                   "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

Feeds = Mapping[str, np.ndarray]


# -- what is installed here -----------------------------------------------------------------------
# Loading a runtime to ask it what it can run costs the process its memory for good (measured:
# onnxruntime +19 MiB, OpenVINO with its CPU plugin +37 MiB, LiteRT +9 MiB), and a device agent
# that serves one ORT model should not carry OpenVINO and LiteRT. A long-running process that may
# never use most runtimes (the agent) calls `isolate_runtime_probe`: then a runtime it has already
# loaded is asked directly, and the others in a short child process (~0.5-1 s), whose answer is
# kept on disk for the next start. By default the runtimes are asked here, in-process: a packager
# or a script loads them anyway, and a child would only add that second.
PROBE_TIMEOUT_S = 120.0  # an NPU or GPU driver can take a while to initialise
# Device nodes whose appearance means a new accelerator or driver: a cached probe is then stale.
_ACCELERATOR_NODES = ("/dev/dri", "/dev/accel", "/dev/nvidia*", "/dev/nvhost-*", "/dev/dxg", "/etc/OpenCL/vendors")
# Environment variables that change what a runtime finds.
_PROBE_ENV = ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "OCL_ICD_VENDORS", "ZE_AFFINITY_MASK")
# The child process: probe each runtime named on its command line in turn and print one JSON line
# per runtime as soon as it is known, so a runtime that crashes the child loses only its own line.
_CHILD_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from edgesdk.runtime import _probe_here
for runtime in sys.argv[2:]:
    try:
        providers = _probe_here(runtime)
    except Exception:
        providers = None
    print(json.dumps([runtime, None if providers is None else list(providers)]), flush=True)
"""
_probe_isolated = False
_probe_cache_file: Path | None = None
_log = logging.getLogger("edgesdk.runtime")


def available_providers(refresh: bool = False) -> dict[str, list[str]]:
    """Runtime name → providers really present on this machine; runtimes not installed are absent.

    After `isolate_runtime_probe`, runtimes this process has not loaded are asked in a child
    process, so the answer loads no runtime here. The answer is cached; ``refresh=True`` probes
    again (and drops the disk cache).
    """
    if refresh:
        _probe_providers.cache_clear()
        _forget_probe_cache()
    return {runtime: list(providers) for runtime, providers in _probe_providers().items()}


def isolate_runtime_probe(cache_file: str | Path | None = None, enabled: bool = True) -> None:
    """Probe the runtimes this process has not loaded in a child process from now on, and keep its
    answer in ``cache_file`` (None: in memory only) for the next process.

    A cached answer is used while what decides it is unchanged (`_probe_key`: the runtimes'
    versions, this Python, the kernel, the accelerator device nodes and a few environment
    variables); otherwise the child probes again and the file is rewritten. An answer this process
    already has stays in use. ``enabled=False`` returns to probing in-process.
    """
    global _probe_isolated, _probe_cache_file
    _probe_isolated = enabled
    _probe_cache_file = Path(cache_file) if cache_file is not None and enabled else None


@functools.cache
def _probe_providers() -> dict[str, tuple[str, ...]]:
    installed = _installed_runtimes()
    loaded = [r for r in installed if not _probe_isolated or _runtime_loaded(r)]
    found: dict[str, tuple[str, ...] | None] = {r: _probe_here(r) for r in loaded}
    # OpenVINO last: a device plugin that crashes or hangs the child then costs no other runtime.
    elsewhere = sorted((r for r in installed if r not in loaded), key=lambda r: r == "openvino")
    if elsewhere:
        found.update(_probe_elsewhere(elsewhere))
    return {r: providers for r in RUNTIMES if (providers := found.get(r)) is not None}


def _installed_runtimes() -> list[str]:
    """The runtimes whose module is on the path (found, not imported)."""
    from edgesdk.runtime_extras import RUNTIME_EXTRAS

    installed = []
    for runtime in RUNTIMES:
        for name in RUNTIME_EXTRAS[runtime].import_names:
            try:
                if importlib.util.find_spec(name) is not None:
                    installed.append(runtime)
                    break
            except (ImportError, ValueError):  # a broken package, or a module without a spec
                continue
    return installed


def _runtime_loaded(runtime: str) -> bool:
    from edgesdk.runtime_extras import RUNTIME_EXTRAS

    return any(name in sys.modules for name in RUNTIME_EXTRAS[runtime].import_names)


def _probe_here(runtime: str) -> tuple[str, ...] | None:
    """Ask ``runtime`` in this process what it can run on (None: it does not load)."""
    try:
        if runtime == "onnxruntime":
            import onnxruntime as ort

            return tuple(ort.get_available_providers())
        if runtime == "openvino":
            devices: list[str] = []
            for device in _ov_core().available_devices:
                base = device.split(".")[0]  # "GPU.0", "GPU.1" → "GPU"
                if base not in devices:
                    devices.append(base)
            return tuple(devices)
        if runtime == "litert":
            return ("XNNPACK", "CPU") if _litert_interpreter_module() is not None else None
    except (ImportError, OSError, RuntimeError):
        return None
    return None


def _probe_elsewhere(runtimes: list[str]) -> dict[str, tuple[str, ...] | None]:
    """``runtimes`` probed in a child process (or read from the probe cache)."""
    key = _probe_key(runtimes)
    cached = _read_probe_cache(key)
    if cached is not None:
        return cached
    found, complete = _probe_in_child(runtimes)
    if complete:
        _write_probe_cache(key, found)
    return found


def _probe_in_child(runtimes: list[str]) -> tuple[dict[str, tuple[str, ...] | None], bool]:
    """(answers, complete): complete when every runtime answered and loads; only that is cached."""
    root = str(Path(__file__).resolve().parents[1])
    command = [sys.executable, "-c", _CHILD_PROBE, root, *runtimes]
    try:
        if not sys.executable:
            raise OSError("no Python executable to start")
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S)
        output, code, why = done.stdout, done.returncode, f"exit status {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        output, code, why = exc.stdout or b"", None, f"no answer within {PROBE_TIMEOUT_S:g} s"
    except OSError as exc:  # cannot start a child (an embedded interpreter): ask here, as before
        _log.warning("cannot probe runtimes in a child process (%s); loading them here", exc)
        return {r: _probe_here(r) for r in runtimes}, False
    found: dict[str, tuple[str, ...] | None] = {}
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else str(output)
    for line in text.splitlines():
        with contextlib.suppress(ValueError, TypeError):
            runtime, providers = json.loads(line)
            if runtime in runtimes:
                found[runtime] = None if providers is None else tuple(str(p) for p in providers)
    silent = [r for r in runtimes if r not in found]
    if silent and code is not None and code > 0 and not found:
        # The child could not even start probing (edgesdk not importable there): ask here.
        _log.warning("the runtime probe child failed (%s); loading the runtimes here", why)
        return {r: _probe_here(r) for r in runtimes}, False
    if silent:  # a runtime crashed or hung the child: it is unusable here, and this process survives
        _log.warning("runtime probe: %s did not answer (%s); treated as not installed", ", ".join(silent), why)
    return found, not silent and code == 0 and all(v is not None for v in found.values())


def _probe_key(runtimes: list[str]) -> str:
    """What decides the probe's answer; a cached answer is used only under the same key."""
    from importlib import metadata

    from edgesdk.runtime_extras import RUNTIME_EXTRAS

    versions = {}
    for runtime in runtimes:
        for dist in RUNTIME_EXTRAS[runtime].distributions:
            with contextlib.suppress(metadata.PackageNotFoundError):
                versions[dist] = metadata.version(dist)
    nodes = sorted(str(p) for pattern in _ACCELERATOR_NODES for p in Path("/").glob(pattern.lstrip("/")))
    for folder in ("/dev/dri", "/dev/accel", "/etc/OpenCL/vendors"):
        with contextlib.suppress(OSError):
            nodes += sorted(f"{folder}/{name}" for name in os.listdir(folder))
    raw = {"runtimes": runtimes, "versions": versions, "python": [sys.executable, sys.version],
           "kernel": platform.release(), "nodes": nodes, "env": {k: os.environ.get(k) for k in _PROBE_ENV}}
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()


def _read_probe_cache(key: str) -> dict[str, tuple[str, ...] | None] | None:
    if _probe_cache_file is None:
        return None
    try:
        data = json.loads(_probe_cache_file.read_bytes())
        if data.get("key") != key or not isinstance(data.get("providers"), dict):
            return None
        return {str(r): tuple(str(p) for p in providers) for r, providers in data["providers"].items()}
    except (OSError, ValueError, TypeError, AttributeError):  # absent or damaged: probe again
        return None


def _write_probe_cache(key: str, found: dict[str, tuple[str, ...] | None]) -> None:
    if _probe_cache_file is None:
        return
    from edgesdk.atomicfile import write_text_atomic

    doc = {"key": key, "providers": {r: list(p) for r, p in found.items() if p is not None}}
    try:
        _probe_cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(_probe_cache_file, json.dumps(doc, indent=1) + "\n")
    except OSError as exc:  # the cache only saves the next start a child process
        _log.warning("cannot keep the runtime probe in %s: %s", _probe_cache_file, exc)


def _forget_probe_cache() -> None:
    if _probe_cache_file is not None:
        with contextlib.suppress(OSError):
            _probe_cache_file.unlink()


def runtime_versions() -> dict[str, str]:
    """Runtime name → version string, for the runtimes installed here (part of the agent's cache key)."""
    versions: dict[str, str] = {}
    try:
        import onnxruntime as ort

        versions["onnxruntime"] = ort.__version__
    except (ImportError, OSError):
        pass
    try:
        import openvino as ov

        versions["openvino"] = ov.get_version()
    except (ImportError, OSError):
        pass
    module = _litert_interpreter_module()
    if module is not None:
        package = __import__(module.__name__.split(".")[0])
        versions["litert"] = str(getattr(package, "__version__", "unknown"))
    return versions


def _litert_interpreter_module() -> Any | None:
    """ai_edge_litert.interpreter, else tflite_runtime.interpreter (needs numpy < 2), else None."""
    try:
        import ai_edge_litert.interpreter as module

        return module
    except (ImportError, OSError):
        pass
    try:
        import tflite_runtime.interpreter as module  # type: ignore[import-not-found]

        return module
    except (ImportError, OSError):
        return None


@functools.cache
def _ov_core() -> Any:
    # One Core per process: creating it loads every device plugin, which takes a while.
    import openvino as ov

    return ov.Core()


# -- sessions -------------------------------------------------------------------------------------
class Session:
    """One model loaded on one runtime/provider. ``run(feeds)`` returns outputs by name, in model order.

    ``config`` holds the settings that were actually applied (threads, precision hint, ...), so a
    benchmark table or health report can say what ran. Usable as a context manager.
    """

    runtime: str = ""

    def __init__(self, path: Path, provider: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 config: dict[str, Any]) -> None:
        self.path = path
        self.provider = provider
        self.inputs = inputs
        self.outputs = outputs
        self.config = config
        self._closed = False

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        if self._closed:
            raise ModelError(f"{self.path.name}: {self.runtime} session is closed")
        missing = [name for name in self.input_names if name not in feeds]
        extra = sorted(set(feeds) - set(self.input_names))
        if missing or extra:
            what = f"lack input {missing[0]!r}" if missing else f"name unknown input {extra[0]!r}"
            raise CalibrationDataError(f"{self.path.name}: feeds {what} "
                                       f"(model inputs: {', '.join(self.input_names)})")
        arrays = {name: np.asarray(feeds[name]) for name in self.input_names}
        try:
            return self._run(arrays)
        except EdgeError:
            raise
        except Exception as exc:  # each runtime raises its own exception types
            raise ModelError(f"{self.path.name}: {self.runtime} run failed: {_first_line(exc)}") from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path.name} on {self.runtime}/{self.provider}>"

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        pass


def open_session(path: str | Path, runtime: str, provider: str, options: Mapping[str, Any] | None = None,
                 threads: int | None = None, *, max_parallel_runs: int = DEFAULT_MAX_PARALLEL_RUNS,
                 cache_dir: str | Path | None = None) -> Session:
    """Load ``path`` on ``runtime``/``provider``; raise RuntimeUnavailableError if that cannot run here.

    ``max_parallel_runs`` bounds the OpenVINO infer requests the session creates for concurrent
    callers (see the module docstring); the other runtimes do not need it.
    ``cache_dir``: a folder for compiled engines, so the next session of the same model on the same
    machine starts faster: OpenVINO's ``CACHE_DIR`` (compiled blobs), ONNX Runtime TensorRT's
    engine and timing caches. The caller keys it (package, variant, hardware, runtime versions);
    runtimes and providers without such a cache ignore it.
    """
    if runtime not in RUNTIMES:
        raise RuntimeUnavailableError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    options = dict(options or {})
    unknown = sorted(set(options) - set(RUNTIME_OPTIONS[runtime]))
    if unknown:
        known = ", ".join(RUNTIME_OPTIONS[runtime]) or "none"
        raise ConfigError(f"{runtime} option {unknown[0]!r} is not known (known: {known})")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    if isinstance(max_parallel_runs, bool) or not isinstance(max_parallel_runs, int) or max_parallel_runs < 1:
        raise ConfigError(f"max_parallel_runs must be a positive integer, got {max_parallel_runs!r}")
    available = available_providers()
    if runtime not in available:
        raise RuntimeUnavailableError(f"{runtime} is not installed here")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if provider not in available[runtime]:
        raise RuntimeUnavailableError(f"{runtime} provider {provider} is not available here "
                                      f"(available: {', '.join(available[runtime]) or 'none'})")
    cache = Path(cache_dir) if cache_dir is not None else None
    if runtime == "openvino":
        return _open_openvino(path, provider, options, threads, max_parallel_runs, cache)
    if runtime == "onnxruntime":
        return _open_ort(path, provider, options, threads, cache)
    return _open_litert(path, provider, options, threads)


# -- onnxruntime ----------------------------------------------------------------------------------
_ORT_TYPES = {"float": "float32", "double": "float64", "string": "object"}


def _ort_dtype(type_str: str) -> str:
    """'tensor(float)' → 'float32'; ZipMap's seq(map(...)) outputs become float32 (see _ort_array)."""
    if not type_str.startswith("tensor("):
        return "float32"
    inner = type_str[len("tensor("):-1]
    return _ORT_TYPES.get(inner, inner)


def _ort_array(value: Any) -> np.ndarray:
    # scikit-learn classifiers with ZipMap return a list of {label: probability} dicts; turn that
    # into the N × classes array a validation can compare (dicts keep the model's label order).
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return np.array([list(row.values()) for row in value], dtype=np.float32)
    return np.asarray(value)


def _ort_specs(args: list[Any]) -> list[TensorSpec]:
    specs = []
    for a in args:
        if a.type.startswith("tensor("):
            shape = tuple(d if isinstance(d, (int, str)) else "?" for d in (a.shape or ()))
        else:
            shape = ("?", "?")  # a ZipMap sequence, returned as samples × classes
        specs.append(TensorSpec(a.name, _ort_dtype(a.type), shape))
    return specs


class _OrtSession(Session):
    runtime = "onnxruntime"

    def __init__(self, path: Path, provider: str, session: Any, config: dict[str, Any]) -> None:
        super().__init__(path, provider, _ort_specs(session.get_inputs()), _ort_specs(session.get_outputs()),
                         config)
        self._session = session

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(None, feeds)
        return {name: _ort_array(v) for name, v in zip(self.output_names, values)}

    def _close(self) -> None:
        self._session = None


# TensorRT provider options that make its engines and tactic timings persist in a cache folder.
TRT_CACHE_OPTIONS = ("trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable",
                     "trt_timing_cache_path")


def ort_cache_options(provider: str, cache_dir: Path | None) -> dict[str, Any]:
    """Provider options that keep ``provider``'s compiled engines in ``cache_dir`` (TensorRT only)."""
    if cache_dir is None or provider != "TensorrtExecutionProvider":
        return {}
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}


def _open_ort(path: Path, provider: str, options: dict[str, Any], threads: int | None,
              cache_dir: Path | None = None) -> Session:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: we check for a provider fallback ourselves
    config: dict[str, Any] = {}
    if threads is not None:
        so.intra_op_num_threads = threads
        config["intra_op_num_threads"] = threads
    level = options.get("graph_optimization_level")
    if level is not None:
        if level not in _ORT_OPT_LEVELS:
            raise ConfigError(f"onnxruntime option graph_optimization_level: {level!r} is not one of "
                              f"{', '.join(_ORT_OPT_LEVELS)}")
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_OPT_LEVELS[level])
        config["graph_optimization_level"] = level
    provider_options = options.get("provider_options")
    if provider_options is not None and not isinstance(provider_options, dict):
        raise ConfigError("onnxruntime option provider_options must be a mapping")
    provider_options = {**(provider_options or {}), **ort_cache_options(provider, cache_dir)}
    if provider_options:
        config["provider_options"] = dict(provider_options)
    # CPU is listed only when it is the request: ORT appends it anyway, and we must see a fallback.
    providers: list[Any] = [(provider, dict(provider_options)) if provider_options else provider]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Specified provider is not in available provider names"
            session = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        raise ModelError(f"{path}: onnxruntime cannot load the model: {_first_line(exc)}") from exc
    got = session.get_providers()
    if not got or got[0] != provider:
        # ORT only warns when a provider fails to initialise and silently runs on CPU instead.
        raise RuntimeUnavailableError(f"{path.name}: requested {provider} but onnxruntime gave "
                                      f"{got[0] if got else 'no provider'}")
    return _OrtSession(path, provider, session, config)


# -- OpenVINO -------------------------------------------------------------------------------------
def _ov_name(port: Any, fallback: str) -> str:
    try:
        return port.get_any_name()
    except RuntimeError:  # a port without a tensor name
        return fallback


def _ov_specs(ports: list[Any], prefix: str) -> list[TensorSpec]:
    specs = []
    for i, port in enumerate(ports):
        try:
            dtype = np.dtype(port.get_element_type().to_dtype()).name
        except (RuntimeError, TypeError):
            dtype = str(port.get_element_type())
        shape = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
        specs.append(TensorSpec(_ov_name(port, f"{prefix}{i}"), dtype, shape))
    return specs


class _InferRequestPool:
    """The infer requests of one compiled model, lent one per running call.

    Requests are created on demand, so a session that is called from one thread holds one; a call
    that finds all ``limit`` requests lent waits for one to come back.
    """

    def __init__(self, compiled: Any, limit: int) -> None:
        self._compiled = compiled
        self._limit = limit
        self._free: list[Any] = [compiled.create_infer_request()]  # fail at load, not at first call
        self._created = 1
        self._cond = threading.Condition(threading.Lock())

    @property
    def created(self) -> int:
        with self._cond:
            return self._created

    @contextmanager
    def lend(self) -> Iterator[Any]:
        with self._cond:
            # No timeout: every lent request comes back when its infer() returns or raises.
            self._cond.wait_for(lambda: self._free or self._created < self._limit)
            if self._free:
                request = self._free.pop()
            else:
                request = self._compiled.create_infer_request()
                self._created += 1
        try:
            yield request
        finally:
            with self._cond:
                self._free.append(request)
                self._cond.notify()


class _OpenVinoSession(Session):
    runtime = "openvino"

    def __init__(self, path: Path, provider: str, compiled: Any, config: dict[str, Any],
                 max_parallel_runs: int = DEFAULT_MAX_PARALLEL_RUNS) -> None:
        super().__init__(path, provider, _ov_specs(compiled.inputs, "input"),
                         _ov_specs(compiled.outputs, "output"), config)
        self.compiled = compiled  # the ov.CompiledModel, for inspecting what OpenVINO really applied
        self._pool: _InferRequestPool | None = _InferRequestPool(compiled, max_parallel_runs)

    @property
    def infer_requests(self) -> int:
        """Infer requests created so far: the most calls that have run at once, up to the limit."""
        return 0 if self._pool is None else self._pool.created

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pool, compiled = self._pool, self.compiled
        if pool is None or compiled is None:
            raise ModelError(f"{self.path.name}: openvino session is closed")
        ports = compiled.outputs
        with pool.lend() as request:
            # share_outputs=False: OpenVINO copies out of its own buffers, so results outlive the
            # request going back to the pool and serving the next caller.
            results = request.infer(feeds, share_outputs=False)
            return {name: np.asarray(results[port]) for name, port in zip(self.output_names, ports)}

    def _close(self) -> None:
        self._pool = None  # calls in flight keep their request until they return
        self.compiled = None


# OPTIMIZATION_CAPABILITIES a device must list to compute in a precision natively. Without it,
# OpenVINO silently runs f32 instead: a bf16 variant would then be an fp32 one timed twice.
OV_PRECISION_CAPABILITY = {"bf16": "BF16"}


def openvino_computes(provider: str, hint: str) -> bool:
    """Whether OpenVINO ``provider`` computes natively in precision ``hint`` on this machine."""
    needed = OV_PRECISION_CAPABILITY.get(hint)
    if needed is None:
        return True
    try:
        return needed in set(_ov_core().get_property(provider, "OPTIMIZATION_CAPABILITIES"))
    except RuntimeError:
        return False


def _open_openvino(path: Path, provider: str, options: dict[str, Any], threads: int | None,
                   max_parallel_runs: int = DEFAULT_MAX_PARALLEL_RUNS, cache_dir: Path | None = None) -> Session:
    if path.suffix not in (".xml", ".onnx"):
        raise ModelError(f"{path}: openvino runs .xml IR or .onnx files, not {path.suffix or 'no suffix'}")
    core = _ov_core()
    hint = options.get("inference_precision_hint")
    if hint is not None and hint not in OV_PRECISION_HINTS:
        raise ConfigError(f"openvino option inference_precision_hint: {hint!r} is not one of "
                          f"{', '.join(OV_PRECISION_HINTS)}")
    if hint is None and provider == "CPU":
        # OpenVINO CPU runs bf16 by default on AVX-512-BF16/AMX CPUs; that alone cut one
        # classifier's top-1 agreement to 90.6 %. bf16 is a variant of its own, asked for by name.
        hint = "f32"
    performance = options.get("performance_hint", "LATENCY")
    if performance not in ("LATENCY", "THROUGHPUT"):
        raise ConfigError(f"openvino option performance_hint: {performance!r} is not LATENCY or THROUGHPUT")
    config: dict[str, Any] = {"PERFORMANCE_HINT": performance}
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        supported = set(core.get_property(provider, "SUPPORTED_PROPERTIES"))
    except RuntimeError:
        supported = set(config)
    if "INFERENCE_PRECISION_HINT" in config and "INFERENCE_PRECISION_HINT" not in supported:
        raise RuntimeUnavailableError(f"openvino {provider} does not take INFERENCE_PRECISION_HINT {hint}")
    if hint is not None and not openvino_computes(provider, hint):
        raise RuntimeUnavailableError(f"openvino {provider} cannot compute in {hint} here (no "
                                      f"{OV_PRECISION_CAPABILITY[hint]} in its OPTIMIZATION_CAPABILITIES)")
    config = {k: v for k, v in config.items() if k in supported}  # e.g. NPU has no thread count
    if cache_dir is not None:  # a Core property every device takes (not in a device's SUPPORTED_PROPERTIES)
        config["CACHE_DIR"] = str(cache_dir)
    try:
        # With a cache, compile from the path: a cache hit then skips reading the model at all.
        model = str(path) if cache_dir is not None else core.read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line C++ trace
        raise ModelError(f"{path}: openvino cannot read the model: {_first_line(exc)}") from exc
    try:
        compiled = core.compile_model(model, provider, config)
    except Exception as exc:
        raise ModelError(f"{path.name}: openvino cannot compile the model for {provider}: "
                         f"{_first_line(exc)}") from exc
    try:
        return _OpenVinoSession(path, provider, compiled, config, max_parallel_runs)
    except RuntimeError as exc:  # creating the first infer request allocates its tensors
        raise ModelError(f"{path.name}: openvino cannot create an infer request on {provider}: "
                         f"{_first_line(exc)}") from exc


# -- LiteRT ---------------------------------------------------------------------------------------
class _LiteRtSession(Session):
    runtime = "litert"

    def __init__(self, path: Path, provider: str, interpreter: Any, config: dict[str, Any]) -> None:
        self._interpreter = interpreter
        ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
        super().__init__(path, provider, [_tfl_spec(d) for d in ins], [_tfl_spec(d) for d in outs], config)
        self._index = {d["name"]: int(d["index"]) for d in ins}
        self._shapes = {d["name"]: tuple(int(x) for x in d["shape"]) for d in ins}
        self._out_index = [int(d["index"]) for d in outs]
        # One caller at a time: set_tensor, resize, invoke and get_tensor share the interpreter's
        # tensors (see the module docstring for why a lock and not an interpreter per caller).
        self._lock = threading.Lock()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            it = self._interpreter
            if it is None:
                raise ModelError(f"{self.path.name}: litert session is closed")
            resized = False
            for name, array in feeds.items():
                if array.shape != self._shapes[name]:
                    it.resize_tensor_input(self._index[name], list(array.shape))
                    self._shapes[name] = array.shape
                    resized = True
            if resized:
                it.allocate_tensors()
            for name, array in feeds.items():
                it.set_tensor(self._index[name], array)
            it.invoke()
            return {name: it.get_tensor(i) for name, i in zip(self.output_names, self._out_index)}  # copies

    def _close(self) -> None:
        with self._lock:  # not under a running invoke
            self._interpreter = None


def _tfl_spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(detail["name"], np.dtype(detail["dtype"]).name,
                      tuple(int(d) if d >= 0 else "?" for d in dims))


def _open_litert(path: Path, provider: str, options: dict[str, Any], threads: int | None) -> Session:
    module = _litert_interpreter_module()
    kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": threads}
    if provider == "CPU":
        # The default resolver applies the XNNPACK delegate; "CPU" means the builtin kernels alone.
        kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interpreter = module.Interpreter(**kwargs)
        interpreter.allocate_tensors()
    except Exception as exc:  # ValueError/RuntimeError from the C++ interpreter
        raise ModelError(f"{path}: litert cannot load the model: {_first_line(exc)}") from exc
    config = {"num_threads": threads} if threads is not None else {}
    return _LiteRtSession(path, provider, interpreter, config)


# OpenVINO wraps the useful line in C++ trace headers; these lines say nothing.
_BOILERPLATE = re.compile(r"^(Exception from \S+|Check '.*' failed at .*|FrontEnd API failed with \w+:?)$")


def _first_line(exc: BaseException) -> str:
    """The informative line of a runtime's message, at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not _BOILERPLATE.match(ln)]
    return (useful or lines or [type(exc).__name__])[0][:300]
