"""Step-by-step paired throughput: plain TRL and recipe variants built in ONE process, their training steps
alternated, so that load from other jobs on shared cores hits every variant alike.

    python bench/paired.py --config recipes/smollm2-135m/sft_demo.yaml --pairs 8 \
        --variant "packed: --packing true --max_length 256 --per_device_train_batch_size 4"

bench/run.py measures whole runs in fresh processes (clean memory peaks, first-step time, data prep) but on busy
shared cores its per-run ratios swing by +-30 %; this script measures only the training step (forward, backward,
optimizer), with each variant's real batches from its own trainer, and reports the median per-pair ratio of trained
tokens/s to plain TRL. Step 1 of each variant is warm-up and not counted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def recipe_trainer(parsed):
    """The trainer `recipes/sft.py main()` would train, built the same way (data path + build_trainer)."""
    import cai_data
    import chat_format
    import sft

    script_args, targs, model_args, data_args, recipe_args = parsed
    tok = chat_format.load_tokenizer(model_args.model_name_or_path, targs.chat_template_path)
    fmt = chat_format.ChatFormat.detect(tok, data_args.system_prompt, data_args.system_prompt_mode, targs.eos_token,
                                        data_args.template_date)
    targs.eos_token, targs.chat_template_path = fmt.end_of_turn, None  # as sft.py: the wrapped template stays
    train, evals, report = cai_data.load_pairs(script_args, data_args, targs.seed)
    train_ds = sft.prepare(train, fmt, targs.max_length, report, "train")
    return sft.build_trainer(targs, model_args, recipe_args, tok, train_ds, None, [])


def baseline_trainer(parsed):
    import worker

    class Stop(Exception):
        pass

    captured = {}

    def grab(trainer, meter):  # worker.run_trl builds the baseline exactly as bench/run.py does; stop before train
        captured["trainer"] = trainer
        raise Stop

    original, worker.instrument = worker.instrument, grab
    try:
        worker.run_trl(parsed, worker.Meter())
    except Stop:
        pass
    finally:
        worker.instrument = original
    return captured["trainer"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "recipes/smollm2-135m/sft_demo.yaml"))
    ap.add_argument("--pairs", type=int, default=8, help="timed steps per variant, alternated")
    ap.add_argument("--set", default="")
    ap.add_argument("--variant", action="append", default=[])
    ns = ap.parse_args(argv)

    import torch

    import run
    import sft
    import worker

    out = tempfile.mkdtemp()
    plan = [(run.BASELINE, "trl", shlex.split(ns.set))]
    for spec in ns.variant or ["recipe"]:
        name, args = run.parse_variant(spec)
        plan.append((name, "recipe", shlex.split(ns.set) + args))
    states = {}
    for name, mode, overrides in plan:
        parsed = sft.make_parser().parse_args_and_config(worker.bench_args(ns.config, ns.pairs + 1, out, overrides))
        trainer = (baseline_trainer if mode == "trl" else recipe_trainer)(parsed)
        trainer.create_optimizer_and_scheduler(num_training_steps=ns.pairs + 1)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train otherwise
        if trainer.args.activation_checkpointing:  # Trainer.train switches it on; do the same
            kwargs = dict(trainer.args.activation_checkpointing_kwargs or {})
            trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
        trainer.model.train()
        states[name] = {"trainer": trainer, "batches": iter(trainer.get_train_dataloader()), "rates": [],
                        "cpu_rates": []}

    names = [p[0] for p in plan]
    for i in range(ns.pairs + 1):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            st = states[name]
            tr = st["trainer"]
            batch = next(st["batches"])
            trained = int((batch["labels"] != -100).sum())
            t, c = time.perf_counter(), time.process_time()
            tr.training_step(tr.model, batch)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if i:  # step 1 is warm-up
                st["rates"].append(trained / dt)
                st["cpu_rates"].append(trained / dc)
        print(f"  pair {i}: " + "  ".join(f"{n} {states[n]['rates'][-1]:.1f}" for n in names if states[n]["rates"]),
              flush=True)  # fmt: skip

    # CPU seconds (all threads of this process) count the work a step did, not the time it waited for shared cores,
    # so on busy machines the per-CPU-second ratio is the steadier of the two; on an idle machine they agree.
    for key, unit in (("rates", "trained tokens/s (wall)"), ("cpu_rates", "trained tokens per CPU-second")):
        base = states[names[0]][key]
        print(f"\n{unit}, {ns.pairs} alternated steps each (torch threads {torch.get_num_threads()}):")
        for name in names:
            rates = states[name][key]
            line = f"  {name:<16} median {statistics.median(rates):6.1f}"
            if name != names[0]:
                ratios = [r / b for r, b in zip(rates, base)]
                line += (f"   x{statistics.median(ratios):.2f} vs {names[0]} (per-pair ratios "
                         f"{min(ratios):.2f}..{max(ratios):.2f})")  # fmt: skip
            print(line)


if __name__ == "__main__":
    main()
