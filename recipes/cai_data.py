"""Load (P, R_revised) pairs from any supported schema into conversational prompt/completion rows.

Shared by `sft.py`, `evaluate.py` and `generate_revisions.py` so that every recipe puts the same system
prompt before P (chat_format.py renders it). Every dropped or changed row is counted in a `DataReport`; every
error names the source, the row and the field, and says how to fix it. docs/DATA.md explains it all.

Accepted schemas (per source, `format: auto` detects them):
  cai       HuggingFaceH4/cai-conversation-harmless: P = `prompt` (or `init_prompt`), R = `revision_response`
  pc        `prompt` / `completion` strings (or `prompt_column` / `response_column`)
  messages  a list of {role, content}; the last assistant turn is the target, earlier turns are context
  hh        Anthropic HH text: "\\n\\nHuman: ... \\n\\nAssistant: ..." (column `chosen` or `text`)

Where a source comes from: a local file (.jsonl/.json/.parquet/.csv), `data_files` (one file, a list, or
{split: file}), a local folder (split files found by `datasets`' naming rules) or a hub dataset id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import env

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant aligned with constitutional principles."
FORMATS = ("auto", "cai", "pc", "messages", "hh")
ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Columns only the cai-conversation-harmless schema has (its target is revision_response).
CAI_ONLY_COLUMNS = {"init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt"}
MAX_LOCATIONS = 5  # how many example locations to keep per drop reason
SOURCE_KEYS = (
    "path", "name", "data_dir", "data_files", "split", "test_split", "fraction", "format", "prompt_column",
    "response_column", "messages_column", "system_prompt", "eval_fraction", "jailbreak_fraction",
)  # fmt: skip
# Top-level options that are the default of every mixture source that does not set its own.
SOURCE_DEFAULTS = {"format": "data_format", "prompt_column": "prompt_column", "response_column": "response_column",
                   "messages_column": "messages_column"}  # fmt: skip


class DataError(ValueError):
    """Bad input that cannot be dropped row by row: a missing column, an unreadable file, nothing left."""


@dataclass
class CAIDataArguments:
    """Data options that TRL's `ScriptArguments` / `DatasetMixtureConfig` do not have."""

    datasets: list[dict] = field(
        default_factory=list,
        metadata={
            "help": "Mixture sources, each a mapping: path (file, folder or hub id), name, data_dir, data_files, "
            "split, test_split, fraction, format, prompt_column, response_column, messages_column, system_prompt, "
            "eval_fraction, jailbreak_fraction. Use instead of dataset_name (see docs/DATA.md)."
        },
    )
    system_prompt: str | None = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "System message put before every prompt; null, none or '' for none."},
    )
    system_prompt_mode: str = field(
        default="auto",
        metadata={
            "help": "auto: the template's system role where it renders one, else the system prompt is folded into "
            "the first user turn (said once); system | fold | off force a mode."
        },
    )
    template_date: str | None = field(
        default="26 Jul 2024",
        metadata={"help": "Date for templates that insert today's (Llama 3.x), so that tokens do not change daily."},
    )
    data_format: str = field(default="auto", metadata={"help": f"Schema of the data: one of {FORMATS}."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding P (string)."})
    response_column: str | None = field(default=None, metadata={"help": "Column holding R_revised (string)."})
    messages_column: str | None = field(
        default=None, metadata={"help": "Column holding a messages list (or HH text with data_format: hh)."}
    )
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

    def __post_init__(self):
        self.system_prompt = none_if_null(self.system_prompt)
        self.template_date = none_if_null(self.template_date)  # `null` on the command line: no fixed date


OFF_WORDS = ("", "null", "none", "~")


def none_if_null(value):
    """`null`, `none` and `""` mean None (no system prompt, no date), in YAML and on the command line alike."""
    return None if isinstance(value, str) and value.strip().lower() in OFF_WORDS else value


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
        return out + self.drop_lines()

    def drop_lines(self, reasons=None) -> list[str]:
        out = []
        for kind, counter in (("dropped", self.dropped), ("changed", self.changed)):
            for reason, n in sorted(counter.items()):
                if reasons is None or reason in reasons:
                    out.append(f"  {kind} {n} ({reason}), e.g. {'; '.join(self.locations[reason][:2])}")
        return out


# --------------------------------------------------------------------------------------------- reading


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise DataError(
            f"{path}: permission denied. Make the file readable (`chmod a+r {path}`) or copy it somewhere readable."
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}).") from None


def _decode(raw: bytes, path: str) -> str:
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # a UTF-8 byte-order mark is still UTF-8
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: bytes that are not UTF-8 at byte offset {e.start} ({e.reason}). "
            f"Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path} > fixed{os.path.splitext(path)[1]}`)."
        ) from None


