"""Jailbreak templates: the bundled train and eval lists are disjoint and checked; `jailbreak_fraction` wraps a
seeded, counted share of a source's training prompts in the train templates and never touches eval rows."""

import json
from types import SimpleNamespace

import pytest
from conftest import toy_cai_rows, write_jsonl

import cai_data
import jailbreaks


def _script(path=None):
    return SimpleNamespace(dataset_name=path, dataset_config=None, dataset_train_split="train",
                           dataset_test_split="test")  # fmt: skip


def test_bundled_templates_are_disjoint_and_complete():
    t = jailbreaks.load()
    assert len(t["train"]) == 4 and len(t["eval"]) == 3
    assert not {x["id"] for x in t["train"]} & {x["id"] for x in t["eval"]}
    assert not {x["template"] for x in t["train"]} & {x["template"] for x in t["eval"]}
    for split in ("train", "eval"):
        assert {"role-play", "ignore-previous-instructions", "DAN-style"} <= {x["family"] for x in t[split]}
        assert all(x["template"].count("{prompt}") == 1 for x in t[split])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": [{"id": "a", "family": "f", "template": "Do it: {prompt}"}],
          "eval": [{"id": "b", "family": "f", "template": "do  IT: {prompt}"}]}, r"`eval`\[0\] \(b\): the same id or template is also in `train`"),  # noqa: E501
        ({"train": [{"id": "a", "family": "f", "template": "x {prompt}"}],
          "eval": [{"id": "a", "family": "f", "template": "y {prompt}"}]}, r"`eval`\[0\] \(a\): the same id or template"),
        ({"train": [{"id": "a", "family": "f", "template": "no placeholder"}],
          "eval": [{"id": "b", "family": "f", "template": "y {prompt}"}]}, r"`train`\[0\] \(a\): the template must contain"),
        ({"train": [], "eval": [{"id": "b", "family": "f", "template": "y {prompt}"}]}, r"`train` must be a non-empty list"),
        ({"train": [{"id": "a", "template": "x {prompt}"}],
          "eval": [{"id": "b", "family": "f", "template": "y {prompt}"}]}, r"`train`\[0\]: needs non-empty string keys"),
    ],
)  # fmt: skip
def test_bad_template_files_are_refused_with_the_entry(tmp_path, data, message):
    path = tmp_path / "jb.json"
    path.write_text(json.dumps(data))
    with pytest.raises(jailbreaks.JailbreakError, match=message):
        jailbreaks.load(str(path))
    with pytest.raises(jailbreaks.JailbreakError, match="not found"):
        jailbreaks.load(str(tmp_path / "missing.json"))


def test_wrap_keeps_braces_and_other_turns():
    t = {"id": "t", "family": "f", "template": "Stay in character. {prompt} Go."}
    assert jailbreaks.wrap(t, "What is {x}?") == "Stay in character. What is {x}? Go."
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert jailbreaks.wrap_messages(msgs, t) == [{"role": "system", "content": "S"},
                                                 {"role": "user", "content": "Stay in character. Q Go."}]  # fmt: skip
    assert msgs[1]["content"] == "Q"  # the input is not changed


def test_wrap_fraction_is_seeded_counted_and_uses_templates_in_turn():
    templates = jailbreaks.load()["train"]
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "row": i} for i in range(10)]
    out, n = jailbreaks.wrap_fraction(rows, 0.3, templates, seed=1)
    again, _ = jailbreaks.wrap_fraction(rows, 0.3, templates, seed=1)
    other, _ = jailbreaks.wrap_fraction(rows, 0.3, templates, seed=2)
    wrapped = [i for i, r in enumerate(out) if r["prompt"][0]["content"] != f"q{i}"]
    assert n == 3 and len(wrapped) == 3 and out == again
    assert wrapped != [i for i, r in enumerate(other) if r["prompt"][0]["content"] != f"q{i}"]
    assert [out[i]["prompt"][0]["content"] for i in wrapped] == [jailbreaks.wrap(templates[k], f"q{i}")
                                                                 for k, i in enumerate(wrapped)]  # fmt: skip
    assert [r["row"] for r in out] == list(range(10))
    assert jailbreaks.wrap_fraction(rows, 0.0, templates, 1) == (rows, 0)


def test_jailbreak_fraction_in_a_mixture(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_cai_rows(20))
    test_rows = toy_cai_rows(26)[20:]
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    benign = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"What is {i}+{i}?", "completion": f"{2 * i}."}
                                                 for i in range(10)])  # fmt: skip
    data_args = cai_data.CAIDataArguments(datasets=[
        {"data_files": {"train": train, "test": test}, "jailbreak_fraction": 0.25},
        {"path": benign, "eval_fraction": 0.2},
    ])  # fmt: skip
    train_rows, eval_rows, report = cai_data.load_pairs(_script(), data_args, seed=3)
    texts = {t["template"].split("{prompt}")[0] for t in jailbreaks.load()["train"]}
    eval_texts = {t["template"].split("{prompt}")[0] for t in jailbreaks.load()["eval"]}

    def user(e):
        return e["prompt"][-1]["content"]

    wrapped = [e for e in train_rows if any(user(e).startswith(t) for t in texts)]
    assert len(wrapped) == 5  # round(0.25 x 20 red-team training rows)
    assert all(e["source"] == train for e in wrapped)  # the benign source has no jailbreak_fraction
    assert not any(user(e).startswith(t) for e in train_rows for t in eval_texts)  # eval templates never trained
    assert not any(user(e).startswith(t) for e in eval_rows for t in texts | eval_texts)  # eval never wrapped
    assert sorted(user(e) for e in eval_rows if e["source"] == test) == sorted(r["prompt"] for r in test_rows)
    assert all(e["prompt"][0]["role"] == "system" for e in wrapped)  # the system prompt stays outside the wrapper
    assert report.changed["train prompts wrapped in a jailbreak template (jailbreak_fraction)"] == 5
    assert report.sources[train]["jailbreak_wrapped"] == 5
    again, _, _ = cai_data.load_pairs(_script(), data_args, seed=3)
    assert again.to_list() == train_rows.to_list()

    bad = cai_data.CAIDataArguments(datasets=[{"path": train, "jailbreak_fraction": 1.5}])
    with pytest.raises(cai_data.DataError, match=r"source .*train.jsonl: `jailbreak_fraction` must be a number from 0"):
        cai_data.load_pairs(_script(), bad)
