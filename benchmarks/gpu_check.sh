#!/usr/bin/env bash
# The GPU check of issue 33, one command from the repository root on a fresh GPU machine, offline,
# in under 8 minutes on one GPU:
#   1. MFU of a GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, 1,024 tokens, vocab 50,304;
#      learned positions, LayerNorm, GELU, tied head) in bf16 with torch.compile, over the GPU's
#      datasheet bf16 peak (lmforge.runtime.device_peak; a GPU missing from its table gets a measured
#      matmul peak, and the line says so): benchmarks/throughput.py on random tokens.
#   2. tokens/s of `lmforge serve` at 1 and 8 streams against transformers `generate` (batch of 8),
#      the same model at that shape, bf16 on the GPU: benchmarks/serve.py --device cuda.
#   3. `lmforge train base-gutenberg-gpu` for --train-seconds (default 300: five minutes,
#      compile included), stopped by SIGTERM (the trainer stops between steps), then its tokens/s and
#      MFU (median of the logged steps after the first two) from metrics.jsonl.
# Needs: the venv (.venv/bin/python, or $PYTHON) with lmforge installed; no network. Data for step 3:
# out/data/gutenberg-bpe if it is there (`lmforge prepare gutenberg --tokenizer bpe --vocab-size 8192`);
# else the first 20 MB of $LMFORGE_DATA_DIR/gutenberg/train.txt.gz (default ../shared/data) prepared
# with a BPE of 8,192; else $LMFORGE_DATA_DIR/tinyshakespeare/input.txt with a BPE of 8,192 (same
# model and vocabulary: tokens/s do not depend on the text). Without any of them step 3 is skipped.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine; log and summary in out/gpu-check/
#   bash benchmarks/gpu_check.sh --tiny           # a CPU dry run of every step at toy size (seconds)
#   bash benchmarks/gpu_check.sh --train-seconds 120 --out out/gpu-check-short
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=0
TRAIN_SECONDS=300
OUT=out/gpu-check
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --train-seconds) TRAIN_SECONDS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--tiny, --train-seconds N, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export LMFORGE_DATA_DIR="${LMFORGE_DATA_DIR:-../shared/data}"
export LMFORGE_OFFLINE=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
exec > >(tee "$LOG") 2>&1
START=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo "$(( $(date +%s) - START )) s"; }

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
note "$("$PY" - <<'EOF'
import os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}")
EOF
)"

if [ "$TINY" = 1 ]; then
  DEVICE=cpu
  MODEL_SET=(--set model.n_layer=1 --set model.n_head=2 --set model.d_model=32 --set model.block_size=32)
  THROUGHPUT=(--modes fp32 --steps 2 --warmup 1 --set train.device=cpu --set train.batch_size=2
              --set train.compile=false --set model.vocab_size=512 "${MODEL_SET[@]}")
  SERVE=(--device cpu --dtype fp32 --threads 1 --n-layer 1 --d-model 32 --n-head 2 --block-size 32
         --prompt-tokens 4 --new-tokens 4 --requests 1 --rounds 1 --streams 1 8
         --variants eager)  # the compiled server at this size: tests/benchmarks' serve.py test
  TRAIN_SET=(--set train.device=cpu --set train.dtype=fp32 --set train.compile=false --set train.batch_size=2
             --set train.max_steps=6 --set log.interval=1 "${MODEL_SET[@]}")
  TRAIN_SECONDS=$(( TRAIN_SECONDS < 60 ? TRAIN_SECONDS : 60 ))
  SLICE_MB=1
else
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    note "no CUDA device here: nothing measured (bash benchmarks/gpu_check.sh --tiny is the CPU dry run)"
    exit 1
  fi
  DEVICE=cuda
  # GPT-2 small: lmforge's defaults are GPT-2's architecture; vocab 50,257 padded to a multiple of 64
  THROUGHPUT=(--modes bf16+compile --steps 15 --warmup 5 --set train.device=cuda --set train.batch_size=16
              --set model.n_layer=12 --set model.n_head=12 --set model.d_model=768 --set model.block_size=1024
              --set model.vocab_size=50304)
  SERVE=(--device cuda --dtype bf16 --n-layer 12 --d-model 768 --n-head 12 --block-size 1024
         --prompt-tokens 64 --new-tokens 128 --requests 2 --rounds 2 --streams 1 8)
  TRAIN_SET=()
  SLICE_MB=20
