"""Merge a LoRA or QLoRA adapter into its base model: one standalone model folder (vLLM, TGI, llama.cpp, ...).

```bash
python tools/merge.py --adapter outputs/mistral-7b-cai-sft-qlora --output outputs/mistral-7b-cai-sft-merged
make merge ADAPTER=outputs/mistral-7b-cai-sft-qlora OUT=outputs/mistral-7b-cai-sft-merged
```
The base model is the adapter's `base_model_name_or_path` (adapter_config.json) unless `--base` is given. It
is loaded unquantized in `--dtype`: a QLoRA adapter is merged into the 16-bit base, as the QLoRA authors do
(rounding the merged weights back to 4 bits would lose most of the update). The tokenizer, chat template and
generation_config come from the adapter folder, where sft.py saved them, so the merged model renders
prompts and stops exactly like the trained one. Needs the base model's size in CPU RAM (about 15 GB for 7B
in bfloat16); no GPU.

Before anything loads, both folders are checked (adapter_config.json readable, adapter weights present and whole,
the base's weight shapes match the adapter's) and so is `--output`: never the base or the adapter folder, and a
folder holding anything else only with `--overwrite_output_dir`. The model is written to a new hidden folder next
to the output and renamed when complete.
"""

import json
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))

import checks  # noqa: E402
import entry  # noqa: E402
import env  # noqa: E402
import run_dir  # noqa: E402

DTYPES = ("auto", "bfloat16", "float16", "float32")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class MergeArguments:
    adapter: str | None = field(default=None, metadata={"help": "Folder with adapter_config.json + adapter weights."})
    output: str | None = field(default=None, metadata={"help": "Folder for the merged model."})
    base: str | None = field(default=None, metadata={"help": "Base model (hub id or folder); default: from "
                                                              "adapter_config.json."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype; auto = the base's own.",
                                                 "choices": DTYPES})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into an --output that holds files."})


def make_parser():
    from trl import TrlParser

    return TrlParser((MergeArguments,))


def adapter_config(adapter: str) -> tuple[dict | None, list[str]]:
    """(adapter_config.json, problems) of an adapter folder."""
    path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isdir(adapter):
        return None, [f"adapter: {adapter} is not a folder{checks.where(adapter)}. Point --adapter at the output_dir "
                      "of a LoRA/QLoRA run of sft.py."]
    if not os.path.isfile(path):
        return None, [f"adapter: no adapter_config.json in {adapter}. Point --adapter at a LoRA/QLoRA output_dir (a "
                      "full fine-tune needs no merge)."]
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        return None, [f"adapter: {path} is not readable JSON ({e}); the file is cut off or damaged. Copy it again "
                      "from the training run."]
    if not isinstance(config, dict):
        return None, [f"adapter: {path} must hold a JSON object."]
    problems = []
    weights = [n for n in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(adapter, n))]
    if not weights:
        problems.append(f"adapter: {adapter} has adapter_config.json but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})"
                        ". Copy the whole output_dir of the training run.")
    elif weights[0].endswith(".safetensors"):
        problem = run_dir.safetensors_problem(os.path.join(adapter, weights[0]))
        if problem:
            problems.append(f"adapter: {problem}. Copy the file again from the training run.")
    return config, problems


def _header(path: str) -> dict:
    """{tensor name: shape} from a safetensors file's JSON header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def base_shapes(base: str) -> dict | None:
    """{weight name: shape} of a local base model folder, or None if it has no safetensors weights to read."""
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [n for n in os.listdir(base) if n.endswith(".safetensors")]
    shapes = {}
    for name in files:
        shapes.update(_header(os.path.join(base, name)))
    return shapes or None


def shape_problems(adapter: str, base: str) -> list[str]:
    """The base's weights must have the in/out sizes that the adapter's LoRA matrices were trained for."""
    path = os.path.join(adapter, "adapter_model.safetensors")
    shapes = base_shapes(base) if os.path.isfile(path) else None
    if not shapes:
        return []
    problems = []
    for name, shape in _header(path).items():
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):  # A: (r, in), B: (out, r)
            if not name.endswith(part):
                continue
            target = name.removeprefix("base_model.model.").removesuffix(part) + ".weight"
            found = shapes.get(target)
            if found is None:
                problems.append(f"base: {base} has no weight {target}, which the adapter adapts. Is --base the model "
                                "the adapter was trained on?")
            elif len(found) == 2 and found[dim] != shape[dim]:
                problems.append(f"base: {target} is {list(found)} in {base}, but the adapter was trained on one with "
                                f"{'in' if dim else 'out'}_features {shape[dim]}: another model size. Set --base to "
                                "the model the adapter was trained on.")
        if len(problems) >= 3:
            break
    return problems


def problems(cfg: dict) -> list[str]:
    """Every check on the folders, before any library sees them."""
    adapter, output, base = cfg.get("adapter"), cfg.get("output"), cfg.get("base")
    p = []
    if not adapter:
        p.append("adapter: not set. Give --adapter <the LoRA/QLoRA output_dir of sft.py>.")
    if not output:
        p.append("output: not set. Give --output <a new folder for the merged model>.")
    if p:
        return p
    config, p = adapter_config(adapter)
    if config is not None and not base:
        base = config.get("base_model_name_or_path")
        if not base:
            p.append(f"base: {adapter}/adapter_config.json names no base_model_name_or_path; give --base.")
    if base and os.path.isdir(base):
        if not os.path.isfile(os.path.join(base, "config.json")):
            p.append(f"base: {base} has no config.json; point --base at the base model's folder.")
        elif not p:
            p += shape_problems(adapter, base)
    elif base and env.is_local_path(base):
        p.append(f"base: {base} does not exist{checks.where(base)}. Give --base the base model's folder or hub id.")
    p += run_dir.folder_problems("output", output, "merge.py", bool(cfg.get("overwrite_output_dir")),
                                 {"adapter": adapter, "base": base})
    return p


def merge(adapter: str, output: str, base: str | None = None, dtype: str = "auto", overwrite: bool = False) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    found = problems({"adapter": adapter, "output": output, "base": base, "overwrite_output_dir": overwrite})
    if found:
        raise checks.ConfigError(found)
    run_dir.RunLock(output, "merge.py", inside=False).acquire()  # next to it: the folder is replaced whole
    base = base or adapter_config(adapter)[0]["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()

    has_tokenizer = any(os.path.isfile(os.path.join(adapter, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else base)
    try:
        generation_config = GenerationConfig.from_pretrained(adapter)
    except OSError:  # an adapter saved without one: keep the base model's
        generation_config = merged.generation_config
    merged.generation_config = generation_config

    tmp = run_dir.fresh_sibling(output)  # a new folder: never a file that was there before
    merged.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)  # with chat_template.jinja
    run_dir.claim(tmp, "merge.py")
    run_dir.replace_folder(tmp, output)
    print(f"Merged {adapter} into {base} ({merged.dtype}) -> {output}")
    if not tokenizer.chat_template:
        print("Warning: the tokenizer has no chat template; chat clients will not know how to render prompts.")
    return output


def main(argv=None):
    def run(args: MergeArguments):
        return merge(args.adapter, args.output, args.base, args.dtype, args.overwrite_output_dir)

    return entry.run(run, make_parser(), problems, argv)


if __name__ == "__main__":
    import quiet

    quiet.setup()  # library messages that are not the user's to act on (recipes/quiet.py)
    main()
