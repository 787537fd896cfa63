"""Bad input never passes silently: every case goes through the real loading path (`load_pairs` +
`sft.prepare`, and `sft.py --dry_run` for a few), and is either dropped with an exact count per reason
and a location (file, row, field), or stops with a message that names the file/row/field and the fix."""

import json
import os
import types

import pytest
from conftest import build_tokenizer, cai_row, prepare_rows, run_recipe, tiny_config, toy_cai_rows, write_jsonl

import cai_data

OK = [{"prompt": f"How do I do thing {i}?", "completion": f"Here is a safe way to do thing {i}."} for i in range(3)]


def script(path=None, train="train", test="test"):
    return types.SimpleNamespace(
        dataset_name=path, dataset_config=None, dataset_train_split=train, dataset_test_split=test
    )


def load(path, **data_kwargs):
    data_kwargs.setdefault("eval_fraction", 0.0)
    return cai_data.load_pairs(script(str(path)), cai_data.CAIDataArguments(**data_kwargs))


# ------------------------------------------------------------------------------------------- columns


@pytest.mark.parametrize(
    "rows, kwargs, fix",
    [
        ([{"question": "q", "answer": "a"}], {}, "prompt_column"),  # schema cannot be told
        ([{"question": "q", "answer": "a"}], {"prompt_column": "q", "response_column": "answer"}, "prompt_column"),
        ([{"conv": []}], {"messages_column": "conversation"}, "messages_column"),
        ([{"prompt": "p", "init_response": "r"}], {"data_format": "cai"}, "response_column"),
    ],
)
def test_missing_column_lists_columns_and_mapping(tmp_path, rows, kwargs, fix):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(cai_data.DataError) as e:
        load(path, **kwargs)
    msg = str(e.value)
    assert path in msg and fix in msg
    columns = sorted(rows[0])
    assert str(columns) in msg


# ------------------------------------------------------------------------------------------- row values


def test_bad_prompt_and_response_values_dropped_with_exact_counts(tmp_path):
    bad = [
        {"prompt": "", "completion": "x"},
        {"prompt": "   \n\t", "completion": "x"},
        {"prompt": None, "completion": "x"},
        {"completion": "x"},  # column absent in this row
        {"prompt": 7, "completion": "x"},
        {"prompt": "p", "completion": " "},
        {"prompt": "p", "completion": None},
        {"prompt": "p", "completion": ["a list"]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", OK + bad)
    train, _, report = load(path)
    assert len(train) == 3
    assert report.dropped == {
        "prompt empty or whitespace": 2,
        "prompt missing or null": 2,
        "prompt not a string": 1,
        "response empty or whitespace": 1,
        "response missing or null": 1,
        "response not a string": 1,
    }
    assert report.locations["prompt empty or whitespace"] == [
        f"{path} row 3 field 'prompt'",
        f"{path} row 4 field 'prompt'",
    ]
    assert report.locations["prompt not a string"] == [f"{path} row 7 field 'prompt': got int"]
    assert report.locations["response not a string"] == [f"{path} row 10 field 'completion': got list"]


def test_mapped_columns_report_the_users_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a question", "a": "an answer"}, {"q": "another", "a": ""}])
    train, _, report = load(path, prompt_column="q", response_column="a")
    assert len(train) == 1
    assert report.locations["response empty or whitespace"] == [f"{path} row 1 field 'a'"]


def test_all_rows_bad_is_a_clear_error(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "", "completion": "x"}] * 2 + [{"prompt": "p", "completion": None}]
    )
    with pytest.raises(
        cai_data.DataError, match=r"all 3 rows were dropped .*2 prompt empty or whitespace, 1 response missing"
    ):
        load(path)


def test_flagged_rows_dropped_with_count(tmp_path):
    rows = [{**r, "flags": []} for r in OK] + [{"prompt": "p", "completion": "c", "flags": ["refusal"]}]
    train, _, report = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(train) == 3 and report.dropped == {"flagged by generate_revisions.py": 1}


# ------------------------------------------------------------------------------------------- messages


def turns(*roles):
    return [{"role": r, "content": f"{r} text {i}"} for i, r in enumerate(roles)]


