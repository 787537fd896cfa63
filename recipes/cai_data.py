"""Load (P, R_revised) pairs from any supported schema into conversational prompt/completion rows.

Shared by `sft.py`, `evaluate.py` and `generate_revisions.py` so that every recipe renders the same
system prompt and chat template. Every dropped or changed row is counted in a `DataReport`; every
error names the source, the row and the field, and says how to fix it.

Accepted schemas (per source, `format: auto` detects them):
  cai       HuggingFaceH4/cai-conversation-harmless: P = `prompt` (or `init_prompt`), R = `revision_response`
  pc        `prompt` / `completion` strings (or `prompt_column` / `response_column`)
  messages  a list of {role, content}; the last assistant turn is the target, earlier turns are context
  hh        Anthropic HH text: "\\n\\nHuman: ... \\n\\nAssistant: ..." (column `chosen` or `text`)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant aligned with constitutional principles."
FORMATS = ("auto", "cai", "pc", "messages", "hh")
ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_LOCATIONS = 5  # how many example locations to keep per drop reason


class DataError(ValueError):
    """Bad input that cannot be dropped row by row: a missing column, an unreadable file, nothing left."""


@dataclass
class CAIDataArguments:
    """Data options that TRL's `ScriptArguments` / `DatasetMixtureConfig` do not have."""

    datasets: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "Mixture sources, each a mapping: path (file, folder or hub id), name, data_files, split, "
            "test_split, fraction, format, prompt_column, response_column, messages_column. Overrides dataset_name."
        },
    )
    system_prompt: str | None = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "System message put before every prompt; null or '' for none (templates without system)."},
    )
    data_format: str = field(default="auto", metadata={"help": f"Schema of dataset_name: one of {FORMATS}."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding P (string)."})
    response_column: str | None = field(default=None, metadata={"help": "Column holding R_revised (string)."})
    messages_column: str | None = field(default=None, metadata={"help": "Column holding a messages list."})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Held-out share of unique prompts for sources without a test split."}
    )
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded sample of this many held-out rows (counted)."}
    )
    dedupe: bool = field(default=True, metadata={"help": "Drop exact duplicate (prompt, response) pairs."})
    exclude_flagged: bool = field(
        default=True, metadata={"help": "Drop rows whose `flags` list is non-empty (from generate_revisions.py)."}
    )


@dataclass
class DataReport:
    """What was read, kept and dropped, per source and reason. Written to output_dir/data_summary.json."""

    sources: dict[str, dict] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    locations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, Any] = field(default_factory=dict)

    def drop(self, reason: str, where: str, n: int = 1) -> None:
        self.dropped[reason] += n
        if len(self.locations[reason]) < MAX_LOCATIONS:
            self.locations[reason].append(where)

    def change(self, reason: str, where: str, n: int = 1) -> None:
        self.changed[reason] += n
        if len(self.locations[reason]) < MAX_LOCATIONS:
            self.locations[reason].append(where)

    def to_dict(self) -> dict:
        return {
            "sources": self.sources,
            "counts": self.counts,
            "dropped": dict(self.dropped),
            "changed": dict(self.changed),
            "examples_of_each_reason": dict(self.locations),
        }

    def lines(self) -> list[str]:
        out = [f"  {k}: {v}" for k, v in self.counts.items()]
        for name, s in self.sources.items():
            out.append(f"  source {name}: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "path"))
        for reason, n in sorted(self.dropped.items()):
            out.append(f"  dropped {n} ({reason}), e.g. {'; '.join(self.locations[reason][:2])}")
        for reason, n in sorted(self.changed.items()):
            out.append(f"  changed {n} ({reason}), e.g. {'; '.join(self.locations[reason][:2])}")
        return out


# --------------------------------------------------------------------------------------------- reading


def _read_json_lines(path: str) -> list[dict]:
    # Our own reader so that a bad line is reported by number; datasets' json loader only says "invalid".
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: bytes that are not UTF-8 at offset {e.start} ({e.reason}). "
            "Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    stripped = text.lstrip()
    if path.endswith(".json") and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}).") from None
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: a JSON list file must hold objects, one per example.")
        return rows
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {i}: invalid JSON ({e.msg} at column {e.colno}). Each line must be one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


