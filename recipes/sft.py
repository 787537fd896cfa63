"""Constitutional AI, supervised phase: fine-tune M_base on (P, R_revised) pairs into M_SFT.

The flow, in `main` and `prepare` below: load pairs (any schema -> [system, user P] + R_revised, drops counted)
-> render with the model's chat template (system role native, or folded into the user turn where the template has
none; chat_format.py detects it and the end-of-turn token) -> tokenize prompt and completion apart (the prompt ids
are exactly the inference ones) -> labels (-100 on every system, user and template token; the response and its
end-of-turn token trained) -> length policy (counted) -> TRL's SFTTrainer on the tokenized dataset -> M_SFT with
its chat template and stop tokens. `--dry_run` runs the same steps and writes preview.jsonl instead of training.

# Demo on CPU (embedded SmolLM2-135M-Instruct, LoRA, bundled data)
```bash
python recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml
python recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml --dry_run \
    --output_dir outputs/smollm2-135m-cai-sft-dry-run   # preview.jsonl, no weights; next to the demo's model
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
import env  # noqa: E402
import generation  # noqa: E402
import run_dir  # noqa: E402
import model_card  # noqa: E402
import quiet  # noqa: E402


@dataclass
class RecipeArguments:
    """Switches of this recipe that TRL's dataclasses do not have."""

    dry_run: bool = field(default=False, metadata={"help": "Prepare data, write preview.jsonl, load no weights."})
    repetition_penalty: float | None = field(
        default=None,
        metadata={"help": "Saved in M_SFT's generation_config.json (and used by the sample answers): > 1 keeps a small "
                  "model from looping (docs/EVALUATION.md measures it)."},
    )
    no_repeat_ngram_size: int | None = field(
        default=None, metadata={"help": "Saved in generation_config.json: never repeat an n-gram of this size."}
    )
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
    replace_same_run: bool = field(
        default=False,
        metadata={"help": "Train again over a finished model in output_dir only when this same command trained it "
                  "(same settings, recorded in cai_sft_complete.json); any other model is still refused. The demo "
                  "sets it, so `make demo` runs again."},
    )
    lora_top_layers: int | None = field(
        default=None,
        metadata={"help": "LoRA on the top N transformer layers only: backward stops below them, so a step costs "
                  "less (the CPU demo; docs/BENCHMARKS.md). Default: every layer."},
    )
    stop_signals: str = field(
        default="SIGTERM,SIGUSR1",
        metadata={"help": "Signals that end training after the current step with a complete checkpoint, exit status "
                  "75; a relaunch resumes (SLURM preemption and time limits: scripts/slurm_sft.sh). '' turns it off."},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per optimizer step over all GPUs. When set, gradient_accumulation_steps = global / "
            "(per_device_train_batch_size x number of processes), so the GPU count does not change the recipe."
        },
    )


def make_parser(*more):
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, cai_data.CAIDataArguments, RecipeArguments, *more))
    # SFTConfig turns bf16 on by default, which raises on a machine without bf16; keep it only where it works.
    parser.set_defaults(bf16=checks.bf16_available())
    return parser


def output_problems(cfg: dict, program: str = "sft.py") -> list[str]:
    """The output guard on output_dir (a finished model, foreign files, an input folder), before anything loads."""
    return run_dir.training_output_problems(cfg.get("output_dir"), bool(cfg.get("overwrite_output_dir")),
                                            bool(cfg.get("dry_run")), checks.input_paths(cfg),
                                            bool(cfg.get("replace_same_run")), program)


def rules(cfg: dict, program: str = "sft.py") -> list[str]:
    """What entry.parse checks on the parsed values: every config rule, then the output guard."""
    return checks.config_problems(cfg, int(os.environ.get("WORLD_SIZE", "1"))) + output_problems(cfg, program)


