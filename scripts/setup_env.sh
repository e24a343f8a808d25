#!/usr/bin/env bash
# Shared set-up for scripts/demo.sh and scripts/test.sh on a fresh Debian machine with Python 3.11:
# a venv in .venv with edgesdk[host,agent,litert,fleet,dev] installed, and Mosquitto (apt-get if missing).
# Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGESDK_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "==> installing mosquitto (Debian package)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
  # The Debian package starts a system broker on :1883; we start our own on free ports.
  $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.edgesdk-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "==> installing edgesdk[host,agent,litert,fleet,dev] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[host,agent,litert,dev]"
  touch "$STAMP"
fi