def _read_local(path: str) -> list[dict]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}'. Use .jsonl, .json, .parquet or .csv.")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file.")
    if LOCAL_SUFFIXES[suffix] == "json":
        return _read_json_lines(path)
    import datasets

    try:
        ds = datasets.load_dataset(LOCAL_SUFFIXES[suffix], data_files=path, split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear message
        raise DataError(f"{path}: could not read as {suffix[1:]}: {type(e).__name__}: {e}") from None
    return ds.to_list()


def _looks_local(path: str) -> bool:
    return os.path.exists(path) or path.startswith((".", "/")) or os.path.splitext(path)[1].lower() in LOCAL_SUFFIXES


def read_split(source: dict, split: str) -> list[dict]:
    """Rows of one split of one source: a local file, a `data_files` mapping, a local folder or a hub id."""
    path, data_files = source.get("path"), source.get("data_files")
    if isinstance(data_files, dict):
        if split not in data_files:
            raise DataError(f"source {source_name(source)}: no data_files entry for split '{split}'.")
        return _read_local(data_files[split])
    if isinstance(data_files, str):
        return _read_local(data_files)
    if path is None:
        raise DataError(f"a dataset source has neither `path` nor `data_files`: {source}")
    if os.path.isfile(path) or (_looks_local(path) and not os.path.isdir(path)):
        return _read_local(path)
    import datasets

    try:
        ds = datasets.load_dataset(path, name=source.get("name"), split=split)
    except Exception as e:  # noqa: BLE001
        hint = (
            "The model hub may be unreachable (offline): download the dataset elsewhere and point `path` at a local "
            "folder or file (.jsonl/.json/.parquet/.csv)."
            if not os.path.isdir(path)
            else "Check the split name and the files in that folder."
        )
        raise DataError(f"dataset '{path}' split '{split}': {type(e).__name__}: {e}. {hint}") from None
    return ds.to_list()


def source_name(source: dict) -> str:
    if source.get("path"):
        return str(source["path"])
    files = source.get("data_files")
    return str(files.get("train", next(iter(files.values()))) if isinstance(files, dict) else files)


def split_exists(source: dict, split: str | None) -> bool:
    """Whether a source has a given split, without guessing for hub ids (which are asked)."""
    if not split:
        return False
    data_files, path = source.get("data_files"), source.get("path") or ""
    if isinstance(data_files, dict):
        return split in data_files
    if data_files is not None or os.path.isfile(path) or _looks_local(path) and not os.path.isdir(path):
        return False
    try:
        import datasets

        return split in datasets.get_dataset_split_names(path, source.get("name"))
    except Exception:  # noqa: BLE001 - an unreachable hub is reported when the train split is read
        return False


# --------------------------------------------------------------------------------------------- schemas


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(text: str) -> list[dict]:
    """Anthropic HH text ("\\n\\nHuman: ... \\n\\nAssistant: ...") to messages."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    parts = HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def detect_format(columns: list[str], source: dict) -> str:
    fmt = source.get("format", "auto")
    if fmt not in FORMATS:
        raise DataError(f"source {source_name(source)}: format '{fmt}' is not one of {FORMATS}.")
    if fmt != "auto":
        return fmt
    if source.get("messages_column"):
        return "messages"
    if source.get("prompt_column") or source.get("response_column"):
        return "pc"
    if "revision_response" in columns:
        return "cai"
    if "prompt" in columns and "completion" in columns:
        return "pc"
    if "messages" in columns:
        return "messages"
    if "chosen" in columns or "text" in columns:
        return "hh"
    raise DataError(
        f"source {source_name(source)}: cannot tell the schema from its columns {sorted(columns)}. Expected the "
        "cai-conversation-harmless columns (prompt, revision_response, ...), prompt/completion, messages, or HH text "
        "(chosen/text). Map yours with `prompt_column` + `response_column`, or `messages_column`, on this source."
    )


def required_columns(fmt: str, source: dict, columns: list[str]) -> list[str]:
    if fmt == "cai":
        return ["prompt" if "prompt" in columns else "init_prompt", "revision_response"]
    if fmt == "pc":
        return [source.get("prompt_column") or "prompt", source.get("response_column") or "completion"]
    if fmt == "messages":
        return [source.get("messages_column") or "messages"]
    return [source.get("messages_column") or ("chosen" if "chosen" in columns else "text")]


def _check_messages(messages: Any) -> str | None:
    """None if `messages` is a valid conversation ending in an assistant turn, else the problem."""
    if not isinstance(messages, list) or not messages:
        return "not a non-empty list of {role, content}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"turn {i} is not a {{role, content}} mapping"
        if m["role"] not in ROLES:
            return f"turn {i} has unknown role '{m['role']}' (expected one of {ROLES})"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"turn {i} ({m['role']}) has empty or non-string content"
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        return "a system turn after the first turn"
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"turn order: expected {expected} at turn {i + len(messages) - len(body)}, got {m['role']}"
    if not any(m["role"] == "assistant" for m in body):
        return "no assistant turn"
    return None


def to_pair(row: dict, fmt: str, source: dict) -> tuple[list[dict], str]:
    """(context messages ending in the user's P, R_revised) or raises ValueError('field: problem')."""
    if fmt in ("cai", "pc"):
        if fmt == "cai":
            p_col = "prompt" if "prompt" in row else "init_prompt"
            r_col = "revision_response"
        else:
            p_col, r_col = source.get("prompt_column") or "prompt", source.get("response_column") or "completion"
        prompt, response = row.get(p_col), row.get(r_col)
        for col, value in ((p_col, prompt), (r_col, response)):
            if value is None:
                raise ValueError(f"{col}: is null")
            if not isinstance(value, str):
                raise ValueError(f"{col}: is {type(value).__name__}, not a string")
            if not value.strip():
                raise ValueError(f"{col}: is empty or whitespace")
        return [{"role": "user", "content": prompt}], response
    col = source.get("messages_column") or ("messages" if fmt == "messages" else None)
    if fmt == "hh":
        col = col or ("chosen" if "chosen" in row else "text")
        try:
            messages = parse_hh(row.get(col))
        except ValueError as e:
            raise ValueError(f"{col}: not Anthropic HH text ({e})") from None
    else:
        messages = row.get(col)
    problem = _check_messages(messages)
    if problem:
        raise ValueError(f"{col}: {problem}")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(role=m["role"], content=m["content"]) for m in messages[:last]], messages[last]["content"]


def normalize(rows: list[dict], source: dict, split: str, data_args: CAIDataArguments, report: DataReport):
    """Rows of one split to {"prompt": [...], "completion": [...], "source", "row"}; bad rows dropped and counted."""
    name = source_name(source)
    if not rows:
        return []
    columns = sorted({k for r in rows[:100] for k in r})
    fmt = detect_format(columns, source)
    missing = [c for c in required_columns(fmt, source, columns) if c not in columns]
    if missing:
        raise DataError(
            f"source {name} split {split}: required column(s) {missing} missing for format '{fmt}'. Columns found: "
            f"{columns}. Set `prompt_column`/`response_column` (or `messages_column`) on this source to map yours."
        )
    system = source.get("system_prompt", data_args.system_prompt)
    out = []
    for i, row in enumerate(rows):
        where = f"{name} [{split}] row {i}"
        if data_args.exclude_flagged and row.get("flags"):
            report.drop("flagged by generate_revisions.py", f"{where}: {row['flags']}")
            continue
        try:
            context, response = to_pair(row, fmt, source)
        except ValueError as e:
            field_name, _, problem = str(e).partition(": ")
            report.drop(f"invalid {field_name}: {problem.split(' (')[0]}", f"{where} field '{field_name}': {problem}")
            continue
        if system and context[0]["role"] != "system":
            context = [{"role": "system", "content": system}, *context]
        out.append(
            {
                "prompt": context,
                "completion": [{"role": "assistant", "content": response}],
                "source": name,
                "row": i,
            }
        )
    return out


# --------------------------------------------------------------------------------------------- mixing


def prompt_key(example: dict) -> str:
    """Identity of a prompt for leak checks: the whole context, whitespace-collapsed and lower-cased."""
    text = "\n".join(m["content"] for m in example["prompt"] if m["role"] != "system")
    return " ".join(text.lower().split())


def _pair_key(example: dict) -> str:
    return hashlib.sha1((prompt_key(example) + "\0" + example["completion"][0]["content"]).encode()).hexdigest()


def split_by_prompt(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the unique prompts, so that no prompt is in both splits."""
    keys = sorted({prompt_key(e) for e in examples})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * fraction)) if fraction > 0 and len(keys) > 1 else 0
    held = set(keys[:n_eval])
    return [e for e in examples if prompt_key(e) not in held], [e for e in examples if prompt_key(e) in held]


def mix(per_source: list[list[dict]], fractions: list[float | None], seed: int) -> list[dict]:
    """TRL's fraction rule (normalise, cap so that no source is oversampled), after a seeded shuffle of each."""
    if all(f is None for f in fractions):
        return [e for rows in per_source for e in rows]
    if any(f is None for f in fractions):
        raise DataError("`fraction` must be set on every mixture source or on none of them.")
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise DataError(f"mixture fractions must be >= 0 and not all 0, got {fractions}.")
    weights = [f / sum(fractions) for f in fractions]
    total = min(len(rows) / w for rows, w in zip(per_source, weights) if w > 0)
    out = []
    for k, (rows, w) in enumerate(zip(per_source, weights)):
        rows = list(rows)
        random.Random(seed + k).shuffle(rows)
        out.extend(rows[: round(w * total)])
    return out


def sources_from_args(script_args, data_args: CAIDataArguments) -> list[dict]:
    if data_args.datasets:
        return [dict(s) for s in data_args.datasets]
    if not script_args.dataset_name:
        raise DataError("no data: set `dataset_name` (file, folder or hub id) or a `datasets:` mixture in the YAML.")
    return [
        {
            "path": script_args.dataset_name,
            "name": script_args.dataset_config,
            "split": script_args.dataset_train_split,
            "test_split": script_args.dataset_test_split,
            "format": data_args.data_format,
            "prompt_column": data_args.prompt_column,
            "response_column": data_args.response_column,
            "messages_column": data_args.messages_column,
        }
    ]


def load_pairs(script_args, data_args: CAIDataArguments, seed: int = 42):
    """Train and eval lists of conversational prompt/completion rows, and the report of what was dropped."""
    report = DataReport()
    train_parts, eval_parts, fractions = [], [], []
    for source in sources_from_args(script_args, data_args):
        name = source_name(source)
        split = source.get("split", "train")
        train = normalize(read_split(source, split), source, split, data_args, report)
        test_split = source.get("test_split", "test")
        if split_exists(source, test_split) and test_split != split:
            evals = normalize(read_split(source, test_split), source, test_split, data_args, report)
        else:
            train, evals = split_by_prompt(train, source.get("eval_fraction", data_args.eval_fraction), seed)
        if not train:
            raise DataError(f"source {name}: no usable training rows left (see the drop reasons above).")
        report.sources[name] = {"path": name, "train_rows": len(train), "eval_rows": len(evals)}
        train_parts.append(train)
        eval_parts.append(evals)
        fractions.append(source.get("fraction"))

    train = mix(train_parts, fractions, seed)
    evals = [e for part in eval_parts for e in part]
    if data_args.dedupe:
        train = _dedupe(train, "train", report)
        evals = _dedupe(evals, "eval", report)
    eval_prompts = {prompt_key(e) for e in evals}
    leaked = [e for e in train if prompt_key(e) in eval_prompts]
    for e in leaked:
        report.drop("prompt also in eval (dropped from train)", f"{e['source']} row {e['row']}")
    train = [e for e in train if prompt_key(e) not in eval_prompts]
    if not train:
        raise DataError("no training rows left after dropping prompts that also appear in the eval split.")
    if data_args.max_eval_examples is not None and len(evals) > data_args.max_eval_examples:
        report.change("eval rows not sampled (max_eval_examples)", "eval", len(evals) - data_args.max_eval_examples)
        evals = random.Random(seed).sample(evals, data_args.max_eval_examples)
    report.counts.update(train_examples=len(train), eval_examples=len(evals))
    return train, evals, report


def _dedupe(rows: list[dict], split: str, report: DataReport) -> list[dict]:
    seen, out = set(), []
    for e in rows:
        key = _pair_key(e)
        if key in seen:
            report.drop(f"duplicate (prompt, response) pair in {split}", f"{e['source']} row {e['row']}")
            continue
        seen.add(key)
        out.append(e)
    return out


# --------------------------------------------------------------------------------------------- chat template


def load_chat_template(tokenizer, chat_template_path: str | None):
    """Use the model's own template, or a .jinja file (e.g. recipes/templates/cai_seed.jinja)."""
    if chat_template_path:
        if not os.path.isfile(chat_template_path):
            raise DataError(f"chat_template_path: {chat_template_path} does not exist.")
        with open(chat_template_path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    if not tokenizer.chat_template:
        raise DataError(
            "the tokenizer has no chat template (a base model?). Set `chat_template_path: "
            "recipes/templates/cai_seed.jinja` (or your own .jinja file) in the YAML."
        )
    return tokenizer


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The exact prompt text M_SFT sees at inference: the training template with the generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


# --------------------------------------------------------------------------------------------- tokenizing


def tokenize_pairs(examples: list[dict], tokenizer, args, report: DataReport, split: str, eos_token: str):
    """Tokenize with TRL's own SFT preparation, then apply the length policy with counts.

    TRL builds input_ids and completion-only labels; we call its `SFTTrainer._prepare_dataset` so that the
    dry run and training use the same code. Two things are ours, because TRL does them silently or not at
    all: (1) tokens the template renders after the end-of-turn token (e.g. Qwen's "\\n" after <|im_end|>)
    are cut, so the sequence ends where generation must stop; (2) truncation to `max_length` counts what it
    drops (prompt leaves no room for the response) and what it shortens.
    """
    import copy
    import types

    import datasets
    from trl import SFTTrainer

    if not examples:
        return None
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    ds = datasets.Dataset.from_list([{k: e[k] for k in ("prompt", "completion", "source", "row")} for e in examples])
    prep_args = copy.copy(args)
    prep_args.max_length, prep_args.shuffle_dataset = None, False
    # SFTTrainer._prepare_dataset only reads these three attributes of the trainer.
    stand_in = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=True)
    ds = SFTTrainer._prepare_dataset(stand_in, ds, tokenizer, prep_args, False, None, split)

    rows, no_eos = [], 0
    for ex in ds:
        ids, labels, where = ex["input_ids"], ex["labels"], f"{ex['source']} [{split}] row {ex['row']}"
        # The first end-of-turn token in the completion closes the assistant turn (Phi-3 renders another after it).
        end = next((i + 1 for i, (t, lab) in enumerate(zip(ids, labels)) if t == eos_id and lab != -100), None)
        if end is not None and end < len(ids):
            report.change("template tokens after the end-of-turn token cut", where)
            ids, labels = ids[:end], labels[:end]
        if end is None:
            no_eos += 1
        n_prompt = next((i for i, lab in enumerate(labels) if lab != -100), len(labels))
        if n_prompt == len(labels):
            report.drop(f"{split}: no response tokens after templating", where)
            continue
        if args.max_length is not None and len(ids) > args.max_length:
            if n_prompt >= args.max_length:
                report.drop(f"{split}: prompt ({n_prompt} tokens) leaves no room at max_length", where)
                continue
            report.change(f"{split}: response truncated to max_length", where)
            ids, labels = ids[: args.max_length], labels[: args.max_length]
        rows.append({"input_ids": ids, "labels": labels, "source": ex["source"], "row": ex["row"]})
    if no_eos == len(ds):
        raise DataError(
            f"the rendered completion never contains the end-of-turn token {eos_token!r} (id {eos_id}): a model "
            "trained on this never learns to stop. Use a chat template that closes the assistant turn with it "
            "(e.g. recipes/templates/cai_seed.jinja), or set `eos_token` to the token your template does emit."
        )
    if not rows:
        raise DataError(f"no {split} examples left after tokenization (see the drop reasons in the summary).")
    out = datasets.Dataset.from_list(rows)
    report.counts.update(
        {
            f"{split}_examples_tokenized": len(out),
            f"{split}_tokens": sum(len(r["input_ids"]) for r in rows),
            f"{split}_trained_tokens": sum(sum(lab != -100 for lab in r["labels"]) for r in rows),
        }
    )
    return out
