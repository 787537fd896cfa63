"""Runs that survive: kill -9 mid-training and relaunch, a stop signal (preemption), a full disk, checkpoints cut
off mid-write, atomic final save.

The resumed run must end exactly where an uninterrupted run with the same seed ends (weights and per-step loss),
which holds only if the Trainer restores optimizer, scheduler, RNG and data position and our data prep is
deterministic. On CPU a restart from scratch ends there too, so each test also proves that the relaunch resumed:
the checkpoints written before it keep their bytes and modification times (a restart rewrites them), and a
checkpoint altered on purpose changes the result.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PYTHON, RECIPES, ROOT, run_recipe, tiny_config, toy_cai_rows, write_jsonl
from safetensors.torch import load_file, save_file

import run_dir

MAX_STEPS, SAVE_STEPS = 8, 2


def _config(model_dir, data, out, **overrides):
    return tiny_config(
        model_dir, data, out, max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
        eval_strategy="no", **overrides,
    )


def _losses(out) -> dict[int, float]:
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _train_loss(out) -> float:
    return json.loads((Path(out) / "train_results.json").read_text())["train_loss"]


def _max_weight_diff(a, b) -> float:
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def _assert_same_run(resumed, reference):
    diff = _max_weight_diff(resumed, reference)
    ref, got = _losses(reference), _losses(resumed)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), f"log history of the resumed run has steps {sorted(got)}"
    loss_diff = max(abs(got[s] - ref[s]) for s in ref)
    print(f"max |weight diff| = {diff:.3g}; max |per-step loss diff| = {loss_diff:.3g}; final loss "
          f"{got[MAX_STEPS]} vs {ref[MAX_STEPS]}; train_loss {_train_loss(resumed)} vs {_train_loss(reference)}")
    assert diff <= 1e-6
    assert loss_diff <= 1e-6
    assert run_dir.is_complete(resumed)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One uninterrupted run: checkpoints every 2 steps, final weights and per-step losses."""
    tmp = tmp_path_factory.mktemp("reference")
    data = write_jsonl(tmp / "data.jsonl", toy_cai_rows(24))
    out = tmp / "out"
    run_recipe(_config(tiny_model_dir, data, out), tmp)
    return types.SimpleNamespace(out=out, data=data)


def _snapshot(out) -> dict:
    """{file: (sha256, mtime_ns)} of every file in the complete checkpoints of `out`."""
    snap = {}
    for ckpt in Path(out).glob("checkpoint-*"):
        if run_dir.checkpoint_problem(str(ckpt)) is None:
            for f in sorted(ckpt.iterdir()):
                snap[f"{ckpt.name}/{f.name}"] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
    return snap


def _assert_resumed(out, before: dict, log: str):
    """The relaunch resumed: it left every checkpoint written before it untouched (a restart from scratch rewrites
    them) and wrote only the later ones."""
    newest = max(int(k.split("/")[0].split("-")[1]) for k in before)
    assert f"Resuming from {Path(out) / f'checkpoint-{newest}'}" in log, log[-3000:]
    after = _snapshot(out)
    assert {k: after.get(k) for k in before} == before, "the relaunch rewrote checkpoints it should have resumed from"
    later = sorted(int(k.split("/")[0].split("-")[1]) for k in after if k not in before)
    assert later and min(later) > newest, f"checkpoints written by the relaunch: {later}"


def _relaunch_resumes(cfg, tmp_path, reference):
    """Relaunch the same command: it resumes (checkpoints before it untouched) and ends as the reference run."""
    out = Path(cfg["output_dir"])
    before = _snapshot(out)
    resumed = run_recipe(cfg, tmp_path)
    _assert_resumed(out, before, resumed.stdout)
    _assert_same_run(out, reference.out)


def _start(cfg, tmp_path, *wrapper):
    cfg_path = tmp_path / "config_sft.yaml"  # the file and command that run_recipe uses for the relaunch
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [PYTHON, *wrapper, str(RECIPES / "sft.py"), "--config", str(cfg_path)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, path):
    while proc.poll() is None and run_dir.checkpoint_problem(str(path)) is not None:
        time.sleep(0.02)


