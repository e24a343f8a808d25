"""Reading .npz data in a threaded process: one lock around numpy's header parser.

numpy parses every .npy header with ``ast.literal_eval``, i.e. ``compile()``. CPython 3.11 (3.11.7
here) can fail ``compile()`` running in two threads at once with "SystemError: AST constructor
recursion depth mismatch" (it happened in the local API's concurrent-caller tests: the server's
workers decoding request bodies while client threads decoded answers). Every .npz read of the
agent — API bodies, client answers, reference data — holds `NPY_READ_LOCK`. The work under it is
header parsing and a copy of the arrays at memory speed (~10 ms for 64 MiB), small next to an
inference, which stays concurrent.
"""

from __future__ import annotations

import threading
from typing import IO

import numpy as np

NPY_READ_LOCK = threading.Lock()


def read_npz(source: str | IO[bytes]) -> dict[str, np.ndarray]:
    """Every array of an .npz (path or binary file), loaded, without pickles, under the lock."""
    with NPY_READ_LOCK, np.load(source, allow_pickle=False) as data:
        return {name: np.asarray(data[name]) for name in data.files}
