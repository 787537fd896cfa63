"""On-policy preference pairs for recipes/dpo.py: M_SFT answers prompts, and its own mistakes become `rejected`.

- Benign prompts with a reference answer (prompt/completion rows, e.g. data/helpful_train.jsonl): M_SFT answers
  each; where its answer opens by declining (recipes/refusal.py, no judge), the pair is
  (reference answer ≻ M_SFT's own refusal). This is the pair that teaches the distinction SFT could not: the
  refusal it really writes, not a fixed sentence (a fixed sentence teaches "never open with a refusal").
- Red-team prompts with a revision (cai-conversation-harmless rows, e.g. data/cai_train.jsonl): M_SFT answers each;
  where it does NOT decline, the pair is (revision ≻ M_SFT's answer). With `cai_pairs` (default on), every red-team
  row also gives the critique pass's own pair (revision ≻ init_response). With `own_refusal_pairs` (default off),
  where it declines a red-team prompt the pair is (its own refusal ≻ init_response): the same refusal text is then
  `chosen` after a harmful prompt and `rejected` after a benign one. On the demo's 135M M_SFT that lowered the
  balanced refusal accuracy (docs/EVALUATION.md, "The preference stage"), hence off.

Answers are greedy, with the system prompt M_SFT was trained with and the generation_config saved with it; red-team
answers may instead be sampled (`redteam_temperature`), several per prompt (`redteam_samples`), each distinct
compliance a pair (on the demo's M_SFT that did not help: docs/EVALUATION.md). Where
most answers make no pair (red-team prompts an M_SFT declines), each is first written to `redteam_opening_tokens`,
where the refusal verdict shows, and only those that make a pair are written out to `max_new_tokens`. Output:
a jsonl of {prompt, chosen, rejected, kind, from_file, from_row} (dpo.py reads it: `format: preference`) and, beside it,
`<output>.summary.json` with the counts per kind and the refusal rates M_SFT showed.

```bash
python tools/collect_pairs.py --config recipes/smollm2-135m/pairs_demo.yaml
python tools/collect_pairs.py --model outputs/smollm2-135m-cai-sft --benign_file data/helpful_train.jsonl \
    --redteam_file data/cai_train.jsonl --output outputs/smollm2-135m-cai-pairs.jsonl
```
"""

import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))

import cai_data  # noqa: E402
import checks  # noqa: E402
import entry  # noqa: E402
import generation  # noqa: E402
import quiet  # noqa: E402
import refusal  # noqa: E402
import run_dir  # noqa: E402


@dataclass
class PairArguments:
    model: str = field(default="outputs/smollm2-135m-cai-sft", metadata={"help": "M_SFT: sft.py's output_dir."})
    base_model: str | None = field(default=None, metadata={"help": "M_base when M_SFT is an adapter (default: the "
                                                           "base its adapter_config.json names)."})
    benign_file: str | None = field(default="data/helpful_train.jsonl",
                                    metadata={"help": "Benign prompts with reference answers (prompt/completion)."})
    redteam_file: str | None = field(default="data/cai_train.jsonl",
                                     metadata={"help": "Red-team prompts with revisions (cai-conversation-harmless)."})
    output: str = field(default="outputs/smollm2-135m-cai-pairs.jsonl", metadata={"help": "The pairs (jsonl)."})
    system_prompt: str | None = field(default=cai_data.DEFAULT_SYSTEM_PROMPT,
                                      metadata={"help": "As in M_SFT's training; null for none."})
    cai_pairs: bool = field(default=True, metadata={"help": "Also write (revision ≻ init_response) per red-team row."})
    own_refusal_pairs: bool = field(
        default=False, metadata={"help": "Where M_SFT declines a red-team prompt: (its refusal ≻ init_response)."})
    max_benign: int | None = field(default=None, metadata={"help": "M_SFT answers a seeded sample of this many benign "
                                                           "prompts (null: all)."})
    max_redteam: int | None = field(default=None, metadata={"help": "M_SFT answers a seeded sample of this many "
                                                            "red-team prompts (null: all); the critique pairs cover "
                                                            "every row."})
    max_new_tokens: int = field(default=48, metadata={"help": "Length of M_SFT's answers (a refusal is short)."})
    benign_opening_tokens: int | None = field(
        default=None, metadata={"help": "With a number, M_SFT first writes only this many tokens of each answer to a "
                                "benign prompt, where a refusal shows, and then writes out in full only the refusals "
                                "(they become pairs). Worth it when it declines few benign prompts; null: one pass."})
    redteam_opening_tokens: int | None = field(
        default=12, metadata={"help": "The same for red-team prompts, where only compliances become pairs. On the "
                              "demo's M_SFT the verdict at 12 tokens equals that at 32 on 256 of 256 answers."})
    redteam_samples: int = field(
        default=1, metadata={"help": "Answers per red-team prompt; with more than 1, sampled at redteam_temperature "
                             "and each distinct compliance makes a pair (with own_refusal_pairs, its first refusal)."})
    redteam_temperature: float | None = field(
        default=None, metadata={"help": "Sample the red-team answers at this temperature (null: greedy). A greedy "
                                "M_SFT shows only its likeliest answer; sampling finds the compliances it still "
                                "gives some of the time, which are the ones the preference stage can make likelier. "
                                "Sampled answers are written in one pass to max_new_tokens (no opening pass)."})
    batch_size: int = field(default=16)
    seed: int = field(default=42)
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an --output this tool did not write."})

    def __post_init__(self):
        self.system_prompt = cai_data.none_if_null(self.system_prompt)
        self.benign_file = cai_data.none_if_null(self.benign_file)  # `--benign_file null` skips it, as in YAML
        self.redteam_file = cai_data.none_if_null(self.redteam_file)


