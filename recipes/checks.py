"""Checks that run before any weights load, the dry-run preview, and safe checkpoint/save helpers.

Config validation: `parse_args` (unknown keys, wrong types, then every rule below on the parsed values) and
`validate` (the same rules on the dataclasses, for callers of `main()`), `check_max_length` (max_length vs
the chat template). Each problem is one line naming the key and the fix; all problems are reported together.

Runs that survive: `checkpoint_to_resume` picks the newest COMPLETE `checkpoint-N` in output_dir (a checkpoint
cut off mid-write is skipped, renamed `incomplete-checkpoint-N`, never loaded); `save_model_atomically` +
`mark_complete` write the final model so that a crash while saving never leaves a folder that looks finished.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import shutil
import struct
import sys
import time
import zipfile

COMPLETE_MARKER = "cai_sft_complete.json"
FINAL_TMP = ".cai_sft_final.tmp"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")
# Metrics the Trainer logs at evaluation (SFTTrainer adds accuracy, entropy, tokens); extend when a callback adds one.
LOGGED_EVAL_METRICS = ("loss", "mean_token_accuracy", "entropy", "num_tokens", "runtime", "samples_per_second",
                       "steps_per_second")
TRUE = ("1", "true", "yes", "on")


class ConfigError(SystemExit):
    """One or more configuration problems: the process exits (status 1) printing the list of problems."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("Configuration problems (nothing was loaded or trained):\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


def bf16_available() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _say(*args):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------- parsing


def _closest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" Did you mean `{match[0]}`?" if match else ""


def _field_types(parser) -> dict[str, str]:
    import dataclasses

    out = {}
    for dtype in parser.dataclass_types:
        for f in dataclasses.fields(dtype):
            out[f.name] = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
    return out


def _type_problem(key: str, value, action, expected: str) -> str | None:
    """None if argparse would accept `value` for `action` (and it is one of its choices), else the message."""
    if value is None or isinstance(value, dict) or action.type is None:
        return None
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            return f"{key}: got a list {value!r}, but it takes a single value ({expected})."
        values = [v for v in value if not isinstance(v, dict)]
    else:
        values = [value]
    for v in values:
        try:
            converted = action.type(v if isinstance(v, str) else str(v))
        except (TypeError, ValueError, AttributeError, argparse.ArgumentTypeError):
            kind = "true/false" if "bool" in expected and "|" not in expected else expected
            return f"{key}: expected {kind}, got {v!r}. Fix the value of `{key}`."
        if action.choices and converted not in action.choices:
            return (f"{key}: {v!r} is not one of {list(action.choices)}.{_closest(str(v), map(str, action.choices))}")
    return None


