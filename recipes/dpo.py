"""Constitutional AI, preference stage (the RLAIF hand-off): M_SFT -> M_DPO with TRL's DPOTrainer.

The flow, in `main` and `prepare` below, is sft.py's with one step changed: load preference pairs (prompt, chosen,
rejected; any preference schema, drops counted: cai_data.load_pairs(preference=True)) -> render with M_SFT's own
chat format (same system mode and end-of-turn token as sft.py: chat_format.py) -> tokenize prompt, chosen and
rejected apart, boundary-exact, and check per row that DPOTrainer's own tokenization gives the same prompt ids and
answer tokens (a row where they differ is dropped and counted) -> length policy (counted) -> DPOTrainer, whose
reference model is M_SFT -> M_DPO with its card, chat template, stop tokens and generation defaults.

M_SFT (`model_name_or_path`) is sft.py's output: a LoRA adapter folder (training continues that adapter on M_base,
and TRL keeps a frozen copy of it as the reference) or a full model (a new LoRA adapter with `use_peft`, else a full
fine-tune; the reference is M_SFT either way). `--dry_run` prepares the data and writes preview.jsonl (the prompt
ids labelled -100 in both sequences: never trained) and loads no weights.

# Demo on CPU (after `make demo`: M_SFT = outputs/smollm2-135m-cai-sft); `make demo-rlaif` runs the whole hand-off
```bash
python tools/collect_pairs.py --config recipes/smollm2-135m/pairs_demo.yaml   # on-policy pairs from M_SFT
python recipes/dpo.py --config recipes/smollm2-135m/dpo_demo.yaml
python recipes/dpo.py --config recipes/smollm2-135m/dpo_demo.yaml --dry_run --output_dir outputs/dpo-dry-run
```

# QLoRA on one GPU, full model with ZeRO-3
```bash
accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/dpo.py \
    --config recipes/mistral-7b/dpo_qlora.yaml
accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/dpo.py \
    --config recipes/mistral-7b/dpo_full.yaml
```
Any YAML key can be overridden on the command line (`--beta 0.3`).
"""

import inspect
import json
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules, also under `accelerate launch`

import arrow_pages  # noqa: E402
import cai_data  # noqa: E402
import chat_format  # noqa: E402
import checks  # noqa: E402
import entry  # noqa: E402
import generation  # noqa: E402
import model_card  # noqa: E402
import quiet  # noqa: E402
import run_dir  # noqa: E402
import sft  # noqa: E402  (its RecipeArguments, output guard, settings digest and LoRA config: shared, not copied)


@dataclass
class PreferenceArguments:
    """Switches of the preference stage that sft.py's RecipeArguments do not have."""

    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A .jinja chat template, only for an M_SFT folder without one (the 7B stand-in of the dry "
                  "run); M_SFT saved by sft.py carries the template it was trained with."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "M_base, when M_SFT is a LoRA adapter whose adapter_config.json names a base that is not "
                  "reachable from here (default: that name)."},
    )


def make_parser():
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig, cai_data.CAIDataArguments, sft.RecipeArguments,
                        PreferenceArguments))
    parser.set_defaults(bf16=checks.bf16_available())  # DPOConfig turns bf16 on even where it does not work
    return parser


