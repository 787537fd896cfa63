"""Data preparation speed of the recipe (load_pairs + sft.prepare: render, tokenize prompt and completion apart,
labels, length policy) per `dataset_num_proc`, interleaved repetitions in one process, median examples/s.

    python bench/data_prep.py --config recipes/smollm2-135m/sft_demo.yaml --num_proc 1 2 --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "recipes/smollm2-135m/sft_demo.yaml"))
    ap.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ns = ap.parse_args(argv)

    import datasets

    import cai_data
    import chat_format
    import sft

    datasets.disable_progress_bars()
    script_args, targs, model_args, data_args, _ = sft.make_parser().parse_args_and_config(
        ["--config", ns.config, "--output_dir", "/tmp/unused-bench-data-prep"]
    )
    tok = chat_format.load_tokenizer(model_args.model_name_or_path, targs.chat_template_path)
    fmt = chat_format.ChatFormat.detect(tok, data_args.system_prompt, data_args.system_prompt_mode, targs.eos_token,
                                        data_args.template_date)
    rates: dict[int, list[float]] = {n: [] for n in ns.num_proc}
    for _ in range(ns.reps):
        for n in ns.num_proc:
            targs.dataset_num_proc = None if n == 1 else n
            t = time.perf_counter()
            train, evals, report = cai_data.load_pairs(script_args, data_args, targs.seed)
            sft.prepare(train, fmt, targs.max_length, report, "train")
            sft.prepare(evals, fmt, targs.max_length, report, "eval")
            rates[n].append((len(train) + len(evals)) / (time.perf_counter() - t))
    for n, r in rates.items():
        print(f"dataset_num_proc {n}: {statistics.median(r):7.0f} examples/s  (reps: {', '.join(f'{x:.0f}' for x in r)})")
    return rates


if __name__ == "__main__":
    main()
