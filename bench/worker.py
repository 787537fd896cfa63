"""One benchmark run, in its own process so that its memory peak is its own (bench/run.py starts it).

    python bench/worker.py recipe --config X.yaml --steps 3 --result r.json [-- --packing true ...]
    python bench/worker.py trl    --config X.yaml --steps 3 --result r.json [-- --per_device_train_batch_size 4]
    python bench/worker.py dpo-recipe --config recipes/mistral-7b/dpo_qlora.yaml --steps 3 --result r.json [-- ...]
    python bench/worker.py dpo-trl    --config recipes/mistral-7b/dpo_qlora.yaml --steps 3 --result r.json [-- ...]

`recipe` runs recipes/sft.py's own `main()` (data loading, prepare, build_trainer, train) with the given
overrides. `trl` is the baseline: plain `SFTTrainer` with its defaults (padding, no packing, default attention),
given the same (prompt, completion) pairs as TRL's standard conversational `prompt`/`completion` columns so that it
builds its own completion-only labels; it shares the YAML's model, dtype, LoRA, batch size, learning rate,
max_length, gradient checkpointing and seed. Neither run evaluates or saves: only the training steps are measured.

`dpo-recipe` / `dpo-trl` are the same pair for the preference stage: recipes/dpo.py's `main()` against plain
`DPOTrainer` given the same (prompt, chosen, rejected) conversations, with the YAML's model, dtype, quantization,
LoRA, batch (global_batch_size as the recipe derives it), learning rate, beta, loss, max_length and checkpointing.
"Trained tokens" of a DPO batch are its answer tokens (completion_mask) of chosen and rejected; data prep is the
reading and checking before the trainer (DPOTrainer's own tokenization, the same in both, is not in it). The recipe
run saves M_DPO as usual (an adapter; outside the timed steps).

Measured (written to --result as JSON):
  trained tokens   label != -100 in the batches of steps 2..N, per second of those steps (step 1 is warm-up)
  total tokens     non-pad tokens (prompt + response) of the same steps, per second
  padding fraction pad tokens / all token positions processed, over all steps
  peak memory      ru_maxrss of this process on CPU (torch.cuda.max_memory_allocated on GPU)
  first step       wall time from process start to the end of the first optimizer step
  data prep        examples (train + eval) / seconds spent reading, templating, tokenizing and packing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time

import psutil

PROCESS_START = psutil.Process().create_time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Meter:
    def __init__(self):
        self.prep_s = 0.0
        self._depth = 0
        self.examples = 0
        self.step_end: dict[int, float] = {}
        self.trained = self.real = self.positions = 0  # steps >= 2
        self.all_real = self.all_positions = 0  # every step
        self.rss_before_model = None
        self.largest_batch = (0, 0)  # (rows, positions per row) of the largest micro-batch

    @contextlib.contextmanager
    def prep(self):
        """Time data preparation; nested calls count once."""
        self._depth += 1
        t = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.prep_s += time.perf_counter() - t

    def batch(self, step_before: int, inputs: dict):
        ids = inputs["input_ids"]
        positions = ids.numel()
        # Padding-free batches have no attention_mask and no pad (pad_to_multiple_of is left unset here).
        real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else positions
        self.all_real += real
        if ids.numel() > self.largest_batch[0] * self.largest_batch[1]:
            self.largest_batch = tuple(ids.shape)
        self.all_positions += positions
        if step_before >= 1:
            # SFT batches carry labels; DPO batches mark the answer tokens of chosen and rejected in completion_mask
            trained = inputs["labels"] != -100 if "labels" in inputs else inputs["completion_mask"].bool()
            self.trained += int(trained.sum())
            self.real += real
            self.positions += positions


def wrap_timed(owner, name, meter):
    fn = getattr(owner, name)

    def timed(*a, **k):
        with meter.prep():
            return fn(*a, **k)

    setattr(owner, name, timed)


def instrument(trainer, meter):
    """Count the tokens of every micro-batch, time every optimizer step, skip evaluation."""
    from transformers import TrainerCallback

    inner = trainer.training_step

    def training_step(model, inputs, *a, **k):
        meter.batch(trainer.state.global_step, inputs)
        return inner(model, inputs, *a, **k)

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.step_end[state.global_step] = time.time()

    trainer.training_step = training_step
    trainer.add_callback(StepTimer())
    trainer.evaluate = lambda *a, **k: {}


def memory_now() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return psutil.Process().memory_info().rss


def peak_memory() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def bench_args(config: str, steps: int, out_dir: str, overrides: list[str]) -> list[str]:
    return [
        "--config", config, *overrides,
        "--max_steps", str(steps), "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
        "--num_sample_prompts", "0", "--output_dir", out_dir, "--report_to", "none",
        "--logging_steps", str(steps), "--disable_tqdm", "true",
        "--rebuild_data_cache", "true",  # data prep measured every run, never a cache hit of an earlier run
    ]  # fmt: skip


def run_recipe(parsed, meter):
    import cai_data
    import sft
    from trl import SFTTrainer

    wrap_timed(cai_data, "load_pairs", meter)
    wrap_timed(sft, "prepare", meter)
    wrap_timed(SFTTrainer, "_prepare_dataset", meter)  # also TRL's packing inside SFTTrainer.__init__
    build = sft.build_trainer

    def build_trainer(training_args, model_args, recipe_args, tokenizer, train_ds, eval_ds, eval_rows):
        meter.examples = len(train_ds) + (len(eval_ds) if eval_ds is not None else 0)
        meter.rss_before_model = memory_now()
        trainer = build(training_args, model_args, recipe_args, tokenizer, train_ds, eval_ds, eval_rows)
        instrument(trainer, meter)
        return trainer

    sft.build_trainer = build_trainer
    sft.save = lambda *a, **k: None
    return sft.main(*parsed)


def run_trl(parsed, meter):
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer, get_peft_config, get_quantization_config

    import cai_data
    import chat_format

    script_args, targs, model_args, data_args, _ = parsed
    wrap_timed(SFTTrainer, "_prepare_dataset", meter)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    tokenizer.chat_template = chat_format.load_tokenizer(model_args.model_name_or_path, targs.chat_template_path).chat_template
    with meter.prep():
        # The same pairs as the recipe (same mixture, system prompt, eval split), as TRL's standard columns.
        train, evals, _ = cai_data.load_pairs(script_args, data_args, targs.seed)
        train_ds = datasets.Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in train])
        eval_ds = datasets.Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in evals])
    meter.examples = len(train_ds) + len(eval_ds)
    args = SFTConfig(**baseline_settings(
        targs,
        gradient_accumulation_steps=targs.gradient_accumulation_steps,
        gradient_checkpointing=targs.gradient_checkpointing,  # TRL defaults to True; a trade-off, so matched
        model_init_kwargs={"dtype": model_args.dtype},  # same weights dtype as the recipe
    ))
    meter.rss_before_model = memory_now()  # before the trainer loads the model
    return train_baseline(SFTTrainer(
        model=model_args.model_name_or_path,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    ), meter)


def baseline_settings(targs, **specific) -> dict:
    """The settings both plain-TRL baselines take from the recipe's YAML (plus their own): same steps, batch, learning
    rate, length, seed and precision; no evaluation or saving."""
    return dict(
        output_dir=targs.output_dir,
        max_steps=targs.max_steps,
        per_device_train_batch_size=targs.per_device_train_batch_size,
        learning_rate=targs.learning_rate,
        lr_scheduler_type=targs.lr_scheduler_type,
        warmup_steps=targs.warmup_steps,
        max_length=targs.max_length,
        seed=targs.seed,
        bf16=targs.bf16,
        use_cpu=targs.use_cpu,  # bf16 on a CPU needs it, as in the recipe
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=targs.logging_steps,
        disable_tqdm=True,
        dataloader_num_workers=targs.dataloader_num_workers,
        **specific,
    )


def train_baseline(trainer, meter):
    instrument(trainer, meter)
    trainer.train()
    return trainer


def run_dpo_recipe(parsed, meter):
    import cai_data
    import dpo

    wrap_timed(cai_data, "load_pairs", meter)
    wrap_timed(dpo, "prepare", meter)
    build = dpo.build_trainer

    def build_trainer(training_args, model_args, recipe_args, base, tokenizer, train_ds, eval_ds, sample_rows):
        meter.examples = len(train_ds) + (len(eval_ds) if eval_ds is not None else 0)
        meter.rss_before_model = memory_now()
        trainer = build(training_args, model_args, recipe_args, base, tokenizer, train_ds, eval_ds, sample_rows)
        instrument(trainer, meter)
        return trainer

    dpo.build_trainer = build_trainer
    return dpo.main(*parsed)


def run_dpo_trl(parsed, meter):
    from trl import DPOConfig, DPOTrainer, get_peft_config, get_quantization_config

    import cai_data
    import chat_format
    import checks

    script_args, targs, model_args, data_args, recipe_args, pref_args = parsed
    tokenizer = chat_format.load_tokenizer(model_args.model_name_or_path, pref_args.chat_template_path)
    with meter.prep():
        # The same pairs as the recipe (same mixture, system prompt, eval split), as TRL's conversational columns.
        train, evals, _ = cai_data.load_pairs(script_args, data_args, targs.seed, preference=True)
        train_ds = train.rename_column("completion", "chosen").select_columns(["prompt", "chosen", "rejected"])
    meter.examples = len(train_ds) + (len(evals) if evals is not None else 0)
    accumulation = targs.gradient_accumulation_steps
    if recipe_args.global_batch_size:  # the same optimizer batch as the recipe (the bench runs one process)
        accumulation = checks.accumulation_for(recipe_args.global_batch_size, targs.per_device_train_batch_size, 1)
    args = DPOConfig(**baseline_settings(
        targs,
        gradient_accumulation_steps=accumulation,
        beta=targs.beta,
        loss_type=targs.loss_type,
        optim=targs.optim,
        activation_checkpointing=targs.activation_checkpointing,
        activation_checkpointing_kwargs=targs.activation_checkpointing_kwargs,
        model_init_kwargs={"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation},
    ))
    meter.rss_before_model = memory_now()  # before the trainer loads the model
    return train_baseline(DPOTrainer(
        model=model_args.model_name_or_path,
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    ), meter)


RUNNERS = {"recipe": run_recipe, "trl": run_trl, "dpo-recipe": run_dpo_recipe, "dpo-trl": run_dpo_trl}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=list(RUNNERS))
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--result", required=True)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ns = ap.parse_args(argv[:cut])
    ns.overrides = argv[cut + 1 :]  # recipe CLI overrides after --, e.g. -- --packing true

    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    recipe = __import__("dpo" if ns.mode.startswith("dpo") else "sft")

    meter = Meter()
    with tempfile.TemporaryDirectory() as out:
        parsed = recipe.make_parser().parse_args_and_config(bench_args(ns.config, ns.steps, out, ns.overrides))
        trainer = RUNNERS[ns.mode](parsed, meter)
    peak, peak_kind = peak_memory()
    steps = sorted(meter.step_end)
    if len(steps) < 2:
        raise SystemExit(f"need at least 2 optimizer steps to time, got {len(steps)}")
    timed_s = meter.step_end[steps[-1]] - meter.step_end[steps[0]]
    targs = parsed[1]
    result = {
        "mode": ns.mode,
        "overrides": ns.overrides,
        "steps": len(steps),
        "timed_steps": len(steps) - 1,
        "timed_seconds": timed_s,
        "step_seconds": [meter.step_end[b] - meter.step_end[a] for a, b in zip(steps, steps[1:])],
        "trained_tokens": meter.trained,
        "total_tokens": meter.real,
        "trained_tokens_per_s": meter.trained / timed_s,
        "total_tokens_per_s": meter.real / timed_s,
        "tokens_per_step": meter.real / (len(steps) - 1),
        "padding_fraction": 1 - meter.all_real / meter.all_positions,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "memory_before_model_bytes": meter.rss_before_model,
        "first_step_seconds": meter.step_end[steps[0]] - PROCESS_START,
        "prep_examples": meter.examples,
        "prep_seconds": meter.prep_s,
        "prep_examples_per_s": meter.examples / meter.prep_s,
        "packing": bool(getattr(trainer.args, "packing", False)),
        "padding_free": bool(getattr(trainer, "padding_free", False)),
        "gradient_checkpointing": bool(targs.gradient_checkpointing),
        "attn_implementation": trainer.model.config._attn_implementation,
        "per_device_train_batch_size": targs.per_device_train_batch_size,
        "max_length": targs.max_length,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    result.update(memory_estimate(parsed, meter, result))
    with open(ns.result, "w") as f:
        json.dump(result, f, indent=2)


def memory_estimate(parsed, meter, result) -> dict:
    """recipes/memory.py's estimate for the largest micro-batch this run saw, next to the measured increase."""
    import memory

    targs, model_args = parsed[1], parsed[2]
    rows, positions = meter.largest_batch
    config = memory.load_config(model_args.model_name_or_path)
    device = result["device"]
    setup = memory.setup_from_args(targs, model_args, config, micro_batch=rows, seq_len=positions, device=device,
                                   attn_implementation=result["attn_implementation"])  # fmt: skip
    est = memory.estimate(config, setup)
    return {
        "largest_batch": [rows, positions],
        "memory_estimate_bytes": est.total,
        "memory_estimate_terms": {k: v for k, v in est.to_dict().items() if isinstance(v, float)},
        "memory_measured_increase_bytes": result["peak_memory_bytes"] - meter.rss_before_model,
    }


if __name__ == "__main__":
    main()
