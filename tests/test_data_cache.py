"""The data cache (recipes/data_cache.py): a re-run loads what the first run prepared; anything that changes the
tokens changes the key; a cache left half-written by a killed run, or edited by hand, is rebuilt and never used;
under `accelerate launch` the main process prepares and the other rank loads its result."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import PYTHON, RECIPES, ROOT, build_model_dir, run_recipe, tiny_config, toy_cai_rows, write_jsonl

import cai_data


def dry(tmp_path, model, data, cache, name, *cli):
    """`sft.py --dry_run` in this process: (what it printed, preview.jsonl). In-process because starting a Python
    with torch and TRL (~5 s) would be most of these tests' time; the killed preparation below is a real process."""
    import contextlib
    import io

    import sft
    import yaml

    cfg = tiny_config(model, data, tmp_path / name, data_cache_dir=str(cache), eval_fraction=0.25, preview_all=True)
    cfg.pop("eval_strategy")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        sft.main(*sft.make_parser().parse_args_and_config(["--config", str(path), "--dry_run", *cli]))
    return printed.getvalue(), (tmp_path / name / "preview.jsonl").read_text()


def folders(cache):
    return sorted(p.name for p in Path(cache).iterdir())


def test_rerun_hits_and_every_token_input_changes_the_key(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", toy_cai_rows(24))
    cache = tmp_path / "cache"
    out, first = dry(tmp_path, tiny_model_dir, data, cache, "a")
    assert "Data cache: miss, preparing the data into" in out and str(cache) in out
    [key] = folders(cache)
    out, again = dry(tmp_path, tiny_model_dir, data, cache, "b")
    assert f"Data cache: hit, loading the prepared data from {cache / key}" in out
    assert again == first and folders(cache) == [key]
    # the data file's contents, max_length and the system prompt each make a new key
    rows = toy_cai_rows(24)
    for row in rows:
        row["revision_response"] += " Stay safe."
    write_jsonl(data, rows)
    out, edited = dry(tmp_path, tiny_model_dir, data, cache, "c")
    assert "Data cache: miss" in out and edited != first and len(folders(cache)) == 2
    out, _ = dry(tmp_path, tiny_model_dir, data, cache, "d", "--max_length", "100")
    assert "Data cache: miss" in out and len(folders(cache)) == 3
    out, _ = dry(tmp_path, tiny_model_dir, data, cache, "e", "--system_prompt", "Be kind.")
    assert "Data cache: miss" in out and len(folders(cache)) == 4
    out, rebuilt = dry(tmp_path, tiny_model_dir, data, cache, "f", "--rebuild_data_cache", "true")
    assert "is not used (rebuild_data_cache is set); preparing the data again" in out and rebuilt == edited


def test_tokenizer_and_template_change_the_format_fingerprint(tmp_path):
    import chat_format
    from conftest import build_tokenizer

    def fingerprint(template, system="S"):
        return chat_format.ChatFormat.detect(build_tokenizer(template), system).fingerprint()

    assert fingerprint("chatml") == fingerprint("chatml")
    assert fingerprint("chatml") != fingerprint("qwen2_5")  # another template, same special tokens
    assert fingerprint("gemma")["mode"] == "fold" and fingerprint("chatml")["mode"] == "system"
    tok = build_tokenizer("chatml")
    tok.add_tokens(["lockpick"])  # one more token: other ids
    assert chat_format.ChatFormat.detect(tok, "S").fingerprint() != fingerprint("chatml")


def test_preview_is_bounded_and_says_so(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", toy_cai_rows(24))
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out", data_cache_dir=str(tmp_path / "cache"),
                      eval_fraction=0.0, preview_examples=5)
    cfg.pop("eval_strategy")
    out = run_recipe(cfg, tmp_path, "--dry_run").stdout
    assert len((tmp_path / "out" / "preview.jsonl").read_text().splitlines()) == 5
    assert "All 24 training examples:" in out and "wrote 5 of 24 examples" in out and "preview_all" in out


def test_killed_preparation_and_edited_cache_are_rebuilt_never_used(tmp_path):
    model = build_model_dir(tmp_path / "model")
    rows = [{"prompt": f"How do I open lock {i} without its key? " * 3, "completion": f"Call a locksmith {i}. " * 6}
            for i in range(6000)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cache = tmp_path / "cache"
    _, reference = dry(tmp_path, model, data, tmp_path / "reference_cache", "ref")

    cfg = tiny_config(model, data, tmp_path / "killed", data_cache_dir=str(cache), eval_fraction=0.25,
                      preview_all=True)
    cfg.pop("eval_strategy")
    (tmp_path / "killed.yaml").write_text(json.dumps(cfg))
    proc = subprocess.Popen([PYTHON, str(RECIPES / "sft.py"), "--config", str(tmp_path / "killed.yaml"), "--dry_run"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cache.is_dir() and any(p.startswith(".tmp-") for p in os.listdir(cache))):
        assert proc.poll() is None and time.time() < deadline, "the preparation never started writing"
        time.sleep(0.05)
    time.sleep(0.5)  # mid-preparation: its Arrow files are being written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p for p in folders(cache) if not p.startswith(".tmp-")] == []  # nothing under a key: nothing to use

    out, ids = dry(tmp_path, model, data, cache, "after_kill")
    assert "left by a preparation that was killed" in out and "Data cache: miss" in out
    assert ids == reference
    [key] = folders(cache)

    arrow = next((cache / key / "train").glob("*.arrow"))
    raw = bytearray(arrow.read_bytes())
    raw[-200] ^= 0xFF  # one byte edited by hand
    arrow.write_bytes(bytes(raw))
    out, ids = dry(tmp_path, model, data, cache, "after_edit")
    assert f"is not used (train/{arrow.name} changed since it was written); preparing the data again" in out
    assert ids == reference

    (cache / key / "manifest.json").unlink()  # as a write cut off before its last step would leave it
    out, ids = dry(tmp_path, model, data, cache, "no_manifest")
    assert "it has no readable manifest.json" in out and ids == reference


def test_two_processes_prepare_once(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", toy_cai_rows(24))
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out", data_cache_dir=str(tmp_path / "cache"),
                      eval_fraction=0.25)
    cfg.pop("eval_strategy")
    (tmp_path / "r.yaml").write_text(json.dumps(cfg))
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/multi_gpu.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
           str(RECIPES / "sft.py"), "--config", str(tmp_path / "r.yaml"), "--use_cpu", "true", "--dry_run"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("Data cache: miss") == 1  # rank 0 prepared
    assert "[rank 1] Data cache: hit, loading the prepared data from" in out  # rank 1 loaded its result
    assert "[rank 1] Data cache: miss" not in out


def test_own_system_turn_folded_is_counted(tmp_path):
    from conftest import build_tokenizer, prepare_rows

    rows = [{"messages": [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Goodbye."}]}]

    class Script:
        dataset_name, dataset_config, dataset_train_split, dataset_test_split = (
            write_jsonl(tmp_path / "m.jsonl", rows), None, "train", "test")

    train, _, report = cai_data.load_pairs(Script, cai_data.CAIDataArguments(eval_fraction=0.0))
    prepare_rows(train, build_tokenizer("gemma"), 256, report, system_prompt=cai_data.DEFAULT_SYSTEM_PROMPT)
    reason = "train: the row's own system turn folded into the first user turn"
    assert report.changed[reason] == 1 and report.locations[reason] == [f"{Script.dataset_name} [train] row 0"]


def test_leftover_temporary_folders_never_block_a_build(tmp_path):
    import data_cache

    key = "b" * 64
    root = tmp_path / "cache"
    # a killed build of this very host and pid (a restarted container), and one of a dead process on a hyphenated host
    for name, owner in ((f".tmp-{key[:32]}-a", {"host": data_cache.socket.gethostname(), "pid": os.getpid()}),
                        (f".tmp-{key[:32]}-b", {"host": data_cache.socket.gethostname(), "pid": 2 ** 22 + 7})):
        (root / name).mkdir(parents=True)
        (root / name / "owner.json").write_text(json.dumps(owner))
    said = []

    def build(work):
        import datasets

        ds = datasets.Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]})
        return ds, None, None, {"counts": {}}

    train, _, _, report = data_cache.prepared(str(root), key, build, say=said.append)
    assert train["input_ids"] == [[1, 2]] and report == {"counts": {}}
    assert sorted(p.name for p in root.iterdir()) == [f".tmp-{key[:32]}-a", key[:32]]  # the dead one removed
    assert any("left by a preparation that was killed" in m for m in said)
