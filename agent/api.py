"""Local inference API for apps on the device (stdlib sockets, loopback only unless allowed).

    POST /v1/infer   npz in -> npz out (application/x-npz or octet-stream), or
                     {"inputs": {name: nested lists}} -> {"outputs": {...}, "latency_ms": ...}
    GET  /v1/status  the active model, uptime, API counters, plus the daemon's status callback
    GET  /metrics    Prometheus text format 0.0.4

Errors are ``{"error": "<one line>"}`` with 400 bad input (or a malformed request, Content-Length
included), 403 a Host header that does not name this API, 404 unknown path, 408 headers or body too
slow, 411 no length, 413 body (or decoded npz) too large, 415 unknown content type, 431 headers too
large, 500 runtime failure, 501 unknown method, 503 no model active or no room within
``queue_timeout_s``, 505 not HTTP/1.x. The API has no authentication, so a bind outside loopback
must be asked for explicitly (``allow_remote``).

What one caller can cost is bounded by `ApiLimits`; how:

- One poller thread holds every connection that has no complete request yet (idle keep-alive
  ones, and ones still sending headers), so connections cost no thread; ``workers`` handler threads
  take a connection only once its headers are in, serve that one request and hand it back.
- Headers must arrive within ``header_timeout_s`` of their first byte (slowloris), a body within
  ``body_timeout_s``; a connection with no request is closed after ``idle_timeout_s``, and the
  oldest one is closed to admit a new one past ``max_connections``.
- Content-Length is checked before a byte of the body is read: over ``max_body_bytes`` is a 413
  straight away. Bodies being held take room in a ``max_buffered_bytes`` budget before they are
  read; decoding, the run and encoding happen inside one of ``max_concurrency`` slots, as decoding
  a JSON body costs several times its size (a 61 MB body took 380 MB).
- The Host header must name this API (``allowed_hosts``, with the bound port): a web page the
  user visits cannot reach it through a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import math
import queue
import re
import selectors
import socket
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np

from agent.model_host import InvalidInputError, ModelHost, NoModelError
from edgesdk.errors import ConfigError, EdgeError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8700
NPZ_TYPES = ("application/x-npz", "application/octet-stream", "")
# Host names the API answers to when the caller does not say (plus the address it is bound to).
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")
# Prometheus `le` bounds in ms: spans a 0.1 ms NPU kernel to a 10 s CPU transformer.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)
_MIB = 1024 * 1024


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
                   rss_bytes: int | None, connections: Mapping[str, int] | None = None) -> str:
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
    if connections is not None:
        family("edge_api_connections", "gauge", "Open connections to the local API, by state.",
               [(f'{{state="{s}"}}', connections.get(s, 0)) for s in ("idle", "busy")])
        family("edge_api_refused_total", "counter",
               "Connections the API closed on a limit (timeouts, too many connections).",
               [("", connections.get("refused", 0))])
    family("edge_agent_uptime_seconds", "gauge", "Seconds since the API started.", [("", round(uptime_s, 3))])
    if rss_bytes is not None:
        family("process_resident_memory_bytes", "gauge", "Resident memory of the agent process.",
               [("", rss_bytes)])
    return "\n".join(lines) + "\n"


# -- request parsing ------------------------------------------------------------------------------

class _HttpError(Exception):
    """An answer to send instead of going on; ``close`` when the stream cannot be trusted after it."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


class _Disconnected(Exception):
    """The client went away (or stopped reading); nothing more can be sent."""


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LENGTH = re.compile(r"[0-9]{1,18}")  # digits only: no sign, no spaces inside, no 1e3


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, list[str]]  # lower-case name -> values in order

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.headers.get(name, []) for t in v.split(",") if t.strip()}

    @property
    def keep_alive(self) -> bool:
        # HTTP/1.0 keep-alive needs an extra response header; its clients are rare here, so close.
        return self.version == "HTTP/1.1" and "close" not in self.tokens("connection")


