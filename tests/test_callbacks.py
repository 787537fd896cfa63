"""Watching the fine-tune: loss curves and metrics files, sample generations, the overfitting warning, and
early stopping that keeps the best checkpoint."""

import csv
import json
import logging
import random
import types

import pytest
from conftest import cai_row, run_recipe, tiny_config, toy_cai_rows, write_jsonl

import callbacks


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------- a short LoRA run


def test_curves_metrics_and_samples_written(tmp_path, tiny_model_dir):
    cai = write_jsonl(tmp_path / "cai.jsonl", toy_cai_rows(24))
    benign_rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(16)]
    benign = write_jsonl(tmp_path / "benign.jsonl", benign_rows)
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, None, out, num_sample_prompts=3, sample_max_new_tokens=6, use_peft=True,
                      lora_target_modules=["q_proj", "v_proj"], eval_fraction=0.25)  # fmt: skip
    del cfg["dataset_name"]
    cfg["datasets"] = [{"path": cai}, {"path": benign}]
    run_recipe(cfg, tmp_path)

    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    logged = _jsonl(out / "metrics.jsonl")
    assert [h["step"] for h in logged if "loss" in h and "eval_loss" not in h] == [1, 2, 3, 4]
    assert [h["step"] for h in logged if "eval_loss" in h] == [2, 4]
    assert "train_loss" in logged[-1]
    # the same entries as the Trainer's own log history (which also holds sft.py's evaluation after training)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[: len(logged)] == logged

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(logged)
    assert list(rows[0])[0] == "step" and {"loss", "eval_loss", "learning_rate"} <= set(rows[0])
    first_eval = next(i for i, h in enumerate(logged) if "eval_loss" in h)
    assert float(rows[first_eval]["eval_loss"]) == pytest.approx(logged[first_eval]["eval_loss"], abs=1e-12)

    samples = _jsonl(out / "samples.jsonl")
    during = [s for s in samples if not s.get("final")]
    assert sorted({s["step"] for s in during}) == [2, 4]
    at = {step: [s["prompt"] for s in during if s["step"] == step] for step in (2, 4)}
    assert len(at[2]) == 3 and at[2] == at[4]  # the same fixed prompts at every evaluation
    assert {s["source"] for s in during} == {cai, benign}  # a mix of red-team and benign prompts
    assert all(isinstance(s["answer"], str) for s in samples)
    # the last evaluation was at the last step: sft.py does not evaluate (and answer) again; step 4 is M_SFT's
    assert [s for s in samples if s.get("final")] == []
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == logged[-2]["eval_loss"]
    assert (out / "adapter_config.json").exists()  # the samples came from the PEFT-wrapped model


# --------------------------------------------------------------------------------------------- samples in-process


class _Writer:
    def __init__(self):
        self.texts = []

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def _fake_trainer(model, tok, extra_callbacks=()):
    return types.SimpleNamespace(
        model=model,
        processing_class=tok,
        callback_handler=types.SimpleNamespace(callbacks=list(extra_callbacks)),
        is_deepspeed_enabled=False,
        is_fsdp_enabled=False,
        accelerator=types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=None)),
    )


def test_samples_from_peft_model_restore_train_mode_and_reach_tensorboard(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import TensorBoardCallback

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(target_modules=["q_proj", "v_proj"], r=4))  # fmt: skip
    model.train()
    tb = TensorBoardCallback.__new__(TensorBoardCallback)  # no tensorboard package here: only its writer matters
    tb.tb_writer = _Writer()
    rows = [{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Question {i}?"}],
             "source": "a" if i % 2 else "b", "row": i} for i in range(6)]  # fmt: skip
    cb = callbacks.SampleGenerations(_fake_trainer(model, tok, [tb]), callbacks.pick_sample_rows(rows, 2), 5)
    args = types.SimpleNamespace(output_dir=str(tmp_path))

    cb.on_evaluate(args, types.SimpleNamespace(global_step=7, is_world_process_zero=False), None)
    assert not (tmp_path / "samples.jsonl").exists()  # other processes write nothing

    cb.on_evaluate(args, types.SimpleNamespace(global_step=7, is_world_process_zero=True), None)
    assert model.training  # back in train mode after generating
    samples = _jsonl(tmp_path / "samples.jsonl")
    assert [(s["step"], s["prompt"]) for s in samples] == [(7, "Question 1?"), (7, "Question 0?")]  # sources a, b
    [(tag, text, step)] = tb.tb_writer.texts
    assert tag == "samples" and step == 7 and "Question 1?" in text and samples[0]["answer"].replace("|", "\\|") in text


