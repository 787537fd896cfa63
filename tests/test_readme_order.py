"""The README's commands, run in the README's order, twice, in a fresh copy of the repository, on a tiny model.

The commands are read from the README's bash blocks (so a README change is what is tested): `make demo`, `make
dry-run`, `make eval`, `make demo-rlaif`, and the `recipes/sft.py` / `recipes/dpo.py` commands (dry runs, training).
Each gets overrides that point it at a tiny random model and a step or two; everything else (the demo's YAMLs, output folders, the
output guard) is as a user runs it. Each must exit 0, both times: `make demo` again replaces only its own earlier
output, and the dry runs write next to the demo's model, never into it.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT

TINY_TRAIN = "--max_steps 2 --eval_steps 1 --num_sample_prompts 1 --sample_max_new_tokens 4"


def readme_commands() -> list[str]:
    """Shell commands of the README's ```bash blocks, continuation lines joined, comments dropped, in order."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def is_checked(command: str) -> bool:
    return command in ("make demo", "make dry-run", "make eval", "make demo-rlaif") or (
        "recipes/sft.py --config recipes/smollm2-135m/sft_demo.yaml" in command) or (
        "recipes/dpo.py --config recipes/smollm2-135m/dpo_demo.yaml" in command)


def test_readme_commands_in_order_twice(tiny_model_dir, tmp_path):
    commands = [c for c in readme_commands() if is_checked(c)]
    assert commands[0] == "make demo", commands
    assert any("--dry_run" in c for c in commands) and "make eval" in commands, commands
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "models", "outputs", "__pycache__",
                                                              ".pytest_cache"))  # a fresh clone
    model = f"--model_name_or_path {tiny_model_dir}"
    make_vars = [f"PY={PYTHON}", f"MODEL_DIR={tiny_model_dir}", f"DEMO_ARGS={model} {TINY_TRAIN}",
                 f"EVAL_ARGS=--base_model {tiny_model_dir} --max_new_tokens 8 --max_examples 2",
                 "PAIRS_ARGS=--max_benign 4 --max_redteam 4 --max_new_tokens 4", f"DPO_ARGS={TINY_TRAIN}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for round_ in (1, 2):
        for command in commands:
            argv = shlex.split(command)
            if argv[0] == "make":
                argv += make_vars
            else:  # .venv/bin/python recipes/sft.py ...: this interpreter, the tiny model
                argv = [PYTHON, *argv[1:], *shlex.split(model), *shlex.split(TINY_TRAIN)]
            proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"round {round_}: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    demo = repo / "outputs" / "smollm2-135m-cai-sft"
    assert (demo / "cai_sft_complete.json").is_file() and (demo / "eval_report.md").is_file()
    assert (repo / "outputs" / "smollm2-135m-cai-sft-dry-run" / "preview.jsonl").is_file()
    assert not (demo / "preview.jsonl").exists()
    if "make demo-rlaif" in commands:
        dpo = repo / "outputs" / "smollm2-135m-cai-dpo"
        assert (dpo / "cai_sft_complete.json").is_file() and "M_DPO" in (dpo / "eval_report.md").read_text()
        assert (repo / "outputs" / "smollm2-135m-cai-dpo-dry-run" / "preview.jsonl").is_file()

    # a model trained otherwise is never replaced: the demo's YAML with another learning rate is refused
    proc = subprocess.run([PYTHON, "recipes/sft.py", "--config", "recipes/smollm2-135m/sft_demo.yaml",
                           *shlex.split(model), *shlex.split(TINY_TRAIN), "--learning_rate", "1e-5"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "trained with other settings" in proc.stderr, proc.stderr[-3000:]
    assert "Chat format:" not in proc.stdout  # refused before anything loads
