"""Per-window summaries of what a model answered, per output: ``extra["outputs"]`` of a telemetry window.

The agent summarizes the outputs of (a budgeted share of) its inference calls; a fleet collector
merges windows across time and devices and compares releases (a rollout's output-drift gate).
On the wire, per output name::

    {"calls": 120,            # calls whose outputs were summarized (<= the window's count)
     "count": 1200,           # finite values summarized: every element of the output over those calls
     "mean": 0.13, "std": 0.9, # of those values (population std); null when count == 0
     "nonfinite": 0,          # NaN/±inf values seen (and |x| > 1e100), left out of mean/std
     "argmax": {"3": 118, "7": 2}}   # classifier-like outputs only: rows per argmax class index

"Classifier-like" is a float output of rank 1 or 2 whose last dimension C is 2..1000; each row
(rank 2: each batch row) counts one for its argmax class (rows holding a NaN are not counted).
Merging is exact up to float rounding: a summary keeps count, mean and M2 (sum of squared
deviations) and merges with Chan's parallel formula, so merging two summaries gives what
summarizing both calls' values together would (never sum/sum-of-squares, which cancels badly).

`OutputSummary.from_dict` reads *untrusted* JSON (any device can send anything) and raises one
`ProtocolError` line; `parse_window_outputs` reads a window's ``extra`` leniently (a malformed
entry is dropped and logged at debug level). The older 3-key form ``{"count", "mean", "std"}``
the simulator sends is accepted (calls = count, nonfinite = 0, no argmax).

Light like the rest of `edgesdk.protocol`: numpy is imported only where arrays are summarized, so
parsing and merging need the standard library alone.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from edgesdk.errors import ProtocolError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

MIN_CLASSES = 2  # a last dimension of 1 is a score, not a choice between classes
MAX_CLASSES = 1000  # ImageNet-sized heads; wider last dims are features or boxes, not classes
MAX_OUTPUTS_PER_MODEL = 16  # the agent summarizes at most this many outputs (first by sorted name)
MAX_OUTPUTS_PER_WINDOW = 64  # a reader keeps at most this many outputs of one window
MAX_NAME_CHARS = 256  # longer output names are dropped by a reader
# A window's argmax histograms hold at most this many classes in all (~12 bytes of JSON each): with
# 16 outputs of 1000 classes the window would near the 256 KiB message limit and be refused whole.
MAX_ARGMAX_CLASSES_PER_WINDOW = 4000
MAX_COUNT = 2 ** 53  # counts beyond this lose integer precision in JSON readers that use doubles
# Values beyond ±1e100 count as non-finite: their squares (and M2 over up to 2**53 of them) must stay
# finite doubles, or one absurd value would make the whole summary unrepresentable in JSON.
MAX_ABS = 1e100
_CLASS_KEY = re.compile(r"(?:0|[1-9][0-9]{0,2})")  # "0" .. "999": class indices below MAX_CLASSES
_SMALL = 32  # outputs of at most this many values are summarized in Python floats (measured crossover ~40)
_CHUNK = 1 << 16  # larger outputs are summarized in chunks this long (see _moments_large)


class OutputSummary:
    """Count, mean, M2, non-finite count and argmax histogram of one output over some calls (mutable)."""

    __slots__ = ("calls", "count", "_mean", "_m2", "nonfinite", "argmax")

    def __init__(self, calls: int = 0, count: int = 0, mean: float = 0.0, m2: float = 0.0, nonfinite: int = 0,
                 argmax: Mapping[int, int] | None = None) -> None:
        self.calls = calls
        self.count = count
        self._mean = mean if count else 0.0
        self._m2 = m2 if count else 0.0
        self.nonfinite = nonfinite
        self.argmax: dict[int, int] = dict(argmax or {})  # class index -> rows

    # -- statistics -----------------------------------------------------------------------------
    @property
    def mean(self) -> float | None:
        return self._mean if self.count else None

    @property
    def std(self) -> float | None:
        """Population standard deviation of the finite values; None when there are none."""
        return math.sqrt(max(self._m2, 0.0) / self.count) if self.count else None

    @property
    def m2(self) -> float:
        """Sum of squared deviations from the mean (what merges exactly)."""
        return self._m2

    def _absorb(self, count: int, mean: float, m2: float) -> None:
        """Chan et al.'s parallel update: fold (count, mean, m2) of other values into this summary."""
        if count == 0:
            return
        if self.count == 0:
            self.count, self._mean, self._m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self._mean
        self._mean += delta * (count / total)
        self._m2 += m2 + delta * delta * (self.count / total) * count
        self.count = total

    def add(self, array: np.ndarray) -> None:
        """Summarize one call's value of this output (a numeric array); ValueError if not numeric."""
        import numpy as np

        arr = np.asarray(array)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"cannot summarize an output of dtype {arr.dtype.name}")
        self._add(arr)

    def _add(self, arr: np.ndarray) -> None:
        count, mean, m2, nonfinite = _moments(arr.reshape(-1))
        self.calls += 1
        self.nonfinite += nonfinite
        self._absorb(count, mean, m2)
        if is_classifier_like(arr):
            _count_argmax(arr, nonfinite > 0, self.argmax)

    def merge(self, other: OutputSummary) -> None:
        """Fold ``other`` (the same output over other calls) into this summary."""
        self.calls += other.calls
        self.nonfinite += other.nonfinite
        self._absorb(other.count, other._mean, other._m2)
        for index, rows in other.argmax.items():
            self.argmax[index] = self.argmax.get(index, 0) + rows

    def copy(self) -> OutputSummary:
        return OutputSummary(self.calls, self.count, self._mean, self._m2, self.nonfinite, self.argmax)

    # -- wire format ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see the module docstring); ``argmax`` only when some row was counted."""
        data: dict[str, Any] = {"calls": self.calls, "count": self.count, "mean": self.mean, "std": self.std,
                                "nonfinite": self.nonfinite}
        if self.argmax:
            data["argmax"] = {str(index): self.argmax[index] for index in sorted(self.argmax)}
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> OutputSummary:
        """Read one output's summary from untrusted JSON; ProtocolError (one line naming ``where``)."""
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{where}: expected an object, got {_kind(data)}")
        count = _count(data, "count", where)
        calls = _count(data, "calls", where, default=count)
        nonfinite = _count(data, "nonfinite", where, default=0)
        mean = _number(data, "mean", where, count)
        std = _number(data, "std", where, count)
        if std < 0:
            raise ProtocolError(f"{where}: 'std' must not be negative")
        argmax = _argmax(data.get("argmax"), where)
        return cls(calls, count, mean, std * std * count, nonfinite, argmax)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutputSummary):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"OutputSummary({self.to_dict()!r})"


