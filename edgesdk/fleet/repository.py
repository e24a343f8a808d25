"""The package repository: a folder of published packages and the MQTT server that hands out blocks.

Layout of ``repo_dir`` (package id = sha256 of the .edgepkg):
    {id}.edgepkg   the package, copied and verified at publish time
    {id}.index     raw sha256 of each block (32 bytes each), computed at publish time
    {id}.json      metadata (name, version, target, size, block_size, blocks_digest, ...), written last

The server trusts its store (publish verified it) and serves bytes as they are; the agent is the
verifier: a block that does not match the index is re-requested and finally refused.
Several servers may run at once behind the shared subscription; each request goes to one.

The server cannot tell who published a request (MQTT does not say; the broker ACL only limits
what a device may publish), so it treats the ResponseTopic's device as the requester and bounds
what any request can cause: replies go only to a device's own blocks topic, at most
``max_blocks_per_request`` blocks per request, and token buckets per response topic (messages
and bytes per second), so neither a flooding device nor a forged response topic can make the
server send a device more than burst + rate x time, or starve the other devices.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgesdk import protocol
from edgesdk.atomicfile import fsync_dir, write_bytes_atomic
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import BrokerError, PackageError, ProtocolError
from edgesdk.fleet.ratelimit import RequesterLimits
from edgesdk.package import open_package, verify_package
from edgesdk.protocol import BlockRequest, BlockResponse, BlockStatus, DeploymentStatement

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
# An honest request is under 1 KiB (64 block numbers); anything far larger is refused unread.
MAX_REQUEST_BYTES = 4096


@dataclass(frozen=True)
class PublishedPackage:
    package_id: str
    path: Path
    name: str
    version: str
    target: str
    size: int
    sha256: str
    blocks_digest: str
    block_size: int
    signer: str | None = None  # key id that signed it, when publish checked the signature

    def statement(self, fleet: str, device: str, serial: int, *, issued_at: float | None = None,
                  lifetime_s: float = protocol.DEFAULT_LIFETIME_S, rollout_id: str | None = None,
                  rollback: bool = False, selection_hint: dict[str, Any] | None = None) -> DeploymentStatement:
        """The (unsigned) deployment statement that tells ``device`` to run this package; with the
        fleet's ranking for the device's hardware class (`edgesdk.fleet.selection_hints`)."""
        now = time.time() if issued_at is None else issued_at
        return DeploymentStatement(fleet=fleet, device=device, package_id=self.package_id, name=self.name,
                                   version=self.version, target=self.target, size=self.size,
                                   block_size=self.block_size, blocks_digest=self.blocks_digest, serial=serial,
                                   issued_at=now, expires=now + lifetime_s, rollout_id=rollout_id,
                                   rollback=rollback, selection_hint=selection_hint)


def publish_package(pkg_path: str | Path, repo_dir: str | Path,
                    trusted_keys: Iterable[Ed25519PublicKey] | None = None,
                    block_size: int = protocol.BLOCK_SIZE) -> PublishedPackage:
    """Copy ``pkg_path`` into ``repo_dir`` as {sha256}.edgepkg with its block index and metadata.

    The copy is what gets checked (signature and every file's hash when ``trusted_keys`` are given,
    the archive's structure otherwise), so the stored bytes are the verified bytes. Idempotent.
    """
    if not protocol.MIN_BLOCK_SIZE <= block_size <= protocol.MAX_BLOCK_SIZE:
        raise PackageError(f"block size {block_size} is outside {protocol.MIN_BLOCK_SIZE}..{protocol.MAX_BLOCK_SIZE}")
    repo = Path(repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".publish.", suffix=".tmp", dir=repo)
    tmp = Path(tmp_name)
    try:
        whole, digests, size = hashlib.sha256(), [], 0
        try:
            with open(pkg_path, "rb") as src, os.fdopen(fd, "wb") as dst:
                for block in iter(lambda: src.read(block_size), b""):
                    whole.update(block)
                    digests.append(hashlib.sha256(block).digest())
                    dst.write(block)
                    size += len(block)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            raise PackageError(f"{pkg_path}: cannot copy into {repo}: {exc.strerror or exc}") from None
        if trusted_keys is not None:
            opened = verify_package(tmp, trusted_keys)
        else:
            with open_package(tmp) as opened:  # structure only; closes the file it opened
                pass
        if size == 0:
            raise PackageError(f"{pkg_path}: empty file")
        package_id = whole.hexdigest()
        final = repo / f"{package_id}.edgepkg"
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        fsync_dir(repo)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    index = b"".join(digests)
    manifest = opened.manifest
    published = PublishedPackage(package_id, final, manifest.name, manifest.version, manifest.target,
                                 size, package_id, protocol.index_digest(index), block_size, opened.signer)
    write_bytes_atomic(repo / f"{package_id}.index", index)
    meta = {k: v for k, v in asdict(published).items() if k != "path"}
    meta["published_at"] = time.time()
    write_bytes_atomic(repo / f"{package_id}.json", json.dumps(meta, indent=1, sort_keys=True).encode())
    return published


def load_published(repo_dir: str | Path, package_id: str) -> PublishedPackage:
    """Read {id}.json; PackageError when it is missing or malformed."""
    repo = Path(repo_dir)
    meta_path = repo / f"{protocol.check_package_id(package_id)}.json"
    try:
        meta = json.loads(meta_path.read_bytes())
        return PublishedPackage(
            meta["package_id"], repo / f"{package_id}.edgepkg", meta["name"], meta["version"],
            meta["target"], int(meta["size"]), meta["sha256"], meta["blocks_digest"],
            int(meta["block_size"]), meta.get("signer"))
    except FileNotFoundError:
        raise PackageError(f"{repo}: no published package {package_id[:12]}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackageError(f"{meta_path}: unreadable metadata ({exc})") from None


def list_packages(repo_dir: str | Path) -> list[PublishedPackage]:
    repo = Path(repo_dir)
    ids = sorted(p.stem for p in repo.glob("*.json") if protocol.is_sha256_hex(p.stem))
    return [load_published(repo, i) for i in ids]


def find_package(repo_dir: str | Path, ref: str | Path) -> PublishedPackage:
    """Resolve a package id, a unique id prefix (≥ 6 hex), or the path of an .edgepkg file."""
    text = str(ref).strip().lower()
    candidate = Path(ref)
    if not all(c in "0123456789abcdef" for c in text) or candidate.is_file():
        if not candidate.is_file():
            raise PackageError(f"{ref}: neither a package id nor a file")
        digest = hashlib.sha256()
        with open(candidate, "rb") as handle:
            for block in iter(lambda: handle.read(CHUNK), b""):
                digest.update(block)
        return load_published(repo_dir, digest.hexdigest())
    if len(text) < 6:
        raise PackageError(f"package id prefix {text!r} is too short (give at least 6 hex)")
    matches = [p for p in Path(repo_dir).glob(f"{text}*.json") if protocol.is_sha256_hex(p.stem)]
    if len(matches) != 1:
        raise PackageError(f"package id prefix {text!r} matches {len(matches)} packages in {repo_dir}")
    return load_published(repo_dir, matches[0].stem)


class _Entry:
    """An open package file, its index and the identity of the file it was opened from."""

    def __init__(self, path: Path, index: bytes, block_size: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self.identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.size = st.st_size
        self.index = index
        self.block_size = block_size
        self.block_count = len(index) // protocol.DIGEST_SIZE

    def block_length(self, block: int) -> int:
        return max(0, min(self.block_size, self.size - block * self.block_size))

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class ServerStats:
    requests: int = 0
    blocks_served: int = 0
    bad_requests: int = 0
    not_found: int = 0
    dropped: int = 0  # queue full, or no usable response topic
    rate_limited: int = 0  # requests dropped because their requester was over its limits
    delayed: int = 0  # requests served late (within max_delay_s) to keep a requester within its limits


@dataclass
class _Request:
    """A block request as queued for the worker (the payload dropped when it is far too large)."""

    topic: str
    payload: bytes | None
    size: int
    reply_to: str
    requester: str
    correlation: bytes


@dataclass(order=True)
class _Delayed:
    due: float
    seq: int
    serve: Callable[[], None] = field(compare=False)


class RepositoryServer:
    """Answers BlockRequests for packages in ``repo_dir`` (see docs/protocol.md §blocks).

    Each package is served with the block size it was published with (its {id}.json), so the
    server takes none; a request naming another block size gets BAD_REQUEST.

    ``start()``/``stop()`` run it on background threads; ``serve_forever(stop_event)`` blocks.
    A paho network thread queues requests (at most ``max_queued_per_requester`` per requester, so
    one device cannot fill the queue); one worker thread checks each against its requester's
    limits (``blocks_per_s``/``burst_blocks`` reply messages, ``bytes_per_s``/``burst_bytes``),
    reads blocks (pread on cached file handles) and publishes QoS 1 responses, waiting for
    acknowledgements once more than ``max_pending`` responses are unacknowledged so memory stays
    bounded. Defaults: 4 MiB/s per device (32 Mbit/s, above most device links; 16 blocks/s of
    256 KiB) with an 8 MiB burst, 128 messages/s for small block sizes.
    """

    def __init__(self, broker_config: BrokerConfig, fleet: str, repo_dir: str | Path, *,
                 client_id: str | None = None, share_group: str = protocol.SHARE_GROUP,
                 max_blocks_per_request: int = 16, max_queued_requests: int = 1024,
                 max_pending: int = 64, publish_timeout_s: float = 10.0, max_open_files: int = 32,
                 blocks_per_s: float = 128.0, burst_blocks: float = 256.0,
                 bytes_per_s: float = 4 * 1024 * 1024, burst_bytes: float = 8 * 1024 * 1024,
                 max_delay_s: float = 1.0, max_queued_per_requester: int = 64,
                 max_requesters: int = 4096) -> None:
        self.config = broker_config
        self.fleet = protocol.check_name(fleet, "fleet")
        self.repo_dir = Path(repo_dir)
        self.client_id = client_id or f"edgesdk-repo-{uuid.uuid4().hex[:12]}"
        # The broker grants any SUBSCRIBE and filters on delivery, so a device joining a
        # well-known share group would be handed requests it may not read (and they are lost):
        # `edgesdk broker config` gives the fleet service a secret group ($EDGESDK_SHARE_GROUP).
        self.share_group = protocol.check_id(share_group, "share group")
        self.max_blocks = max(1, min(max_blocks_per_request, protocol.MAX_BLOCKS_PER_REQUEST))
        self.max_pending = max_pending
        self.publish_timeout_s = publish_timeout_s
        self.max_open_files = max_open_files
        self.max_queued_requests = max_queued_requests
        self.max_queued_per_requester = max(1, max_queued_per_requester)
        self.limits = RequesterLimits(blocks_per_s, burst_blocks, bytes_per_s, burst_bytes, max_delay_s,
                                      max_requesters)
        self.stats = ServerStats()
        self._stats_lock = threading.Lock()
        self._requests: queue.Queue[_Request | None] = queue.Queue(max_queued_requests)
        self._queued: dict[str, int] = {}  # requests in the queue per requester (paho and worker threads)
        self._delayed: list[_Delayed] = []
        self._order = itertools.count()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: deque[mqtt.MQTTMessageInfo] = deque()
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self._subscribed = threading.Event()

    def _count(self, name: str, by: int = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + by)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        # Bound paho's own queue too: past it publish() fails fast instead of growing memory.
        client = make_client(self.client_id, self.config, clean_start=True, max_inflight=64,
                             max_queued=4 * self.max_pending)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name=f"repo-{self.client_id}", daemon=True)
        self._worker.start()
        self._client = client
        try:
            connect_blocking(client, self.config)
            # Requests published before the broker has our subscription would be dropped.
            if not self._subscribed.wait(self.config.connect_timeout_s):
                raise BrokerError(f"broker {self.config.url} did not confirm the repository's subscription "
                                  f"within {self.config.connect_timeout_s:g} s")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._worker is not None:
            with contextlib.suppress(queue.Full):
                self._requests.put(None, timeout=timeout_s)
            self._worker.join(timeout_s)
            self._worker = None
        if self._client is not None:
            disconnect(self._client)
            self._client = None
        for entry in self._entries.values():
            entry.close()
        self._entries.clear()

    def serve_forever(self, stop_event: threading.Event) -> None:
        self.start()
        try:
            stop_event.wait()
        finally:
            self.stop()

    def __enter__(self) -> RepositoryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paho thread: nothing a peer sends may raise out of a callback (it would stop the loop) --
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: mqtt.ReasonCode, props: object) -> None:
        try:
            if not reason.is_failure:
                client.subscribe(protocol.package_get_shared(self.fleet, self.share_group), qos=1)
        except Exception:
            log.exception("repository: could not subscribe after connecting")

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[mqtt.ReasonCode],
                      props: object) -> None:
        try:
            if reasons and not reasons[0].is_failure:
                self._subscribed.set()
            else:
                log.error("repository: broker refused the shared subscription: %s", reasons)
        except Exception:
            log.exception("repository: unreadable SUBACK")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self._enqueue(msg)
        except Exception:
            self._count("dropped")
            log.exception("repository: dropped an unreadable message")

    def _enqueue(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        reply_to = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", b"") or b""
        parsed = protocol.parse_device_topic(self.fleet, reply_to) if isinstance(reply_to, str) else None
        if parsed is None or parsed[1] != "blocks":
            # Only a device's own blocks topic: never reflect block data onto arbitrary topics.
            self._count("requests")
            self._count("dropped")
            return
        requester = parsed[0]
        with self._stats_lock:
            if self._queued.get(requester, 0) >= self.max_queued_per_requester:
                self.stats.requests += 1
                self.stats.rate_limited += 1
                return
            self._queued[requester] = self._queued.get(requester, 0) + 1
        size = len(msg.payload)
        request = _Request(msg.topic, msg.payload if size <= MAX_REQUEST_BYTES else None, size, reply_to,
                           requester, bytes(correlation))
        try:
            self._requests.put_nowait(request)
        except queue.Full:
            self._release(requester)
            self._count("requests")
            self._count("dropped")  # the device re-requests after its request timeout

    def _release(self, requester: str) -> None:
        with self._stats_lock:
            left = self._queued.get(requester, 1) - 1
            if left > 0:
                self._queued[requester] = left
            else:
                self._queued.pop(requester, None)

    # -- worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            timeout = max(0.0, self._delayed[0].due - time.monotonic()) if self._delayed else None
            try:
                request = self._requests.get(timeout=timeout)
            except queue.Empty:
                request = _IDLE
            if request is None:
                self._delayed.clear()
                return
            now = time.monotonic()
            while self._delayed and self._delayed[0].due <= now:
                self._guarded(heapq.heappop(self._delayed).serve, "a delayed request")
            if request is not _IDLE:
                self._release(request.requester)
                self._guarded(lambda: self._handle(request), f"a request on {request.topic}")

    def _guarded(self, action: Callable[[], None], what: str) -> None:
        try:
            action()
        except Exception:  # never let one request kill the server
            log.exception("repository: failed to answer %s", what)

    def _handle(self, req: _Request) -> None:
        self._count("requests")
        if len(req.correlation) > protocol.MAX_CORRELATION_BYTES:
            self._bad(req, f"correlation data over {protocol.MAX_CORRELATION_BYTES} bytes", correlation=b"")
            return
        if req.payload is None:
            self._bad(req, f"request of {req.size} bytes exceeds {MAX_REQUEST_BYTES}")
            return
        package_id = protocol.parse_package_get(self.fleet, req.topic)
        try:
            request = BlockRequest.from_json(req.payload, req.topic)
        except (ProtocolError, RecursionError, ValueError, TypeError) as exc:
            self._bad(req, str(exc) if isinstance(exc, ProtocolError) else f"unreadable request ({type(exc).__name__})")
            return
        entry = self._entry(package_id) if package_id and protocol.is_sha256_hex(package_id) else None
        if entry is None or package_id is None:
            self._count("not_found")
            self._reply(req, [BlockResponse(BlockStatus.NOT_FOUND, protocol.INDEX_BLOCK)])
            return
        if request.block_size is not None and request.block_size != entry.block_size:
            self._bad(req, f"block size {request.block_size} differs from the repository's {entry.block_size}")
            return
        if request.index:
            self._reply(req, [BlockResponse(BlockStatus.OK, protocol.INDEX_BLOCK, entry.index)])
            return
        if len(request.blocks) > self.max_blocks:
            self._bad(req, f"more than {self.max_blocks} blocks in one request")
            return
        blocks = request.blocks
        nbytes = sum(entry.block_length(b) if b < entry.block_count else 0 for b in blocks)
        self._admit(req, len(blocks), nbytes + protocol.HEADER_SIZE * len(blocks),
                    lambda: self._serve_blocks(req, package_id, blocks))

    def _serve_blocks(self, req: _Request, package_id: str, blocks: tuple[int, ...]) -> None:
        entry = self._entry(package_id)  # again: a delayed request may find the file closed or replaced
        if entry is None:
            self._send(req.reply_to, req.correlation, BlockResponse(BlockStatus.NOT_FOUND, protocol.INDEX_BLOCK))
            return
        for block in blocks:
            if block >= entry.block_count:
                self._send(req.reply_to, req.correlation, BlockResponse(BlockStatus.OUT_OF_RANGE, block))
                continue
            data = os.pread(entry.fd, entry.block_size, block * entry.block_size)
            self._send(req.reply_to, req.correlation, BlockResponse(BlockStatus.OK, block, data))
            self._count("blocks_served")

    def _bad(self, req: _Request, reason: str, correlation: bytes | None = None) -> None:
        self._count("bad_requests")
        self._reply(req, [BlockResponse(BlockStatus.BAD_REQUEST, protocol.INDEX_BLOCK, reason.encode()[:512])],
                    correlation)

    def _reply(self, req: _Request, responses: list[BlockResponse], correlation: bytes | None = None) -> None:
        """Send small replies (errors, the index) within the requester's limits like any block."""
        nbytes = sum(protocol.HEADER_SIZE + len(r.payload) for r in responses)
        corr = req.correlation if correlation is None else correlation

        def send() -> None:
            for response in responses:
                self._send(req.reply_to, corr, response)

        self._admit(req, len(responses), nbytes, send)

    def _admit(self, req: _Request, messages: int, nbytes: int, serve: Callable[[], None]) -> None:
        now = time.monotonic()
        wait = self.limits.admit(req.requester, messages, nbytes, now)
        if wait is None or (wait > 0 and len(self._delayed) >= self.max_queued_requests):
            self._count("rate_limited")  # the device asks again after its request timeout
            return
        if wait > 0:
            self._count("delayed")
            heapq.heappush(self._delayed, _Delayed(now + wait, next(self._order), serve))
            return
        serve()

    def _send(self, topic: str, correlation: bytes, response: BlockResponse) -> None:
        if self._client is None:
            return
        props = Properties(PacketTypes.PUBLISH)
        if correlation:
            props.CorrelationData = correlation
        if len(self._pending) >= self.max_pending:
            # Backpressure: wait for the older half to be acknowledged, with one deadline for all
            # (a dead broker must not cost publish_timeout_s per message); paho's bounded queue
            # still limits memory if we give up.
            deadline = time.monotonic() + self.publish_timeout_s
            while len(self._pending) > self.max_pending // 2:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._pending.clear()
                    break
                with contextlib.suppress(ValueError, RuntimeError):
                    self._pending.popleft().wait_for_publish(remaining)
        info = self._client.publish(topic, response.encode(), qos=1, properties=props)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._count("dropped")
        else:
            self._pending.append(info)

    def _entry(self, package_id: str) -> _Entry | None:
        """The cached open package, reopened when the file was replaced or changed."""
        path = self.repo_dir / f"{package_id}.edgepkg"
        entry = self._entries.get(package_id)
        if entry is not None:
            try:
                st = os.stat(path)
                if (st.st_ino, st.st_size, st.st_mtime_ns) == entry.identity:
                    self._entries.move_to_end(package_id)
                    return entry
            except OSError:
                pass
            entry.close()
            del self._entries[package_id]
        try:
            published = load_published(self.repo_dir, package_id)
            index = (self.repo_dir / f"{package_id}.index").read_bytes()
            if protocol.index_digest(index) != published.blocks_digest:
                log.error("repository: %s.index does not match its metadata", package_id)
                return None
            entry = _Entry(path, index, published.block_size)
        except (PackageError, OSError):
            return None
        self._entries[package_id] = entry
        while len(self._entries) > self.max_open_files:
            self._entries.popitem(last=False)[1].close()
        return entry


_IDLE = _Request("", None, 0, "", "", b"")  # the worker woke for a delayed request, not a new one
