#!/usr/bin/env bash
# The README's main-job command: set up (idempotent), then run the node on its embedded demo (synthetic camera).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec .venv/bin/ovseg-demo "$@"
