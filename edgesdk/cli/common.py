"""What every CLI command shares: the console, one-line errors, and --json output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from edgesdk.errors import EdgeError

console = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, tables and messages: stderr
out = Console(highlight=False, soft_wrap=True)  # results meant for stdout (tables, --json)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn an EdgeError into one red line on stderr and the error's exit code; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgeError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
