#!/usr/bin/env bash
# Build the tf2_msgs interface package into a venv that has the ROS 2 Kilted wheels
# (no ROS distro on PyPI ships tf2_msgs). Usage: tools/build_tf2_msgs.sh .venv
# The wheels' CMake exports carry the include/site-packages paths of the machine that built them;
# they are rewritten to this interpreter's before CMake runs (see shared ROS_ENV notes).
set -euo pipefail
VENV=$(cd "${1:-.venv}" && pwd)
PY="$VENV/bin/python"
HERE=$(cd "$(dirname "$0")" && pwd)
if "$PY" -c 'import tf2_msgs.msg' 2>/dev/null; then echo "tf2_msgs already importable"; exit 0; fi
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null | while read -r f; do
  sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#$INC#g" \
         -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages#$SITE#g" "$f"
done
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
export LD_LIBRARY_PATH="$VENV/lib:${LD_LIBRARY_PATH:-}" PYTHONPATH="$SITE"
cmake -S "$HERE/tf2_msgs" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >"$BUILD/cmake.log" 2>&1 \
  || { tail -40 "$BUILD/cmake.log"; exit 1; }
make -C "$BUILD" -j2 install >"$BUILD/make.log" 2>&1 || { tail -40 "$BUILD/make.log"; exit 1; }
env -i PATH=/usr/bin:/bin "$PY" -c 'from tf2_msgs.msg import TFMessage; TFMessage()' \
  && echo "tf2_msgs built into $VENV"