fi

echo "== 1. MFU, GPT-2-small shape, bf16 + torch.compile ($(elapsed))"
CONFIG=src/lmforge/recipes/base-gutenberg-gpu.toml
"$PY" benchmarks/throughput.py --config "$CONFIG" "${THROUGHPUT[@]}" | tee "$OUT/throughput.txt"
note "1. training step: $(grep -E 'tok/s' "$OUT/throughput.txt" | head -1 | sed 's/  */ /g')"

echo "== 2. lmforge serve vs transformers, 1 and 8 streams ($(elapsed))"
"$PY" benchmarks/serve.py "${SERVE[@]}" --json "$OUT/serve.json" | tee "$OUT/serve.txt"
note "2. serve: $(grep -E '^(lmforge serve|transformers) ' "$OUT/serve.txt" | sed 's/  */ /g' | paste -sd ';' -)"
note "   $(grep -E 'transformers at|streams /|greedy text' "$OUT/serve.txt" | paste -sd ';' -)"

echo "== 3. lmforge train $CONFIG for $TRAIN_SECONDS s ($(elapsed))"
DATA=""
if [ -f out/data/gutenberg-bpe/meta.json ] && [ "$TINY" = 0 ]; then
  DATA=out/data/gutenberg-bpe
else
  CORPUS=""
  if [ -f "$LMFORGE_DATA_DIR/gutenberg/train.txt.gz" ]; then
    CORPUS="$OUT/gutenberg-${SLICE_MB}mb.txt"
    "$PY" - "$LMFORGE_DATA_DIR/gutenberg/train.txt.gz" "$CORPUS" "$SLICE_MB" <<'EOF'
import gzip, sys
written = 0
with gzip.open(sys.argv[1], "rb") as books, open(sys.argv[2], "wb") as out:
    for line in books:  # the first N MB of the books, cut after a line
        if written >= int(sys.argv[3]) * 1_000_000:
            break
        out.write(line)
        written += len(line)
EOF
  elif [ -f "$LMFORGE_DATA_DIR/tinyshakespeare/input.txt" ]; then
    CORPUS="$LMFORGE_DATA_DIR/tinyshakespeare/input.txt"
  fi
  if [ -n "$CORPUS" ]; then
    DATA="$OUT/data"
    VOCAB=$([ "$TINY" = 1 ] && echo 512 || echo 8192)
    "$PY" -m lmforge prepare "$CORPUS" --tokenizer bpe --vocab-size "$VOCAB" --out "$DATA" --overwrite -q
  fi
fi
if [ -z "$DATA" ]; then
  note "3. skipped: no out/data/gutenberg-bpe and no gutenberg or tinyshakespeare in $LMFORGE_DATA_DIR"
else
  set +e
  timeout -s TERM -k 60 "$TRAIN_SECONDS" "$PY" -m lmforge train "$CONFIG" --out "$OUT/run" --overwrite \
    --set data.dir="$DATA" --set train.eval_interval=0 --set train.checkpoint_interval=0 \
    --set log.progress=false "${TRAIN_SET[@]}"
  STATUS=$?
  set -e
  note "3. train on $DATA, $TRAIN_SECONDS s (exit $STATUS; 124: stopped by the time limit): $("$PY" - "$OUT/run/metrics.jsonl" <<'EOF'
import json, statistics, sys
steps = [e for e in map(json.loads, open(sys.argv[1])) if "tokens_per_s" in e]
if not steps:
    sys.exit("no step logged")
timed = steps[2:] or steps  # the first logged steps include torch.compile's work
mfu = [e["mfu"] for e in timed if "mfu" in e]  # a datasheet peak's; a measured CPU peak's is no MFU
print(f"{steps[-1]['step']} steps, loss {steps[-1]['loss']:.3f}, {statistics.median(e['tokens_per_s'] for e in timed):,.0f} "
      f"tokens/s" + (f", MFU {100 * statistics.median(mfu):.1f}%" if mfu else "") + " (median of the logged steps after the first two)")
EOF
)"
fi
note "total $(elapsed); device $DEVICE; log $LOG"
