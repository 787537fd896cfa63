"""Attention over a packed batch: forward + backward of the demo model on the same documents, padded (plain TRL),
packed with transformers' sdpa (one block-diagonal mask over the flattened row) and packed with the recipe's
sdpa_varlen (one causal SDPA call per document). Steps alternate, so machine load hits all three alike.

    python bench/attention.py --model models/SmolLM2-135M-Instruct --reps 6

Document lengths are those of a seeded batch of the bundled CAI data rendered with the model's chat template (the
recipe's own path, sft.prepare, ends at the end-of-turn token: one token shorter); token ids are
random (content does not change the cost). Prints tokens/s (non-pad) per layout and the per-rep ratios.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))


def batch_lengths(tokenizer_dir: str, batch: int, seed: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "cai_train.jsonl"))]
    rows = random.Random(seed).sample(rows, batch)
    system = {"role": "system", "content": "You are a helpful assistant aligned with constitutional principles."}
    return [
        len(tok.apply_chat_template([system, *r["messages"]], tokenize=True, return_dict=True)["input_ids"])
        for r in rows
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import varlen_attention

    varlen_attention.register()
    torch.manual_seed(ns.seed)
    lens = batch_lengths(ns.model, ns.batch, ns.seed)
    total, longest = sum(lens), max(lens)
    flat = torch.randint(100, 10000, (1, total))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    bounds = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    padded = torch.zeros(ns.batch, longest, dtype=torch.long)
    mask = torch.zeros_like(padded)
    start = 0
    for i, n in enumerate(lens):
        padded[i, :n], mask[i, :n] = flat[0, start : start + n], 1
        start += n

    sdpa = AutoModelForCausalLM.from_pretrained(ns.model, attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_pretrained(ns.model, attn_implementation="sdpa_varlen")
    layouts = {
        "padded (sdpa)": lambda: sdpa(input_ids=padded, attention_mask=mask, use_cache=False),
        "packed, sdpa": lambda: sdpa(input_ids=flat, position_ids=pos, use_cache=False),
        "packed, sdpa_varlen": lambda: varlen(input_ids=flat, position_ids=pos, use_cache=False, **bounds),
    }
    times = {k: [] for k in layouts}
    for rep in range(ns.reps + 1):
        for name, forward in layouts.items():
            t = time.perf_counter()
            forward().logits.float().mean().backward()
            if rep:  # rep 0 is warm-up
                times[name].append(time.perf_counter() - t)

    print(f"{ns.batch} documents, lengths {lens}: {total} tokens; padded {ns.batch} x {longest} = "
          f"{ns.batch * longest} positions ({1 - total / (ns.batch * longest):.1%} padding); "
          f"torch threads {torch.get_num_threads()}, {ns.reps} reps")  # fmt: skip
    base = times["padded (sdpa)"]
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts)]
        print(f"  {name:<22} {total / statistics.median(ts):7.1f} tokens/s   x{statistics.median(ratios):.2f} vs padded "
              f"(per rep {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
