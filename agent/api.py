"""Local inference API for apps on the device (loopback only unless allowed), on `agent.http_server`.

    POST /v1/infer                application/x-edgesdk-tensors in -> the same out (the binary framing
                                  of `agent.tensor_frame`: a small header and the raw bytes per tensor), or
                                  npz in -> npz out (application/x-npz or octet-stream), or
                                  {"inputs": {name: nested lists}} -> {"outputs": {...}, "latency_ms": ...,
                                  "model": "name@version"}; runs the only active model (409 if several)
    POST /v1/models/{name}/infer  the same, on the active model named ``name`` (404 if none is)
    GET  /v1/models               {"models": [each active model's description, sorted by name]}
    GET  /v1/models/{name}        one active model's description (404 if none has that name)
    GET  /v1/status               the active models, uptime, API counters, plus the daemon's status callback
    GET  /metrics                 Prometheus text format 0.0.4, inference families labelled by ``model``

Inference answers carry ``X-Edge-Latency-Ms`` (the model's run) and ``X-Edge-Model`` (the release
that answered, ``name@version``). A model name in a path is a fleet id (`edgesdk.protocol.ID_RULE`).

Errors are ``{"error": "<one line>"}`` with 400 bad input (or a malformed request, Content-Length
included), 403 a Host header that does not name this API, 404 unknown path or no active model of that
name (the answer lists the active ones), 408 headers or body too slow, 409 ``/v1/infer`` while
several models are active (the answer lists them), 406 an output the binary framing cannot carry
(strings: ask with JSON), 411 no length, 413 body (or decoded npz) too large, 415 unknown content
type, 431 headers too large, 500 runtime failure, 501 unknown method, 503 no model active or no room
within ``queue_timeout_s``, 505 not HTTP/1.x. The API has no authentication, so a bind outside
loopback must be asked for explicitly (``allow_remote``).

What one caller can cost is bounded by `ApiLimits`. Connections, header and body timeouts,
Content-Length and the Host header are `agent.http_server`'s (its docstring says how); here:

- A Content-Length over ``max_body_bytes`` is a 413 before a byte of the body is read. Bodies
  being held take room in a ``max_buffered_bytes`` budget before they are read; decoding, the run
  and encoding happen inside one of ``max_concurrency`` slots, as decoding a JSON body costs
  several times its size (a 61 MB body took 380 MB).
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import math
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent import metrics
from agent.tensor_frame import TENSORS_TYPE, TensorFrameError, decode_tensors, encode_tensors
from agent.http_request import Disconnected, Exchange, HttpError
from agent.http_server import HttpServer
from agent.model_host import (
    ActiveModel, AmbiguousModelError, InvalidInputError, ModelHost, NoModelError, UnknownModelError,
)
from edgesdk.errors import ConfigError, EdgeError
from edgesdk.npz import NPY_READ_LOCK
from edgesdk.protocol import ID_RULE, is_valid_id

log = logging.getLogger(__name__)

DEFAULT_PORT = 8700
NPZ_TYPES = ("application/x-npz", "application/octet-stream", "")
INFER_TYPES = (TENSORS_TYPE, "application/json", *NPZ_TYPES)
# Host names the API answers to when the caller does not say (plus the address it is bound to).
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")
_MIB = 1024 * 1024
MODELS_PATH = "/v1/models"


@dataclass(frozen=True)
class ApiLimits:
    """What callers of the local API may cost the device. Defaults suit a 2-8 core, 1-4 GB device."""

    # A request body, and the decoded size of an npz body; a larger Content-Length is a 413 at once.
    max_body_bytes: int = 64 * _MIB
    # Requests decoding their body, running the model or encoding the answer at once. A JSON body
    # decodes to ~6x its size, so this times max_body_bytes bounds the API's peak memory.
    max_concurrency: int = 4
    # Handler threads; they serve requests whose headers are in, never idle connections.
    workers: int = 8
    # Open connections (idle ones included); the longest-waiting one is closed to admit another.
    max_connections: int = 256
    # Request bodies read or being read, all together, before their decoding is done.
    max_buffered_bytes: int = 128 * _MIB
    # How long a request waits for room in max_buffered_bytes or for a slot before it gets 503.
    queue_timeout_s: float = 10.0
    # From a request's first byte to the end of its headers; then 408 and close (slowloris).
    header_timeout_s: float = 10.0
    # To receive a whole body, and to send a whole response; then 408 (or drop) and close.
    body_timeout_s: float = 30.0
    # A connection with no request in progress is closed after this.
    idle_timeout_s: float = 60.0
    # Request line plus headers; more is a 431.
    max_header_bytes: int = 64 * 1024
    # A refused body up to this size is read (never stored) after the answer, so a client that is
    # still sending it reads the answer instead of a connection reset, and the connection stays usable.
    max_discard_bytes: int = 128 * _MIB
    # After an answer, how long a worker waits on the connection for the caller's next request before
    # handing it to the poller (at most workers // 2 wait at once). A call that comes within it skips
    # two thread hand-overs: 0.21 -> 0.15 ms for an 8 KiB input, 0.81 -> 0.53 ms for 588 KiB (null
    # model, 2 cores at load 6). 0: never.
    linger_s: float = 0.002

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_concurrency", "workers", "max_connections",
                     "max_buffered_bytes", "max_header_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"api limit {name} must be a positive integer, got {value!r}")
        for name in ("queue_timeout_s", "header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"api limit {name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.linger_s, bool) or not isinstance(self.linger_s, (int, float)) \
                or not 0 <= self.linger_s <= self.idle_timeout_s:
            raise ConfigError(f"api limit linger_s must be 0..idle_timeout_s ({self.idle_timeout_s}) seconds, "
                              f"got {self.linger_s!r}")
        if isinstance(self.max_discard_bytes, bool) or not isinstance(self.max_discard_bytes, int) \
                or self.max_discard_bytes < 0:
            raise ConfigError(f"api limit max_discard_bytes must be >= 0, got {self.max_discard_bytes!r}")
        if self.max_buffered_bytes < self.max_body_bytes:  # else a body at the limit never fits
            raise ConfigError(f"api limit max_buffered_bytes ({self.max_buffered_bytes}) is below "
                              f"max_body_bytes ({self.max_body_bytes})")


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``"127.0.0.1:8700"``, ``"[::1]:8700"``, ``"localhost"`` -> (host, port); ConfigError if malformed."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not text[end + 1:].startswith(":")):
            raise ConfigError(f"api address {text!r}: expected [ipv6]:port")
        host, port_text = text[1:end], text[end + 2:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ConfigError(f"api address {text!r}: write an IPv6 address as [addr]:port")
    if not host:
        raise ConfigError(f"api address {text!r}: missing host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"api address {text!r}: port must be 0..65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: we do not resolve it to guess


def model_name(segment: str) -> str | None:
    """The model name a path segment spells (percent-decoded), None when it is not a valid one."""
    try:
        name = urllib.parse.unquote(segment, errors="strict")
    except UnicodeDecodeError:
        return None
    return name if is_valid_id(name) else None


def _model_segment(path: str, suffix: str = "") -> str | None:
    """``{name}`` of ``/v1/models/{name}{suffix}`` as sent (still percent-encoded), else None."""
    prefix = MODELS_PATH + "/"
    if not path.startswith(prefix) or not path.endswith(suffix) or len(path) < len(prefix) + len(suffix):
        return None
    segment = path[len(prefix):len(path) - len(suffix)]
    return None if "/" in segment else segment


def describe(model: ActiveModel) -> dict[str, Any]:
    """What /v1/models says of one model: its description and its release (``name@version``)."""
    return {**model.describe(), "release": model.release}


# -- bodies ---------------------------------------------------------------------------------------

def _decode_npz(body: bytes | bytearray, max_decoded: int) -> dict[str, np.ndarray]:
    with NPY_READ_LOCK:  # the header checks below call numpy's header parser too (edgesdk.npz)
        return _decode_npz_unlocked(body, max_decoded)


def _decode_npz_unlocked(body: bytes | bytearray, max_decoded: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            infos = archive.infolist()
            decoded = sum(info.file_size for info in infos)
            if decoded > max_decoded:  # a small compressed npz can inflate to gigabytes
                raise HttpError(413, f"npz body decodes to {decoded} bytes; the limit is {max_decoded}")
            for info in infos:  # an array header may claim far more than its member holds
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                    claimed = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject or claimed > info.file_size:
                        raise HttpError(400, f"npz member {info.filename[:60]!r} claims {claimed} bytes "
                                             f"of {dtype} in {info.file_size}")
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, TypeError,
            NotImplementedError, RuntimeError) as exc:  # RuntimeError: zipfile's "encrypted, password required"
        raise HttpError(400, f"body is not a valid npz file: {' '.join(str(exc).split())[:200]}") from None


def _decode_json(body: bytes | bytearray) -> Any:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the C stack allows
        raise HttpError(400, f"body is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
        raise HttpError(400, 'JSON body must be {"inputs": {name: array}}')
    return doc["inputs"]


def _encode_npz(outputs: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(value) for name, value in outputs.items()})
    return buf.getvalue()


@dataclass(frozen=True)
class InferAnswer:
    """A successful inference's answer, and the model that gave it (for the request counters)."""

    body: bytes
    content_type: str
    headers: dict[str, str]
    model: str


