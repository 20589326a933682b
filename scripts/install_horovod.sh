#!/usr/bin/env bash
# Build Horovod from its PyPI source archive into a virtual environment: CPU only, gloo
# controller, PyTorch the only framework (no MPI, TensorFlow or MXNet). The build takes
# 5 minutes on two idle cores (11 on busy ones); the script does nothing when
# `import horovod.torch` already works in the venv.
#
#   scripts/install_horovod.sh                   # into ./.venv
#   VENV=/path/to/venv scripts/install_horovod.sh
#
# Needs a C++17 compiler, cmake >= 3.13 (from PyPI into the venv when the machine has
# none) and torch already installed in the venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Target virtual environment; env.sh exports the same variable.
VENV="${VENV:-$ROOT/.venv}"
# The last Horovod release; the C++17 patch below is written against its CMake files.
HOROVOD_VERSION="0.28.1"
# Parallel compile jobs (setup.py uses make -j8 unless MAKEFLAGS is set).
HOROVOD_BUILD_JOBS="${HOROVOD_BUILD_JOBS:-2}"
# The CMake files that pin the C++ standard, relative to the source root.
CMAKE_FILES=(CMakeLists.txt horovod/torch/CMakeLists.txt)

PYTHON="$VENV/bin/python"
log() { echo "install_horovod: $*" >&2; }
die() { echo "install_horovod: error: $*" >&2; exit 1; }

[[ -x "$PYTHON" ]] || die "no Python at $PYTHON (set VENV to the target virtual environment)"
VENV="$(cd "$VENV" && pwd)"
PYTHON="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"

# Already there: nothing to do.
if "$PYTHON" -c "import horovod.torch" 2>/dev/null; then
    log "horovod.torch already imports in $VENV ($("$PYTHON" -c 'import horovod; print(horovod.__version__)')); nothing to do"
    exit 0
fi

# Prerequisites: torch in the venv, a compiler, cmake, setuptools for --no-build-isolation.
"$PYTHON" -c "import torch" 2>/dev/null || die "torch is not installed in $VENV; install the project first (make setup)"
command -v "${CXX:-c++}" >/dev/null || die "no C++ compiler (${CXX:-c++}) on PATH"
"$PYTHON" -c "import setuptools, wheel" 2>/dev/null || {
    log "installing setuptools and wheel into $VENV"
    "$PYTHON" -m pip install --quiet setuptools wheel
}
cmake_ok() {
    command -v cmake >/dev/null \
        && printf '3.13\n%s\n' "$(cmake --version | head -1 | awk '{print $3}')" | sort -V -C
}
if ! cmake_ok; then
    log "no cmake >= 3.13 on PATH; installing cmake from PyPI into $VENV"
    "$PYTHON" -m pip install --quiet cmake
    cmake_ok || die "cmake from PyPI is not usable"
fi
log "using $(cmake --version | head -1) at $(command -v cmake), $("${CXX:-c++}" --version | head -1)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/install_horovod.XXXXXX")"
BUILD_LOG="$WORK/build.log"
trap 'rm -rf "$WORK"' EXIT

# Source archive, never a wheel: the build must match this venv's torch.
log "downloading the horovod==$HOROVOD_VERSION source archive"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
tar -xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
SRC="$WORK/horovod-$HOROVOD_VERSION"

# TODO(horovod): remove the C++17 patch once a Horovod release builds against torch >= 2.x
# headers (upstream issue https://github.com/horovod/horovod/issues/3996, fixed on master
# by https://github.com/horovod/horovod/pull/3998 but not in any release up to 0.28.1).
# torch >= 2.1 headers need C++17; both files below still ask for C++14.
for file in "${CMAKE_FILES[@]}"; do
    path="$SRC/$file"
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$path" \
        || die "$file has no 'set(CMAKE_CXX_STANDARD 14)': the C++17 patch no longer applies to horovod $HOROVOD_VERSION"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$path"
    if grep -q 'set(CMAKE_CXX_STANDARD 14)' "$path" || ! grep -q 'set(CMAKE_CXX_STANDARD 17)' "$path"; then
        die "patching $file to C++17 failed"
    fi
    log "patched $file to C++17"
done

# Build and install; the compiler output goes to a log shown only on failure.
log "building horovod $HOROVOD_VERSION with $HOROVOD_BUILD_JOBS jobs (5-10 minutes; log: $BUILD_LOG)"
started=$SECONDS
# Heartbeat: the make progress from the log every 30 s.
( while sleep 30; do
    step="$(grep -o '\[ *[0-9]*%\]' "$BUILD_LOG" 2>/dev/null | tail -n 1 || true)"
    log "  ... ${step:-configuring} after $((SECONDS - started)) s"
done ) &
heartbeat=$!
trap 'kill "$heartbeat" 2>/dev/null || true; rm -rf "$WORK"' EXIT
if ! env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$HOROVOD_BUILD_JOBS" \
        "$PYTHON" -m pip install --no-build-isolation --no-cache-dir -v "$SRC" >"$BUILD_LOG" 2>&1; then
    kill "$heartbeat" 2>/dev/null || true
    trap - EXIT
    tail -n 60 "$BUILD_LOG" >&2
    die "the horovod build failed after $((SECONDS - started)) s; full log kept at $BUILD_LOG"
fi
kill "$heartbeat" 2>/dev/null || true
log "built and installed in $((SECONDS - started)) s"

# Check: the extension loads and the launcher sees PyTorch and gloo.
"$PYTHON" -c "import horovod.torch" || die "horovod installed but horovod.torch does not import"
check="$("$VENV/bin/horovodrun" --check-build)"
echo "$check" >&2
grep -q '\[X\] PyTorch' <<<"$check" || die "horovodrun --check-build does not list PyTorch"
grep -q '\[X\] Gloo' <<<"$check" || die "horovodrun --check-build does not list Gloo"
log "horovod $HOROVOD_VERSION ready in $VENV"
