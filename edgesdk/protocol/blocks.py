"""Block transfer framing: block requests' limits, the binary BlockResponse, the block index."""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from edgesdk.errors import ProtocolError

# 256 KiB blocks. Measured on loopback Mosquitto (docs/protocol.md): speed follows the bytes in
# flight (window x block) more than the block size; 256 KiB x 8 = 2 MiB per downloading device
# in the broker's queues ran at ~49 MiB/s, far above device links, and a lost or corrupt block
# costs 4x less to re-fetch than with 1 MiB blocks.
BLOCK_SIZE = 256 * 1024
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024
MAX_BLOCKS_PER_REQUEST = 64  # protocol cap; a repository may serve fewer (it answers BAD_REQUEST)
MAX_CORRELATION_BYTES = 64
DIGEST_SIZE = 32


# -- binary block responses ----------------------------------------------------------------------
class BlockStatus(enum.IntEnum):
    """Status byte of a BlockResponse."""

    OK = 0  #: payload is the block (or, for INDEX_BLOCK, the index)
    NOT_FOUND = 1  #: the repository has no such package
    BAD_REQUEST = 2  #: the request was malformed or asked for too much; payload is a reason (UTF-8)
    OUT_OF_RANGE = 3  #: the block number is past the end of the package


MAGIC = b"EB1"
_HEADER = struct.Struct(">3sBII")  # magic, status, block number, payload length (big-endian)
HEADER_SIZE = _HEADER.size
INDEX_BLOCK = 0xFFFFFFFF  # block number that carries the index (and request-wide errors)


@dataclass(frozen=True)
class BlockResponse:
    """One block (or the index, or an error) on the device's blocks topic: 12-byte header + payload."""

    status: BlockStatus
    block: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return _HEADER.pack(MAGIC, self.status, self.block, len(self.payload)) + self.payload

    @classmethod
    def decode(cls, raw: bytes, topic: str = "") -> BlockResponse:
        where = topic or "block response"
        if len(raw) < HEADER_SIZE:
            raise ProtocolError(f"{where}: {len(raw)} bytes is shorter than the block header")
        magic, status, block, length = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ProtocolError(f"{where}: bad magic {magic!r} (expected {MAGIC!r})")
        try:
            code = BlockStatus(status)
        except ValueError:
            raise ProtocolError(f"{where}: unknown status {status}") from None
        if length != len(raw) - HEADER_SIZE:
            raise ProtocolError(f"{where}: header says {length} payload bytes, got {len(raw) - HEADER_SIZE}")
        return cls(code, block, bytes(memoryview(raw)[HEADER_SIZE:]))


def block_digests(path: str | Path, block_size: int = BLOCK_SIZE) -> list[bytes]:
    """The block index of a file: raw sha256 of each ``block_size`` slice (the last may be short)."""
    digests = []
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digests.append(hashlib.sha256(block).digest())
    return digests


def index_digest(digests: list[bytes] | bytes) -> str:
    """``blocks_digest``: sha256 hex over the concatenated raw block digests."""
    raw = digests if isinstance(digests, bytes) else b"".join(digests)
    return hashlib.sha256(raw).hexdigest()