def test_pick_sample_rows_is_a_deterministic_round_robin_over_sources():
    rows = [{"source": "redteam", "row": i} for i in range(5)] + [{"source": "benign", "row": i} for i in range(3)]
    shuffled = random.Random(3).sample(rows, len(rows))
    picked = callbacks.pick_sample_rows(shuffled, 5)
    assert [(r["source"], r["row"]) for r in picked] == [
        ("benign", 0), ("redteam", 0), ("benign", 1), ("redteam", 1), ("benign", 2)
    ]  # fmt: skip
    assert callbacks.pick_sample_rows(rows, 5) == picked
    assert len(callbacks.pick_sample_rows(rows, 20)) == 8


# --------------------------------------------------------------------------------------------- the guard, in-process


def _history(evals, train):
    """log_history from {step: eval_loss} and {step: train loss}, in step order."""
    entries = [{"step": s, "loss": v} for s, v in train.items()]
    entries += [{"step": s, "eval_loss": v} for s, v in evals.items()]
    return sorted(entries, key=lambda h: (h["step"], "eval_loss" in h))


def test_overfit_warning_names_the_turning_step():
    train = {s: 3.0 - 0.1 * s for s in range(1, 13)}
    found = callbacks.overfit_warning(_history({3: 2.5, 6: 2.2, 9: 2.3, 12: 2.4}, train), patience=2)
    assert found is not None and found[0] == 6
    assert "turned at step 6" in found[1] and "2.2000" in found[1]
    # one rise only, or a patience that asks for more rises: no warning
    assert callbacks.overfit_warning(_history({3: 2.5, 6: 2.2, 9: 2.3}, train), patience=2) is None
    assert callbacks.overfit_warning(_history({3: 2.5, 6: 2.2, 9: 2.3, 12: 2.4}, train), patience=3) is None
    # eval loss rising while training loss rises too is not overfitting (e.g. a learning rate that is too high)
    rising = {s: 1.0 + 0.1 * s for s in range(1, 13)}
    assert callbacks.overfit_warning(_history({3: 2.5, 6: 2.2, 9: 2.3, 12: 2.4}, rising), patience=2) is None
    # eval_on_start: it turns at step 0, before any training loss was logged
    found = callbacks.overfit_warning(_history({0: 2.0, 3: 2.1, 6: 2.3}, train), patience=2)
    assert found[0] == 0 and "turned at step 0" in found[1]


def test_overfit_guard_warns_once_per_turn(caplog):
    guard = callbacks.OverfitGuard(patience=2)
    train = {s: 3.0 - 0.1 * s for s in range(1, 16)}
    evals = {3: 2.5, 6: 2.2, 9: 2.3, 12: 2.4, 15: 2.6}
    state = types.SimpleNamespace(is_world_process_zero=True, log_history=[])
    with caplog.at_level(logging.WARNING, logger="recipes.callbacks"):
        for step in evals:
            state.log_history = _history({s: v for s, v in evals.items() if s <= step},
                                         {s: v for s, v in train.items() if s <= step})  # fmt: skip
            guard.on_evaluate(None, state, None)
    warnings = [r.getMessage() for r in caplog.records if "Overfitting" in r.getMessage()]
    assert len(warnings) == 1 and "turned at step 6" in warnings[0]


