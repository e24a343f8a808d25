"""Local inference API for apps on the device (stdlib HTTP, loopback only unless allowed).

    POST /v1/infer   npz in -> npz out (application/x-npz or octet-stream), or
                     {"inputs": {name: nested lists}} -> {"outputs": {...}, "latency_ms": ...}
    GET  /v1/status  the active model, uptime, API counters, plus the daemon's status callback
    GET  /metrics    Prometheus text format 0.0.4

Errors are ``{"error": "<one line>"}`` with 400 bad input, 404 unknown path, 408 body too slow,
411 no length, 413 body (or decoded npz) too large, 415 unknown content type, 500 runtime
failure, 503 no model active or too many requests at once. The API has no authentication, so a bind outside loopback
must be asked for explicitly (``allow_remote``).
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import socket
import socketserver
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from agent.model_host import InvalidInputError, ModelHost, NoModelError
from edgesdk.errors import ConfigError, EdgeError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8700
NPZ_TYPES = ("application/x-npz", "application/octet-stream", "")
# Prometheus `le` bounds in ms: spans a 0.1 ms NPU kernel to a 10 s CPU transformer.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 64 * 1024 * 1024  # request body, and the decoded size of an npz body
    socket_timeout_s: float = 30.0  # a client that stalls mid-request is dropped after this
    max_concurrent: int = 32  # inferences at once; more get 503 instead of piling up threads
    # A refused body up to this size is read and discarded so the client, still sending, gets the
    # 413 instead of a connection reset; beyond it the connection is closed unread.
    max_discard_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if (self.max_body_bytes < 1 or self.socket_timeout_s <= 0 or self.max_concurrent < 1
                or self.max_discard_bytes < 0):
            raise ConfigError(f"api limits must be positive, got {self}")


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


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render_metrics(host: ModelHost, requests: Mapping[str, int], uptime_s: float,
                   rss_bytes: int | None) -> str:
    """Prometheus text exposition of the API counters, latency histogram and model info."""
    hist, model_errors, rejected = host.recorder.snapshot()
    model = host.active
    lines: list[str] = []

    def family(name: str, kind: str, text: str, samples: list[tuple[str, Any]]) -> None:
        lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
        lines.extend(f"{name}{suffix} {_num(value)}" for suffix, value in samples)

    family("edge_inference_requests_total", "counter", "Inference requests to the local API, by outcome.",
           [(f'{{status="{s}"}}', requests.get(s, 0)) for s in ("ok", "error")])
    family("edge_inference_errors_total", "counter", "Inferences the runtime failed (valid input).",
           [("", model_errors)])
    family("edge_inference_rejected_total", "counter", "Requests refused before the model ran (bad input).",
           [("", rejected)])
    buckets = [(f'_bucket{{le="{_num(b)}"}}', n)
               for b, n in zip(LATENCY_BUCKETS_MS, hist.cumulative_at(LATENCY_BUCKETS_MS))]
    family("edge_inference_latency_ms", "histogram", "Model run time of successful inferences since start.",
           buckets + [('_bucket{le="+Inf"}', hist.count), ("_sum", hist.sum), ("_count", hist.count)])
    quantiles = [(q, hist.percentile(q * 100)) for q in (0.5, 0.95, 0.99)]
    family("edge_inference_latency_quantile_ms", "gauge", "Latency quantiles since start (within 0.5%).",
           [(f'{{quantile="{q}"}}', v) for q, v in quantiles if v is not None])
    family("edge_model_active", "gauge", "1 while a model is active.", [("", int(model is not None))])
    if model is not None:
        labels = ",".join(f'{k}="{_label(v)}"' for k, v in (
            ("package", model.package_id), ("name", model.name), ("version", model.version),
            ("variant", model.variant), ("provider", model.provider), ("runtime", model.runtime)))
        family("edge_model_info", "gauge", "The active model.", [(f"{{{labels}}}", 1)])
    family("edge_agent_uptime_seconds", "gauge", "Seconds since the API started.", [("", round(uptime_s, 3))])
    if rss_bytes is not None:
        family("process_resident_memory_bytes", "gauge", "Resident memory of the agent process.",
               [("", rss_bytes)])
    return "\n".join(lines) + "\n"


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _decode_npz(body: bytes, max_decoded: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            decoded = sum(info.file_size for info in archive.infolist())
        if decoded > max_decoded:  # a small compressed npz can inflate to gigabytes
            raise _HttpError(413, f"npz body decodes to {decoded} bytes; the limit is {max_decoded}")
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise _HttpError(400, f"body is not a valid npz file: {' '.join(str(exc).split())}") from None


def _encode_npz(outputs: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(value) for name, value in outputs.items()})
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse a connection
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.app.limits.socket_timeout_s
        super().setup()
        # Headers and body go out in two writes; with Nagle on, a keep-alive client's delayed ACK
        # held the body back 40 ms per request (measured on loopback: p50 44 ms -> 0.7 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] = {}) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: Mapping[str, str] = {}) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line, 501 method) as one-line JSON too."""
        self.close_connection = True
        self._error(code, message or HTTPStatus(code).phrase)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        app = self.server.app
        path = self.path.split("?", 1)[0]
        try:
            if path == "/v1/status":
                self._json(200, app.status())
            elif path == "/metrics":
                self._send(200, app.metrics().encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._error(404, f"no such endpoint: GET {path}")
        except Exception as exc:  # a status callback bug must not kill the connection silently
            log.exception("GET %s failed", path)
            self._error(500, f"internal error: {' '.join(str(exc).split())}")

    def do_POST(self) -> None:  # noqa: N802
        app = self.server.app
        path = self.path.split("?", 1)[0]
        if path != "/v1/infer":
            self._discard_body()
            self._error(404, f"no such endpoint: POST {path}")
            return
        try:
            status, body, ctype, headers = app.infer_request(self.headers, self._read_body())
            app.count(status == 200)
            self._send(status, body, ctype, headers)
        except _HttpError as err:
            app.count(False)
            self._error(err.status, str(err))
        except Exception as exc:  # a bug here must still answer one line, not drop the connection
            log.exception("POST %s failed", path)
            app.count(False)
            self._error(500, f"internal error: {' '.join(str(exc).split())}")

    def _read_body(self) -> bytes:
        limit = self.server.app.limits.max_body_bytes
        length_text = self.headers.get("Content-Length", "")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or not length_text:
            raise self._refuse(411, "Content-Length is required (chunked bodies are not supported)")
        if not length_text.strip().isdigit():
            raise self._refuse(400, f"bad Content-Length {length_text!r}")
        length = int(length_text)
        if length > limit:
            self._discard_body()
            raise _HttpError(413, f"request body is {length} bytes; the limit is {limit}")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise self._refuse(408, f"request body not received within {self.timeout} s") from None
        if len(body) != length:
            raise self._refuse(400, f"request body ended after {len(body)} of {length} bytes")
        return body

    def _refuse(self, status: int, message: str) -> _HttpError:
        self.close_connection = True  # the body was not read to its end: the stream is unusable
        return _HttpError(status, message)

    def _discard_body(self) -> None:
        """Read and drop a body we will not use (bounded), or mark the connection to close."""
        length_text = self.headers.get("Content-Length", "")
        length = int(length_text) if length_text.strip().isdigit() else -1
        if length < 0 or length > self.server.app.limits.max_discard_bytes:
            self.close_connection = True
            return
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass  # a timeout here only means the connection is closed instead
        if length:
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: ApiServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class ApiServer:
    """The local API in a background thread. ``port=0`` binds a free port (see `port` after start)."""

    def __init__(self, host: str, port: int, model_host: ModelHost,
                 status_fn: Callable[[], Mapping[str, Any]] | None = None, *,
                 limits: ApiLimits | None = None, allow_remote: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not allow_remote and not is_loopback(host):
            raise ConfigError(f"api address {host!r} is not loopback; the API has no authentication "
                              "(set allow_remote to expose it anyway)")
        self.host, self._port = host, port
        self.model_host = model_host
        self.limits = limits or ApiLimits()
        self._status_fn = status_fn
        self._clock = clock
        self._started = clock()
        self._counts = {"ok": 0, "error": 0}
        self._counts_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def start(self) -> int:
        """Bind and serve in a daemon thread; returns the bound port. ConfigError if it cannot bind."""
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self._port), _Handler)
        except OSError as exc:
            raise ConfigError(f"api address {self.host}:{self._port}: cannot bind: {exc.strerror or exc}") from None
        server.app = self
        self._server, self._port = server, int(server.server_address[1])
        self._started = self._clock()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"edge-api-{self._port}", daemon=True)
        self._thread.start()
        return self._port

    def stop(self, timeout_s: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request logic (called from handler threads) -----------------------------------------------

    def count(self, ok: bool) -> None:
        with self._counts_lock:
            self._counts["ok" if ok else "error"] += 1

    def requests(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._status_fn is not None:
            try:
                out.update(self._status_fn())
            except Exception as exc:  # the daemon's part failing must not hide the model's status
                log.exception("status callback failed")
                out["status_error"] = " ".join(str(exc).split()) or type(exc).__name__
        model = self.model_host.active
        out.update({  # the daemon's callback cannot shadow these
            "model": None if model is None else model.describe(),
            "uptime_s": round(self._clock() - self._started, 3),
            "requests": self.requests(),
            "api": {"url": self.url, "max_body_bytes": self.limits.max_body_bytes},
        })
        return out

    def metrics(self) -> str:
        return render_metrics(self.model_host, self.requests(), self._clock() - self._started, _rss_bytes())

    def infer_request(self, headers: Any, body: bytes) -> tuple[int, bytes, str, dict[str, str]]:
        ctype = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype == "application/json":
            try:
                doc = json.loads(body)
            except ValueError as exc:
                raise _HttpError(400, f"body is not valid JSON: {exc}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
                raise _HttpError(400, 'JSON body must be {"inputs": {name: array}}')
            feeds = doc["inputs"]
        elif ctype in NPZ_TYPES:
            feeds = _decode_npz(body, self.limits.max_body_bytes)
        else:
            raise _HttpError(415, f"unsupported Content-Type {ctype!r}; use application/x-npz or application/json")
        if not self._slots.acquire(blocking=False):
            raise _HttpError(503, f"busy: {self.limits.max_concurrent} inferences already running")
        try:
            result = self.model_host.infer_timed(feeds)
        except NoModelError as exc:
            raise _HttpError(503, str(exc)) from None
        except InvalidInputError as exc:
            raise _HttpError(400, str(exc)) from None
        except EdgeError as exc:  # InferenceFailedError: the runtime raised
            raise _HttpError(500, str(exc)) from None
        finally:
            self._slots.release()
        latency = {"X-Edge-Latency-Ms": f"{result.latency_ms:.3f}"}
        if ctype == "application/json":
            doc = {"outputs": {k: np.asarray(v).tolist() for k, v in result.outputs.items()},
                   "latency_ms": round(result.latency_ms, 3)}
            return 200, json.dumps(doc).encode("utf-8"), "application/json", latency
        return 200, _encode_npz(result.outputs), "application/x-npz", latency