def problems(cfg: dict) -> list[str]:
    p = checks.range_problems(cfg)
    if not os.path.isfile(os.path.join(cfg["model"], "config.json")) and not os.path.isfile(
            os.path.join(cfg["model"], "adapter_config.json")):
        p.append(f"model: {cfg['model']} holds no model (config.json) or adapter (adapter_config.json); point it at "
                 "sft.py's output_dir (`make demo` writes outputs/smollm2-135m-cai-sft).")
    files = {key: cai_data.none_if_null(cfg.get(key)) for key in ("benign_file", "redteam_file")}
    for key, path in files.items():
        if path and not os.path.isfile(path):
            p.append(f"{key}: {path} does not exist{checks.where(path)}. Fix the path, or null to skip it.")
    if not any(files.values()):
        p.append("benign_file / redteam_file: both unset; give at least one.")
    if (cfg.get("redteam_samples") or 1) > 1 and not cai_data.none_if_null(cfg.get("redteam_temperature")):
        p.append(f"redteam_samples: {cfg['redteam_samples']} answers per prompt need redteam_temperature (greedy "
                 "answers repeat each other); set it, e.g. 1.0, or redteam_samples: 1.")
    inputs = {"model": cfg.get("model"), **files}
    return p + run_dir.file_problems("output", cfg.get("output"), bool(cfg.get("overwrite_output_dir")), inputs,
                                     is_own=written_here, program="collect_pairs.py")


def written_here(path: str) -> bool:
    """Whether `path` is pairs this tool wrote (its summary beside it says so): a re-run may replace them."""
    try:
        with open(path + ".summary.json", encoding="utf-8") as f:
            return json.load(f).get("written_by") == "collect_pairs.py"
    except (OSError, ValueError):
        return False


def read_rows(path: str, fmt: str, report) -> list[dict]:
    """Normalized rows (prompt messages without a system turn, completion) with their raw rows."""
    source = {"path": path, "format": fmt}
    raw = cai_data.read_split(source, "train")
    rows = cai_data.normalize(raw, source, "train", cai_data.CAIDataArguments(system_prompt=None), report)
    for r in rows:
        r["raw"] = raw[r["row"]]
    return rows


