"""Golden masking: the trained tokens are exactly the response plus its end-of-turn token, for every schema
and several real chat templates; and examples that lose their response are dropped with a count."""

import copy
import json

import pytest
from conftest import TEMPLATES, build_tokenizer, cai_row, prepare_rows, write_jsonl

import chat_format

import cai_data

SYSTEM = "You are a helpful assistant aligned with constitutional principles."
PROMPT = "How do I pick a lock?"
RESPONSE = "I can't help with breaking into homes, but a locksmith can help you."


def prepare(tmp_path, rows, template="chatml", max_length=256, **data_kwargs):
    tok = build_tokenizer(template)
    original = copy.deepcopy(tok)  # the model's own template: the oracle (detect installs the recipe's wrap on tok)
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    data_args = cai_data.CAIDataArguments(eval_fraction=0.0, **data_kwargs)

    class Script:
        dataset_name, dataset_config, dataset_train_split, dataset_test_split = path, None, "train", "test"

    train, _, report = cai_data.load_pairs(Script, data_args)
    ds = prepare_rows(train, tok, max_length, report, system_prompt=data_args.system_prompt)
    return tok, ds, report, original


def trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])


def assert_golden(tok, ex, original, response=RESPONSE):
    ids, labels = ex["input_ids"], ex["labels"]
    eos = tok.eos_token
    # labels equal input_ids where trained, -100 elsewhere
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))
    # exactly the response plus its end-of-turn token, and that token is the last one of the sequence
    assert trained_text(tok, ex) == response + eos
    assert ids[-1] == tok.convert_tokens_to_ids(eos) and labels[-1] == ids[-1]
    # the trained tokens are one contiguous run at the end
    first = next(i for i, lab in enumerate(labels) if lab != -100)
    assert all(lab != -100 for lab in labels[first:])
    # the prompt tokens are the model's own template's inference prompt (a copy taken before the recipe's wrap)
    prompt_messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    expected = original.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, date_string="26 Jul 2024")["input_ids"]
    assert ids[:first] == expected


SCHEMAS = {
    "cai": cai_row(PROMPT, RESPONSE),
    "pc": {"prompt": PROMPT, "completion": RESPONSE},
    "messages": {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]},
    "hh": {"chosen": f"\n\nHuman: {PROMPT}\n\nAssistant: {RESPONSE}"},
    "mapped": {"question": PROMPT, "answer": RESPONSE},
}


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_golden_labels_every_schema(tmp_path, schema):
    kwargs = {"prompt_column": "question", "response_column": "answer"} if schema == "mapped" else {}
    tok, ds, _, original = prepare(tmp_path, [SCHEMAS[schema]], **kwargs)
    assert len(ds) == 1
    assert_golden(tok, ds[0], original)


@pytest.mark.parametrize("template", ["qwen2_5", "llama3", "phi3", "seed", "chatml"])
def test_golden_labels_real_templates(tmp_path, template):
    tok, ds, _, original = prepare(tmp_path, [cai_row(PROMPT, RESPONSE)], template=template)
    assert_golden(tok, ds[0], original)


def test_seed_template_starts_with_bos_and_trains_only_response(tmp_path):
    tok, ds, _, original = prepare(tmp_path, [cai_row(PROMPT, RESPONSE)], template="seed")
    ids = ds[0]["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<s>") and ds[0]["labels"][0] == -100
    assert tok.decode(ids).startswith("<s><|system|>\n" + SYSTEM + "\n<|user|>\n" + PROMPT + "\n<|assistant|>\n")
    assert trained_text(tok, ds[0]) == RESPONSE + "</s>"


def test_gemma_template_without_system_role(tmp_path):
    # Gemma's template rejects a system role: with the defaults the system prompt is folded into the user turn.
    tok, ds, _, original = prepare(tmp_path, [cai_row(PROMPT, RESPONSE)], template="gemma")
    ex = ds[0]
    assert trained_text(tok, ex) == RESPONSE + "<end_of_turn>"
    assert tok.decode(ex["input_ids"]).count("<start_of_turn>") == 2
    assert f"<start_of_turn>user\n{SYSTEM}\n\n{PROMPT}<end_of_turn>" in tok.decode(ex["input_ids"])


@pytest.mark.parametrize("off", [None, "null", "none", ""])
def test_system_prompt_off_words(tmp_path, off):
    tok, ds, _, original = prepare(tmp_path, [cai_row(PROMPT, RESPONSE)], template="gemma", system_prompt=off)
    assert SYSTEM not in tok.decode(ds[0]["input_ids"]) and "null" not in tok.decode(ds[0]["input_ids"])


def test_exact_golden_ids_chatml(tmp_path):
    tok, ds, _, original = prepare(tmp_path, [{"prompt": PROMPT, "completion": RESPONSE}])
    prompt_ids = original.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    response_ids = tok(RESPONSE, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert ds[0]["input_ids"] == prompt_ids + response_ids
    assert ds[0]["labels"] == [-100] * len(prompt_ids) + response_ids


def test_multi_turn_messages_train_only_last_assistant_turn(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": RESPONSE},
        ]
    }
    tok, ds, _, original = prepare(tmp_path, [row])
    assert trained_text(tok, ds[0]) == RESPONSE + "<|im_end|>"
    assert "hello there" in tok.decode(ds[0]["input_ids"])


def test_prompt_too_long_is_dropped_with_count(tmp_path):
    rows = [cai_row(PROMPT, RESPONSE), cai_row("why " * 300, RESPONSE)]
    _, ds, report, _ = prepare(tmp_path, rows, max_length=64)
    assert len(ds) == 1
    [(reason, n)] = [(r, n) for r, n in report.dropped.items() if "no room" in r]
    assert n == 1


def test_long_response_truncated_with_count(tmp_path):
    rows = [cai_row(PROMPT, "fox " * 200)]
    _, ds, report, _ = prepare(tmp_path, rows, max_length=64)
    assert len(ds[0]["input_ids"]) == 64
    assert report.changed["train: response truncated to max_length (no end-of-turn token)"] == 1


def test_nothing_left_stops_with_clear_error(tmp_path):
    with pytest.raises(cai_data.DataError, match="no train examples left"):
        prepare(tmp_path, [cai_row("why " * 300, RESPONSE)], max_length=32)


def test_template_without_eos_is_refused(tmp_path):
    tok = build_tokenizer("chatml")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(chat_format.TemplateError, match="never learns to stop"):
        chat_format.ChatFormat.detect(tok, SYSTEM)


def test_eval_split_by_unique_prompt(tmp_path):
    rows = [cai_row(f"prompt {i % 10}", f"answer {i}") for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    class Script:
        dataset_name, dataset_config, dataset_train_split, dataset_test_split = path, None, "train", "test"

    train, evals, _ = cai_data.load_pairs(Script, cai_data.CAIDataArguments(eval_fraction=0.3))
    train_p = {cai_data.prompt_key(e) for e in train}
    eval_p = {cai_data.prompt_key(e) for e in evals}
    assert train_p and eval_p and not train_p & eval_p
    assert len(eval_p) == 3
    assert len(train) + len(evals) == 40


def test_templates_table_covers_trl_files():
    for name, (file, _, _) in TEMPLATES.items():
        if file and not file.startswith("/"):
            assert (cai_data.os.path.exists(str(__import__("conftest").TRL_TEMPLATES / file))), name


def test_preview_is_json_per_example(tmp_path):
    tok, ds, _, original = prepare(tmp_path, [cai_row(PROMPT, RESPONSE)])
    line = json.dumps({"input_ids": ds[0]["input_ids"], "labels": ds[0]["labels"]})
    assert json.loads(line)["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
