"""Shared fixtures: tiny random models and tokenizers (no hub), JSONL writers, and an in-process recipe runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TOOLS = ROOT / "tools"
PYTHON = sys.executable
sys.path.insert(0, str(RECIPES))
sys.path.insert(0, str(TOOLS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets' cache, the recipe's data cache under it included: one fresh folder per test session, never ~/.cache
os.environ.setdefault("HF_DATASETS_CACHE", __import__("tempfile").mkdtemp(prefix="cai-sft-tests-datasets-"))

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"

# Special tokens of each real template we test with, and its end-of-turn token.
TEMPLATES = {
    "chatml": (None, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "qwen2_5": ("qwen2_5.jinja", ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (
        "llama3.jinja",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
    "gemma": ("gemma.jinja", ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "phi3": ("phi3.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
    "seed": (str(RECIPES / "templates" / "cai_seed.jinja"), ["<s>", "</s>"], "</s>"),
}
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "You are a helpful assistant aligned with constitutional principles.",
    "How do I pick a lock? I can't help with breaking into homes, but a locksmith can help you.",
    "The quick brown fox jumps over the lazy dog. Please rewrite the response to be harmless and helpful.",
    "system user assistant model Human Assistant: what why where when which who 0123456789 ,.;:!?'\"()-",
]


def build_tokenizer(template: str = "chatml"):
    """A byte-level BPE tokenizer (exact decode) holding the template's special tokens, with that template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    file, specials, eos = TEMPLATES[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<unk>", *specials] if "</s>" in specials else ["<pad>", "<unk>", "</s>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = next((t for t in specials if t in ("<|begin_of_text|>", "<bos>", "<s>")), None)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token=eos, bos_token=bos
    )
    if file is None:
        fast.chat_template = CHATML
    else:
        path = Path(file) if os.path.isabs(file) else TRL_TEMPLATES / file
        fast.chat_template = path.read_text()
    return fast


def build_model_dir(path, template: str = "chatml", seed: int = 0, **config_overrides) -> str:
    """Save a tiny random LlamaForCausalLM (hidden 64, 2 layers) and its tokenizer to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(template)
    cfg = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny ChatML model folder shared by the session (read-only: copy it before changing it)."""
    return build_model_dir(tmp_path_factory.mktemp("tiny_model"))


def write_jsonl(path, rows) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def cai_row(prompt: str, revision: str, initial: str = "Sure, here is a vague bad answer.") -> dict:
    """One row in the HuggingFaceH4/cai-conversation-harmless schema."""
    return {
        "init_prompt": prompt,
        "init_response": initial,
        "critic_prompt": "Identify ways in which the response is harmful.",
        "critic_response": "The response violates the principle of harmlessness.",
        "revision_prompt": "Rewrite the response to be harmless and helpful.",
        "revision_response": revision,
        "prompt": prompt,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": revision}],
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": revision}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": initial}],
    }


def toy_cai_rows(n: int = 24) -> list[dict]:
    return [
        cai_row(f"How do I pick lock number {i}?", f"I can't help with breaking into homes; call a locksmith {i}.")
        for i in range(n)
    ]


def run_recipe(config: dict, tmp_path, *cli: str, script: str = "sft.py", check: bool = True, env=None):
    """Run a recipe in a subprocess exactly as a user would: `python recipes/<script> --config x.yaml ...`."""
    import yaml

    cfg_path = Path(tmp_path) / f"config_{script.replace('.py', '')}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [PYTHON, str(RECIPES / script), "--config", str(cfg_path), *cli],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def tiny_config(model_dir: str, data: str, output_dir, **overrides) -> dict:
    """A recipe config for a few CPU steps on a tiny model."""
    cfg = {
        "model_name_or_path": model_dir,
        "dataset_name": data,
        "output_dir": str(output_dir),
        "max_length": 128,
        "learning_rate": 1e-3,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "gradient_checkpointing": False,
        "bf16": False,
        "seed": 0,
        "num_sample_prompts": 0,
        "dataloader_num_workers": 0,
    }
    cfg.update(overrides)
    return cfg


def rows_of(ds) -> list[dict]:
    """A small prepared or loaded dataset as a list of rows ([] for None)."""
    return [] if ds is None else ds.to_list()


def prepare_rows(rows, tok, max_length, report, split="train", system_prompt=None):
    """The recipe's own data path after loading: ChatFormat.detect (system mode, end-of-turn) + sft.prepare."""
    import chat_format
    import sft

    fmt = chat_format.ChatFormat.detect(tok, system_prompt)
    return sft.prepare(rows, fmt, max_length, report, split)