def parse_args(parser, argv=None):
    """`parser.parse_args_and_config()`, with every problem of the YAML, the command line and the values reported
    together, each naming the key and the fix (TrlParser stops at the first, with a generic message)."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    problems, config, config_path = [], {}, None
    for a in argv:
        if a.startswith("--config="):
            problems.append(f"--config: write `--config {a.split('=', 1)[1]}` (a space, not `=`).")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            problems.append("--config: give the YAML file after it: `--config recipes/<model>/<file>.yaml`.")
            argv = argv[:i]
        else:
            config_path = argv[i + 1]
            argv = argv[:i] + argv[i + 2:]
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = yaml.safe_load(f) or {}
            except FileNotFoundError:
                problems.append(f"--config: {config_path} does not exist{_where(config_path)}. Check the path.")
            except yaml.YAMLError as e:
                problems.append(f"--config: {config_path} is not valid YAML: {e}".replace("\n", " "))
            if not isinstance(config, dict):
                problems.append(f"--config: {config_path} must be a YAML mapping of `key: value` lines.")
                config = {}

    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    types = _field_types(parser)
    env = config.pop("env", {}) or {}
    if not isinstance(env, dict):
        problems.append("env: must be a mapping of environment variables (NAME: value).")
        env = {}
    good = {}
    for key, value in config.items():
        if key not in actions:
            problems.append(f"{key}: unknown key in {config_path}.{_closest(key, actions)} Remove it or fix its name.")
            continue
        problem = _type_problem(key, value, actions[key], types.get(key, "value"))
        if problem:
            problems.append(problem)
        else:
            good[key] = value
    options = parser._option_string_actions
    for a in argv:
        if a.startswith("--") and not a.startswith("--config"):
            name = a.split("=", 1)[0]
            if name not in options:
                problems.append(f"{name[2:]}: unknown command-line option {name}.{_closest(name[2:], actions)}")

    for key, value in env.items():
        os.environ[key] = str(value)  # as TrlParser does with a YAML `env:` block
    parser.set_defaults_with_config(**good)
    parser.exit_on_error = False  # a bad command-line value is reported with the others, not alone
    try:
        namespace, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        key = (e.argument_name or "--?").split("/")[0].lstrip("-")
        problems.append(f"{key}: {e.message}. Fix `--{key}` on the command line.")
        namespace, _ = parser.parse_known_args([])
    problems += config_problems(vars(namespace), int(os.environ.get("WORLD_SIZE", "1")))
    if problems:
        raise ConfigError(problems)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, TypeError, AssertionError) as e:  # a dataclass __post_init__ refusing a value
        raise ConfigError([_reword(str(e), actions)]) from None


def _reword(message: str, keys) -> str:
    named = [k for k in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message) if k in keys and "_" in k]
    key = named[0] if named else "config"
    message = message.strip().rstrip(".")
    return f"{key}: {message}. Fix `{key}` in the YAML or on the command line."


# --------------------------------------------------------------------------------------------- rules


def _value(v):
    return None if v is None else getattr(v, "value", v)  # enums as their string


def _zero3_or_fsdp(cfg) -> str | None:
    """'DeepSpeed ZeRO-3' or 'FSDP' when the run shards parameters (from the config or `accelerate launch`)."""
    ds = cfg.get("deepspeed") or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") if os.environ.get(
        "ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE else None
    if isinstance(ds, str) and os.path.isfile(ds):
        with contextlib.suppress(OSError, ValueError):
            with open(ds, encoding="utf-8") as f:
                ds = json.load(f)
    if isinstance(ds, dict):
        stage = (ds.get("zero_optimization") or {}).get("stage", stage)
    if str(stage) == "3":
        return "DeepSpeed ZeRO-3"
    if cfg.get("fsdp") or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in TRUE:
        return "FSDP"
    return None


def config_problems(cfg: dict, world_size: int = 1) -> list[str]:
    """Every rule on the values alone (one flat mapping of all arguments), before anything is loaded."""
    p, get = [], cfg.get
    if not get("model_name_or_path"):
        p.append("model_name_or_path: not set. Point it at a local model folder or a hub id.")

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
    sharded = _zero3_or_fsdp(cfg)
    dtype = _value(get("dtype"))
    if get("load_in_4bit") and sharded and (_value(get("bnb_4bit_quant_storage")) != dtype or dtype in (None, "auto")):
        want = dtype if dtype not in (None, "auto") else "bfloat16"  # float32 stays: the CPU path (tests) uses it
        p.append(f"bnb_4bit_quant_storage: QLoRA with {sharded} shards only floating-point weights of one dtype; set "
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
                     f"(one of {names}).{_closest(metric, names + list(LOGGED_EVAL_METRICS))}")

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
    if resume and str(resume).lower() not in TRUE and not os.path.isdir(resume):
        p.append(f"resume_from_checkpoint: {resume} is not a folder. Point it at a `checkpoint-N` folder, or leave "
                 "it out: relaunching the same command resumes from the newest complete checkpoint by itself.")

    p += _path_problems(cfg)
    if not get("dry_run") and get("output_dir"):
        problem = output_dir_problem(get("output_dir"), bool(get("overwrite_output_dir")))
        if problem:
            p.append(problem)
    return p


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id `org/name` (e.g. `models/x` when ./models exists)."""
    first = name.split("/")[0]
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or "/" in name and os.path.isdir(first))


def _hub_cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{repo_id.replace('/', '--')}")
    if os.path.isdir(folder):
        return True
    if repo_type == "dataset":
        cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
        return os.path.isdir(os.path.join(cache, repo_id.replace("/", "___")))
    return False


def _where(path: str) -> str:
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
        elif _looks_like_path(model) or os.path.exists(model):
            p.append(f"model_name_or_path: {model} does not exist{_where(model)}. Fix the path, or run "
                     "`make model` for the demo model.")
        elif _offline() and not _hub_cached(model, "model"):
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
                p.append(f"{key}.data_files: {f} does not exist{_where(str(f))}. Fix the path.")
        path = s.get("path")
        if files or not path or os.path.exists(path):
            continue
        if _looks_like_path(path) or os.path.splitext(path)[1].lower() in cai_data.LOCAL_SUFFIXES:
            p.append(f"{key}: {path} does not exist{_where(path)}. Fix the path.")
        elif _offline() and not _hub_cached(path, "dataset"):
            p.append(_hub_hint(f"{key}" if cfg.get("datasets") else "dataset_name", path, "dataset"))
    return p


