"""A small client for apps that call the agent's local inference API (stdlib sockets + numpy).
It sends the binary tensor framing (`agent.tensor_frame`) and falls back to npz on an older agent.

    EdgeError
    ├── ApiError              the API answered with an error (``status``, server's one-line message)
    │   └── ApiUnreachableError   no answer: connection refused, timeout, bad URL (``status`` None)
    └── TensorFrameError      (agent.tensor_frame) a tensor the framing cannot carry

"""

from __future__ import annotations

import io
import json
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.tensor_frame import TENSORS_TYPE, TensorFrameError, decode_tensors, encode_tensors
from edgesdk.errors import ConfigError, EdgeError
from edgesdk.npz import read_npz

DEFAULT_URL = "http://127.0.0.1:8700"

# -- the binary tensor framing ---------------------------------------------------------------------
class ApiError(EdgeError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiUnreachableError(ApiError):
    pass


def _infer_path(model: str | None) -> str:
    """``/v1/infer`` (the only active model) or ``/v1/models/{model}/infer``."""
    return "/v1/infer" if model is None else f"/v1/models/{urllib.parse.quote(model, safe='')}/infer"


class _ClosedEarly(ConnectionError):
    """The connection ended before a byte of the answer: a kept connection the server closed."""


class _BadAnswer(Exception):
    """An answer that is not the HTTP/1.1 the API speaks."""


class _Connection:
    """One kept-alive HTTP/1.1 connection to the API: a request with a Content-Length body, an
    answer with a Content-Length body (the API sends nothing else).

    Not http.client: its response parsing (the email package) cost 0.1 ms a call (the API's fixed
    cost for an 8 KiB input went from 0.25 to 0.15 ms without it, 2 cores at load 6). What is
    parsed here is what the API's own server writes; anything else is a `_BadAnswer`.
    """

    MAX_HEAD = 64 * 1024

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms for the 2nd write
        except OSError:
            pass
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def request(self, method: str, path: str, body: bytes,
                content_type: str | None) -> tuple[int, dict[str, str], bytes]:
        """Send one request, return (status, headers by lower-case name, body)."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        data = head.encode("latin-1") + b"\r\n"
        try:
            if len(body) <= 64 * 1024:
                self.sock.sendall(data + body)
            else:  # no copy of a large body; TCP_NODELAY makes the second write cost a packet
                self.sock.sendall(data)
                self.sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError) as err:
            raise _ClosedEarly(str(err) or type(err).__name__) from None
        while True:
            status, headers = self._read_head()
            if status != 100:  # (an interim 100 Continue is skipped)
                break
        length = headers.get("content-length")
        if length is None or not length.isdigit():
            raise _BadAnswer(f"answer {status} without a usable Content-Length")
        return status, headers, self._read_exactly(int(length))

    def _recv(self) -> bytes:
        try:
            chunk = self.sock.recv(256 * 1024)
        except ConnectionResetError as err:
            if not self.buf:
                raise _ClosedEarly(str(err)) from None
            raise
        return chunk

    def _read_head(self) -> tuple[int, dict[str, str]]:
        first = True
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > self.MAX_HEAD:
                raise _BadAnswer(f"answer headers over {self.MAX_HEAD} bytes")
            chunk = self._recv()
            if not chunk:
                if first and not self.buf:
                    raise _ClosedEarly("the server closed the connection")
                raise _BadAnswer("the connection ended inside the answer's headers")
            self.buf += chunk
            first = False
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _BadAnswer(f"malformed status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def _read_exactly(self, length: int) -> bytes:
        while len(self.buf) < length:
            chunk = self._recv()
            if not chunk:
                raise _BadAnswer(f"the connection ended after {len(self.buf)} of {length} body bytes")
            self.buf += chunk
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return body


class EdgeClient:
    """``EdgeClient().infer({"x": arr})`` -> outputs by name; ``infer(feeds, model="detector")`` runs
    a named model where several are active. Every call is bounded by ``timeout_s``.

    Each thread keeps one HTTP/1.1 connection open (a new TCP connection per call cost 1–2.5 ms
    on the benchmark host); a kept connection the server has closed is reopened once. The server
    closes connections idle past its ``idle_timeout_s`` (60 s) or to admit new ones past its
    ``max_connections``, so a reopen is routine, not an error.
    """

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 10.0, *, wire: str = TENSORS_TYPE) -> None:
        """``wire``: how `infer` sends tensors, ``TENSORS_TYPE`` (default) or ``"application/x-npz"``."""
        if wire not in (TENSORS_TYPE, "application/x-npz"):
            raise ConfigError(f"wire must be {TENSORS_TYPE!r} or 'application/x-npz', got {wire!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.wire = wire
        self._local = threading.local()

    def _connection(self) -> tuple[_Connection, bool]:
        """This thread's connection, and whether it served a request before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("expected http://host:port (the API is plain HTTP on loopback)")
        # Never through a proxy (http_proxy is ignored): the API is on loopback.
        conn = _Connection(parts.hostname, parts.port or 80, self.timeout_s)
        self._local.conn = conn
        return conn, False

    def close(self) -> None:
        """Close this thread's connection (the next call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str | None = None) -> tuple[bytes, str]:
        for _ in range(2):
            try:
                conn, reused = self._connection()
                status, headers, raw = conn.request(method, path, body or b"", content_type)
            except _ClosedEarly as err:
                self.close()
                if reused:
                    continue  # the server closed a kept connection: one fresh try
                raise ApiUnreachableError(f"{method} {self.url}{path}: {err}") from None
            except (OSError, _BadAnswer) as err:  # refused, timeout, reset, a malformed answer
                self.close()
                raise ApiUnreachableError(f"{method} {self.url}{path}: {err or type(err).__name__}") from None
            except ValueError as err:  # e.g. a URL without a scheme
                raise ApiUnreachableError(f"{method} {self.url}{path}: {err}") from None
            if "close" in headers.get("connection", "").lower():
                self.close()
            if status >= 400:
                try:
                    message = json.loads(raw)["error"]
                except (ValueError, KeyError, TypeError):
                    message = raw.decode("utf-8", "replace").strip() or str(status)
                raise ApiError(f"{method} {path}: {status} {message}", status)
            return raw, headers.get("content-type", "")
        raise ApiUnreachableError(f"{method} {self.url}{path}: the server closed the connection twice")

    def infer(self, feeds: Mapping[str, np.ndarray], model: str | None = None) -> dict[str, np.ndarray]:
        """Run model ``model`` (None: the only active one) on ``feeds`` (dtypes kept); outputs by
        name. ApiError 404 if no active model has that name, 409 if ``model`` is None and several
        are active.

        Sent in the binary framing (``TENSORS_TYPE``); an agent older than it answers 415, and
        this client then uses npz from that call on."""
        path = _infer_path(model)
        if self.wire == TENSORS_TYPE:
            try:
                body = encode_tensors(feeds)
            except TensorFrameError as err:
                raise ApiError(f"POST {path}: {err}") from None
            try:
                raw, ctype = self._call("POST", path, body, TENSORS_TYPE)
            except ApiError as err:
                if err.status != 415:
                    raise
                self.wire = "application/x-npz"
            else:
                try:
                    return decode_tensors(raw)
                except TensorFrameError as err:
                    raise ApiError(f"POST {path}: response is not {TENSORS_TYPE} ({ctype}): {err}") from None
        buf = io.BytesIO()
        np.savez(buf, **{name: np.asarray(value) for name, value in feeds.items()})
        raw, _ = self._call("POST", path, buf.getvalue(), "application/x-npz")
        try:
            return read_npz(io.BytesIO(raw))
        except (ValueError, OSError, EOFError) as err:
            raise ApiError(f"POST {path}: response is not an npz file: {err}") from None

    def infer_json(self, inputs: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
        """Same, as JSON: ``inputs`` values are nested lists (or arrays); returns
        ``{"outputs": {name: nested lists}, "latency_ms": float, "model": "name@version"}``."""
        doc = {"inputs": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}}
        path = _infer_path(model)
        raw, _ = self._call("POST", path, json.dumps(doc).encode("utf-8"), "application/json")
        return self._json(raw, path)

    def models(self) -> list[dict[str, Any]]:
        """The active models, sorted by name: each one's name, version, release, package_id,
        variant, provider, runtime, inputs and outputs."""
        raw, _ = self._call("GET", "/v1/models")
        models = self._json(raw, "/v1/models").get("models")
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise ApiError('/v1/models: response has no "models" list')
        return models

    def model(self, name: str) -> dict[str, Any]:
        """One active model's description; ApiError 404 if no active model has that name."""
        path = f"/v1/models/{urllib.parse.quote(name, safe='')}"
        raw, _ = self._call("GET", path)
        return self._json(raw, path)

    def status(self) -> dict[str, Any]:
        raw, _ = self._call("GET", "/v1/status")
        return self._json(raw, "/v1/status")

    def metrics_text(self) -> str:
        raw, _ = self._call("GET", "/metrics")
        return raw.decode("utf-8")

    @staticmethod
    def _json(raw: bytes, path: str) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ApiError(f"{path}: response is not JSON") from None
        if not isinstance(doc, dict):
            raise ApiError(f"{path}: response is not a JSON object")
        return doc