def read_json_lines(path: str) -> list[dict]:
    # Our own reader so that a bad line is reported by number; datasets' json loader only says "invalid".
    text = _decode(_read_bytes(path), path)
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(
                f"{path}: item {bad} of the JSON list is a {type(rows[bad]).__name__}, not an object. A .json file "
                "holds a list of objects (one per example) or JSON Lines."
            )
        return rows
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks on.
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {i}: invalid JSON ({e.msg} at column {e.colno}). Each line must be one JSON object "
                "(JSON Lines); a .json file may instead hold one list of objects."
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i}: expected a JSON object (one per line), not {type(row).__name__}")
        rows.append(row)
    return rows


def _read_csv(path: str) -> list[dict]:
    # The stdlib reader keeps every cell a string; pandas (behind datasets' csv loader) turns "NA" or "None" into null.
    reader = csv.DictReader(io.StringIO(_decode(_read_bytes(path), path), newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path}: line {reader.line_num}: more cells than the header has columns ({reader.fieldnames}). "
                    "Quote cells that hold commas."
                )
            rows.append(row)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: invalid CSV ({e}).") from None
    return rows


def _read_parquet(path: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(_read_bytes(path))).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}).") from None


def read_local(path: str) -> list[dict]:
    """Rows of one local file; every way a file can be unusable is one clear DataError."""
    if os.path.isdir(path):
        raise DataError(
            f"{path}: is a folder, but a file is expected here. Name one {'/'.join(LOCAL_SUFFIXES)} file (a folder "
            "can be a source's `path` or `dataset_name`, not a `data_files` entry)."
        )
    if not os.path.exists(path):
        raise DataError(
            f"{path}: no such file (relative paths start at the working directory, {os.getcwd()}). Check the path."
        )
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type '{suffix}'. Use .jsonl, .json, .parquet or .csv (save spreadsheets as "
            "UTF-8 .csv)."
        )
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    return read_json_lines(path)


