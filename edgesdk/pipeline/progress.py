"""How the pipeline reports progress: a small protocol the CLI renders with rich, tests silence,
and the timeline of passes (seconds each) that the manifest, `--json` and the CLI show."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


class Reporter(Protocol):
    def begin(self, step: str) -> None: ...

    def end(self, step: str, detail: str = "") -> None: ...

    def warn(self, message: str) -> None: ...

    def info(self, message: str) -> None: ...


class SilentReporter:
    """Collects warnings and info lines; prints nothing (tests, library use)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.lines: list[str] = []

    def begin(self, step: str) -> None:
        self.lines.append(f"begin {step}")

    def end(self, step: str, detail: str = "") -> None:
        self.lines.append(f"end {step} {detail}".rstrip())

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def info(self, message: str) -> None:
        self.lines.append(message)


@dataclass(frozen=True)
class PassTime:
    """One pass of the pipeline (or one variant kind inside the `variants` pass) and its wall time.

    ``within``: the pass this one ran inside ("variants" for each kind); its seconds are part of
    that pass's, so a total adds only the entries without ``within``.
    """

    name: str
    seconds: float
    detail: str = ""
    within: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def timeline_record(timeline: list[PassTime]) -> dict[str, Any]:
    """The manifest's ``host.packaging`` record: every pass with its seconds, and their total."""
    total = sum(t.seconds for t in timeline if t.within is None)
    return {"passes": [t.to_dict() for t in timeline], "total_s": round(total, 2)}


def timeline_line(timeline: list[PassTime], min_s: float = 0.05) -> str:
    """One line for people: the top-level passes in order with their seconds, leaving out those
    under ``min_s`` (bookkeeping), and the total of all of them."""
    rows = [t for t in timeline if t.within is None]
    total = sum(t.seconds for t in rows)
    shown = " · ".join(f"{t.name} {t.seconds:.1f}s" for t in rows if t.seconds >= min_s)
    return f"{shown} — total {total:.1f}s" if shown else f"total {total:.1f}s"