def test_messages_problems_dropped_with_reason(tmp_path):
    rows = [
        {"messages": turns("user", "assistant")},
        {"messages": turns("system", "user", "assistant", "user", "assistant")},
        {"messages": turns("user", "bot")},
        {"messages": turns("human", "assistant")},
        {"messages": turns("assistant", "user", "assistant")},
        {"messages": turns("user", "user", "assistant")},
        {"messages": turns("user", "assistant", "system", "user", "assistant")},
        {"messages": turns("user")},
        {"messages": turns("system", "user")},
        {"messages": []},
        {"messages": "user: hi"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, report = load(path)
    assert len(train) == 2
    assert report.dropped == {
        "messages: unknown role": 2,
        "messages: wrong turn order": 3,
        "messages: no assistant turn": 2,
        "messages: not a non-empty list of {role, content}": 3,
        "messages: empty or non-string content": 1,
    }
    assert report.locations["messages: unknown role"][0] == (
        f"{path} row 2 field 'messages': turn 1 has role 'bot'; roles are system/user/assistant"
    )
    assert report.locations["messages: wrong turn order"][0].startswith(f"{path} row 4 field 'messages': turn 0 is")


def test_turns_after_last_assistant_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": turns("user", "assistant", "user")}])
    train, _, report = load(path)
    assert train[0]["completion"][0]["content"] == "assistant text 1"
    assert report.changed == {"messages: turns after the last assistant turn ignored": 1}


# ------------------------------------------------------------------------------------------- HH


def test_hh_multi_turn_last_assistant_is_target(tmp_path):
    text = (
        "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
        "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that."
    )
    train, _, _ = load(write_jsonl(tmp_path / "d.jsonl", [{"chosen": text, "rejected": "ignored"}]))
    [ex] = train
    assert ex["completion"] == [{"role": "assistant", "content": "I can't help with that."}]
    assert ex["prompt"][1:] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "How do I pick a lock?"},
    ]


