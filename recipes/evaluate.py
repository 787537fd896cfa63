"""Judge the fine-tune: compare M_base and M_SFT on held-out CAI prompts and on benign prompts.

Metrics (docs/EVALUATION.md explains how to read them):
  NLL / perplexity   of the reference responses given the prompt (revised responses of the CAI test split, and
                     the benign completions), token-weighted over the response tokens and the end-of-turn token;
                     lower is better
  preference         share of CAI test rows where the model gives `revision_response` a higher mean per-token
                     log-likelihood than `init_response`, and the mean margin (revision minus initial); higher is better
  jailbreak          the same NLL / preference with the red-team prompts wrapped in the `eval` templates of
                     data/jailbreaks.json (never used in training)
  generations        greedy answers of both models to the red-team, jailbreak-wrapped red-team and benign prompts,
                     with the generation settings saved with each model; clean-stop rate (a stop token before
                     max_new_tokens) and repetition rate (a word REPEAT_N-gram said REPEAT_TIMES times or more)
  refusal (no judge) share of answers that open by declining (a tested phrase list, recipes/refusal.py), per set:
                     harmful (red-team), jailbreak, benign (over-refusal) and its risky-sounding part; the balanced
                     refusal accuracy = mean of "red-team declined" and "benign answered"
  judge (optional)   any OpenAI-compatible endpoint grades each answer: harmless, helpful 1-5, refused, complied
                     (yes/partial/no); compliance and refusal rates on red-team and jailbreak prompts, over-refusal
                     on benign ones. Without `judge_url` these fields are absent.
Each of these per condition: with the training system prompt (`system`) and without one (`no_system`).

Writes eval_report.json and eval_report.md to `output_dir` (default: the M_SFT folder) and prints a table;
`generations_file` also writes every answer as JSONL for a separate (blind) judge.

```bash
python recipes/evaluate.py --config recipes/smollm2-135m/eval_demo.yaml
# more generations, and an LLM judge (the key is read from $OPENAI_API_KEY, never written anywhere)
python recipes/evaluate.py --config recipes/smollm2-135m/eval_demo.yaml --max_generations 50 \
    --judge_url https://api.openai.com/v1 --judge_model gpt-4o-mini
# a LoRA adapter folder is accepted as M_SFT (its base model is read from adapter_config.json)
python recipes/evaluate.py --sft_model outputs/my-adapter --test_file data/cai_test.jsonl
# everything: every row scored and answered, both conditions, all answers to a JSONL file
python recipes/evaluate.py --config recipes/smollm2-135m/eval_demo.yaml --max_examples null --max_generations null \
    --max_new_tokens 256 --generations_file outputs/smollm2-135m-cai-sft/generations.jsonl
```
Rooms: this file parses, loads the data and the models, and runs the comparison (`main`); eval_scoring.py scores the
reference responses, eval_answers.py measures the answers (clean stops, loops, refusals, the judge), eval_report.py
prints and writes the reports.

Prompts are rendered with the tokenizer and chat template saved with M_SFT (the training ones; override with
`chat_template_path`) and `system_prompt`, exactly as sft.py renders them: both models see the same text.
"""

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import cai_data  # noqa: E402
import chat_format  # noqa: E402
import checks  # noqa: E402
import entry  # noqa: E402
import env  # noqa: E402
import generation  # noqa: E402
import run_dir  # noqa: E402
import jailbreaks  # noqa: E402
import refusal  # noqa: E402
import eval_answers  # noqa: E402 - generation and judging: what is measured on the answers
import eval_report  # noqa: E402 - the table, eval_report.md, the answers as JSONL
import eval_scoring  # noqa: E402 - NLL, perplexity, preference of the reference responses

# Evaluation conditions: with the training system prompt, and without any system prompt.
CONDITIONS = ("system", "no_system")


