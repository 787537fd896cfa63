"""Writes tests/golden/*.json: the prepared input_ids and labels of the bundled data and the family rows.

Run from main at ac9e0de, before the data path moved onto `datasets` (issue 19), with the list API of that
commit (`cai_data.load_pairs` + `sft.prepare`):

    git worktree add /tmp/pre-arrow ac9e0de
    cd /tmp/pre-arrow && .venv/bin/python <this repo>/tests/golden/write_golden.py <this repo>/tests/golden

tests/test_golden.py prepares the same inputs with today's code and compares every example id for id. It is kept
for the record; it does not run on the Arrow data path (it calls the old API on purpose).
"""

import hashlib
import json
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.getcwd()
sys.path.insert(0, os.path.join(ROOT, "recipes"))
sys.path.insert(0, os.path.join(HERE, ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cai_data  # noqa: E402
import chat_format  # noqa: E402
import sft  # noqa: E402
from test_chat_families import FAMILIES, TRICKY, family_tokenizer, rows_of  # noqa: E402


def digest(ex):
    return hashlib.sha256(json.dumps([ex["input_ids"], ex["labels"]]).encode()).hexdigest()


def dump(ds):
    return [] if ds is None else [{"source": ex["source"], "row": ex["row"], "sha256": digest(ex)} for ex in ds]


class Script:
    dataset_name = None
    dataset_config, dataset_train_split, dataset_test_split = None, "train", "test"


def bundled(out):
    Script.dataset_name = None
    cfg = yaml.safe_load(open(os.path.join(ROOT, "recipes/smollm2-135m/sft_demo.yaml")))
    args = cai_data.CAIDataArguments(datasets=cfg["datasets"], system_prompt=cfg["system_prompt"],
                                     max_eval_examples=cfg["max_eval_examples"])
    result = {"config": "recipes/smollm2-135m/sft_demo.yaml data keys, seed 42, max_length 512", "families": {}}
    for family in sorted(FAMILIES):
        train, evals, report = cai_data.load_pairs(Script, args, 42)
        fmt = chat_format.ChatFormat.detect(family_tokenizer(family), cfg["system_prompt"])
        tr = sft.prepare(train, fmt, 512, report, "train")
        ev = sft.prepare(evals, fmt, 512, report, "eval")
        result["families"][family] = {"train": dump(tr), "eval": dump(ev), "first_train": {
            "input_ids": tr[0]["input_ids"], "labels": tr[0]["labels"]}, "dropped": dict(report.dropped),
            "changed": dict(report.changed)}
        print(family, len(tr), len(ev), flush=True)
    with open(os.path.join(out, "bundled_mixture.json"), "w") as f:
        json.dump(result, f)


def families(out, tmp):
    result = {}
    for family in sorted(FAMILIES):
        end = FAMILIES[family][4]
        tricky = [*TRICKY[:-1], f"Close tags like {end} stay text."]
        for schema in ("cai", "messages", "pc"):
            rows = [rows_of(schema, f"How do I pick a lock? ({i})", r) for i, r in enumerate(tricky)]
            rows += [rows_of(schema, "Say nothing.", " "), rows_of(schema, f"Repeat {end} please.", "No.")]
            path = os.path.join(tmp, f"{family}-{schema}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            Script.dataset_name = path
            train, _, report = cai_data.load_pairs(
                Script, cai_data.CAIDataArguments(eval_fraction=0.0, system_prompt=cai_data.DEFAULT_SYSTEM_PROMPT))
            fmt = chat_format.ChatFormat.detect(family_tokenizer(family), cai_data.DEFAULT_SYSTEM_PROMPT)
            ds = sft.prepare(train, fmt, 512, report, "train")
            result[f"{family}/{schema}"] = {"examples": [
                {"row": ex["row"], "input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in ds],
                "dropped": dict(report.dropped), "changed": dict(report.changed)}
    with open(os.path.join(out, "family_rows.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    import tempfile

    out = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        families(out, tmp)
    bundled(out)
