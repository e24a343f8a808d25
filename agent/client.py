"""A small client for apps that call the agent's local inference API (stdlib http.client + numpy).

    EdgeError
    └── ApiError              the API answered with an error (``status``, server's one-line message)
        └── ApiUnreachableError   no answer: connection refused, timeout, bad URL (``status`` None)
"""

from __future__ import annotations

import http.client
import io
import json
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgesdk.errors import EdgeError
from edgesdk.npz import read_npz

DEFAULT_URL = "http://127.0.0.1:8700"


class ApiError(EdgeError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiUnreachableError(ApiError):
    pass


def _infer_path(model: str | None) -> str:
    """``/v1/infer`` (the only active model) or ``/v1/models/{model}/infer``."""
    return "/v1/infer" if model is None else f"/v1/models/{urllib.parse.quote(model, safe='')}/infer"


class EdgeClient:
    """``EdgeClient().infer({"x": arr})`` -> outputs by name; ``infer(feeds, model="detector")`` runs
    a named model where several are active. Every call is bounded by ``timeout_s``.

    Each thread keeps one HTTP/1.1 connection open (a new TCP connection per call cost 1–2.5 ms
    on the benchmark host); a kept connection the server has closed is reopened once. The server
    closes connections idle past its ``idle_timeout_s`` (60 s) or to admit new ones past its
    ``max_connections``, so a reopen is routine, not an error.
    """

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("expected http://host:port (the API is plain HTTP on loopback)")
        # http.client ignores http_proxy: the API is on loopback and never goes through a proxy.
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout_s)
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
        headers = {"Content-Type": content_type} if content_type else {}
        for _ in range(2):
            try:
                conn, reused = self._connection()
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as err:
                self.close()
                if reused:
                    continue  # the server closed a kept connection: one fresh try
                raise ApiUnreachableError(f"{method} {self.url}{path}: {err or type(err).__name__}") from None
            except (OSError, http.client.HTTPException) as err:  # refused, timeout, bad answer
                self.close()
                raise ApiUnreachableError(f"{method} {self.url}{path}: {err or type(err).__name__}") from None
            except ValueError as err:  # e.g. a URL without a scheme
                raise ApiUnreachableError(f"{method} {self.url}{path}: {err}") from None
            if response.will_close:
                self.close()
            if response.status >= 400:
                try:
                    message = json.loads(raw)["error"]
                except (ValueError, KeyError, TypeError):
                    message = raw.decode("utf-8", "replace").strip() or response.reason
                raise ApiError(f"{method} {path}: {response.status} {message}", response.status)
            return raw, response.getheader("Content-Type", "")
        raise ApiUnreachableError(f"{method} {self.url}{path}: the server closed the connection twice")

    def infer(self, feeds: Mapping[str, np.ndarray], model: str | None = None) -> dict[str, np.ndarray]:
        """Run model ``model`` (None: the only active one) on ``feeds`` (sent as npz, dtypes kept);
        outputs by name. ApiError 404 if no active model has that name, 409 if ``model`` is None
        and several are active."""
        buf = io.BytesIO()
        np.savez(buf, **{name: np.asarray(value) for name, value in feeds.items()})
        path = _infer_path(model)
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