def main(script_args, training_args, model_args, data_args, recipe_args):
    checks.validate(script_args, training_args, model_args, data_args, recipe_args, also=output_problems)
    if recipe_args.global_batch_size:
        training_args.gradient_accumulation_steps = checks.accumulation_for(
            recipe_args.global_batch_size, training_args.per_device_train_batch_size, training_args.world_size
        )
    is_main = training_args.process_index == 0
    say = print if is_main else (lambda *a, **k: None)
    # One run per output_dir: a second run into it is refused, naming the first (run_dir.RunLock).
    lock = run_dir.lock_run(training_args.output_dir, "sft.py", is_main, training_args.world_size)
    settings = settings_digest(script_args, training_args, model_args, data_args, recipe_args)
    if recipe_args.replace_same_run and not (recipe_args.dry_run or recipe_args.overwrite_output_dir):
        # `make demo` again: a finished model this same command trained is replaced; any other one is refused.
        recipe_args.overwrite_output_dir = run_dir.same_run_to_replace(training_args.output_dir, settings)
    if training_args.bf16 and training_args.device.type == "cpu" and env.cpu_has_bf16() is False:
        say("bf16 on CPU: this CPU has no AVX512-BF16 or AMX, so bf16 is emulated and likely slower than fp32; "
            "set bf16: false to train in fp32")

    # Tokenizer and chat format: system role (native / folded / off) and end-of-turn token, detected and said once.
    with checks.reworded_load_error("model_name_or_path", model_args.model_name_or_path):
        tokenizer = chat_format.load_tokenizer(
            model_args.model_name_or_path,
            training_args.chat_template_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    fmt = chat_format.ChatFormat.detect(
        tokenizer, data_args.system_prompt, data_args.system_prompt_mode, training_args.eos_token,
        data_args.template_date,
    )
    say("Chat format: " + "; ".join(fmt.notes))
    checks.check_max_length(training_args.max_length, max(map(fmt.overhead, cai_data.system_prompts(data_args))))
    training_args.eos_token = fmt.end_of_turn  # SFTTrainer makes it the tokenizer's EOS and a generation stop token
    training_args.chat_template_path = None  # installed on the tokenizer, wrapped; TRL would re-read the raw file

    # Data, prepared once: the main process builds (or finds in the cache) and the other ranks load its result.
    with training_args.main_process_first(local=not data_args.data_cache_shared, desc="preparing data"):
        train_ds, eval_ds, eval_rows, report = prepare_data(script_args, data_args, training_args, fmt)
    say("Data summary:\n" + "\n".join(report.lines()))
    checks.eval_data_problem(training_args, eval_ds)  # eval_strategy with no eval rows: refused, never turned off
    if is_main:
        run_dir.claim(training_args.output_dir, "sft.py")
        run_dir.write_text(os.path.join(training_args.output_dir, "data_summary.json"),
                           json.dumps(report.to_dict(), indent=2))

    if recipe_args.dry_run:
        if is_main:
            limit = None if data_args.preview_all else data_args.preview_examples
            run_dir.write_preview(train_ds, tokenizer, training_args, model_args, report, limit)
            import memory  # peak GPU memory per GPU from the config alone (docs/BENCHMARKS.md)

            memory.print_estimate(training_args, model_args)
        return None

    import callbacks

    sample_rows = callbacks.sample_rows(eval_rows, recipe_args.num_sample_prompts, fmt)  # answered at each eval
    trainer = build_trainer(training_args, model_args, recipe_args, tokenizer, train_ds, eval_ds, sample_rows)
    # Every stop token of the family (Phi-3: <|end|> and <|endoftext|>) and the deployment's generation defaults.
    generation.set_generation_defaults(trainer.model.generation_config, fmt, recipe_args)
    # Preemption: on SIGTERM/SIGUSR1 every rank finishes the step, checkpoint-N is saved, and the run exits 75.
    stop = callbacks.StopOnSignal(trainer.accelerator, checks.signal_names(recipe_args.stop_signals))
    trainer.add_callback(stop)
    resume = run_dir.checkpoint_to_resume(training_args, recipe_args.overwrite_output_dir)
    with run_dir.disk_full_guard(trainer, training_args.output_dir):  # a full disk: partial save removed, exit 74
        train_result = trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:  # a checkpoint was saved: record it, release the lock, exit 75
        callbacks.exit_preempted(trainer, stop, lock)
    trainer.save_metrics("train", train_result.metrics)
    if eval_ds is not None:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        if evals and evals[-1]["step"] == trainer.state.global_step and not training_args.load_best_model_at_end:
            final = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}  # just evaluated: not twice
        else:
            final = trainer.evaluate()
        trainer.save_metrics("eval", final)
        start = next((h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h["step"] == 0), None)
        if start is not None:
            say(f"Eval loss on held-out revised responses: M_base {start:.4f} -> M_SFT {final['eval_loss']:.4f}")
    with run_dir.disk_full_guard(trainer, training_args.output_dir, final=True):
        save(trainer, training_args, model_args, script_args, data_args, report, fmt, settings)
    if lock:
        lock.release()
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return trainer


