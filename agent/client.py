"""A small client for apps that call the agent's local inference API (stdlib urllib + numpy).

    EdgeError
    └── ApiError              the API answered with an error (``status``, server's one-line message)
        └── ApiUnreachableError   no answer: connection refused, timeout, bad URL (``status`` None)
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgesdk.errors import EdgeError

DEFAULT_URL = "http://127.0.0.1:8700"


class ApiError(EdgeError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiUnreachableError(ApiError):
    pass


class EdgeClient:
    """``EdgeClient().infer({"x": arr})`` -> outputs by name. Every call is bounded by ``timeout_s``."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # The API is on loopback: never route it through an http_proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str | None = None) -> tuple[bytes, str]:
        headers = {"Content-Type": content_type} if content_type else {}
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace").strip() or err.reason
            raise ApiError(f"{method} {path}: {err.code} {message}", err.code) from None
        except urllib.error.URLError as err:
            raise ApiUnreachableError(f"{method} {self.url}{path}: {err.reason}") from None
        except (TimeoutError, ConnectionError) as err:
            raise ApiUnreachableError(f"{method} {self.url}{path}: {err or type(err).__name__}") from None
        except ValueError as err:  # e.g. a URL without a scheme
            raise ApiUnreachableError(f"{method} {self.url}{path}: {err}") from None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the active model on ``feeds`` (sent as npz, dtypes kept); outputs by name."""
        buf = io.BytesIO()
        np.savez(buf, **{name: np.asarray(value) for name, value in feeds.items()})
        raw, _ = self._call("POST", "/v1/infer", buf.getvalue(), "application/x-npz")
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (ValueError, OSError, EOFError) as err:
            raise ApiError(f"POST /v1/infer: response is not an npz file: {err}") from None

    def infer_json(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Same, as JSON: ``inputs`` values are nested lists (or arrays); returns
        ``{"outputs": {name: nested lists}, "latency_ms": float}``."""
        doc = {"inputs": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}}
        raw, _ = self._call("POST", "/v1/infer", json.dumps(doc).encode("utf-8"), "application/json")
        return self._json(raw, "/v1/infer")

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
