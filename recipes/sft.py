"""Constitutional AI, supervised phase: fine-tune M_base on (P, R_revised) pairs into M_SFT.

Each pair becomes a conversational prompt/completion, prompt = [system, user P], completion = [assistant
R_revised], rendered with the model's chat template (or `chat_template_path`). TRL's completion-only loss
trains on the response and the end-of-turn token that closes it; everything else is label -100.

# Demo on CPU (embedded SmolLM2-135M-Instruct, LoRA, bundled data)
```bash
python recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml
python recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml --dry_run   # preview.jsonl, no weights
```

# QLoRA on one GPU, LoRA with DDP, full fine-tune with ZeRO-3
```bash
accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/sft.py \
    --config recipes/mistral-7b/sft_qlora.yaml
accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 4 recipes/sft.py \
    --config recipes/mistral-7b/sft_lora.yaml   # global_batch_size fixes gradient accumulation per GPU count
accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft.py \
    --config recipes/mistral-7b/sft_full.yaml
```
Any YAML key can be overridden on the command line (`--learning_rate 1e-4`); use `--config file.yaml`,
not `--config=file.yaml`.
"""

import json
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules, also under `accelerate launch`

import cai_data  # noqa: E402
import checks  # noqa: E402
import model_card  # noqa: E402
import quiet  # noqa: E402


@dataclass
class RecipeArguments:
    """Switches of this recipe that TRL's dataclasses do not have."""

    dry_run: bool = field(default=False, metadata={"help": "Prepare data, write preview.jsonl, load no weights."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement (EarlyStoppingCallback)."}
    )
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "Minimum improvement that counts."})
    overfit_warning_patience: int = field(
        default=3, metadata={"help": "Warn when eval loss rose this many evaluations in a row while train loss fell."}
    )
    num_sample_prompts: int = field(
        default=4, metadata={"help": "Held-out prompts answered greedily at each evaluation (0 turns it off)."}
    )
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of those sample answers."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train again into an output_dir that holds a finished model (otherwise refused)."},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per optimizer step over all GPUs. When set, gradient_accumulation_steps = global / "
            "(per_device_train_batch_size x number of processes), so the GPU count does not change the recipe."
        },
    )


def make_parser():
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, cai_data.CAIDataArguments, RecipeArguments))
    # SFTConfig turns bf16 on by default, which raises on a machine without bf16; keep it only where it works.
    parser.set_defaults(bf16=checks.bf16_available())
    return parser


def main(script_args, training_args, model_args, data_args, recipe_args):
    from transformers import AutoTokenizer

    checks.validate(script_args, training_args, model_args, data_args, recipe_args)
    if recipe_args.global_batch_size:
        training_args.gradient_accumulation_steps = checks.accumulation_for(
            recipe_args.global_batch_size, training_args.per_device_train_batch_size, training_args.world_size
        )
    is_main = training_args.process_index == 0
    say = print if is_main else (lambda *a, **k: None)

    with checks.reworded_load_error("model_name_or_path", model_args.model_name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    cai_data.load_chat_template(tokenizer, training_args.chat_template_path)
    checks.validate_with_tokenizer(tokenizer, training_args, data_args)
    eos_token = training_args.eos_token or tokenizer.eos_token
    tokenizer.eos_token = eos_token
    training_args.eos_token = eos_token  # SFTTrainer writes it into the model's generation_config

    with training_args.main_process_first(desc="preparing data"):
        train_rows, eval_rows, report = cai_data.load_pairs(script_args, data_args, training_args.seed)
        train_ds = cai_data.tokenize_pairs(train_rows, tokenizer, training_args, report, "train", eos_token)
        eval_ds = cai_data.tokenize_pairs(eval_rows, tokenizer, training_args, report, "eval", eos_token)
    say("Data summary:\n" + "\n".join(report.lines()))
    if is_main:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "data_summary.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2)

    if recipe_args.dry_run:
        if is_main:
            checks.write_preview(train_ds, tokenizer, training_args, model_args, report)
            import memory  # peak GPU memory per GPU from the config alone (docs/BENCHMARKS.md)

            memory.print_estimate(training_args, model_args)
        return None

    trainer = build_trainer(training_args, model_args, recipe_args, tokenizer, train_ds, eval_ds, eval_rows)
    resume = checks.checkpoint_to_resume(training_args, recipe_args.overwrite_output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_metrics("train", train_result.metrics)
    if eval_ds is not None:
        final = trainer.evaluate()
        trainer.save_metrics("eval", final)
        start = next((h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h["step"] == 0), None)
        if start is not None:
            say(f"Eval loss on held-out revised responses: M_base {start:.4f} -> M_SFT {final['eval_loss']:.4f}")
    save(trainer, training_args, model_args, script_args, data_args, report)
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return trainer


def build_trainer(training_args, model_args, recipe_args, tokenizer, train_ds, eval_ds, eval_rows):
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    import callbacks

    packed = training_args.padding_free or (training_args.packing and training_args.packing_strategy != "wrapped")
    if packed and model_args.attn_implementation is None:
        # transformers' default (sdpa) computes a packed row as one masked sequence: packing would save nothing
        model_args.attn_implementation = "sdpa_varlen"
        if training_args.process_index == 0:
            print("Packing: attn_implementation sdpa_varlen (per-document SDPA; set attn_implementation to override)")
    if model_args.attn_implementation == "sdpa_varlen":  # recipes/varlen_attention.py, docs/BENCHMARKS.md
        import varlen_attention

        varlen_attention.register()
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
        "use_safetensors": True,  # never unpickle weights
    }
    if eval_ds is None:
        training_args.eval_strategy = "no"
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    for cb in callbacks.build(trainer, recipe_args, eval_rows):
        trainer.add_callback(cb)
    return trainer


def save(trainer, training_args, model_args, script_args, data_args, report):
    """M_SFT: weights or adapter, tokenizer + chat template, generation_config, metrics, model card."""
    out = training_args.output_dir
    checks.save_model_atomically(trainer, out)
    trainer.save_state()  # trainer_state.json: the full log history (loss curves) next to the model
    if trainer.accelerator.is_main_process:
        trainer.model.generation_config.save_pretrained(out)
        dataset = [cai_data.source_name(s) for s in cai_data.sources_from_args(script_args, data_args)]
        model_card.write(trainer, model_args, data_args, dataset, report)  # README.md: recipes/model_card.py
        checks.mark_complete(out)


if __name__ == "__main__":
    quiet.setup()  # library messages that are not the user's to act on (recipes/quiet.py)
    try:
        main(*checks.parse_args(make_parser()))
    except cai_data.DataError as e:  # bad data is a message naming file, row and fix, not a traceback
        raise SystemExit(f"Data error: {e}") from None
