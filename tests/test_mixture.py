"""Mixtures (`datasets:` with `fraction:`): exact counts from TRL's rule, per-source schemas and column mapping,
per-source test splits, leaks across sources; and a tiny model trained on a two-source mixture."""

import json
import re
import types

import pytest
from conftest import rows_of, cai_row, run_recipe, tiny_config, write_jsonl

import cai_data
import run_dir


def script():
    return types.SimpleNamespace(
        dataset_name=None, dataset_config=None, dataset_train_split="train", dataset_test_split="test"
    )


def pc_rows(tag, n):
    return [{"prompt": f"{tag} question {i}?", "completion": f"{tag} answer {i}."} for i in range(n)]


def load(sources, **kwargs):
    train, evals, report = cai_data.load_pairs(script(), cai_data.CAIDataArguments(datasets=sources, **kwargs), seed=0)
    return rows_of(train), rows_of(evals), report


def count_by_file(rows):
    out = {}
    for e in rows:
        out[e["source"]] = out.get(e["source"], 0) + 1
    return out


@pytest.mark.parametrize(
    "sizes, fractions, expected",
    [
        ((100, 40), (0.5, 0.5), (40, 40)),  # capped by the smaller source: 80 in all, half each
        ((100, 100), (0.7, 0.3), (100, 43)),  # total = 100 / 0.7 = 142.86; 0.3 * 142.86 = 42.86 -> 43
        ((100, 40), (2, 1), (80, 40)),  # fractions are normalised: 2/3 and 1/3 of 120
        ((100, 40), (1, 0), (100, 0)),  # a zero fraction leaves a source out
    ],
)
def test_fraction_counts_are_exact(tmp_path, sizes, fractions, expected):
    paths = [write_jsonl(tmp_path / f"s{k}.jsonl", pc_rows(f"s{k}", n)) for k, n in enumerate(sizes)]
    sources = [{"path": p, "fraction": f, "eval_fraction": 0} for p, f in zip(paths, fractions)]
    train, evals, report = load(sources)
    assert evals == []
    assert [count_by_file(train).get(p, 0) for p in paths] == list(expected)
    assert [report.sources[p]["train_rows_in_mixture"] for p in paths] == list(expected)
    left_out = sum(n - e for n, e in zip(sizes, expected))
    assert report.changed.get("train rows left out by mixture fractions", 0) == left_out
    assert report.counts["train_examples"] == sum(expected)


def test_fraction_subset_is_seeded_not_file_order(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", pc_rows("big", 100))
    small = write_jsonl(tmp_path / "small.jsonl", pc_rows("small", 10))
    sources = [
        {"path": path, "fraction": 0.5, "eval_fraction": 0},
        {"path": small, "fraction": 0.5, "eval_fraction": 0},
    ]
    first, _, _ = load(sources)
    again, _, _ = load(sources)
    rows = sorted(e["row"] for e in first if e["source"] == path)
    assert rows == sorted(e["row"] for e in again if e["source"] == path)  # same seed, same subset
    assert len(rows) == 10 and rows != list(range(10))


def test_fraction_on_some_sources_only_is_an_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pc_rows("a", 5))
    b = write_jsonl(tmp_path / "b.jsonl", pc_rows("b", 5))
    with pytest.raises(
        cai_data.DataError, match=re.escape(f"`fraction` is set on some mixture sources but not on ['{b}']")
    ):
        load([{"path": a, "fraction": 0.5}, {"path": b}])


@pytest.mark.parametrize("bad", ["half", -0.5, True])
def test_fraction_must_be_a_number(tmp_path, bad):
    a = write_jsonl(tmp_path / "a.jsonl", pc_rows("a", 5))
    b = write_jsonl(tmp_path / "b.jsonl", pc_rows("b", 5))
    with pytest.raises(cai_data.DataError, match=r"`fraction` must be a number >= 0"):
        load([{"path": a, "fraction": 0.5}, {"path": b, "fraction": bad}])