def load(args: PairArguments):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    adapter = os.path.join(args.model, "adapter_config.json")
    if os.path.isfile(adapter):
        from peft import PeftModel

        with open(adapter, encoding="utf-8") as f:
            base = args.base_model or json.load(f)["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
        model = PeftModel.from_pretrained(model, args.model).merge_and_unload()  # merged: as fast as M_base on CPU
        model.generation_config = GenerationConfig.from_pretrained(args.model)  # the saved stop tokens, defaults
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    return model.eval(), tokenizer


def answers(model, tokenizer, conversations: list[list[dict]], kind: str, args: PairArguments):
    """M_SFT's answers and whether each declines. Greedy answers, with an opening length for the kind, come in two
    passes: the opening of every answer, then in full only those whose verdict makes a pair (a benign refusal, a
    red-team compliance): the pairs get the answers of one pass at max_new_tokens, the rest stop at the opening. The
    opening's verdict usually stands but can change as an answer goes on ("As an AI language model, I ... but here
    is"): such an answer is judged on its opening. Measured on the demo's M_SFT: 256 of 256 verdicts at 12 tokens
    equal at 32. Sampled answers (redteam_temperature) come in one pass: a second pass would draw a new answer."""
    sample = {"do_sample": True, "temperature": args.redteam_temperature} if kind == "redteam" and \
        args.redteam_temperature else {}
    opening = args.benign_opening_tokens if kind == "benign" else args.redteam_opening_tokens
    short = args.max_new_tokens if sample else min(opening or args.max_new_tokens, args.max_new_tokens)
    said = generation.generate_answers(model, tokenizer, conversations, short, args.batch_size, progress=True,
                                       desc=f"M_SFT opens its answers to {kind} prompts", **sample)
    declined = [refusal.is_refusal(a["answer"]) for a in said]
    pair = [d if kind == "benign" else not d or args.own_refusal_pairs for d in declined]
    rest = [i for i, a in enumerate(said) if pair[i] and not a["stopped_cleanly"] and short < args.max_new_tokens]
    if rest:
        full = generation.generate_answers(model, tokenizer, [conversations[i] for i in rest], args.max_new_tokens,
                                           args.batch_size, progress=True, desc=f"M_SFT's {kind} answers in full")
        for i, a in zip(rest, full):
            said[i], declined[i] = a, refusal.is_refusal(a["answer"])
    return [a["answer"] for a in said], declined


def collect(args: PairArguments) -> str:
    from transformers import set_seed

    lock = run_dir.RunLock(args.output, "collect_pairs.py", inside=False)
    lock.acquire()
    started = time.time()
    report = cai_data.DataReport()
    model, tokenizer = load(args)
    set_seed(args.seed)  # sampled red-team answers repeat with the same settings
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    pairs, verdicts = [], {}
    for kind, path, fmt in (("benign", args.benign_file, "pc"), ("redteam", args.redteam_file, "cai")):
        if not path:
            continue
        rows = read_rows(path, fmt, report)
        limit = args.max_benign if kind == "benign" else args.max_redteam
        asked = rows if limit is None or limit >= len(rows) else random.Random(args.seed).sample(rows, limit)
        times = args.redteam_samples if kind == "redteam" else 1  # answers per prompt
        said, verdicts[kind] = answers(model, tokenizer, [system + r["prompt"] for r in asked] * times, kind, args)
        got = {}
        for r, a, no in zip(asked * times, said, verdicts[kind]):
            got.setdefault(r["row"], []).append((a, no))
        for r in rows:  # every row: the critique pair; the answered ones also their on-policy pairs
            said_here = got.get(r["row"], [])
            where = {"prompt": r["prompt"][-1]["content"], "from_file": path, "from_row": r["row"]}
            reference = r["completion"][0]["content"]
            if kind == "benign":
                for answer in dict.fromkeys(a for a, no in said_here if no):
                    pairs.append({**where, "chosen": reference, "rejected": answer, "kind": "benign: own refusal"})
            if kind == "redteam":  # each distinct compliance of a sampled M_SFT is a pair
                for answer in dict.fromkeys(a for a, no in said_here if not no and a.strip()):
                    pairs.append({**where, "chosen": reference, "rejected": answer,
                                  "kind": "red-team: own compliance"})
            init = r["raw"].get("init_response")
            has_init = isinstance(init, str) and init.strip() and not refusal.is_refusal(init)
            own_refusal = next((a for a, no in said_here if no), None)
            if kind == "redteam" and own_refusal is not None and args.own_refusal_pairs and has_init:
                pairs.append({**where, "chosen": own_refusal, "rejected": init, "kind": "red-team: own refusal"})
            if kind == "redteam" and args.cai_pairs and isinstance(init, str) and init.strip():
                pairs.append({**where, "chosen": reference, "rejected": init, "kind": "red-team: critique pass"})
    kinds = dict(Counter(p["kind"] for p in pairs))
    stats = {kind: {"prompts": len(v) // (args.redteam_samples if kind == "redteam" else 1), "answers": len(v),
                    "declined": sum(v)} for kind, v in verdicts.items()}
    run_dir.write_text(args.output, (json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    summary = {"written_by": "collect_pairs.py", "model": args.model, "system_prompt": args.system_prompt, "pairs": len(pairs), "kinds": kinds,
               "answers": stats, "redteam_answers": {"temperature": args.redteam_temperature,
                                                     "samples_per_prompt": args.redteam_samples, "seed": args.seed},
               "refusal_rates": refusal.rates(verdicts.get("redteam"), verdicts.get("benign")),
               "dropped_input_rows": dict(report.dropped), "seconds": round(time.time() - started)}  # fmt: skip
    run_dir.write_text(args.output + ".summary.json", json.dumps(summary, indent=2))
    print(f"Wrote {len(pairs)} pairs to {args.output}: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    for kind, s in stats.items():
        print(f"  M_SFT declined {s['declined']} of {s['answers']} answers to {s['prompts']} {kind} prompts")
    lock.release()
    return args.output


def main(argv=None):
    from trl import TrlParser

    return entry.run(collect, TrlParser((PairArguments,)), problems, argv)


if __name__ == "__main__":
    quiet.setup()
    main()
