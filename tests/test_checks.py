"""Config validation (one message per problem, naming the key and the fix), the overwrite guard, safe defaults.

Most cases parse in-process with the recipe's own parser (`entry.parse(sft.make_parser(), argv, sft.rules)`), which is
what `python recipes/sft.py` runs first; a few run the recipe as users do, in a subprocess.
"""

import json
import os
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tokenizer, run_recipe, tiny_config, toy_cai_rows, write_jsonl

import checks
import entry
import run_dir
import sft


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "cai.jsonl", toy_cai_rows(24))


def _parse(cfg: dict, tmp_path, *cli: str):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return entry.parse(sft.make_parser(), ["--config", str(path), *cli], sft.rules)


def _problems(cfg: dict, tmp_path, *cli: str) -> list[str]:
    with pytest.raises(checks.ConfigError) as e:
        _parse(cfg, tmp_path, *cli)
    assert str(e.value).startswith("Configuration problems")
    return e.value.problems


def _zero3(tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return {"deepspeed": str(path)}


def _pickle_only_model(tmp_path):
    src = Path(tmp_path / "model")
    from conftest import build_model_dir

    build_model_dir(src)
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    return {"model_name_or_path": str(src)}


def _folder_without_config(tmp_path):
    (tmp_path / "empty_model").mkdir()
    return {"model_name_or_path": str(tmp_path / "empty_model")}


def _finished_output_dir(tmp_path):
    out = tmp_path / "finished"
    out.mkdir()
    run_dir.mark_complete(str(out))
    return {"output_dir": str(out)}


BEST = {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps",
        "save_steps": 2}
QLORA = {"use_peft": True, "load_in_4bit": True, "dtype": "bfloat16"}
# id: (YAML overrides (a dict, or a function of tmp_path returning one), extra CLI, environment, key, text)
CASES = {
    "unknown key": ({"lerning_rate": 1e-4}, [], {}, "lerning_rate", "Did you mean `learning_rate`?"),
    "unknown option": ({}, ["--lerning_rate", "1e-4"], {}, "lerning_rate", "Did you mean `learning_rate`?"),
    "float given text": ({"learning_rate": "abc"}, [], {}, "learning_rate", "expected float, got 'abc'"),
    "int given text": ({"max_steps": "ten"}, [], {}, "max_steps", "expected int, got 'ten'"),
    "int given fraction": ({"max_steps": 2.5}, [], {}, "max_steps", "expected int"),
    "bool given text": ({"use_peft": "maybe"}, [], {}, "use_peft", "expected true/false"),
    "not a choice": ({"lr_scheduler_type": "cosin"}, [], {}, "lr_scheduler_type", "Did you mean `cosine`?"),
    "bad command-line value": ({}, ["--max_steps", "x"], {}, "max_steps", "expected int, got 'x'"),
    "4-bit without LoRA": ({"load_in_4bit": True}, [], {}, "load_in_4bit", "use_peft: true"),
    "8-bit without LoRA": ({"load_in_8bit": True}, [], {}, "load_in_8bit", "use_peft: true"),
    "4-bit and 8-bit": ({"load_in_4bit": True, "load_in_8bit": True, "use_peft": True}, [], {}, "load_in_8bit",
                        "Keep one"),
    "LoRA on lm_head": ({"use_peft": True, "lora_target_modules": ["q_proj", "lm_head"]}, [], {},
                        "lora_target_modules", "lm_head"),
    "QLoRA + ZeRO-3 file": (lambda t: {**QLORA, **_zero3(t)}, [], {}, "bnb_4bit_quant_storage",
                            "`bnb_4bit_quant_storage: bfloat16`"),
    "QLoRA + ZeRO-3 launch": (QLORA, [], {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
                              "bnb_4bit_quant_storage", "DeepSpeed ZeRO-3"),
    "QLoRA + FSDP": ({**QLORA, "fsdp": "full_shard"}, [], {}, "bnb_4bit_quant_storage", "FSDP"),
    "QLoRA fp32 + FSDP": ({**QLORA, "dtype": "float32", "fsdp": "full_shard"}, [], {}, "bnb_4bit_quant_storage",
                          "`bnb_4bit_quant_storage: float32` equal to `dtype: float32`"),
    "QLoRA + FSDP launch": ({**QLORA, "bnb_4bit_quant_storage": "float16"}, [], {"ACCELERATE_USE_FSDP": "true"},
                            "bnb_4bit_quant_storage", "equal to `dtype: bfloat16`"),
    "best model, no eval": ({**BEST, "eval_strategy": "no", "save_strategy": "no"}, [], {}, "load_best_model_at_end",
                            "eval_strategy: steps"),
    "best model, strategies differ": ({**BEST, "save_strategy": "epoch"}, [], {}, "save_strategy",
                                      "save_strategy: steps"),
    "best model, save_steps": ({**BEST, "eval_steps": 4, "save_steps": 6}, [], {}, "save_steps",
                               "not a multiple of eval_steps 4"),
    "best metric not logged": ({**BEST, "metric_for_best_model": "eval_acc"}, [], {}, "metric_for_best_model",
                               "'eval_acc' is not a metric"),
    "early stopping, no metric": ({"early_stopping_patience": 2}, [], {}, "early_stopping_patience",
                                  "metric_for_best_model: eval_loss"),
    "bf16 without support": ({"bf16": True}, [], {}, "bf16", "use_cpu: true"),
    "model folder missing": ({"model_name_or_path": "./models/does-not-exist"}, [], {}, "model_name_or_path",
                             "does not exist"),
    "model folder without config": (_folder_without_config, [], {}, "model_name_or_path",
                                    "no config.json"),
    "model with pickle weights only": (_pickle_only_model, [], {}, "model_name_or_path", "safetensors only"),
    "hub model offline": ({"model_name_or_path": "someorg/some-model"}, [], {"HF_HUB_OFFLINE": "1"},
                          "model_name_or_path", "--local-dir models/some-model"),
    "data file missing": ({"dataset_name": "data/missing.jsonl"}, [], {}, "dataset_name", "does not exist"),
    "hub dataset offline": ({"dataset_name": "someorg/some-data"}, [], {"HF_HUB_OFFLINE": "1"}, "dataset_name",
                            "--repo-type dataset"),
    "mixture file missing": ({"datasets": [{"data_files": {"train": "nope.jsonl"}}]}, [], {},
                             "datasets[0].data_files", "nope.jsonl does not exist"),
    "global batch not divisible": ({"global_batch_size": 10}, [], {}, "global_batch_size", "multiple of"),
    "token in config": ({"hub_token": "hf_abc"}, [], {}, "hub_token", "HF_TOKEN"),
    "resume path missing": ({"resume_from_checkpoint": "nope/checkpoint-3"}, [], {}, "resume_from_checkpoint",
                            "not a folder"),
    "finished output_dir": (_finished_output_dir, [], {}, "output_dir", "--overwrite_output_dir"),
    "refused by TrainingArguments": ({"warmup_steps": -1}, [], {}, "warmup_steps", "Fix `warmup_steps`"),
}


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No cached hub files, no launcher variables, and a machine without bf16 (so cases read alike everywhere)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                "ACCELERATE_USE_FSDP", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(checks, "bf16_available", lambda: False)
    return monkeypatch


@pytest.mark.parametrize("case", list(CASES))
def test_each_problem_named_with_its_key(case, tiny_model_dir, data_file, tmp_path, isolated):
    overrides, cli, env, key, text = CASES[case]
    for var, value in env.items():
        isolated.setenv(var, value)
    cfg = tiny_config(tiny_model_dir, data_file, tmp_path / "out")
    cfg.update(overrides(tmp_path) if callable(overrides) else overrides)
    if "datasets" in cfg:
        cfg.pop("dataset_name")
    problems = _problems(cfg, tmp_path, *cli)
    assert len(problems) == 1, problems
    assert key in problems[0].split(":")[0], problems[0]
    assert text in problems[0], problems[0]


def test_valid_config_parses_with_safe_defaults(tiny_model_dir, data_file, tmp_path, isolated):
    script_args, training_args, model_args, data_args, recipe_args = _parse(
        tiny_config(tiny_model_dir, data_file, tmp_path / "out"), tmp_path
    )
    assert training_args.trust_remote_code is False and recipe_args.overwrite_output_dir is False
    assert training_args.hub_token is None and training_args.max_steps == 4
    checks.validate(script_args, training_args, model_args, data_args, recipe_args)  # no problem either


def test_all_problems_reported_together(tiny_model_dir, data_file, tmp_path, isolated):
    cfg = tiny_config(tiny_model_dir, data_file, tmp_path / "out", lerning_rate=1, load_in_4bit=True,
                      max_steps="ten", model_name_or_path="models/nope")
    problems = _problems(cfg, tmp_path)
    assert sorted(p.split(":")[0] for p in problems) == ["lerning_rate", "load_in_4bit", "max_steps",
                                                         "model_name_or_path"]


def test_config_with_equals_sign(tmp_path):
    with pytest.raises(checks.ConfigError, match=r"--config: write `--config x.yaml` \(a space, not `=`\)"):
        entry.parse(sft.make_parser(), ["--config=x.yaml"], sft.rules)


def test_finished_output_dir_accepted_with_flag(tiny_model_dir, data_file, tmp_path, isolated):
    cfg = {**tiny_config(tiny_model_dir, data_file, tmp_path / "out"), **_finished_output_dir(tmp_path)}
    checks.validate(*_parse(cfg, tmp_path, "--overwrite_output_dir"), also=sft.output_problems)  # main() checks again


@pytest.mark.parametrize("flags", [["--dry_run"], ["--dry_run", "--overwrite_output_dir"]])
def test_dry_run_never_writes_into_a_finished_model(flags, tiny_model_dir, data_file, tmp_path, isolated):
    cfg = {**tiny_config(tiny_model_dir, data_file, tmp_path / "out"), **_finished_output_dir(tmp_path)}
    problems = _problems(cfg, tmp_path, *flags)
    assert len(problems) == 1 and "a dry run never writes into it" in problems[0], problems


@pytest.mark.parametrize("case", ["4-bit without LoRA", "LoRA on lm_head", "best model, no eval",
                                  "best metric not logged", "global batch not divisible", "token in config",
                                  "model folder missing", "finished output_dir"])
def test_validate_on_dataclasses_says_the_same(case, tiny_model_dir, data_file, tmp_path, isolated):
    """`checks.validate` (called by main() for users who build the dataclasses themselves) applies the same rules."""
    overrides, _, _, key, text = CASES[case]
    cfg = tiny_config(tiny_model_dir, data_file, tmp_path / "out")
    cfg.update(overrides(tmp_path) if callable(overrides) else overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = sft.make_parser().parse_args_and_config(["--config", str(path)])  # TRL's parser: no checks of ours
    with pytest.raises(checks.ConfigError) as e:
        checks.validate(*args, also=sft.output_problems)
    assert any(key in p.split(":")[0] and text in p for p in e.value.problems), e.value.problems


def test_max_length_below_template_overhead():
    import chat_format

    fmt = chat_format.ChatFormat.detect(build_tokenizer("chatml"), "You are a helpful assistant.")
    overhead = fmt.overhead("You are a helpful assistant.")
    assert overhead > 10  # three ChatML turns and the system prompt
    checks.check_max_length(overhead + 1, overhead)
    checks.check_max_length(None, overhead)
    with pytest.raises(checks.ConfigError) as e:
        checks.check_max_length(overhead, overhead)
    assert e.value.problems[0].startswith(f"max_length: {overhead} leaves no room") and "system_prompt" in str(e.value)


# --------------------------------------------------------------------------------------------- as users run it

PLANTED = {
    "HF_TOKEN": "hf_PlantedTokenValue0123456789abcdef",
    "HUGGING_FACE_HUB_TOKEN": "hf_PlantedLegacyToken0123456789abcd",
    "WANDB_API_KEY": "wandb_PlantedKey0123456789abcdef0123",
    "OPENAI_API_KEY": "sk-PlantedOpenAIKey0123456789abcdef",
}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, data_file, tmp_path_factory):
    """A short finished run with checkpoints (training_args.bin in each), tokens planted in the environment."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(tiny_model_dir, data_file, tmp / "out", max_steps=2, save_strategy="steps", save_steps=1)
    proc = run_recipe(cfg, tmp, env=PLANTED)
    return types.SimpleNamespace(cfg=cfg, tmp=tmp, out=tmp / "out", proc=proc)


def test_planted_tokens_never_written_or_printed(finished_run):
    files = [p for p in finished_run.out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and any(p.name == "README.md" for p in files)
    for value in PLANTED.values():
        assert value not in finished_run.proc.stdout + finished_run.proc.stderr
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{value} found in {path}"
    args = torch.load(finished_run.out / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert args.hub_token is None


def test_finished_run_is_not_overwritten_silently(finished_run):
    out, weights = finished_run.out, finished_run.out / "model.safetensors"
    assert run_dir.is_complete(out) and not (out / run_dir.FINAL_TMP).exists()
    before = weights.read_bytes()

    refused = run_recipe(finished_run.cfg, finished_run.tmp, check=False)
    assert refused.returncode != 0
    assert "output_dir:" in refused.stderr and "--overwrite_output_dir" in refused.stderr, refused.stderr[-2000:]
    assert weights.read_bytes() == before and run_dir.is_complete(out)

    again = run_recipe(finished_run.cfg, finished_run.tmp, "--overwrite_output_dir", "--save_strategy", "no",
                       "--learning_rate", "5e-3")
    assert "--overwrite_output_dir: starting over" in again.stdout
    assert not list(out.glob("checkpoint-*")), "the old run's checkpoints must not be resumed by a relaunch"
    assert run_dir.is_complete(out) and weights.read_bytes() != before
    marker = json.loads((out / run_dir.COMPLETE_MARKER).read_text())
    assert marker["files"]["model.safetensors"] == weights.stat().st_size
    assert os.path.getmtime(out / run_dir.COMPLETE_MARKER) >= max(
        os.path.getmtime(out / n) for n in marker["files"]
    )


def test_cli_reports_config_problems_before_loading(tiny_model_dir, data_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, data_file, tmp_path / "out", lerning_rate=1e-4, max_steps="ten",
                      use_peft=True, lora_target_modules=["q_proj", "lm_head"])
    proc = run_recipe(cfg, tmp_path, check=False)
    assert proc.returncode == 2
    for text in ("lerning_rate: unknown key", "Did you mean `learning_rate`?", "max_steps: expected int",
                 "lora_target_modules: contains `lm_head`"):
        assert text in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