def prepare_data(script_args, data_args, training_args, fmt):
    """(train, eval, eval conversations, DataReport): load pairs, then tokenize both splits; kept in the data cache
    under a key of every input, so a re-run with the same data, tokenizer, template and settings loads it."""
    import data_cache
    import jailbreaks

    def build(work_dir):
        num_proc = training_args.dataset_num_proc
        # Load pairs: every schema -> (prompt messages, R_revised) rows; drops counted, eval split by unique prompt.
        train_pairs, eval_pairs, report = cai_data.load_pairs(script_args, data_args, training_args.seed, num_proc,
                                                              work_dir)
        train = prepare(train_pairs, fmt, training_args.max_length, report, "train", num_proc)
        evals = prepare(eval_pairs, fmt, training_args.max_length, report, "eval", num_proc)
        return train, evals, eval_pairs if len(eval_pairs) else None, report.to_dict()

    code = [inspect.getsource(m) for m in (cai_data, chat_format, jailbreaks)] + [
        inspect.getsource(f) for f in (prepare, tokenize_batch)] + [
        open(jailbreaks.DEFAULT_PATH).read() if os.path.isfile(jailbreaks.DEFAULT_PATH) else ""]
    key = data_cache.key(data=cai_data.fingerprint(script_args, data_args), format=fmt.fingerprint(),
                         max_length=training_args.max_length, seed=training_args.seed, code=code,
                         versions=library_versions())
    say = print if training_args.local_process_index == 0 else (
        lambda m: print(f"[rank {training_args.process_index}] {m}", flush=True))
    first = training_args.process_index == 0 if data_args.data_cache_shared else training_args.local_process_index == 0
    rebuild = data_args.rebuild_data_cache and first  # the others load what the first process rebuilt
    train, evals, eval_pairs, report = data_cache.prepared(data_args.data_cache_dir or data_cache.default_dir(), key,
                                                           build, rebuild, say)
    return train, evals, eval_pairs, cai_data.DataReport.from_dict(report)


def library_versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("datasets", "tokenizers", "transformers", "jinja2", "pyarrow", "numpy")}


def prepare(pairs, fmt, max_length, report, split, num_proc=None):
    """Pairs -> a tokenized dataset with completion-only labels: `tokenize_batch` as a batched map, every row it
    drops or changes counted. Columns: input_ids, labels, source, row."""
    import datasets

    if pairs is None or len(pairs) == 0:
        return None
    if isinstance(pairs, list):  # a few rows built by hand (tests, tools)
        pairs = datasets.Dataset.from_list(pairs)
    # arrow_pages: each worker lets go of the Arrow pages it has read, so memory stays flat at any size
    ds = pairs.map(arrow_pages.DropsReadPages(tokenize_batch), batched=True, remove_columns=pairs.column_names,
                   features=tokenized_features(),
                   fn_kwargs={"fmt": fmt, "max_length": max_length, "split": split},
                   num_proc=cai_data.procs(pairs, num_proc), desc=f"tokenizing {split}",
                   load_from_cache_file=False)  # the data cache decides reuse, on a key of every input
    report.count_rows(ds)
    rows = cai_data.Rows.kept(ds)  # columns read from the memory-mapped table, selected once
    kept = rows.dataset()
    if len(kept) == 0:
        raise cai_data.DataError(
            f"no {split} examples left after tokenization. Raise `max_length` or shorten the prompts:\n"
            + "\n".join(report.drop_lines())
        )
    report.counts.update({
        f"{split}_examples_tokenized": len(kept),
        f"{split}_tokens": int(rows.column("n_tokens").sum()),
        f"{split}_trained_tokens": int(rows.column("n_trained").sum()),
    })
    return kept.remove_columns(["drop", "at", "changes", "n_tokens", "n_trained"])