def test_kill_9_then_relaunch_matches_uninterrupted_run(tiny_model_dir, reference, tmp_path):
    out = tmp_path / "out"
    cfg = _config(tiny_model_dir, reference.data, out)
    proc = _start(cfg, tmp_path)
    try:
        _wait_for_checkpoint(proc, out / f"checkpoint-{2 * SAVE_STEPS}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before the test could kill it"
    assert not run_dir.is_complete(out) and not (out / "model.safetensors").exists()
    _relaunch_resumes(cfg, tmp_path, reference)


def test_altered_checkpoint_changes_the_result(tiny_model_dir, reference, tmp_path):
    """Resuming reads the checkpoint: weights altered in checkpoint-4 give another model than the reference."""
    out = tmp_path / "out"
    out.mkdir()
    for step in (2, 4):
        shutil.copytree(reference.out / f"checkpoint-{step}", out / f"checkpoint-{step}")
    weights = out / "checkpoint-4" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 1.05 for k, v in tensors.items()}, str(weights))

    proc = run_recipe(_config(tiny_model_dir, reference.data, out), tmp_path)
    assert f"Resuming from {out / 'checkpoint-4'}" in proc.stdout
    assert _max_weight_diff(out, reference.out) > 1e-3


def test_stop_signal_saves_a_checkpoint_and_the_relaunch_resumes(tiny_model_dir, reference, tmp_path):
    """SIGTERM mid-run: the step ends, checkpoint-N is saved complete, exit 75; the relaunch resumes from it."""
    out = tmp_path / "out"
    cfg = _config(tiny_model_dir, reference.data, out)
    proc = _start(cfg, tmp_path)
    try:  # as soon as the first checkpoint is being written: most of the run is still ahead
        while proc.poll() is None and not (out / f"checkpoint-{SAVE_STEPS}").exists():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
    finally:
        log, _ = proc.communicate(timeout=120)
    assert proc.returncode == run_dir.PREEMPTED_EXIT, log[-3000:]
    record = json.loads((out / run_dir.PREEMPTED).read_text())
    step = record["step"]
    assert record["signal"] == "SIGTERM" and record["complete"], record
    assert step < MAX_STEPS, "the run finished before the signal reached it"
    assert f"Received SIGTERM: step {step} finished" in log and f"checkpoint-{step} is complete" in log, log[-3000:]
    assert run_dir.checkpoint_problem(str(out / f"checkpoint-{step}")) is None
    assert not run_dir.is_complete(out) and not (out / "model.safetensors").exists()
    _relaunch_resumes(cfg, tmp_path, reference)
    assert not (out / run_dir.PREEMPTED).exists()


def test_full_disk_while_saving_a_checkpoint(tiny_model_dir, reference, tmp_path):
    """checkpoint-4 meets a full disk (simulated: tests/full_disk.py): the partial folder is removed, the message
    names it and the size, exit 74; checkpoint-2 is intact and the relaunch resumes from it."""
    out = tmp_path / "out"
    cfg = _config(tiny_model_dir, reference.data, out)
    proc = _start(cfg, tmp_path, str(Path(__file__).parent / "full_disk.py"), "checkpoint-4")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == run_dir.DISK_FULL_EXIT, log[-3000:]
    size = run_dir.folder_size(str(out / "checkpoint-2")) / 1e6
    assert (f"No space left on device while writing checkpoint-4 to {out / 'checkpoint-4'} (about {size:.1f} MB"
            in log), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (out / "checkpoint-4").exists() and not list(out.glob("*checkpoint-6"))
    assert run_dir.checkpoint_problem(str(out / "checkpoint-2")) is None
    _relaunch_resumes(cfg, tmp_path, reference)


