#!/usr/bin/env bash
# Single entry point for developers, the README and CI.
#
#   bash scripts/dev.sh setup          create/update .venv (idempotent, fast when up to date)
#   bash scripts/dev.sh demo  [args]   setup, then run diffpose-demo (bundled chest CT)
#   bash scripts/dev.sh test  [args]   setup, ruff (lint + format check), then pytest on test/ (args go to pytest)
#   bash scripts/dev.sh bench [args]   setup, then every benchmarks/bench_*.py (args go to each)
#   bash scripts/dev.sh cpu-paths [args]  setup, then the core tests again on each narrower CPU code path
#
# Environment:
#   DIFFPOSE_PYTHON   interpreter used to create .venv (default: python3.11, else python3; >= 3.10)
#   DIFFPOSE_FORCE_SETUP=1   reinstall even if the stamp says .venv is up to date
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV=".venv"
PY="$VENV/bin/python"
STAMP="$VENV/.diffpose_setup_stamp"

log() { printf '[dev.sh] %s\n' "$*" >&2; }
die() { printf '[dev.sh] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Files whose content decides what setup installs; a change to any of them
# re-runs the install steps.
stamp_inputs() {
    local f
    for f in requirements/*.txt setup.py setup.cfg package.xml scripts/dev.sh \
             scripts/install_ros2_wheels.sh; do
        if [[ -f $f ]]; then printf '%s\n' "$f"; fi
    done
    if [[ -d ros2_interfaces ]]; then
        find ros2_interfaces -type f | LC_ALL=C sort
    fi
}

setup_hash() {
    {
        "$PY" -c 'import sys; print(sys.version)'
        stamp_inputs | while IFS= read -r f; do sha256sum -- "$f"; done
    } | sha256sum | cut -d' ' -f1
}

find_python() {
    local cand
    for cand in "${DIFFPOSE_PYTHON:-}" python3.11 python3; do
        [[ -n $cand ]] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
            printf '%s\n' "$cand"
            return 0
        fi
    done
    return 1
}

pip_install() {
    "$PY" -m pip install --quiet --progress-bar off "$@"
}

# An editable install leaves out setup.py's data_files: register the package in the venv as colcon
# would (ament index marker, share/diffpose_ros, lib/diffpose_ros executables), linked to this
# checkout, so that `ros2 run`/`ros2 launch` find it with AMENT_PREFIX_PATH holding the venv.
register_in_venv() {
    local share="$VENV/share/diffpose_ros" index="$VENV/share/ament_index/resource_index/packages"
    local lib="$VENV/lib/diffpose_ros" item exe
    mkdir -p "$share" "$index" "$lib"
    : >"$index/diffpose_ros"
    for item in package.xml config launch; do ln -sfn "$ROOT/$item" "$share/$item"; done
    for exe in diffpose_node diffpose_igtl; do ln -sfn "../../bin/$exe" "$lib/$exe"; done
}

cmd_setup() {
    local start=$SECONDS

    # A .venv whose python no longer runs (moved, interpreter removed) is rebuilt.
    if [[ -e $VENV ]] && ! "$PY" -c 'import sys' >/dev/null 2>&1; then
        log "$VENV is broken; recreating it"
        rm -rf -- "$VENV"
    fi

    if [[ ! -x $PY ]]; then
        local base
        base="$(find_python)" || die "Python >= 3.10 not found on PATH (python3.11 preferred; set DIFFPOSE_PYTHON to choose one)"
        log "creating $VENV with $base ($("$base" -c 'import sys; print(sys.version.split()[0])'))"
        "$base" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' ||
            log "warning: torch==2.14.1 is available locally for Python 3.11 only; other versions download it"
        "$base" -m venv "$VENV" || die "'$base -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi

    local want
    want="$(setup_hash)"
    if [[ ${DIFFPOSE_FORCE_SETUP:-0} != 1 && -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
        log "$VENV is up to date"
        return 0
    fi
    rm -f -- "$STAMP"

    log "upgrading pip"
    pip_install --upgrade pip

    # diffdrr is installed with --no-deps, so pip may print "ERROR: ... diffdrr
    # 0.6.1 requires pyvista[all]/seaborn/imageio, which is not installed":
    # expected and harmless (those are only for diffdrr's plotting helpers).
    log "installing requirements/dev.txt + DiffDRR import deps (torch is large; first time takes minutes)"
    pip_install -r requirements/dev.txt -r requirements/diffdrr.txt

    log "installing diffdrr without its declared dependencies"
    pip_install --no-deps -r requirements/diffdrr-nodeps.txt

    log "installing colcon into $VENV/colcon (requirements/colcon.txt; only for the colcon test)"
    rm -rf -- "$VENV/colcon"
    pip_install --target "$VENV/colcon" -r requirements/colcon.txt

    log "installing diffpose_ros (editable)"
    # PYTHONWARNINGS silences setuptools' generic "Editable installation" banner.
    PYTHONWARNINGS=ignore pip_install -e .

    register_in_venv

    # ---- HOOK: ROS 2 Python runtime from wheels (maintained separately) ----
    # Runs only if the script exists and is executable; it is a no-op where a
    # real ROS 2 install is sourced.
    if [[ -x scripts/install_ros2_wheels.sh ]]; then
        log "installing ROS 2 Python wheels (scripts/install_ros2_wheels.sh)"
        scripts/install_ros2_wheels.sh "$VENV"
    fi
    # ---- end HOOK ----

    printf '%s\n' "$want" >"$STAMP"
    log "setup done in $((SECONDS - start)) s"
}

# The nodes' Fast DDS profile asks for 4 MiB socket receive buffers (large frames over UDP); Linux
# grants them only up to net.core.rmem_max. As root (CI), raise a smaller limit for the DDS tests.
raise_socket_buffer_limit() {
    local want=4194304 have
    have=$(cat /proc/sys/net/core/rmem_max 2>/dev/null) || return 0
    ((have >= want)) && return 0
    if [[ $(id -u) == 0 ]] && sysctl -q -w net.core.rmem_max=$want 2>/dev/null; then
        log "net.core.rmem_max raised from $have to $want (the nodes' large-frame buffers)"
    else
        log "warning: net.core.rmem_max is $have (< $want): the large-frame DDS tests skip (see README)"
    fi
}

cmd_test() {
    [[ -d test ]] || die "no test/ directory"
    raise_socket_buffer_limit
    log "ruff: lint and format check (ruff.toml)"
    "$VENV/bin/ruff" check . || die "ruff check found problems (fix them, or 'ruff check --fix .')"
    "$VENV/bin/ruff" format --check . || die "ruff format would change files (run '$VENV/bin/ruff format .')"
    local rc=0
    "$PY" -m pytest -q test "$@" || rc=$?
    case $rc in
        0) ;;
        5) log "ERROR: pytest collected no tests (exit 5)" ;;
        *) log "pytest failed (exit $rc)" ;;
    esac
    return "$rc"
}

cmd_bench() {
    shopt -s nullglob
    local benches=(benchmarks/bench_*.py)
    shopt -u nullglob
    if ((${#benches[@]} == 0)); then
        log "no benchmarks/bench_*.py found"
        return 0
    fi
    local b failed=0
    for b in "${benches[@]}"; do
        log "running $b"
        "$PY" "$b" "$@" || { log "$b failed (exit $?)"; failed=1; }
    done
    return "$failed"
}

# Rounding differs between the CPUs that CI meets (AVX-512 with AMX, Zen 4, Zen 5, AVX2 only). This
# runs test/core once per narrower code path this CPU can take: torch's kernels chosen by
# ATEN_CPU_CAPABILITY and numba's by NUMBA_CPU_NAME (AVX2 as on an AVX2-only EPYC; baseline x86-64).
# Not part of the test command: run it before a stop whenever numerics changed.
cmd_cpu_paths() {
    local paths=("avx2 haswell" "default generic") path aten cpu failed=0
    for path in "${paths[@]}"; do
        read -r aten cpu <<<"$path"
        log "test/core with ATEN_CPU_CAPABILITY=$aten NUMBA_CPU_NAME=$cpu"
        ATEN_CPU_CAPABILITY=$aten NUMBA_CPU_NAME=$cpu "$PY" -c \
            'import torch; print("[dev.sh] torch CPU capability:", torch.backends.cpu.get_cpu_capability())' >&2
        ATEN_CPU_CAPABILITY=$aten NUMBA_CPU_NAME=$cpu "$PY" -m pytest -q test/core "$@" ||
            { log "test/core failed with ATEN_CPU_CAPABILITY=$aten NUMBA_CPU_NAME=$cpu"; failed=1; }
    done
    return "$failed"
}

main() {
    (($# >= 1)) || usage
    local cmd=$1
    shift
    case $cmd in
        setup) cmd_setup ;;
        demo)
            cmd_setup
            exec "$VENV/bin/diffpose-demo" "$@"
            ;;
        test)
            cmd_setup
            cmd_test "$@"
            ;;
        bench)
            cmd_setup
            cmd_bench "$@"
            ;;
        cpu-paths)
            cmd_setup
            cmd_cpu_paths "$@"
            ;;
        -h | --help | help) usage ;;
        *) log "unknown command: $cmd"; usage ;;
    esac
}

main "$@"
