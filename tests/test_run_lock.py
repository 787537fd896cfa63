"""One run per output: run_dir.RunLock, and two real sft.py runs started into one output_dir at the same moment."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest
import yaml
from conftest import PYTHON, RECIPES, ROOT, run_recipe, tiny_config, toy_cai_rows, write_jsonl

import checks
import run_dir


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _plant(folder, **holder):
    folder.mkdir(exist_ok=True)
    record = {"program": "sft.py", "host": socket.gethostname(), "pid": os.getpid(), "started": "earlier",
              "command": "python recipes/sft.py --config a.yaml", **holder}
    (folder / run_dir.LOCK).write_text(json.dumps(record))
    return record


def test_second_run_refused_naming_the_first(tmp_path):
    """A lock held by another live process refuses; once that process released it, the next run takes it."""
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys, run_dir; run_dir.RunLock(sys.argv[1], 'sft.py').acquire(); print('held', "
         "flush=True); sys.stdin.read()", str(tmp_path / "out")],
        cwd=RECIPES, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        started = json.loads((tmp_path / "out" / run_dir.LOCK).read_text())["started"]
        with pytest.raises(checks.ConfigError) as e:
            run_dir.RunLock(str(tmp_path / "out"), "evaluate.py").acquire()
        message = str(e.value)
        assert f"is in use by another run: sft.py, pid {holder.pid} on host {socket.gethostname()}" in message
        assert f"started {started}" in message and str(tmp_path / "out" / run_dir.LOCK) in message
    finally:
        holder.communicate("", timeout=30)  # its stdin closes: it exits and releases the lock (atexit)
    assert not (tmp_path / "out" / run_dir.LOCK).exists()
    run_dir.RunLock(str(tmp_path / "out"), "evaluate.py").acquire().release()


def test_same_process_may_lock_again(tmp_path):
    """A program called twice in one process (tests, a notebook) takes its own lock again."""
    first = run_dir.RunLock(str(tmp_path / "out"), "sft.py").acquire()
    second = run_dir.RunLock(str(tmp_path / "out"), "sft.py").acquire()
    assert second.held and json.loads((tmp_path / "out" / run_dir.LOCK).read_text()) == second.me
    first.release()  # no longer its lock: left alone
    assert (tmp_path / "out" / run_dir.LOCK).exists()
    second.release()
    assert not (tmp_path / "out" / run_dir.LOCK).exists()


def test_stale_lock_of_a_dead_process_taken_over(tmp_path, capsys):
    dead = _plant(tmp_path / "out", pid=_dead_pid())["pid"]
    lock = run_dir.RunLock(str(tmp_path / "out"), "sft.py").acquire()
    assert f"Took over the lock {tmp_path / 'out' / run_dir.LOCK}: its process {dead} is gone" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / run_dir.LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_reused_pid_is_not_the_old_run(tmp_path, capsys):
    """Our own pid, but with another start time: the process that held the lock is gone."""
    _plant(tmp_path / "out", pid_start="1")
    run_dir.RunLock(str(tmp_path / "out"), "sft.py").acquire().release()
    assert "Took over the lock" in capsys.readouterr().out


def test_lock_on_another_host_refused_with_the_way_out(tmp_path):
    _plant(tmp_path / "out", host="gpu-node-17", pid=4242)
    with pytest.raises(checks.ConfigError, match=r"pid 4242 on host gpu-node-17.*delete .*\.cai_run\.lock"):
        run_dir.RunLock(str(tmp_path / "out"), "sft.py").acquire()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch, capsys):
    _plant(tmp_path / "out", host="gpu-node-17", pid=4242, slurm_job_id="991", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_dir.RunLock(str(tmp_path / "out"), "sft.py").acquire().release()
    assert "earlier run of this SLURM job (991, requeued)" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_JOB_ID", "992")  # another job: not its lock
    _plant(tmp_path / "out", host="gpu-node-17", pid=4242, slurm_job_id="991", slurm_restart_count=0)
    with pytest.raises(checks.ConfigError):
        run_dir.RunLock(str(tmp_path / "out"), "sft.py").acquire()


def test_lock_next_to_a_file_output(tmp_path):
    with run_dir.RunLock(str(tmp_path / "revisions.jsonl"), "generate_revisions.py", inside=False) as lock:
        assert lock.path == str(tmp_path / f".revisions.jsonl{run_dir.LOCK}") and os.path.isfile(lock.path)
    assert not os.path.exists(lock.path)


# --------------------------------------------------------------------------------------------- real runs


def _launch(cfg, path, seed):
    path.write_text(yaml.safe_dump({**cfg, "seed": seed}))
    return subprocess.Popen([PYTHON, str(RECIPES / "sft.py"), "--config", str(path)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_runs_into_one_output_dir(tiny_model_dir, tmp_path):
    """Started at the same moment: exactly one trains; the other exits 2 before loading anything, naming it."""
    data = write_jsonl(tmp_path / "data.jsonl", toy_cai_rows(24))
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, data, out, max_steps=24, save_strategy="steps", save_steps=4,
                      eval_strategy="no")
    procs = [_launch(cfg, tmp_path / f"run{seed}.yaml", seed) for seed in (1, 2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    results = [(p.pid, p.returncode, o, e) for p, (o, e) in zip(procs, outputs)]
    codes = sorted(code for _, code, _, _ in results)
    assert codes == [0, 2], "\n".join(f"{pid}: {code}\n{o[-2000:]}\n{e[-2000:]}" for pid, code, o, e in results)
    (winner, *_), (_, _, loser_out, loser_err) = sorted(results, key=lambda r: r[1])
    assert f"is in use by another run: sft.py, pid {winner} on host {socket.gethostname()}" in loser_err, loser_err
    assert "Chat format:" not in loser_out  # refused before the tokenizer, the data or any weights
    assert run_dir.is_complete(out) and not (out / run_dir.LOCK).exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 24


def test_lock_of_a_killed_run_does_not_block(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", toy_cai_rows(24))
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, data, out, max_steps=4, eval_strategy="no")
    proc = _launch(cfg, tmp_path / "killed.yaml", 0)
    try:
        while proc.poll() is None and not (out / run_dir.LOCK).exists():
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and json.loads((out / run_dir.LOCK).read_text())["pid"] == proc.pid
    relaunched = run_recipe(cfg, tmp_path)
    assert f"Took over the lock {out / run_dir.LOCK}: its process {proc.pid} is gone" in relaunched.stdout
    assert run_dir.is_complete(out)


def test_evaluate_refuses_a_report_folder_in_use(tiny_model_dir, tmp_path):
    """evaluate.py locks its output folder too: a second evaluation into it exits 2, naming the first."""
    out = tmp_path / "reports"
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys, run_dir; run_dir.RunLock(sys.argv[1], 'evaluate.py').acquire(); print('held', "
         "flush=True); sys.stdin.read()", str(out)],
        cwd=RECIPES, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(
            [PYTHON, str(RECIPES / "evaluate.py"), "--sft_model", tiny_model_dir, "--base_model", tiny_model_dir,
             "--output_dir", str(out),
             "--test_file", str(ROOT / "data" / "cai_test.jsonl")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        holder.communicate("", timeout=30)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"is in use by another run: evaluate.py, pid {holder.pid}" in proc.stderr
    assert "Chat format:" not in proc.stdout  # refused before the tokenizer or any model
