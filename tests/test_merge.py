"""tools/merge.py: the merged model computes what base + adapter computes, and ships tokenizer, chat
template and generation_config so that it chats and stops like the adapter it came from."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, RECIPES, ROOT, TOOLS, build_model_dir

import merge

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny seed-template base and a LoRA adapter on every linear layer, saved like sft.py saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("merge")
    base = build_model_dir(root / "base", "seed")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero; make the update large so a lost or half merge shows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = root / "adapter"
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = (RECIPES / "templates" / "cai_seed.jinja").read_text() + "{# trained #}"
    tok.save_pretrained(out)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("</s>")
    model.generation_config.max_new_tokens = 77
    model.generation_config.save_pretrained(out)
    return base, str(out)


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def run_merge(*args):
    proc = subprocess.run([PYTHON, str(TOOLS / "merge.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_merged_model_equals_base_plus_adapter(adapter, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base, adapter_dir = adapter
    out = tmp_path / "merged"
    run_merge("--adapter", adapter_dir, "--output", str(out))

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    reference = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir).eval(), ids)
    merged_model = AutoModelForCausalLM.from_pretrained(out).eval()
    merged = logits(merged_model, ids)
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=0)
    assert (merged - logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids)).abs().max() > 1e-2

    # A plain model: safetensors weights only, no LoRA tensors, no adapter files.
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k or k.startswith("base_model.") for k in keys)
    assert merged_model.dtype == torch.float32

    # Tokenizer, chat template and generation_config come from the adapter folder (what training saved).
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template.endswith("{# trained #}")
    gen = GenerationConfig.from_pretrained(out)
    assert gen.max_new_tokens == 77 and gen.eos_token_id == tok.convert_tokens_to_ids("</s>")


def test_merge_dtype_and_explicit_base(adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    base, adapter_dir = adapter
    cfg = json.loads(Path(adapter_dir, "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == base  # what merge.py falls back to without --base
    out = tmp_path / "merged_bf16"
    merge.main(["--adapter", adapter_dir, "--output", str(out), "--base", base, "--dtype", "bfloat16"])  # in-process
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_merge_refuses_a_folder_without_adapter(tmp_path):
    with pytest.raises(SystemExit) as e:
        merge.main(["--adapter", str(tmp_path), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()


def _hashes(*folders) -> dict:
    import hashlib

    return {str(f): hashlib.sha1(f.read_bytes()).hexdigest() for d in folders for f in sorted(Path(d).rglob("*"))
            if f.is_file()}


def _broken_adapter(kind: str, adapter_dir: str, tmp_path) -> str:
    import shutil

    bad = tmp_path / kind
    shutil.copytree(adapter_dir, bad)
    if kind == "no weights":
        (bad / "adapter_model.safetensors").unlink()
    elif kind == "cut config":
        text = (bad / "adapter_config.json").read_text()
        (bad / "adapter_config.json").write_text(text[: len(text) // 2])
    elif kind == "cut weights":
        data = (bad / "adapter_model.safetensors").read_bytes()
        (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return str(bad)


# adapter damage or base -> text of the message (instead of "Repo id must be in the form", JSONDecodeError, size mismatch)
INPUT_CASES = {
    "no weights": "no adapter weights",
    "cut config": "is not readable JSON",
    "cut weights": "is truncated",
    "base of another size": "another model size",
    "base missing": "does not exist",
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_merge_checks_both_folders_before_loading(case, adapter, tmp_path):
    base, adapter_dir = adapter
    args = ["--adapter", adapter_dir, "--output", str(tmp_path / "out")]
    if case == "base of another size":
        args += ["--base", build_model_dir(tmp_path / "bigger", "seed", hidden_size=96, intermediate_size=192)]
    elif case == "base missing":
        args += ["--base", str(tmp_path / "nowhere")]
    else:
        args[1] = _broken_adapter(case, adapter_dir, tmp_path)
    proc = subprocess.run([PYTHON, str(TOOLS / "merge.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert INPUT_CASES[case] in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["base", "adapter", "another finished model", "inside the base"])
def test_merge_never_writes_over_what_it_did_not_write(target, adapter, tmp_path):
    import shutil

    base, adapter_dir = adapter
    other = tmp_path / "other-model"
    shutil.copytree(base, other)
    out = {"base": base, "adapter": adapter_dir, "another finished model": str(other),
           "inside the base": str(Path(base) / "merged")}[target]
    before = _hashes(base, adapter_dir, other)
    for extra in ([], ["--overwrite_output_dir"]):
        proc = subprocess.run([PYTHON, str(TOOLS / "merge.py"), "--adapter", adapter_dir, "--output", out, *extra],
                              capture_output=True, text=True, cwd=ROOT)
        if target == "another finished model" and extra:
            assert proc.returncode == 0, proc.stderr[-3000:]  # asked for: replaced, in one rename
            assert (other / ".cai_owner.json").exists()
            assert sorted(p.name for p in tmp_path.iterdir()) == ["other-model"]  # no temporary folder left
            return
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "output:" in proc.stderr, proc.stderr[-3000:]
        assert _hashes(base, adapter_dir, other) == before


def test_merge_writes_beside_the_output_without_touching_existing_files(adapter, tmp_path):
    # A file named like a temporary folder (`<output>.partial`) belongs to the user: never written into or renamed.
    _, adapter_dir = adapter
    user_file = tmp_path / "merged.partial"
    user_file.write_text("mine")
    proc = subprocess.run([PYTHON, str(TOOLS / "merge.py"), "--adapter", adapter_dir, "--output",
                           str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert user_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.partial"]
