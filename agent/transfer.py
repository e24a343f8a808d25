"""Fetch a package from the repository over MQTT: windowed, verified block by block, resumable.

Files under ``{data_dir}/downloads/`` for package id P:
    P.part     the package being fetched; blocks are written at their offsets as they arrive
    P.index    the block index, kept once verified against the deployment's ``blocks_digest``
    P.blocks   JSON record of the blocks that are durably in P.part (a bitmap). The data is
               fsynced before the record is replaced, so the record never claims a block whose
               bytes could be lost; on resume each claimed block is re-hashed anyway.
    P.edgepkg  the finished package, renamed into place after the whole-file sha256 matched
A broker restart, a dropped connection or an agent restart therefore costs only the blocks that
were in flight (at most ``window``) plus those written since the last checkpoint. A checkpoint
comes every ``checkpoint_every`` blocks but at most once per ``checkpoint_interval_s``: it stalls
the writer for an fsync of the data written since the last one (3-6 ms per 8 MiB on the benchmark
VM's disk, far more on SD cards and eMMC) and the record's two (0.6 ms), so it is bounded in time,
not bytes; a crash then costs about a second of downloading on a fast link.

Two threads share a fetch, beside paho's network thread. The fetching thread (the caller's) owns
the protocol: the request window, retries, deadlines. A writer thread does the per-byte work off
that path: it checks each block's sha256 against the index, writes it, feeds the whole-file
sha256 in block order (so the end of a fetch re-reads nothing), and at checkpoints fsyncs the data
and then replaces the record. Once the index is known, the network thread hands block replies
straight to the writer (one thread hand-over per block, not two: in the benchmark's one process
each costs a wait for the GIL); the writer reports each outcome to the fetching thread in batches.
A block counts as done, and leaves the window, only when the writer reports its hash matched and
its bytes were written, so the window also bounds the bytes waiting for the writer. (Before, on a
100 MiB fetch, the receiving thread spent 0.42-0.51 s of 0.85-0.98 s hashing, writing and fsyncing
while no request went out, and the finish re-read the whole file for its sha256: 0.11-0.13 s.)

The blocks topic is readable by more than the repository in a misconfigured fleet, so any reply
may be hostile: a bad or error reply never fails a fetch at once. It marks that one request as
failed and the blocks are asked for again after a jittered exponential backoff; the genuine reply,
which usually follows, is still accepted meanwhile (every block is verified against the index, so
who sent it does not matter). Only ``max_retries`` failed attempts at the same block fail the
fetch. A fetch that makes no progress (``stall_timeout_s``), is too slow (``min_rate_bps``) or too
long (``deadline_s``) raises `TransferStalledError` and keeps its data for the next try; a refused
one (size over the cap, whole-file sha256 mismatch, an index that never matches) deletes it.

One module on purpose, over the usual size: the request window, the writer and the durable record
share two invariants (a block is done only after its hash matched; it is claimed only after its
bytes were fsynced), easier kept in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgesdk import protocol
from edgesdk.atomicfile import fsync_dir, write_bytes_atomic
from edgesdk.errors import ConfigError, ProtocolError, TransferError, TransferStalledError, map_os_errors
from edgesdk.package import sha256_file
from edgesdk.protocol import INDEX_BLOCK, BlockRequest, BlockResponse, BlockStatus

log = logging.getLogger(__name__)
MAX_WAIT_S = 0.25  # longest single wait, so an injected clock is re-read often enough
NONCE_BYTES = 8
SUFFIXES = (".part", ".index", ".blocks", ".edgepkg")  # a package's files under downloads/
# The BlockResponse header (edgesdk.protocol.blocks): an OK reply's payload is taken as a view of
# the message, not copied as BlockResponse.decode does (the copy was 40 ms per 100 MiB, under the GIL).
_REPLY_HEAD = struct.Struct(">3sBII")


class MqttClient(Protocol):
    """What the fetcher needs from a connected paho ``Client`` (paho 2.x signatures)."""

    def subscribe(self, topic: str, qos: int = ...) -> Any: ...
    def unsubscribe(self, topic: str) -> Any: ...
    def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...,
                properties: Properties | None = ...) -> Any: ...
    def message_callback_add(self, sub: str, callback: Callable[..., None]) -> None: ...
    def message_callback_remove(self, sub: str) -> None: ...


class TransferSpec(Protocol):
    """What the fetcher needs to know about a package: fields of the signed `DeploymentStatement`
    (where ``sha256`` is the package id). ``size`` is the most the fetcher will ever accept."""

    @property
    def package_id(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def blocks_digest(self) -> str: ...
    @property
    def block_count(self) -> int: ...
    def block_length(self, index: int) -> int: ...


@dataclass(frozen=True)
class TransferLimits:
    """Deadlines and limits of a fetch, as values (httpx's Timeout/Limits); tests inject small ones.

    The rate rule is what abandons a trickle: a repository (or an attacker in its place) that
    sends one block every few seconds never trips ``stall_timeout_s`` but would hold the install
    worker for hours. Abandoning costs nothing lasting: the data stays and the next try resumes.
    """

    stall_timeout_s: float = 20.0  # no verified block for this long: TransferStalledError
    request_timeout_s: float = 5.0  # no reply for this long: ask the outstanding blocks again
    deadline_s: float = 3 * 3600.0  # one fetch, whatever its progress: TransferStalledError
    # 32 KiB/s = 256 kbit/s, a poor mobile link; slower fetches are abandoned and resumed later.
    min_rate_bps: float = 32 * 1024  # verified bytes per second over rate_window_s ...
    rate_window_s: float = 60.0  # ... a sliding window (>= a few blocks at min_rate_bps) ...
    grace_s: float = 30.0  # ... checked from this long after the fetch began
    max_retries: int = 3  # failed attempts at one block (bad block, error reply) before failing
    retry_base_s: float = 0.5  # backoff after a failed attempt n: base * 2**(n-1), capped, ...
    retry_max_s: float = 8.0  # ... then drawn from [half, all] of that (jitter)
    max_package_bytes: int = 16 * 1024**3  # the device's own ceiling, whatever a statement says

    def __post_init__(self) -> None:
        for name in ("stall_timeout_s", "request_timeout_s", "deadline_s", "rate_window_s", "retry_max_s",
                     "max_package_bytes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"transfer limit {name} must be positive, got {getattr(self, name)!r}")
        for name in ("min_rate_bps", "grace_s", "retry_base_s", "max_retries"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"transfer limit {name} must not be negative, got {getattr(self, name)!r}")

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Wait before attempt ``attempt + 1``: exponential, capped, with 'equal jitter'."""
        top = min(self.retry_max_s, self.retry_base_s * 2 ** max(0, attempt - 1))
        return top * rng.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Progress:
    blocks_done: int
    blocks_total: int
    bytes_done: int
    size: int


@dataclass(frozen=True)
class TransferStats:
    blocks_total: int = 0
    blocks_fetched: int = 0  # blocks received, verified and written by this fetch
    blocks_refetched: int = 0  # distinct blocks asked for more than once (lost reply, reconnect, corrupt)
    corrupt_blocks: int = 0  # replies that failed verification (length, digest or framing)
    error_replies: int = 0  # NOT_FOUND / BAD_REQUEST / OUT_OF_RANGE replies (retried after backoff)
    retries: int = 0  # requests re-sent after a backoff (bad or error reply)
    resumed_from: int = 0  # verified blocks already on disk when the fetch began
    requests_sent: int = 0
    requests_reissued: int = 0
    duplicates: int = 0  # replies for blocks already done (late, resent by the broker) or before the index
    dropped_replies: int = 0  # replies too large for this package, or past the inbox bound
    bytes_received: int = 0
    elapsed_s: float = 0.0


@dataclass
class _Ask:
    sent_at: float
    info: Any  # paho MQTTMessageInfo of the request
    seq: int  # the request's number in the correlation data
    retry_at: float | None = None  # set when a bad or error reply came: ask again then

    def waiting(self) -> bool:
        """Whether the block waits on the network (not on a backoff)."""
        return self.retry_at is None


@dataclass
class _Transfer:
    """State of one fetch. The fetching thread owns the window (``outstanding``, ``missing``,
    ``done_count``...); the writer thread owns ``done``, ``written``, ``unsaved`` and the
    whole-file hash while it runs, and the fetching thread touches them only when it is stopped."""

    spec: TransferSpec
    block_count: int
    fd: int
    paths: dict[str, Path]
    started: float
    last_progress: float
    saved_at: float = 0.0  # clock() at the last checkpoint (writer-owned)
    index: bytes | None = None
    done: bytearray = field(default_factory=bytearray)
    missing: deque[int] = field(default_factory=deque)
    outstanding: dict[int, _Ask] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    reasons: dict[int, list[str]] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)
    arrivals: deque[tuple[float, int]] = field(default_factory=deque)  # (time, verified bytes)
    arrived_bytes: int = 0  # the sum over ``arrivals``
    settled: bytearray = field(default_factory=bytearray)  # blocks reported done, as seen by the fetching thread
    done_count: int = 0  # blocks reported done (verified and written), resumed ones included
    written: int = 0  # blocks marked in ``done``: verified and written (writer-owned)
    unsaved: int = 0  # of those, written since the last checkpoint (writer-owned)
    whole: Any = field(default_factory=hashlib.sha256)  # sha256 of blocks 0..hashed-1 (writer-owned)
    hashed: int = 0

    @property
    def id12(self) -> str:
        return self.spec.package_id[:12]

    def blocks_done(self) -> int:
        return self.done_count

    def block_length(self, block: int) -> int:
        return min(self.spec.block_size, self.spec.size - block * self.spec.block_size)