class _ByteBudget:
    """Bytes that may be held at once (request bodies); `take` waits up to a timeout for room."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._cond = threading.Condition(threading.Lock())

    @contextmanager
    def take(self, n: int, timeout_s: float) -> Iterator[None]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._used + n <= self.capacity, timeout=timeout_s):
                raise HttpError(503, f"busy: {self._used} bytes of request bodies already held "
                                     f"(limit {self.capacity}); retry later")
            self._used += n
        try:
            yield
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()


class ApiServer:
    """The local API on an `HttpServer`: one poller thread and ``limits.workers`` handler threads.
    ``port=0`` binds a free port (see `port` after start)."""

    def __init__(self, host: str, port: int, model_host: ModelHost,
                 status_fn: Callable[[], Mapping[str, Any]] | None = None, *,
                 limits: ApiLimits | None = None, allow_remote: bool = False,
                 allowed_hosts: Iterable[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``allowed_hosts``: the names (without port) a request's Host header may carry; by default
        localhost, 127.0.0.1, ::1 and ``host``. A remote bind must list the names its clients use."""
        if not allow_remote and not is_loopback(host):
            raise ConfigError(f"api address {host!r} is not loopback; the API has no authentication "
                              "(set allow_remote to expose it anyway)")
        self.host = host
        self.model_host = model_host
        self.limits = limits or ApiLimits()
        names = (*LOOPBACK_HOST_NAMES, host) if allowed_hosts is None else tuple(allowed_hosts)
        self._http = HttpServer(host, port, self._route, self.limits, names, name="edge-api")
        self.allowed_hosts = self._http.allowed_hosts
        self._status_fn = status_fn
        self._clock = clock
        self._started = clock()
        self._counts: dict[str | None, dict[str, int]] = {}  # model name (None: none chosen) -> outcome -> n
        self._lock = threading.Lock()  # the request counters
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrency)
        self.body_budget = _ByteBudget(self.limits.max_buffered_bytes)

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return self._http.url

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> int:
        """Bind and serve in daemon threads; returns the bound port. ConfigError if it cannot bind."""
        self._started = self._clock()
        return self._http.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._http.stop(timeout_s)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- routing (called from worker threads) ------------------------------------------------------

    def _route(self, exchange: Exchange) -> None:
        request = exchange.request
        path, method = request.path, request.method
        if method == "POST" and path == "/v1/infer":
            self._infer(exchange, None)
        elif method == "POST" and (segment := _model_segment(path, "/infer")) is not None:
            self._infer(exchange, segment)
        elif method == "GET" and (path in ("/v1/status", "/metrics", MODELS_PATH)
                                  or _model_segment(path) is not None):
            try:
                if path == "/v1/status":
                    exchange.send_json(200, self.status())
                elif path == "/metrics":
                    exchange.send(200, self.metrics().encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
                elif path == MODELS_PATH:
                    exchange.send_json(200, {"models": [describe(m) for m in self.model_host.models().values()]})
                else:
                    exchange.send_json(200, describe(self.named_model(_model_segment(path) or "")))
            except (Disconnected, HttpError):
                raise
            except Exception as exc:  # a status callback bug must not kill the connection silently
                log.exception("GET %s failed", path[:200])
                raise HttpError(500, f"internal error: {' '.join(str(exc).split())[:200]}") from None
        elif method in ("GET", "POST"):
            raise HttpError(404, f"no such endpoint: {method} {path[:200]}")
        else:
            raise HttpError(501, f"method {method[:20]} is not supported", close=True)

    def named_model(self, segment: str) -> ActiveModel:
        """The active model a path segment names; 404 (listing the active ones) for any other
        segment. Never echoes more than 64 characters of it."""
        name = model_name(segment)
        if name is None:
            known = ", ".join(self.model_host.models()) or "none"
            raise HttpError(404, f"no active model named {segment[:64]!r} (active: {known}); "
                                 f"a model name is {ID_RULE}")
        try:
            return self.model_host.resolve(name)
        except UnknownModelError as exc:
            raise HttpError(404, str(exc)) from None

    def _infer(self, exchange: Exchange, segment: str | None) -> None:
        """One inference request; ``segment``: the model name from the path (None: /v1/infer)."""
        limits = self.limits
        label: str | None = None  # the model the request is counted under
        try:
            length = exchange.content_length(limits.max_body_bytes)  # 411/413 before the body is read
            ctype = (exchange.request.header("content-type") or "").split(";", 1)[0].strip().lower()
            if ctype not in INFER_TYPES:
                raise HttpError(415, f"unsupported Content-Type {ctype[:60]!r}; "
                                     f"use {TENSORS_TYPE}, application/x-npz or application/json")
            # Refuse a request no model can serve before holding its body (404/409/503).
            label = self.named_model(segment).name if segment is not None else self._only_model().name
            with self.body_budget.take(length, limits.queue_timeout_s):
                body = exchange.read_body(length)
                with self.slot(limits.queue_timeout_s):
                    try:
                        # /v1/infer asks again at run time for the only model, which may have changed.
                        answer = self.infer_request(ctype, body, label if segment is not None else None)
                    except HttpError:
                        raise
                    except Exception as exc:  # a bug, not the caller's fault: answer 500, keep the worker
                        log.exception("api: inference request failed")
                        raise HttpError(500, f"internal error: {type(exc).__name__}") from None
                    del body
        except Exception:
            self.count(False, label)
            raise
        self.count(True, answer.model)  # before the answer goes out: a caller then sees its own count
        exchange.send(200, answer.body, answer.content_type, answer.headers)

    def _only_model(self) -> ActiveModel:
        """What /v1/infer runs on: 503 with no model active, 409 with several."""
        try:
            return self.model_host.resolve(None)
        except AmbiguousModelError as exc:
            raise HttpError(409, str(exc)) from None
        except NoModelError as exc:
            raise HttpError(503, str(exc)) from None

    def host_allowed(self, value: str) -> bool:
        """Whether a Host header names this API: an allowed name and the bound port."""
        return self._http.host_allowed(value)

    @contextmanager
    def slot(self, timeout_s: float) -> Iterator[None]:
        """One of ``max_concurrency`` places to decode, run and encode; 503 if none frees in time."""
        if not self._slots.acquire(timeout=timeout_s):
            raise HttpError(503, f"busy: {self.limits.max_concurrency} inferences already running; retry later")
        try:
            yield
        finally:
            self._slots.release()

    def count(self, ok: bool, model: str | None = None) -> None:
        """Count one inference request under ``model`` (None: refused before a model was chosen)."""
        with self._lock:
            counts = self._counts.get(model)
            if counts is None:
                counts = self._counts[model] = {"ok": 0, "error": 0}
            counts["ok" if ok else "error"] += 1

    def requests(self) -> dict[str, int]:
        """Inference requests by outcome, all models together."""
        with self._lock:
            return {outcome: sum(c[outcome] for c in self._counts.values()) for outcome in ("ok", "error")}

    def requests_by_model(self) -> dict[str | None, dict[str, int]]:
        """Inference requests by model name (None: refused before a model was chosen) and outcome."""
        with self._lock:
            return {name: dict(counts) for name, counts in self._counts.items()}

    def connections(self) -> dict[str, int]:
        """Open connections by state (``idle``: no request being served), and those refused on a limit."""
        return self._http.connections()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._status_fn is not None:
            try:
                out.update(self._status_fn())
            except Exception as exc:  # the daemon's part failing must not hide the model's status
                log.exception("status callback failed")
                out["status_error"] = " ".join(str(exc).split()) or type(exc).__name__
        models = self.model_host.models()  # one snapshot: "model" and "models" agree
        out.update({  # the daemon's callback cannot shadow these
            "model": next(iter(models.values())).describe() if len(models) == 1 else None,
            "models": {name: model.describe() for name, model in models.items()},
            "uptime_s": round(self._clock() - self._started, 3),
            "requests": self.requests(),
            "api": {"url": self.url, "max_body_bytes": self.limits.max_body_bytes,
                    "max_concurrency": self.limits.max_concurrency, "connections": self.connections()},
        })
        return out

    def metrics(self) -> str:
        return metrics.render_metrics(self.model_host, self.requests_by_model(), self._clock() - self._started,
                                      metrics.rss_bytes(), self.connections())

    def infer_request(self, ctype: str, body: bytes | bytearray, model: str | None = None) -> InferAnswer:
        """Decode, run and encode one inference on ``model`` (None: the only active one) inside a
        `slot`; errors are `HttpError`."""
        if ctype == TENSORS_TYPE:
            try:
                feeds = decode_tensors(body)
            except TensorFrameError as exc:
                raise HttpError(400, f"body is not valid {TENSORS_TYPE}: {exc}") from None
        elif ctype == "application/json":
            feeds = _decode_json(body)
        else:
            feeds = _decode_npz(body, self.limits.max_body_bytes)
        try:
            result = self.model_host.infer_timed(feeds, model)
        except UnknownModelError as exc:  # unloaded while the body was read
            raise HttpError(404, str(exc)) from None
        except AmbiguousModelError as exc:  # a second model arrived while the body was read
            raise HttpError(409, str(exc)) from None
        except NoModelError as exc:
            raise HttpError(503, str(exc)) from None
        except InvalidInputError as exc:
            raise HttpError(400, str(exc)) from None
        except EdgeError as exc:  # InferenceFailedError: the runtime raised
            raise HttpError(500, str(exc)) from None
        del feeds
        release = result.model.release
        headers = {"X-Edge-Latency-Ms": f"{result.latency_ms:.3f}", "X-Edge-Model": release}
        if ctype == "application/json":
            doc = {"outputs": {k: np.asarray(v).tolist() for k, v in result.outputs.items()},
                   "latency_ms": round(result.latency_ms, 3), "model": release}
            return InferAnswer(json.dumps(doc).encode("utf-8"), "application/json", headers, result.model.name)
        if ctype == TENSORS_TYPE:
            try:
                return InferAnswer(encode_tensors(result.outputs), TENSORS_TYPE, headers, result.model.name)
            except TensorFrameError as exc:  # a string output: the model ran, the answer cannot be framed
                raise HttpError(406, f"{exc}") from None
        return InferAnswer(_encode_npz(result.outputs), "application/x-npz", headers, result.model.name)
