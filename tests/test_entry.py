"""Issue 13, nothing lost and nothing silent: the one entry layer of every program, range rules, data rules, and the
output guard. Table-driven; each data-loss case hashes the protected files before and after."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, RECIPES, ROOT, TOOLS, cai_row, run_recipe, tiny_config, toy_cai_rows, write_jsonl

import cai_data
import checks
import entry
import evaluate
import generate_revisions as gr
import run_dir
import sft

PROGRAMS = {
    "sft.py": RECIPES / "sft.py",
    "evaluate.py": RECIPES / "evaluate.py",
    "generate_revisions.py": RECIPES / "generate_revisions.py",
    "merge.py": TOOLS / "merge.py",
    "convert_gguf.py": TOOLS / "convert_gguf.py",
    "make_standin.py": TOOLS / "make_standin.py",
    "memory_estimate.py": TOOLS / "memory_estimate.py",
}


def hashes(*paths) -> dict:
    """sha1 of every file under the given files/folders."""
    out = {}
    for p in map(Path, paths):
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha1(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "cai.jsonl", toy_cai_rows(24))


# --------------------------------------------------------------------------------------------- no traceback, ever


def _cli(program, tmp, model, data):
    """(missing file, wrong type, out of range): the command-line arguments of each case, and the key it names."""
    out = str(tmp / "out")
    sft_base = ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", out, "--report_to", "none"]
    ev = ["--sft_model", model, "--base_model", model, "--test_file", data, "--output_dir", out]
    gen = ["--model_name_or_path", model, "--dataset_name", data, "--output_path", str(tmp / "gen.jsonl")]
    mem = ["--config", str(RECIPES / "mistral-7b" / "sft_qlora.yaml"), "--model_config", "MistralConfig"]
    return {
        "sft.py": ([*sft_base[:2], "--dataset_name", str(tmp / "missing.jsonl"), *sft_base[4:]], "dataset_name",
                   [*sft_base, "--learning_rate", "fast"], "learning_rate",
                   [*sft_base, "--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
        "evaluate.py": ([*ev, "--benign_file", str(tmp / "missing.jsonl")], "benign_file",
                        [*ev, "--max_length", "long"], "max_length",
                        [*ev, "--batch_size", "0"], "batch_size"),
        "generate_revisions.py": ([*gen, "--constitution_path", str(tmp / "missing.json")], "missing.json",
                                  [*gen, "--num_rounds", "two"], "num_rounds",
                                  [*gen, "--max_rows", "-1"], "max_rows"),
        "merge.py": (["--adapter", str(tmp / "missing"), "--output", out], "adapter",
                     ["--adapter", model, "--output", out, "--overwrite_output_dir", "maybe"], "overwrite_output_dir",
                     ["--adapter", model, "--output", out, "--dtype", "float8"], "dtype"),
        "convert_gguf.py": (["--gguf_dir", str(tmp / "missing"), "--output", out], "gguf_dir",
                            ["--output", out, "--overwrite_output_dir", "maybe"], "overwrite_output_dir",
                            ["--output", data], "output"),
        "make_standin.py": (["--data_file", str(tmp / "missing.jsonl"), "--output", out], "data_file",
                            ["--vocab_size", "big", "--output", out], "vocab_size",
                            ["--vocab_size", "10", "--output", out], "vocab_size"),
        "memory_estimate.py": (["--config", str(tmp / "missing.yaml")], "--config",
                               [*mem, "--num_gpus", "eight"], "num_gpus",
                               [*mem, "--num_gpus", "0"], "num_gpus"),
    }[program]


@pytest.mark.parametrize("case", ["missing file", "wrong type", "out of range"])
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_every_program_says_what_is_wrong_without_a_traceback(program, case, tiny_model_dir, data_file, tmp_path):
    cases = _cli(program, tmp_path, tiny_model_dir, data_file)
    k = ["missing file", "wrong type", "out of range"].index(case)
    args, key = cases[2 * k], cases[2 * k + 1]
    before = hashes(tiny_model_dir, data_file)
    proc = subprocess.run([PYTHON, str(PROGRAMS[program]), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert key in proc.stderr, proc.stderr[-3000:]
    assert hashes(tiny_model_dir, data_file) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "gen.jsonl").exists()


# --------------------------------------------------------------------------------------------- the parser wrapper


def _parsers():
    from trl import TrlParser

    import make_standin
    import merge

    return {"sft.py": (sft.make_parser, sft.rules), "evaluate.py": (lambda: TrlParser((evaluate.EvalArguments,)),
                                                                    evaluate.rules),
            "generate_revisions.py": (gr.make_parser, gr.rules), "merge.py": (merge.make_parser, merge.problems),
            "make_standin.py": (lambda: TrlParser((make_standin.StandinArguments,)), make_standin.problems)}


# program: (YAML text, key the message names, text it contains)
PARSE_CASES = {
    "duplicate key sft": ("sft.py", "learning_rate: 1.0e-4\nmax_steps: 3\nlearning_rate: 2.0e-4\n", "learning_rate",
                          "given twice (lines 1 and 3)"),
    "duplicate key evaluate": ("evaluate.py", "batch_size: 2\nbatch_size: 4\n", "batch_size", "lines 1 and 2"),
    "duplicate key generate": ("generate_revisions.py", "num_rounds: 1\nseed: 3\nnum_rounds: 2\n", "num_rounds",
                               "lines 1 and 3"),
    "duplicate key merge": ("merge.py", "dtype: auto\ndtype: float32\n", "dtype", "lines 1 and 2"),
    "unknown key evaluate": ("evaluate.py", "max_lenght: 10\n", "max_lenght", "Did you mean `max_length`?"),
    "unknown key generate": ("generate_revisions.py", "num_round: 2\n", "num_round", "Did you mean `num_rounds`?"),
    "unknown key merge": ("merge.py", "adaptor: x\n", "adaptor", "Did you mean `adapter`?"),
    "wrong type generate": ("generate_revisions.py", "batch_size: many\n", "batch_size", "expected int"),
    "not a choice merge": ("merge.py", "dtype: float64\n", "dtype", "not one of"),
    "range standin": ("make_standin.py", "vocab_size: 100\n", "vocab_size", ">= 260"),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_parser_wrapper_reports_by_key(case, tmp_path):
    program, text, key, expected = PARSE_CASES[case]
    make, rules = _parsers()[program]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(checks.ConfigError) as e:
        entry.parse(make(), ["--config", str(path)], rules)
    hit = [p for p in e.value.problems if p.startswith(key)]
    assert hit and expected in hit[0], e.value.problems


@pytest.mark.parametrize("program", ["evaluate.py", "generate_revisions.py", "merge.py"])
def test_config_equals_sign_and_unknown_option_for_every_program(program):
    make, rules = _parsers()[program]
    with pytest.raises(checks.ConfigError) as e:
        entry.parse(make(), ["--config=x.yaml", "--no_such_option", "1"], rules)
    assert any("--config: write `--config x.yaml`" in p for p in e.value.problems), e.value.problems
    assert any(p.startswith("no_such_option: unknown command-line option") for p in e.value.problems)


def test_one_bad_command_line_option_keeps_the_others():
    """The rules still see the valid command-line options: no spurious 'not set' for what was given."""
    make, rules = _parsers()["merge.py"]
    with pytest.raises(checks.ConfigError) as e:
        entry.parse(make(), ["--adapter", "/nonexistent/adapter", "--output", "/tmp/x", "--dtype", "int7"], rules)
    assert any(p.startswith("dtype:") and "not one of" in p for p in e.value.problems), e.value.problems
    assert not any("not set" in p for p in e.value.problems), e.value.problems
    assert any(p.startswith("adapter: /nonexistent/adapter") for p in e.value.problems), e.value.problems


# --------------------------------------------------------------------------------------------- ranges


# (program, key, value, range text); every other option valid
RANGE_CASES = [
    ("sft.py", "learning_rate", 0, "> 0"), ("sft.py", "learning_rate", -1e-4, "> 0"),
    ("sft.py", "num_train_epochs", 0, "zero steps"), ("sft.py", "max_steps", 0, "-1 (train num_train_epochs) or >= 1"),
    ("sft.py", "per_device_train_batch_size", 0, ">= 1"), ("sft.py", "gradient_accumulation_steps", 0, ">= 1"),
    ("sft.py", "lora_r", 0, ">= 1"), ("sft.py", "lora_alpha", 0, "> 0"), ("sft.py", "lora_dropout", 1.5, "< 1"),
    ("sft.py", "eval_fraction", -0.1, ">= 0"), ("sft.py", "eval_fraction", 1.5, ">= 0 and < 1"),
    ("sft.py", "max_eval_examples", 0, ">= 1"), ("sft.py", "eval_steps", 0, "> 0"), ("sft.py", "save_steps", 0, "> 0"),
    ("sft.py", "logging_steps", 0, "> 0"), ("sft.py", "max_length", 0, ">= 1"), ("sft.py", "global_batch_size", 0,
                                                                                  ">= 1"),
    ("sft.py", "learning_rate", float("nan"), "finite"),
    ("evaluate.py", "batch_size", 0, ">= 1"), ("evaluate.py", "max_examples", 0, ">= 1"),
    ("evaluate.py", "max_new_tokens", 0, ">= 1"), ("evaluate.py", "judge_concurrency", 0, ">= 1"),
    ("generate_revisions.py", "max_rows", -1, ">= 1"), ("generate_revisions.py", "num_rounds", 0, ">= 1"),
    ("generate_revisions.py", "temperature", -0.5, ">= 0"), ("generate_revisions.py", "num_workers", 0, ">= 1"),
]


@pytest.mark.parametrize("program,key,value,text", RANGE_CASES, ids=[f"{c[0]}-{c[1]}={c[2]}" for c in RANGE_CASES])
def test_out_of_range_value_named_with_key_value_and_range(program, key, value, text, tiny_model_dir, data_file,
                                                           tmp_path):
    base = {"sft.py": tiny_config(tiny_model_dir, data_file, tmp_path / "out", use_peft=True),
            "evaluate.py": {"sft_model": tiny_model_dir, "base_model": tiny_model_dir, "test_file": data_file,
                            "output_dir": str(tmp_path / "out")},
            "generate_revisions.py": {"model_name_or_path": tiny_model_dir, "dataset_name": data_file,
                                      "output_path": str(tmp_path / "g.jsonl")}}[program]
    if key == "num_train_epochs":
        base["max_steps"] = -1  # epochs decide: zero epochs is zero steps
    make, rules = _parsers()[program]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base, key: value}))
    with pytest.raises(checks.ConfigError) as e:
        entry.parse(make(), ["--config", str(path)], rules)
    assert len(e.value.problems) == 1, e.value.problems
    problem = e.value.problems[0]
    assert key in problem.split(":")[0] and text in problem and (str(value) in problem or "zero steps" in text), problem


def test_mixture_source_eval_fraction_out_of_range(tiny_model_dir, data_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, None, tmp_path / "out", datasets=[{"path": data_file, "eval_fraction": 1.5}])
    problems = checks.range_problems(cfg)
    assert problems == [p for p in problems if p.startswith("datasets[0].eval_fraction: 1.5 is out of range")] != []


def test_all_range_problems_reported_together(tiny_model_dir, data_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, data_file, tmp_path / "out", learning_rate=0, per_device_train_batch_size=0,
                      eval_fraction=1.5, use_peft=True, lora_dropout=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(checks.ConfigError) as e:
        entry.parse(sft.make_parser(), ["--config", str(path)], sft.rules)
    keys = {p.split(":")[0] for p in e.value.problems}
    assert {"learning_rate", "per_device_train_batch_size", "eval_fraction", "lora_dropout"} <= keys


def test_eval_strategy_without_eval_data_is_refused_before_weights_load(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, data_file, out, eval_fraction=0.0, eval_strategy="steps")
    proc = run_recipe(cfg, tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "eval_strategy: 'steps', but there is no eval data" in proc.stderr and "eval_strategy: no" in proc.stderr
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


# --------------------------------------------------------------------------------------------- data rules


def test_unrevised_and_empty_revisions_are_dropped_and_counted():
    rows = [cai_row("P0?", "A safe answer."), cai_row("P1?", "  Same bad answer. ", "Same bad answer."),
            cai_row("P2?", "   ")]
    report = cai_data.DataReport()
    out = cai_data.normalize(rows, {"path": "f.jsonl"}, "train", cai_data.CAIDataArguments(), report)
    assert [r["row"] for r in out] == [0]
    assert report.dropped["revision identical to init_response"] == 1
    assert report.dropped["response empty or whitespace"] == 1
    assert report.locations["revision identical to init_response"] == ["f.jsonl row 1 field 'revision_response'"]


def test_h4_rows_without_revision_response_name_the_missing_column():
    row = cai_row("P?", "R.")
    row.pop("revision_response")
    row.pop("messages")
    with pytest.raises(cai_data.DataError) as e:
        cai_data.normalize([row], {"path": "h4.jsonl"}, "train", cai_data.CAIDataArguments(), cai_data.DataReport())
    assert "`revision_response`" in str(e.value) and "cai-conversation-harmless" in str(e.value)


def test_unknown_schema_names_the_closest_schema_and_its_missing_column():
    with pytest.raises(cai_data.DataError) as e:
        cai_data.detect_format(["prompt", "answer"], {"path": "x.jsonl"})
    assert "['completion']" in str(e.value) or "['revision_response']" in str(e.value), str(e.value)


# --------------------------------------------------------------------------------------------- output guard


def _finished_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "data_summary.json").write_text('{"what": "the data this model was trained on"}')
    run_dir.mark_complete(str(path))
    return path


def test_dry_run_into_a_finished_model_changes_nothing(tiny_model_dir, data_file, tmp_path):
    out = _finished_model(tmp_path / "finished")
    before = hashes(out)
    for flags in (["--dry_run"], ["--dry_run", "--overwrite_output_dir"]):
        proc = run_recipe(tiny_config(tiny_model_dir, data_file, out), tmp_path, *flags, check=False)
        assert proc.returncode == 2 and "a dry run never writes into it" in proc.stderr, proc.stderr[-3000:]
    assert hashes(out) == before


# output_dir case -> (make the folder, message)
SFT_OUTPUT_CASES = {
    "holds a dataset": (lambda t, m, d: write_jsonl(t / "o" / "train.jsonl", [{"a": 1}]) and t / "o",
                        "did not write (train.jsonl)"),
    "is the base model": (lambda t, m, d: Path(m), "is the input model_name_or_path"),
    "inside the base model": (lambda t, m, d: Path(m) / "sub", "is inside the input model_name_or_path"),
    "is a file": (lambda t, m, d: Path(d), "is the input dataset_name"),
}


@pytest.mark.parametrize("case", list(SFT_OUTPUT_CASES))
def test_sft_output_guard(case, tiny_model_dir, data_file, tmp_path):
    make, text = SFT_OUTPUT_CASES[case]
    out = make(tmp_path, tiny_model_dir, data_file)
    cfg = tiny_config(tiny_model_dir, data_file, out)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(checks.ConfigError) as e:
        entry.parse(sft.make_parser(), ["--config", str(path), "--dry_run"], sft.rules)
    assert any(p.startswith("output_dir:") and text in p for p in e.value.problems), e.value.problems


def test_sft_dry_run_into_its_own_folder_twice_is_fine(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "dry"
    cfg = tiny_config(tiny_model_dir, data_file, out)
    for _ in range(2):
        proc = run_recipe(cfg, tmp_path, "--dry_run")
        assert "Dry run: wrote" in proc.stdout
    assert run_dir.owner_of(str(out)) == "sft.py" and (out / "preview.jsonl").exists()


# ----- generate_revisions.py


def _gen_args(prompts, output, **kw):
    return gr.GenerateArguments(dataset_name=str(prompts), output_path=str(output), backend="openai",
                                endpoint_url="http://127.0.0.1:9/v1", endpoint_model="none", progress=False, **kw)


def test_generate_never_truncates_a_file_it_did_not_write(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "P?"}])
    user = tmp_path / "mine.jsonl"
    user.write_text('{"a": 1}\n{"a": 2}')  # no final newline: the last row must survive
    before = hashes(user, prompts)
    for output in (user, Path(prompts)):
        with pytest.raises(checks.ConfigError) as e:
            gr.main(_gen_args(prompts, output))
        assert "output_path" in str(e.value.code)
    with pytest.raises(checks.ConfigError, match="is the input dataset_name"):
        gr.main(_gen_args(prompts, prompts, overwrite_output_dir=True))  # an input: never, even when asked
    assert hashes(user, prompts) == before


def test_generate_resume_checks_the_whole_file_before_cutting_its_last_line(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "P0?"}, {"prompt": "P1?"}])
    out = tmp_path / "gen.jsonl"
    out.write_text(json.dumps({"prompt_index": 0, "prompt": "other prompt"}) + "\n" + '{"prompt_ind')
    Path(gr.summary_path(str(out))).write_text(json.dumps({"output": str(out), "settings": {}}))
    before = hashes(out)
    args = _gen_args(prompts, out)
    with pytest.raises(cai_data.DataError, match="line 1: prompt_index 0 does not match"):
        gr.read_done(args, [(0, "P0?"), (1, "P1?")], {})
    assert hashes(out) == before  # refused before the cut-off line was touched
    out.write_text(json.dumps({"prompt_index": 0, "prompt": "P0?"}) + "\n" + '{"prompt_ind')
    done = gr.read_done(args, [(0, "P0?"), (1, "P1?")], {})
    assert list(done) == [0] and out.read_text().endswith("}\n")  # its own file: the cut line goes


# ----- evaluate.py


def test_evaluate_output_checks_run_before_any_model_loads(tiny_model_dir, data_file, tmp_path):
    a_file = tmp_path / "report.txt"
    a_file.write_text("not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "eval_report.json").write_text('{"mine": true}')
    before = hashes(a_file, foreign)
    for out, text in ((a_file, "is a file"), (foreign, "was not written by evaluate.py")):
        args = evaluate.EvalArguments(sft_model=tiny_model_dir, base_model=tiny_model_dir, test_file=data_file,
                                      output_dir=str(out))
        with pytest.raises(checks.ConfigError, match=text):
            evaluate.main(args)
    assert hashes(a_file, foreign) == before
    (foreign / "eval_report.json").write_text('{"m_sft": "an earlier evaluation"}')
    evaluate.check_args(evaluate.EvalArguments(sft_model=tiny_model_dir, base_model=tiny_model_dir,
                                               test_file=data_file, output_dir=str(foreign)))  # its own: replaced
    # the answers file is never one of the inputs
    data_before = hashes(data_file)
    args = evaluate.EvalArguments(sft_model=tiny_model_dir, base_model=tiny_model_dir, test_file=data_file,
                                  output_dir=str(foreign), generations_file=data_file)
    with pytest.raises(checks.ConfigError, match="generations_file: .* is the input test_file"):
        evaluate.main(args)
    assert hashes(data_file) == data_before


# ----- tools: convert_gguf.py, make_standin.py


def test_make_standin_refuses_a_folder_it_did_not_write(tmp_path):
    import make_standin

    model = _finished_model(tmp_path / "a-model")
    before = hashes(model)
    with pytest.raises(SystemExit) as e:
        make_standin.main(["--output", str(model), "--data_file", ""])
    assert e.value.code == 2 and hashes(model) == before


def test_convert_gguf_refuses_a_folder_it_did_not_write(tmp_path):
    import convert_gguf

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("{}\n")
    problems = convert_gguf.problems({"output": str(folder)})
    assert problems and "did not write (train.jsonl)" in problems[0]
    assert convert_gguf.problems({"output": str(folder), "overwrite_output_dir": True}) == []


def test_missing_model_folders_named_before_loading(tiny_model_dir, data_file, tmp_path):
    gen = gr.GenerateArguments(model_name_or_path=str(tmp_path / "no-model"), dataset_name=data_file,
                               output_path=str(tmp_path / "g.jsonl"))
    with pytest.raises(checks.ConfigError, match="model_name_or_path: .*no-model does not exist"):
        gr.validate(gen)
    ev = evaluate.EvalArguments(sft_model=tiny_model_dir, base_model=str(tmp_path / "no-base"), test_file=data_file,
                                output_dir=str(tmp_path / "out"))
    with pytest.raises(checks.ConfigError, match="base_model: .*no-base does not exist"):
        evaluate.check_args(ev)


def test_entry_turns_file_errors_into_a_message(capsys):
    def program():
        raise PermissionError(13, "Permission denied", "/root/x")

    with pytest.raises(SystemExit) as e:
        entry.guarded(program)
    assert e.value.code == 2 and "File error" in capsys.readouterr().err