def validate(script_args, training_args, model_args, data_args, recipe_args) -> None:
    """Refuse configurations we cannot honour, one clear message per problem, before loading weights."""
    cfg = {}
    for args in (script_args, training_args, model_args, data_args, recipe_args):
        if args is not None:
            cfg.update(vars(args))
    world_size = getattr(training_args, "world_size", 1)
    problems = config_problems(cfg, world_size)
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
        raise SystemExit(
            f"global_batch_size: {global_batch_size} is not a multiple of per_device_train_batch_size "
            f"({per_device}) x processes ({world_size}) = {per_step}. Pick a global batch size divisible by it, "
            "or change per_device_train_batch_size."
        )
    return global_batch_size // per_step


# --------------------------------------------------------------------------------------------- output_dir


def is_complete(output_dir: str) -> bool:
    """Whether output_dir holds a finished run: the marker, written last, parses."""
    try:
        with open(os.path.join(output_dir, COMPLETE_MARKER), encoding="utf-8") as f:
            return bool(json.load(f).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)
            if os.path.isdir(os.path.join(output_dir, n))]


def output_dir_problem(output_dir: str, overwrite: bool) -> str | None:
    """A new run must not silently replace a finished model (or weights of unknown origin)."""
    if overwrite or not os.path.isdir(output_dir):
        return None
    if is_complete(output_dir):
        return (f"output_dir: {output_dir} already holds a finished model ({COMPLETE_MARKER}). Pick another "
                "output_dir, or add --overwrite_output_dir to train again and replace it.")
    weights = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(output_dir, f))]
    if weights and not any(checkpoint_problem(c) is None for c in _checkpoints(output_dir)):
        return (f"output_dir: {output_dir} holds model weights ({', '.join(weights)}) not marked as a finished run of "
                "this recipe and no checkpoint to resume from. Pick another output_dir, or add "
                "--overwrite_output_dir to replace them.")
    return None


# --------------------------------------------------------------------------------------------- checkpoints


