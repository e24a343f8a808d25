"""The local inference API's binary tensor framing, ``application/x-edgesdk-tensors`` (version 1;
docs/protocol.md, "Local inference API"): what `agent.client` sends and `agent.api` decodes.

The framing (``TENSORS_TYPE``, version 1; docs/protocol.md, "Local inference API"), integers
little-endian:

    offset  size  field
    0       4     magic b"EDT1"
    4       4     u32 tensor count n (0..1024)
    then n tensors, one after another:
            2     u16 name length L (1..1024), then L bytes of UTF-8 name (unique in the body)
            1     u8 dtype, an ONNX TensorProto.DataType code (``DTYPE_CODES``)
            1     u8 rank r (0..32), then r u64 dims
            0..7  zero bytes, so that the data starts at a multiple of 8 from the body's start
            N     the data, C order: N = product(dims) * item size
    and nothing after the last tensor.

Decoding makes no copy (each array is a view of the body) and no pickle: for a 588 KiB input it
takes 3 µs and encoding 20 µs, where npz took 0.8 and 0.5 ms (0.25 and 0.05 ms for 8 KiB).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgesdk.errors import EdgeError

TENSORS_TYPE = "application/x-edgesdk-tensors"
_MAGIC = b"EDT1"
_COUNT = struct.Struct("<4sI")
_NAME = struct.Struct("<H")
_KIND = struct.Struct("<BB")
MAX_TENSORS = 1024
MAX_NAME_BYTES = 1024
MAX_RANK = 32
ALIGN = 8  # data offsets, from the body's start: a view of an aligned buffer is then aligned
# ONNX TensorProto.DataType codes, so a client in any language can use the table it already has.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("u1"), 3: np.dtype("i1"), 4: np.dtype("<u2"), 5: np.dtype("<i2"),
    6: np.dtype("<i4"), 7: np.dtype("<i8"), 9: np.dtype("?"), 10: np.dtype("<f2"), 11: np.dtype("<f8"),
    12: np.dtype("<u4"), 13: np.dtype("<u8"),
}
_CODE_OF = {dtype.newbyteorder("="): code for code, dtype in DTYPE_CODES.items()}


class TensorFrameError(EdgeError, ValueError):
    """Bytes that are not valid application/x-edgesdk-tensors, or a tensor the framing cannot
    carry; the message is one line."""


def encode_tensors(tensors: Mapping[str, Any]) -> bytes:
    """Tensors by name -> one application/x-edgesdk-tensors body (arrays converted to C order and
    little-endian as needed). TensorFrameError for a dtype the framing has no code for."""
    if len(tensors) > MAX_TENSORS:
        raise TensorFrameError(f"{len(tensors)} tensors; the framing carries at most {MAX_TENSORS}")
    parts: list[bytes | memoryview] = [_COUNT.pack(_MAGIC, len(tensors))]
    offset = _COUNT.size
    for name, value in tensors.items():
        arr = np.asarray(value)
        code = _CODE_OF.get(arr.dtype.newbyteorder("="))
        if code is None:
            raise TensorFrameError(f"tensor {str(name)[:64]!r} has dtype {arr.dtype}, which "
                                   f"{TENSORS_TYPE} cannot carry (use JSON)")
        if arr.ndim > MAX_RANK:
            raise TensorFrameError(f"tensor {str(name)[:64]!r} has rank {arr.ndim}; at most {MAX_RANK}")
        raw_name = str(name).encode("utf-8")
        if not 1 <= len(raw_name) <= MAX_NAME_BYTES:
            raise TensorFrameError(f"tensor name of {len(raw_name)} bytes; 1..{MAX_NAME_BYTES} allowed")
        want = DTYPE_CODES[code]
        if arr.dtype != want or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=want)
        head = (_NAME.pack(len(raw_name)) + raw_name + _KIND.pack(code, arr.ndim)
                + struct.pack(f"<{arr.ndim}Q", *arr.shape))
        offset += len(head)
        pad = -offset % ALIGN
        parts += [head, bytes(pad), memoryview(arr).cast("B") if arr.size else b""]
        offset += pad + arr.nbytes
    return b"".join(parts)


def decode_tensors(body: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """One application/x-edgesdk-tensors body -> arrays by name, views of ``body`` (no copy).
    Anything malformed is a TensorFrameError with one line, never another exception."""
    view = memoryview(body).cast("B")
    size = len(view)
    if size < _COUNT.size:
        raise TensorFrameError(f"body of {size} bytes is shorter than the {_COUNT.size}-byte header")
    magic, count = _COUNT.unpack_from(view)
    if magic != _MAGIC:
        raise TensorFrameError(f"bad magic {bytes(magic)!r} (expected {_MAGIC!r})")
    if count > MAX_TENSORS:
        raise TensorFrameError(f"{count} tensors; at most {MAX_TENSORS}")
    out: dict[str, np.ndarray] = {}
    pos = _COUNT.size
    for i in range(count):
        where = f"tensor {i}"
        if pos + _NAME.size > size:
            raise TensorFrameError(f"{where}: body ends inside its header (at byte {pos})")
        (length,) = _NAME.unpack_from(view, pos)
        pos += _NAME.size
        if not 1 <= length <= MAX_NAME_BYTES or pos + length + _KIND.size > size:
            raise TensorFrameError(f"{where}: name length {length} is outside 1..{MAX_NAME_BYTES} or past the body")
        try:
            name = str(view[pos:pos + length], "utf-8")
        except UnicodeDecodeError:
            raise TensorFrameError(f"{where}: name is not UTF-8") from None
        pos += length
        where = f"tensor {name[:64]!r}"
        if name in out:
            raise TensorFrameError(f"{where} appears twice")
        code, rank = _KIND.unpack_from(view, pos)
        pos += _KIND.size
        dtype = DTYPE_CODES.get(code)
        if dtype is None:
            raise TensorFrameError(f"{where}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        if rank > MAX_RANK or pos + 8 * rank > size:
            raise TensorFrameError(f"{where}: rank {rank} is over {MAX_RANK} or past the body")
        shape = struct.unpack_from(f"<{rank}Q", view, pos)
        pos += 8 * rank
        pad = -pos % ALIGN
        if pos + pad > size or any(view[pos:pos + pad]):
            raise TensorFrameError(f"{where}: padding before the data is not {pad} zero bytes")
        pos += pad
        elements = 1
        for dim in shape:
            elements *= dim
        nbytes = elements * dtype.itemsize
        if nbytes > size - pos:
            raise TensorFrameError(f"{where}: shape {list(shape)} of {dtype.name} needs {nbytes} bytes; "
                                   f"{size - pos} are left")
        try:
            arr = np.frombuffer(view, dtype, elements, pos).reshape(shape)
        except (ValueError, OverflowError) as exc:  # e.g. a zero dim beside one past numpy's limits
            raise TensorFrameError(f"{where}: shape {list(shape)[:8]} is not usable: {exc}") from None
        if dtype.kind == "b" and elements and arr.view(np.uint8).max() > 1:
            raise TensorFrameError(f"{where}: bool data holds bytes other than 0 and 1")
        if dtype.byteorder == "<" and sys.byteorder == "big":
            arr = arr.astype(dtype.newbyteorder("="))
        out[name] = arr
        pos += nbytes
    if pos != size:
        raise TensorFrameError(f"{size - pos} bytes after the last tensor")
    return out


