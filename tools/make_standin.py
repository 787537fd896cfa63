"""Build models/mistral-7b-standin/: Mistral-7B's real config.json (no weights) and a small stand-in tokenizer.

`make train-7b DRY_RUN=1` runs recipes/mistral-7b/sft_qlora.yaml against it offline: the dry run reads the
config and tokenizer, renders the seed chat template, tokenizes the data and writes preview.jsonl, and
never loads weights. The tokenizer is NOT Mistral's (that needs the hub): it is a BPE trained here on the
bundled data, with Mistral's special tokens at Mistral's ids (<unk>=0, <s>=1, </s>=2) and its
"<s> + text" post-processor, so token counts differ from the real run but the masking logic is the same.

```bash
python tools/make_standin.py --output models/mistral-7b-standin
```
"""

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))

import cai_data  # noqa: E402
import checks  # noqa: E402
import entry  # noqa: E402
import run_dir  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]  # Mistral-7B-v0.1 ids 0, 1, 2
CORPUS = [
    "<|system|>\nYou are a helpful assistant aligned with constitutional principles.\n<|user|>\n",
    "<|assistant|>\nI can't help with that, but here is a safer alternative.",
]


def mistral_config():
    """Mistral-7B-v0.1's config.json, as published (MistralConfig defaults plus the released values)."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        architectures=["MistralForCausalLM"],
        dtype="bfloat16",
    )


def corpus_lines(data_file: str | None):
    yield from CORPUS * 8
    if data_file:
        for row in cai_data.read_local(data_file):
            yield from (str(v) for v in row.values() if isinstance(v, str))


def standin_tokenizer(data_file: str | None, vocab_size: int):
    """Byte-level BPE (every string encodes, decode is exact) holding Mistral's specials at Mistral's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus_lines(data_file), trainer)
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    # Mistral's tokenizer prepends <s> to every encoded text (add_bos_token=True, add_eos_token=False).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=32768
    )


@dataclass
class StandinArguments:
    output: str = field(default="models/mistral-7b-standin", metadata={"help": "Folder to write."})
    data_file: str | None = field(default="data/cai_train.jsonl", metadata={"help": "Text to train the stand-in BPE on."})
    vocab_size: int = field(default=2000, metadata={"help": "Stand-in vocabulary size (>= 260: bytes + specials)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into an --output that holds files."})


def problems(cfg: dict) -> list[str]:
    p = checks.range_problems(cfg)
    data_file = cfg.get("data_file")
    if data_file and not os.path.isfile(data_file):
        p.append(f"data_file: {data_file} does not exist{checks.where(data_file)}. Fix the path (or --data_file '' for "
                 "the built-in text only).")
    return p + run_dir.folder_problems("output", cfg.get("output"), "make_standin.py",
                                       bool(cfg.get("overwrite_output_dir")), {"data_file": data_file})


def build(args: StandinArguments) -> str:
    run_dir.RunLock(args.output, "make_standin.py", inside=False).acquire()  # next to it: replaced whole
    tmp = args.output.rstrip("/") + ".partial"
    os.makedirs(tmp, exist_ok=True)
    mistral_config().save_pretrained(tmp)
    standin_tokenizer(args.data_file, args.vocab_size).save_pretrained(tmp)
    with open(os.path.join(tmp, "STANDIN.md"), "w", encoding="utf-8") as f:
        f.write(
            "Stand-in for mistralai/Mistral-7B-v0.1: real config.json, NO weights, a small local BPE tokenizer "
            "with Mistral's special tokens. For `--dry_run` only. Built by tools/make_standin.py.\n"
        )
    run_dir.claim(tmp, "make_standin.py")
    run_dir.replace_folder(tmp, args.output)
    print(f"Wrote {args.output}: Mistral-7B config.json (no weights) + stand-in tokenizer ({args.vocab_size} tokens).")
    return args.output


def main(argv=None):
    from trl import TrlParser

    return entry.run(build, TrlParser((StandinArguments,)), problems, argv)


if __name__ == "__main__":
    main()
