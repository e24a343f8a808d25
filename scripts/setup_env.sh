#!/usr/bin/env bash
# Shared set-up for scripts/demo.sh and scripts/test.sh on a fresh Debian machine with Python 3.11:
# a venv in .venv with edgesdk[host,agent,litert,fleet,dev] installed, and the Debian packages the
# demo and the tests start themselves: mosquitto, postgresql (the fleet store's server) and
# chromium (the HTML report is checked in a real headless browser), each with apt-get if missing.
# Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGESDK_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
MISSING=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then MISSING+=(mosquitto); fi
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  MISSING+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1; then MISSING+=(chromium); fi
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "==> installing ${MISSING[*]} (Debian packages)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}" >/dev/null
  # The packages start system services (a broker on :1883, a database cluster on :5432); the
  # tests and the demo start their own on free loopback ports.
  $SUDO systemctl disable --now mosquitto postgresql >/dev/null 2>&1 || true
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.edgesdk-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "==> installing edgesdk[host,agent,litert,fleet,dev] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[host,agent,litert,fleet,dev]"
  touch "$STAMP"
fi
