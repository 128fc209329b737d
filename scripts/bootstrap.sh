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

# Build an interface package into the venv, only when its sources changed: ovseg_interfaces (msg/), and for the
# tests a vision_msgs with upstream's field lists (no wheel of it exists; robots install ros-DISTRO-vision-msgs).
build_interfaces() {
  local name="$1" src="$2"
  local stamp="$VENV/.ovseg-$name.sha256" want build
  want="$( (cd "$src" && find . -type f \( -name '*.msg' -o -name '*.srv' -o -name '*.cmake' -o -name CMakeLists.txt \
    -o -name package.xml \) | sort | xargs sha256sum; sha256sum "$ROOT/msg/cmake/wheel_python_includes.cmake") \
    | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$VENV/bin/python" -c "import $name.msg" 2>/dev/null; then
    log "$name already built"
    return
  fi
  log "building $name into the venv"
  build="$ROOT/build/$name"
  rm -rf "$build"; mkdir -p "$build"
  (
    export PATH="$VENV/bin:$PATH" AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
    cmake -S "$src" -B "$build" -DCMAKE_INSTALL_PREFIX="$VENV" -DBUILD_TESTING=OFF \
      -DPython3_EXECUTABLE="$VENV/bin/python" -DCMAKE_BUILD_TYPE=Release > "$build.log" 2>&1 \
      && cmake --build "$build" -j "$(nproc)" >> "$build.log" 2>&1 \
      && cmake --install "$build" >> "$build.log" 2>&1
  ) || { log "$name build failed; see $build.log"; tail -n 40 "$build.log"; exit 1; }
  echo "$want" > "$stamp"
}
build_interfaces ovseg_interfaces msg
build_interfaces vision_msgs tests/interfaces/vision_msgs

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
