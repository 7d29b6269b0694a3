#!/usr/bin/env bash
# The main job on the embedded default corpus: set up .venv, prepare the Shakespeare complete works
# (byte-level BPE, 8,192 tokens), train a wiola-nano-shaped model (d 256, 6 layers, Spiral RoPE + GSA +
# Butterfly MLP) for a bounded budget, evaluate it, plot the loss curve and print a generated sample.
# Knobs: STEPS (default 400), BATCH (8), SEQ (256), OUT (runs/main-job), DATA (data/shakespeare);
# WIOLA_SETUP=0 skips the venv and runs $PYTHON (default python3) with src/ on PYTHONPATH.
# On 2 CPU cores this takes about 6 minutes after setup; on a GPU well under one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${WIOLA_SETUP:-1}" = 0 ]; then  # use an interpreter that already has torch + transformers (e.g. a GPU box)
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  WIOLA="${PYTHON:-python3} -m wiola"
else
  bash scripts/setup.sh
  WIOLA="${WIOLA_VENV:-.venv}/bin/python -m wiola"
fi
DATA=${DATA:-data/shakespeare}
OUT=${OUT:-runs/main-job}
start=$(date +%s)
$WIOLA prepare --source shakespeare --out "$DATA"
rm -rf "$OUT"  # a fresh run each time (use `wiola train ... --resume` to continue one instead)
$WIOLA train wiola-nano "$DATA" "$OUT" --max-steps "${STEPS:-400}" --batch-size "${BATCH:-8}" --seq-len "${SEQ:-256}" \
  --lr 1e-3 --warmup-steps 40 --eval-every 100 --eval-batches 10 --log-every 20 --save-every 100
$WIOLA eval "$OUT" "$DATA" --split val --max-batches 20 --seq-len "${SEQ:-256}"
echo "loss curve: $OUT/loss.png"
$WIOLA generate "$OUT" "ROMEO:" --max-new-tokens 80 --temperature 0.8 --top-k 50 --seed 0
echo "main job finished in $(( $(date +%s) - start )) s (after setup)"
