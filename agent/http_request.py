"""One HTTP/1.1 request on one connection, for `agent.http_server`: parsing and answering it.

The head is parsed strictly (no obs-fold lines, no space before a colon: both are smuggling tools);
Content-Length is parsed strictly (digits only, one value) before a byte of the body is read, and a
handler refuses a body by its declared length (`Exchange.content_length`). The Host header must
name the server (`HttpServer.host_allowed`). The connections themselves, and the limits on them,
are `agent.http_server`'s.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the server imports this module; these are for annotations only
    from agent.http_server import Connection, HttpServer


class HttpError(Exception):
    """An answer to send instead of going on; ``close`` when the stream cannot be trusted after it."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


class Disconnected(Exception):
    """The client went away (or stopped reading); nothing more can be sent."""


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LENGTH = re.compile(r"[0-9]{1,18}")  # digits only: no sign, no spaces inside, no 1e3


@dataclass(frozen=True)
class Request:
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


def parse_head(head: bytes) -> Request:
    """Request line and headers (without the blank line); HttpError 400/505 if malformed."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(400, f"malformed request line {lines[0][:100]!r}", close=True)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"HTTP version {version[:20]!r} is not supported (HTTP/1.1 is)", close=True)
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # No obs-fold continuation lines and no space before the colon: both are smuggling tools.
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, f"malformed header line {line[:100]!r}", close=True)
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    return Request(method, target, version, headers)


def _body_length(request: Request) -> int | None:
    """The declared body length (0 when none is declared); None for Transfer-Encoding (unsupported)."""
    if "transfer-encoding" in request.headers:
        return None
    values = {v.strip() for v in request.headers.get("content-length", []) for v in v.split(",")}
    if not values:
        return 0
    if len(values) > 1:
        raise HttpError(400, f"conflicting Content-Length values {sorted(values)[:3]}", close=True)
    text = values.pop()
    if not _LENGTH.fullmatch(text):
        raise HttpError(400, f"bad Content-Length {text[:40]!r}: expected a non-negative integer", close=True)
    return int(text)


def head_end(buf: bytearray, start: int) -> tuple[int, int] | None:
    """(end of headers, start of body) if ``buf`` holds a whole head; scanning from ``start``."""
    start = max(0, start - 3)
    crlf, lf = buf.find(b"\r\n\r\n", start), buf.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    return None


# -- one exchange ---------------------------------------------------------------------------------

class Exchange:
    """One request on one connection, run by a worker thread: the server's handler answers it with
    `send` (reading a body with `content_length` and `read_body`, or raising `HttpError`);
    `run` says whether to keep the connection."""

    def __init__(self, server: HttpServer, conn: Connection, request: Request) -> None:
        self.server, self.conn, self.request = server, conn, request
        self.limits = server.limits
        self.close = not request.keep_alive
        self.body_left: int | None = 0  # body bytes not read yet; None: unknown (Transfer-Encoding)
        self.expects_continue = "100-continue" in request.tokens("expect")

    def run(self) -> bool:
        try:
            try:
                self.body_left = _body_length(self.request)
                self._check_host()
                self.server.handler(self)
            except HttpError as err:
                self.close = self.close or err.close
                self.send(err.status, json.dumps({"error": str(err)}).encode("utf-8"), "application/json")
            self._drop_body()
        except Disconnected:
            return False
        return not self.close

    def _check_host(self) -> None:
        server = self.server
        hosts = self.request.headers.get("host", [])
        if len(hosts) != 1:
            raise HttpError(400, "exactly one Host header is required")
        if not server.host_allowed(hosts[0]):
            raise HttpError(403, f"Host {hosts[0][:100]!r} is not this API; it answers to "
                                 f"{', '.join(sorted(server.allowed_hosts))} on port {server.port}")

    # the body
    def content_length(self, max_bytes: int) -> int:
        """The declared body length, for a handler that reads the body: 411 without Content-Length
        (chunked included), 413 over ``max_bytes``, answered before a byte of the body is read."""
        length = self.body_left
        if length is None:
            raise HttpError(411, "Content-Length is required (chunked bodies are not supported)", close=True)
        if "content-length" not in self.request.headers:
            raise HttpError(411, "Content-Length is required", close=True)
        if length > max_bytes:
            raise HttpError(413, f"request body is {length} bytes; the limit is {max_bytes}")
        return length

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
            raise Disconnected from None
        if n == 0:
            raise HttpError(400, "request body ended early: the client closed the connection", close=True)
        return n

    def read_body(self, length: int) -> bytearray:
        """The whole body (``length`` from `content_length`) within ``body_timeout_s``; else 408."""
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
            raise HttpError(408, f"request body not received within {self.limits.body_timeout_s} s "
                                 f"({have} of {length} bytes)", close=True) from None
        finally:
            view.release()
        self.body_left = 0
        return body

    def _drop_body(self) -> None:
        """After the answer: read and drop what is left of the request body (`send` closed the
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
        except (TimeoutError, HttpError):
            self.close = True
        self.body_left = 0

    # answers
    def _sendall(self, data: bytes | memoryview) -> None:
        self.conn.sock.settimeout(self.limits.body_timeout_s)
        try:
            self.conn.sock.sendall(data)
        except OSError:  # timeout (a client that does not read) included
            self.close = True
            raise Disconnected from None

    def send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] = {}) -> None:
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

    def send_json(self, status: int, payload: Any) -> None:
        self.send(status, json.dumps(payload).encode("utf-8"), "application/json")