# -- summarizing arrays ---------------------------------------------------------------------------
def is_classifier_like(arr: np.ndarray) -> bool:
    """A float output of rank 1 or 2 whose last dimension is MIN_CLASSES..MAX_CLASSES."""
    return (arr.dtype.kind == "f" and arr.ndim in (1, 2)
            and MIN_CLASSES <= arr.shape[-1] <= MAX_CLASSES and arr.size > 0)


def summarize_outputs(outputs: Mapping[str, Any], limit: int = MAX_OUTPUTS_PER_MODEL) -> dict[str, OutputSummary]:
    """One call's outputs summarized: the first ``limit`` numeric arrays by sorted name (strings,
    sequences and maps a runtime may return are skipped)."""
    import numpy as np

    out: dict[str, OutputSummary] = {}
    for name in sorted(n for n in outputs if isinstance(n, str)):
        if len(out) >= limit:
            break
        value = outputs[name]
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            summary = out[name] = OutputSummary()
            summary._add(value)
    return out


def _moments(flat: np.ndarray) -> tuple[int, float, float, int]:
    """(count, mean, M2, nonfinite) of a 1-D numeric array."""
    import numpy as np

    if flat.size <= _SMALL:
        return _moments_small(flat.tolist())
    if flat.dtype.kind != "f" or flat.dtype.itemsize > 8:
        flat = flat.astype(np.float64)  # bool/int outputs (labels, counts: rare and small), longdouble
    elif flat.dtype.itemsize < 4:
        flat = flat.astype(np.float32)  # float16: no BLAS dot, and too coarse to accumulate in
    with np.errstate(all="ignore"):  # inf - inf, float32 dots that overflow: detected below, not warned
        return _moments_large(flat)


