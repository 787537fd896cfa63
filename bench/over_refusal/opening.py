"""Can the demo's model learn *when* to refuse? A diagnostic for the over-refusal of docs/EVALUATION.md.

It trains the demo's LoRA (sft_demo.yaml: rank, alpha, modules, top layers, system prompt) on the opening tokens of
each answer only (the first --tokens of every red-team revision and benign completion in the bundled training files),
so every optimizer step is spent on the refuse-or-help decision, and every --every steps prints how often "I" (the
first token of most revisions, and of none of the benign completions) is the most likely first answer token: on 40
training prompts of each kind and on the 60 + 60 development prompts of this folder. A model that tells the two
kinds apart shows "I" for harmful prompts and not for benign ones. Not a recipe: M_SFT must learn whole answers.

    python bench/over_refusal/opening.py                      # 150 steps of 16, lr 1e-3: ~11 min on 2 cores
    python bench/over_refusal/opening.py --steps 60 --lr 3e-4
"""

import argparse
import json
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, os.path.join(ROOT, "recipes"))

import quiet  # noqa: E402


def read_jsonl(path, prompt_key, answer_key=None):
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found; restore it from the repository")
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [(r[prompt_key], r[answer_key] if answer_key else "") for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3, help="constant, AdamW")
    ap.add_argument("--tokens", type=int, default=3, help="opening answer tokens trained on")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--every", type=int, default=50)
    ns = ap.parse_args()
    quiet.setup()
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(ROOT, "recipes", "smollm2-135m", "sft_demo.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    base = os.path.join(ROOT, cfg["model_name_or_path"])
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise SystemExit(f"{base}: no model; run `make model` first")
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    n = model.config.num_hidden_layers
    lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0,
                      target_modules=cfg["lora_target_modules"], task_type="CAUSAL_LM",
                      layers_to_transform=list(range(n - cfg["lora_top_layers"], n)))
    model = get_peft_model(model, lora)
    system = [{"role": "system", "content": cfg["system_prompt"]}]

    def prompt_ids(prompt):
        text = tok.apply_chat_template(system + [{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids

    harm = read_jsonl(os.path.join(ROOT, "data", "cai_train.jsonl"), "prompt", "revision_response")
    benign = read_jsonl(os.path.join(ROOT, "data", "helpful_train.jsonl"), "prompt", "completion")
    examples = []
    for prompt, answer in harm + benign:
        p, a = prompt_ids(prompt), tok(answer, add_special_tokens=False).input_ids[: ns.tokens]
        examples.append((p + a, [-100] * len(p) + a))
    probes = {"train harmful": rng.sample(harm, 40), "train benign": rng.sample(benign, 40),
              "dev harmful": read_jsonl(os.path.join(HERE, "dev_harm.jsonl"), "prompt"),
              "dev benign": read_jsonl(os.path.join(HERE, "dev_benign.jsonl"), "prompt")}
    first_i = tok.convert_tokens_to_ids("I")

    def report(step):
        model.eval()
        parts = []
        for name, rows in probes.items():
            top = 0
            for prompt, _ in rows:
                with torch.no_grad():
                    top += int(model(torch.tensor([prompt_ids(prompt)])).logits[0, -1].argmax() == first_i)
            parts.append(f"{name} {top}/{len(rows)}")
        print(f"step {step:4d}: first token 'I' is the most likely on " + ", ".join(parts), flush=True)
        model.train()

    report(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ns.lr)
    model.train()
    for step in range(1, ns.steps + 1):
        batch = rng.sample(examples, ns.batch_size)
        width = max(len(ids) for ids, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % ns.every == 0:
            report(step)


if __name__ == "__main__":
    main()
