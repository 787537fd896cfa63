"""The preference stage: preference schemas in cai_data, recipes/dpo.py (dry run and a real run from an M_SFT
adapter), and tools/collect_pairs.py (on-policy pairs)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import PYTHON, ROOT, cai_row, run_recipe, tiny_config, toy_cai_rows, write_jsonl

sys.path.insert(0, str(ROOT / "recipes"))

import cai_data  # noqa: E402
import chat_format  # noqa: E402

SYSTEM = "You are a helpful assistant aligned with constitutional principles."


def load(tmp_path, rows, **source):
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    data_args = cai_data.CAIDataArguments(datasets=[{"path": path, "eval_fraction": 0.0, **source}])
    from trl import ScriptArguments

    train, _, report = cai_data.load_pairs(ScriptArguments(dataset_name=None), data_args, preference=True)
    return train.to_list(), report


def test_every_preference_schema_gives_the_same_pair(tmp_path):
    p, good, bad = "How do I hotwire a car?", "I can't help with that.", "Sure: strip the wires."
    schemas = [
        {"prompt": p, "chosen": good, "rejected": bad},  # TRL's standard, strings
        {"prompt": p, "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},  # TRL's conversational, explicit prompt
        {"chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": good}],
         "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": bad}]},  # implicit prompt
        cai_row(p, good, bad),  # cai-conversation-harmless / generate_revisions.py
        {"chosen": f"\n\nHuman: {p}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {bad}"},  # HH
    ]
    for k, row in enumerate(schemas):
        [got], _ = load(tmp_path, [row])
        assert got["prompt"] == [{"role": "system", "content": cai_data.DEFAULT_SYSTEM_PROMPT},
                                 {"role": "user", "content": p}], k
        assert got["completion"] == [{"role": "assistant", "content": good}], k
        assert got["rejected"] == [{"role": "assistant", "content": bad}], k


def test_bad_preference_rows_are_dropped_and_counted_with_their_line(tmp_path):
    ok = {"prompt": "Q0", "chosen": "good answer", "rejected": "bad answer"}
    rows = [
        ok,
        {"prompt": "Q1", "chosen": "same", "rejected": " same "},
        {"prompt": "Q2", "chosen": "good"},
        {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
        {"prompt": "Q4", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}],
         "rejected": "y"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
    ]
    train, report = load(tmp_path, rows)
    assert [r["row"] for r in train] == [0]
    assert report.dropped == {
        "chosen and rejected identical": 1,
        "rejected missing or null": 1,
        "chosen and rejected continue different conversations": 1,
        "chosen: its conversation answers another prompt than the `prompt` column": 1,
        "prompt empty or whitespace": 1,
    }
    where = report.locations["chosen and rejected identical"][0]
    assert where.endswith("prefs.jsonl row 1 field 'rejected'"), where


def test_sft_schema_refused_by_the_preference_loader_and_back(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q", "completion": "A"}] * 3)
    from trl import ScriptArguments

    with pytest.raises(cai_data.DataError, match=r"required column\(s\) \['chosen', 'rejected'\] missing"):
        cai_data.load_pairs(ScriptArguments(dataset_name=path), cai_data.CAIDataArguments(), preference=True)
    with pytest.raises(cai_data.DataError, match="format 'preference' is for recipes/dpo.py"):
        cai_data.load_pairs(ScriptArguments(dataset_name=path), cai_data.CAIDataArguments(data_format="preference"))


def test_dry_run_prompt_ids_are_the_inference_ids_and_never_trained(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", toy_cai_rows(12))
    out = tmp_path / "dry"
    cfg = tiny_config(tiny_model_dir, data, out, data_format="preference", system_prompt=SYSTEM, eval_fraction=0.0,
                      eval_strategy="no")
    proc = run_recipe(cfg, tmp_path, "--dry_run", script="dpo.py")
    assert "the prompt is never trained" in proc.stdout
    rows = [json.loads(line) for line in (out / "preview.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    # Independent oracle: the model's own template (a fresh tokenizer, never wrapped) renders the inference prompt.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    originals = {r["prompt"]: r for r in toy_cai_rows(12)}
    for row in rows:
        for side in ("chosen", "rejected"):
            seq = row[side]
            n_prompt = next(i for i, lab in enumerate(seq["labels"]) if lab != -100)
            text = tok.decode(seq["input_ids"][:n_prompt])
            user = next(p for p in originals if p in text)
            expected = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                               add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            assert seq["input_ids"][:n_prompt] == list(expected)
            assert all(lab == -100 for lab in seq["labels"][:n_prompt])
            answer = originals[user]["revision_response" if side == "chosen" else "init_response"]
            trained = tok.decode([t for t in seq["labels"] if t != -100])
            assert trained.startswith(answer + "<|im_end|>"), trained


def test_dpo_from_an_sft_adapter_continues_it_against_m_sft(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", toy_cai_rows(16))
    sft_out = tmp_path / "sft"
    run_recipe(tiny_config(tiny_model_dir, data, sft_out, use_peft=True, lora_r=4, lora_alpha=8,
                           lora_target_modules=["q_proj", "v_proj"], eval_strategy="no"), tmp_path)
    dpo_out = tmp_path / "dpo"
    cfg = tiny_config(str(sft_out), data, dpo_out, data_format="preference", max_steps=3, learning_rate=1e-2,
                      eval_fraction=0.25, eval_steps=3, per_device_train_batch_size=2, beta=0.1,
                      no_repeat_ngram_size=4, eval_on_start=True)
    proc = run_recipe(cfg, tmp_path, script="dpo.py")
    assert f"LoRA adapter on {tiny_model_dir}" in proc.stdout and "reference model" in proc.stdout
    assert (dpo_out / "adapter_model.safetensors").is_file() and not (dpo_out / "ref").exists()
    adapter = json.loads((dpo_out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == tiny_model_dir and adapter["r"] == 4  # M_SFT's adapter, continued
    gen = json.loads((dpo_out / "generation_config.json").read_text())
    assert gen["no_repeat_ngram_size"] == 4
    card = (dpo_out / "README.md").read_text()
    assert "M_DPO" in card and str(sft_out) in card and tiny_model_dir in card and "beta: 0.1" in card
    assert "lora_r: 4" in card  # M_SFT's own adapter, continued (not the YAML's lora_r)
    assert json.loads((dpo_out / "cai_sft_complete.json").read_text())["complete"]
    history = json.loads((dpo_out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h][:1] == [0]  # eval_on_start: M_SFT is the "before"
    # The weights moved away from M_SFT's adapter.
    from safetensors.torch import load_file

    before, after = load_file(sft_out / "adapter_model.safetensors"), load_file(dpo_out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any((before[k] - after[k]).abs().max() > 0 for k in before)
    # replace_same_run: the same command replaces its own model; other settings are refused.
    refused = run_recipe({**cfg, "replace_same_run": True, "beta": 0.5}, tmp_path, script="dpo.py", check=False)
    assert refused.returncode == 2 and "other settings" in refused.stderr
    plain = run_recipe(cfg, tmp_path, script="dpo.py", check=False)
    assert plain.returncode == 2 and "already holds a finished model" in plain.stderr
    # evaluate.py puts M_DPO beside M_base and M_SFT: a third column, every answer of each model kept.
    benign = write_jsonl(tmp_path / "benign.jsonl", [{"prompt": f"Name a fruit {i}", "completion": "An apple."}
                                                     for i in range(3)])
    ev = {"sft_model": str(sft_out), "dpo_model": str(dpo_out), "output_dir": str(tmp_path / "eval"),
          "test_file": data, "benign_file": benign, "max_generations": 2, "max_new_tokens": 4, "max_examples": 4}
    proc = run_recipe(ev, tmp_path, script="evaluate.py")
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["m_dpo"] == str(dpo_out)
    assert list(report["metrics"]["system"]) == ["M_base", "M_SFT", "M_DPO"]
    assert "balanced_refusal_accuracy" in report["metrics"]["no_system"]["M_DPO"]
    assert all("M_DPO" in g and "declined" in g["M_DPO"] for g in report["generations"])
    assert report["settings"]["generation"]["M_DPO"]["no_repeat_ngram_size"] == 4  # saved with M_DPO
    md = (tmp_path / "eval" / "eval_report.md").read_text()
    assert md.startswith("# CAI SFT evaluation: M_base vs M_SFT vs M_DPO") and "| # | prompt | M_base | M_SFT | M_DPO |" in md
    assert "M_DPO (system prompt)" in proc.stdout


def test_qlora_from_a_full_m_sft_loads_it_in_4_bit(tmp_path, tiny_model_dir):
    """A full M_SFT with use_peft + load_in_4bit: DPOTrainer loads it quantized (bitsandbytes' CPU backend here).
    The policy's log-probabilities of the first batch differ from the same run in full precision; an ignored
    load_in_4bit (the recipe once built the model kwargs without it) reproduces them exactly."""
    data = write_jsonl(tmp_path / "d.jsonl", toy_cai_rows(8))
    logps = {}
    for name, quant in (("full", {}), ("qlora", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})):
        out = tmp_path / name
        cfg = tiny_config(tiny_model_dir, data, out, data_format="preference", max_steps=1, eval_strategy="no",
                          per_device_train_batch_size=2, use_peft=True, lora_r=4, lora_alpha=8,
                          lora_target_modules=["q_proj", "v_proj"], **quant)
        run_recipe(cfg, tmp_path, script="dpo.py")
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        logps[name] = history[0]["logps/chosen"]
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # a new adapter on M_SFT
    assert abs(logps["full"] - logps["qlora"]) > 1e-4, logps


def test_collect_pairs_turns_own_refusals_and_compliances_into_rejected(tmp_path, tiny_model_dir):
    benign = write_jsonl(tmp_path / "benign.jsonl", [{"prompt": f"Name a fruit {i}", "completion": "An apple."}
                                                     for i in range(4)])
    red = write_jsonl(tmp_path / "red.jsonl", toy_cai_rows(3))
    out = tmp_path / "pairs.jsonl"
    cmd = [PYTHON, str(ROOT / "tools" / "collect_pairs.py"), "--model", tiny_model_dir, "--benign_file", benign,
           "--redteam_file", red, "--output", str(out), "--max_new_tokens", "8", "--redteam_opening_tokens",
           "3", "--batch_size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    # A random tiny model never opens with a refusal: every red-team answer is a compliance; no benign pair.
    kinds = summary["kinds"]
    assert kinds == {"red-team: own compliance": 3, "red-team: critique pass": 3}, kinds
    assert summary["answers"] == {"benign": {"prompts": 4, "answers": 4, "declined": 0},
                                 "redteam": {"prompts": 3, "answers": 3, "declined": 0}}
    for p in pairs:
        assert p["chosen"].startswith("I can't help with breaking into homes")
    # The pairs' answers were written out past the 3-token opening, to the same text as one 8-token pass (which is
    # also a re-run: it replaces its own output).
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    compliances = [p["rejected"] for p in pairs if p["kind"] == "red-team: own compliance"]
    assert max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in compliances) > 3, compliances
    one_pass = subprocess.run([*cmd, "--redteam_opening_tokens", "null"], capture_output=True, text=True, cwd=ROOT,
                              timeout=600)
    assert one_pass.returncode == 0, one_pass.stderr[-3000:]
    assert [json.loads(line) for line in out.read_text().splitlines()] == pairs
    # A file it did not write is refused.
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text("keep me\n")
    cmd[cmd.index(str(out))] = str(foreign)
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert refused.returncode == 2 and "was not written by collect_pairs.py" in refused.stdout + refused.stderr
    assert foreign.read_text() == "keep me\n"


def test_sampled_red_team_answers_give_one_pair_per_distinct_compliance(tmp_path, tiny_model_dir):
    """redteam_samples 3 at a temperature: each red-team prompt is answered 3 times, sampled; each distinct
    compliance is a pair (a random tiny model never declines, and its samples differ), and the seed repeats them."""
    red = write_jsonl(tmp_path / "red.jsonl", toy_cai_rows(2))
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        cmd = [PYTHON, str(ROOT / "tools" / "collect_pairs.py"), "--model", tiny_model_dir, "--benign_file", "null",
               "--redteam_file", red, "--output", str(out), "--max_new_tokens", "8", "--redteam_opening_tokens",
               "null", "--redteam_samples", "3", "--redteam_temperature", "1.0", "--batch_size", "4"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append([json.loads(line) for line in out.read_text().splitlines()])
        summary = json.loads((tmp_path / f"{name}.jsonl.summary.json").read_text())
        assert summary["answers"] == {"redteam": {"prompts": 2, "answers": 6, "declined": 0}}
        assert summary["kinds"] == {"red-team: own compliance": 6, "red-team: critique pass": 2}, summary["kinds"]
    own = [p["rejected"] for p in runs[0] if p["kind"] == "red-team: own compliance"]
    assert len(set(own)) == 6, own
    assert runs[0] == runs[1]
    sys.path.insert(0, str(ROOT / "tools"))
    import collect_pairs

    greedy = {"model": tiny_model_dir, "redteam_file": red, "output": str(tmp_path / "c.jsonl"), "redteam_samples": 3}
    assert any("need redteam_temperature" in p for p in collect_pairs.problems(greedy))
    assert not collect_pairs.problems({**greedy, "redteam_temperature": 1.0})


def test_sampled_answers_repeating_a_compliance_give_one_pair(tmp_path, monkeypatch):
    """collect_pairs.collect with generation stubbed: 3 sampled answers per red-team prompt, two of them the same
    compliance and one a refusal, give one own-compliance pair per distinct compliance; sampling reaches generation
    and the answers come in one pass to max_new_tokens."""
    sys.path.insert(0, str(ROOT / "tools"))
    import collect_pairs
    import generation

    red = write_jsonl(tmp_path / "red.jsonl", toy_cai_rows(2))
    calls = []

    def fake(model, tok, convs, max_new_tokens, batch_size, **kw):
        calls.append((max_new_tokens, len(convs), kw.get("do_sample"), kw.get("temperature")))
        # the prompts come as [row 0, row 1] x 3: row 0 says "one", "one", a refusal; row 1 a refusal, "two", another
        texts = ["Sure, step one.", "I can't help with that.", "Sure, step one.", "Sure, step two.",
                 "I can't help with that.", "I won't do that."]
        return [{"answer": t, "stopped_cleanly": True, "new_tokens": 3} for t in texts]

    monkeypatch.setattr(generation, "generate_answers", fake)
    monkeypatch.setattr(collect_pairs, "load", lambda args: (None, None))
    out = tmp_path / "pairs.jsonl"
    args = collect_pairs.PairArguments(model="m", benign_file=None, redteam_file=red, output=str(out),
                                       max_new_tokens=32, redteam_opening_tokens=4, redteam_samples=3,
                                       redteam_temperature=0.7)
    collect_pairs.collect(args)
    assert calls == [(32, 6, True, 0.7)]
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    own = [(p["from_row"], p["rejected"]) for p in pairs if p["kind"] == "red-team: own compliance"]
    assert own == [(0, "Sure, step one."), (1, "Sure, step two.")], own  # row 0 said it twice: one pair
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert summary["answers"] == {"redteam": {"prompts": 2, "answers": 6, "declined": 3}}
    assert summary["redteam_answers"] == {"temperature": 0.7, "samples_per_prompt": 3, "seed": 42}


def test_two_pass_answers_write_out_only_the_answers_that_make_pairs(monkeypatch):
    """collect_pairs.answers with generation stubbed: the opening pass judges every answer; only those whose verdict
    makes a pair (benign: a refusal; red-team: a compliance, or any answer with own_refusal_pairs) and that did not
    stop within the opening are generated again in full, and their verdict is taken from the full answer."""
    sys.path.insert(0, str(ROOT / "tools"))
    import collect_pairs
    import generation

    full = {"b0": "I can't help with that. Try a shop.", "b1": "Apples are red.", "b2": "I won't help with that.",
            "r0": "Sure, here is how you do it step by step.", "r1": "I can't help with that, sorry.",
            "r2": "As an AI language model, I think this is fine, but here is how."}
    opening = {"b0": "I can't help with", "b1": "Apples are", "b2": "I won't help with that.", "r0": "Sure, here is",
               "r1": "I can't help with", "r2": "As an AI language model"}
    calls = []

    def fake(model, tok, convs, max_new_tokens, batch_size, **kw):
        names = [c[-1]["content"] for c in convs]
        calls.append((max_new_tokens, names))
        texts = full if max_new_tokens == 32 else opening
        return [{"answer": texts[n], "stopped_cleanly": n == "b2" or max_new_tokens == 32, "new_tokens": 1}
                for n in names]

    monkeypatch.setattr(generation, "generate_answers", fake)
    convs = {k: [[{"role": "user", "content": f"{k}{i}"}] for i in range(3)] for k in "br"}
    args = collect_pairs.PairArguments(max_new_tokens=32, benign_opening_tokens=4, redteam_opening_tokens=4)
    said, declined = collect_pairs.answers(None, None, convs["b"], "benign", args)
    assert calls == [(4, ["b0", "b1", "b2"]), (32, ["b0"])]  # b1 answered: no pair; b2 stopped within the opening
    assert said == [full["b0"], opening["b1"], opening["b2"]] and declined == [True, False, True]
    calls.clear()
    said, declined = collect_pairs.answers(None, None, convs["r"], "redteam", args)
    assert calls == [(4, ["r0", "r1", "r2"]), (32, ["r0"])]  # only the compliance goes on
    assert declined == [False, True, True]  # r2 is judged on its opening (documented: measured, not guaranteed)
    calls.clear()
    args.own_refusal_pairs = True  # every red-team answer makes a pair: all go on, judged in full
    said, declined = collect_pairs.answers(None, None, convs["r"], "redteam", args)
    assert calls == [(4, ["r0", "r1", "r2"]), (32, ["r0", "r1", "r2"])] and declined == [False, True, False]
    calls.clear()
    args.redteam_opening_tokens = None  # one pass
    collect_pairs.answers(None, None, convs["r"], "redteam", args)
    assert calls == [(32, ["r0", "r1", "r2"])]


def test_collect_pairs_refuses_an_opening_of_no_tokens(tmp_path, tiny_model_dir):
    """An opening of 0 tokens (or a sample of 0 prompts) is a configuration problem named with its key, before any
    model is loaded; null is the documented way to ask for one pass (or every prompt)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import collect_pairs
    from dataclasses import asdict

    base = {"model": tiny_model_dir, "output": str(tmp_path / "pairs.jsonl")}
    assert collect_pairs.problems(asdict(collect_pairs.PairArguments(**base))) == []
    for key in ("redteam_opening_tokens", "benign_opening_tokens", "max_benign", "max_redteam"):
        found = collect_pairs.problems(asdict(collect_pairs.PairArguments(**base, **{key: 0})))
        assert len(found) == 1 and found[0].startswith(f"{key}: 0 is out of range"), found


def test_refusal_pairs_from_collect_pairs_reach_dpo(tmp_path):
    """The collector's output schema is one dpo.py reads: prompt/chosen/rejected strings plus bookkeeping columns."""
    rows = [{"from_file": "x", "from_row": i, "prompt": f"Name a fruit {i}", "chosen": "An apple.", "rejected":
             "I won't help with that.", "kind": "benign: own refusal"} for i in range(3)]
    train, report = load(tmp_path, rows)
    assert len(train) == 3 and not report.dropped


@pytest.mark.parametrize("target", ["dpo-7b", "dpo-7b-full"])
def test_make_dpo_7b_dry_run(tmp_path, target):
    """`make dpo-7b DRY_RUN=1` (QLoRA) and `dpo-7b-full DRY_RUN=1` (ZeRO-3): the 7B preference YAMLs, offline, on
    Mistral-7B's config and the stand-in tokenizer, with the bundled critique pairs."""
    standin, out = tmp_path / "standin", tmp_path / "dry"
    proc = subprocess.run(
        ["make", "-s", target, "DRY_RUN=1", f"PY={PYTHON}", f"STANDIN_7B={standin}", f"ARGS=--output_dir {out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not any(standin.glob("*.safetensors")) and "no weights were loaded" in proc.stdout
    rows = [json.loads(line) for line in (out / "preview.jsonl").read_text().splitlines()]
    assert len(rows) == 200
    for row in rows:  # both answers closed by </s> (id 2), the prompt (from <s>, id 1) never trained
        for side in ("chosen", "rejected"):
            seq = row[side]
            assert seq["input_ids"][0] == 1 and seq["labels"][0] == -100
            assert seq["input_ids"][-1] == 2 and seq["labels"][-1] == 2