def tokenize_batch(batch, fmt, max_length, split):
    """Render, tokenize prompt and completion apart, label, apply the length policy; each row says what happened.

    TRL would tokenize prompt + completion as one string, so a response starting with `{` could merge with the
    prompt's last character; here the two are tokenized apart and the prompt ids are exactly the inference ones.
    """
    out = {k: [] for k in tokenized_features()}
    own_system = batch.get("own_system") or [False] * len(batch["prompt"])
    for prompt, completion, source, row, own in zip(batch["prompt"], batch["completion"], batch["source"],
                                                    batch["row"], own_system):
        where = f"{source} [{split}] row {row}"
        drop, at, changes, input_ids, labels = None, None, [], [], []
        # Render: the system prompt as the system role, folded into the user turn, or off (chat_format.py).
        messages = fmt.prompt_messages(prompt)
        # Tokenize prompt and completion apart: prompt = inference ids; completion = answer + end-of-turn token.
        try:
            prompt_ids, completion_ids = fmt.tokenize(messages, completion[0]["content"])
        except chat_format.RowProblem as p:
            drop, at = f"{split}: {p.reason}", where + (f": {p.detail}" if p.detail else "")
            prompt_ids = completion_ids = []
        if drop is None:
            if own and fmt.mode != "system":
                done = "folded into the first user turn" if fmt.mode == "fold" else "dropped (system_prompt_mode off)"
                changes.append({"reason": f"{split}: the row's own system turn {done}", "at": where})
            special = chat_format.has_special_text(fmt, completion[0]["content"])
            if special:
                changes.append({"reason": f"{split}: response holds special-token text (trained as plain text)",
                                "at": f"{where}: {special!r}"})
            # Labels: -100 on every system, user and template token; the answer and its end-of-turn token trained.
            input_ids = prompt_ids + completion_ids
            labels = [-100] * len(prompt_ids) + completion_ids
        # Length policy: a prompt that fills max_length is dropped; a long answer is cut (and loses its stop token).
        if drop is None and max_length is not None and len(input_ids) > max_length:
            if len(prompt_ids) >= max_length:
                drop, at = f"{split}: prompt leaves no room for the response at max_length", \
                    f"{where}: prompt is {len(prompt_ids)} tokens, max_length {max_length}"
                input_ids, labels = [], []
            else:
                changes.append({"reason": f"{split}: response truncated to max_length (no end-of-turn token)",
                                "at": where})
                input_ids, labels = input_ids[:max_length], labels[:max_length]
        for k, v in (("input_ids", input_ids), ("labels", labels), ("source", source), ("row", row), ("drop", drop),
                     ("at", at), ("changes", changes), ("n_tokens", len(input_ids)),
                     ("n_trained", sum(lab != -100 for lab in labels))):  # fmt: skip
            out[k].append(v)
    return out


def tokenized_features():
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value("int32")), "labels": List(Value("int32")), "source": Value("string"),
        "row": Value("int64"), "drop": Value("string"), "at": Value("string"),
        "changes": List({"reason": Value("string"), "at": Value("string")}), "n_tokens": Value("int32"),
        "n_trained": Value("int32"),
    })  # fmt: skip


def build_trainer(training_args, model_args, recipe_args, tokenizer, train_ds, eval_ds, eval_rows):
    from trl import SFTTrainer, get_quantization_config

    import callbacks
    import trained_head

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
    # On CPU, TRL's fused LM head scores prompt positions too: half of a demo step (recipes/trained_head.py).
    trainer_class = trained_head.TrainedPositionsSFTTrainer if training_args.device.type == "cpu" else SFTTrainer
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config(model_args, recipe_args),
        quantization_config=get_quantization_config(model_args),
    )
    for cb in callbacks.build(trainer, recipe_args, eval_rows):
        trainer.add_callback(cb)
    return trainer


def peft_config(model_args, recipe_args):
    """TRL's LoRA config, on the top `lora_top_layers` layers when set (peft's layers_to_transform, which TRL's
    ModelConfig does not expose)."""
    from transformers import AutoConfig
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is not None and recipe_args.lora_top_layers:
        n = AutoConfig.from_pretrained(model_args.model_name_or_path).get_text_config().num_hidden_layers
        config.layers_to_transform = list(range(max(0, n - recipe_args.lora_top_layers), n))
    return config


def settings_digest(*args) -> str:
    """What makes two runs the same command: every setting, without the switches that only say how to start."""
    from dataclasses import asdict

    import data_cache

    values = {}
    for a in args:
        values.update(a.to_dict() if hasattr(a, "to_dict") else asdict(a))
    ignore = ("overwrite_output_dir", "replace_same_run", "dry_run", "resume_from_checkpoint", "logging_dir")
    return data_cache.key(**{k: v for k, v in values.items() if k not in ignore})  # the same SHA-256 of JSON


def save(trainer, training_args, model_args, script_args, data_args, report, fmt, settings=None):
    """M_SFT: weights or adapter, tokenizer + chat template, generation_config, metrics, model card."""
    out = training_args.output_dir
    run_dir.save_model_atomically(trainer, out)
    trainer.save_state()  # trainer_state.json: the full log history (loss curves) next to the model
    if trainer.accelerator.is_main_process:
        trainer.model.generation_config.save_pretrained(out)
        dataset = [cai_data.source_name(s) for s in cai_data.sources_from_args(script_args, data_args)]
        model_card.write(trainer, model_args, data_args, dataset, report, fmt)  # README.md: recipes/model_card.py
        run_dir.mark_complete(out, settings)


if __name__ == "__main__":
    quiet.setup()  # library messages that are not the user's to act on (recipes/quiet.py)
    entry.run(main, make_parser(), rules)