@dataclass
class EvalArguments:
    sft_model: str | None = field(default=None, metadata={"help": "M_SFT: a model folder, or a LoRA adapter folder."})
    base_model: str | None = field(
        default=None, metadata={"help": "M_base; for an adapter, default: its adapter_config.json base model."}
    )
    dpo_model: str | None = field(
        default=None, metadata={"help": "M_DPO (recipes/dpo.py's output_dir), a third column beside M_base and M_SFT."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Held-out CAI pairs (file, folder or hub id), e.g. data/cai_test.jsonl."}
    )
    test_split: str = field(default="test", metadata={"help": "Split of test_file when it is a hub id or folder."})
    benign_file: str | None = field(
        default=None, metadata={"help": "Benign prompt/completion pairs, e.g. data/helpful_test.jsonl."}
    )
    benign_split: str = field(default="test", metadata={"help": "Split of benign_file when it is a hub id/folder."})
    redteam_file: str | None = field(
        default=None,
        metadata={"help": "Red-team prompts to generate for (column `prompt`); default: the prompts of test_file."},
    )
    redteam_split: str = field(default="train", metadata={"help": "Split of redteam_file when a hub id/folder."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the reports go; default: sft_model."})
    system_prompt: str | None = field(
        default=cai_data.DEFAULT_SYSTEM_PROMPT, metadata={"help": "The system prompt used in training ('' for none)."}
    )
    system_prompt_mode: str = field(
        default="auto", metadata={"help": "As in training: auto | system | fold | off (the saved template folds)."}
    )
    chat_template_path: str | None = field(default=None, metadata={"help": "Override the saved chat template."})
    max_length: int = field(default=1024, metadata={"help": "Longer scored sequences are truncated (counted)."})
    max_examples: int | None = field(
        default=None, metadata={"help": "Score a seeded sample of this many rows per set (NLL, preference)."}
    )
    max_generations: int | None = field(
        default=None,
        metadata={"help": "Answer at most this many prompts per set (red-team, the same wrapped, benign) and "
                  "condition; null: every row."},
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Length of the generated answers (greedy); an answer that reaches it did not "
                               "stop cleanly."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass / generate call."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on a GPU that has it, else float32), or a dtype."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})
    seed: int = field(default=42, metadata={"help": "Seed of the max_examples sample."})
    judge_url: str | None = field(
        default=None, metadata={"help": "Base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1."}
    )
    judge_model: str | None = field(default=None, metadata={"help": "Model name sent to the judge endpoint."})
    judge_api_key_env: str | None = field(
        default="OPENAI_API_KEY", metadata={"help": "Name of the environment variable that holds the judge's API key."}
    )
    judge_concurrency: int = field(default=4, metadata={"help": "Judge requests in flight at once."})
    conditions: list[str] = field(
        default_factory=lambda: list(CONDITIONS),
        metadata={"help": "Evaluate with the system prompt (`system`), without one (`no_system`), or both."},
    )
    jailbreak: bool = field(
        default=True, metadata={"help": "Also score and answer the red-team rows wrapped in jailbreak templates."}
    )
    jailbreak_file: str | None = field(
        default=None, metadata={"help": "Jailbreak templates; default data/jailbreaks.json (its `eval` list)."}
    )
    generations_file: str | None = field(
        default=None,
        metadata={"help": "Write every answer (model, condition, set, prompt id, prompt, answer, stopped_cleanly, "
                  "repeated) to this JSONL file, e.g. for a blind judge."},
    )
    print_generations: int = field(
        default=3, metadata={"help": "Answers printed side by side per condition and set (all are in the reports)."}
    )

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace eval_report.json/.md files that this program did not write."}
    )

    def __post_init__(self):
        self.system_prompt = cai_data.none_if_null(self.system_prompt)  # null / none / '' mean none


# --------------------------------------------------------------------------------------------- setup


def check_args(args: EvalArguments) -> dict:
    """Resolve M_base / adapter / output dir, or exit with one message per problem."""
    problems = []
    is_adapter = bool(args.sft_model) and os.path.isfile(os.path.join(args.sft_model, "adapter_config.json"))
    base = args.base_model
    if not args.sft_model:
        problems.append("sft_model: not set. Point it at the output_dir of sft.py (a model or LoRA adapter folder).")
    elif not os.path.isdir(args.sft_model):
        problems.append(f"sft_model: {args.sft_model} is not a folder. Train first (make demo) or fix the path.")
    elif is_adapter and not base:
        try:
            base = adapter_base(args.sft_model)
        except (OSError, ValueError, AttributeError) as e:
            problems.append(f"sft_model: {args.sft_model}/adapter_config.json is not readable JSON ({e}); copy it "
                            "again from the training run.")
        if not base and not problems:
            problems.append(f"base_model: not set and {args.sft_model}/adapter_config.json names no base model.")
    elif not base:
        problems.append(
            f"base_model: not set. {args.sft_model} is a full model, so M_base cannot be read from it; set base_model "
            "to the model_name_or_path used for training."
        )
    if args.dpo_model and not any(os.path.isfile(os.path.join(args.dpo_model, f))
                                  for f in ("config.json", "adapter_config.json")):
        problems.append(f"dpo_model: {args.dpo_model} holds no model or adapter. Train it first (make demo-rlaif) or "
                        "fix the path.")
    if not args.test_file and not args.benign_file:
        problems.append("test_file / benign_file: set at least one (e.g. data/cai_test.jsonl, data/helpful_test.jsonl)")
    if bool(args.judge_url) != bool(args.judge_model):
        problems.append("judge_url and judge_model: set both to use a judge, or neither.")
    if base and env.is_local_path(base) and not os.path.isdir(base):
        problems.append(f"base_model: {base} does not exist{checks.where(base)}. Point it at M_base's folder.")
    problems += rules(asdict(args))
    unknown = [c for c in args.conditions if c not in CONDITIONS]
    if unknown or not args.conditions:
        problems.append(f"conditions: {args.conditions} - use one or both of {list(CONDITIONS)}.")
    if "system" in args.conditions and not args.system_prompt:
        problems.append("conditions: `system` needs a system_prompt; set it, or use `conditions: [no_system]`.")
    if problems:
        raise checks.ConfigError(problems)
    return {"base": base, "is_adapter": is_adapter, "output_dir": args.output_dir or args.sft_model}


REPORTS = ("eval_report.json", "eval_report.md")


def own_report(path: str) -> bool:
    """Whether `path` is an evaluation report this program wrote (it may be replaced by a new evaluation)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                return "m_sft" in json.load(f)
            return f.readline().startswith("# CAI SFT evaluation")
    except (OSError, ValueError, TypeError):
        return False


def rules(cfg: dict) -> list[str]:
    """Ranges, and the output guard on the two report files (checked before any model loads)."""
    out = cfg.get("output_dir") or cfg.get("sft_model")
    inputs = {k: cfg.get(k) for k in ("test_file", "benign_file", "redteam_file", "chat_template_path")}
    p = checks.range_problems(cfg)
    p += [f"{k}: {v} does not exist{checks.where(v)}. Fix the path." for k, v in inputs.items()
          if v and env.is_local_path(v) and not os.path.exists(v)]
    if out and os.path.exists(out) and not os.path.isdir(out):
        return p + [f"output_dir: {out} is a file, but the reports need a folder. Set output_dir to a folder."]
    for name in REPORTS:
        p += run_dir.file_problems("output_dir", os.path.join(out, name), bool(cfg.get("overwrite_output_dir")),
                                   inputs, own_report, "evaluate.py") if out else []
    if cfg.get("generations_file"):  # rewritten by every evaluation; never one of the inputs
        p += run_dir.input_problems("generations_file", cfg["generations_file"], inputs)
    return p


def load_tokenizer(args: EvalArguments, base: str):
    """The tokenizer saved with M_SFT (its chat template folds the system prompt and fixes the date as in
    training), and its ChatFormat: the same rendering and tokenization as sft.py."""
    has_own = any(os.path.isfile(os.path.join(args.sft_model, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = chat_format.load_tokenizer(args.sft_model if has_own else base, args.chat_template_path,
                                     trust_remote_code=args.trust_remote_code)
    fmt = chat_format.ChatFormat.detect(tok, args.system_prompt, args.system_prompt_mode)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, fmt


def device_and_dtype(args: EvalArguments):
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, getattr(torch, args.dtype)


def adapter_base(folder: str) -> str | None:
    """The base model a LoRA folder's adapter_config.json names; None for a full model (or when it names none)."""
    config = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("base_model_name_or_path")


def load_dpo(args: EvalArguments, base_path: str, device, dtype):
    """M_DPO: an adapter on the base its adapter_config.json names (M_base, or a full M_SFT), or a full model."""
    if not os.path.isfile(os.path.join(args.dpo_model, "adapter_config.json")):
        return load_model(args.dpo_model, args, device, dtype)
    under = adapter_base(args.dpo_model) or base_path
    if adapter_base(args.sft_model) == under:
        under = base_path  # the same M_base as M_SFT's: the one resolved (base_model) is reachable
    return load_model(None, args, device, dtype, adapter=args.dpo_model,
                      base_model=load_model(under, args, device, dtype))


def load_model(path: str | None, args: EvalArguments, device, dtype, adapter: str | None = None, base_model=None):
    """A causal LM in eval mode; with `adapter`, the LoRA adapter loaded on `base_model` (already loaded)."""
    from transformers import AutoModelForCausalLM

    if adapter:
        from peft import PeftModel

        # Merged into the base weights: the same function, and as fast as M_base (unmerged LoRA is slow on CPU).
        model = PeftModel.from_pretrained(base_model, adapter).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=args.trust_remote_code, use_safetensors=True
        ).to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------- data


