"""Read a YAML config file with errors that name the file and, for broken YAML, the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgesdk.errors import ConfigError


def load_yaml_file(path: str | Path, what: str) -> Any:
    """Parsed YAML of ``path``; ConfigError ("PATH: WHAT file not found", "PATH: broken YAML (line …)")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: broken YAML{where}: {problem}") from None
