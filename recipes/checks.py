"""Config rules: types, ranges and combinations of every program's options, each problem naming key, value and fix.

`config_problems` (sft.py: every rule on the parsed values, before anything is loaded), `range_problems` (the
numeric options of every program: sft.py, evaluate.py, generate_revisions.py and the tools), `validate` (the same
rules on the dataclasses, for callers of `main()`), `check_max_length` (max_length vs the chat template),
`eval_data_problem` (evaluations asked for, but no eval rows). All problems are reported together. Nothing here
writes to the file system: the output guard and checkpoint safety are in `run_dir.py`, parsing in `entry.py`.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import types

import env

# Metrics the Trainer logs at evaluation (SFTTrainer adds accuracy, entropy, tokens); extend when a callback adds one.
LOGGED_EVAL_METRICS = ("loss", "mean_token_accuracy", "entropy", "num_tokens", "runtime", "samples_per_second",
                       "steps_per_second")


class ConfigError(SystemExit):
    """One or more configuration problems: the process exits printing the list of problems (status 2 through
    entry.py)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("Configuration problems (nothing was loaded or written):\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


def bf16_available() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


# --------------------------------------------------------------------------------------------- rules


def _value(v):
    return None if v is None else getattr(v, "value", v)  # enums as their string


def sharded(cfg) -> str | None:
    """'DeepSpeed ZeRO-3' or 'FSDP' when the run shards parameters (from the config or `accelerate launch`)."""
    import memory  # launch_setup is the one reader of the launcher's variables and the DeepSpeed config

    launch = memory.launch_setup(types.SimpleNamespace(deepspeed=cfg.get("deepspeed"), fsdp=cfg.get("fsdp"), world_size=1))
    if launch.get("zero_stage") == 3:
        return "DeepSpeed ZeRO-3"
    return "FSDP" if launch.get("fsdp") else None


def signal_names(spec: str) -> list[str]:
    """"SIGTERM,SIGUSR1" -> ["SIGTERM", "SIGUSR1"] ("TERM" accepted); "" or "none" -> []."""
    if not spec or str(spec).strip().lower() == "none":
        return []
    names = [n.strip().upper() for n in str(spec).split(",") if n.strip()]
    return [n if n.startswith("SIG") else "SIG" + n for n in names]


def signal_problems(spec: str) -> list[str]:
    import signal

    p = []
    for name in signal_names(spec):
        if name not in signal.Signals.__members__:
            p.append(f"stop_signals: {name} is not a signal of this system. Use names such as SIGTERM,SIGUSR1.")
        elif name in ("SIGKILL", "SIGSTOP"):
            p.append(f"stop_signals: {name} cannot be caught. Use SIGTERM or SIGUSR1 (SLURM's --signal).")
    return p


def config_problems(cfg: dict, world_size: int = 1) -> list[str]:
    """Every rule on the values alone (one flat mapping of all arguments), before anything is loaded."""
    p, get = [], cfg.get
    if not get("model_name_or_path"):
        p.append("model_name_or_path: not set. Point it at a local model folder or a hub id.")
    p += signal_problems(get("stop_signals") or "")

    # Quantization and LoRA
    if get("load_in_4bit") and get("load_in_8bit"):
        p.append("load_in_4bit / load_in_8bit: both are set. Keep one (load_in_4bit: true is QLoRA).")
    for key in ("load_in_4bit", "load_in_8bit"):
        if get(key) and not get("use_peft"):
            p.append(f"{key}: quantized weights cannot be trained directly. Add `use_peft: true` (LoRA on the "
                     f"quantized model), or remove `{key}` for a full fine-tune.")
    targets = get("lora_target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if get("use_peft") and any(str(t).split(".")[-1] == "lm_head" for t in targets):
        p.append("lora_target_modules: contains `lm_head`, the output layer (often tied to the input embeddings, "
                 "and kept in 16 bits by QLoRA). Remove it; use `lora_modules_to_save: [lm_head]` to train it fully.")
    sharded_run = sharded(cfg)
    dtype = _value(get("dtype"))
    if get("load_in_4bit") and sharded_run and (_value(get("bnb_4bit_quant_storage")) != dtype or dtype in (None, "auto")):
        want = dtype if dtype not in (None, "auto") else "bfloat16"  # float32 stays: the CPU path (tests) uses it
        p.append(f"bnb_4bit_quant_storage: QLoRA with {sharded_run} shards only floating-point weights of one dtype; set "
                 f"`bnb_4bit_quant_storage: {want}` equal to `dtype: {want}` (now {get('bnb_4bit_quant_storage')!r} "
                 f"and {dtype!r}).")
    kwargs = get("model_init_kwargs") or {}
    if isinstance(kwargs, dict) and kwargs.get("use_safetensors") is False:
        p.append("model_init_kwargs.use_safetensors: false is refused (pickle weights can run code). Convert the "
                 "weights to safetensors (`model.save_pretrained(dir)`) and remove the key.")

    # Evaluation, saving and the best model
    eval_s, save_s = _value(get("eval_strategy")) or "no", _value(get("save_strategy")) or "steps"
    eval_steps, save_steps = get("eval_steps") or get("logging_steps"), get("save_steps")
    if get("load_best_model_at_end"):
        if eval_s == "no":
            p.append("load_best_model_at_end: needs evaluations to pick the best model; set `eval_strategy: steps` "
                     "(with eval_steps) or `epoch`, or remove load_best_model_at_end.")
        elif save_s not in (eval_s, "best"):
            p.append(f"save_strategy: load_best_model_at_end needs checkpoints where evaluations happen; set "
                     f"`save_strategy: {eval_s}` (same as eval_strategy) or `best`.")
        elif (eval_s == "steps" and save_s == "steps" and eval_steps and save_steps and eval_steps >= 1
              and save_steps >= 1 and save_steps % eval_steps):
            p.append(f"save_steps: {save_steps} is not a multiple of eval_steps {eval_steps}, so the best evaluation "
                     f"may have no checkpoint; set save_steps to a multiple of it (e.g. {int(eval_steps) * 2}).")
    if get("early_stopping_patience"):
        if eval_s == "no":
            p.append("early_stopping_patience: needs evaluations; set `eval_strategy: steps` (or epoch) and an eval "
                     "split, or remove early_stopping_patience.")
        if not get("metric_for_best_model") and not get("load_best_model_at_end"):
            p.append("early_stopping_patience: needs `metric_for_best_model: eval_loss` (or another logged metric) "
                     "to know what improves.")
    metric = get("metric_for_best_model")
    if metric and (get("load_best_model_at_end") or get("early_stopping_patience") or save_s == "best"):
        if metric.removeprefix("eval_") not in LOGGED_EVAL_METRICS:
            names = [f"eval_{m}" for m in LOGGED_EVAL_METRICS]
            p.append(f"metric_for_best_model: {metric!r} is not a metric this recipe logs at evaluation "
                     f"(one of {names}).{closest(metric, names + list(LOGGED_EVAL_METRICS))}")

    # Precision
    if (get("bf16") or get("bf16_full_eval")) and not get("use_cpu") and not bf16_available():
        p.append("bf16: true, but this machine has no GPU that supports bfloat16. Remove `bf16` (the recipe turns it "
                 "on by itself where it works), or set `use_cpu: true` to train in bf16 on the CPU.")
    if get("fp16") and get("bf16"):
        p.append("fp16 / bf16: both are set; keep one (bf16 where the GPU supports it).")

    # Batch size, tokens, resume
    gbs, per_device = get("global_batch_size"), get("per_device_train_batch_size") or 1
    if gbs and gbs % (per_device * world_size):
        p.append(f"global_batch_size: {gbs} is not a multiple of per_device_train_batch_size ({per_device}) x "
                 f"processes ({world_size}) = {per_device * world_size}. Pick a global batch size divisible by it.")
    if get("hub_token"):
        p.append("hub_token: do not put a token in the config or on the command line (it would be saved in "
                 "training_args.bin in every checkpoint). Remove it and `export HF_TOKEN=...` instead.")
    resume = get("resume_from_checkpoint")
    if resume and str(resume).lower() not in env.TRUE and not os.path.isdir(resume):
        p.append(f"resume_from_checkpoint: {resume} is not a folder. Point it at a `checkpoint-N` folder, or leave "
                 "it out: relaunching the same command resumes from the newest complete checkpoint by itself.")

    p += range_problems(cfg)
    p += _path_problems(cfg)
    return p


def closest(name: str, valid) -> str:
    """' Did you mean `x`?' for the valid name closest to `name`, or ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" Did you mean `{match[0]}`?" if match else ""


# Valid ranges of the numeric options of every program (a key means the same thing in each): key -> (low, low
# included, high, high included). None as a value is "not set" and always allowed.
INF = math.inf
RANGES = {
    # sft.py: TrainingArguments / SFTConfig, ModelConfig (LoRA), CAIDataArguments, RecipeArguments
    "learning_rate": (0, False, INF, False), "num_train_epochs": (0, True, INF, False),
    "per_device_train_batch_size": (1, True, INF, False), "per_device_eval_batch_size": (1, True, INF, False),
    "gradient_accumulation_steps": (1, True, INF, False), "eval_accumulation_steps": (1, True, INF, False),
    "global_batch_size": (1, True, INF, False), "lora_top_layers": (1, True, INF, False),
    "lora_r": (1, True, INF, False), "lora_alpha": (0, False, INF, False),
    "lora_dropout": (0, True, 1, False), "eval_fraction": (0, True, 1, False), "max_eval_examples": (1, True, INF, False),
    "max_length": (1, True, INF, False), "eval_steps": (0, False, INF, False), "save_steps": (0, False, INF, False),
    "logging_steps": (0, False, INF, False), "warmup_steps": (0, True, INF, False), "warmup_ratio": (0, True, 1, True),
    "weight_decay": (0, True, INF, False), "max_grad_norm": (0, True, INF, False), "adam_beta1": (0, True, 1, False),
    "adam_beta2": (0, True, 1, False), "adam_epsilon": (0, False, INF, False), "seed": (0, True, 2**32 - 1, True),
    "data_seed": (0, True, 2**32 - 1, True), "num_sample_prompts": (0, True, INF, False),
    "sample_max_new_tokens": (1, True, INF, False), "overfit_warning_patience": (1, True, INF, False),
    "early_stopping_patience": (1, True, INF, False), "early_stopping_threshold": (0, True, INF, False),
    "dataloader_num_workers": (0, True, INF, False), "dataset_num_proc": (1, True, INF, False),
    "save_total_limit": (1, True, INF, False), "neftune_noise_alpha": (0, False, INF, False),
    "label_smoothing_factor": (0, True, 1, False),
    # generate_revisions.py
    "num_rounds": (1, True, INF, False), "batch_size": (1, True, INF, False), "num_workers": (1, True, INF, False),
    "max_new_tokens": (1, True, INF, False), "temperature": (0, True, INF, False), "max_rows": (1, True, INF, False),
    "tensor_parallel_size": (1, True, INF, False), "gpu_memory_utilization": (0, False, 1, True),
    "request_timeout": (0, False, INF, False), "request_retries": (0, True, INF, False),
    # evaluate.py
    "max_examples": (1, True, INF, False), "max_generations": (0, True, INF, False),
    "judge_concurrency": (1, True, INF, False),
    # tools
    "vocab_size": (260, True, INF, False), "num_gpus": (1, True, INF, False),
    "redteam_opening_tokens": (1, True, INF, False), "benign_opening_tokens": (1, True, INF, False),
    "max_benign": (1, True, INF, False), "max_redteam": (1, True, INF, False),
    "redteam_samples": (1, True, INF, False), "redteam_temperature": (0, False, INF, False),
}


def _range_text(low, low_in, high, high_in) -> str:
    lo = f"{'>=' if low_in else '>'} {low:g}"
    return lo if high == INF else f"{lo} and {'<=' if high_in else '<'} {high:g}"


def range_problem(key: str, value, rule=None) -> str | None:
    """None if `value` is a finite number within `key`'s range (RANGES), else the message naming key, value, range."""
    low, low_in, high, high_in = rule or RANGES[key]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # not set, or a type problem reported by the parser
    fix = f"Fix `{key}` in the YAML or on the command line."
    if not math.isfinite(value):
        return f"{key}: {value!r} is not a finite number; it must be {_range_text(low, low_in, high, high_in)}. {fix}"
    if (value < low or (value == low and not low_in)) or (value > high or (value == high and not high_in)):
        return f"{key}: {value!r} is out of range; it must be {_range_text(low, low_in, high, high_in)}. {fix}"
    return None


def range_problems(cfg: dict) -> list[str]:
    """Every numeric option of `cfg` (any program's flat mapping of options) outside its valid range, and the
    combinations that can never train."""
    p = [m for key in RANGES if key in cfg and (m := range_problem(key, _value(cfg[key])))]
    if "max_steps" in cfg:
        steps, epochs = cfg.get("max_steps"), cfg.get("num_train_epochs")
        if isinstance(steps, int) and (steps == 0 or steps < -1):
            p.append(f"max_steps: {steps} is out of range; it must be -1 (train num_train_epochs) or >= 1. Fix "
                     "`max_steps` in the YAML or on the command line.")
        elif isinstance(steps, int) and steps < 0 and isinstance(epochs, (int, float)) and epochs == 0:
            p.append("num_train_epochs: 0 with no max_steps trains zero steps. Set num_train_epochs > 0 (e.g. 1) or "
                     "max_steps >= 1.")
    for i, source in enumerate(cfg.get("datasets") or []):
        if isinstance(source, dict) and "eval_fraction" in source:
            problem = range_problem("eval_fraction", source["eval_fraction"])
            if problem:
                p.append(f"datasets[{i}].{problem}")
    return p


def eval_data_problem(training_args, eval_ds) -> None:
    """Refuse evaluations that can never happen: eval_strategy set, but no eval rows (before weights load)."""
    strategy = _value(getattr(training_args, "eval_strategy", "no")) or "no"
    if strategy != "no" and (eval_ds is None or len(eval_ds) == 0):
        raise ConfigError([
            f"eval_strategy: {strategy!r}, but there is no eval data (no test split, and eval_fraction 0 or every "
            "held-out row dropped), so no evaluation would ever run. Set `eval_strategy: no`, or give a test split "
            "(dataset_test_split / a source's test_split) or `eval_fraction` > 0."
        ])


def _hub_cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{repo_id.replace('/', '--')}")
    if os.path.isdir(folder):
        return True
    if repo_type == "dataset":
        cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
        return os.path.isdir(os.path.join(cache, repo_id.replace("/", "___")))
    return False


def where(path: str) -> str:
    return "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"


def _hub_hint(key: str, name: str, kind: str) -> str:
    local = f"{'models' if kind == 'model' else 'data'}/{name.split('/')[-1]}"
    return (f"{key}: {name!r} is not a local {'folder' if kind == 'model' else 'file or folder'}, and the model hub "
            f"is unreachable (HF_HUB_OFFLINE=1) with no cached copy. Download it where the hub is reachable (`hf "
            f"download {name} {'--repo-type dataset ' if kind == 'dataset' else ''}--local-dir {local}`), copy it "
            f"here and set `{key}: {local}`.")


def _path_problems(cfg) -> list[str]:
    """A model folder or a data file that does not exist; a hub id that cannot be reached offline."""
    p, model = [], cfg.get("model_name_or_path")
    if model:
        model = os.path.expanduser(str(model))
        if os.path.isdir(model):
            if not any(os.path.isfile(os.path.join(model, f)) for f in ("config.json", "adapter_config.json")):
                p.append(f"model_name_or_path: {model} has no config.json; point it at the folder that holds the "
                         "model's config.json and weights.")
            names = os.listdir(model)
            pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth")) and "model" in n]
            if pickled and not any(n.endswith(".safetensors") for n in names):
                p.append(f"model_name_or_path: {model} has only pickle weights ({', '.join(sorted(pickled))}), which "
                         "can run code when loaded; this recipe loads safetensors only. Convert them once: "
                         "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)` in a trusted session.")
        elif env.is_local_path(model) or os.path.exists(model):
            p.append(f"model_name_or_path: {model} does not exist{where(model)}. Fix the path, or run "
                     "`make model` for the demo model.")
        elif env.offline() and not _hub_cached(model, "model"):
            p.append(_hub_hint("model_name_or_path", model, "model"))

    import cai_data

    class Args(dict):
        __getattr__ = dict.get

    try:
        sources = cai_data.sources_from_args(Args(cfg), Args(cfg))
    except cai_data.DataError as e:
        return p + [str(e)]
    for i, s in enumerate(sources):
        key = f"datasets[{i}]" if cfg.get("datasets") else "dataset_name"
        files = s.get("data_files")
        files = list(files.values()) if isinstance(files, dict) else [files] if files else []
        for f in files:
            if not os.path.isfile(str(f)):
                p.append(f"{key}.data_files: {f} does not exist{where(str(f))}. Fix the path.")
        path = s.get("path")
        if files or not path or os.path.exists(path):
            continue
        if env.is_local_path(path) or os.path.splitext(path)[1].lower() in cai_data.LOCAL_SUFFIXES:
            p.append(f"{key}: {path} does not exist{where(path)}. Fix the path.")
        elif env.offline() and not _hub_cached(path, "dataset"):
            p.append(_hub_hint(f"{key}" if cfg.get("datasets") else "dataset_name", path, "dataset"))
    return p


def input_paths(cfg: dict) -> dict:
    """{key: path} of what sft.py (dpo.py) reads: the models, data files and folders, the chat template, DeepSpeed."""
    inputs = {k: cfg.get(k) for k in ("model_name_or_path", "base_model", "dataset_name", "chat_template_path", "deepspeed")
              if isinstance(cfg.get(k), str)}
    for i, s in enumerate(cfg.get("datasets") or []):
        s = {"path": s} if isinstance(s, str) else s if isinstance(s, dict) else {}
        files = s.get("data_files")
        files = list(files.values()) if isinstance(files, dict) else [files] if files else []
        for j, f in enumerate([s.get("path"), *files]):
            if isinstance(f, str):
                inputs[f"datasets[{i}]" + (f".data_files[{j - 1}]" if j else ".path")] = f
    return inputs


def validate(script_args, training_args, model_args, data_args, recipe_args, also=None) -> None:
    """Refuse configurations we cannot honour, one clear message per problem, before loading weights.
    `also(cfg)` adds more problems (the output guard) to the same list."""
    cfg = {}
    for args in (script_args, training_args, model_args, data_args, recipe_args):
        if args is not None:
            cfg.update(vars(args))
    world_size = getattr(training_args, "world_size", 1)
    problems = config_problems(cfg, world_size) + (also(cfg) if also else [])
    if problems:
        raise ConfigError(problems)


@contextlib.contextmanager
def reworded_load_error(key: str, name: str):
    """Turn a failed `from_pretrained(name)` into one message naming the key and the fix."""
    try:
        yield
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("the hub may be unreachable from here: download it elsewhere (`hf download "
                f"{name} --local-dir models/{name.split('/')[-1]}`) and point `{key}` at that folder"
                if not os.path.isdir(name) else "check that the folder holds a complete model (config, tokenizer)")
        raise ConfigError([f"{key}: could not load {name!r} ({first}); {hint}."]) from None


def check_max_length(max_length: int | None, overhead: int) -> None:
    """Refuse a max_length that the chat template and system prompt alone fill (`overhead` tokens)."""
    if max_length is not None and max_length <= overhead:
        raise ConfigError([
            f"max_length: {max_length} leaves no room for P and R: the chat template with the system prompt takes "
            f"{overhead} tokens for an empty conversation. Set max_length well above it (e.g. {max(512, overhead * 4)})"
            ", or shorten system_prompt."
        ])


def accumulation_for(global_batch_size: int, per_device: int, world_size: int) -> int:
    """Gradient accumulation that keeps `global_batch_size` fixed whatever the number of processes."""
    per_step = per_device * world_size
    if global_batch_size % per_step:
        raise ConfigError([
            f"global_batch_size: {global_batch_size} is not a multiple of per_device_train_batch_size "
            f"({per_device}) x processes ({world_size}) = {per_step}. Pick a global batch size divisible by it, "
            "or change per_device_train_batch_size."
        ])
    return global_batch_size // per_step


