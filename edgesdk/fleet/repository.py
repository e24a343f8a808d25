"""The package repository: a folder of published packages and the MQTT server that hands out blocks.

Layout of ``repo_dir`` (package id = sha256 of the .edgepkg):
    {id}.edgepkg   the package, copied and verified at publish time
    {id}.index     raw sha256 of each block (32 bytes each), computed at publish time
    {id}.json      metadata (name, version, target, size, block_size, blocks_digest, ...), written last

The server trusts its store (publish verified it) and serves bytes as they are; the agent is the
verifier: a block that does not match the index is re-requested and finally refused.
Several servers may run at once behind the shared subscription; each request goes to one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgesdk import protocol
from edgesdk.atomicfile import fsync_dir, write_bytes_atomic
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import BrokerError, PackageError, ProtocolError
from edgesdk.package import open_package, verify_package
from edgesdk.protocol import BlockRequest, BlockResponse, BlockStatus, DesiredDeployment

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


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

    def desired(self, rollout_id: str | None = None, issued_at: float | None = None) -> DesiredDeployment:
        return DesiredDeployment(self.package_id, self.name, self.version, self.target, self.sha256,
                                 self.size, self.block_size, self.blocks_digest, rollout_id,
                                 time.time() if issued_at is None else issued_at)


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

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class ServerStats:
    requests: int = 0
    blocks_served: int = 0
    bad_requests: int = 0
    not_found: int = 0
    dropped: int = 0  # queue full, or no usable response topic


class RepositoryServer:
    """Answers BlockRequests for packages in ``repo_dir`` (see docs/protocol.md §blocks).

    Each package is served with the block size it was published with (its {id}.json), so the
    server takes none; a request naming another block size gets BAD_REQUEST.

    ``start()``/``stop()`` run it on background threads; ``serve_forever(stop_event)`` blocks.
    A paho network thread queues requests; one worker thread reads blocks (pread on cached file
    handles) and publishes QoS 1 responses, waiting for acknowledgements once more than
    ``max_pending`` responses are unacknowledged so memory stays bounded.
    """

    def __init__(self, broker_config: BrokerConfig, fleet: str, repo_dir: str | Path, *,
                 client_id: str | None = None,
                 max_blocks_per_request: int = 16, max_queued_requests: int = 1024,
                 max_pending: int = 64, publish_timeout_s: float = 10.0, max_open_files: int = 32) -> None:
        self.config = broker_config
        self.fleet = protocol.check_name(fleet, "fleet")
        self.repo_dir = Path(repo_dir)
        self.client_id = client_id or f"edgesdk-repo-{uuid.uuid4().hex[:12]}"
        self.max_blocks = min(max_blocks_per_request, protocol.MAX_BLOCKS_PER_REQUEST)
        self.max_pending = max_pending
        self.publish_timeout_s = publish_timeout_s
        self.max_open_files = max_open_files
        self.stats = ServerStats()
        self._requests: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(max_queued_requests)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: deque[mqtt.MQTTMessageInfo] = deque()
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self._subscribed = threading.Event()

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

    # -- paho thread -------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: mqtt.ReasonCode, props: object) -> None:
        if not reason.is_failure:
            client.subscribe(protocol.package_get_shared(self.fleet), qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[mqtt.ReasonCode],
                      props: object) -> None:
        if reasons and not reasons[0].is_failure:
            self._subscribed.set()
        else:
            log.error("repository: broker refused the shared subscription: %s", reasons)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self._requests.put_nowait(msg)
        except queue.Full:
            self.stats.dropped += 1  # the device re-requests after its request timeout

    # -- worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            msg = self._requests.get()
            if msg is None:
                return
            try:
                self._handle(msg)
            except Exception:  # never let one request kill the server
                log.exception("repository: failed to answer a request on %s", msg.topic)

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        self.stats.requests += 1
        props = msg.properties
        reply_to = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", b"") or b""
        parsed = protocol.parse_device_topic(self.fleet, reply_to or "")
        if parsed is None or parsed[1] != "blocks":
            # Only a device's own blocks topic: never reflect block data onto arbitrary topics.
            self.stats.dropped += 1
            return
        if len(correlation) > protocol.MAX_CORRELATION_BYTES:
            self._bad(reply_to, b"", f"correlation data over {protocol.MAX_CORRELATION_BYTES} bytes")
            return
        package_id = protocol.parse_package_get(self.fleet, msg.topic)
        try:
            request = BlockRequest.from_json(msg.payload, msg.topic)
        except ProtocolError as exc:
            self._bad(reply_to, correlation, str(exc))
            return
        entry = self._entry(package_id) if package_id and protocol.is_sha256_hex(package_id) else None
        if entry is None:
            self.stats.not_found += 1
            self._send(reply_to, correlation, BlockResponse(BlockStatus.NOT_FOUND, protocol.INDEX_BLOCK))
            return
        if request.block_size is not None and request.block_size != entry.block_size:
            self._bad(reply_to, correlation, f"block size {request.block_size} differs from the "
                      f"repository's {entry.block_size}")
            return
        if request.index:
            self._send(reply_to, correlation, BlockResponse(BlockStatus.OK, protocol.INDEX_BLOCK, entry.index))
            return
        if len(request.blocks) > self.max_blocks:
            self._bad(reply_to, correlation, f"more than {self.max_blocks} blocks in one request")
            return
        for block in request.blocks:
            if block >= entry.block_count:
                self._send(reply_to, correlation, BlockResponse(BlockStatus.OUT_OF_RANGE, block))
                continue
            data = os.pread(entry.fd, entry.block_size, block * entry.block_size)
            self._send(reply_to, correlation, BlockResponse(BlockStatus.OK, block, data))
            self.stats.blocks_served += 1

    def _bad(self, reply_to: str, correlation: bytes, reason: str) -> None:
        self.stats.bad_requests += 1
        self._send(reply_to, correlation,
                   BlockResponse(BlockStatus.BAD_REQUEST, protocol.INDEX_BLOCK, reason.encode()[:512]))

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
            self.stats.dropped += 1
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
