"""Checks that run before any weights load, the dry-run preview, and safe checkpoint/save helpers."""

from __future__ import annotations

import json
import os
import sys

COMPLETE_MARKER = "cai_sft_complete.json"


def bf16_available() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def validate(script_args, training_args, model_args, data_args, recipe_args) -> None:
    """Refuse configurations we cannot honour, one clear message per problem, before loading weights."""
    problems = []
    if model_args.model_name_or_path is None:
        problems.append("model_name_or_path: not set. Point it at a hub id or a local model folder.")
    if problems:
        raise SystemExit("Configuration problems:\n" + "\n".join(f"  - {p}" for p in problems))


def accumulation_for(global_batch_size: int, per_device: int, world_size: int) -> int:
    """Gradient accumulation that keeps `global_batch_size` fixed whatever the number of processes."""
    per_step = per_device * world_size
    if global_batch_size % per_step:
        raise SystemExit(
            f"global_batch_size: {global_batch_size} is not a multiple of per_device_train_batch_size "
            f"({per_device}) x processes ({world_size}) = {per_step}. Pick a global batch size divisible by it, "
            "or change per_device_train_batch_size."
        )
    return global_batch_size // per_step


def checkpoint_to_resume(training_args):
    """`resume_from_checkpoint` as given, else None (a fresh run)."""
    return training_args.resume_from_checkpoint


def save_model_atomically(trainer, output_dir: str) -> None:
    trainer.save_model(output_dir)


def mark_complete(output_dir: str) -> None:
    with open(os.path.join(output_dir, COMPLETE_MARKER), "w") as f:
        json.dump({"complete": True}, f)


def _render_labels(tokenizer, ids, labels, color: bool) -> str:
    """Decode an example with the trained tokens highlighted (green in a terminal, [[...]] otherwise)."""
    out, run, trained = [], [], None
    for t, lab in zip(ids, labels):
        is_trained = lab != -100
        if trained is not None and is_trained != trained:
            out.append((trained, tokenizer.decode(run)))
            run = []
        run.append(t)
        trained = is_trained
    if run:
        out.append((trained, tokenizer.decode(run)))
    if color:
        return "".join(f"\033[1;32m{s}\033[0m" if tr else f"\033[2m{s}\033[0m" for tr, s in out)
    return "".join(f"[[{s}]]" if tr else s for tr, s in out)


def write_preview(train_ds, tokenizer, training_args, model_args, report) -> str:
    """preview.jsonl: one {"input_ids", "labels"} per training example, exactly as the collator receives them."""
    path = os.path.join(training_args.output_dir, "preview.jsonl")
    with open(path, "w") as f:
        for ex in train_ds:
            f.write(json.dumps({"input_ids": ex["input_ids"], "labels": ex["labels"], "source": ex["source"],
                                "row": ex["row"]}) + "\n")
    first = train_ds[0]
    print("\nFirst training example (trained tokens highlighted):")
    print(_render_labels(tokenizer, first["input_ids"], first["labels"], sys.stdout.isatty()))
    print(f"\nDry run: wrote {len(train_ds)} examples to {path}; no weights were loaded.")
    return path
