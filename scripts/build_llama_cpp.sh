#!/usr/bin/env bash
# Build llama.cpp once into the user cache, as a CPU anchor for benchmarks/cpu_engines.py and for the
# GGUF tests (tests/export/test_gguf_llama_cpp.py). Nothing in the test suite needs it: those tests skip
# with a message when the build is absent.
#
# Source: the PyPI sdist of llama-cpp-python, which vendors llama.cpp (PyPI is reachable where GitHub may
# not be). Output, under ${WIOLA_LLAMA_CPP:-~/.cache/wiola/llama.cpp}:
#   bin/           llama-bench, llama-quantize, llama-completion and their shared libraries
#   src/           the unpacked sdist (its vendor/llama.cpp holds convert_hf_to_gguf.py and gguf-py)
#   convert-venv/  (with --converter) a venv for convert_hf_to_gguf.py, whose pins clash with ours
#   VERSION        the sdist file name, written last: its presence means the build finished
# Usage: bash scripts/build_llama_cpp.sh [--jobs N] [--converter] [--version X.Y.Z]
# Takes 30-60 min on 2 cores. Rerunning is a no-op once VERSION exists (delete the folder to rebuild).
set -euo pipefail
JOBS=$(nproc)
CONVERTER=0
VERSION=0.3.36
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) JOBS=$2; shift 2 ;;
    --converter) CONVERTER=1; shift ;;
    --version) VERSION=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "build_llama_cpp.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
ROOT=${WIOLA_LLAMA_CPP:-${XDG_CACHE_HOME:-$HOME/.cache}/wiola/llama.cpp}
PY=${PYTHON:-python3}
for tool in cmake ninja c++; do
  command -v "$tool" >/dev/null || { echo "build_llama_cpp.sh: needs $tool on PATH (pip install cmake ninja; a C++ compiler)" >&2; exit 2; }
done
mkdir -p "$ROOT"
SDIST="llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$ROOT/VERSION" ]; then
  if [ ! -d "$ROOT/src" ]; then
    echo "[llama.cpp] downloading $SDIST from PyPI"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT/dl"
    mkdir -p "$ROOT/src.part"
    tar xzf "$ROOT/dl/$SDIST" -C "$ROOT/src.part" --strip-components=1
    mv "$ROOT/src.part" "$ROOT/src"
  fi
  echo "[llama.cpp] configuring (native CPU flags, shared libraries)"
  cmake -S "$ROOT/src/vendor/llama.cpp" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >"$ROOT/cmake.log"
  echo "[llama.cpp] building with $JOBS jobs (log: $ROOT/build.log)"
  ninja -C "$ROOT/build" -j "$JOBS" llama llama-bench llama-quantize llama-completion >"$ROOT/build.log"
  rm -rf "$ROOT/bin"
  cp -a "$ROOT/build/bin" "$ROOT/bin"
  echo "$SDIST" >"$ROOT/VERSION"
fi
if [ "$CONVERTER" = 1 ] && [ ! -f "$ROOT/convert-venv/.done" ]; then
  echo "[llama.cpp] making a venv for convert_hf_to_gguf.py"
  "$PY" -m venv "$ROOT/convert-venv"
  # the converter's own pins (requirements/requirements-convert_hf_to_gguf.txt), except torch: its torch==2.11.0
  # would pull a CUDA build from PyPI; the converter only reads tensors, so our CPU torch serves
  "$ROOT/convert-venv/bin/pip" install --quiet "torch==2.13.0" "transformers==4.57.6" "numpy~=2.2.6" \
    "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0"
  "$ROOT/convert-venv/bin/pip" install --quiet -e "$ROOT/src/vendor/llama.cpp/gguf-py"
  touch "$ROOT/convert-venv/.done"
fi
echo "[llama.cpp] ready: $ROOT/bin ($(cat "$ROOT/VERSION"))"
