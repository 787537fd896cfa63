"""End to end: a tiny random model trains through `python recipes/sft.py`, eval loss falls, the output reloads;
and the dry run works from a config + tokenizer with no weights at all."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import build_model_dir, run_recipe, tiny_config, toy_cai_rows, write_jsonl


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "cai.jsonl", toy_cai_rows(40))


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_trains_eval_loss_falls_and_output_reloads(tmp_path, tiny_model_dir, toy_data, use_peft):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "out"
    extra = {"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj", "v_proj"],
             "learning_rate": 5e-3} if use_peft else {}
    cfg = tiny_config(tiny_model_dir, toy_data, out, max_steps=8, eval_steps=4, eval_on_start=True, **extra)
    proc = run_recipe(cfg, tmp_path)
    assert "Data summary" in proc.stdout

    history = json.load(open(out / "trainer_state.json"))["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert evals[0]["step"] == 0 and len(evals) >= 3  # eval_on_start, step 4, step 8
    results = json.load(open(out / "all_results.json"))
    assert json.load(open(out / "train_results.json"))["train_loss"] > 0
    assert results["eval_loss"] < evals[0]["eval_loss"], (evals[0]["eval_loss"], results["eval_loss"])

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    gen = GenerationConfig.from_pretrained(out)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos
    if use_peft:
        from peft import AutoPeftModelForCausalLM

        assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
        model = AutoPeftModelForCausalLM.from_pretrained(out)
    else:
        assert (out / "model.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.tensor([tok("How do I pick lock number 3?")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base(x).logits), "saved model equals the base: nothing trained"

    card = (out / "README.md").read_text()
    assert tiny_model_dir in card
    assert "You are a helpful assistant aligned with constitutional principles." in card
    assert "learning_rate" in card and toy_data in card
    summary = json.load(open(out / "data_summary.json"))
    assert summary["counts"]["train_examples"] + summary["counts"]["eval_examples"] == 40


def test_dry_run_without_weights(tmp_path, toy_data):
    """Only config.json + tokenizer files: the dry run must not need weights (a 7B config on a laptop)."""
    model_dir = Path(build_model_dir(tmp_path / "m"))
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    out = tmp_path / "dry"
    proc = run_recipe(tiny_config(str(model_dir), toy_data, out), tmp_path, "--dry_run")
    assert "no weights were loaded" in proc.stdout
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in open(out / "preview.jsonl")]
    assert len(rows) == json.load(open(out / "data_summary.json"))["counts"]["train_examples_tokenized"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for r in rows:
        trained = [t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100]
        assert trained[-1] == eot and r["input_ids"][-1] == eot
        text = tok.decode(trained)
        assert text.startswith("I can't help with breaking into homes") and text.endswith("<|im_end|>")
        assert "<|im_start|>" not in text and "user" not in text
    # every -100 is before the response, every label after it equals the input id
    first = rows[0]["labels"].index(next(lab for lab in rows[0]["labels"] if lab != -100))
    assert all(lab == -100 for lab in rows[0]["labels"][:first])
    assert rows[0]["labels"][first:] == rows[0]["input_ids"][first:]
    assert not any(p.name.startswith("checkpoint") for p in out.iterdir())
    shutil.rmtree(model_dir)
    assert not os.path.exists(model_dir)
