"""Random weights for a model folder that holds only config.json (and a tokenizer): a stand-in for throughput and
memory benchmarks where the real weights cannot be downloaded (no hub here, none on the GPU machine either).

    python tools/make_standin.py --output /tmp/mistral-7b-random   # Mistral-7B-v0.1's config + stand-in tokenizer
    python bench/random_model.py /tmp/mistral-7b-random             # + 14.5 GB of random bf16 weights

The weights are initialised on the GPU when there is one (seconds for 7B; minutes on a CPU) and saved as
safetensors, so that from_pretrained (and its 4-bit quantization for QLoRA) loads them like a real checkpoint.
Speed and memory do not depend on the values; the losses are meaningless.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a folder holding config.json; the weights are written into it")
    ap.add_argument("--dtype", default="bfloat16")
    ns = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(ns.folder, "config.json")):
        sys.exit(f"{ns.folder}: no config.json. Make one first (python tools/make_standin.py --output {ns.folder}).")
    held = glob.glob(os.path.join(ns.folder, "*.safetensors")) + glob.glob(os.path.join(ns.folder, "*.bin"))
    if held:
        sys.exit(f"{ns.folder} already holds weights ({os.path.basename(held[0])}); this tool never overwrites them.")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.from_pretrained(ns.folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, ns.dtype))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(ns.folder)
    print(f"{ns.folder}: {n:,} random {ns.dtype} parameters, made on {device} and saved in {time.time() - t:.0f}s")


if __name__ == "__main__":
    main()
