"""How the pipeline reports progress: a small protocol the CLI renders with rich, tests silence."""

from __future__ import annotations

from typing import Protocol


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
