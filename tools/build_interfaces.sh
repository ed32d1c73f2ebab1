#!/usr/bin/env bash
# Build ROS 2 interface packages (msg/srv, C/C++ generated code: no wheel exists) into a venv that has
# the ROS 2 Kilted wheels, with cmake and the rosidl generators installed there.
# Usage: tools/build_interfaces.sh .venv SRC_DIR [SRC_DIR ...]
#   e.g. tools/build_interfaces.sh .venv tools/tf2_msgs ../shared/ros/composition_interfaces
# A package whose every message/service already imports and constructs is skipped (idempotent).
# The wheels' CMake exports carry the include/site-packages paths of the machine that built them;
# they are rewritten to this interpreter's before CMake runs (see shared ROS_ENV notes).
set -euo pipefail
VENV=$(cd "${1:-.venv}" && pwd)
shift
[ $# -gt 0 ] || { echo "usage: $0 VENV SRC_DIR [SRC_DIR ...]" >&2; exit 2; }
PY="$VENV/bin/python"
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# `import PKG.msg` / `PKG.srv` and construct every type the source defines, in a clean environment.
check() {  # check SRC_DIR PKG
  env -i PATH=/usr/bin:/bin "$PY" - "$1" "$2" <<'PYEOF'
import importlib, pathlib, sys
src, pkg = pathlib.Path(sys.argv[1]), sys.argv[2]
for kind in ('msg', 'srv'):
    for f in sorted((src / kind).glob(f'*.{kind}')):
        t = getattr(importlib.import_module(f'{pkg}.{kind}'), f.stem)
        t() if kind == 'msg' else (t.Request(), t.Response())
PYEOF
}

fixed=0
for SRC in "$@"; do
  SRC=$(cd "$SRC" && pwd)
  PKG=$(sed -n 's:.*<name>\(.*\)</name>.*:\1:p' "$SRC/package.xml" | head -1)
  if check "$SRC" "$PKG" 2>/dev/null; then echo "$PKG already importable"; continue; fi
  if [ $fixed = 0 ]; then
    grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null | while read -r f; do
      sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#$INC#g" \
             -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages#$SITE#g" "$f"
    done || true  # grep finds nothing once rewritten
    fixed=1
  fi
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  (
    export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
    export LD_LIBRARY_PATH="$VENV/lib:${LD_LIBRARY_PATH:-}" PYTHONPATH="$SITE"
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" \
      -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >"$BUILD/cmake.log" 2>&1 \
      || { tail -40 "$BUILD/cmake.log"; exit 1; }
    make -C "$BUILD" -j2 install >"$BUILD/make.log" 2>&1 || { tail -40 "$BUILD/make.log"; exit 1; }
  )
  check "$SRC" "$PKG" && echo "$PKG built into $VENV"
  rm -rf "$BUILD"
done
