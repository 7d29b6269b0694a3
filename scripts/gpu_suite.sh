#!/usr/bin/env bash
# The GPU work that does not fit in one call: the larger presets and the comparisons of docs/results.md, in
# stages for a lent H100/H200 that cannot reach the network, plus `prep`, which fetches here what that machine
# cannot (also the corpus of scripts/gpu_check.sh's main-job stage). The headline figures (correctness, wiola
# bench for nano and 120m, ATM, main job) come from one call of `bash scripts/gpu_check.sh` instead. It uses
# the GPU machine's own python3 (torch + transformers + matplotlib preinstalled) with src/ on PYTHONPATH;
# nothing is pip-installed there.
#
#   bash scripts/gpu_suite.sh prep          # HERE, on the development machine: fetch what the GPU box cannot
#                                           # (the Shakespeare complete works into .gpu/cache) into .gpu/, which
#                                           # git ignores; carry ".gpu" with every GPU call. The character corpus
#                                           # travels with the tree (corpora/tinyshakespeare.txt).
# then on the GPU machine, one stage per call (figures land in $OUT, default runs/gpu):
#   bash scripts/gpu_suite.sh presets [PRESET ...]         # wiola bench --no-decode: micro, small, 360m, 700m, 1.5b
#   bash scripts/gpu_suite.sh compare-char [ENTRANT ...]   # wiola compare, char-level Shakespeare (resumable)
#   bash scripts/gpu_suite.sh compare-bpe  [ENTRANT ...]   # wiola compare, BPE Shakespeare (resumable)
#   bash scripts/gpu_suite.sh compare-candidate [ENTRANT ...]  # issue 28's result at nanoGPT's GPU setting, 3 seeds
# A comparison resumes where it stopped, so a stage cut off at 10 minutes continues on the next call while
# the machine stays warm (runs/ survives between calls); its reports are copied to $OUT after each call.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_suite.sh prep|presets|compare-char|compare-bpe|compare-candidate [presets or entrants...]}
shift
case $stage in
  prep | presets | compare-char | compare-bpe | compare-candidate) ;;
  *) echo "gpu_suite: unknown stage '$stage' (bench, atm and main moved to one call of scripts/gpu_check.sh)" >&2; exit 2 ;;
esac

if [ "$stage" = prep ]; then
  bash scripts/setup.sh
  mkdir -p .gpu
  exclude="$(git rev-parse --git-dir)/info/exclude"
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
  WIOLA_CACHE="$PWD/.gpu/cache" .venv/bin/python -c "from wiola.data.shakespeare import shakespeare_dir; print('corpus:', shakespeare_dir())"
  du -sh .gpu
  exit 0
fi

[ -d .gpu/cache ] || { echo "gpu_suite: .gpu/ is missing: run 'bash scripts/gpu_suite.sh prep' here and carry .gpu" >&2; exit 2; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" WIOLA_CACHE="$PWD/.gpu/cache"
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$OUT/device.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

compare() {  # compare SPEC NAME [entrants...]
  local spec=$1 name=$2
  shift 2
  local only=()
  [ $# -gt 0 ] && only=(--only "$@")
  $PY -m wiola compare "$spec" "runs/compare/$name" "${only[@]}" || status=$?
  for f in results.json results.md val_loss.png; do
    [ -f "runs/compare/$name/$f" ] && cp "runs/compare/$name/$f" "$OUT/${name}_$f"
  done
  return "${status:-0}"
}

case $stage in
  presets)
    for preset in ${*:-wiola-micro wiola-small wiola-360m wiola-700m wiola-1.5b}; do
      batch=16
      case $preset in wiola-700m | wiola-1.5b) batch=8 ;; esac
      $PY -m wiola bench --config "$preset" --train-batch $batch --seq-len 1024 --compile --no-decode \
        --out "$OUT/bench_$preset.json" | tee "$OUT/bench_$preset.md"
    done
    ;;
  compare-char)
    compare configs/compare/shakespeare_char.yaml shakespeare_char "$@"
    ;;
  compare-bpe)
    compare configs/compare/shakespeare_bpe.yaml shakespeare_bpe "$@"
    ;;
  compare-candidate)
    compare configs/compare/candidate_gpu.yaml candidate_gpu "$@"
    ;;
esac