def main(script_args, training_args, model_args, data_args, recipe_args, pref_args):
    checks.validate(script_args, training_args, model_args, data_args, recipe_args,
                    also=lambda cfg: sft.output_problems(cfg, "dpo.py"))
    if recipe_args.global_batch_size:
        training_args.gradient_accumulation_steps = checks.accumulation_for(
            recipe_args.global_batch_size, training_args.per_device_train_batch_size, training_args.world_size
        )
    is_main = training_args.process_index == 0
    say = print if is_main else (lambda *a, **k: None)
    lock = run_dir.lock_run(training_args.output_dir, "dpo.py", is_main, training_args.world_size)
    settings = sft.settings_digest(script_args, training_args, model_args, data_args, recipe_args, pref_args)
    if recipe_args.replace_same_run and not (recipe_args.dry_run or recipe_args.overwrite_output_dir):
        recipe_args.overwrite_output_dir = run_dir.same_run_to_replace(training_args.output_dir, settings)

    # M_SFT's tokenizer and saved chat template: the same system mode and end-of-turn token as its training.
    with checks.reworded_load_error("model_name_or_path", model_args.model_name_or_path):
        tokenizer = chat_format.load_tokenizer(model_args.model_name_or_path, pref_args.chat_template_path,
                                               revision=model_args.model_revision,
                                               trust_remote_code=training_args.trust_remote_code)
    fmt = chat_format.ChatFormat.detect(tokenizer, data_args.system_prompt, data_args.system_prompt_mode, None,
                                        data_args.template_date)
    say("Chat format: " + "; ".join(fmt.notes))
    checks.check_max_length(training_args.max_length, max(map(fmt.overhead, cai_data.system_prompts(data_args))))
    tokenizer.eos_token = fmt.end_of_turn  # what closes an answer; DPOTrainer pads with it when there is no pad
    base = base_model_of(model_args.model_name_or_path, pref_args.base_model)
    say(f"M_SFT: {model_args.model_name_or_path} ({'LoRA adapter on ' + base if base else 'full model'}); "
        "it is also the reference model")

    with training_args.main_process_first(local=not data_args.data_cache_shared, desc="preparing data"):
        train_ds, eval_ds, eval_rows, report = prepare_data(script_args, data_args, training_args, fmt)
    say("Data summary:\n" + "\n".join(report.lines()))
    checks.eval_data_problem(training_args, eval_ds)
    if is_main:
        run_dir.claim(training_args.output_dir, "dpo.py")
        run_dir.write_text(os.path.join(training_args.output_dir, "data_summary.json"),
                           json.dumps(report.to_dict(), indent=2))
    if recipe_args.dry_run:
        if is_main:
            limit = None if data_args.preview_all else data_args.preview_examples
            run_dir.write_preview(train_ds, tokenizer, training_args, model_args, report, limit)
        return None

    import callbacks

    sample_rows = callbacks.sample_rows(eval_rows, recipe_args.num_sample_prompts, fmt)  # answered at each eval
    trainer = build_trainer(training_args, model_args, recipe_args, base, tokenizer, train_ds, eval_ds, sample_rows)
    check_trainer_tokens(trainer, train_ds, eval_ds)
    generation.set_generation_defaults(trainer.model.generation_config, fmt, recipe_args)
    stop = callbacks.StopOnSignal(trainer.accelerator, checks.signal_names(recipe_args.stop_signals))
    trainer.add_callback(stop)
    resume = run_dir.checkpoint_to_resume(training_args, recipe_args.overwrite_output_dir)
    with run_dir.disk_full_guard(trainer, training_args.output_dir):
        train_result = trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:  # a checkpoint was saved: record it, release the lock, exit 75
        callbacks.exit_preempted(trainer, stop, lock)
    trainer.save_metrics("train", train_result.metrics)
    if eval_ds is not None:
        final = trainer.evaluate()
        trainer.save_metrics("eval", final)
        say(f"Held-out pairs: reward accuracy {final.get('eval_rewards/accuracies', float('nan')):.3f}, "
            f"margin {final.get('eval_rewards/margins', float('nan')):.3f}")
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")  # TRL's frozen copy of M_SFT's adapter: M_DPO is the trained one only
    with run_dir.disk_full_guard(trainer, training_args.output_dir, final=True):
        out = training_args.output_dir
        run_dir.save_model_atomically(trainer, out)
        trainer.save_state()
        if trainer.accelerator.is_main_process:
            trainer.model.generation_config.save_pretrained(out)
            dataset = [cai_data.source_name(s) for s in cai_data.sources_from_args(script_args, data_args)]
            lora = getattr(trainer.model, "peft_config", {}).get("default")
            model_card.write(trainer, model_args, data_args, dataset, report, fmt,
                             stage={"sft_model": model_args.model_name_or_path, "base_model": base,
                                    "beta": training_args.beta, "loss_type": training_args.loss_type,
                                    "lora": lora and {"lora_r": lora.r, "lora_alpha": lora.lora_alpha,
                                                      "lora_dropout": lora.lora_dropout}})
            run_dir.mark_complete(out, settings)
    if lock:
        lock.release()
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return trainer


def base_model_of(path: str, override: str | None) -> str | None:
    """M_base of an adapter folder (its adapter_config.json, or `base_model`); None for a full model."""
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        if override:
            raise checks.ConfigError([f"base_model: {override} is set, but {path} is a full model (no "
                                      "adapter_config.json); remove base_model."])
        return None
    with open(config, encoding="utf-8") as f:
        base = override or json.load(f).get("base_model_name_or_path")
    if not base:
        raise checks.ConfigError([f"base_model: {path}/adapter_config.json names no base model; set base_model to "
                                  "M_base's folder."])
    return base


# --------------------------------------------------------------------------------------------- data


