"""The model card sft.py writes (recipes/model_card.py): real base model, data as paths, hub links only for hub ids,
an offline quick start for this M_SFT. The adapter case, run end to end, is in test_evaluate.py."""

from types import SimpleNamespace

import cai_data
import model_card


def _args(out):
    return SimpleNamespace(output_dir=out, learning_rate=1e-4, lr_scheduler_type=SimpleNamespace(value="cosine"),
                           warmup_steps=0, num_train_epochs=1.0, max_steps=3, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, world_size=1, max_length=128, packing=False, seed=0,
                           eos_token="<|im_end|>")  # fmt: skip


def _model_args(base, use_peft):
    return SimpleNamespace(model_name_or_path=base, use_peft=use_peft, load_in_4bit=False, lora_r=8, lora_alpha=16,
                           lora_dropout=0.0)  # fmt: skip


def _report():
    report = cai_data.DataReport()
    report.counts.update(train_examples_tokenized=7, eval_examples_tokenized=2)
    return report


def test_full_model_card_with_local_base_and_data(tmp_path):
    base = str(tmp_path / "base")
    (tmp_path / "base").mkdir()
    data = cai_data.CAIDataArguments()
    text = model_card.card("outputs/m", _args("outputs/m"), _model_args(base, False), data, ["data/cai_train.jsonl"],
                           _report())  # fmt: skip
    assert "None" not in text and "huggingface.co" not in text and "base_model:" not in text
    assert f"M_SFT of the Constitutional AI recipe: a fine-tune of `{base}` (M_base)" in text
    assert "- Data: `data/cai_train.jsonl` (7 train / 2 eval)" in text
    assert 'model = AutoModelForCausalLM.from_pretrained("outputs/m", local_files_only=True)  # M_SFT' in text
    assert "PeftModel" not in text and "library_name: transformers" in text
    assert '{"role": "system", "content": "You are a helpful assistant aligned with constitutional principles."}' in text
    assert "  - lr_scheduler_type: cosine" in text and "  - method: full fine-tune" in text and "lora_r" not in text


def test_hub_ids_are_linked_local_paths_are_not(tmp_path):
    data = cai_data.CAIDataArguments(system_prompt=None)
    text = model_card.card("out", _args("out"), _model_args("HuggingFaceTB/SmolLM2-135M-Instruct", True), data,
                           ["HuggingFaceH4/cai-conversation-harmless", "data/helpful_train.jsonl"], _report())  # fmt: skip
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text and "library_name: peft" in text
    assert "[`HuggingFaceTB/SmolLM2-135M-Instruct`](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in text
    assert ("[`HuggingFaceH4/cai-conversation-harmless`](https://huggingface.co/datasets/HuggingFaceH4/"
            "cai-conversation-harmless), `data/helpful_train.jsonl`") in text  # fmt: skip
    assert "huggingface.co/datasets/data" not in text
    # a hub base is not local: no local_files_only on it; the adapter itself is local
    assert 'base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in text
    assert 'model = PeftModel.from_pretrained(base, "out", local_files_only=True)' in text
    assert '"role": "system"' not in text  # system_prompt null: none in the quick start
    assert model_card.hub_id("moved/helpful_train.jsonl") is False  # a file name, not org/name, even when absent
    assert model_card.hub_id(str(tmp_path)) is False


def test_card_says_how_to_evaluate_this_model():
    text = model_card.card("out/x", _args("out/x"), _model_args("models/b", True), cai_data.CAIDataArguments(),
                           ["data/cai_train.jsonl"], _report())  # fmt: skip
    assert "`python recipes/evaluate.py --sft_model out/x --base_model models/b --test_file data/cai_test.jsonl" in text
