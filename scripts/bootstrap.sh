#!/usr/bin/env bash
# One idempotent set-up for a bare Debian 12 / Ubuntu machine with Python >= 3.10 and no ROS:
# creates .venv with ROS 2 Kilted wheels, the model stack, builds ovseg_interfaces into it and installs ovseg_ros.
# A second run only checks what is there (seconds). On a robot with ROS 2 from apt use colcon instead (README).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OVSEG_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
cd "$ROOT"

log() { printf '[bootstrap] %s\n' "$*"; }
quiet_pip() {  # pip, minus the noise of unreachable local find-links some machines configure
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi

# Requirements are installed only when their files changed since the last successful install.
stamp="$VENV/.ovseg-requirements.sha256"
want="$(cat scripts/requirements-ros.txt scripts/requirements.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned requirements (first run: several minutes, ~6 GB with torch's CUDA libraries)"
  quiet_pip install -q --upgrade pip
  quiet_pip install -q -r scripts/requirements-ros.txt -r scripts/requirements.txt
  echo "$want" > "$stamp"
else
  log "requirements already installed"
fi

# Build ovseg_interfaces (msg/) into the venv, only when the interface sources changed.
istamp="$VENV/.ovseg-interfaces.sha256"
iwant="$( (cd msg && find . -type f \( -name '*.msg' -o -name '*.srv' -o -name CMakeLists.txt -o -name package.xml \) \
  | sort | xargs sha256sum) | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$istamp" 2>/dev/null)" != "$iwant" ] || ! "$VENV/bin/python" -c "import ovseg_interfaces.msg" 2>/dev/null; then
  log "building ovseg_interfaces into the venv"
  build="$ROOT/build/ovseg_interfaces"
  rm -rf "$build"; mkdir -p "$build"
  (
    export PATH="$VENV/bin:$PATH" AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
    cmake -S msg -B "$build" -DCMAKE_INSTALL_PREFIX="$VENV" -DBUILD_TESTING=OFF \
      -DPython3_EXECUTABLE="$VENV/bin/python" -DCMAKE_BUILD_TYPE=Release > "$build.log" 2>&1 \
      && cmake --build "$build" -j "$(nproc)" >> "$build.log" 2>&1 \
      && cmake --install "$build" >> "$build.log" 2>&1
  ) || { log "interface build failed; see $build.log"; tail -n 40 "$build.log"; exit 1; }
  echo "$iwant" > "$istamp"
else
  log "ovseg_interfaces already built"
fi

# The package itself, editable so a checkout's edits are live.
if ! "$VENV/bin/python" -c "import ovseg_ros" 2>/dev/null \
   || [ setup.py -nt "$VENV/.ovseg-package.stamp" ]; then
  log "installing ovseg_ros (editable)"
  quiet_pip install -q --no-deps --no-build-isolation -e .
  touch "$VENV/.ovseg-package.stamp"
else
  log "ovseg_ros already installed"
fi
log "ready: $VENV"