def _sample(rows: list, n: int | None, seed: int) -> list:
    if n is None or len(rows) <= n:
        return rows
    return sorted(random.Random(seed).sample(rows, n), key=lambda r: r["row"])


def condition_system(args: EvalArguments, condition: str) -> str | None:
    return args.system_prompt if condition == "system" else None


def load_set(path: str, split: str, args: EvalArguments, report, name: str,
             system_prompt: str | None = None) -> tuple[list[dict], list[dict]]:
    """(normalized pairs, raw rows) of one evaluation file, with `system_prompt` (None: without one)."""
    source = {"path": path, "split": split}  # a local file is read whatever the split; a hub id or folder by it
    raw = cai_data.read_split(source, split)
    data_args = cai_data.CAIDataArguments(system_prompt=system_prompt)  # flagged rows dropped, as in training
    pairs = cai_data.normalize(raw, source, split, data_args, report)
    if not pairs:
        raise cai_data.DataError(f"{name} ({path}): no usable rows (see the drop reasons in the report).")
    report.counts[f"{name}_rows"] = len(pairs)
    return pairs, raw


def initial_pairs(pairs: list[dict], raw: list[dict], report) -> list[dict]:
    """The same prompts with `init_response` as the completion, for the preference metric."""
    out = []
    for p in pairs:
        init = raw[p["row"]].get("init_response")
        if not isinstance(init, str) or not init.strip():
            report.drop("preference: no init_response", f"{p['source']} row {p['row']}")
            continue
        out.append({**p, "completion": [{"role": "assistant", "content": init}]})
    return out


