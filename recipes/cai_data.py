"""Load (P, R_revised) pairs from any supported schema into conversational prompt/completion rows.

Shared by `sft.py`, `evaluate.py` and `generate_revisions.py` so that every recipe puts the same system
prompt before P (chat_format.py renders it). Every dropped or changed row is counted in a `DataReport`; every
error names the source, the row and the field, and says how to fix it. docs/DATA.md explains it all.

Accepted schemas (per source, `format: auto` detects them):
  cai       HuggingFaceH4/cai-conversation-harmless: P = `prompt` (or `init_prompt`), R = `revision_response`
  pc        `prompt` / `completion` strings (or `prompt_column` / `response_column`)
  messages  a list of {role, content}; the last assistant turn is the target, earlier turns are context
  hh        Anthropic HH text: "\\n\\nHuman: ... \\n\\nAssistant: ..." (column `chosen` or `text`)

Preference rows (recipes/dpo.py: `load_pairs(..., preference=True)`), format `preference`: `chosen` and `rejected`,
each a string (with a `prompt` column: TRL's prompt/chosen/rejected), a conversation whose last assistant turn is
the answer (cai-conversation-harmless and generate_revisions.py write [user P, assistant]; TRL's implicit-prompt
schema), or HH text (Anthropic hh-rlhf). Rows also get a `rejected` message list beside `completion` (= chosen).

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

import numpy as np

import arrow_pages
import env

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant aligned with constitutional principles."
FORMATS = ("auto", "cai", "pc", "messages", "hh", "preference")
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
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where prepared datasets are kept, keyed by everything that makes their tokens (default "
                  "$HF_DATASETS_CACHE/cai_sft_prepared). Put it on shared storage for multi-node runs."},
    )
    rebuild_data_cache: bool = field(default=False, metadata={"help": "Prepare the data again even on a cache hit."})
    data_cache_shared: bool = field(
        default=False,
        metadata={"help": "data_cache_dir is on storage every node sees: only the first process of the whole run "
                  "prepares (otherwise the first process of each node)."},
    )
    preview_examples: int = field(
        default=200, metadata={"help": "--dry_run writes this many examples to preview.jsonl (statistics cover all)."}
    )
    preview_all: bool = field(default=False, metadata={"help": "--dry_run writes every example to preview.jsonl."})
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

    def add(self, kind: str, reason: str, wheres: list[str], n: int) -> None:
        """`n` rows dropped or changed (`kind`) for one reason, located by the first few of `wheres`."""
        (self.dropped if kind == "dropped" else self.changed)[reason] += n
        room = MAX_LOCATIONS - len(self.locations[reason])
        self.locations[reason].extend(wheres[:max(room, 0)])

    def count_rows(self, ds, prefix: str = "") -> None:
        """Count the drops and changes a `datasets` map recorded in its `drop` / `at` / `changes` columns.

        Rows go through `map` in worker processes, which cannot share this report: each row says what happened to
        it, and the counting happens here, in batches, in row order (so the examples are the first rows).
        """
        import pyarrow.compute as pc

        cols = [c for c in ("drop", "at", "changes") if c in ds.column_names]
        for table in ds.select_columns(cols).with_format("arrow").iter(batch_size=100_000):
            mask = pc.fill_null(pc.not_equal(table["drop"], ""), False)
            if "changes" in cols:
                mask = pc.or_(mask, pc.greater(pc.list_value_length(table["changes"]), 0))
            for r in table.filter(mask).to_pylist():
                if r["drop"]:
                    self.drop(prefix + r["drop"], r["at"])
                for c in r.get("changes") or []:
                    self.change(prefix + c["reason"], c["at"])

    @classmethod
    def from_dict(cls, d: dict) -> DataReport:
        """The report of a cached preparation (the inverse of `to_dict`)."""
        return cls(d["sources"], Counter(d["dropped"]), Counter(d["changed"]),
                   defaultdict(list, d["examples_of_each_reason"]), d["counts"])

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
    suffix = _check_local(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    return read_json_lines(path)


def _check_local(path: str) -> str:
    """The suffix of a readable local data file, or the DataError that says why it is not one."""
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
    return suffix


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
    return _load_hub(source, split).to_list()


def _load_hub(source: dict, split: str):
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
    return ds


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
            raise _no_rows(path)
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


# --------------------------------------------------------------------------------------------- reading at scale
# Training reads through `datasets`: each file becomes an Arrow table on disk, and every later step is a batched
# `map`/`filter` over it, so memory stays bounded however many rows there are. The line readers above serve the
# small files of evaluate.py and generate_revisions.py, and locate the problem when a `datasets` loader fails.

MIN_ROWS_PER_PROCESS = 20_000  # below this, starting worker processes costs more than it saves


def procs(ds, num_proc: int | None) -> int | None:
    """`dataset_num_proc` for a map over `ds`: worker processes only where the rows are worth it."""
    return num_proc if num_proc and num_proc > 1 and len(ds) >= MIN_ROWS_PER_PROCESS else None


@dataclass
class Part:
    """One file (or hub split) of a source as a `datasets.Dataset`, read but not yet checked row by row."""

    label: str  # the file or dataset id that messages name
    ds: Any  # datasets.Dataset
    json_text: bool  # rows are JSON objects as text in column `text` (jsonl/json/csv), else Arrow columns
    columns: list[str]  # every key that any row has
    row_numbers: Any = None  # JSON Lines with blank lines: the row number of each line (numpy), else None


def _json_text_rows(rows, path, stamp):  # noqa: ARG001 - `stamp` (size, mtime) keys datasets' generator cache
    for r in rows() if callable(rows) else rows:
        yield {"text": json.dumps(r, ensure_ascii=False)}


def _csv_dicts(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row:
                raise ValueError("more cells than the header has columns")
            yield row


def _no_rows(path: str) -> DataError:
    return DataError(f"{path}: the file holds no rows. Fill it or remove it from the configuration.")


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _scan_json_lines(batch):
    """Per line: not blank, a bad line (not one JSON object), and its keys where they differ from the line before."""
    nonblank, bad, keys, last = [], [], [], None
    for line in batch["text"]:
        if not line.strip():
            nonblank.append(False), bad.append(False), keys.append("")
            continue
        nonblank.append(True)
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            bad.append(True), keys.append("")
            continue
        k = "\0".join(map(str, row))
        bad.append(False), keys.append(k if k != last else "")
        last = k
    return {"nonblank": nonblank, "bad": bad, "keys": keys}


def _open_local(path: str, num_proc: int | None, cache_dir: str | None) -> Part:
    """A local file as a Part, through datasets' loaders; where one fails, the line reader names the line."""
    import datasets

    suffix = _check_local(path)
    kw = {"split": "train", "cache_dir": cache_dir}
    if suffix == ".parquet":
        try:
            ds = datasets.load_dataset("parquet", data_files=path, **kw)
        except Exception as e:  # noqa: BLE001 - a vague loader error: the Parquet reader says what is wrong
            _read_parquet(path)
            raise DataError(f"{path}: could not read it ({type(e).__name__}: {e}).") from None
        part = Part(path, ds, False, list(ds.column_names))
    elif suffix == ".csv" or (suffix == ".json" and _starts_with(path, b"[")):
        # pandas (behind datasets' csv loader) turns "NA" or "None" into null, and a .json list is one object:
        # both are read by the line readers' rules, streamed into Arrow as JSON text.
        rows = (lambda: _csv_dicts(path)) if suffix == ".csv" else read_json_lines(path)
        try:
            ds = datasets.Dataset.from_generator(_json_text_rows, gen_kwargs={
                "rows": rows, "path": path, "stamp": _stamp(path)}, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - locate the problem with the line reader's exact message
            if not (_read_csv if suffix == ".csv" else read_json_lines)(path):
                raise _no_rows(path) from None
            raise DataError(f"{path}: could not read it ({type(e).__name__}: {e}).") from None
        if suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                columns = next(csv.reader(f), [])
        else:
            columns = sorted({str(k) for r in rows for k in r})
        part = Part(path, ds, True, columns)
    else:
        if os.path.getsize(path) == 0:  # datasets' text loader fails on an empty file with a vague message
            raise _no_rows(path)
        try:
            ds = datasets.load_dataset("text", data_files=path, encoding="utf-8-sig", **kw)
        except Exception as e:  # noqa: BLE001 - bad UTF-8 and the like: the decoder names the line
            _decode(_read_bytes(path), path)
            raise DataError(f"{path}: could not read it ({type(e).__name__}: {e}).") from None
        # DropsReadPages: each worker lets go of the Arrow pages it has read (RSS flat at any size)
        scan = ds.map(arrow_pages.DropsReadPages(_scan_json_lines), batched=True, remove_columns=["text"],
                      num_proc=procs(ds, num_proc),
                      load_from_cache_file=False,
                      desc=f"checking {os.path.basename(path)}")
        flags = scan.select_columns(["nonblank", "bad"]).with_format("numpy")[:]
        nonblank, bad = flags["nonblank"], flags["bad"]
        if bad.any():
            read_json_lines(path)  # raises with the line number and the fix
            raise DataError(f"{path}: line {int(bad.argmax()) + 1}: not one JSON object per line.")
        import pyarrow.compute as pc

        keys = {k for ks in pc.unique(scan.select_columns(["keys"]).with_format("arrow")[:]["keys"]).to_pylist()
                for k in ks.split("\0") if ks}
        numbers = None if nonblank.all() else np.cumsum(nonblank) - 1
        part = Part(path, ds, True, sorted(keys), numbers)
    if len(part.ds) == 0 or (part.row_numbers is not None and part.row_numbers[-1] < 0):  # all lines blank
        raise _no_rows(path)
    return part


def _starts_with(path: str, prefix: bytes) -> bool:
    """Whether the file's first non-blank bytes (after a UTF-8 byte-order mark) are `prefix`."""
    with open(path, "rb") as f:
        head = f.read(4096)
    head = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    return head.lstrip().startswith(prefix)


def open_parts(source: dict, split: str, num_proc: int | None = None, cache_dir: str | None = None) -> list[Part]:
    """One split of a source as Parts: its local files, or the hub dataset."""
    files = _split_files(source, split)
    if files is None:
        ds = _load_hub(source, split)
        return [Part(source["path"], ds, False, list(ds.column_names))]
    if not files:
        raise DataError(
            f"source {source_name(source)}: no file for split '{split}'. Add `{split}: path/to/file.jsonl` under "
            "its `data_files`, or set `split` to the name of the split you have."
        )
    return [_open_local(path, num_proc, cache_dir) for path in files]


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


def detect_format(columns: list[str], source: dict, preference: bool = False) -> str:
    fmt = source.get("format") or "auto"
    if fmt not in FORMATS:
        raise DataError(f"source {source_name(source)}: format '{fmt}' is not one of {FORMATS}.")
    if preference:
        if fmt not in ("auto", "preference"):
            raise DataError(f"source {source_name(source)}: format '{fmt}' holds one answer per prompt; the "
                            "preference recipe needs `chosen` and `rejected` (format: preference or auto).")
        return "preference"
    if fmt == "preference":
        raise DataError(f"source {source_name(source)}: format 'preference' is for recipes/dpo.py; sft.py trains on "
                        "one answer per prompt (use `format: messages` with `messages_column: chosen`).")
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
    if fmt == "preference":
        return {"chosen": "chosen", "rejected": "rejected"}  # `prompt` is optional (implicit in conversations)
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


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _preference(row: dict, source: dict) -> tuple[list[dict], str, str]:
    """(context ending in the user's P, chosen answer, rejected answer) of a preference row, or a RowProblem."""
    pcol = source.get("prompt_column") or "prompt"
    prompt, context = row.get(pcol), None
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowProblem("prompt empty or whitespace", pcol)
        context = [{"role": "user", "content": prompt}]
    elif prompt is not None:
        problem = _check_messages([*prompt, {"role": "assistant", "content": "."}] if isinstance(prompt, list)
                                  else prompt, "prompt")  # fmt: skip
        if problem:
            raise RowProblem(problem[0], pcol, problem[1])
        context = [{"role": m["role"], "content": m["content"]} for m in prompt]
    answers, contexts = [], []
    for side in ("chosen", "rejected"):
        value = row.get(side)
        if value is None:
            raise RowProblem(f"{side} missing or null", side)
        if isinstance(value, str) and context is not None:
            if not value.strip():
                raise RowProblem(f"{side} empty or whitespace", side)
            answers.append(value)
            continue
        if isinstance(value, str):  # no prompt column: Anthropic HH text holds the whole exchange
            try:
                value = parse_hh(value)
            except ValueError as e:
                raise RowProblem(f"{side}: a string without a prompt column, and not HH text", side, str(e)) from None
        # The answer alone ([assistant], TRL's explicit-prompt schema) continues the prompt column's turns.
        alone = context is not None and isinstance(value, list) and value and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant"
        problem = _check_messages([*context, *value] if alone else value, side)
        if problem:
            raise RowProblem(problem[0], side, problem[1])
        last = max(i for i, m in enumerate(value) if m["role"] == "assistant")
        answers.append(value[last]["content"])
        contexts.append([{"role": m["role"], "content": m["content"]} for m in value[:last]])
    if context is None:
        if len(contexts) == 2 and [m["content"] for m in contexts[0]] != [m["content"] for m in contexts[1]]:
            raise RowProblem("chosen and rejected continue different conversations", "rejected",
                             "their turns before the answer differ")
        context = contexts[0] if contexts else None
        if not context or context[-1]["role"] != "user":
            raise RowProblem("no user turn before the answer", "chosen")
    else:
        for side, ctx in zip(("chosen", "rejected"), contexts):
            if ctx and not _same_text(ctx[-1]["content"], context[-1]["content"]):
                raise RowProblem(f"{side}: its conversation answers another prompt than the `{pcol}` column", side,
                                 f"last user turn {ctx[-1]['content'][:60]!r}")
    if _same_text(answers[0], answers[1]):
        raise RowProblem("chosen and rejected identical", "rejected")
    return context, answers[0], answers[1]


def _missing_columns(fmt: str, source: dict, columns: list[str], name: str, split: str) -> None:
    wanted = _columns_of(fmt, source, columns)
    missing = [c for c in wanted.values() if c not in columns]
    if missing:
        fix = (
            "`messages_column: <column holding the conversation>`"
            if fmt in ("messages", "hh")
            else "`chosen` and `rejected` columns (strings with a `prompt` column, or conversations)"
            if fmt == "preference"
            else "`prompt_column: <column holding P>` and `response_column: <column holding R_revised>`"
        )
        raise DataError(
            f"source {name} split '{split}': required column(s) {missing} missing for format '{fmt}'. Columns found: "
            f"{columns}. Map yours with {fix} on this source (top level for dataset_name), or set `format`."
        )


def check_row(row: dict, fmt: str, source: dict, system: str | None, exclude_flagged: bool, where: str):
    """One row to (example, None, changes) or (None, (reason, location), []); `example` is {"prompt": [...],
    "completion": [...], "own_system": the row brought its own system turn}. Every schema goes through here."""
    if exclude_flagged and row.get("flags"):
        return None, ("flagged by generate_revisions.py", f"{where} field 'flags': {row['flags']}"), []
    rejected = None
    try:
        if fmt == "preference":
            (context, response, rejected), ignored = _preference(row, source), 0
        else:
            context, response, ignored = _pair(row, fmt, source)
    except RowProblem as p:
        return None, (p.reason, f"{where} field '{p.column}'" + (f": {p.detail}" if p.detail else "")), []
    init = row.get("init_response") if fmt == "cai" else None
    if isinstance(init, str) and " ".join(response.split()) == " ".join(init.split()):  # not revised at all
        return None, ("revision identical to init_response", f"{where} field 'revision_response'"), []
    changes = [(f"{fmt}: turns after the last assistant turn ignored", f"{where}: {ignored} turn(s)")] if ignored else []
    own_system = context[0]["role"] == "system"
    if system and not own_system:
        context = [{"role": "system", "content": system}, *context]
    example = {"prompt": context, "completion": [{"role": "assistant", "content": response}], "own_system": own_system}
    if rejected is not None:
        example["rejected"] = [{"role": "assistant", "content": rejected}]
    return example, None, changes


def _all_dropped(name: str, split: str, n: int, fmt: str, reasons: Counter, report: DataReport) -> DataError:
    return DataError(
        f"source {name} split '{split}': all {n} rows were dropped ({fmt} format): "
        + ", ".join(f"{k} {r}" for r, k in reasons.most_common())
        + ".\n" + "\n".join(report.drop_lines(reasons))
    )


def normalize(rows, source: dict, split: str, data_args: CAIDataArguments, report: DataReport, origins=None):
    """Rows of one split (a list: evaluate.py's small sets) to {"prompt", "completion", "source", "row"}; bad rows
    dropped and counted. `origins` gives each row's (file, row index); by default the source name and list index.
    Training goes through `normalize_parts`, the same `check_row` over Arrow."""
    name = source_name(source)
    if not rows:
        return []
    origins = origins or [(name, i) for i in range(len(rows))]
    columns = sorted({str(k) for r in rows for k in r})
    fmt = detect_format(columns, source)
    _missing_columns(fmt, source, columns, name, split)
    system = none_if_null(source.get("system_prompt", data_args.system_prompt))
    out, reasons = [], Counter()
    for row, (file, i) in zip(rows, origins):
        example, dropped, changes = check_row(row, fmt, source, system, data_args.exclude_flagged, f"{file} row {i}")
        for reason, where in changes:
            report.change(reason, where)
        if dropped:
            reasons[dropped[0]] += 1
            report.drop(*dropped)
            continue
        out.append({"prompt": example["prompt"], "completion": example["completion"], "source": file, "row": i})
    if not out:
        raise _all_dropped(name, split, len(rows), fmt, reasons, report)
    return out


def _message_list():
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")})


def pair_features():
    """The columns of a normalized row, and what each map step says about it (drop, at, changes)."""
    from datasets import Features, List, Value

    return Features({
        "prompt": _message_list(), "completion": _message_list(), "rejected": _message_list(),
        "source": Value("string"), "row": Value("int64"),
        "own_system": Value("bool"), "drop": Value("string"), "at": Value("string"),
        "changes": List({"reason": Value("string"), "at": Value("string")}), "pkey": Value("string"),
        "pkey_hash": Value("int64"), "pair_hash": Value("int64"),
    })  # fmt: skip


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _normalize_batch(batch, indices, *, part_label, json_text, row_numbers, fmt, source, system, exclude_flagged):
    out = {k: [] for k in ("prompt", "completion", "rejected", "source", "row", "own_system", "drop", "at", "changes",
                           "pkey", "pkey_hash", "pair_hash")}  # fmt: skip
    names = list(batch)
    for k, i in enumerate(indices):
        r = int(row_numbers[i]) if row_numbers is not None else i
        example, dropped, changes = None, ("", None), []  # a blank line: no row, nothing to count
        if json_text:
            line = batch["text"][k]
            row = json.loads(line) if line.strip() else None
        else:
            row = {c: batch[c][k] for c in names}
        if row is not None:
            example, dropped, changes = check_row(row, fmt, source, system, exclude_flagged, f"{part_label} row {r}")
        key = prompt_key(example) if example else ""
        out["prompt"].append(example and example["prompt"])
        out["completion"].append(example and example["completion"])
        out["rejected"].append(example.get("rejected") if example else None)
        out["own_system"].append(bool(example and example["own_system"]))
        out["source"].append(part_label), out["row"].append(r)
        out["drop"].append(dropped and dropped[0]), out["at"].append(dropped and dropped[1])
        out["changes"].append([{"reason": c, "at": a} for c, a in changes])
        out["pkey"].append(key), out["pkey_hash"].append(_hash64(key) if example else 0)
        answers = example and [example["completion"][0]["content"]] + [m["content"] for m in example.get("rejected") or []]
        out["pair_hash"].append(_hash64("\0".join([key, *answers])) if example else 0)
    return out


def normalize_parts(parts: list[Part], source: dict, split: str, data_args: CAIDataArguments, report: DataReport,
                    num_proc: int | None = None, preference: bool = False):
    """The Parts of one split to normalized rows (a Dataset with `pair_features`), bad rows dropped and counted:
    `check_row` on every row, as a batched map in `num_proc` workers. Returns (dataset, rows read, format)."""
    import datasets

    name = source_name(source)
    columns = sorted({c for part in parts for c in part.columns})
    fmt = detect_format(columns, source, preference)
    _missing_columns(fmt, source, columns, name, split)
    system = none_if_null(source.get("system_prompt", data_args.system_prompt))
    done = []
    for part in parts:
        done.append(part.ds.map(
            arrow_pages.DropsReadPages(_normalize_batch), batched=True, with_indices=True,
            remove_columns=part.ds.column_names,
            features=pair_features(), num_proc=procs(part.ds, num_proc), desc=f"checking rows of {part.label}",
            load_from_cache_file=False,  # datasets hashes module functions by name: an edit would reuse rows
            fn_kwargs={"part_label": part.label, "json_text": part.json_text, "row_numbers": part.row_numbers,
                       "fmt": fmt, "source": source, "system": system, "exclude_flagged": data_args.exclude_flagged},
        ))  # fmt: skip
    ds = datasets.concatenate_datasets(done) if len(done) > 1 else done[0]
    before = Counter(report.dropped)
    report.count_rows(ds)
    kept = Rows.kept(ds)
    n_read = sum(len(p.ds) if p.row_numbers is None else int(p.row_numbers[-1]) + 1 for p in parts)
    if len(kept) == 0 and n_read:
        raise _all_dropped(name, split, n_read, fmt, report.dropped - before, report)
    return kept, n_read, fmt


@dataclass
class Rows:
    """Some rows of a normalized dataset, as an index array: the split, leak and dedupe steps read columns of
    the memory-mapped table straight from `ds.data` (a filtered `Dataset` would gather them row by row in
    Python: 0.6 GB for the keys of 1M rows), and the dataset is `select`ed once, at the end."""

    ds: Any  # datasets.Dataset straight from `map` (no indices mapping: ds.data holds exactly its rows)
    idx: Any  # numpy int64 row numbers into ds

    def __post_init__(self):
        assert len(self.ds.data) == len(self.ds), "Rows needs a dataset without an indices mapping"

    @classmethod
    def kept(cls, ds) -> Rows:
        """The rows of a map's output that its `drop` column does not drop."""
        return cls(ds, np.flatnonzero(ds.data.column("drop").is_null().to_numpy(zero_copy_only=False)))

    def __len__(self) -> int:
        return len(self.idx)

    def column(self, name: str):
        """A numeric column of these rows (numpy), or an Arrow array for strings."""
        col = self.ds.data.column(name)
        if name in ("pkey", "source"):
            import pyarrow as pa

            return col.take(pa.array(self.idx))
        return col.to_numpy()[self.idx]

    def keep(self, mask) -> Rows:
        return Rows(self.ds, self.idx[mask])

    def dataset(self):
        """The rows as a Dataset, in this order."""
        if len(self.idx) == len(self.ds) and (np.diff(self.idx) == 1).all():
            return self.ds
        return self.ds.select(self.idx)


# --------------------------------------------------------------------------------------------- mixing


def prompt_key(example: dict) -> str:
    """Identity of a prompt for leak checks: the whole context, whitespace-collapsed and lower-cased."""
    text = "\n".join(m["content"] for m in example["prompt"] if m["role"] != "system")
    return " ".join(text.lower().split())


def _where(rows: Rows, mask, n: int = MAX_LOCATIONS) -> list[str]:
    """"file row N" of the first `n` rows where `mask` is true: the examples of a counted drop."""
    first = rows.keep(mask)
    first = Rows(first.ds, first.idx[:n])
    return [f"{s} row {r}" for s, r in zip(first.column("source").to_pylist(), first.column("row"))]


def split_by_prompt(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Hold out `fraction` of the unique prompts, so that no prompt is in both splits: the same prompts as sorting
    the unique prompt keys and shuffling them with `random.Random(seed)` (shuffling depends only on the count)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = rows.column("pkey")
    unique = pc.unique(keys)
    n_eval = max(1, round(len(unique) * fraction)) if fraction > 0 and len(unique) > 1 else 0
    if not n_eval:
        return rows, rows.keep(np.zeros(len(rows), bool))
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    ordered = unique.take(pc.sort_indices(unique))  # UTF-8 byte order is code point order: Python's sorted()
    held = pc.is_in(keys, value_set=ordered.take(pa.array(order[:n_eval]))).to_numpy(zero_copy_only=False)
    del keys, unique, ordered
    pa.default_memory_pool().release_unused()  # before workers fork: they would each count these pages
    return rows.keep(~held), rows.keep(held)


def _mix_parts(per_source: list, fractions: list, seed: int) -> list:
    """TRL's fraction rule (normalise, cap so that no source is oversampled), per source."""
    if all(f is None for f in fractions):
        return per_source
    weights = [f / sum(fractions) for f in fractions]
    total = min(len(rows) / w for rows, w in zip(per_source, weights) if w > 0)
    out = []
    for k, (rows, w) in enumerate(zip(per_source, weights)):
        # TRL keeps each source's first rows; a seeded shuffle first keeps file order from choosing the subset.
        order = list(range(len(rows)))
        random.Random(seed + k).shuffle(order)
        out.append(Rows(rows.ds, rows.idx[np.array(order[: round(w * total)], dtype=np.int64)]))
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


def load_pairs(script_args, data_args: CAIDataArguments, seed: int = 42, num_proc: int | None = None,
               cache_dir: str | None = None, preference: bool = False):
    """Train and eval datasets of conversational prompt/completion rows, and the report of what was dropped.

    Per source: read, validate rows, take its test split (or hold out `eval_fraction` of its unique prompts).
    Then over all sources: dedupe eval, drop train rows whose prompt is in any eval split, dedupe train, mix
    by `fraction`, and sample `max_eval_examples`. Everything dropped or left out is counted in the report.
    Every step is a `datasets` operation (map, filter, select); `num_proc` workers check the rows, and `cache_dir`
    is where datasets' loaders put the Arrow files (None: datasets' own cache). Columns of both datasets: prompt,
    completion (message lists), source, row (where the row came from) and own_system (it had its own system turn);
    with `preference`, every source is read as preference rows and `rejected` (a message list) is kept too.
    """
    import datasets

    report = DataReport()
    sources = sources_from_args(script_args, data_args)
    names = _unique_names(sources)
    trains, evals = [], []
    for source, name in zip(sources, names):
        split = _train_split(source)
        train, n_read, fmt = normalize_parts(open_parts(source, split, num_proc, cache_dir), source, split, data_args,
                                             report, num_proc, preference)
        info = {"path": name, "format": fmt, "train_rows_read": n_read}
        test_split = source.get("test_split", "test")
        if test_split and test_split != split and split_exists(source, test_split):
            held, n_test, _ = normalize_parts(open_parts(source, test_split, num_proc, cache_dir), source, test_split,
                                              data_args, report, num_proc, preference)
            info.update(eval_from=f"split '{test_split}'", eval_rows_read=n_test)
        else:
            fraction = source.get("eval_fraction", data_args.eval_fraction)
            train, held = split_by_prompt(train, fraction, seed)
            held_out = f"{fraction:g} of the unique prompts held out" if fraction > 0 else "none (eval_fraction 0)"
            info.update(eval_from=f"no '{test_split}' split; {held_out}")
        report.sources[name] = info
        trains.append(train)
        evals.append(held)

    evals = _dedupe(evals, "eval", report) if data_args.dedupe else evals
    eval_prompts = np.concatenate([e.column("pkey_hash") for e in evals])
    for k, part in enumerate(trains):
        leaked = np.isin(part.column("pkey_hash"), eval_prompts)
        if leaked.any():
            report.add("dropped", "prompt also in eval (dropped from train)", _where(part, leaked), int(leaked.sum()))
            trains[k] = part.keep(~leaked)
    trains = _dedupe(trains, "train", report) if data_args.dedupe else trains
    for name, part in zip(names, trains):
        if not len(part):
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
    keep = ["prompt", "completion", *(["rejected"] if preference else []), "source", "row", "own_system"]
    mixed = wrap_jailbreaks([p.dataset().select_columns(keep) for p in mixed], sources, names, seed, report, num_proc)
    train = datasets.concatenate_datasets(mixed)
    held = datasets.concatenate_datasets([p.dataset().select_columns(keep) for p in evals])
    if data_args.max_eval_examples is not None and len(held) > data_args.max_eval_examples:
        report.change("eval rows not sampled (max_eval_examples)", "eval", len(held) - data_args.max_eval_examples)
        held = held.select(random.Random(seed).sample(range(len(held)), data_args.max_eval_examples))
    report.counts.update(train_examples=len(train), eval_examples=len(held))
    return train, held, report


def _wrap_batch(batch, indices, *, which, templates):
    import jailbreaks

    return {"prompt": [jailbreaks.wrap_messages(p, templates[which[i]]) if which[i] >= 0 else p
                       for p, i in zip(batch["prompt"], indices)]}  # fmt: skip


def wrap_jailbreaks(parts: list, sources: list[dict], names: list[str], seed: int, report: DataReport,
                    num_proc: int | None = None):
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
        chosen = jailbreaks.chosen_rows(len(part), f, seed + k)
        which = np.full(len(part), -1, np.int32)
        which[chosen] = np.arange(len(chosen)) % len(templates)  # templates in turn, each used about equally
        part = part.map(arrow_pages.DropsReadPages(_wrap_batch), batched=True, with_indices=True,
                        num_proc=procs(part, num_proc),
                        fn_kwargs={"which": which, "templates": templates}, desc="jailbreak wrappers",
                        load_from_cache_file=False)
        report.sources[name]["jailbreak_wrapped"] = len(chosen)
        if chosen:
            report.change("train prompts wrapped in a jailbreak template (jailbreak_fraction)", name, len(chosen))
        out.append(part)
    return out


def _dedupe(parts: list, split: str, report: DataReport) -> list:
    """Exact duplicate (prompt, response) pairs removed, within and across sources (the first copy is kept)."""
    hashes = [p.column("pair_hash") for p in parts]
    everything = np.concatenate(hashes)
    keep = np.zeros(len(everything), bool)
    keep[np.unique(everything, return_index=True)[1]] = True
    out, start = [], 0
    for part, h in zip(parts, hashes):
        mine = keep[start: start + len(h)]
        start += len(h)
        if not mine.all():
            report.add("dropped", f"duplicate (prompt, response) pair in {split}", _where(part, ~mine),
                       int((~mine).sum()))
        out.append(part.keep(mine))
    return out


def fingerprint(script_args, data_args: CAIDataArguments) -> dict:
    """Everything the data path reads, for the data cache's key: each source with the SHA-256 of its files (a hub
    dataset by id and name: pin a local copy to key on its contents), and every data option."""
    import data_cache

    out = []
    for s in sources_from_args(script_args, data_args):
        files = {}
        for split in sorted({_train_split(s), s.get("test_split", "test")} - {None}):
            found = _split_files(s, split)
            files[split] = "hub" if found is None else [
                [os.path.abspath(f), data_cache.file_digest(f)] for f in found if os.path.isfile(f)]
        out.append({"source": s, "files": files})
    options = {k: v for k, v in vars(data_args).items() if k not in ("data_cache_dir", "rebuild_data_cache",
                                                                      "data_cache_shared", "preview_examples",
                                                                      "preview_all")}  # fmt: skip
    return {"sources": out, "options": options}


def system_prompts(data_args: CAIDataArguments) -> set:
    """Every system prompt in use: the top-level one and those set on mixture sources."""
    found = {data_args.system_prompt}
    return found | {none_if_null(s.get("system_prompt")) for s in data_args.datasets
                    if isinstance(s, dict) and "system_prompt" in s}


def prompt_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    """[system, user P]: how a bare prompt P meets the system prompt (chat_format renders or folds the system turn)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]