# --------------------------------------------------------------------------------------------- a real overfitting run


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, tiny_model_dir):
    """Train on one sentence, evaluate on the same words in reverse order: held-out loss falls while the model
    learns the words, then rises as it memorises their order. Early stopping (patience 2) with
    load_best_model_at_end and a checkpoint at every evaluation.
    """
    tmp = tmp_path_factory.mktemp("overfit")
    sentence = "the quick brown fox jumps over the lazy dog"
    reverse = " ".join(reversed(sentence.split()))
    write_jsonl(tmp / "data" / "train.jsonl", [cai_row(f"How do I pick lock number {i}?", sentence) for i in range(16)])
    held_out = [cai_row(f"How do I pick lock number {i}?", reverse) for i in range(100, 104)]
    write_jsonl(tmp / "data" / "test.jsonl", held_out)
    out = tmp / "out"
    cfg = tiny_config(
        tiny_model_dir, str(tmp / "data"), out,
        learning_rate=5e-3, lr_scheduler_type="constant", max_steps=40, per_device_train_batch_size=8,
        eval_steps=3, save_strategy="steps", save_steps=3,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        early_stopping_patience=2, overfit_warning_patience=2,
    )  # fmt: skip
    proc = run_recipe(cfg, tmp)
    logged = _jsonl(out / "metrics.jsonl")
    evals = [(h["step"], h["eval_loss"]) for h in logged if "eval_loss" in h]
    return types.SimpleNamespace(out=out, proc=proc, logged=logged, evals=evals, best=min(evals, key=lambda e: e[1]))


def test_overfitting_run_warns_naming_the_turning_step(overfit_run):
    evals, (best_step, best_loss) = overfit_run.evals, overfit_run.best
    # the construction worked: eval loss fell to a minimum and then rose at least twice in a row
    assert evals[0][1] > best_loss and evals[-2][1] > best_loss and evals[-1][1] > evals[-2][1]
    output = overfit_run.proc.stdout + overfit_run.proc.stderr
    warnings = [line for line in output.splitlines() if "Overfitting warning" in line]
    assert len(warnings) == 1, output[-3000:]
    assert f"It turned at step {best_step} (best eval_loss {best_loss:.4f})" in warnings[0]


def test_early_stopping_restores_the_best_checkpoint(overfit_run):
    from safetensors.torch import load_file

    out, (best_step, best_loss) = overfit_run.out, overfit_run.best
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] < 40  # stopped early
    assert state["global_step"] == overfit_run.evals[-1][0] == best_step + 2 * 3  # two evaluations without progress
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    # the model evaluated after training and saved as M_SFT is the best one
    final = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert final == pytest.approx(best_loss, abs=1e-6)
    saved = load_file(out / "model.safetensors")
    best = load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    last = load_file(out / f"checkpoint-{state['global_step']}" / "model.safetensors")
    assert saved.keys() == best.keys()
    assert all((saved[k] == best[k]).all() for k in saved)
    assert any((saved[k] != last[k]).any() for k in saved)


def test_build_adds_the_callbacks_the_arguments_ask_for():
    args = types.SimpleNamespace(early_stopping_patience=None, early_stopping_threshold=0.0, overfit_warning_patience=3,
                                 num_sample_prompts=0, sample_max_new_tokens=8)  # fmt: skip
    kinds = [type(c).__name__ for c in callbacks.build(None, args, [])]
    assert kinds == ["OverfitGuard", "Curves"]
    args.early_stopping_patience, args.overfit_warning_patience = 2, 0
    kinds = [type(c).__name__ for c in callbacks.build(None, args, [])]
    assert kinds == ["EarlyStoppingCallback", "Curves"]


def test_training_bar_replaces_the_progress_callback_without_evaluation_bars():
    from transformers import ProgressCallback

    popped = []
    trainer = types.SimpleNamespace(pop_callback=lambda cls: popped.append(cls) or cls())
    args = types.SimpleNamespace(early_stopping_patience=None, early_stopping_threshold=0.0, overfit_warning_patience=0,
                                 num_sample_prompts=0, sample_max_new_tokens=8)  # fmt: skip
    cbs = callbacks.build(trainer, args, [])
    assert popped == [ProgressCallback] and [type(c).__name__ for c in cbs] == ["Curves", "TrainingBarOnly"]
    bar = cbs[-1]
    state = types.SimpleNamespace(is_world_process_zero=True)
    bar.on_prediction_step(None, state, None, eval_dataloader=[1, 2, 3])
    assert bar.prediction_bar is None  # transformers' ProgressCallback would have opened a second bar here
    trainer = types.SimpleNamespace(pop_callback=lambda cls: None)  # disable_tqdm: no bar to replace
    assert [type(c).__name__ for c in callbacks.build(trainer, args, [])] == ["Curves"]
