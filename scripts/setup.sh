#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install wiola into it.
# Environment knobs: PYTHON (interpreter, default python3), WIOLA_VENV (default .venv),
# TORCH_SPEC (what to install when torch is missing, default "torch==2.13.0"; e.g. set
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" for a CPU-only build),
# WIOLA_UNLOCKED=1 (ignore constraints.txt, the tested exact versions).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${WIOLA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
fi
# the exact tested versions from constraints.txt (refresh it with scripts/lock.sh); WIOLA_UNLOCKED=1 takes
# whatever pip resolves within pyproject.toml's ranges instead
LOCK=(-c constraints.txt)
[ "${WIOLA_UNLOCKED:-0}" = 1 ] && LOCK=()
if ! "$PY" -c "import wiola, pytest, tensorboard" 2>/dev/null || [ pyproject.toml -nt "$VENV/.wiola-installed" ] \
   || [ constraints.txt -nt "$VENV/.wiola-installed" ]; then
  echo "[setup] installing wiola and its dependencies${LOCK:+ (versions from constraints.txt)}"
  "$PY" -m pip install --quiet -e ".[dev]" "${LOCK[@]}"
  touch "$VENV/.wiola-installed"
fi
"$PY" -c "import torch, transformers, wiola; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}, wiola {wiola.__version__}')"
