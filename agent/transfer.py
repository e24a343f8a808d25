"""Fetch a package from the repository over MQTT: windowed, verified block by block, resumable.

Files under ``{data_dir}/downloads/`` for package id P:
    P.part     the package being fetched; blocks are written at their offsets as they arrive
    P.index    the block index, kept once verified against the deployment's ``blocks_digest``
    P.blocks   JSON record of the blocks that are durably in P.part (a bitmap). The data is
               fsynced before the record is replaced, so the record never claims a block whose
               bytes could be lost; on resume each claimed block is re-hashed anyway.
    P.edgepkg  the finished package, renamed into place after the whole-file sha256 matched
A broker restart, a dropped connection or an agent restart therefore costs only the blocks that
were in flight (at most ``window``) plus those written since the last checkpoint.

One module on purpose, a little over the usual size: the request window and the durable record
share one invariant (a block is claimed only after its bytes were fsynced), easier kept in one place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
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
from edgesdk.errors import ProtocolError, TransferError
from edgesdk.package import sha256_file
from edgesdk.protocol import INDEX_BLOCK, BlockRequest, BlockResponse, BlockStatus, DesiredDeployment

MAX_WAIT_S = 0.25  # longest single wait, so an injected clock is re-read often enough


class MqttClient(Protocol):
    """What the fetcher needs from a connected paho ``Client`` (paho 2.x signatures)."""

    def subscribe(self, topic: str, qos: int = ...) -> Any: ...
    def unsubscribe(self, topic: str) -> Any: ...
    def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...,
                properties: Properties | None = ...) -> Any: ...
    def message_callback_add(self, sub: str, callback: Callable[..., None]) -> None: ...
    def message_callback_remove(self, sub: str) -> None: ...


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
    corrupt_blocks: int = 0  # replies that failed verification (length or digest)
    resumed_from: int = 0  # verified blocks already on disk when the fetch began
    requests_sent: int = 0
    requests_reissued: int = 0
    duplicates: int = 0  # replies for blocks not outstanding (late, or resent by the broker)
    bytes_received: int = 0
    elapsed_s: float = 0.0


@dataclass
class _Ask:
    sent_at: float
    info: Any  # paho MQTTMessageInfo of the request


@dataclass
class _Transfer:
    """State of one fetch, touched only by the fetching thread."""

    desired: DesiredDeployment
    fd: int
    paths: dict[str, Path]
    started: float
    last_progress: float
    index: bytes | None = None
    done: bytearray = field(default_factory=bytearray)
    missing: deque[int] = field(default_factory=deque)
    outstanding: dict[int, _Ask] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)
    done_count: int = 0
    unsaved: int = 0
    not_found: int = 0

    @property
    def id12(self) -> str:
        return self.desired.package_id[:12]

    def blocks_done(self) -> int:
        return self.done_count


class PackageFetcher:
    """Fetches packages through ``client``, a connected paho 2.x MQTT 5 client the caller owns.

    Interface contract (for the agent daemon): the fetcher subscribes to the device's blocks topic
    itself and routes it with ``message_callback_add`` (the client's own ``on_message`` is left
    alone); it publishes requests with ``publish``. The caller runs the network loop and must call
    `on_connected()` from its ``on_connect`` so a reconnect re-subscribes and re-issues requests
    lost with the broker; without that, requests are re-issued after ``request_timeout_s`` anyway.
    One fetch at a time; `cancel()` from another thread stops it (partial data kept).
    """

    def __init__(self, client: MqttClient, fleet: str, device_id: str, data_dir: str | Path, *,
                 clock: Callable[[], float] = time.monotonic, window: int = 32,
                 stall_timeout_s: float = 20.0, request_timeout_s: float = 5.0, max_retries: int = 3,
                 checkpoint_every: int = 32, max_package_bytes: int = 16 * 1024**3) -> None:
        self.client = client
        self.fleet = protocol.check_name(fleet, "fleet")
        self.device_id = protocol.check_name(device_id, "device id")
        self.downloads = Path(data_dir) / "downloads"
        self.clock = clock
        self.window = max(1, window)
        self.per_request = min(self.window, 16)  # the repository's default cap per request
        self.stall_timeout_s = stall_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.checkpoint_every = max(1, checkpoint_every)
        self.max_package_bytes = max_package_bytes
        self.reply_topic = protocol.device_blocks(fleet, device_id)
        self._cond = threading.Condition()
        self._inbox: deque[bytes] = deque()
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
        return TransferStats(**self._counts, blocks_refetched=len(self._refetched))

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
        correlation = getattr(msg.properties, "CorrelationData", b"") or b""
        with self._cond:
            if self._active and correlation[:len(self._nonce)] == self._nonce:
                self._inbox.append(msg.payload)
                self._cond.notify_all()

    def discard_partials(self, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """Delete partial downloads of packages not in ``keep`` (superseded deployments); count them."""
        removed, busy = 0, self._current if self._active else None
        for path in self.downloads.glob("*.part"):
            if path.stem not in keep and path.stem != busy:
                for suffix in (".part", ".index", ".blocks"):
                    path.with_suffix(suffix).unlink(missing_ok=True)
                removed += 1
        return removed

    # -- the fetch -------------------------------------------------------------------------------
    def fetch(self, desired: DesiredDeployment, progress_cb: Callable[[Progress], None] | None = None) -> Path:
        """Fetch ``desired`` into downloads/{package_id}.edgepkg (verified) and return its path."""
        if desired.size > self.max_package_bytes:
            raise TransferError(f"transfer of {desired.package_id[:12]} refused: {desired.size} bytes "
                                f"exceeds the limit of {self.max_package_bytes}")
        self.downloads.mkdir(parents=True, exist_ok=True)
        final = self.downloads / f"{desired.package_id}.edgepkg"
        self._counts, self._refetched = {"blocks_total": desired.block_count}, set()
        if final.exists():
            if sha256_file(final) == desired.sha256:
                self._counts["resumed_from"] = desired.block_count
                return final
            final.unlink()
        with self._cond:
            if self._active:
                raise TransferError("a package transfer is already running on this fetcher")
            self._active, self._reconnected, self._cancelled = True, False, False
            self._current = desired.package_id
            self._nonce = os.urandom(8)
            self._inbox.clear()
        self.client.message_callback_add(self.reply_topic, self._on_message)
        self.client.subscribe(self.reply_topic, qos=1)
        try:
            return self._run(desired, final, progress_cb)
        finally:
            with self._cond:
                self._active = False
                self._inbox.clear()
            self.client.message_callback_remove(self.reply_topic)
            self.client.unsubscribe(self.reply_topic)

    def _run(self, desired: DesiredDeployment, final: Path, progress_cb: Callable[[Progress], None] | None) -> Path:
        stem = self.downloads / desired.package_id
        paths = {k: stem.with_suffix(f".{k}") for k in ("part", "index", "blocks")}
        fd = os.open(paths["part"], os.O_RDWR | os.O_CREAT, 0o644)
        now = self.clock()
        t = _Transfer(desired, fd, paths, now, now, done=bytearray(desired.block_count))
        try:
            if os.fstat(fd).st_size > desired.size:
                os.ftruncate(fd, desired.size)
            t.index = self._load_index(t)
            if t.index is not None:
                self._resume(t)
            self._report(t, progress_cb)
            while t.index is None or t.missing or t.outstanding:
                self._step(t, progress_cb)
            self._checkpoint(t)
            return self._finish(t, final)
        finally:
            os.close(fd)
            self._counts["elapsed_s"] = self.clock() - t.started

    def _step(self, t: _Transfer, progress_cb: Callable[[Progress], None] | None) -> None:
        self._fill(t)
        now = self.clock()
        wait = min(MAX_WAIT_S, t.last_progress + self.stall_timeout_s - now,
                   self._request_deadline(t) - now)
        with self._cond:
            if not self._inbox and not self._reconnected and not self._cancelled and wait > 0:
                self._cond.wait(wait)
            replies = list(self._inbox)
            self._inbox.clear()
            reconnected, self._reconnected = self._reconnected, False
            cancelled = self._cancelled
        if replies:  # ask for the next blocks before hashing and writing these
            self._fill(t, extra=len(replies))
        for raw in replies:
            self._accept(t, raw, progress_cb)
        if cancelled:
            self._checkpoint(t)
            raise TransferError(f"transfer of {t.id12} cancelled ({t.blocks_done()}/{len(t.done)} blocks kept)")
        if reconnected:  # requests the broker had acknowledged died with it; paho resends the rest
            self._reissue(t, [b for b, ask in t.outstanding.items() if _acked(ask.info)])
        now = self.clock()
        if now - t.last_progress >= self.stall_timeout_s:
            self._checkpoint(t)
            missing = "" if t.index is not None else ", index not received"
            raise TransferError(f"transfer of {t.id12} stalled: no block for {self.stall_timeout_s:g} s "
                                f"({t.blocks_done()}/{len(t.done)} blocks{missing})")
        if t.outstanding and now >= self._request_deadline(t):
            self.client.subscribe(self.reply_topic, qos=1)  # in case a reconnect went unnoticed
            self._reissue(t, list(t.outstanding))

    def _request_deadline(self, t: _Transfer) -> float:
        if not t.outstanding:
            return float("inf")
        oldest = min(ask.sent_at for ask in t.outstanding.values())
        return max(oldest, t.last_progress) + self.request_timeout_s

    def _fill(self, t: _Transfer, extra: int = 0) -> None:
        """Ask for missing blocks while fewer than ``window`` (+ ``extra`` replies already in
        hand but not yet processed) are outstanding."""
        if t.index is None:
            if INDEX_BLOCK not in t.outstanding:
                self._request(t, [INDEX_BLOCK])
            return
        limit = self.window + extra
        while t.missing and len(t.outstanding) < limit:
            count = min(limit - len(t.outstanding), self.per_request, len(t.missing))
            self._request(t, [t.missing.popleft() for _ in range(count)])

    def _request(self, t: _Transfer, blocks: list[int]) -> None:
        self._seq += 1
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = self._nonce + self._seq.to_bytes(8, "big")
        if blocks == [INDEX_BLOCK]:
            request = BlockRequest(index=True, block_size=t.desired.block_size)
        else:
            request = BlockRequest(blocks=tuple(blocks), block_size=t.desired.block_size)
        info = self.client.publish(protocol.package_get(self.fleet, t.desired.package_id),
                                   request.to_json(), qos=1, properties=props)
        now = self.clock()
        for block in blocks:
            if block in t.asked and block != INDEX_BLOCK:
                self._refetched.add(block)
            t.asked.add(block)
            t.outstanding[block] = _Ask(now, info)
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
        for start in range(0, len(blocks), self.per_request):
            self._request(t, sorted(blocks)[start:start + self.per_request])

    def _accept(self, t: _Transfer, raw: bytes, progress_cb: Callable[[Progress], None] | None) -> None:
        try:
            reply = BlockResponse.decode(raw, self.reply_topic)
        except ProtocolError:
            self._count("corrupt_blocks")
            return
        if reply.status == BlockStatus.NOT_FOUND:
            # Ask again at once (behind a shared subscription another repository may have it),
            # and fail fast when none does, instead of waiting for the stall timeout.
            t.not_found += 1
            if t.not_found > self.max_retries:
                raise TransferError(f"transfer of {t.id12} failed: the repository has no such package")
            self._reissue(t, [reply.block] if reply.block in t.outstanding else [INDEX_BLOCK])
            return
        if reply.status != BlockStatus.OK:
            reason = reply.payload.decode("utf-8", "replace")[:200]
            raise TransferError(f"transfer of {t.id12} failed: repository answered {reply.status.name} "
                                f"for block {reply.block}{': ' + reason if reason else ''}")
        if reply.block not in t.outstanding:
            self._count("duplicates")
            return
        del t.outstanding[reply.block]
        self._count("bytes_received", len(reply.payload))
        if reply.block == INDEX_BLOCK:
            if self._index_ok(t.desired, reply.payload):
                t.index = reply.payload
                write_bytes_atomic(t.paths["index"], reply.payload)
                self._resume(t)
                t.last_progress = self.clock()
            else:
                self._reject(t, INDEX_BLOCK, "the block index does not match blocks_digest")
            return
        lo = reply.block * protocol.DIGEST_SIZE
        index = t.index or b""  # blocks are asked for only once the index is known
        if (len(reply.payload) != t.desired.block_length(reply.block)
                or hashlib.sha256(reply.payload).digest() != index[lo:lo + protocol.DIGEST_SIZE]):
            self._reject(t, reply.block, "it failed verification")
            return
        self._write(t, reply.block, reply.payload)
        t.done[reply.block] = 1
        t.done_count += 1
        t.unsaved += 1
        t.last_progress = self.clock()
        self._count("blocks_fetched")
        if t.unsaved >= self.checkpoint_every:
            self._checkpoint(t)
        self._report(t, progress_cb)

    def _reject(self, t: _Transfer, block: int, why: str) -> None:
        self._count("corrupt_blocks")
        t.attempts[block] = t.attempts.get(block, 0) + 1
        if t.attempts[block] > self.max_retries:
            self._checkpoint(t)
            what = "block index" if block == INDEX_BLOCK else f"block {block}"
            raise TransferError(f"transfer of {t.id12} failed: {what} came {t.attempts[block]} times and "
                                f"{why} each time (corrupt repository copy?)")
        if block != INDEX_BLOCK:
            t.missing.appendleft(block)

    def _write(self, t: _Transfer, block: int, data: bytes) -> None:
        offset, view = block * t.desired.block_size, memoryview(data)
        try:
            while view:
                written = os.pwrite(t.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise self._disk_error(t, exc) from None

    def _checkpoint(self, t: _Transfer) -> None:
        """fsync the data, then (and only then) replace the record that claims it."""
        if t.unsaved == 0:
            return
        try:
            os.fsync(t.fd)
            record = {"package_id": t.desired.package_id, "size": t.desired.size,
                      "block_size": t.desired.block_size, "blocks_digest": t.desired.blocks_digest,
                      "done": _pack_bits(t.done)}
            write_bytes_atomic(t.paths["blocks"], json.dumps(record, sort_keys=True).encode())
        except OSError as exc:
            raise self._disk_error(t, exc, checkpoint=False) from None
        t.unsaved = 0

    def _disk_error(self, t: _Transfer, exc: OSError, checkpoint: bool = True) -> TransferError:
        if checkpoint:
            with contextlib.suppress(OSError, TransferError):
                self._checkpoint(t)
        kept = f"{t.blocks_done() - t.unsaved}/{len(t.done)} blocks kept for resume"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return TransferError(f"transfer of {t.id12} stopped: disk full writing {t.paths['part']} ({kept})")
        return TransferError(f"transfer of {t.id12} stopped: cannot write {t.paths['part']}: "
                             f"{exc.strerror or exc} ({kept})")

    # -- resume and finish -----------------------------------------------------------------------
    def _index_ok(self, desired: DesiredDeployment, index: bytes) -> bool:
        return (len(index) == desired.block_count * protocol.DIGEST_SIZE
                and protocol.index_digest(index) == desired.blocks_digest)

    def _load_index(self, t: _Transfer) -> bytes | None:
        with contextlib.suppress(OSError):
            index = t.paths["index"].read_bytes()
            if self._index_ok(t.desired, index):
                return index
        return None

    def _resume(self, t: _Transfer) -> None:
        """Trust the record only for blocks whose bytes on disk still match the index."""
        d = t.desired
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads(t.paths["blocks"].read_bytes())
            same = all(record[k] == getattr(d, k) for k in ("package_id", "size", "block_size", "blocks_digest"))
            claimed = _unpack_bits(record["done"], d.block_count) if same else []
            for block in claimed:
                lo = block * protocol.DIGEST_SIZE
                data = os.pread(t.fd, d.block_length(block), block * d.block_size)
                if hashlib.sha256(data).digest() == (t.index or b"")[lo:lo + protocol.DIGEST_SIZE]:
                    t.done[block] = 1
        t.done_count = sum(t.done)
        t.missing = deque(b for b in range(d.block_count) if not t.done[b])
        self._counts["resumed_from"] = t.done_count

    def _finish(self, t: _Transfer, final: Path) -> Path:
        d = t.desired
        if sha256_file(t.paths["part"]) != d.sha256:
            for path in t.paths.values():
                path.unlink(missing_ok=True)
            raise TransferError(f"transfer of {t.id12} failed: every block matched the index but the "
                                "whole-file sha256 differs (inconsistent deployment message)")
        os.replace(t.paths["part"], final)
        fsync_dir(self.downloads)
        t.paths["blocks"].unlink(missing_ok=True)
        t.paths["index"].unlink(missing_ok=True)
        return final

    def _report(self, t: _Transfer, progress_cb: Callable[[Progress], None] | None) -> None:
        if progress_cb is not None:
            done = t.blocks_done()
            size = min(t.desired.size, done * t.desired.block_size) if done < len(t.done) else t.desired.size
            progress_cb(Progress(done, len(t.done), size, t.desired.size))

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