def _parse_head(head: bytes) -> _Request:
    """Request line and headers (without the blank line); _HttpError 400/505 if malformed."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise _HttpError(400, f"malformed request line {lines[0][:100]!r}", close=True)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _HttpError(505, f"HTTP version {version[:20]!r} is not supported (HTTP/1.1 is)", close=True)
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # No obs-fold continuation lines and no space before the colon: both are smuggling tools.
        if not colon or not _TOKEN.fullmatch(name):
            raise _HttpError(400, f"malformed header line {line[:100]!r}", close=True)
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    return _Request(method, target, version, headers)


def _body_length(request: _Request) -> int | None:
    """The declared body length (0 when none is declared); None for Transfer-Encoding (unsupported)."""
    if "transfer-encoding" in request.headers:
        return None
    values = {v.strip() for v in request.headers.get("content-length", []) for v in v.split(",")}
    if not values:
        return 0
    if len(values) > 1:
        raise _HttpError(400, f"conflicting Content-Length values {sorted(values)[:3]}", close=True)
    text = values.pop()
    if not _LENGTH.fullmatch(text):
        raise _HttpError(400, f"bad Content-Length {text[:40]!r}: expected a non-negative integer", close=True)
    return int(text)


def _head_end(buf: bytearray, start: int) -> tuple[int, int] | None:
    """(end of headers, start of body) if ``buf`` holds a whole head; scanning from ``start``."""
    start = max(0, start - 3)
    crlf, lf = buf.find(b"\r\n\r\n", start), buf.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    return None


# -- bodies ---------------------------------------------------------------------------------------

def _decode_npz(body: bytes | bytearray, max_decoded: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            infos = archive.infolist()
            decoded = sum(info.file_size for info in infos)
            if decoded > max_decoded:  # a small compressed npz can inflate to gigabytes
                raise _HttpError(413, f"npz body decodes to {decoded} bytes; the limit is {max_decoded}")
            for info in infos:  # an array header may claim far more than its member holds
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                    claimed = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject or claimed > info.file_size:
                        raise _HttpError(400, f"npz member {info.filename[:60]!r} claims {claimed} bytes "
                                              f"of {dtype} in {info.file_size}")
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, TypeError,
            NotImplementedError, RuntimeError) as exc:  # RuntimeError: zipfile's "encrypted, password required"
        raise _HttpError(400, f"body is not a valid npz file: {' '.join(str(exc).split())[:200]}") from None


def _decode_json(body: bytes | bytearray) -> Any:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the C stack allows
        raise _HttpError(400, f"body is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
        raise _HttpError(400, 'JSON body must be {"inputs": {name: array}}')
    return doc["inputs"]


def _encode_npz(outputs: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(value) for name, value in outputs.items()})
    return buf.getvalue()


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
                raise _HttpError(503, f"busy: {self._used} bytes of request bodies already held "
                                      f"(limit {self.capacity}); retry later")
            self._used += n
        try:
            yield
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()


# -- connections ----------------------------------------------------------------------------------

class _Conn:
    """One client connection: its socket, bytes received and not yet used, and its current deadline."""

    __slots__ = ("sock", "peer", "buf", "deadline")

    def __init__(self, sock: socket.socket, peer: Any, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.deadline = deadline


def _quick_reply(sock: socket.socket, status: int, message: str) -> None:
    """Best-effort one-line answer on a non-blocking socket that is about to be closed."""
    body = json.dumps({"error": message}).encode("utf-8")
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
    try:
        sock.send(head + body)
    except OSError:
        pass


_LISTEN, _WAKE = "listen", "wake"


class _Exchange:
    """One request on one connection, run by a worker thread; `run` says whether to keep the connection."""

    def __init__(self, api: ApiServer, conn: _Conn, request: _Request) -> None:
        self.api, self.conn, self.request = api, conn, request
        self.limits = api.limits
        self.close = not request.keep_alive
        self.body_left: int | None = 0  # body bytes not read yet; None: unknown (Transfer-Encoding)
        self.expects_continue = "100-continue" in request.tokens("expect")

    def run(self) -> bool:
        try:
            try:
                self.body_left = _body_length(self.request)
                self._route()
            except _HttpError as err:
                self.close = self.close or err.close
                self._send(err.status, json.dumps({"error": str(err)}).encode("utf-8"), "application/json")
            self._drop_body()
        except _Disconnected:
            return False
        return not self.close

    # routing
    def _route(self) -> None:
        request, api = self.request, self.api
        hosts = request.headers.get("host", [])
        if len(hosts) != 1:
            raise _HttpError(400, "exactly one Host header is required")
        if not api.host_allowed(hosts[0]):
            raise _HttpError(403, f"Host {hosts[0][:100]!r} is not this API; it answers to "
                                  f"{', '.join(sorted(api.allowed_hosts))} on port {api.port}")
        path = request.path
        if request.method == "GET" and path in ("/v1/status", "/metrics"):
            try:
                if path == "/v1/status":
                    self._send_json(200, api.status())
                else:
                    self._send(200, api.metrics().encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
            except _Disconnected:
                raise
            except Exception as exc:  # a status callback bug must not kill the connection silently
                log.exception("GET %s failed", path)
                raise _HttpError(500, f"internal error: {' '.join(str(exc).split())[:200]}") from None
        elif request.method == "POST" and path == "/v1/infer":
            self._infer()
        elif request.method in ("GET", "POST"):
            raise _HttpError(404, f"no such endpoint: {request.method} {path[:200]}")
        else:
            raise _HttpError(501, f"method {request.method[:20]} is not supported", close=True)

    def _infer(self) -> None:
        api, limits = self.api, self.limits
        try:
            length = self.body_left
            if length is None:
                raise _HttpError(411, "Content-Length is required (chunked bodies are not supported)", close=True)
            if "content-length" not in self.request.headers:
                raise _HttpError(411, "Content-Length is required", close=True)
            if length > limits.max_body_bytes:  # answered before a byte of the body is read
                raise _HttpError(413, f"request body is {length} bytes; the limit is {limits.max_body_bytes}")
            ctype = (self.request.header("content-type") or "").split(";", 1)[0].strip().lower()
            if ctype != "application/json" and ctype not in NPZ_TYPES:
                raise _HttpError(415, f"unsupported Content-Type {ctype[:60]!r}; "
                                      "use application/x-npz or application/json")
            with api.body_budget.take(length, limits.queue_timeout_s):
                body = self._read_body(length)
                with api.slot(limits.queue_timeout_s):
                    status, payload, out_type, headers = api.infer_request(ctype, body)
                    del body
        except Exception:
            api.count(False)
            raise
        api.count(status == 200)  # before the answer goes out: a caller then sees its own count
        self._send(status, payload, out_type, headers)

    # the body
    def _continue(self) -> None:
        if self.expects_continue:
            self.expects_continue = False
            self._sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _recv_into(self, view: memoryview, deadline: float) -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.conn.sock.settimeout(left)
        try:
            n = self.conn.sock.recv_into(view)
        except TimeoutError:
            raise
        except OSError:
            raise _Disconnected from None
        if n == 0:
            raise _HttpError(400, "request body ended early: the client closed the connection", close=True)
        return n

    def _read_body(self, length: int) -> bytearray:
        self._continue()
        body = bytearray(length)
        view = memoryview(body)
        buffered = min(length, len(self.conn.buf))
        view[:buffered] = self.conn.buf[:buffered]
        del self.conn.buf[:buffered]
        have, deadline = buffered, time.monotonic() + self.limits.body_timeout_s
        try:
            while have < length:
                have += self._recv_into(view[have:], deadline)
        except TimeoutError:
            self.body_left = None  # the stream is mid-body: close after answering
            raise _HttpError(408, f"request body not received within {self.limits.body_timeout_s} s "
                                  f"({have} of {length} bytes)", close=True) from None
        finally:
            view.release()
        self.body_left = 0
        return body

    def _drop_body(self) -> None:
        """After the answer: read and drop what is left of the request body (`_send` closed the
        connection instead where that is not possible)."""
        left = self.body_left
        if self.close or not left:
            return
        take = min(left, len(self.conn.buf))
        del self.conn.buf[:take]
        left -= take
        scratch = memoryview(bytearray(min(left, 1 << 16) or 1))
        deadline = time.monotonic() + self.limits.body_timeout_s
        try:
            while left > 0:
                left -= self._recv_into(scratch[:min(left, len(scratch))], deadline)
        except (TimeoutError, _HttpError):
            self.close = True
        self.body_left = 0

    # answers
    def _sendall(self, data: bytes | memoryview) -> None:
        self.conn.sock.settimeout(self.limits.body_timeout_s)
        try:
            self.conn.sock.sendall(data)
        except OSError:  # timeout (a client that does not read) included
            self.close = True
            raise _Disconnected from None

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] = {}) -> None:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}"]
        lines.extend(f"{key}: {value}" for key, value in headers.items())
        left = self.body_left  # the body not read: can it be dropped after this answer?
        if left is None or left > self.limits.max_discard_bytes or (left and self.expects_continue):
            # Unknown framing (Transfer-Encoding), too much to drop, or a client waiting for a
            # 100 Continue before it sends: the connection cannot carry another request.
            self.close = True
        if self.close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # One write for small answers; with TCP_NODELAY two writes cost a second packet, not 40 ms.
        if len(body) <= 64 * 1024:
            self._sendall(head + body)
        else:
            self._sendall(head)
            self._sendall(body)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")


class ApiServer:
    """The local API, served by one poller thread and ``limits.workers`` handler threads.
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
        self.host, self._port = host, port
        self.model_host = model_host
        self.limits = limits or ApiLimits()
        names = (*LOOPBACK_HOST_NAMES, host) if allowed_hosts is None else tuple(allowed_hosts)
        self.allowed_hosts = frozenset(n.strip().lower().removeprefix("[").removesuffix("]") for n in names)
        if not self.allowed_hosts or "" in self.allowed_hosts:
            raise ConfigError(f"allowed_hosts must name at least one host, got {names!r}")
        self._status_fn = status_fn
        self._clock = clock
        self._started = clock()
        self._counts = {"ok": 0, "error": 0}
        self._lock = threading.Lock()  # counters, and handing connections back to the poller
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrency)
        self.body_budget = _ByteBudget(self.limits.max_buffered_bytes)
        self._listen: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._work: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()
        self._returned: deque[_Conn] = deque()
        self._waiting: dict[_Conn, None] = {}  # poller-owned: connections without a whole request, oldest first
        self._open = 0  # connections accepted and not closed
        self._busy = 0  # connections a worker holds
        self._refused = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> int:
        """Bind and serve in daemon threads; returns the bound port. ConfigError if it cannot bind."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listen = socket.socket(family, socket.SOCK_STREAM)
        try:
            # A restart must not wait out TIME_WAIT of the connections the last run closed.
            listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listen.bind((self.host, self._port))
            listen.listen(128)
            listen.setblocking(False)
        except OSError as exc:
            listen.close()
            raise ConfigError(f"api address {self.host}:{self._port}: cannot bind: {exc.strerror or exc}") from None
        self._listen, self._port = listen, int(listen.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listen, selectors.EVENT_READ, _LISTEN)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._stopping = False
        self._started = self._clock()
        self._threads = [threading.Thread(target=self._poll, name=f"edge-api-{self._port}-poll", daemon=True)]
        self._threads += [threading.Thread(target=self._serve, name=f"edge-api-{self._port}-w{i}", daemon=True)
                          for i in range(self.limits.workers)]
        for thread in self._threads:
            thread.start()
        return self._port

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._listen is None or self._stopping:
            return
        self._stopping = True
        self._wake()
        for _ in range(self.limits.workers):
            self._work.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._listen = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the poller: accepts, and holds every connection that has no whole request yet -------------

    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"\0")
        except OSError:  # BlockingIOError: a wake-up is pending already
            pass

    def _poll(self) -> None:
        selector = self._selector
        assert selector is not None and self._listen is not None  # set by start()
        try:
            while not self._stopping:
                now = time.monotonic()
                self._expire(now)
                soonest = min((c.deadline for c in self._waiting), default=now + 1.0)
                for key, _ in selector.select(min(1.0, max(0.0, soonest - now))):
                    try:
                        if key.data is _LISTEN:
                            self._accept()
                        elif key.data is _WAKE:
                            self._take_back()
                        else:
                            self._readable(key.data)
                    except Exception:  # noqa: BLE001 - one connection's trouble must not stop the poller
                        log.exception("api poller: event on %s failed", key.data)
                        if isinstance(key.data, _Conn):
                            self._drop(key.data)
        except Exception:  # noqa: BLE001 - the selector itself failed: log it, the API is down
            log.exception("api poller stopped")
        finally:
            with self._lock:
                self._stopping = True  # workers close connections from now on instead of handing them back
            for conn in list(self._waiting):
                self._drop(conn)
            while self._returned:
                self._close(self._returned.popleft())
            for sock in (self._listen, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            selector.close()

    def _accept(self) -> None:
        assert self._listen is not None and self._selector is not None
        for _ in range(64):  # a burst at a time; the rest on the next loop
            try:
                sock, peer = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: shed the oldest waiting connection
                log.warning("api: accept failed: %s", exc)
                if not self._waiting:
                    return
                self._drop(next(iter(self._waiting)), refused=True)
                continue
            with self._lock:
                full = self._open >= self.limits.max_connections
            if full and self._waiting:
                self._drop(next(iter(self._waiting)), refused=True)  # the longest-waiting one
            elif full:  # every connection has a request being served: refuse this one
                sock.setblocking(False)
                _quick_reply(sock, 503, f"busy: {self.limits.max_connections} connections open")
                sock.close()
                with self._lock:
                    self._refused += 1
                continue
            sock.setblocking(False)
            try:
                # Headers and body go out in two writes for large answers; with Nagle on, a keep-alive
                # client's delayed ACK held the body back 40 ms per request (loopback p50 44 -> 0.7 ms).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            with self._lock:
                self._open += 1
            self._hold(_Conn(sock, peer, time.monotonic() + self.limits.idle_timeout_s))

    def _hold(self, conn: _Conn) -> None:
        """Wait for (the rest of) a request on ``conn``, or dispatch it if its head is in already."""
        if conn.buf and not self._complete(conn):
            return
        assert self._selector is not None
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        self._waiting[conn] = None

    def _complete(self, conn: _Conn) -> bool:
        """For a connection with bytes: True if they are still short of a head (keep waiting);
        else dispatch it to a worker (whole head) or refuse it (head too large) and return False."""
        del conn.buf[:len(conn.buf) - len(conn.buf.lstrip(b"\r\n"))]  # stray CRLF between requests
        if not conn.buf:
            return True
        if _head_end(conn.buf, 0) is not None:
            self._work.put(conn)
            return False
        if len(conn.buf) > self.limits.max_header_bytes:
            _quick_reply(conn.sock, 431, f"request headers exceed {self.limits.max_header_bytes} bytes")
            self._close(conn, refused=True)
            return False
        return True

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        start = len(conn.buf)
        conn.buf += data
        if conn.buf[:1] in (b"\r", b"\n"):  # stray CRLF between requests
            del conn.buf[:len(conn.buf) - len(conn.buf.lstrip(b"\r\n"))]
            start = 0
        if not conn.buf:
            return
        if start == 0:
            conn.deadline = time.monotonic() + self.limits.header_timeout_s  # a request has begun
        if len(conn.buf) <= self.limits.max_header_bytes and _head_end(conn.buf, start) is None:
            return  # a partial head: scanned from where the last bytes ended, so no quadratic rescans
        assert self._selector is not None
        self._selector.unregister(conn.sock)
        del self._waiting[conn]
        if self._complete(conn):  # cannot be short here, but if so: keep waiting
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            self._waiting[conn] = None

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._waiting if c.deadline <= now]:
            if conn.buf:  # headers begun and not finished in time: slowloris or a stuck client
                _quick_reply(conn.sock, 408, f"request headers not received within {self.limits.header_timeout_s} s")
            self._drop(conn, refused=bool(conn.buf))

    def _take_back(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._returned:
            conn = self._returned.popleft()
            try:
                self._hold(conn)
            except (OSError, ValueError):  # closed underneath us
                self._close(conn)

    def _drop(self, conn: _Conn, refused: bool = False) -> None:
        """Close a connection the poller holds."""
        if conn in self._waiting:
            del self._waiting[conn]
            try:
                assert self._selector is not None
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._close(conn, refused)

    def _close(self, conn: _Conn, refused: bool = False) -> None:
        try:
            conn.sock.close()
        except OSError:
            pass
        with self._lock:
            self._open -= 1
            self._refused += refused

    # -- workers: one whole request at a time ------------------------------------------------------

    def _serve(self) -> None:
        while True:
            conn = self._work.get()
            if conn is None:
                return
            if self._stopping:
                self._close(conn)
                continue
            with self._lock:
                self._busy += 1
            keep = False
            try:
                keep = self._serve_one(conn)
            except Exception:  # noqa: BLE001 - no request may kill a worker
                log.exception("api: request from %s failed", conn.peer)
            finally:
                with self._lock:
                    self._busy -= 1
            if keep:
                self._hand_back(conn)
            else:
                self._close(conn)

    def _serve_one(self, conn: _Conn) -> bool:
        end = _head_end(conn.buf, 0)
        if end is None:  # cannot happen: the poller dispatches whole heads only
            return False
        head = bytes(conn.buf[:end[0]])
        del conn.buf[:end[1]]
        try:
            request = _parse_head(head)
        except _HttpError as err:
            conn.sock.settimeout(self.limits.body_timeout_s)
            try:
                payload = json.dumps({"error": str(err)}).encode("utf-8")
                conn.sock.sendall((f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
                                   f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                                   "Connection: close\r\n\r\n").encode("latin-1") + payload)
            except OSError:
                pass
            return False
        log.debug("%s %s %s", conn.peer, request.method, request.path[:200])
        return _Exchange(self, conn, request).run()

    def _hand_back(self, conn: _Conn) -> None:
        conn.deadline = time.monotonic() + (self.limits.header_timeout_s if conn.buf.strip(b"\r\n")
                                            else self.limits.idle_timeout_s)
        try:
            conn.sock.setblocking(False)
        except OSError:
            self._close(conn)
            return
        with self._lock:
            if not self._stopping:
                self._returned.append(conn)
                conn = None  # type: ignore[assignment]
        if conn is None:
            self._wake()
        else:
            self._close(conn)

    # -- request logic (called from worker threads) ------------------------------------------------

    def host_allowed(self, value: str) -> bool:
        """Whether a Host header names this API: an allowed name and the bound port."""
        value = value.strip().lower()
        if value.startswith("["):
            end = value.find("]")
            name, rest = (value[1:end], value[end + 1:]) if end > 0 else ("", "")
        else:
            name, colon, port = value.partition(":")
            rest = colon + port
        if rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit()):
            return False
        port = int(rest[1:]) if rest else 80
        return name in self.allowed_hosts and port == self._port

    @contextmanager
    def slot(self, timeout_s: float) -> Iterator[None]:
        """One of ``max_concurrency`` places to decode, run and encode; 503 if none frees in time."""
        if not self._slots.acquire(timeout=timeout_s):
            raise _HttpError(503, f"busy: {self.limits.max_concurrency} inferences already running; retry later")
        try:
            yield
        finally:
            self._slots.release()

    def count(self, ok: bool) -> None:
        with self._lock:
            self._counts["ok" if ok else "error"] += 1

    def requests(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def connections(self) -> dict[str, int]:
        """Open connections by state (``idle``: no request being served), and those refused on a limit."""
        with self._lock:
            return {"idle": self._open - self._busy, "busy": self._busy, "refused": self._refused}

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
            "api": {"url": self.url, "max_body_bytes": self.limits.max_body_bytes,
                    "max_concurrency": self.limits.max_concurrency, "connections": self.connections()},
        })
        return out

    def metrics(self) -> str:
        return render_metrics(self.model_host, self.requests(), self._clock() - self._started, _rss_bytes(),
                              self.connections())

    def infer_request(self, ctype: str, body: bytes | bytearray) -> tuple[int, bytes, str, dict[str, str]]:
        """Decode, run and encode one inference (inside a `slot`): (status, body, content type, headers)."""
        feeds = _decode_json(body) if ctype == "application/json" else _decode_npz(body, self.limits.max_body_bytes)
        try:
            result = self.model_host.infer_timed(feeds)
        except NoModelError as exc:
            raise _HttpError(503, str(exc)) from None
        except InvalidInputError as exc:
            raise _HttpError(400, str(exc)) from None
        except EdgeError as exc:  # InferenceFailedError: the runtime raised
            raise _HttpError(500, str(exc)) from None
        del feeds
        latency = {"X-Edge-Latency-Ms": f"{result.latency_ms:.3f}"}
        if ctype == "application/json":
            doc = {"outputs": {k: np.asarray(v).tolist() for k, v in result.outputs.items()},
                   "latency_ms": round(result.latency_ms, 3)}
            return 200, json.dumps(doc).encode("utf-8"), "application/json", latency
        return 200, _encode_npz(result.outputs), "application/x-npz", latency