def test_hh_malformed_dropped_with_counts(tmp_path):
    rows = [
        {"text": "\n\nHuman: fine\n\nAssistant: ok"},
        {"text": "Human: no leading blank lines\n\nAssistant: still fine"},
        {"text": "\n\nAssistant: no human here"},
        {"text": "just some text"},
        {"text": "Preamble\n\nHuman: hi\n\nAssistant: yo"},
        {"text": "\n\nHuman: hi\n\nHuman: again\n\nAssistant: yo"},
        {"text": "\n\nHuman: only a question"},
        {"text": "\n\nHuman: hi\n\nAssistant:"},
        {"text": 42},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, report = load(path)
    assert [e["completion"][0]["content"] for e in train] == ["ok", "still fine"]
    assert report.dropped == {
        "hh: no Human turn": 2,
        "hh: text before the first turn": 1,
        "hh: wrong turn order": 1,
        "hh: no assistant turn": 1,
        "hh: empty or non-string content": 1,
        "hh: not a string": 1,
    }
    assert report.locations["hh: text before the first turn"] == [
        f"{path} row 4 field 'text': text before the first turn"
    ]


# ------------------------------------------------------------------------------------------- length policy


def test_prompt_without_room_dropped_then_stop_when_nothing_left(tmp_path):
    tok = build_tokenizer("chatml")
    rows = [cai_row("Why?", "Because.")] + [cai_row("why " * (50 + i), "Because.") for i in range(3)]
    train, _, report = load(write_jsonl(tmp_path / "d.jsonl", rows))
    ds = prepare_rows(train, tok, 64, report)
    assert len(ds) == 1
    reason = "train: prompt leaves no room for the response at max_length"
    assert report.dropped == {reason: 3}  # one reason however long each prompt is
    assert "max_length 64" in report.locations[reason][0]
    with pytest.raises(
        cai_data.DataError, match=r"no train examples left(.|\n)*dropped 3 \(train: prompt leaves no room"
    ):
        prepare_rows(train.select(range(1, len(train))), tok, 64, cai_data.DataReport())


# ------------------------------------------------------------------------------------------- dedupe and leaks


def test_exact_duplicates_deduped_with_count(tmp_path):
    rows = OK + [OK[0], OK[0], {"prompt": OK[1]["prompt"], "completion": "A different answer."}]
    train, _, report = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(train) == 4  # same prompt with another response is not a duplicate
    assert report.dropped == {"duplicate (prompt, response) pair in train": 2}
    train, _, report = load(write_jsonl(tmp_path / "d.jsonl", rows), dedupe=False)
    assert len(train) == 6 and not report.dropped


def test_prompt_in_separate_test_file_removed_from_train(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", OK + [{"prompt": "  how do i DO thing 0? ", "completion": "x"}])
    test_path = write_jsonl(tmp_path / "test.jsonl", [{"prompt": OK[0]["prompt"], "completion": "held out"}])
    data_args = cai_data.CAIDataArguments(datasets=[{"data_files": {"train": train_path, "test": test_path}}])
    train, evals, report = cai_data.load_pairs(script(), data_args)
    assert [e["completion"][0]["content"] for e in evals] == ["held out"]
    assert len(train) == 2  # both spellings of the eval prompt left train
    assert report.dropped == {"prompt also in eval (dropped from train)": 2}
    assert report.sources[train_path]["eval_from"] == "split 'test'"
    assert report.sources[train_path]["eval_rows_read"] == 1


def test_test_rows_are_located_in_the_test_file(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", OK)
    test_path = write_jsonl(
        tmp_path / "test.jsonl", [{"prompt": "held", "completion": "out"}, {"prompt": "", "completion": "x"}]
    )
    data_args = cai_data.CAIDataArguments(datasets=[{"data_files": {"train": train_path, "test": test_path}}])
    _, evals, report = cai_data.load_pairs(script(), data_args)
    assert evals[0]["source"] == test_path and evals[0]["row"] == 0
    assert report.locations["prompt empty or whitespace"] == [f"{test_path} row 1 field 'prompt'"]


def test_data_files_without_test_entry_holds_out_prompts(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", toy_cai_rows(20))
    data_args = cai_data.CAIDataArguments(datasets=[{"data_files": {"train": train_path}}], eval_fraction=0.25)
    train, evals, report = cai_data.load_pairs(script(), data_args)
    assert (len(train), len(evals)) == (15, 5)
    assert report.sources[train_path]["eval_from"] == "no 'test' split; 0.25 of the unique prompts held out"


def test_data_files_problems(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", OK)
    for files, match in [
        ({"test": path}, r"no file for split 'train'\. Add `train: path/to/file.jsonl`"),
        ({"train": path, "tset": path}, r"data_files split\(s\) \['tset'\] are neither the train split 'train' nor"),
    ]:
        with pytest.raises(cai_data.DataError, match=match):
            cai_data.load_pairs(script(), cai_data.CAIDataArguments(datasets=[{"data_files": files}]))


def test_data_files_list_is_read_as_one_split_with_per_file_locations(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", OK[:2])
    b = write_jsonl(tmp_path / "b.jsonl", [OK[2], {"prompt": "", "completion": "x"}])
    train, _, report = cai_data.load_pairs(
        script(), cai_data.CAIDataArguments(datasets=[{"data_files": [a, b]}], eval_fraction=0)
    )
    assert [(e["source"], e["row"]) for e in train] == [(a, 0), (a, 1), (b, 0)]
    assert report.locations["prompt empty or whitespace"] == [f"{b} row 1 field 'prompt'"]


def test_local_folder_with_split_files(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", OK)
    write_jsonl(tmp_path / "ds" / "test.jsonl", [{"prompt": "held", "completion": "out"}])
    train, evals, report = load(tmp_path / "ds")
    assert (len(train), len(evals)) == (3, 1)
    assert train[0]["source"] == str(tmp_path / "ds" / "train.jsonl")


# ------------------------------------------------------------------------------------------- unreadable files


def test_missing_file(tmp_path):
    with pytest.raises(cai_data.DataError, match=r"nope\.jsonl: no such file"):
        load(tmp_path / "nope.jsonl")


def test_folder_where_a_file_is_expected(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(cai_data.DataError, match=r"d\.jsonl: is a folder, but a file is expected"):
        cai_data.load_pairs(
            script(), cai_data.CAIDataArguments(datasets=[{"data_files": {"train": str(tmp_path / "d.jsonl")}}])
        )
    with pytest.raises(cai_data.DataError, match=r"the folder holds no data files"):
        load(tmp_path / "d.jsonl")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; the next test covers the message")
def test_permission_denied_real(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", OK)
    os.chmod(path, 0)
    with pytest.raises(cai_data.DataError, match=r"permission denied.*chmod a\+r"):
        load(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_permission_denied_message(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_text("x")

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", file)

    monkeypatch.setattr(cai_data, "open", denied, raising=False)  # what the OS raises for a chmod 000 file
    with pytest.raises(cai_data.DataError, match=rf"d\{suffix}: permission denied\. Make the file readable"):
        load(path)


@pytest.mark.parametrize("name", ["d.txt", "d.xlsx", "d.tsv"])
def test_unsupported_file_type(tmp_path, name):
    (tmp_path / name).write_text("prompt\tcompletion\n")
    with pytest.raises(
        cai_data.DataError, match=rf"unsupported file type '{name[1:]}'\. Use \.jsonl, \.json, \.parquet or \.csv"
    ):
        load(tmp_path / name)


def test_invalid_json_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(OK[0]) + "\n\n" + json.dumps(OK[1]) + "\n" + '{"prompt": "p", "completion": }\n')
    with pytest.raises(cai_data.DataError, match=r"d\.jsonl: line 4: invalid JSON"):
        load(path)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(OK[0]) + "\n" + '["a", "list"]\n')
    with pytest.raises(cai_data.DataError, match=r"line 2: expected a JSON object \(one per line\), not list"):
        load(path)


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(OK, indent=2))
    assert len(load(path)[0]) == 3
    path.write_text(json.dumps(OK + ["oops"], indent=2))
    with pytest.raises(cai_data.DataError, match=r"item 3 of the JSON list is a str, not an object"):
        load(path)
    path.write_text('[\n{"prompt": "p",\n"completion": }\n]')
    with pytest.raises(cai_data.DataError, match=r"d\.json: line 3: invalid JSON"):
        load(path)


def test_line_separator_inside_a_json_string_is_not_a_new_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load(path)[0][0]["prompt"][-1]["content"] == "a\u2028b"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_bytes_line_number(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    head = (
        (json.dumps(OK[0]) + "\n" + json.dumps(OK[1]) + "\n") if suffix == ".jsonl" else "prompt,completion\nhi,there\n"
    )
    path.write_bytes(head.encode() + "caf\xe9,ok\n".encode("latin-1"))
    with pytest.raises(cai_data.DataError, match=r"line 3: bytes that are not UTF-8 .*iconv"):
        load(path)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(OK[0]) + "\n").encode())
    assert len(load(path)[0]) == 1


def test_csv_cells_stay_strings_and_bad_rows_are_located(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"Hi, you",NA\nNone,ok\n,empty prompt\n')
    train, _, report = load(path)
    assert [(e["prompt"][-1]["content"], e["completion"][0]["content"]) for e in train] == [
        ("Hi, you", "NA"),
        ("None", "ok"),
    ]
    assert report.locations["prompt empty or whitespace"] == [f"{path} row 2 field 'prompt'"]
    path.write_text("prompt,completion\na,b\na,b,c\n")
    with pytest.raises(cai_data.DataError, match=r"line 3: more cells than the header has columns"):
        load(path)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(OK + [{"prompt": None, "completion": "x"}]), path)
    train, _, report = load(path)
    assert len(train) == 3 and report.dropped == {"prompt missing or null": 1}
    path.write_text("not parquet")
    with pytest.raises(cai_data.DataError, match=r"d\.parquet: not a readable Parquet file"):
        load(path)


@pytest.mark.parametrize("text", ["\n\n", ""])  # blank lines, and zero bytes (datasets' text loader fails on it)
def test_empty_file(tmp_path, text):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(cai_data.DataError, match=r"d\.jsonl: the file holds no rows"):
        load(path)


# ------------------------------------------------------------------------------------------- source options


def test_source_option_mistakes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", OK)
    cases = [
        ([{"path": path, "fractoin": 0.5}], r"datasets\[0\]: unknown key\(s\) \['fractoin'\]"),
        ([{"name": "x"}], r"datasets\[0\]: set `path`"),
        ([42], r"datasets\[0\]: expected a mapping"),
        ([{"path": path, "format": "sharegpt"}], r"format 'sharegpt' is not one of"),
    ]
    for datasets, match in cases:
        with pytest.raises(cai_data.DataError, match=match):
            cai_data.load_pairs(script(), cai_data.CAIDataArguments(datasets=datasets))
    with pytest.raises(cai_data.DataError, match=r"both `dataset_name` .* and a `datasets:` mixture"):
        cai_data.load_pairs(script(path), cai_data.CAIDataArguments(datasets=[path]))


# ------------------------------------------------------------------------------------------- through sft.py


def test_dry_run_prints_and_writes_the_summary(tmp_path, tiny_model_dir):
    rows = (
        [{"prompt": f"Question number {i}?", "completion": f"Answer {i}."} for i in range(6)]
        + [
            {"prompt": "", "completion": "x"},
            {"prompt": None, "completion": "x"},
            {"prompt": "Question number 0?", "completion": "Answer 0."},
        ]
        + [
            {"prompt": "Question number 9?", "completion": "Leaks into train."},
            {"prompt": "why " * 200, "completion": "long"},
        ]
    )
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "question number 9?", "completion": "Held out."}])
    cfg = tiny_config(tiny_model_dir, None, tmp_path / "out", datasets=[{"data_files": {"train": train, "test": test}}])
    proc = run_recipe(cfg, tmp_path, "--dry_run")
    for line in [
        "dropped 1 (prompt empty or whitespace), e.g. " + f"{train} row 6 field 'prompt'",
        "dropped 1 (prompt missing or null)",
        "dropped 1 (duplicate (prompt, response) pair in train)",
        "dropped 1 (prompt also in eval (dropped from train))",
        "dropped 1 (train: prompt leaves no room for the response at max_length)",
    ]:
        assert line in proc.stdout
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert summary["dropped"] == {
        "prompt empty or whitespace": 1,
        "prompt missing or null": 1,
        "duplicate (prompt, response) pair in train": 1,
        "prompt also in eval (dropped from train)": 1,
        "train: prompt leaves no room for the response at max_length": 1,
    }
    assert summary["counts"]["train_examples"] == 7 and summary["counts"]["train_examples_tokenized"] == 6
    assert summary["counts"]["eval_examples"] == 1
    assert summary["sources"][train]["train_rows_read"] == 11
    assert len((tmp_path / "out" / "preview.jsonl").read_text().splitlines()) == 6


def test_hub_id_offline_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(cai_data.DataError) as e:
        load("some-org/some-dataset")
    msg = str(e.value)
    assert msg.startswith(
        "dataset 'some-org/some-dataset': not a local file or folder, and the Hugging Face Hub is unreachable"
    )
    assert "hf download some-org/some-dataset --repo-type dataset" in msg and "local folder" in msg
    assert "Traceback" not in msg


def test_recipe_stops_on_a_missing_column_with_a_message(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "answer": "a"}])
    cfg = tiny_config(tiny_model_dir, path, tmp_path / "out", prompt_column="question", response_column="answer")
    proc = run_recipe(cfg, tmp_path, "--dry_run", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"Data error: source {path} split 'train': required column(s) ['question'] missing" in proc.stderr
    assert "Columns found: ['answer', 'query']" in proc.stderr and "prompt_column" in proc.stderr


def test_recipe_stops_on_an_offline_hub_id_with_a_message(tmp_path, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, None, tmp_path / "out", datasets=[{"path": "some-org/some-dataset"}])
    proc = run_recipe(cfg, tmp_path, "--dry_run", check=False, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "'some-org/some-dataset' is not a local file or folder" in proc.stderr and "unreachable" in proc.stderr
    assert "hf download some-org/some-dataset --repo-type dataset" in proc.stderr
