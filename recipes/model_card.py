"""The model card (README.md) of M_SFT, written by sft.py after saving.

Written here rather than by TRL's `create_model_card`, which assumes hub ids: for a local base model it printed
"fine-tuned version of [None](https://huggingface.co/None)", linked local files as hub datasets and loaded the
model "None" in its quick start. This card names the base model and data as given (links only for hub ids) and
has a quick start that loads this M_SFT offline from local paths.
"""

from __future__ import annotations

import json
import os
import re

import run_dir

MODES = {"system": "sent as the system role", "fold": "folded into the first user turn by the saved chat template",
         "off": "no system message"}  # chat_format.ChatFormat.mode
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A name with a data or weight file ending is a (possibly moved) local file, not a hub id.
FILE_ENDING = re.compile(r"\.(jsonl|json|parquet|csv|tsv|txt|arrow|safetensors|bin|gguf)$", re.I)


def hub_id(path: str) -> bool:
    """A hub id ("org/name") that is not a local path."""
    return not os.path.exists(path) and bool(HUB_ID.match(path)) and not FILE_ENDING.search(path)


def ref(path: str, kind: str = "") -> str:
    """`path` as code; a hub id also links to its hub page (kind "datasets/" for datasets)."""
    return f"[`{path}`](https://huggingface.co/{kind}{path})" if hub_id(path) else f"`{path}`"


def quick_start(out: str, base: str, is_adapter: bool, system_prompt: str | None, name: str = "M_SFT") -> list[str]:
    local = "" if hub_id(base) else ", local_files_only=True"
    load = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer" + (", GenerationConfig" if is_adapter else ""),
        *(["from peft import PeftModel"] if is_adapter else []),
        "",
        f"# paths as given to {'sft.py' if name == 'M_SFT' else 'dpo.py'}, relative to the folder it was run from",
        f'tokenizer = AutoTokenizer.from_pretrained("{out}", local_files_only=True)  # the training chat template',
    ]
    if is_adapter:
        load += [
            f'base = AutoModelForCausalLM.from_pretrained("{base}"{local})',
            f'model = PeftModel.from_pretrained(base, "{out}", local_files_only=True)  # {name}: LoRA adapter on M_base',
            f'model.generation_config = GenerationConfig.from_pretrained("{out}")  # stop tokens saved with {name}',
        ]
    else:
        load.append(f'model = AutoModelForCausalLM.from_pretrained("{out}", local_files_only=True)  # {name}')
    system = f'{{"role": "system", "content": {json.dumps(system_prompt)}}}, ' if system_prompt else ""
    load += [
        "",
        f'messages = [{system}{{"role": "user", "content": "How do I get back into my own locked-out email account?"}}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=200)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]
    return ["```python", *load, "```"]


def card(out: str, args, model_args, data_args, dataset: list[str], report, fmt=None, stage: dict | None = None) -> str:
    """The card's text. `args` is the SFTConfig (DPOConfig), `model_args` TRL's ModelConfig, `dataset` the source
    names; `stage` is dpo.py's {sft_model, base_model (None: M_SFT is a full model), beta, loss_type}."""
    base = model_args.model_name_or_path if not stage else stage["base_model"] or stage["sft_model"]
    is_adapter = bool(model_args.use_peft) if not stage else bool(stage["base_model"] or model_args.use_peft)
    method = "QLoRA" if model_args.load_in_4bit else "LoRA" if is_adapter else "full fine-tune"
    hyper = {
        "method": method,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "max_length": args.max_length,
        "packing": getattr(args, "packing", False),
        "seed": args.seed,
        **({"beta": stage["beta"], "loss_type": stage["loss_type"]} if stage else {}),
    }
    if stage and stage.get("lora"):  # dpo.py: the adapter actually trained (M_SFT's own, when continued)
        hyper.update(stage["lora"])
    elif is_adapter:
        hyper.update(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout)
    front = ["---", *([f"base_model: {base}"] if hub_id(base) else []),
             f"library_name: {'peft' if is_adapter else 'transformers'}",
             f"tags: [trl, {'dpo' if stage else 'sft'}, constitutional-ai]", "---"]
    name = os.path.basename(os.path.abspath(out))
    what = "a LoRA adapter on" if is_adapter else "a fine-tune of"
    lines = [
        *front,
        "",
        f"# {name}",
        "",
        f"M_SFT of the Constitutional AI recipe: {what} {ref(base)} (M_base), trained with TRL's `SFTTrainer` "
        "(recipes/sft.py) on constitutionally revised responses." if not stage else
        f"M_DPO of the Constitutional AI recipe: the preference stage after M_SFT {ref(stage['sft_model'])}, "
        f"{what} {ref(base)} (M_base), trained with TRL's `DPOTrainer` (recipes/dpo.py; reference model: M_SFT) "
        "on (chosen, rejected) answer pairs.",
        "",
        "## Quick start (offline)",
        "",
        *quick_start(out, base, is_adapter, None if fmt and fmt.mode == "off" else data_args.system_prompt,
                     "M_DPO" if stage else "M_SFT"),
        "",
        "Generation stops at the end-of-turn token saved in `generation_config.json`. Compare M_base and M_SFT "
        f"(docs/EVALUATION.md): `python recipes/evaluate.py --sft_model {out} --base_model {base} "
        "--test_file data/cai_test.jsonl --benign_file data/helpful_test.jsonl`." if not stage else
        "Generation stops at the end-of-turn token saved in `generation_config.json`. Compare M_base, M_SFT and "
        f"M_DPO (docs/EVALUATION.md): `python recipes/evaluate.py --sft_model {stage['sft_model']} --dpo_model {out} "
        f"--base_model {stage['base_model'] or '<M_base>'} --output_dir {out} --test_file data/cai_test.jsonl "
        "--benign_file data/helpful_test.jsonl`.",
        "",
        "## Constitutional AI " + ("preference stage (DPO)" if stage else "SFT"),
        "",
        f"- Base model (M_base): {ref(base)}",
        *([f"- Starting point and reference model (M_SFT): {ref(stage['sft_model'])}"] if stage else []),
        f"- Data: {', '.join(ref(d, 'datasets/') for d in dataset)} "
        f"({report.counts.get('train_examples_tokenized')} train / {report.counts.get('eval_examples_tokenized')} eval)",
        f"- System prompt: `{data_args.system_prompt}`" + (f" ({MODES[fmt.mode]})" if fmt else ""),
        f"- End-of-turn token: `{fmt.end_of_turn if fmt else args.eos_token}`; "
        + ("loss on the response and that token only" if not stage else "DPO loss on both answers, each closed by "
           "that token (DPOTrainer also scores the template text after it); the prompt is never trained")
        + (f"; stop tokens {fmt.stop_token_ids} in generation_config.json" if fmt else ""),
        "- Hyperparameters:",
        *[f"  - {k}: {v}" for k, v in hyper.items()],
        "",
        "Also in this folder: `loss_curves.png`, `metrics.jsonl`, `samples.jsonl`, `data_summary.json`, "
        "`train_results.json`, `eval_results.json`, and after evaluate.py `eval_report.md`.",
        "",
    ]
    return "\n".join(lines)


def write(trainer, model_args, data_args, dataset: list[str], report, fmt=None, stage: dict | None = None) -> str:
    """Write output_dir/README.md (replacing the one PEFT writes); returns its path."""
    out = trainer.args.output_dir
    path = os.path.join(out, "README.md")
    run_dir.write_text(path, card(out, trainer.args, model_args, data_args, dataset, report, fmt, stage))
    return path