def prepare_data(script_args, data_args, training_args, fmt):
    """(train, eval, eval conversations, DataReport), kept in the data cache under a key of every input (as sft.py)."""
    import data_cache

    def build(work_dir):
        num_proc = training_args.dataset_num_proc
        train_pairs, eval_pairs, report = cai_data.load_pairs(script_args, data_args, training_args.seed, num_proc,
                                                              work_dir, preference=True)
        train = prepare(train_pairs, fmt, training_args.max_length, report, "train", num_proc)
        evals = prepare(eval_pairs, fmt, training_args.max_length, report, "eval", num_proc)
        return train, evals, eval_pairs if len(eval_pairs) else None, report.to_dict()

    code = [inspect.getsource(m) for m in (cai_data, chat_format)] + [
        inspect.getsource(f) for f in (prepare, tokenize_batch, trainer_ids)]
    key = data_cache.key(data=cai_data.fingerprint(script_args, data_args), format=fmt.fingerprint(),
                         max_length=training_args.max_length, seed=training_args.seed, code=code,
                         versions=sft.library_versions(), stage="preference")
    first = training_args.process_index == 0 if data_args.data_cache_shared else training_args.local_process_index == 0
    say = print if training_args.local_process_index == 0 else (lambda m: None)
    train, evals, eval_pairs, report = data_cache.prepared(
        data_args.data_cache_dir or data_cache.default_dir(), key, build, data_args.rebuild_data_cache and first, say)
    return train, evals, eval_pairs, cai_data.DataReport.from_dict(report)


def prepare(pairs, fmt, max_length, report, split, num_proc=None):
    """Preference rows -> DPOTrainer's conversational columns (prompt, chosen, rejected) plus the ids it will train
    on (prompt_ids, chosen_ids, rejected_ids, checked in `tokenize_batch`); every drop and change counted."""
    from datasets import Features, List, Value

    if pairs is None or len(pairs) == 0:
        return None
    messages = cai_data.pair_features()["prompt"]
    ids = List(Value("int64"))
    features = Features({
        "prompt": messages, "chosen": messages, "rejected": messages, "source": Value("string"),
        "row": Value("int64"), "expected_prompt_ids": ids, "expected_chosen_ids": ids, "expected_rejected_ids": ids,
        "drop": Value("string"), "at": Value("string"), "changes": List({"reason": Value("string"),
                                                                          "at": Value("string")}),
    })  # fmt: skip
    # arrow_pages: each worker lets go of the Arrow pages it has read, so memory stays flat at any size
    ds = pairs.map(arrow_pages.DropsReadPages(tokenize_batch), batched=True, remove_columns=pairs.column_names,
                   features=features,
                   fn_kwargs={"fmt": fmt, "max_length": max_length, "split": split},
                   num_proc=cai_data.procs(pairs, num_proc), desc=f"tokenizing {split} pairs",
                   load_from_cache_file=False)
    report.count_rows(ds)
    kept = cai_data.Rows.kept(ds).dataset()
    if len(kept) == 0:
        raise cai_data.DataError(f"no {split} pairs left after tokenization:\n" + "\n".join(report.drop_lines()))
    report.counts[f"{split}_examples_tokenized"] = len(kept)
    return kept.remove_columns(["drop", "at", "changes"])


def trainer_ids(fmt, messages, chosen: str, rejected: str):
    """(prompt, chosen, rejected ids) as DPOTrainer makes them from conversational rows: it renders the prompt and
    each whole exchange with the chat template, and cuts both exchanges where the first stops matching the prompt."""
    # Only to check rows: TRL 1.16's DPOTrainer always tokenizes the text itself and takes no prepared ids.
    def ids(conversation, generation_prompt=False):
        return list(fmt.tokenizer.apply_chat_template(conversation, add_generation_prompt=generation_prompt,
                                                      tokenize=True, return_dict=True)["input_ids"])

    prompt = ids(messages, True)
    fulls = [ids([*messages, {"role": "assistant", "content": a}]) for a in (chosen, rejected)]
    n = min(next((i for i, (x, y) in enumerate(zip(prompt, f)) if x != y), min(len(prompt), len(f))) for f in fulls)
    return prompt[:n], fulls[0][n:], fulls[1][n:]


