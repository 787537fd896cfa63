#!/usr/bin/env bash
# The GPU benchmark of docs/BENCHMARKS.md in one command: Mistral-7B-v0.1's shapes (its config, random bf16 weights
# made on the GPU, the stand-in tokenizer), QLoRA as recipes/mistral-7b/sft_qlora.yaml sets it, on the bundled data;
# recipes/sft.py against plain TRL's SFTTrainer in the same invocation (bench/run.py), unpacked and packed.
#
#   bash bench/gpu_7b.sh RESULTS_DIR [STEPS] [REPS]
#
# Needs one CUDA GPU with ~20 GB free and ~16 GB of disk for the random checkpoint (MODEL_DIR, default
# /tmp/mistral-7b-random, reused when it already holds weights). Results: RESULTS_DIR/gpu_7b_qlora.json and the
# per-run logs beside it.
set -euo pipefail
RESULTS=${1:?usage: bash bench/gpu_7b.sh RESULTS_DIR [STEPS] [REPS]}
STEPS=${2:-6}
REPS=${3:-1}
MODEL=${MODEL_DIR:-/tmp/mistral-7b-random}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  [ -f "$MODEL/config.json" ] || $PY tools/make_standin.py --output "$MODEL" --vocab_size 32000
  $PY bench/random_model.py "$MODEL"
fi
DATA="--model_name_or_path $MODEL --global_batch_size 8 --dataset_name data/cai_train.jsonl --dataset_train_split train --dataset_test_split test"
$PY bench/run.py --config recipes/mistral-7b/sft_qlora.yaml --steps "$STEPS" --reps "$REPS" --set "$DATA" \
  --variant recipe \
  --variant "packed: --packing true --per_device_train_batch_size 1" \
  --out "$RESULTS/gpu_7b_qlora.json"
