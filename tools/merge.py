"""Merge a LoRA or QLoRA adapter into its base model: one standalone model folder (vLLM, TGI, llama.cpp, ...).

```bash
python recipes/merge.py --adapter outputs/mistral-7b-cai-sft-qlora --output outputs/mistral-7b-cai-sft-merged
make merge ADAPTER=outputs/mistral-7b-cai-sft-qlora OUT=outputs/mistral-7b-cai-sft-merged
```
The base model is the adapter's `base_model_name_or_path` (adapter_config.json) unless `--base` is given. It
is loaded unquantized in `--dtype`: a QLoRA adapter is merged into the 16-bit base, as the QLoRA authors do
(rounding the merged weights back to 4 bits would lose most of the update). The tokenizer, chat template and
generation_config come from the adapter folder, where sft.py saved them, so the merged model renders
prompts and stops exactly like the trained one. Needs the base model's size in CPU RAM (about 15 GB for 7B
in bfloat16); no GPU.
"""

import argparse
import os

DTYPES = ("auto", "bfloat16", "float16", "float32")


def merge(adapter: str, output: str, base: str | None = None, dtype: str = "auto") -> str:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise SystemExit(f"--adapter {adapter}: no adapter_config.json there. Point it at a LoRA/QLoRA output_dir.")
    base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()

    has_tokenizer = any(os.path.isfile(os.path.join(adapter, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else base)
    try:
        generation_config = GenerationConfig.from_pretrained(adapter)
    except OSError:  # an adapter saved without one: keep the base model's
        generation_config = merged.generation_config
    merged.generation_config = generation_config

    merged.save_pretrained(output)  # safetensors
    tokenizer.save_pretrained(output)  # with chat_template.jinja
    print(f"Merged {adapter} into {base} ({merged.dtype}) -> {output}")
    if not tokenizer.chat_template:
        print("Warning: the tokenizer has no chat template; chat clients will not know how to render prompts.")
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="Folder with adapter_config.json + adapter_model.safetensors.")
    parser.add_argument("--output", required=True, help="Folder for the merged model.")
    parser.add_argument("--base", default=None, help="Base model (hub id or folder); default: from adapter_config.json.")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="Weights dtype; auto = the base's own.")
    args = parser.parse_args(argv)
    merge(args.adapter, args.output, args.base, args.dtype)


if __name__ == "__main__":
    main()
