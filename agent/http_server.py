"""The HTTP/1.1 server under the local API (`agent.api`): connections, framing and their limits.

It parses requests and frames answers (Content-Length bodies only, keep-alive, ``Expect:
100-continue``); what a request means is the handler's business, given an `Exchange`. This module
holds the connections (poller, workers, bookkeeping); one request on one connection, its parsing and
its answer, is `agent.http_request`'s. What one caller can cost is bounded by the
``ConnectionLimits`` the server is given; how:

- One poller thread holds every connection that has no complete request yet (idle keep-alive
  ones, and ones still sending headers), so connections cost no thread; ``workers`` handler threads
  take a connection only once its headers are in, serve that one request and hand it back.
- After an answer on a kept-alive connection, the worker waits up to ``linger_s`` for the next
  request on it before handing it back (at most half the workers at once): a caller's next call
  then skips two thread hand-overs (to the poller and back), each a wake-up that a loaded 2-core
  device makes slow (a third of the API's fixed cost for a small tensor; `agent.api.ApiLimits`).
- Headers must arrive within ``header_timeout_s`` of their first byte (slowloris), a body within
  ``body_timeout_s``; a connection with no request is closed after ``idle_timeout_s``, and the
  oldest one is closed to admit a new one past ``max_connections``.
- Content-Length is parsed strictly (digits only, one value) before a byte of the body is read,
  and a handler refuses a body by its declared length (`Exchange.content_length`).
- The Host header must name this server (``allowed_hosts``, with the bound port): a web page the
  user visits cannot reach it through a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import queue
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Protocol

from agent.http_request import Disconnected, Exchange, HttpError, Request, head_end, parse_head
from edgesdk.errors import ConfigError

# Disconnected, Exchange, HttpError and Request are the request side (`agent.http_request`),
# re-exported so a handler can take everything it needs from here.
__all__ = ["ConnectionLimits", "Connection", "Disconnected", "Exchange", "HttpError", "HttpServer", "Request"]

log = logging.getLogger(__name__)


class ConnectionLimits(Protocol):
    """The limits the server reads (`agent.api.ApiLimits` has them, documented)."""

    @property
    def workers(self) -> int: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def header_timeout_s(self) -> float: ...
    @property
    def body_timeout_s(self) -> float: ...
    @property
    def idle_timeout_s(self) -> float: ...
    @property
    def max_header_bytes(self) -> int: ...
    @property
    def max_discard_bytes(self) -> int: ...
    @property
    def linger_s(self) -> float: ...


# -- connections ----------------------------------------------------------------------------------

class Connection:
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

class HttpServer:
    """One poller thread and ``limits.workers`` handler threads; each whole request goes to
    ``handler`` as an `Exchange`. ``port=0`` binds a free port (see `port` after start)."""

    def __init__(self, host: str, port: int, handler: Callable[[Exchange], None],
                 limits: ConnectionLimits, allowed_hosts: Iterable[str], *, name: str = "http") -> None:
        """``allowed_hosts``: the names (without port) a request's Host header may carry;
        ``name`` prefixes the thread names."""
        self.host, self._port = host, port
        self.handler = handler
        self.limits = limits
        self.name = name
        names = tuple(allowed_hosts)
        self.allowed_hosts = frozenset(n.strip().lower().removeprefix("[").removesuffix("]") for n in names)
        if not self.allowed_hosts or "" in self.allowed_hosts:
            raise ConfigError(f"allowed_hosts must name at least one host, got {names!r}")
        self._lock = threading.Lock()  # connection counters, and handing connections back to the poller
        self._listen: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._work: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._returned: deque[Connection] = deque()
        self._waiting: dict[Connection, None] = {}  # poller-owned: connections without a whole request, oldest first
        self._open = 0  # connections accepted and not closed
        self._busy = 0  # connections a worker holds to serve a request
        self._lingering = 0  # workers waiting on a served connection for its next request
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

    def host_allowed(self, value: str) -> bool:
        """Whether a Host header names this server: an allowed name and the bound port."""
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

    def connections(self) -> dict[str, int]:
        """Open connections by state (``idle``: no request being served), and those refused on a limit."""
        with self._lock:
            return {"idle": self._open - self._busy, "busy": self._busy, "refused": self._refused}

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
        self._threads = [threading.Thread(target=self._poll, name=f"{self.name}-{self._port}-poll", daemon=True)]
        self._threads += [threading.Thread(target=self._serve, name=f"{self.name}-{self._port}-w{i}", daemon=True)
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
                        if isinstance(key.data, Connection):
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
            self._hold(Connection(sock, peer, time.monotonic() + self.limits.idle_timeout_s))

    def _hold(self, conn: Connection) -> None:
        """Wait for (the rest of) a request on ``conn``, or dispatch it if its head is in already."""
        if conn.buf and not self._complete(conn):
            return
        assert self._selector is not None
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        self._waiting[conn] = None

    def _complete(self, conn: Connection) -> bool:
        """For a connection with bytes: True if they are still short of a head (keep waiting);
        else dispatch it to a worker (whole head) or refuse it (head too large) and return False."""
        del conn.buf[:len(conn.buf) - len(conn.buf.lstrip(b"\r\n"))]  # stray CRLF between requests
        if not conn.buf:
            return True
        if head_end(conn.buf, 0) is not None:
            self._work.put(conn)
            return False
        if len(conn.buf) > self.limits.max_header_bytes:
            _quick_reply(conn.sock, 431, f"request headers exceed {self.limits.max_header_bytes} bytes")
            self._close(conn, refused=True)
            return False
        return True

    def _readable(self, conn: Connection) -> None:
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
        if len(conn.buf) <= self.limits.max_header_bytes and head_end(conn.buf, start) is None:
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

    def _drop(self, conn: Connection, refused: bool = False) -> None:
        """Close a connection the poller holds."""
        if conn in self._waiting:
            del self._waiting[conn]
            try:
                assert self._selector is not None
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._close(conn, refused)

    def _close(self, conn: Connection, refused: bool = False) -> None:
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
            keep = True
            while keep:
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
                if not keep or not self._linger(conn):
                    break
            if keep:
                self._hand_back(conn)
            else:
                self._close(conn)

    def _linger(self, conn: Connection) -> bool:
        """Wait up to ``linger_s`` for the next request's head on ``conn``; True if it is in
        (serve it here), False to hand the connection back (bytes read so far stay in its buffer)."""
        linger = self.limits.linger_s
        if linger <= 0 or self._stopping:
            return False
        with self._lock:
            if self._lingering >= self.limits.workers // 2:  # the rest stay free for other connections
                return False
            self._lingering += 1
        try:
            deadline = time.monotonic() + linger
            while head_end(conn.buf, 0) is None:
                left = deadline - time.monotonic()
                if left <= 0 or len(conn.buf) > self.limits.max_header_bytes:
                    return False
                conn.sock.settimeout(left)
                try:
                    data = conn.sock.recv(65536)
                except TimeoutError:
                    return False
                except OSError:
                    data = b""
                if not data:  # closed by the client: the poller notices and closes it too
                    return False
                conn.buf += data
                del conn.buf[:len(conn.buf) - len(conn.buf.lstrip(b"\r\n"))]  # stray CRLF between requests
            return True
        finally:
            with self._lock:
                self._lingering -= 1

    def _serve_one(self, conn: Connection) -> bool:
        end = head_end(conn.buf, 0)
        if end is None:  # cannot happen: the poller and _linger dispatch whole heads only
            return False
        head = bytes(conn.buf[:end[0]])
        del conn.buf[:end[1]]
        try:
            request = parse_head(head)
        except HttpError as err:
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
        return Exchange(self, conn, request).run()

    def _hand_back(self, conn: Connection) -> None:
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
