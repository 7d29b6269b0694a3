#!/usr/bin/env bash
# Run the test suite against the oldest releases pyproject.toml claims to support: every direct dependency
# (the base ones and the dev extra's) at its lower bound, as uv's `--resolution lowest-direct` resolves them
# on the day (their own dependencies at the newest releases that fit), in a throwaway virtual environment.
# Prints the resolved versions of the main packages and one pass/fail line.
#
#   bash scripts/lowest.sh                                        # the whole suite (torch 2.6.0's PyPI build: ~3 GB)
#   SUITES="tests/model tests/test_compare_seeds.py" bash scripts/lowest.sh
#
# Knobs: PYTHON (default python3); COMPAT_DIR (where the venvs go, default a temporary folder, removed at the
# end unless KEEP=1); SUITES (pytest paths, default tests). docs/compat.md has the latest output.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
SUITES=${SUITES:-tests}
WORK=${COMPAT_DIR:-$(mktemp -d -t wiola-lowest-XXXXXX)}
mkdir -p "$WORK"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
log="$WORK/lowest.log"
pyver=$("$PYTHON" -c 'import platform; print(platform.python_version())')
start=$(date +%s)

echo "[lowest] resolving the lower bounds of pyproject.toml (uv pip compile --resolution lowest-direct; log: $log)"
{
  "$PYTHON" -m venv "$WORK/uv" && "$WORK/uv/bin/python" -m pip install --quiet uv \
    && "$WORK/uv/bin/uv" pip compile "$ROOT/pyproject.toml" --extra dev --resolution lowest-direct \
         --python-version "${pyver%.*}" --quiet -o "$WORK/lowest.txt" \
    && "$PYTHON" -m venv "$WORK/venv" \
    && echo "[lowest] installing into $WORK/venv" \
    && "$WORK/uv/bin/uv" pip install --python "$WORK/venv/bin/python" --quiet -r "$WORK/lowest.txt" \
    && "$WORK/uv/bin/uv" pip install --python "$WORK/venv/bin/python" --quiet --no-deps -e "$ROOT"
} >"$log" 2>&1
if ! "$WORK/venv/bin/python" -c "import wiola" 2>>"$log"; then
  echo "wiola lowest, $(date -u +%Y-%m-%d), python $pyver  FAIL  could not resolve or install the lower bounds (see $log)"
  exit 1
fi
versions=$("$WORK/venv/bin/python" - <<'EOF'
from importlib.metadata import version
names = ["torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "datasets", "numpy", "scipy",
         "matplotlib", "tqdm", "peft", "trl", "lm_eval", "onnx", "onnxscript", "onnxruntime", "ctranslate2", "fastapi"]
print(" ".join(f"{n} {version(n)}" for n in names))
EOF
)
echo "[lowest] $versions"
echo "[lowest] running $SUITES"
# -W error: a FutureWarning raised from our code paths fails the run, as in scripts/compat.sh
if "$WORK/venv/bin/python" -m pytest $SUITES -p no:cacheprovider -W "error::FutureWarning" -W "ignore::FutureWarning:torch" \
     >>"$log" 2>&1; then
  result="PASS  $(grep -E "^[0-9]+ passed" "$log" | tail -1)"; status=0
else
  result="FAIL  $(grep -E "passed|failed|error" "$log" | tail -1)  (log: $log, kept with KEEP=1)"; status=1
fi
echo
echo "wiola lowest, $(date -u +%Y-%m-%d), python $pyver, suites: $SUITES  [$(( $(date +%s) - start )) s]"
echo "$versions"
echo "$result"
exit $status
