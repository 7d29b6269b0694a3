#!/usr/bin/env bash
# Run the model, generation, static-cache and conversion suites against several transformers releases,
# each in a throwaway virtual environment, and print one pass/fail line per release.
#
#   bash scripts/compat.sh                 # 5.0.0 (oldest supported), 5.17.0 (GPU machines), 5.24.0, 5.25.0
#                                          # (the two newest tested) and the newest on PyPI if it is newer still
#   bash scripts/compat.sh 5.10.4 5.23.0   # chosen releases ("latest" = newest on PyPI)
#   TORCH_SPEC="torch==2.14.1" bash scripts/compat.sh 5.25.0   # another torch
#
# Knobs: PYTHON (default python3); TORCH_SPEC (pip arguments for torch, default "torch==2.13.0"); COMPAT_DIR
# (where the venvs go, default a temporary folder, removed at the end unless KEEP=1); SUITES (pytest paths).
# Every other dependency is whatever pip resolves beside that transformers release on the day it runs.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SUITES=${SUITES:-tests/model tests/test_generate.py tests/test_convert.py tests/test_warnings.py tests/test_transformers525.py}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(5.0.0 5.17.0 5.24.0 5.25.0 latest)
WORK=${COMPAT_DIR:-$(mktemp -d -t wiola-compat-XXXXXX)}
mkdir -p "$WORK"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

latest() {
  "$PYTHON" -m pip index versions transformers 2>/dev/null | sed -n 's/^transformers (\(.*\))$/\1/p' | head -1
}

declare -a LINES
declare -A DONE
status=0
for v in "${VERSIONS[@]}"; do
  [ "$v" = latest ] && v=$(latest)
  if [ -z "$v" ]; then
    LINES+=("transformers ?        FAIL  could not resolve the newest release from PyPI"); status=1; continue
  fi
  [ -n "${DONE[$v]:-}" ] && continue  # "latest" is one of the releases already listed
  DONE[$v]=1
  venv="$WORK/tf-$v"
  log="$WORK/tf-$v.log"
  echo "[compat] transformers $v: setting up $venv (log: $log)"
  start=$(date +%s)
  {
    "$PYTHON" -m venv "$venv" && "$venv/bin/python" -m pip install --quiet --upgrade pip \
      && "$venv/bin/python" -m pip install --quiet $TORCH_SPEC \
      && {
        # one resolution, as a user's `pip install wiola transformers==$v` gets: installing the newest release first and
        # moving down afterwards would leave behind what only the newer one needs (transformers 5.0 fails at import
        # beside kernels 0.19, which 5.25 pulls in)
        "$venv/bin/python" -m pip install --quiet -e "$ROOT[dev]" "transformers==$v" \
        || { echo "[compat] transformers $v is outside pyproject.toml's range: installing it past the cap"
             "$venv/bin/python" -m pip install --quiet -e "$ROOT[dev]" \
             && "$venv/bin/python" -m pip install --quiet "transformers==$v"; }  # the next release, before the cap moves
      }
  } >"$log" 2>&1
  got=$("$venv/bin/python" -c "import torch, transformers; print(transformers.__version__, torch.__version__)" 2>>"$log")
  if [ "${got%% *}" != "$v" ]; then
    LINES+=("transformers $v  FAIL  install failed (see $log)"); status=1; continue
  fi
  echo "[compat] transformers $v: running ${SUITES}"
  # -W error: a FutureWarning or DeprecationWarning raised from our code paths fails the run
  if "$venv/bin/python" -m pytest $SUITES -p no:cacheprovider -x \
       -W "error::FutureWarning" -W "ignore::FutureWarning:torch" >>"$log" 2>&1; then
    summary=$(grep -E "^[0-9]+ passed" "$log" | tail -1)
    LINES+=("transformers $v (torch ${got#* })  PASS  ${summary}  [$(( $(date +%s) - start )) s]")
  else
    summary=$(grep -E "passed|failed|error" "$log" | tail -1)
    LINES+=("transformers $v (torch ${got#* })  FAIL  ${summary}  (log: $log)"); status=1
  fi
done
echo
echo "wiola compat, $(date -u +%Y-%m-%d), python $("$PYTHON" -c 'import platform; print(platform.python_version())'), suites: $SUITES"
for line in "${LINES[@]}"; do echo "$line"; done
exit $status
