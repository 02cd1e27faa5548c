#!/usr/bin/env bash
# Leakage audit on TinyShakespeare (char) with 10 canaries per repeat count 0, 1, 4 and 16 and about
# 512 member and 512 held-out lines for membership inference (prepare --holdout-lines): the demo
# recipe (shakespeare-char) made smaller to fit a few minutes of a shared 2-core
# CPU (2 layers, d_model 64, block 64), trained 2,000 steps with a checkpoint every 500, then
# `lmforge audit` of the checkpoints at steps 500, 1000 and 2000 (memorisation's prefix and k default
# to 32 and 32 in this 64-token block). Figures in RESULTS.md.
#   benchmarks/audit_canaries.sh [OUT_DIR]   (default out/audit-canaries; LMFORGE=command to run)
# EPSILON=8 trains the same run with DP-SGD at that target epsilon (delta 1e-5); the data preparation
# is seeded, so both runs hold the same canaries. benchmarks/plot_audit.py draws the runs' exposure.
set -euo pipefail
OUT=${1:-out/audit-canaries}
LMFORGE=${LMFORGE:-lmforge}
PRIVACY=()
if [ -n "${EPSILON:-}" ]; then PRIVACY=(--set privacy.target_epsilon="$EPSILON"); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a small model on a busy machine: one thread is faster
$LMFORGE prepare tinyshakespeare --tokenizer char --out "$OUT/data" --canaries 10 --canary-repeats 0,1,4,16 \
    --holdout-lines 512 --overwrite -q
$LMFORGE train shakespeare-char --out "$OUT/run" --overwrite --set data.dir="$OUT/data" \
    --set model.n_layer=2 --set model.d_model=64 --set model.block_size=64 \
    --set train.max_steps=2000 --set train.checkpoint_interval=500 --set train.eval_interval=500 \
    --set train.keep_checkpoints=4 --set train.device=cpu --set log.progress=false "${PRIVACY[@]}"
for step in 0000500 0001000 0002000; do
    $LMFORGE audit "$OUT/run" --checkpoint "$OUT/run/checkpoints/step-$step" --device cpu --json \
        > "$OUT/audit-$step.json"
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1], r["step"], \
        [(g["repeats"], round(g["exposure_sampled"], 2), round(g["exposure_fit"], 2)) for g in r["exposure"]["by_repeats"]], \
        r["memorisation"], r["membership"])' "$OUT/audit-$step.json"
done
$LMFORGE audit "$OUT/run" --checkpoint "$OUT/run/checkpoints/step-0002000" --device cpu