def test_all_zero_fractions_is_an_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pc_rows("a", 5))
    with pytest.raises(cai_data.DataError, match=r"mixture fractions are all 0"):
        load([{"path": a, "fraction": 0}, {"path": a, "fraction": 0}])


def test_no_fractions_concatenates_everything(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pc_rows("a", 7))
    b = write_jsonl(tmp_path / "b.jsonl", pc_rows("b", 3))
    train, _, report = load([{"path": a}, {"path": b}], eval_fraction=0)
    assert count_by_file(train) == {a: 7, b: 3} and not report.changed


def test_per_source_schemas_and_column_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cai = write_jsonl(tmp_path / "cai.jsonl", [cai_row(f"CAI prompt {i}?", f"CAI revision {i}.") for i in range(4)])
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text("id,question,answer\n" + "".join(f"{i},QA question {i}?,QA answer {i}.\n" for i in range(3)))
    conv = [
        {"conv": [{"role": "user", "content": f"Chat {i}?"}, {"role": "assistant", "content": f"Chat reply {i}."}]}
        for i in range(2)
    ]
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(conv), parquet)
    sources = [
        {"path": cai},
        {"path": str(csv_path), "prompt_column": "question", "response_column": "answer"},
        {"path": str(parquet), "messages_column": "conv", "system_prompt": None},
    ]
    train, _, report = load(sources, eval_fraction=0)
    assert [report.sources[s["path"]]["format"] for s in sources] == ["cai", "pc", "messages"]
    by_response = {e["completion"][0]["content"]: e["prompt"] for e in train}
    assert len(by_response) == 9
    system = {"role": "system", "content": cai_data.DEFAULT_SYSTEM_PROMPT}
    assert by_response["CAI revision 2."] == [system, {"role": "user", "content": "CAI prompt 2?"}]
    assert by_response["QA answer 1."] == [system, {"role": "user", "content": "QA question 1?"}]
    assert by_response["Chat reply 0."] == [{"role": "user", "content": "Chat 0?"}]  # per-source system_prompt: none


def test_top_level_mapping_is_the_default_of_every_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": "A?", "r": "a."}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": "B?", "r": "b."}])
    train, _, _ = load(
        [{"path": a}, {"path": b, "prompt_column": "question"}], prompt_column="q", response_column="r", eval_fraction=0
    )
    assert sorted(e["prompt"][-1]["content"] for e in train) == ["A?", "B?"]


def test_per_source_test_splits_and_leaks_across_sources(tmp_path):
    a_train = write_jsonl(
        tmp_path / "a_train.jsonl", pc_rows("a", 10) + [{"prompt": "b question 0?", "completion": "x"}]
    )
    a_test = write_jsonl(tmp_path / "a_test.jsonl", [{"prompt": "a question 0?", "completion": "held"}])
    b_train = write_jsonl(
        tmp_path / "b_train.jsonl", pc_rows("b", 6) + [{"prompt": "A QUESTION 0?", "completion": "y"}]
    )
    b_test = write_jsonl(tmp_path / "b_test.jsonl", [{"prompt": "b question 0?", "completion": "held"}] * 2)
    sources = [
        {"data_files": {"train": a_train, "test": a_test}},
        {"data_files": {"train": b_train, "test": b_test}},
    ]
    train, evals, report = load(sources)
    assert count_by_file(evals) == {a_test: 1, b_test: 1}
    # a: "a question 0" (own test) and "b question 0" (b's test) leave; b: "b question 0" and "A QUESTION 0" leave
    assert count_by_file(train) == {a_train: 9, b_train: 5}
    assert report.dropped == {
        "prompt also in eval (dropped from train)": 4,
        "duplicate (prompt, response) pair in eval": 1,
    }
    assert report.sources[a_train]["eval_from"] == "split 'test'"
    assert {cai_data.prompt_key(e) for e in train}.isdisjoint({cai_data.prompt_key(e) for e in evals})


