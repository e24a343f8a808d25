"""Keep what third-party libraries print off the terminal unless asked for (`package --verbose`).

Where that output comes from (onnxruntime 1.32, nncf 3.4, openvino 2026.4), all Python-level writes:

- ``print()`` in ``onnxruntime.quantization.calibrate`` ("Collecting tensor data and making
  histogram ...", "Finding optimal threshold ...", "Number of tensors", "Percentile : ...") → sys.stdout;
- ``logging.warning()`` on the root logger in ``onnxruntime.quantization`` ("Please consider to run
  pre-processing before quantization"), which first installs basicConfig's handler on sys.stderr;
- NNCF's logger, whose handler holds the sys.stdout of the moment nncf was imported, and NNCF's rich
  progress bars ("Statistics collection ━━━", "Applying Fast Bias correction") drawn on rich's global
  console, which writes to sys.stdout (nncf 3.4 has no switch or variable that turns them off);
- ``warnings.warn`` from openvino and torch → sys.stderr.

So while quiet, sys.stdout and sys.stderr are swapped for sinks that keep the last 64 KiB, logging
handlers writing to the terminal are pointed at them, and a failure can quote the last line
(`output_hint`). Our own rich consoles are pinned to the real streams first, so progress still
shows. Output of C++ code straight to file descriptor 1/2 is not caught (a normal run prints none).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

KEEP_CHARS = 64 * 1024  # what a failure can quote from; the rest of a long run's output is dropped
HINT_CHARS = 200
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ThirdPartyOutput:
    """What third-party code wrote while quiet: the last KEEP_CHARS characters, both streams."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._text = ""
        self._dropped = 0  # characters trimmed from the front
        self.out: TextIO = _Sink(self)
        self.err: TextIO = _Sink(self)

    def _append(self, text: str) -> None:
        with self._lock:
            self._text += text
            extra = len(self._text) - KEEP_CHARS
            if extra > 0:
                self._text = self._text[extra:]
                self._dropped += extra

    def mark(self) -> int:
        """A position to ask `since` about: what was written after it."""
        with self._lock:
            return self._dropped + len(self._text)

    def since(self, mark: int = 0) -> str:
        with self._lock:
            return self._text[max(mark - self._dropped, 0):]

    def last_line(self, mark: int = 0) -> str:
        """The last non-empty line written after ``mark``, without colours or control characters."""
        text = _ANSI.sub("", self.since(mark))
        for line in reversed(re.split(r"[\r\n]+", text)):
            line = _CONTROL.sub(" ", line).strip()
            if line:
                return line if len(line) <= HINT_CHARS else line[:HINT_CHARS - 1] + "…"
        return ""


class _Sink(io.TextIOBase):
    """A text stream that appends to a ThirdPartyOutput; never a terminal (so no live redraws)."""

    def __init__(self, capture: ThirdPartyOutput) -> None:
        super().__init__()
        self._capture = capture

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self._capture._append(text)
        return len(text)


_active: ThirdPartyOutput | None = None


def output_mark() -> int:
    """Where the quiet output stands now (0 when not quiet); give it to `output_hint` after a failure."""
    return _active.mark() if _active is not None else 0


def output_hint(mark: int) -> str:
    """For an error message: the last line third-party code wrote (and we hid) since ``mark``, or ""."""
    line = _active.last_line(mark) if _active is not None else ""
    return f" (its last output: {line!r}; run with --verbose for all of it)" if line else ""


def _show_warning(sink: TextIO, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    sink.write(warnings.formatwarning(message, category, filename, lineno, line))


def _unwrap(stream: Any) -> Any:
    # A rich Live display wraps sys.stdout/sys.stderr in a FileProxy; the stream under it is the real one.
    return getattr(stream, "rich_proxied_file", stream)


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.root, *(lg for lg in list(logging.root.manager.loggerDict.values())
                               if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in list(lg.handlers)
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def third_party_quiet(verbose: bool, keep: Sequence[Any] = ()) -> Iterator[ThirdPartyOutput | None]:
    """Around third-party calls: hide (capture) their output, or with ``verbose`` show it on stderr.

    Either way stdout stays clean for results (`--json`). ``keep`` are rich Consoles of ours: they
    are pinned to the stream they write to now, so their output still shows. Yields the capture
    (None when verbose).
    """
    global _active
    entry_out, entry_err = sys.stdout, sys.stderr
    real_out, real_err = _unwrap(entry_out), _unwrap(entry_err)
    # rich keeps the constructor's file in `_file` (None: sys.stdout/sys.stderr when it writes).
    pinned = [(console, vars(console).get("_file")) for console in keep]
    for console, _ in pinned:
        console.file = console.file
    capture = None if verbose else ThirdPartyOutput()
    out_stream, err_stream = (entry_err, entry_err) if capture is None else (capture.out, capture.err)
    # Handlers writing to the terminal: to the streams seen now, or to the process's own (a handler
    # made before a test runner swapped sys.stdout). With verbose only stdout's move (to stderr).
    targets: dict[int, TextIO] = {id(real_out): out_stream, id(sys.__stdout__): out_stream}
    if capture is not None:
        targets |= {id(real_err): err_stream, id(sys.__stderr__): err_stream}
    swapped = []
    for handler in _stream_handlers():
        target = targets.get(id(_unwrap(handler.stream)))
        if target is not None and target is not handler.stream:
            swapped.append((handler, handler.setStream(target)))
    root_handler = None
    if capture is not None and not logging.root.handlers:
        # Else the first logging.warning() of onnxruntime would basicConfig() a handler for good.
        root_handler = logging.StreamHandler(capture.err)
        logging.root.addHandler(root_handler)
    previous, _active = _active, capture
    try:
        with contextlib.redirect_stdout(out_stream), contextlib.redirect_stderr(err_stream), \
                warnings.catch_warnings():
            if capture is not None:
                # Whoever printed warnings before (the default printer, a test runner's recorder):
                # here they are third-party output like the rest.
                warnings.showwarning = functools.partial(_show_warning, capture.err)
            yield capture
    finally:
        _active = previous
        if root_handler is not None:
            logging.root.removeHandler(root_handler)
        for handler, stream in swapped:
            handler.setStream(stream)
        if capture is not None:
            # A handler made while quiet (nncf's, when nncf is first imported here) holds our sink:
            # point it where it would have written.
            # The process's own streams: the ones seen here may be a test runner's, closed later.
            homes = {id(capture.out): sys.__stdout__ or real_out, id(capture.err): sys.__stderr__ or real_err}
            for handler in _stream_handlers():
                if id(handler.stream) in homes:
                    handler.setStream(homes[id(handler.stream)])
        for console, file in pinned:
            console.file = file
