#!/usr/bin/env bash
# The preference stage on one GPU at Mistral-7B's shapes (docs/BENCHMARKS.md), in one command:
#   1. recipes/dpo.py against plain TRL's DPOTrainer (bench/run.py --program dpo), QLoRA as
#      recipes/mistral-7b/dpo_qlora.yaml sets it, from a full M_SFT (a new adapter on the 4-bit model), same pairs;
#   2. the hand-off as `make train-7b` then `make dpo-7b` run it: sft.py writes a QLoRA adapter (M_SFT), dpo.py
#      continues it against a frozen copy of itself, evaluates held-out pairs and saves M_DPO.
# The model is Mistral-7B-v0.1's config with random bf16 weights and the stand-in tokenizer (as bench/gpu_7b.sh);
# the pairs are the bundled critique pairs (revision > initial answer, data/cai_train.jsonl).
#
#   bash bench/gpu_7b_dpo.sh RESULTS_DIR [STEPS] [REPS]
#
# Needs one CUDA GPU with ~25 GB free and ~16 GB of disk (MODEL_DIR, default /tmp/mistral-7b-random, reused when it
# holds weights). EXTRA adds overrides to every run (the CPU check of this script: a tiny config, --use_cpu true).
set -euo pipefail
RESULTS=${1:?usage: bash bench/gpu_7b_dpo.sh RESULTS_DIR [STEPS] [REPS]}
STEPS=${2:-6}
REPS=${3:-1}
MODEL=${MODEL_DIR:-/tmp/mistral-7b-random}
WORK=${WORK_DIR:-/tmp/gpu-7b-dpo}
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$RESULTS"
rm -rf "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  [ -f "$MODEL/config.json" ] || $PY tools/make_standin.py --output "$MODEL" --vocab_size 32000
  $PY bench/random_model.py "$MODEL"
fi
DATA="--model_name_or_path $MODEL --global_batch_size 8 --dataset_name data/cai_train.jsonl --dataset_train_split train
 --dataset_test_split test $EXTRA"
TEMPLATE="--chat_template_path recipes/templates/cai_seed.jinja"  # the stand-in folder has no chat template

echo "== 1. dpo.py vs plain DPOTrainer, $STEPS steps x $REPS reps"
$PY bench/run.py --program dpo --config recipes/mistral-7b/dpo_qlora.yaml --steps "$STEPS" --reps "$REPS" \
  --set "$DATA $TEMPLATE" --out "$RESULTS/gpu_7b_dpo_qlora.json" || FAILED="part 1 (logs in $RESULTS)"

echo "== 2. the hand-off: sft.py (QLoRA adapter) -> dpo.py (adapter continued, held-out pairs evaluated)"
t0=$(date +%s)
$PY recipes/sft.py --config recipes/mistral-7b/sft_qlora.yaml $DATA --output_dir "$WORK/m-sft" --max_steps 3 \
  --eval_strategy no --save_strategy no --num_sample_prompts 0 2>&1 | tee "$RESULTS/handoff-sft.log" | tail -4
t1=$(date +%s)
$PY recipes/dpo.py --config recipes/mistral-7b/dpo_qlora.yaml $DATA --model_name_or_path "$WORK/m-sft" \
  --output_dir "$WORK/m-dpo" --max_steps 4 --eval_steps 2 --max_eval_examples 16 --logging_steps 1 \
  --num_sample_prompts 2 --sample_max_new_tokens 24 \
  --save_strategy no 2>&1 | tee "$RESULTS/handoff-dpo.log" | tail -6
t2=$(date +%s)
$PY - "$WORK" "$RESULTS/handoff.json" "$((t1 - t0))" "$((t2 - t1))" <<'EOF'
import json, os, sys
work, out, sft_s, dpo_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dpo = os.path.join(work, "m-dpo")
history = json.load(open(os.path.join(dpo, "trainer_state.json")))["log_history"]
record = {
    "sft_seconds": sft_s, "dpo_seconds": dpo_s,
    "m_dpo_files": sorted(os.listdir(dpo)),
    "adapter_config": json.load(open(os.path.join(dpo, "adapter_config.json"))),
    "log_history": history,
}
json.dump(record, open(out, "w"), indent=2)
evals = [(h["step"], round(h["eval_loss"], 4), h.get("eval_rewards/accuracies")) for h in history if "eval_loss" in h]
print(f"sft.py {sft_s}s, dpo.py {dpo_s}s; M_DPO: {record['m_dpo_files']}; eval (step, loss, reward acc): {evals}")
assert "adapter_model.safetensors" in record["m_dpo_files"] and "ref" not in record["m_dpo_files"]
EOF
if [ -n "${FAILED:-}" ]; then echo "FAILED: $FAILED"; exit 1; fi
