#!/usr/bin/env bash
# Refresh constraints.txt (the exact versions scripts/setup.sh installs) from what pip resolves today, then
# re-run the checks: the whole suite in a fresh venv built from the new lock, and scripts/compat.sh.
#
#   bash scripts/lock.sh            # refresh, test, run compat; review `git diff constraints.txt`, then commit
#   SKIP_COMPAT=1 bash scripts/lock.sh
#
# torch is not locked (scripts/setup.sh installs TORCH_SPEC, default torch==2.13.0, which suits the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d -t wiola-lock-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "[lock] resolving the newest dependencies pyproject.toml allows, in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --upgrade pip
"$WORK/venv/bin/python" -m pip install --quiet $TORCH_SPEC
"$WORK/venv/bin/python" -m pip install --quiet -e ".[dev]"
{
  echo "# Exact versions that scripts/setup.sh installs (pip -c), resolved $(date -u +%Y-%m-%d) by scripts/lock.sh"
  echo "# with python $("$WORK/venv/bin/python" -c 'import platform; print(platform.python_version())') and $("$WORK/venv/bin/python" -c 'import torch; print("torch", torch.__version__)') (torch itself is chosen by TORCH_SPEC, not locked)."
  "$WORK/venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|wiola)[=-]' | sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "[lock] wrote constraints.txt; changes:"
git --no-pager diff --stat -- constraints.txt || true

echo "[lock] the whole suite in a fresh venv built from the new lock"
WIOLA_VENV="$WORK/test-venv" bash scripts/test.sh
if [ "${SKIP_COMPAT:-0}" != 1 ]; then
  bash scripts/compat.sh
fi