def _moments_small(values: list[float]) -> tuple[int, float, float, int]:
    """_moments of a few values in Python floats: faster than numpy's per-call overhead (4 vs
    11 µs for 10 values on a slow core), and exactly rounded (math.fsum)."""
    n = len(values)
    if not all(-MAX_ABS <= x <= MAX_ABS for x in values):  # NaN fails every comparison
        values = [x for x in values if -MAX_ABS <= x <= MAX_ABS]
    count = len(values)
    if count == 0:
        return 0, 0.0, 0.0, n
    mean = math.fsum(values) / count
    return count, mean, math.fsum((x - mean) * (x - mean) for x in values), n - count


def _moments_large(flat: np.ndarray) -> tuple[int, float, float, int]:
    """One pass over float32/float64 values, shifted by the first chunk's mean: per chunk of 65536,
    d = x - shift into one reused buffer (it stays in cache), then sum(d) and a BLAS dot(d, d), the
    chunk results added in float64, so float32 rounding accumulates over one chunk only. Then
    mean = shift + sum(d)/n and M2 = sum(d^2) - sum(d)^2/n, accurate while the shift is near the
    mean (it is the mean of 65536 of the values). Measured on 700k float32 values: ~0.35 ms,
    against ~0.9 ms for a float32 sum then a separate pass of deviations. A NaN/inf (or a float64
    |x| > MAX_ABS) makes the sums non-finite (or too large), and the values are then filtered."""
    import numpy as np

    n = int(flat.size)
    head = flat[:_CHUNK]
    shift = flat.dtype.type(head.sum() / head.size)
    buffer = np.empty(min(_CHUNK, n), dtype=flat.dtype)
    dev_sum = squares = 0.0
    for start in range(0, n, _CHUNK):
        part = flat[start:start + _CHUNK]
        dev = buffer[:part.size]
        np.subtract(part, shift, out=dev)
        dev_sum += float(dev.sum())
        squares += float(np.dot(dev, dev))
    # Every |x - shift| <= sqrt(squares), so this bound also proves |x| <= MAX_ABS for float64.
    if math.isfinite(squares) and abs(float(shift)) + math.sqrt(squares) <= MAX_ABS:
        return n, float(shift) + dev_sum / n, max(squares - dev_sum * dev_sum / n, 0.0), 0
    return _moments_filtered(flat)


def _moments_filtered(flat: np.ndarray) -> tuple[int, float, float, int]:
    """_moments without the NaN/inf/out-of-range values, two-pass in float64 (where neither the sum
    nor the squares of values within MAX_ABS overflow)."""
    import numpy as np

    keep = np.isfinite(flat)
    keep &= np.abs(flat) <= MAX_ABS
    values = flat[keep].astype(np.float64)
    count = int(values.size)
    if count == 0:
        return 0, 0.0, 0.0, int(flat.size)
    shift = float(values.sum()) / count
    dev = values - shift
    dev_sum = float(dev.sum())
    return (count, shift + dev_sum / count, max(float(np.dot(dev, dev)) - dev_sum * dev_sum / count, 0.0),
            int(flat.size) - count)


def _count_argmax(arr: np.ndarray, has_nonfinite: bool, into: dict[int, int]) -> None:
    import numpy as np

    rows = arr.reshape(-1, arr.shape[-1])
    if has_nonfinite:
        rows = rows[~np.isnan(rows).any(axis=1)]  # np.argmax picks a NaN: no class was chosen
    if rows.shape[0] == 1:
        index = int(rows[0].argmax())
        into[index] = into.get(index, 0) + 1
        return
    if rows.shape[0] == 0:
        return
    counts = np.bincount(rows.argmax(axis=1), minlength=rows.shape[1])
    for index in np.flatnonzero(counts).tolist():
        into[index] = into.get(index, 0) + int(counts[index])