def _folder_files(folder: str) -> dict[str, list[str]]:
    """{split: files} of a local folder, by the naming rules of `datasets` (train.jsonl, data/test-0000.parquet...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder)
    except Exception:  # noqa: BLE001 - datasets raises EmptyDatasetError or FileNotFoundError
        found = {}
    files = {str(split): sorted(map(str, paths)) for split, paths in found.items()}
    if not files:
        raise DataError(
            f"{folder}: the folder holds no data files. Put train.jsonl (and test.jsonl) in it, or name a file."
        )
    other = [f for paths in files.values() for f in paths if os.path.splitext(f)[1].lower() not in LOCAL_SUFFIXES]
    if other:
        raise DataError(f"{folder}: unsupported file type(s) {other[:3]}. Use .jsonl, .json, .parquet or .csv files.")
    return files


def _train_split(source: dict) -> str:
    return source.get("split") or "train"


def _split_files(source: dict, split: str) -> list[str] | None:
    """The local files of one split of a source ([] when it has none), or None for a hub dataset."""
    path, data_files = source.get("path"), source.get("data_files")
    if data_files is None:
        if not path:
            raise DataError(f"a dataset source has neither `path` nor `data_files`: {source}")
        if os.path.isdir(path):
            return _folder_files(os.path.join(path, source.get("data_dir") or "")).get(split, [])
        if not env.is_local_path(path):
            return None
        data_files = path
    if isinstance(data_files, dict):
        files = data_files.get(split, [])
    else:
        files = data_files if split == _train_split(source) else []
    files = [files] if isinstance(files, str) else list(files)
    base = path if path and os.path.isdir(path) else ""  # data_files are relative to a folder `path`, as in datasets
    return [os.path.join(base, f) for f in files]


def _read_hub(source: dict, split: str) -> list[dict]:
    import datasets

    path = source["path"]
    try:
        ds = datasets.load_dataset(path, name=source.get("name"), data_dir=source.get("data_dir"), split=split)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        if env.offline() or isinstance(e, (ConnectionError, TimeoutError)):
            why = "offline mode: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set" if env.offline() else str(e)
            raise DataError(
                f"dataset '{path}': not a local file or folder, and the Hugging Face Hub is unreachable ({why}). "
                f"Download it where the Hub is reachable (`hf download {path} --repo-type dataset --local-dir "
                f"data/{path.split('/')[-1]}`), then set `dataset_name` (or the source's `path`) to that local folder, "
                "or to a .jsonl/.json/.parquet/.csv file."
            ) from None
        raise DataError(
            f"dataset '{path}' split '{split}': could not load it ({type(e).__name__}: {e}). Check the dataset id, "
            "`dataset_config`/`name` and the split names, or point at a local file or folder."
        ) from None
    return ds.to_list()


def _read_rows(source: dict, split: str) -> tuple[list[dict], list[tuple[str, int]]]:
    """Rows of one split and, for each, (file or dataset id, row index in it) for error locations."""
    files = _split_files(source, split)
    if files is None:
        rows = _read_hub(source, split)
        return rows, [(source["path"], i) for i in range(len(rows))]
    if not files:
        raise DataError(
            f"source {source_name(source)}: no file for split '{split}'. Add `{split}: path/to/file.jsonl` under "
            "its `data_files`, or set `split` to the name of the split you have."
        )
    rows, origins = [], []
    for path in files:
        part = read_local(path)
        if not part:
            raise DataError(f"{path}: the file holds no rows. Fill it or remove it from the configuration.")
        rows += part
        origins += [(path, i) for i in range(len(part))]
    return rows, origins


def read_split(source: dict, split: str) -> list[dict]:
    """Rows of one split of one source: a local file, `data_files`, a local folder or a hub id."""
    return _read_rows(source, split)[0]


def source_name(source: dict) -> str:
    if source.get("path"):
        return str(source["path"])
    files = source.get("data_files")
    if isinstance(files, dict):
        files = files.get(_train_split(source), next(iter(files.values()), None))
    if isinstance(files, list):
        return str(files[0]) + (f" (+{len(files) - 1} more files)" if len(files) > 1 else "")
    return str(files)


def split_exists(source: dict, split: str | None) -> bool:
    """Whether a source has a given split; hub datasets are asked (False when the hub is unreachable)."""
    if not split:
        return False
    files = _split_files(source, split)
    if files is not None:
        return bool(files)
    try:
        import datasets

        return split in datasets.get_dataset_split_names(source["path"], source.get("name"))
    except Exception:  # noqa: BLE001 - an unreachable hub is reported when the train split is read
        return False


# --------------------------------------------------------------------------------------------- schemas


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class RowProblem(ValueError):
    """Why one row is unusable: `reason` is what is counted; `column` and `detail` locate it."""

    def __init__(self, reason: str, column: str, detail: str = ""):
        super().__init__(f"{column}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.column, self.detail = reason, column, detail


def parse_hh(text: str) -> list[dict]:
    """Anthropic HH text ("\\n\\nHuman: ... \\n\\nAssistant: ...") to messages; ValueError if it is not HH."""
    if not isinstance(text, str):
        raise ValueError(f"not a string but {type(text).__name__}")
    # HH transcripts start with "\n\nHuman:"; accept them with the leading blank lines stripped, too.
    before, *turns = HH_TURN.split("\n\n" + text.lstrip("\n"))
    if "Human" not in turns[0::2]:
        raise ValueError("no Human turn")
    if before.strip():
        raise ValueError("text before the first turn")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(turns[0::2], turns[1::2])
    ]


def detect_format(columns: list[str], source: dict) -> str:
    fmt = source.get("format") or "auto"
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
    if len(CAI_ONLY_COLUMNS & set(columns)) >= 2:  # a cai-conversation-harmless table without its target column
        raise DataError(
            f"source {source_name(source)}: the columns {columns} are the cai-conversation-harmless schema, but its "
            "target column `revision_response` (R_revised) is missing. Add it, or train on another column with "
            "`response_column: <column>` (or `format: messages` to use the `messages` column)."
        )
    if "prompt" in columns and "completion" in columns:
        return "pc"
    if "messages" in columns:
        return "messages"
    if "chosen" in columns or "text" in columns:
        return "hh"
    schemas = {"cai-conversation-harmless": ["prompt", "revision_response"], "prompt/completion": ["prompt", "completion"],
               "messages": ["messages"], "HH": ["chosen"]}
    near, wanted = max(schemas.items(), key=lambda kv: sum(c in columns for c in kv[1]))
    missing = [c for c in wanted if c not in columns]
    raise DataError(
        f"source {source_name(source)}: cannot tell the schema from its columns {columns}; they look most like the "
        f"{near} schema, which needs column(s) {missing}. Expected the "
        "cai-conversation-harmless columns (prompt, revision_response, ...), prompt/completion, messages, or HH text "
        "(chosen/text). Map yours with `prompt_column` + `response_column`, or `messages_column`, on this source."
    )


def _columns_of(fmt: str, source: dict, columns) -> dict[str, str]:
    """{what: column} that a format reads."""
    if fmt == "cai":
        return {"prompt": "prompt" if "prompt" in columns else "init_prompt", "response": "revision_response"}
    if fmt == "pc":
        return {"prompt": source.get("prompt_column") or "prompt",
                "response": source.get("response_column") or "completion"}  # fmt: skip
    if fmt == "messages":
        return {"messages": source.get("messages_column") or "messages"}
    return {"hh": source.get("messages_column") or ("chosen" if "chosen" in columns else "text")}


def _check_messages(messages: Any, kind: str = "messages") -> tuple[str, str] | None:
    """None if `messages` is a valid conversation with an assistant turn, else (reason, detail)."""
    if not isinstance(messages, list) or not messages:
        return f"{kind}: not a non-empty list of {{role, content}}", type(messages).__name__
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{kind}: not a non-empty list of {{role, content}}", f"turn {i} is {str(m)[:60]!r}"
        if m["role"] not in ROLES:
            return f"{kind}: unknown role", f"turn {i} has role {m['role']!r}; roles are {'/'.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"{kind}: empty or non-string content", f"turn {i} ({m['role']})"
    if not any(m["role"] == "assistant" for m in messages):
        return f"{kind}: no assistant turn", f"roles {[m['role'] for m in messages]}"
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"{kind}: wrong turn order", f"turn {i} is {m['role']}, expected {expected} (they alternate)"
    return None


def _pair(row: dict, fmt: str, source: dict) -> tuple[list[dict], str, int]:
    """(context ending in the user's P, R_revised, turns after the last assistant turn) or a RowProblem."""
    cols = _columns_of(fmt, source, row)
    if fmt in ("cai", "pc"):
        values = []
        for what, col in cols.items():
            value = row.get(col)
            if value is None:
                raise RowProblem(f"{what} missing or null", col)
            if not isinstance(value, str):
                raise RowProblem(f"{what} not a string", col, f"got {type(value).__name__}")
            if not value.strip():
                raise RowProblem(f"{what} empty or whitespace", col)
            values.append(value)
        return [{"role": "user", "content": values[0]}], values[1], 0
    [(kind, col)] = cols.items()
    messages = row.get(col)
    if kind == "hh":
        try:
            messages = parse_hh(messages)
        except ValueError as e:
            raise RowProblem(f"hh: {str(e).split(' but ')[0]}", col, str(e)) from None
    problem = _check_messages(messages, kind)
    if problem:
        raise RowProblem(problem[0], col, problem[1])
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return context, messages[last]["content"], len(messages) - last - 1


def normalize(rows, source: dict, split: str, data_args: CAIDataArguments, report: DataReport, origins=None):
    """Rows of one split to {"prompt": [...], "completion": [...], "source", "row"}; bad rows dropped and counted.

    `origins` gives each row's (file, row index) for the report; by default the source name and list index.
    """
    name = source_name(source)
    if not rows:
        return []
    origins = origins or [(name, i) for i in range(len(rows))]
    columns = sorted({str(k) for r in rows for k in r})
    fmt = detect_format(columns, source)
    wanted = _columns_of(fmt, source, columns)
    missing = [c for c in wanted.values() if c not in columns]
    if missing:
        fix = (
            "`messages_column: <column holding the conversation>`"
            if fmt in ("messages", "hh")
            else "`prompt_column: <column holding P>` and `response_column: <column holding R_revised>`"
        )
        raise DataError(
            f"source {name} split '{split}': required column(s) {missing} missing for format '{fmt}'. Columns found: "
            f"{columns}. Map yours with {fix} on this source (top level for dataset_name), or set `format`."
        )
    system = none_if_null(source.get("system_prompt", data_args.system_prompt))
    out, reasons = [], Counter()
    for row, (file, i) in zip(rows, origins):
        where = f"{file} row {i}"
        if data_args.exclude_flagged and row.get("flags"):
            reasons["flagged by generate_revisions.py"] += 1
            report.drop("flagged by generate_revisions.py", f"{where} field 'flags': {row['flags']}")
            continue
        try:
            context, response, ignored = _pair(row, fmt, source)
        except RowProblem as p:
            reasons[p.reason] += 1
            report.drop(p.reason, f"{where} field '{p.column}'" + (f": {p.detail}" if p.detail else ""))
            continue
        init = row.get("init_response") if fmt == "cai" else None
        if isinstance(init, str) and " ".join(response.split()) == " ".join(init.split()):  # not revised at all
            reasons["revision identical to init_response"] += 1
            report.drop("revision identical to init_response", f"{where} field 'revision_response'")
            continue
        if ignored:
            report.change(f"{fmt}: turns after the last assistant turn ignored", f"{where}: {ignored} turn(s)")
        if system and context[0]["role"] != "system":
            context = [{"role": "system", "content": system}, *context]
        out.append({"prompt": context, "completion": [{"role": "assistant", "content": response}], "source": file,
                    "row": i})  # fmt: skip
    if not out:
        raise DataError(
            f"source {name} split '{split}': all {len(rows)} rows were dropped ({fmt} format): "
            + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            + ".\n" + "\n".join(report.drop_lines(reasons))
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


def _mix_parts(per_source: list[list[dict]], fractions: list, seed: int) -> list[list[dict]]:
    """TRL's fraction rule (normalise, cap so that no source is oversampled), per source."""
    if all(f is None for f in fractions):
        return per_source
    weights = [f / sum(fractions) for f in fractions]
    total = min(len(rows) / w for rows, w in zip(per_source, weights) if w > 0)
    out = []
    for k, (rows, w) in enumerate(zip(per_source, weights)):
        # TRL keeps each source's first rows; a seeded shuffle first keeps file order from choosing the subset.
        rows = list(rows)
        random.Random(seed + k).shuffle(rows)
        out.append(rows[: round(w * total)])
    return out


def _check_fractions(sources: list[dict]) -> None:
    fractions = [s.get("fraction") for s in sources]
    if all(f is None for f in fractions):
        return
    unset = [source_name(s) for s in sources if s.get("fraction") is None]
    if unset:
        raise DataError(
            f"`fraction` is set on some mixture sources but not on {unset}. Set it on every source (the shares of "
            "the mixture) or on none (then every row of every source is used)."
        )
    for s in sources:
        f = s["fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0:
            raise DataError(f"source {source_name(s)}: `fraction` must be a number >= 0, got {f!r}.")
    if sum(fractions) <= 0:
        raise DataError("mixture fractions are all 0: give at least one source a fraction above 0.")


def sources_from_args(script_args, data_args: CAIDataArguments) -> list[dict]:
    """The sources to read, each a mapping with the keys in SOURCE_KEYS; checked before anything is read."""
    if data_args.datasets and script_args.dataset_name:
        raise DataError(
            f"both `dataset_name` ({script_args.dataset_name}) and a `datasets:` mixture are set: keep one of them."
        )
    if not data_args.datasets:
        if not script_args.dataset_name:
            raise DataError("no data: set `dataset_name` (file, folder or hub id) or a `datasets:` mixture.")
        sources = [
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
    else:
        defaults = {k: getattr(data_args, a) for k, a in SOURCE_DEFAULTS.items() if getattr(data_args, a) is not None}
        sources = []
        for k, s in enumerate(data_args.datasets):
            if isinstance(s, str):
                s = {"path": s}
            if not isinstance(s, dict):
                raise DataError(f"datasets[{k}]: expected a mapping such as {{path: data/x.jsonl}}, got {s!r}.")
            unknown = sorted(set(s) - set(SOURCE_KEYS))
            if unknown:
                raise DataError(f"datasets[{k}]: unknown key(s) {unknown}. A source takes: {', '.join(SOURCE_KEYS)}.")
            sources.append({**defaults, **s})
    for k, s in enumerate(sources):
        if not s.get("path") and not s.get("data_files"):
            raise DataError(f"datasets[{k}]: set `path` (file, folder or hub id) or `data_files` on every source.")
        files = s.get("data_files")
        if isinstance(files, dict):
            splits = {_train_split(s), s.get("test_split", "test")}
            unknown = sorted(set(files) - splits)
            if unknown:
                raise DataError(
                    f"source {source_name(s)}: data_files split(s) {unknown} are neither the train split "
                    f"'{_train_split(s)}' nor the test split '{s.get('test_split', 'test')}'. Rename them, or set "
                    "`split` / `test_split` on the source."
                )
    _check_fractions(sources)
    return sources


def _unique_names(sources: list[dict]) -> list[str]:
    names = []
    for s in sources:
        name = source_name(s)
        names.append(name if name not in names else f"{name}#{len(names)}")
    return names


def load_pairs(script_args, data_args: CAIDataArguments, seed: int = 42):
    """Train and eval lists of conversational prompt/completion rows, and the report of what was dropped.

    Per source: read, validate rows, take its test split (or hold out `eval_fraction` of its unique prompts).
    Then over all sources: dedupe eval, drop train rows whose prompt is in any eval split, dedupe train, mix
    by `fraction`, and sample `max_eval_examples`. Everything dropped or left out is counted in the report.
    """
    report = DataReport()
    sources = sources_from_args(script_args, data_args)
    names = _unique_names(sources)
    trains, evals = [], []
    for source, name in zip(sources, names):
        split = _train_split(source)
        rows, origins = _read_rows(source, split)
        fmt = detect_format(sorted({str(k) for r in rows for k in r}), source)
        train = normalize(rows, source, split, data_args, report, origins)
        info = {"path": name, "format": fmt, "train_rows_read": len(rows)}
        test_split = source.get("test_split", "test")
        if test_split and test_split != split and split_exists(source, test_split):
            test_rows, test_origins = _read_rows(source, test_split)
            held = normalize(test_rows, source, test_split, data_args, report, test_origins)
            info.update(eval_from=f"split '{test_split}'", eval_rows_read=len(test_rows))
        else:
            fraction = source.get("eval_fraction", data_args.eval_fraction)
            train, held = split_by_prompt(train, fraction, seed)
            held_out = f"{fraction:g} of the unique prompts held out" if fraction > 0 else "none (eval_fraction 0)"
            info.update(eval_from=f"no '{test_split}' split; {held_out}")
        report.sources[name] = info
        trains.append(train)
        evals.append(held)

    evals = _dedupe(evals, "eval", report) if data_args.dedupe else evals
    eval_prompts = {prompt_key(e) for part in evals for e in part}
    for k, part in enumerate(trains):
        trains[k] = [e for e in part if prompt_key(e) not in eval_prompts]
        for e in part:
            if prompt_key(e) in eval_prompts:
                report.drop("prompt also in eval (dropped from train)", f"{e['source']} row {e['row']}")
    trains = _dedupe(trains, "train", report) if data_args.dedupe else trains
    for name, part in zip(names, trains):
        if not part:
            raise DataError(
                f"source {name}: no training rows left after dropping duplicates and prompts that are also in the "
                "eval split.\n" + "\n".join(report.drop_lines())
            )
    mixed = _mix_parts(trains, [s.get("fraction") for s in sources], seed)
    for name, part, kept, source, held in zip(names, trains, mixed, sources, evals):
        report.sources[name].update(train_rows=len(part), eval_rows=len(held))
        if source.get("fraction") is not None:
            report.sources[name].update(fraction=source["fraction"], train_rows_in_mixture=len(kept))
            if len(kept) < len(part):
                report.change("train rows left out by mixture fractions", name, len(part) - len(kept))
    mixed = wrap_jailbreaks(mixed, sources, names, seed, report)
    train = [e for part in mixed for e in part]
    held = [e for part in evals for e in part]
    if data_args.max_eval_examples is not None and len(held) > data_args.max_eval_examples:
        report.change("eval rows not sampled (max_eval_examples)", "eval", len(held) - data_args.max_eval_examples)
        held = random.Random(seed).sample(held, data_args.max_eval_examples)
    report.counts.update(train_examples=len(train), eval_examples=len(held))
    return train, held, report


def wrap_jailbreaks(parts: list[list[dict]], sources: list[dict], names: list[str], seed: int, report: DataReport):
    """Per source, wrap `jailbreak_fraction` of its training prompts (after the split, leak checks and mixing, so
    eval rows are never wrapped) in the `train` templates of data/jailbreaks.json; counted as a change."""
    import jailbreaks

    fractions = [s.get("jailbreak_fraction") for s in sources]
    if not any(fractions):
        return parts
    try:
        templates = jailbreaks.load()["train"]
    except jailbreaks.JailbreakError as e:
        raise DataError(str(e)) from None
    out = []
    for k, (part, source, name, f) in enumerate(zip(parts, sources, names, fractions)):
        if f is None or f == 0:
            out.append(part)
            continue
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise DataError(f"source {name}: `jailbreak_fraction` must be a number from 0 to 1, got {f!r}.")
        wrapped, n = jailbreaks.wrap_fraction(part, f, templates, seed + k)
        report.sources[name]["jailbreak_wrapped"] = n
        if n:
            report.change("train prompts wrapped in a jailbreak template (jailbreak_fraction)", name, n)
        out.append(wrapped)
    return out


def _dedupe(parts: list[list[dict]], split: str, report: DataReport) -> list[list[dict]]:
    """Exact duplicate (prompt, response) pairs removed, within and across sources (the first copy is kept)."""
    seen, out = set(), []
    for rows in parts:
        kept = []
        for e in rows:
            key = _pair_key(e)
            if key in seen:
                report.drop(f"duplicate (prompt, response) pair in {split}", f"{e['source']} row {e['row']}")
                continue
            seen.add(key)
            kept.append(e)
        out.append(kept)
    return out


def system_prompts(data_args: CAIDataArguments) -> set:
    """Every system prompt in use: the top-level one and those set on mixture sources."""
    found = {data_args.system_prompt}
    return found | {none_if_null(s.get("system_prompt")) for s in data_args.datasets
                    if isinstance(s, dict) and "system_prompt" in s}


def prompt_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    """[system, user P]: how a bare prompt P meets the system prompt (chat_format renders or folds the system turn)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]