def test_checkpoint_cut_off_mid_write_is_skipped(tiny_model_dir, reference, tmp_path):
    """Newest checkpoint without trainer_state.json, the one before with a truncated model.safetensors."""
    out = tmp_path / "out"
    out.mkdir()
    for step in (2, 4, 6):
        shutil.copytree(reference.out / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    weights = out / "checkpoint-4" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    before = {k: v for k, v in _snapshot(out).items() if k.startswith("checkpoint-2/")}
    proc = run_recipe(_config(tiny_model_dir, reference.data, out), tmp_path)
    log = proc.stdout
    _assert_resumed(out, before, log)
    assert f"Skipping {out / 'checkpoint-6'}: trainer_state.json is missing" in log, log[-3000:]
    assert f"Skipping {out / 'checkpoint-4'}: model.safetensors is truncated" in log, log[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in log
    assert (out / "incomplete-checkpoint-4").is_dir() and (out / "incomplete-checkpoint-6").is_dir()
    _assert_same_run(out, reference.out)


# --------------------------------------------------------------------------------------------- unit checks


def _fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(path / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"x": torch.zeros(256)}, path / name)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    return path


def _truncate(path: Path, keep: float = 0.5):
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


BREAKAGES = {
    "no trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "trainer_state.json cut off": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json is not valid"),
    "weights truncated": (lambda c: _truncate(c / "model.safetensors", 0.9), "model.safetensors is truncated"),
    "weights header cut": (lambda c: _truncate(c / "model.safetensors", 0.02), "model.safetensors"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    "no optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "optimizer truncated": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    "rng state truncated": (lambda c: _truncate(c / "rng_state.pth"), "rng_state.pth is truncated"),
}


def test_complete_fake_checkpoint_passes(tmp_path):
    assert run_dir.checkpoint_problem(str(_fake_checkpoint(tmp_path / "checkpoint-4"))) is None


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_incomplete_checkpoint_detected(tmp_path, breakage):
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-4")
    damage, reason = BREAKAGES[breakage]
    damage(ckpt)
    problem = run_dir.checkpoint_problem(str(ckpt))
    assert problem is not None and reason in problem


def test_newest_complete_checkpoint_chosen_and_broken_set_aside(tmp_path, capsys):
    for step in (2, 4, 10):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-10" / "optimizer.pt").unlink()
    args = types.SimpleNamespace(output_dir=str(tmp_path), process_index=0, resume_from_checkpoint=None,
                                 save_only_model=False)
    assert run_dir.checkpoint_to_resume(args) == str(tmp_path / "checkpoint-4")
    assert "Skipping" in capsys.readouterr().out and (tmp_path / "incomplete-checkpoint-10").is_dir()
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-2")
    assert run_dir.checkpoint_to_resume(args) == str(tmp_path / "checkpoint-2")
    _truncate(tmp_path / "checkpoint-2" / "model.safetensors")
    with pytest.raises(SystemExit, match="resume_from_checkpoint: .* is incomplete"):
        run_dir.checkpoint_to_resume(args)


class _StubTrainer:
    """What save_model_atomically uses of a Trainer; `crash` makes save_model die half way through a file."""

    def __init__(self, crash=False):
        self.crash = crash
        self.accelerator = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)

    def save_model(self, path):
        os.makedirs(path, exist_ok=True)
        Path(path, "config.json").write_text("{}")
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"\x00" * 100)
            if self.crash:
                raise RuntimeError("No space left on device")
            f.write(b"\x00" * 100)


def test_crash_while_saving_never_looks_finished(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run_dir.mark_complete(str(out))  # a finished run being overwritten
    with pytest.raises(RuntimeError):
        run_dir.save_model_atomically(_StubTrainer(crash=True), str(out))
    assert not run_dir.is_complete(out)
    assert not (out / "model.safetensors").exists()  # the half-written file stays in the temporary folder
    assert run_dir.output_dir_problem(str(out), overwrite=False) is None  # a relaunch is not refused

    run_dir.save_model_atomically(_StubTrainer(), str(out))
    assert not (out / run_dir.FINAL_TMP).exists() and (out / "model.safetensors").stat().st_size == 200
    assert not run_dir.is_complete(out)  # not until the marker is written, last
    run_dir.mark_complete(str(out))
    marker = json.loads((out / run_dir.COMPLETE_MARKER).read_text())
    assert marker["files"]["model.safetensors"] == 200 and run_dir.is_complete(out)
    assert "--overwrite_output_dir" in run_dir.output_dir_problem(str(out), overwrite=False)


class _GuardedStub(_StubTrainer):
    """_StubTrainer plus what disk_full_guard reads: step, args and a model of one 10x10 float32 weight."""

    def __init__(self, crash=False):
        super().__init__(crash)
        self.state = types.SimpleNamespace(global_step=8)
        self.args = types.SimpleNamespace(save_only_model=False)
        self.model = torch.nn.Linear(10, 10, bias=False)


def test_full_disk_during_the_final_save(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(run_dir.DiskFull) as e:
        with run_dir.disk_full_guard(_GuardedStub(), str(out), final=True):
            run_dir.save_model_atomically(_GuardedStub(crash=True), str(out))
    assert str(e.value).startswith(f"No space left on device while writing the final model to {out / run_dir.FINAL_TMP}"
                                   " (about 0.0 MB")  # 400 bytes of weights
    assert not (out / run_dir.FINAL_TMP).exists() and not run_dir.is_complete(out)


def test_other_errors_are_not_a_full_disk(tmp_path):
    """An error during training is not made a full disk by a temporary folder of the final save left from before."""
    out = tmp_path / "out"
    (out / run_dir.FINAL_TMP).mkdir(parents=True)
    with pytest.raises(ValueError, match="a bug"):
        with run_dir.disk_full_guard(_GuardedStub(), str(out)):
            raise ValueError("a bug")
    assert (out / run_dir.FINAL_TMP).is_dir()
