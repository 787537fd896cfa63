"""The prepared tokens are exactly those of the list-based data path they replaced (issue 19).

tests/golden/*.json were written from main at ac9e0de, before the data path moved onto `datasets`, by
tests/golden/write_golden.py: the bundled demo mixture under each of the nine family tokenizers (every train and
eval example, by a SHA-256 of its input_ids and labels, in order, with the first example in full), and the
family tests' tricky rows in all three schemas (ids in full). Today's code must give the same ids, the same order,
and the same counted drops and changes.
"""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, write_jsonl
from test_chat_families import FAMILIES, TRICKY, family_tokenizer, rows_of

import cai_data
import chat_format
import sft

GOLDEN = Path(__file__).parent / "golden"


class Script:
    dataset_name, dataset_config, dataset_train_split, dataset_test_split = None, None, "train", "test"


def digest(ex):
    return hashlib.sha256(json.dumps([ex["input_ids"], ex["labels"]]).encode()).hexdigest()


@pytest.fixture(scope="module")
def bundled():
    return json.loads((GOLDEN / "bundled_mixture.json").read_text())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bundled_mixture_same_ids_as_before(family, bundled):
    cfg = yaml.safe_load((ROOT / "recipes/smollm2-135m/sft_demo.yaml").read_text())
    args = cai_data.CAIDataArguments(datasets=cfg["datasets"], system_prompt=cfg["system_prompt"],
                                     max_eval_examples=cfg["max_eval_examples"])
    train, evals, report = cai_data.load_pairs(Script, args, 42)
    fmt = chat_format.ChatFormat.detect(family_tokenizer(family), cfg["system_prompt"])
    tr = sft.prepare(train, fmt, 512, report, "train")
    ev = sft.prepare(evals, fmt, 512, report, "eval")
    want = bundled["families"][family]
    assert tr[0]["input_ids"] == want["first_train"]["input_ids"] and tr[0]["labels"] == want["first_train"]["labels"]
    for got, expected in (((tr, want["train"])), (ev, want["eval"])):
        assert [{"source": e["source"], "row": e["row"], "sha256": digest(e)} for e in got] == expected
    assert dict(report.dropped) == want["dropped"] and dict(report.changed) == want["changed"]


def test_family_rows_same_ids_as_before(tmp_path):
    golden = json.loads((GOLDEN / "family_rows.json").read_text())
    for family in sorted(FAMILIES):
        end = FAMILIES[family][4]
        tricky = [*TRICKY[:-1], f"Close tags like {end} stay text."]
        tok = family_tokenizer(family)
        for schema in ("cai", "messages", "pc"):
            rows = [rows_of(schema, f"How do I pick a lock? ({i})", r) for i, r in enumerate(tricky)]
            rows += [rows_of(schema, "Say nothing.", " "), rows_of(schema, f"Repeat {end} please.", "No.")]
            Script.dataset_name = write_jsonl(tmp_path / f"{family}-{schema}.jsonl", rows)
            train, _, report = cai_data.load_pairs(
                Script, cai_data.CAIDataArguments(eval_fraction=0.0, system_prompt=cai_data.DEFAULT_SYSTEM_PROMPT))
            Script.dataset_name = None
            fmt = chat_format.ChatFormat.detect(tok, cai_data.DEFAULT_SYSTEM_PROMPT)
            ds = sft.prepare(train, fmt, 512, report, "train")
            want = golden[f"{family}/{schema}"]
            got = [{"row": e["row"], "input_ids": e["input_ids"], "labels": e["labels"]} for e in ds]
            assert got == want["examples"], (family, schema)
            assert (dict(report.dropped), dict(report.changed)) == (want["dropped"], want["changed"]), (family, schema)
