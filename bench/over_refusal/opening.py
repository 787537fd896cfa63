"""Can the demo's model learn *when* to refuse? A diagnostic for the over-refusal of docs/EVALUATION.md.

It trains the demo's LoRA (sft_demo.yaml: rank, alpha, dropout, modules, top layers, system prompt, rendered by the
recipe's chat format) on the opening tokens of each answer only: the first --tokens of every red-team revision and
every benign completion of the YAML's two training files (all rows, about half and half, no jailbreak wrapping; the
demo samples 0.64/0.36 and wraps a fifth), so every optimizer step is spent on the refuse-or-help decision, and every --every steps prints how often "I" (the
first token of most revisions, and of none of the benign completions) is the most likely first answer token: on 40
training prompts of each kind and on the 60 + 60 development prompts of this folder. A model that tells the two
kinds apart shows "I" for harmful prompts and not for benign ones. Not a recipe: M_SFT must learn whole answers.

    python bench/over_refusal/opening.py                      # 150 steps of 16, lr 1e-3: ~11 min on 2 cores
    python bench/over_refusal/opening.py --steps 60 --lr 3e-4
"""

import argparse
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, os.path.join(ROOT, "recipes"))

import cai_data  # noqa: E402
import chat_format  # noqa: E402
import quiet  # noqa: E402
from probe import DEMO_YAML  # noqa: E402 - the sibling probe's one home for the demo YAML's path


def pairs(path, answer_key=None):
    """(prompt, answer) of each row; answer_key None: prompts only."""
    try:
        rows = cai_data.read_json_lines(path)
    except (cai_data.DataError, OSError) as e:
        raise SystemExit(f"{path}: {e}; restore it from the repository") from None
    for i, r in enumerate(rows):
        missing = [k for k in ("prompt", answer_key) if k and k not in r]
        if missing:
            raise SystemExit(f"{path}: row {i} has no {missing[0]!r}")
    return [(r["prompt"], r[answer_key] if answer_key else "") for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3, help="constant, AdamW")
    ap.add_argument("--tokens", type=int, default=3, help="opening answer tokens trained on")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--every", type=int, default=50, help="report every N steps (and after the last)")
    ns = ap.parse_args()
    for name in ("steps", "tokens", "batch_size", "every"):
        if getattr(ns, name) < 1:
            ap.error(f"--{name} must be at least 1")
    quiet.setup()
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(DEMO_YAML, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    need = ["model_name_or_path", "system_prompt", "datasets", "lora_r", "lora_alpha", "lora_target_modules"]
    missing = [k for k in need if k not in cfg]
    if missing or len(cfg["datasets"]) != 2:
        raise SystemExit(f"{DEMO_YAML}: needs {missing or 'two datasets (red-team, benign)'}; restore it")
    base = os.path.join(ROOT, cfg["model_name_or_path"])
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise SystemExit(f"{base}: no model; run `make model` first")
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    n, top = model.config.num_hidden_layers, cfg.get("lora_top_layers")
    lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg.get("lora_dropout", 0.0),
                      target_modules=cfg["lora_target_modules"], task_type="CAUSAL_LM",
                      layers_to_transform=list(range(max(0, n - top), n)) if top else None)  # as sft.peft_config
    model = get_peft_model(model, lora)
    fmt = chat_format.ChatFormat.detect(tok, cfg["system_prompt"])  # the recipe's rendering and tokenizing

    def messages(prompt):
        return fmt.prompt_messages(cai_data.prompt_messages(prompt, cfg["system_prompt"]))

    files = [os.path.join(ROOT, d["data_files"]["train"]) for d in cfg["datasets"]]
    harm, benign = pairs(files[0], "revision_response"), pairs(files[1], "completion")
    examples = []
    for prompt, answer in harm + benign:
        p, c = fmt.tokenize(messages(prompt), answer)
        examples.append((p + c[: ns.tokens], [-100] * len(p) + c[: ns.tokens]))
    probes = {"train red-team": rng.sample(harm, 40), "train benign": rng.sample(benign, 40),
              "dev harmful": pairs(os.path.join(HERE, "dev_harm.jsonl")),
              "dev benign": pairs(os.path.join(HERE, "dev_benign.jsonl"))}
    probes = {name: [fmt.prompt_ids(messages(p)) for p, _ in rows] for name, rows in probes.items()}  # once
    first_i = tok.convert_tokens_to_ids("I")

    def report(step):
        model.eval()
        parts = []
        for name, rows in probes.items():
            with torch.no_grad():
                hits = sum(int(model(torch.tensor([ids])).logits[0, -1].argmax() == first_i) for ids in rows)
            parts.append(f"{name} {hits}/{len(rows)}")
        print(f"step {step:4d}: first token 'I' is the most likely on " + ", ".join(parts), flush=True)
        model.train()

    report(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ns.lr)
    model.train()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for step in range(1, ns.steps + 1):
        batch = rng.sample(examples, ns.batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % ns.every == 0 or step == ns.steps:
            report(step)


if __name__ == "__main__":
    main()