class PackageFetcher:
    """Fetches packages through ``client``, a connected paho 2.x MQTT 5 client the caller owns.

    Interface contract (for the agent daemon): the fetcher subscribes to the device's blocks topic
    itself and routes it with ``message_callback_add`` (the client's own ``on_message`` is left
    alone); it publishes requests with ``publish``. The caller runs the network loop and must call
    `on_connected()` from its ``on_connect`` so a reconnect re-subscribes and re-issues requests
    lost with the broker; without that, requests are re-issued after ``request_timeout_s`` anyway.
    One fetch at a time; `cancel()` from another thread stops it (partial data kept).

    ``limits`` holds the deadlines; any `TransferLimits` field may also be given as a keyword
    (``stall_timeout_s=3``) and replaces that one value.
    """

    def __init__(self, client: MqttClient, fleet: str, device_id: str, data_dir: str | Path, *,
                 limits: TransferLimits | None = None, clock: Callable[[], float] = time.monotonic,
                 window: int = 32, checkpoint_every: int = 32, checkpoint_interval_s: float = 1.0,
                 rng: random.Random | None = None, **limit_overrides: Any) -> None:
        self.client = client
        self.fleet = protocol.check_name(fleet, "fleet")
        self.device_id = protocol.check_name(device_id, "device id")
        self.downloads = Path(data_dir) / "downloads"
        try:
            self.limits = dataclasses.replace(limits or TransferLimits(), **limit_overrides)
        except TypeError as exc:
            raise ConfigError(f"PackageFetcher: {exc}") from None
        self.clock = clock
        self.rng = rng or random.Random()
        self.window = max(1, window)
        self.per_request = min(self.window, 16)  # the repository's default cap per request
        self.batch = max(1, min(self.per_request, self.window // 4))  # fewest free slots worth a request
        self.checkpoint_every = max(1, checkpoint_every)
        self.checkpoint_interval_s = max(0.0, checkpoint_interval_s)
        self.reply_topic = protocol.device_blocks(fleet, device_id)
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the fetching thread waits on it
        self._wcond = threading.Condition(lock)  # the writer waits on it
        self._inbox: deque[tuple[int, bytes]] = deque()
        self._inbox_bytes = 0  # bytes of replies in the inbox and with the writer
        self._work: deque[tuple[int, memoryview, int]] = deque()  # (block, payload, reply size)
        self._to_writer = False  # block replies go straight to the writer (the index is known)
        self._results: deque[tuple[str, int, Any]] = deque()  # writer -> fetching thread
        self._writer: threading.Thread | None = None
        self._writer_stop = False
        self._max_reply = 0  # largest reply this package can have (header + block or index)
        self._max_inbox = 0
        self._dropped = 0
        self._nonce = b""
        self._current = ""
        self._active = False
        self._reconnected = False
        self._cancelled = False
        self._counts: dict[str, Any] = {}
        self._refetched: set[int] = set()
        self._seq = 0

    @property
    def stats(self) -> TransferStats:
        """Counters of the current or last fetch."""
        return TransferStats(**self._counts, blocks_refetched=len(self._refetched), dropped_replies=self._dropped)

    def _count(self, name: str, by: float = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + by

    # -- called from other threads -------------------------------------------------------------
    def on_connected(self) -> None:
        """Call from the client's on_connect: re-subscribe now, re-issue lost requests next."""
        with self._cond:
            if not self._active:
                return
            self._reconnected = True
            self._cond.notify_all()
        self.client.subscribe(self.reply_topic, qos=1)

    def cancel(self) -> None:
        """Stop the running fetch: it raises TransferError and keeps what it has for resume."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def _on_message(self, client: object, userdata: object, msg: Any) -> None:
        # paho's network thread: nothing a peer sends may raise out of here (it would kill the loop).
        try:
            correlation = getattr(msg.properties, "CorrelationData", b"") or b""
            payload = msg.payload
            with self._cond:
                if not self._active or correlation[:NONCE_BYTES] != self._nonce:
                    return
                if len(payload) > self._max_reply or self._inbox_bytes + len(payload) > self._max_inbox:
                    self._dropped += 1  # never buffer more than this package can need
                    return
                self._inbox_bytes += len(payload)
                if self._to_writer and len(payload) >= _REPLY_HEAD.size:
                    magic, status, block, length = _REPLY_HEAD.unpack_from(payload)
                    if (magic == protocol.MAGIC and status == BlockStatus.OK and block != INDEX_BLOCK
                            and length == len(payload) - _REPLY_HEAD.size):
                        self._work.append((block, memoryview(payload)[_REPLY_HEAD.size:], len(payload)))
                        self._wcond.notify()
                        return
                seq = int.from_bytes(correlation[NONCE_BYTES:], "big") if len(correlation) == 16 else -1
                self._inbox.append((seq, payload))
                self._cond.notify_all()
        except Exception:
            log.exception("transfer: dropped an unreadable reply on %s", self.reply_topic)

    # -- download files --------------------------------------------------------------------------
    def discard(self, package_id: str) -> None:
        """Delete every download file of ``package_id`` (refuses while that package is being fetched)."""
        protocol.check_package_id(package_id)
        with self._cond:
            if self._active and self._current == package_id:
                raise TransferError(f"cannot discard {package_id[:12]}: it is being fetched")
        self._delete_files(package_id)

    def prune(self, keep: set[str] | frozenset[str]) -> int:
        """Delete the download files of every package id not in ``keep`` (abandoned or superseded
        downloads, finished packages no longer wanted, temp files of a crash); the package being
        fetched is always kept. Returns how many package ids lost files."""
        with self._cond:
            busy = self._current if self._active else None
        removed: set[str] = set()
        with map_os_errors(f"prune {self.downloads}"):
            if not self.downloads.is_dir():
                return 0
            for path in self.downloads.iterdir():
                # a.part, a.blocks, ... and atomic writes' temp files (.a.blocks.XYZ.tmp)
                package_id = path.name.lstrip(".").split(".", 1)[0]
                if protocol.is_sha256_hex(package_id) and package_id not in keep and package_id != busy:
                    path.unlink(missing_ok=True)
                    removed.add(package_id)
        return len(removed)

    def _delete_files(self, package_id: str) -> None:
        with map_os_errors(f"delete downloads of {package_id[:12]}"):
            if not self.downloads.is_dir():
                return
            for path in self.downloads.glob(f"*{package_id}.*"):
                if path.name.lstrip(".").split(".", 1)[0] == package_id:
                    path.unlink(missing_ok=True)

    def _refuse(self, package_id: str, message: str) -> TransferError:
        """A non-resumable failure: what was downloaded is useless, so delete it."""
        with contextlib.suppress(Exception):
            self._delete_files(package_id)
        return TransferError(message)

    # -- the fetch -------------------------------------------------------------------------------
    def fetch(self, spec: TransferSpec, progress_cb: Callable[[Progress], None] | None = None) -> Path:
        """Fetch ``spec`` into downloads/{package_id}.edgepkg (verified) and return its path.

        Raises TransferStalledError when the repository is silent, too slow or past the deadline
        (partial data kept for resume) and TransferError when the fetch failed or was refused.
        """
        if not protocol.is_sha256_hex(spec.package_id):  # it names files: no path tricks
            raise TransferError(f"transfer refused: invalid package id {spec.package_id!r}")
        id12 = spec.package_id[:12]
        if not isinstance(spec.size, int) or spec.size <= 0 or spec.size > self.limits.max_package_bytes:
            raise self._refuse(spec.package_id, f"transfer of {id12} refused: {spec.size} bytes exceeds the "
                               f"limit of {self.limits.max_package_bytes}")
        if not protocol.MIN_BLOCK_SIZE <= spec.block_size <= protocol.MAX_BLOCK_SIZE:
            raise self._refuse(spec.package_id, f"transfer of {id12} refused: block size {spec.block_size}")
        block_count = -(-spec.size // spec.block_size)
        self.downloads.mkdir(parents=True, exist_ok=True)
        final = self.downloads / f"{spec.package_id}.edgepkg"
        self._counts, self._refetched = {"blocks_total": block_count}, set()
        if final.exists():
            if final.stat().st_size == spec.size and sha256_file(final) == spec.sha256:
                self._counts["resumed_from"] = block_count
                return final
            final.unlink()
        with self._cond:
            if self._active:
                raise TransferError("a package transfer is already running on this fetcher")
            self._active, self._reconnected, self._cancelled, self._to_writer = True, False, False, False
            self._current = spec.package_id
            self._nonce = os.urandom(NONCE_BYTES)
            self._inbox.clear()
            self._work.clear()
            self._results.clear()
            self._inbox_bytes, self._dropped = 0, 0
            self._max_reply = protocol.HEADER_SIZE + max(spec.block_size, block_count * protocol.DIGEST_SIZE)
            # Room for two windows of replies (in the inbox or with the writer): a block stays in
            # the window until the writer is done with it, so honest replies never need more.
            self._max_inbox = self._max_reply + 2 * self.window * (protocol.HEADER_SIZE + spec.block_size)
        self.client.message_callback_add(self.reply_topic, self._on_message)
        self.client.subscribe(self.reply_topic, qos=1)
        try:
            return self._run(spec, block_count, final, progress_cb)
        finally:
            with self._cond:
                self._active = self._to_writer = False
                self._inbox.clear()
                self._work.clear()
                self._results.clear()
                self._inbox_bytes = 0
            self.client.message_callback_remove(self.reply_topic)
            self.client.unsubscribe(self.reply_topic)

    def _run(self, spec: TransferSpec, block_count: int, final: Path,
             progress_cb: Callable[[Progress], None] | None) -> Path:
        stem = self.downloads / spec.package_id
        paths = {k: stem.with_suffix(f".{k}") for k in ("part", "index", "blocks")}
        fd = os.open(paths["part"], os.O_RDWR | os.O_CREAT, 0o644)
        now = self.clock()
        t = _Transfer(spec, block_count, fd, paths, now, now, saved_at=now, done=bytearray(block_count),
                      settled=bytearray(block_count))
        try:
            if os.fstat(fd).st_size > spec.size:  # never keep more than the statement's size
                os.ftruncate(fd, spec.size)
            t.index = self._load_index(t)
            if t.index is not None:
                self._resume(t)
            self._report(t, progress_cb)
            self._start_writer(t)
            if t.index is not None:
                with self._cond:
                    self._to_writer = True
            while t.index is None or t.missing or t.outstanding:
                self._step(t, progress_cb)
            return self._finish(t, final)
        finally:
            # Never close the fd under a running writer (its number could be reused). An exception
            # (a crash, for the data) stops it without a checkpoint: the last record stands.
            self._halt_writer()
            os.close(fd)  # deleting a refused download's files before this is fine on POSIX
            self._counts["elapsed_s"] = self.clock() - t.started

    def _step(self, t: _Transfer, progress_cb: Callable[[Progress], None] | None) -> None:
        self._fill(t)
        now = self.clock()
        wait = min(MAX_WAIT_S, t.last_progress + self.limits.stall_timeout_s - now, self._next_due(t) - now)
        with self._cond:
            if (not self._inbox and not self._results and not self._reconnected and not self._cancelled
                    and wait > 0):
                self._cond.wait(wait)
            replies = list(self._inbox)
            self._inbox.clear()
            results = list(self._results)
            self._results.clear()
            reconnected, self._reconnected = self._reconnected, False
            cancelled = self._cancelled
        for seq, raw in replies:
            self._accept(t, seq, raw)
        for outcome, block, detail in results:
            self._settle(t, outcome, block, detail, progress_cb)
        if cancelled:
            self._save(t)
            raise TransferError(f"transfer of {t.id12} cancelled ({t.written}/{t.block_count} blocks kept)")
        if reconnected:  # requests the broker had acknowledged died with it; paho resends the rest
            self._reissue(t, [b for b, ask in t.outstanding.items() if ask.waiting() and _acked(ask.info)])
        now = self.clock()
        self._check_progress(t, now)
        retry = [b for b, ask in t.outstanding.items() if ask.retry_at is not None and ask.retry_at <= now]
        if retry:
            self._count("retries")
            self._reissue(t, retry)
        if now >= self._request_deadline(t):
            self.client.subscribe(self.reply_topic, qos=1)  # in case a reconnect went unnoticed
            self._reissue(t, [b for b, ask in t.outstanding.items() if ask.waiting()])

    def _check_progress(self, t: _Transfer, now: float) -> None:
        """Stall, deadline and minimum rate: each abandons the fetch, keeping its data."""
        limits, elapsed = self.limits, now - t.started
        if now - t.last_progress >= limits.stall_timeout_s:
            self._save(t)
            missing = "" if t.index is not None else ", index not received"
            raise TransferStalledError(f"transfer of {t.id12} stalled: no block for {limits.stall_timeout_s:g} s "
                                       f"({t.written}/{t.block_count} blocks{missing})")
        if elapsed >= limits.deadline_s:
            self._save(t)
            raise TransferStalledError(f"transfer of {t.id12} abandoned: not done within the deadline of "
                                       f"{limits.deadline_s:g} s ({self._kept(t)})")
        while t.arrivals and t.arrivals[0][0] < now - limits.rate_window_s:
            t.arrived_bytes -= t.arrivals.popleft()[1]
        if limits.min_rate_bps > 0 and elapsed >= limits.grace_s:
            span = min(limits.rate_window_s, elapsed)
            received = t.arrived_bytes
            if received < limits.min_rate_bps * span:
                self._save(t)
                raise TransferStalledError(f"transfer of {t.id12} too slow: {received / span:.0f} B/s over the "
                                           f"last {span:g} s, below the minimum of {limits.min_rate_bps:g} B/s "
                                           f"({self._kept(t)})")

    @staticmethod
    def _kept(t: _Transfer) -> str:
        """What a resume keeps: the blocks claimed by the record (call with the writer stopped)."""
        return f"{t.written - t.unsaved}/{t.block_count} blocks kept for resume"

    def _next_due(self, t: _Transfer) -> float:
        retries = [ask.retry_at for ask in t.outstanding.values() if ask.retry_at is not None]
        return min([self._request_deadline(t), *retries])

    def _request_deadline(self, t: _Transfer) -> float:
        waiting = [ask.sent_at for ask in t.outstanding.values() if ask.waiting()]
        if not waiting:
            return float("inf")
        return max(min(waiting), t.last_progress) + self.limits.request_timeout_s

    def _fill(self, t: _Transfer) -> None:
        """Ask for missing blocks while fewer than ``window`` are outstanding. Blocks waiting out a
        backoff, or with the writer, count as outstanding, so hostile error replies cannot widen
        the window and a slow disk holds back the requests instead of filling memory."""
        if t.index is None:
            if INDEX_BLOCK not in t.outstanding:
                self._request(t, [INDEX_BLOCK])
            return
        limit = self.window
        # Wait for a batch of free slots (the last blocks excepted): a request per freed slot
        # cost the repository, the broker and this thread 5x the requests for the same bytes.
        if limit - len(t.outstanding) < min(self.batch, len(t.missing)):
            return
        while t.missing and len(t.outstanding) < limit:
            count = min(limit - len(t.outstanding), self.per_request)
            blocks: list[int] = []
            while t.missing and len(blocks) < count:
                block = t.missing.popleft()
                if not t.settled[block]:  # (a block can verify before it is asked for: it is done)
                    blocks.append(block)
            if blocks:
                self._request(t, blocks)

    def _request(self, t: _Transfer, blocks: list[int]) -> None:
        self._seq += 1
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = self._nonce + self._seq.to_bytes(8, "big")
        if blocks == [INDEX_BLOCK]:
            request = BlockRequest(index=True, block_size=t.spec.block_size)
        else:
            request = BlockRequest(blocks=tuple(blocks), block_size=t.spec.block_size)
        info = self.client.publish(protocol.package_get(self.fleet, t.spec.package_id),
                                   request.to_json(), qos=1, properties=props)
        now = self.clock()
        for block in blocks:
            if block in t.asked and block != INDEX_BLOCK:
                self._refetched.add(block)
            t.asked.add(block)
            t.outstanding[block] = _Ask(now, info, self._seq)
        self._count("requests_sent")

    def _reissue(self, t: _Transfer, blocks: list[int]) -> None:
        if not blocks:
            return
        for block in blocks:
            t.outstanding.pop(block, None)
        self._count("requests_reissued")
        if INDEX_BLOCK in blocks:
            self._request(t, [INDEX_BLOCK])
            blocks = [b for b in blocks if b != INDEX_BLOCK]
        blocks.sort()
        for start in range(0, len(blocks), self.per_request):
            self._request(t, blocks[start:start + self.per_request])

    def _accept(self, t: _Transfer, seq: int, raw: bytes) -> None:
        """A reply that did not go straight to the writer: an error, the index, anything
        malformed, or a block before the index was known (never asked for: dropped)."""
        try:
            reply = BlockResponse.decode(raw, self.reply_topic)
        except ProtocolError:
            self._release(len(raw))
            self._count("corrupt_blocks")  # no block number to blame: the request timeout covers it
            return
        if reply.status != BlockStatus.OK:
            self._release(len(raw))
            self._count("error_replies")
            reason = reply.payload[:200].decode("utf-8", "replace")
            why = f"the repository answered {reply.status.name}{': ' + reason if reason else ''}"
            if reply.block == INDEX_BLOCK:  # request-wide: every block of that request
                for block in [b for b, ask in t.outstanding.items() if ask.seq == seq]:
                    self._failed(t, block, why)
            elif reply.block in t.outstanding and t.outstanding[reply.block].seq == seq:
                self._failed(t, reply.block, why)
            return
        self._release(len(raw))
        if reply.block != INDEX_BLOCK or INDEX_BLOCK not in t.outstanding or t.index is not None:
            self._count("duplicates")  # a block before the index is known was not asked for
            return
        # Any copy that verifies is accepted, even while its request waits out a backoff: the
        # genuine reply that follows a hostile one must not be lost (blocks: the writer takes every copy).
        if not self._index_ok(t, reply.payload):
            self._count("corrupt_blocks")
            self._failed(t, INDEX_BLOCK, "it did not match blocks_digest")
            return
        del t.outstanding[INDEX_BLOCK]
        t.index = reply.payload
        write_bytes_atomic(t.paths["index"], reply.payload)
        self._resume(t)
        self._progressed(t, len(reply.payload))
        with self._cond:
            self._to_writer = True

    def _settle(self, t: _Transfer, outcome: str, block: int, detail: Any,
                progress_cb: Callable[[Progress], None] | None) -> None:
        """What the writer made of one copy of ``block``: ``ok`` (hash matched, bytes written),
        ``bad`` (wrong length or hash), ``duplicate`` (the block was done already), ``error`` (an
        OSError writing or syncing: the fetch stops, keeping what is durable) or ``crash`` (a bug)."""
        if outcome == "error":
            raise self._disk_error(t, detail)
        if outcome == "crash":
            self._save(t)
            raise TransferError(f"transfer of {t.id12} stopped: the block writer failed: {detail}")
        if outcome == "bad":  # a forged or corrupt copy: one failed attempt, if the block was asked for
            self._count("corrupt_blocks")
            self._failed(t, block, "it failed verification")
        elif outcome == "duplicate":
            self._count("duplicates")
        else:
            t.outstanding.pop(block, None)  # asked again meanwhile, perhaps: a later copy is a duplicate
            t.settled[block] = 1
            t.done_count += 1
            self._count("blocks_fetched")
            self._progressed(t, t.block_length(block))
            self._report(t, progress_cb)

    def _progressed(self, t: _Transfer, nbytes: int) -> None:
        now = self.clock()
        t.last_progress = now
        t.arrivals.append((now, nbytes))
        t.arrived_bytes += nbytes
        self._count("bytes_received", nbytes)

    def _release(self, nbytes: int) -> None:
        """A reply is dealt with: its bytes leave the inbox budget."""
        with self._cond:
            self._inbox_bytes -= nbytes

    # -- the writer thread -------------------------------------------------------------------------
    def _start_writer(self, t: _Transfer) -> None:
        self._writer_stop = False
        self._writer = threading.Thread(target=self._write_loop, args=(t,), daemon=True,
                                        name=f"transfer-writer-{t.id12}")
        self._writer.start()

    def _halt_writer(self) -> None:
        """Stop the writer after the block in hand (queued copies are dropped: they were not
        verified, and a resume asks for them again). Then its state is the caller's, and the
        blocks it wrote but had not reported yet are counted."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        with self._cond:
            self._writer_stop = True
            self._wcond.notify_all()
        writer.join()
        with self._cond:
            written = sum(1 for outcome, _, _ in self._results if outcome == "ok")
            self._results.clear()
        self._count("blocks_fetched", written)

    def _write_loop(self, t: _Transfer) -> None:
        while True:
            with self._cond:
                while not self._work and not self._writer_stop:
                    self._wcond.wait()
                if self._writer_stop:
                    return
                block, payload, size = self._work.popleft()
            result: tuple[str, int, Any]
            try:
                result = (self._write_block(t, block, payload), block, None)
            except OSError as exc:
                result = ("error", block, exc)
            except Exception as exc:  # a bug: the fetching thread reports it, this thread ends
                log.exception("transfer: block writer failed")
                result = ("crash", block, f"{type(exc).__name__}: {exc}")
            with self._cond:
                self._inbox_bytes -= size
                self._results.append(result)
                # Wake the fetching thread per batch of free slots (it asks for no fewer), not per
                # block: each wake-up cost a context switch and a wait for the GIL. Near the end,
                # and for anything but a good block, at once.
                if (len(self._results) >= self.batch or result[0] != "ok"
                        or t.block_count - t.written < self.batch):
                    self._cond.notify_all()
            if result[0] in ("error", "crash"):
                return

    def _write_block(self, t: _Transfer, block: int, payload: memoryview) -> str:
        """Writer thread: verify, write, hash in order, checkpoint. Raises OSError."""
        if block >= t.block_count or len(payload) != t.block_length(block):
            return "bad"
        if t.done[block]:
            return "duplicate"
        lo = block * protocol.DIGEST_SIZE
        if hashlib.sha256(payload).digest() != (t.index or b"")[lo:lo + protocol.DIGEST_SIZE]:
            return "bad"
        offset, view = block * t.spec.block_size, payload
        while view:
            written = os.pwrite(t.fd, view, offset)
            view, offset = view[written:], offset + written
        t.done[block] = 1
        t.written += 1
        t.unsaved += 1
        self._hash_forward(t, block, payload)
        if t.unsaved >= self.checkpoint_every and self.clock() - t.saved_at >= self.checkpoint_interval_s:
            self._sync(t)
        return "ok"

    @staticmethod
    def _hash_forward(t: _Transfer, block: int = -1, payload: memoryview | bytes = b"") -> None:
        """Feed the whole-file sha256 in block order: ``payload`` if it is the next block, then
        every following block already on disk (one that arrived early, or was resumed)."""
        if block == t.hashed:
            t.whole.update(payload)
            t.hashed += 1
        while t.hashed < t.block_count and t.done[t.hashed]:
            t.whole.update(os.pread(t.fd, t.block_length(t.hashed), t.hashed * t.spec.block_size))
            t.hashed += 1

    def _sync(self, t: _Transfer) -> None:
        """fsync the data, then (and only then) replace the record that claims it. Raises OSError;
        run by the writer, or by the fetching thread once the writer is stopped."""
        if t.unsaved == 0:
            return
        os.fsync(t.fd)
        s = t.spec
        record = {"package_id": s.package_id, "size": s.size, "block_size": s.block_size,
                  "blocks_digest": s.blocks_digest, "done": _pack_bits(t.done)}
        write_bytes_atomic(t.paths["blocks"], json.dumps(record, sort_keys=True).encode())
        t.unsaved = 0
        t.saved_at = self.clock()

    def _save(self, t: _Transfer) -> None:
        """Stop the writer and make what it wrote durable and claimed, for a resume."""
        self._halt_writer()
        try:
            self._sync(t)
        except OSError as exc:
            raise self._disk_error(t, exc, save=False) from None

    def _failed(self, t: _Transfer, block: int, why: str) -> None:
        """One failed attempt at ``block``: ask again after a backoff, or fail past max_retries.

        Counted once per request, however many bad replies it draws: a client that reads the
        correlation data can answer a request many times, but it cannot make more requests fail
        than the fetcher sends, and the fetcher sends the next only after the backoff.
        """
        ask = t.outstanding.get(block)
        if ask is None or ask.retry_at is not None:
            return
        attempts = t.attempts[block] = t.attempts.get(block, 0) + 1
        reasons = t.reasons.setdefault(block, [])
        if why not in reasons:
            reasons.append(why)
        if attempts <= self.limits.max_retries:
            ask.retry_at = self.clock() + self.limits.backoff_s(attempts, self.rng)
            return
        what = "block index" if block == INDEX_BLOCK else f"block {block}"
        if reasons == ["it failed verification"]:
            message = (f"transfer of {t.id12} failed: {what} came {attempts} times and it failed verification "
                       "each time (corrupt repository copy?)")
        elif block == INDEX_BLOCK and all("NOT_FOUND" in r for r in reasons):
            message = f"transfer of {t.id12} failed: the repository has no such package (NOT_FOUND {attempts} times)"
        else:
            message = f"transfer of {t.id12} failed: {what} failed {attempts} times ({'; '.join(reasons)})"
        if block == INDEX_BLOCK and reasons == ["it did not match blocks_digest"]:
            # The statement and the repository disagree: nothing on disk can be verified. Refuse.
            raise self._refuse(t.spec.package_id, message)
        self._save(t)
        raise TransferError(message)

    def _disk_error(self, t: _Transfer, exc: OSError, save: bool = True) -> TransferError:
        if save:
            self._halt_writer()
            with contextlib.suppress(OSError):
                self._sync(t)
        kept = self._kept(t)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return TransferError(f"transfer of {t.id12} stopped: disk full writing {t.paths['part']} ({kept})")
        return TransferError(f"transfer of {t.id12} stopped: cannot write {t.paths['part']}: "
                             f"{exc.strerror or exc} ({kept})")

    # -- resume and finish -----------------------------------------------------------------------
    def _index_ok(self, t: _Transfer, index: bytes) -> bool:
        return (len(index) == t.block_count * protocol.DIGEST_SIZE
                and protocol.index_digest(index) == t.spec.blocks_digest)

    def _load_index(self, t: _Transfer) -> bytes | None:
        with contextlib.suppress(OSError):
            index = t.paths["index"].read_bytes()
            if self._index_ok(t, index):
                return index
        return None

    def _resume(self, t: _Transfer) -> None:
        """Trust the record only for blocks whose bytes on disk still match the index (before the
        writer has work: the fetching thread may touch its state)."""
        s = t.spec
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads(t.paths["blocks"].read_bytes())
            same = all(record[k] == getattr(s, k) for k in ("package_id", "size", "block_size", "blocks_digest"))
            claimed = _unpack_bits(record["done"], t.block_count) if same else []
            for block in claimed:  # ascending: the leading run also feeds the whole-file hash
                lo = block * protocol.DIGEST_SIZE
                data = os.pread(t.fd, t.block_length(block), block * s.block_size)
                if hashlib.sha256(data).digest() == (t.index or b"")[lo:lo + protocol.DIGEST_SIZE]:
                    t.done[block] = 1
                    if block == t.hashed:
                        t.whole.update(data)
                        t.hashed += 1
        t.settled[:] = t.done
        t.done_count = t.written = sum(t.done)
        t.missing = deque(b for b in range(t.block_count) if not t.done[b])
        self._counts["resumed_from"] = t.done_count

    def _finish(self, t: _Transfer, final: Path) -> Path:
        """Every block is done: one fsync for what the last checkpoint left, then the whole-file
        sha256 (hashed as the blocks landed), then the rename."""
        s = t.spec
        self._halt_writer()  # idle by now
        try:
            self._hash_forward(t)  # resumed blocks past the first gap were not hashed yet
            os.fsync(t.fd)
        except OSError as exc:
            raise self._disk_error(t, exc, save=False) from None
        if (os.fstat(t.fd).st_size != s.size or t.hashed != t.block_count
                or t.whole.hexdigest() != s.sha256):
            raise self._refuse(s.package_id, f"transfer of {t.id12} failed: every block matched the index but "
                               "the whole-file sha256 differs (inconsistent deployment statement); "
                               "download deleted")
        os.replace(t.paths["part"], final)
        fsync_dir(self.downloads)
        t.paths["blocks"].unlink(missing_ok=True)
        t.paths["index"].unlink(missing_ok=True)
        return final

    def _report(self, t: _Transfer, progress_cb: Callable[[Progress], None] | None) -> None:
        if progress_cb is not None:
            done, size = t.blocks_done(), t.spec.size
            progress_cb(Progress(done, t.block_count,
                                 min(size, done * t.spec.block_size) if done < t.block_count else size, size))


def _acked(info: Any) -> bool:
    try:
        return bool(info.is_published())
    except (ValueError, RuntimeError):
        return False


def _pack_bits(bits: bytearray) -> str:
    """Bitmap as hex text: bit i (from the least significant end) is block i."""
    return format(int("".join("1" if b else "0" for b in reversed(bits)) or "0", 2), "x")


def _unpack_bits(text: str, count: int) -> list[int]:
    return [i for i, c in enumerate(reversed(bin(int(text, 16))[2:])) if c == "1" and i < count]