def safetensors_problem(path: str) -> str | None:
    """None if the file's header parses and its size is exactly header + tensor data, else why not."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{os.path.basename(path)} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{os.path.basename(path)} is truncated (header of {n} bytes, file of {size})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{os.path.basename(path)} has an unreadable header ({type(e).__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{os.path.basename(path)} is truncated ({size} bytes, its header says {8 + n + end})"
    return None


def checkpoint_problem(path: str, save_only_model: bool = False) -> str | None:
    """None if a checkpoint folder is complete enough to resume from, else the reason (never loads it)."""
    if not os.path.isdir(path):
        return "not a folder"
    names = set(os.listdir(path))
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing (the Trainer writes it last: the save was cut off)"
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is not valid (cut off mid-write)"
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if "model.safetensors.index.json" in names:
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as f:
                wanted = set(json.load(f)["weight_map"].values())
            if wanted - names:
                return f"weight shards {sorted(wanted - names)} are missing"
    sharded_state = any(n.startswith("global_step") or "fsdp" in n for n in names)  # DeepSpeed / FSDP own formats
    if not shards and not sharded_state:
        return "no model weights (model.safetensors or adapter_model.safetensors)"
    for name in shards:
        problem = safetensors_problem(os.path.join(path, name))
        if problem:
            return problem
    if not save_only_model and not sharded_state:
        for name in ("optimizer.pt", "scheduler.pt"):
            if name not in names:
                return f"{name} is missing"
    for name in sorted(n for n in names if n.endswith((".pt", ".pth", ".bin"))):
        if not zipfile.is_zipfile(os.path.join(path, name)):  # torch.save writes a zip; a cut-off one has no index
            return f"{name} is truncated"
    return None


def _set_aside(path: str) -> str:
    parent, name = os.path.split(path)
    target, i = os.path.join(parent, f"incomplete-{name}"), 1
    while os.path.exists(target):
        target, i = os.path.join(parent, f"incomplete-{name}.{i}"), i + 1
    os.replace(path, target)
    return target


def _barrier():
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def checkpoint_to_resume(training_args, overwrite_output_dir: bool = False):
    """The checkpoint to resume from: `resume_from_checkpoint` if given (and complete), else the newest complete
    `checkpoint-N` in output_dir, else None (a fresh run). Incomplete ones are reported and set aside.

    transformers' `get_last_checkpoint` returns the newest folder even when it was cut off mid-write; we check.
    """
    out, main = training_args.output_dir, training_args.process_index == 0
    save_only = bool(getattr(training_args, "save_only_model", False))
    given = training_args.resume_from_checkpoint
    if given and str(given).lower() not in TRUE:
        problem = checkpoint_problem(given, save_only)
        if problem:
            raise ConfigError([f"resume_from_checkpoint: {given} is incomplete ({problem}). Point it at an earlier "
                               "checkpoint, or leave it out to pick the newest complete one."])
        _say(f"Resuming from {given} (resume_from_checkpoint).")
        return given
    if is_complete(out):
        if not overwrite_output_dir:
            raise ConfigError([output_dir_problem(out, False)])
        # Start over: the finished model is no longer marked complete, and the old run's checkpoints must not be
        # resumed by a relaunch of this one.
        old = _checkpoints(out)
        _barrier()
        if main:
            os.remove(os.path.join(out, COMPLETE_MARKER))
            for c in old:
                shutil.rmtree(c)
            _say(f"--overwrite_output_dir: starting over in {out}; removed {COMPLETE_MARKER} and {len(old)} old "
                 "checkpoint(s).")
        _barrier()
        return None
    chosen, broken = None, []
    for c in _checkpoints(out):
        problem = checkpoint_problem(c, save_only)
        if problem is None:
            chosen = c
            break
        broken.append((c, problem))
    _barrier()  # every process has decided before the main one renames anything
    for c, problem in broken:
        if main:
            _say(f"Skipping {c}: {problem}. Set aside as {_set_aside(c)}; it will not be loaded.")
    _barrier()
    if chosen:
        _say(f"Resuming from {chosen} (the newest complete checkpoint in {out}).")
    return chosen


# --------------------------------------------------------------------------------------------- final save


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_atomically(trainer, output_dir: str) -> None:
    """trainer.save_model into a temporary folder, then each file moved into output_dir with an atomic rename.

    The Trainer writes straight into output_dir; a crash there leaves a half-written model.safetensors. Here
    every file in output_dir is whole, and `mark_complete` (called last) is what says the set is finished.
    """
    tmp = os.path.join(output_dir, FINAL_TMP)
    main = trainer.accelerator.is_main_process
    if main:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, COMPLETE_MARKER))
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(tmp)  # every process: DeepSpeed/FSDP gather the weights collectively
    trainer.accelerator.wait_for_everyone()
    if main:
        for root, _, files in os.walk(tmp):
            target_dir = os.path.join(output_dir, os.path.relpath(root, tmp))
            os.makedirs(target_dir, exist_ok=True)
            for name in files:
                _fsync(os.path.join(root, name))
                os.replace(os.path.join(root, name), os.path.join(target_dir, name))
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()


def mark_complete(output_dir: str) -> None:
    """Write the completion marker last, after every file of the model is on disk."""
    files = {}
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path) and name != COMPLETE_MARKER:
            _fsync(path)
            files[name] = os.path.getsize(path)
    tmp = os.path.join(output_dir, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"complete": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(output_dir, COMPLETE_MARKER))


# --------------------------------------------------------------------------------------------- dry-run preview


def _render_labels(tokenizer, ids, labels, color: bool) -> str:
    """Decode an example with the trained tokens highlighted (green in a terminal, [[...]] otherwise)."""
    out, run, trained = [], [], None
    for t, lab in zip(ids, labels):
        is_trained = lab != -100
        if trained is not None and is_trained != trained:
            out.append((trained, tokenizer.decode(run)))
            run = []
        run.append(t)
        trained = is_trained
    if run:
        out.append((trained, tokenizer.decode(run)))
    if color:
        return "".join(f"\033[1;32m{s}\033[0m" if tr else f"\033[2m{s}\033[0m" for tr, s in out)
    return "".join(f"[[{s}]]" if tr else s for tr, s in out)


def write_preview(train_ds, tokenizer, training_args, model_args, report) -> str:
    """preview.jsonl: one {"input_ids", "labels"} per training example, exactly as the collator receives them."""
    path = os.path.join(training_args.output_dir, "preview.jsonl")
    with open(path, "w") as f:
        for ex in train_ds:
            f.write(json.dumps({"input_ids": ex["input_ids"], "labels": ex["labels"], "source": ex["source"],
                                "row": ex["row"]}) + "\n")
    first = train_ds[0]
    print("\nFirst training example (trained tokens highlighted):")
    print(_render_labels(tokenizer, first["input_ids"], first["labels"], sys.stdout.isatty()))
    print(f"\nDry run: wrote {len(train_ds)} examples to {path}; no weights were loaded.")
    return path
