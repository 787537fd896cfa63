"""CPU training-step speed of the demo model by precision: fp32, bf16 autocast over fp32 weights, bf16 weights
(LoRA adapters kept in fp32 by peft). Forward + backward + AdamW step on the same LoRA batch, variants alternated
so machine load hits all alike; prints tokens/s per variant and ratios to fp32.

    python bench/cpu_dtype.py --model models/SmolLM2-135M-Instruct --reps 4 --batch 8 --length 112
"""

import argparse
import contextlib
import statistics
import time

import torch


def build(model_path: str, dtype, lora_r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def step(model, opt, ids, autocast: bool) -> float:
    t = time.perf_counter()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=112)
    ap.add_argument("--lora_r", type=int, default=16)
    ns = ap.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 49000, (ns.batch, ns.length))
    variants = {
        "fp32": (build(ns.model, torch.float32, ns.lora_r), False),
        "fp32 + bf16 autocast": (build(ns.model, torch.float32, ns.lora_r), True),
        "bf16 weights": (build(ns.model, torch.bfloat16, ns.lora_r), False),
    }
    times = {k: [] for k in variants}
    for (model, opt), autocast in variants.values():  # warm-up: first-call kernel selection
        step(model, opt, ids, autocast)
    for _ in range(ns.reps):
        for name, ((model, opt), autocast) in variants.items():
            times[name].append(step(model, opt, ids, autocast))
    base = statistics.median(times["fp32"])
    tokens = ns.batch * ns.length
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} {tokens / med:8.0f} tok/s  x{base / med:.2f} vs fp32  (s/step: {', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