def test_held_out_prompts_of_one_source_leave_the_others_train(tmp_path):
    shared = [{"prompt": f"shared {i}?", "completion": f"a {i}"} for i in range(10)]
    a = write_jsonl(tmp_path / "a.jsonl", shared)
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "completion": "another answer"} for r in shared])
    train, evals, report = load([{"path": a, "eval_fraction": 0.3}, {"path": b, "eval_fraction": 0}])
    held = {cai_data.prompt_key(e) for e in evals}
    assert len(held) == 3
    assert count_by_file(train) == {a: 7, b: 7}
    assert report.dropped == {"prompt also in eval (dropped from train)": 3}


def test_duplicates_across_sources_are_dropped_before_mixing(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pc_rows("x", 10))
    b = write_jsonl(tmp_path / "b.jsonl", pc_rows("x", 4) + pc_rows("y", 6))
    train, _, report = load([{"path": a, "fraction": 0.5}, {"path": b, "fraction": 0.5}], eval_fraction=0)
    assert report.dropped == {"duplicate (prompt, response) pair in train": 4}
    assert count_by_file(train) == {a: 6, b: 6}  # b has 6 unique rows left, so 6 + 6


def test_max_eval_examples_is_counted(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pc_rows("a", 40))
    _, evals, report = load([{"path": a, "eval_fraction": 0.5}], max_eval_examples=5)
    assert len(evals) == 5 and report.changed == {"eval rows not sampled (max_eval_examples)": 15}


def test_dry_run_mixture_summary(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", pc_rows("a", 30))
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"messages": [{"role": "user", "content": f"b {i}?"}, {"role": "assistant", "content": f"b {i}."}]}
            for i in range(10)
        ],
    )
    sources = [{"path": a, "fraction": 0.75, "eval_fraction": 0}, {"path": b, "fraction": 0.25, "eval_fraction": 0}]
    cfg = tiny_config(tiny_model_dir, None, tmp_path / "out", datasets=sources, eval_strategy="no")  # no eval rows
    proc = run_recipe(cfg, tmp_path, "--dry_run")
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert summary["sources"][a]["train_rows_in_mixture"] == 30 and summary["sources"][b]["train_rows_in_mixture"] == 10
    assert summary["counts"]["train_examples"] == 40 and summary["counts"]["train_examples_tokenized"] == 40
    assert f"source {b}: format=messages, train_rows_read=10" in proc.stdout


def test_train_on_two_source_mixture(tmp_path, tiny_model_dir):
    cai = write_jsonl(
        tmp_path / "cai_train.jsonl", [cai_row(f"Harmful ask {i}?", f"I won't, but {i}.") for i in range(24)]
    )
    cai_test = write_jsonl(tmp_path / "cai_test.jsonl", [cai_row(f"Harmful held {i}?", f"No {i}.") for i in range(4)])
    helpful = write_jsonl(tmp_path / "helpful.jsonl", pc_rows("helpful", 16) + [{"prompt": " ", "completion": "x"}])
    sources = [
        {"data_files": {"train": cai, "test": cai_test}, "fraction": 0.5},
        {"path": helpful, "fraction": 0.5, "eval_fraction": 0.25},
    ]
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, None, out, datasets=sources, max_steps=2, eval_steps=2)
    proc = run_recipe(cfg, tmp_path)
    summary = json.loads((out / "data_summary.json").read_text())
    # helpful: 16 valid rows, 4 prompts held out -> 12 train; cai: 24 train -> the 0.5/0.5 mixture is 12 + 12
    assert summary["sources"][helpful]["train_rows"] == 12 and summary["sources"][helpful]["eval_rows"] == 4
    assert summary["sources"][cai]["train_rows_in_mixture"] == 12 and summary["sources"][cai]["eval_rows"] == 4
    assert summary["counts"]["train_examples"] == 24 and summary["counts"]["eval_examples"] == 8
    assert summary["dropped"] == {"prompt empty or whitespace": 1}
    assert summary["changed"]["train rows left out by mixture fractions"] == 12
    assert (out / run_dir.COMPLETE_MARKER).exists(), proc.stdout[-2000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
