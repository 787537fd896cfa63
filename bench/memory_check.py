"""recipes/memory.py's estimate next to what one CPU training step of the real model actually holds.

    python bench/memory_check.py [--model models/SmolLM2-135M-Instruct] [--batch 8] [--seq 116] [--full]

Measures, in one process, for one forward + backward of LoRA (or --full) with TRL's fused LM head:
  saved tensors   bytes autograd keeps for backward at the end of the forward (parameters excluded)
                  -> compared with the estimate's activations term
  peak increase   CPU: peak RSS minus RSS before the model was loaded; GPU (bf16 weights, no autocast):
                  torch.cuda.max_memory_allocated minus allocated before -> compared with the estimate's total
CPU RSS also holds freed-but-cached allocator blocks and backward transients, so it reads higher than the live
tensors; a GPU's torch.cuda.max_memory_allocated (not measured here: no GPU) is the number the estimate targets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=116, help="padded length (116: the longest demo batch of 8)")
    ap.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA r=16 on all linear layers")
    ap.add_argument("--checkpointing", action="store_true")
    ns = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    import memory

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32  # the GPU run is the bf16 one the estimate is for
    before = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(ns.model, dtype=dtype, device_map="cuda" if cuda else None)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    if ns.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not ns.full:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ALL_LINEAR))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (ns.batch, ns.seq), device=model.device)
    labels = ids.clone()
    labels[:, : ns.seq // 3] = -100  # a prompt, as in SFT

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    optimizer.step()  # allocates the AdamW states
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    config = memory.load_config(ns.model)
    setup = memory.Setup(
        method="full" if ns.full else "lora", seq_len=ns.seq, micro_batch=ns.batch,
        weights_dtype="bfloat16" if cuda else "float32", lora_r=16, lora_dropout=0.05,
        lora_target_modules=ALL_LINEAR, device="cuda" if cuda else "cpu",
        activation_checkpointing=ns.checkpointing,
    )  # fmt: skip
    est = memory.estimate(config, setup)
    mib = 2**20
    result = {
        "model": os.path.basename(ns.model.rstrip("/")),
        "method": setup.method,
        "batch": [ns.batch, ns.seq],
        "activation_checkpointing": ns.checkpointing,
        "saved_tensors_MiB": sum(seen.values()) / mib,
        "estimated_activations_MiB": est.activations / mib,
        "device": "cuda" if cuda else "cpu",
        "peak_increase_MiB": (peak - before) / mib,  # RSS on CPU, max_memory_allocated on GPU
        "estimated_total_MiB": est.total / mib,
        "estimate_terms_MiB": {k: getattr(est, k) / mib for k in ("weights", "gradients", "optimizer", "activations",
                                                                   "logits")},  # fmt: skip
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