def tokenize_batch(batch, fmt, max_length, split):
    """Per row: the exact ids (prompt = inference ids, answer + end-of-turn token, as sft.py), DPOTrainer's ids, and
    the check that they agree: same prompt, and each answer's trained tokens start with the exact answer ids."""
    out = {k: [] for k in ("prompt", "chosen", "rejected", "source", "row", "expected_prompt_ids",
                           "expected_chosen_ids", "expected_rejected_ids", "drop", "at", "changes")}  # fmt: skip
    for prompt, chosen, rejected, source, row in zip(batch["prompt"], batch["completion"], batch["rejected"],
                                                     batch["source"], batch["row"]):
        where = f"{source} [{split}] row {row}"
        messages = fmt.prompt_messages(prompt)
        drop, at, changes, got = None, None, [], ([], [], [])
        try:
            exact_prompt, exact_chosen = fmt.tokenize(messages, chosen[0]["content"])
            _, exact_rejected = fmt.tokenize(messages, rejected[0]["content"])
        except chat_format.RowProblem as p:
            drop, at = f"{split}: {p.reason}", where + (f": {p.detail}" if p.detail else "")
        if drop is None:
            prompt_ids, a_chosen, a_rejected = trainer_ids(fmt, messages, chosen[0]["content"], rejected[0]["content"])
            if prompt_ids != exact_prompt or a_chosen[:len(exact_chosen)] != exact_chosen or \
                    a_rejected[:len(exact_rejected)] != exact_rejected:
                drop = f"{split}: DPOTrainer's tokens differ from the exact prompt/answer tokens (boundary merge " \
                       "or special-token text in an answer)"
                at = where
            else:
                got = (prompt_ids, a_chosen, a_rejected)
        if drop is None and max_length is not None:
            if len(got[0]) >= max_length:
                drop, at = f"{split}: prompt leaves no room for the answers at max_length", \
                    f"{where}: prompt is {len(got[0])} tokens, max_length {max_length}"
            elif len(got[0]) + max(len(got[1]), len(got[2])) > max_length:
                changes.append({"reason": f"{split}: an answer truncated to max_length by DPOTrainer", "at": where})
        for k, v in (("prompt", messages), ("chosen", chosen), ("rejected", rejected), ("source", source),
                     ("row", row), ("expected_prompt_ids", got[0]), ("expected_chosen_ids", got[1]),
                     ("expected_rejected_ids", got[2]), ("drop", drop), ("at", at), ("changes", changes)):
            out[k].append(v)
    return out


# --------------------------------------------------------------------------------------------- model and trainer


def build_trainer(training_args, model_args, recipe_args, base, tokenizer, train_ds, eval_ds, sample_rows):
    from trl import DPOTrainer, get_quantization_config

    import callbacks

    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
        "use_safetensors": True,  # never unpickle weights
    }
    quantization = get_quantization_config(model_args)
    if base is None:  # a full M_SFT: DPOTrainer loads it (a new LoRA adapter when use_peft, else full fine-tune)
        training_args.model_init_kwargs = kwargs  # DPOTrainer adds `quantization_config` below (QLoRA), as sft.py
        model, peft_config = model_args.model_name_or_path, sft.peft_config(model_args, recipe_args)
    else:  # M_SFT's adapter on M_base, trainable: DPOTrainer copies it as the frozen reference ("ref" adapter)
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if kwargs["dtype"] not in (None, "auto"):
            kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        if quantization is not None:
            kwargs.update(quantization_config=quantization, device_map={"": training_args.local_process_index}
                          if torch.cuda.is_available() else None)
        with checks.reworded_load_error("base_model", base):
            m_base = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        model, peft_config = PeftModel.from_pretrained(m_base, model_args.model_name_or_path, is_trainable=True), None
        if os.path.isfile(os.path.join(model_args.model_name_or_path, "generation_config.json")):
            from transformers import GenerationConfig  # M_SFT's saved decoding, not M_base's

            model.generation_config = GenerationConfig.from_pretrained(model_args.model_name_or_path)
        if model_args.use_peft and training_args.process_index == 0:
            print("LoRA: M_SFT is an adapter, so training continues it (its own r, alpha and target modules); the "
                  "lora_* settings apply only to a full M_SFT")
    keep = ["prompt", "chosen", "rejected"]
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds.select_columns(keep),
        eval_dataset=eval_ds.select_columns(keep) if eval_ds is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization if base is None else None,  # the adapter branch loaded M_base with it
    )
    for cb in callbacks.build(trainer, recipe_args, sample_rows):
        trainer.add_callback(cb)
    return trainer


def check_trainer_tokens(trainer, train_ds, eval_ds) -> None:
    """DPOTrainer's prepared ids equal the ones checked in `tokenize_batch`: a change of TRL's tokenization stops the
    run here instead of training on other tokens than the preview showed."""
    for name, ours, theirs in (("train", train_ds, trainer.train_dataset), ("eval", eval_ds, trainer.eval_dataset)):
        if ours is None:
            continue
        if len(ours) != len(theirs):
            raise RuntimeError(f"{name}: DPOTrainer kept {len(theirs)} of the {len(ours)} checked pairs; nothing was "
                               "trained.")
        for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
            batches = zip(ours.select_columns(["expected_" + col]).with_format("arrow").iter(batch_size=10_000),
                          theirs.select_columns([col]).with_format("arrow").iter(batch_size=10_000))
            for k, (a, b) in enumerate(batches):
                if not a.column(0).equals(b.column(0).cast(a.column(0).type)):
                    raise RuntimeError(f"{name} {col}: DPOTrainer tokenized rows {k * 10_000}.. differently from the "
                                       "ids checked in preparation (a TRL version whose tokenization this recipe does "
                                       "not know); nothing was trained.")


if __name__ == "__main__":
    quiet.setup()
    entry.run(main, make_parser(), lambda cfg: sft.rules(cfg, "dpo.py"))