def wrapped_pairs(pairs: list[dict], templates: list[dict]) -> list[dict]:
    """The pairs with the user's prompt wrapped in the jailbreak templates, taken in turn (row k: template k mod n)."""
    return [{**p, "prompt": jailbreaks.wrap_messages(p["prompt"], templates[k % len(templates)])}
            for k, p in enumerate(pairs)]  # fmt: skip


def wrapped_sets(pairs: list[dict], raw: list[dict], templates: list[dict]) -> tuple[list[dict], list[dict]]:
    """(revision pairs, initial-answer pairs) with the prompts wrapped; a row's initial answer is wrapped in the same
    template as its revision, also when other rows have no init_response (those were counted by initial_pairs)."""
    wrapped = wrapped_pairs(pairs, templates)
    return wrapped, initial_pairs(wrapped, raw, cai_data.DataReport())


def pick_prompts(rows: list[dict], n: int | None, group_key: str | None) -> list[dict]:
    """Up to `n` rows, round-robin over the values of `group_key` (harm area, risky_sounding) in row order."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(str(r.get(group_key)) if group_key else "", []).append(r)
    queues = [list(g) for _, g in sorted(groups.items(), key=lambda kv: kv[0], reverse=group_key == "risky_sounding")]
    out, limit = [], len(rows) if n is None else n
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def generation_prompts(args, test, benign, report, templates: list[dict] | None = None) -> list[dict]:
    """[{set, condition, id, template, text, prompt (messages), row, extra}]: the red-team prompts, the same ones
    wrapped in the jailbreak `templates` (in turn), and the benign prompts, once per condition."""
    rt = []
    if args.redteam_file:
        raw = cai_data.read_split({"path": args.redteam_file, "split": args.redteam_split}, args.redteam_split)
        for i, r in enumerate(raw):
            text = r.get("prompt", r.get("init_prompt"))
            if not isinstance(text, str) or not text.strip():
                report.drop("red-team prompt missing or empty", f"{args.redteam_file} row {i} field 'prompt'")
                continue
            rt.append({"text": text, "row": i, "area": r.get("area")})
    elif test:
        seen = set()
        pairs, raw = test
        for p in pairs:
            key = cai_data.prompt_key(p)
            if key not in seen:
                seen.add(key)
                rt.append({"text": p["prompt"][-1]["content"], "row": p["row"], "area": raw[p["row"]].get("area")})
    base = [{"set": "red-team", "id": f"redteam-{r['row']}", **r}
            for r in pick_prompts(rt, args.max_generations, "area" if any(r.get("area") for r in rt) else None)]
    if templates:
        for k, r in enumerate(list(base)):
            t = templates[k % len(templates)]
            base.append({**r, "set": "jailbreak", "id": f"jailbreak-{t['id']}-{r['row']}", "template": t["id"],
                         "original": r["text"], "text": jailbreaks.wrap(t, r["text"])})  # fmt: skip
    if benign:
        pairs, raw = benign
        bn = [{"text": p["prompt"][-1]["content"], "row": p["row"], "risky_sounding": raw[p["row"]].get("risky_sounding"),
               "category": raw[p["row"]].get("category")} for p in pairs]  # fmt: skip
        key = "risky_sounding" if any("risky_sounding" in raw[p["row"]] for p in pairs) else None
        base += [{"set": "benign", "id": f"benign-{r['row']}", **r} for r in pick_prompts(bn, args.max_generations, key)]
    return [{**it, "condition": c, "prompt": cai_data.prompt_messages(it["text"], condition_system(args, c))}
            for c in args.conditions for it in base]  # fmt: skip


def generation_settings(model) -> dict:
    """The saved generation settings evaluate.py generates with (greedy; stop tokens, repetition controls)."""
    cfg = model.generation_config
    keys = ("eos_token_id", "repetition_penalty", "no_repeat_ngram_size")
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) not in (None, 1.0, 0)}


# --------------------------------------------------------------------------------------------- main


def main(args: EvalArguments) -> dict:
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    resolved = check_args(args)
    base_path, out_dir = resolved["base"], resolved["output_dir"]
    run_dir.RunLock(out_dir, "evaluate.py").acquire()  # one run per output folder, released when the run ends
    tok, fmt = load_tokenizer(args, base_path)
    print("Chat format: " + "; ".join(fmt.notes))
    report = cai_data.DataReport()
    try:
        templates = jailbreaks.load(args.jailbreak_file)["eval"] if args.jailbreak and args.test_file else []
    except jailbreaks.JailbreakError as e:
        raise cai_data.DataError(str(e)) from None

    scored, gen_sets = {}, {}
    for k, cond in enumerate(args.conditions):
        # Data drops and counts are reported once, for the first condition; the others read the same rows.
        rep = report if k == 0 else cai_data.DataReport()
        system = condition_system(args, cond)
        test = load_set(args.test_file, args.test_split, args, rep, "cai_test", system) if args.test_file else None
        benign = load_set(args.benign_file, args.benign_split, args, rep, "benign", system) if args.benign_file else None
        sc = scored[cond] = {}
        if test:
            pairs = _sample(test[0], args.max_examples, args.seed)
            sc["cai_revision"] = eval_scoring.tokenize(pairs, fmt, args, rep, "cai_revision")
            initial = initial_pairs(pairs, test[1], rep)
            sc["cai_initial"] = eval_scoring.tokenize(initial, fmt, args, rep, "cai_initial") if initial else []
            if templates:
                wrapped, wrapped_initial = wrapped_sets(pairs, test[1], templates)
                sc["jailbreak_revision"] = eval_scoring.tokenize(wrapped, fmt, args, rep, "jailbreak_revision")
                sc["jailbreak_initial"] = (eval_scoring.tokenize(wrapped_initial, fmt, args, rep, "jailbreak_initial")
                                           if wrapped_initial else [])  # fmt: skip
        if benign:
            sc["benign"] = eval_scoring.tokenize(_sample(benign[0], args.max_examples, args.seed), fmt, args, rep,
                                                 "benign")
        if k == 0:
            gen_sets = (test, benign)
    items = generation_prompts(args, *gen_sets, report, templates)
    for it in items:
        it["prompt"] = fmt.prompt_messages(it["prompt"])  # system_prompt_mode: off sends no system message
    for set_name, prefix in eval_answers.SETS.items():
        report.counts[f"{prefix}_generations"] = sum(it["set"] == set_name for it in items)

    device, dtype = device_and_dtype(args)
    metrics = {c: {} for c in args.conditions}
    settings = {}
    model = load_model(base_path, args, device, dtype)
    names = [*eval_answers.MODELS, *(["M_DPO"] if args.dpo_model else [])]
    for name in names:
        if name == "M_DPO":
            del model  # M_base holds M_SFT's merged adapter now
            model = load_dpo(args, base_path, device, dtype)
        elif name == "M_SFT" and resolved["is_adapter"]:
            model = load_model(None, args, device, dtype, adapter=args.sft_model, base_model=model)
        elif name == "M_SFT":
            del model  # free M_base before loading the full M_SFT
            model = load_model(args.sft_model, args, device, dtype)
        folder = {"M_base": base_path, "M_SFT": args.sft_model, "M_DPO": args.dpo_model}[name]
        if name != "M_base" and os.path.isfile(os.path.join(folder, "generation_config.json")):
            # An adapter merged into M_base carries M_base's generation settings: use the ones saved with it.
            model.generation_config = GenerationConfig.from_pretrained(folder)
        settings[name] = generation_settings(model)
        print(f"{name}: {folder} on {device}; generation {settings[name]}")
        total = sum(eval_scoring.score_batches(scored[c], args.batch_size) for c in args.conditions)
        with tqdm(total=total, desc=f"{name}: scoring", unit="batch", disable=not total) as bar:  # one bar per phase
            for cond in args.conditions:
                metrics[cond][name] = eval_scoring.score_model(model, tok, scored[cond], args, bar)
        answers = generation.generate_answers(model, tok, [it["prompt"] for it in items], args.max_new_tokens,
                                              args.batch_size, progress=True, desc=f"{name}: generating"
                                              ) if items else []  # fmt: skip
        for it, a in zip(items, answers):
            it[name] = {"answer": a["answer"], "stopped_cleanly": a["stopped_cleanly"],
                        "repeated": eval_answers.repeated(a["answer"]), "declined": refusal.is_refusal(a["answer"])}
        for cond in args.conditions:
            metrics[cond][name].update(
                eval_answers.generation_metrics([it for it in items if it["condition"] == cond], name))

    def public(its):
        return [{k: v for k, v in it.items() if k != "prompt"} for it in its]

    result = {
        "m_base": base_path,
        "m_sft": args.sft_model,
        "m_sft_is_adapter": resolved["is_adapter"],
        **({"m_dpo": args.dpo_model} if args.dpo_model else {}),
        "settings": {**asdict(args), "generation": settings, "repeat_n": eval_answers.REPEAT_N,
                     "repeat_times": eval_answers.REPEAT_TIMES},
        "jailbreak_templates": [t["id"] for t in templates],
        "data": report.to_dict(),
        "metrics": metrics,
        "generations": public(items),
    }
    failed = None
    if args.judge_url and items:
        try:
            eval_answers.judge_all(items, args)
            result["judge"] = {"url": args.judge_url, "model": args.judge_model}
            for cond in args.conditions:
                for name in names:
                    metrics[cond][name].update(
                        eval_answers.judge_metrics([it for it in items if it["condition"] == cond], name))
            result["generations"] = public(items)
        except generation.EndpointError as e:
            failed = f"judge endpoint failed: {e}"
            result["judge_error"] = str(e)

    run_dir.write_text(os.path.join(out_dir, "eval_report.json"), json.dumps(result, indent=2, ensure_ascii=False))
    eval_report.write_markdown(result, os.path.join(out_dir, "eval_report.md"))
    paths = {"report": os.path.join(out_dir, "eval_report.md")}
    if args.generations_file:
        eval_report.write_generations(items, args.generations_file)
        paths["generations"] = args.generations_file
    for who, folder in (("M_SFT", args.sft_model), ("M_DPO", args.dpo_model)):
        for label, file in (("loss curves", "loss_curves.png"), ("model card", "README.md")):
            if folder and os.path.isfile(os.path.join(folder, file)):
                paths[f"{who} {label}" if args.dpo_model else label] = os.path.join(folder, file)
    eval_report.print_generations(result["generations"], args.print_generations)
    eval_report.print_table(metrics, paths)
    if failed:
        raise SystemExit(f"{failed}. The reports were written without judge metrics.")
    return result


if __name__ == "__main__":
    from trl import TrlParser

    import quiet

    quiet.setup()  # library messages that are not the user's to act on (recipes/quiet.py)
    entry.run(main, TrlParser((EvalArguments,)), rules)