# -- reading untrusted JSON -----------------------------------------------------------------------
def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _count(data: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = data.get(key)
    if value is None and key not in data and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where}: '{key}' must be an integer, got {_kind(value)}")
    if not 0 <= value <= MAX_COUNT:  # compared as ints: a 5000-digit value is refused, never printed
        raise ProtocolError(f"{where}: '{key}' must be in 0..2**53")
    return value


def _number(data: Mapping[str, Any], key: str, where: str, count: int) -> float:
    """A finite number within ±MAX_ABS when ``count`` > 0; null or absent when it is 0."""
    value = data.get(key)
    if count == 0:
        if value is not None:
            raise ProtocolError(f"{where}: '{key}' must be null when 'count' is 0")
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where}: '{key}' must be a number when 'count' > 0, got {_kind(value)}")
    # int or float compared exactly, before float(): float(10**400) would raise OverflowError.
    if not (isinstance(value, int) or math.isfinite(value)) or not -MAX_ABS <= value <= MAX_ABS:
        raise ProtocolError(f"{where}: '{key}' must be a finite number within ±1e100")
    return float(value)


def _argmax(value: Any, where: str) -> dict[int, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{where}: 'argmax' must be an object, got {_kind(value)}")
    if len(value) > MAX_CLASSES:
        raise ProtocolError(f"{where}: 'argmax' has {len(value)} classes, more than {MAX_CLASSES}")
    out: dict[int, int] = {}
    for key, rows in value.items():
        if not isinstance(key, str) or not _CLASS_KEY.fullmatch(key):
            shown = key[:20] if isinstance(key, str) else _kind(key)
            raise ProtocolError(f"{where}: 'argmax' key {shown!r} is not a class index 0..{MAX_CLASSES - 1}")
        if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= MAX_COUNT:
            raise ProtocolError(f"{where}: 'argmax' count of class {key} must be an integer in 0..2**53")
        out[int(key)] = rows
    return out


def window_outputs(summaries: Mapping[str, OutputSummary]) -> dict[str, dict[str, Any]]:
    """The ``extra["outputs"]`` value of a window, by sorted name. Argmax histograms are kept while
    their classes total at most MAX_ARGMAX_CLASSES_PER_WINDOW; a later output's is left out."""
    out: dict[str, dict[str, Any]] = {}
    classes_left = MAX_ARGMAX_CLASSES_PER_WINDOW
    for name in sorted(summaries):
        data = out[name] = summaries[name].to_dict()
        classes = len(data.get("argmax", ()))
        if classes > classes_left:
            del data["argmax"]
        else:
            classes_left -= classes
    return out


def parse_window_outputs(extra: Any, where: str) -> dict[str, OutputSummary]:
    """The output summaries of a received window's ``extra``, leniently: a malformed entry is
    dropped (logged at debug), never raised; no or malformed ``outputs`` gives {}. At most
    MAX_OUTPUTS_PER_WINDOW outputs, the first by sorted name."""
    if not isinstance(extra, Mapping):
        return {}
    raw = extra.get("outputs")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        log.debug("%s: extra.outputs is %s, not an object; ignored", where, _kind(raw))
        return {}
    out: dict[str, OutputSummary] = {}
    names = sorted(n for n in raw if isinstance(n, str))
    for position, name in enumerate(names):
        if len(out) >= MAX_OUTPUTS_PER_WINDOW:
            log.debug("%s: extra.outputs has more than %d outputs; %d ignored", where, MAX_OUTPUTS_PER_WINDOW,
                      len(names) - position)
            break
        if not name or len(name) > MAX_NAME_CHARS:
            log.debug("%s: extra.outputs name of %d characters ignored", where, len(name))
            continue
        try:
            out[name] = OutputSummary.from_dict(raw[name], f"{where}: extra.outputs[{name[:64]!r}]")
        except ProtocolError as exc:
            log.debug("%s; entry ignored", exc)
    return out


def merge_summaries(summaries: Iterable[Mapping[str, OutputSummary]]) -> dict[str, OutputSummary]:
    """Per output name, the merge of every summary given (new objects; the inputs are not changed)."""
    out: dict[str, OutputSummary] = {}
    for by_name in summaries:
        for name, summary in by_name.items():
            have = out.get(name)
            if have is None:
                out[name] = summary.copy()
            else:
                have.merge(summary)
    return out
