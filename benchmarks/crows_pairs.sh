#!/usr/bin/env bash
# CrowS-Pairs (lmforge eval --task crows-pairs) for a small base model and one fine-tune of it, sized
# for minutes of a shared 2-core CPU: a byte-level BPE of 4,096 tokens and the demo recipe
# (shakespeare-char) made smaller (2 layers, d_model 64, block 64, batch 8) trained STEPS steps on
# WikiText-2 (its valid split; the test split is val), then the same model trained FT_STEPS more steps
# on TinyShakespeare (train.init_from). Figures and the caveat in RESULTS.md.
#   benchmarks/crows_pairs.sh [OUT_DIR]   (default out/crows-pairs; LMFORGE=command to run)
set -euo pipefail
OUT=${1:-out/crows-pairs}
LMFORGE=${LMFORGE:-lmforge}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a small model on a busy machine: one thread is faster
STEPS=${STEPS:-300}
FT_STEPS=${FT_STEPS:-300}
SMALL=(--set model.n_layer=2 --set model.d_model=64 --set model.block_size=64 --set train.batch_size=8
       --set train.eval_interval=0 --set train.checkpoint_interval=0 --set log.progress=false)
$LMFORGE prepare wikitext-2 --tokenizer bpe --vocab-size 4096 --out "$OUT/data/wikitext2-bpe" --overwrite -q
$LMFORGE train shakespeare-char --out "$OUT/base" --overwrite --set data.dir="$OUT/data/wikitext2-bpe" \
    "${SMALL[@]}" --set train.max_steps="$STEPS" --set schedule.warmup_steps=30
$LMFORGE prepare tinyshakespeare --tokenizer "$OUT/data/wikitext2-bpe" --out "$OUT/data/shakespeare" --overwrite -q
$LMFORGE train shakespeare-char --out "$OUT/tuned" --overwrite --set data.dir="$OUT/data/shakespeare" \
    "${SMALL[@]}" --set train.max_steps="$FT_STEPS" --set train.init_from="$OUT/base" \
    --set optim.lr=5e-4 --set schedule.warmup_steps=10
for run in base tuned; do
    $LMFORGE eval "$OUT/$run" --task crows-pairs --checkpoint last --device cpu \
        --predictions "$OUT/$run-pairs.jsonl"
done
