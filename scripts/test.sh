#!/usr/bin/env bash
# The README's test command: set up (idempotent), lint, then every test (multi-process ROS 2 tests included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
echo "[test] ruff check"
.venv/bin/ruff check .
if [ "${1:-}" = "--fast" ]; then  # the ROS-free unit tests only (no DDS, no processes): seconds
  shift
  echo "[test] pytest tests/unit"
  exec .venv/bin/python -m pytest -q -ra tests/unit "$@"
fi
echo "[test] pytest"
.venv/bin/python -m pytest -q -ra tests "$@"
