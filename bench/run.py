"""Throughput and memory of the recipe, as ratios against plain TRL measured in the same invocation.

    python bench/run.py --config recipes/smollm2-135m/sft_demo.yaml --steps 3 --reps 3 \
        --set "--per_device_train_batch_size 4" --variant "packed: --packing true --per_device_train_batch_size 1"

Every repetition runs the baseline (plain TRL SFTTrainer, defaults: padding, no packing, default attention; see
bench/worker.py) and each variant (recipes/sft.py with the YAML plus the variant's overrides), each in a fresh
subprocess so that peaks are clean, in an order rotated between repetitions. A variant's ratio is taken against the
baseline of the same repetition; the table shows the median over repetitions. `--set` overrides go to every run,
the baseline included. Raw runs and the summary go to --out (default bench/results/<config>-<time>.json).
`--program dpo` does the same for the preference stage: recipes/dpo.py against plain DPOTrainer (bench/worker.py).

    python bench/run.py --program dpo --config recipes/smollm2-135m/dpo_demo.yaml --steps 3 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "bench", "worker.py")
BASELINE = "plain TRL"
# (key in the worker's result, column title, higher is better)
METRICS = [
    ("trained_tokens_per_s", "trained tok/s", True),
    ("total_tokens_per_s", "total tok/s", True),
    ("padding_fraction", "padding", False),
    ("peak_memory_bytes", "peak mem", False),
    ("first_step_seconds", "1st step s", False),
    ("prep_examples_per_s", "prep ex/s", True),
]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, _, args = spec.partition(":")
    if not args.strip() and not name.strip().startswith("-"):
        return name.strip(), []
    return name.strip(), shlex.split(args)


def run_one(mode: str, config: str, steps: int, overrides: list[str], log_dir: str, tag: str) -> dict:
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    log = os.path.join(log_dir, f"{tag}.log")
    cmd = [sys.executable, WORKER, mode, "--config", config, "--steps", str(steps), "--result", result, "--", *overrides]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=child_env())
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"benchmark run {tag} failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    with open(result) as f:
        out = json.load(f)
    os.unlink(result)
    return out


def child_env() -> dict:
    # Idle OpenMP threads sleep instead of spinning: on shared cores spinning ran training 4x slower (BENCHMARKS.md).
    # Same for every run, so the ratios are unaffected; export OMP_WAIT_POLICY=ACTIVE to measure the other way.
    # glibc's MALLOC_MMAP_THRESHOLD_ likewise (page faults from unmapped activations: ~x1.2 slower, noisier).
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "HF_HUB_OFFLINE": "1",
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "33554432")}


def fmt(key: str, v: float) -> str:
    if key == "padding_fraction":
        return f"{100 * v:.1f}%"
    if key == "peak_memory_bytes":
        return f"{v / 2**20:.0f} MiB"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def summarize(runs: dict[str, list[dict]], names: list[str]) -> dict:
    base = runs[BASELINE]
    summary = {}
    for name in names:
        row = {"tokens_per_step": statistics.median(r["tokens_per_step"] for r in runs[name])}
        for key, _, _ in METRICS:
            row[key] = statistics.median(r[key] for r in runs[name])
            if name != BASELINE and key != "padding_fraction":
                ratios = [r[key] / b[key] for r, b in zip(runs[name], base) if b[key]]
                row[key + "_ratio"] = statistics.median(ratios)
                row[key + "_ratio_range"] = [min(ratios), max(ratios)]
        summary[name] = row
    return summary


def table(summary: dict, names: list[str]) -> str:
    head = ["run", "tok/step"] + [title for _, title, _ in METRICS]
    rows = [head]
    for name in names:
        s = summary[name]
        cells = [name, f"{s['tokens_per_step']:.0f}"]
        for key, _, _ in METRICS:
            cell = fmt(key, s[key])
            if key + "_ratio" in s:
                cell += f" (x{s[key + '_ratio']:.2f})"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict:
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "transformers", "trl", "datasets", "peft", "accelerate")}
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    except Exception:  # noqa: BLE001
        device = "unknown"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "device": device, "load_average_at_start": load, "OMP_WAIT_POLICY": child_env()["OMP_WAIT_POLICY"],
            "MALLOC_MMAP_THRESHOLD_": child_env()["MALLOC_MMAP_THRESHOLD_"], **versions}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--program", choices=["sft", "dpo"], default="sft", help="sft.py vs SFTTrainer, or dpo.py vs "
                    "DPOTrainer")
    ap.add_argument("--config", help="the recipe's YAML (default: the SmolLM2 demo's sft_demo.yaml or dpo_demo.yaml)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run; steps 2.. are timed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", default="", help="overrides for every run, baseline included (one quoted string)")
    ap.add_argument("--variant", action="append", default=[], help="'name: --key value ...', a recipe run")
    ap.add_argument("--out", default=None)
    ns = ap.parse_args(argv)
    ns.config = ns.config or f"recipes/smollm2-135m/{ns.program}_demo.yaml"
    if ns.steps < 2:
        ap.error("--steps must be at least 2 (step 1 is warm-up)")
    common = shlex.split(ns.set)
    variants = [parse_variant(v) for v in ns.variant] or [("recipe", [])]
    prefix = "dpo-" if ns.program == "dpo" else ""
    plan = [(BASELINE, prefix + "trl", common)] + [(name, prefix + "recipe", common + args) for name, args in variants]
    names = [p[0] for p in plan]
    if len(set(names)) != len(names):
        ap.error(f"variant names must be unique: {names}")

    stem = os.path.splitext(os.path.basename(ns.config))[0]
    out = ns.out or os.path.join(ROOT, "bench", "results", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    log_dir = os.path.splitext(out)[0] + "-logs"
    os.makedirs(log_dir, exist_ok=True)
    env = environment()
    print(f"bench: {ns.config}, {ns.steps} steps x {ns.reps} reps, {len(plan)} runs each; logs in {log_dir}", flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in names}
    started = time.time()
    for rep in range(ns.reps):
        order = plan[rep % len(plan):] + plan[: rep % len(plan)]  # rotate so no run always goes first
        for name, mode, overrides in order:
            t = time.time()
            tag = f"rep{rep}-{name.replace(' ', '_')}"
            runs[name].append(run_one(mode, ns.config, ns.steps, overrides, log_dir, tag))
            r = runs[name][-1]
            print(f"  rep {rep + 1}/{ns.reps} {name:<16} {r['trained_tokens_per_s']:7.1f} trained tok/s  "
                  f"padding {100 * r['padding_fraction']:4.1f}%  ({time.time() - t:.0f}s)", flush=True)  # fmt: skip

    summary = summarize(runs, names)
    text = table(summary, names)
    print(f"\nMedians over {ns.reps} reps; (xR) = median of per-rep ratios to {BASELINE} in the same rep.")
    print(text)
    for name in names[1:]:
        lo, hi = summary[name]["trained_tokens_per_s_ratio_range"]
        print(f"  {name}: trained tok/s ratio per rep from x{lo:.2f} to x{hi:.2f}")
    record = {
        "program": ns.program,
        "config": ns.config,
        "steps": ns.steps,
        "reps": ns.reps,
        "set": common,
        "plan": [{"name": n, "mode": m, "overrides": o} for n, m, o in plan],
        "environment": env,
        "seconds": time.time() - started,
        "summary": summary,
        "table": text,
        "runs": runs,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {out}")
    return record


if __name__ == "__main__":
    main()
