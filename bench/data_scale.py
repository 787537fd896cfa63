"""Data preparation at the sizes users train on: the recipe's `--dry_run` against plain TRL, in the same run.

Makes N rows from the bundled data (unique prompts; answers of one to four bundled revisions; schema pc, cai or
messages), then runs, each in a fresh process tree, with `dataset_num_proc` workers:
- recipe: `recipes/sft.py --dry_run` (read, check, split, dedupe, render, tokenize apart, labels, length policy,
  cache), first run and re-run (the data cache's hit);
- trl: `datasets.load_dataset("json")` -> conversational rows with the same system prompt -> TRL's `SFTTrainer`
  preparing them (tokenization by its chat template, its own completion mask), first run and re-run (datasets'
  cache); a one-layer model, so the time is the data's.
For each: wall time and the peak RSS of the whole process tree (sampled every 0.1 s). The ratios are what to read.

    python bench/data_scale.py --rows 100000 --num_proc 2          # ~8 min on 2 cores
    python bench/data_scale.py --rows 1000000 --num_proc 2 --only recipe
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "You are a helpful assistant aligned with constitutional principles."
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")

TRL_SCRIPT = r'''
import sys, datasets, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer
data, model_dir, out, num_proc, max_length, system = sys.argv[1:7]
tok = AutoTokenizer.from_pretrained(model_dir)
ds = datasets.load_dataset("json", data_files=data, split="train")
def conv(b):
    return {"prompt": [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in b["prompt"]],
            "completion": [[{"role": "assistant", "content": c}] for c in b["completion"]]}
ds = ds.map(conv, batched=True, num_proc=int(num_proc), remove_columns=ds.column_names)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
args = SFTConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", dataset_num_proc=int(num_proc),
                 max_length=int(max_length), max_steps=1)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
print("trl examples", len(trainer.train_dataset))
'''


def make_rows(n: int, schema: str, path: str, seed: int = 0) -> None:
    """n rows with unique prompts from the bundled red-team and benign data, streamed to `path`."""
    pairs = []
    for name in ("cai_train.jsonl", "helpful_train.jsonl"):
        with open(os.path.join(ROOT, "data", name), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                pairs.append((r.get("prompt") or r["init_prompt"], r.get("completion") or r["revision_response"]))
    answers = [a for _, a in pairs]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = f"{pairs[i % len(pairs)][0]} (case {i})"
            answer = " ".join(rng.sample(answers, rng.randint(1, 4)))
            if schema == "pc":
                row = {"prompt": prompt, "completion": answer}
            elif schema == "cai":
                row = {"init_prompt": prompt, "prompt": prompt, "init_response": "Sure.", "revision_response": answer}
            else:
                row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            f.write(json.dumps(row) + "\n")


def measure(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in GB of the process and all its children together, the same without file-backed
    and shared pages: RSS counts the pages of memory-mapped Arrow files each process reads, page cache that the
    kernel can drop, and a forked worker's pages shared with its parent once per process)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak, peak_anon, out = 0, 0, []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            infos = [p.memory_info() for p in [root, *root.children(recursive=True)]]
            peak = max(peak, sum(m.rss for m in infos))
            peak_anon = max(peak_anon, sum(m.rss - m.shared for m in infos))
        except psutil.Error:
            pass
        time.sleep(0.1)
    reader.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{''.join(out[-40:])}")
    return wall, peak / 1e9, peak_anon / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--schema", choices=["pc", "cai", "messages"], default="pc")
    ap.add_argument("--num_proc", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--model", default=MODEL, help="Tokenizer and chat template (default: the embedded SmolLM2).")
    ap.add_argument("--only", choices=["recipe", "trl"], help="Run one side only.")
    ap.add_argument("--work", help="Folder for the rows and caches (default: a new temporary folder, removed).")
    ap.add_argument("--out", help="Also write the results as JSON here.")
    ns = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(ns.model, "tokenizer.json")):
        raise SystemExit(f"{ns.model}: no tokenizer. Run `make model` first, or pass --model.")
    work = ns.work or tempfile.mkdtemp(prefix="data_scale-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, f"rows-{ns.rows}-{ns.schema}.jsonl")
    if not os.path.exists(data):
        make_rows(ns.rows, ns.schema, data)
    print(f"{ns.rows} {ns.schema} rows: {data} ({os.path.getsize(data) / 1e6:.0f} MB)", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": os.path.join(work, "hf"),
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    py = sys.executable
    results = {"rows": ns.rows, "schema": ns.schema, "num_proc": ns.num_proc, "max_length": ns.max_length}
    for side in ("recipe", "trl"):
        if ns.only and side != ns.only:
            continue
        for cache in ("cache", "hf"):  # a first run prepares from scratch, also in a reused --work folder
            shutil.rmtree(os.path.join(work, cache), ignore_errors=True)
        for run in ("first", "rerun"):
            out_dir = os.path.join(work, f"{side}-{run}")
            shutil.rmtree(out_dir, ignore_errors=True)
            if side == "recipe":
                cmd = [py, "recipes/sft.py", "--model_name_or_path", ns.model, "--dataset_name", data,
                       "--output_dir", out_dir, "--max_length", str(ns.max_length), "--dataset_num_proc",
                       str(ns.num_proc), "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--dry_run",
                       "--data_cache_dir", os.path.join(work, "cache")]
            else:
                cmd = [py, "-c", TRL_SCRIPT, data, ns.model, out_dir, str(ns.num_proc), str(ns.max_length), SYSTEM]
            wall, peak, anon = measure(cmd, env)
            results[f"{side}_{run}_s"], results[f"{side}_{run}_peak_gb"] = round(wall, 1), round(peak, 2)
            results[f"{side}_{run}_peak_anon_gb"] = round(anon, 2)
            print(f"{side:6s} {run:5s}: {wall:7.1f} s, peak RSS (process tree) {peak:5.2f} GB, without file-backed "
                  f"pages {anon:5.2f} GB", flush=True)
    if not ns.only:
        results["first_run_ratio"] = round(results["recipe_first_s"] / results["trl_first_s"], 2)
        results["peak_ratio"] = round(results["recipe_first_peak_gb"] / results["trl_first_peak_gb"], 2)
        results["peak_anon_ratio"] = round(results["recipe_first_peak_anon_gb"] / results["trl_first_peak_anon_gb"], 2)
        print(f"recipe / trl: first run x{results['first_run_ratio']}, peak RSS x{results['peak_ratio']}, without "
              f"file-backed pages x{results['peak_anon_ratio']}")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(results, f, indent=2)
    if not ns.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
