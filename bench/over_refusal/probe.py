"""Over-refusal probe (no judge): how often an M_SFT's first 20 greedy tokens open by declining, on 60 benign and
60 harmful development prompts written for this probe (not the test sets), with and without the system prompt; and
the mean probability of "I" as the first answer token. A heuristic for comparing training choices quickly, not a
judgement: a refusal that starts late, or a compliance, is missed (docs/EVALUATION.md, "Over-refusal"). The
classifier is evaluate.py's (recipes/refusal.py); figures measured before 2026-12-03 used a looser regex that
matched a refusal phrase anywhere in the 20 tokens. It also prints the balanced refusal accuracy.

    python bench/over_refusal/probe.py outputs/smollm2-135m-cai-sft            # an adapter folder, or a model folder
    python bench/over_refusal/probe.py models/SmolLM2-135M-Instruct             # M_base
"""

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "recipes"))

import generation  # noqa: E402
import refusal  # noqa: E402
import quiet  # noqa: E402

DEMO_YAML = os.path.join(HERE, "..", "..", "recipes", "smollm2-135m", "sft_demo.yaml")  # the training system prompt


def load(path: str):
    """M_SFT from an output_dir: a LoRA adapter (on the base its adapter_config.json names, merged) or a full model,
    with the generation_config.json saved beside it."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
            os.path.join(path, "adapter_config.json")):
        raise SystemExit(f"{path}: no config.json or adapter_config.json; give an M_SFT output_dir (e.g. "
                         "outputs/smollm2-135m-cai-sft) or a model folder.")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        model = AutoPeftModelForCausalLM.from_pretrained(path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an M_SFT output_dir (adapter or full model), or a model folder such as M_base")
    ns = ap.parse_args()
    quiet.setup()  # e.g. bitsandbytes' optional-kernel message when peft imports it
    import yaml

    with open(DEMO_YAML, encoding="utf-8") as f:
        system_prompt = yaml.safe_load(f)["system_prompt"]
    model, tok = load(ns.model)
    first_i = tok.convert_tokens_to_ids("I")
    out, by_cond = {}, {}
    for name in ("dev_benign", "dev_harm"):
        rows = [json.loads(line) for line in open(os.path.join(HERE, f"{name}.jsonl"), encoding="utf-8")]
        for cond, system in (("system", [{"role": "system", "content": system_prompt}]), ("no_system", [])):
            convs = [system + [{"role": "user", "content": r["prompt"]}] for r in rows]
            answers = generation.generate_local(model, tok, convs, max_new_tokens=20, batch_size=16)
            declined = [refusal.is_refusal(a) for a in answers]
            refused = sum(declined)
            by_cond.setdefault(cond, {})[name] = declined
            p_i = []
            for c in convs:
                text = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
                with torch.no_grad():
                    p_i.append(model(ids).logits[0, -1].softmax(-1)[first_i].item())
            out[f"{name} {cond}"] = {"refusal_phrase": f"{refused}/{len(rows)}",
                                     "mean_p_first_I": round(sum(p_i) / len(p_i), 3)}
            print(f"{name:10s} {cond:9s} refusal phrase {refused:2d}/{len(rows)}  mean P(first token 'I') "
                  f"{sum(p_i) / len(p_i):.2f}")
    for cond, declined in by_cond.items():
        r = refusal.rates(declined.get("dev_harm"), declined.get("dev_benign"))
        out[f"balanced {cond}"] = r
        print(f"{cond:9s} harmful refused {r['harmful_refused']:.0%}, benign answered {1 - r['benign_refused']:.0%}, "
              f"balanced refusal accuracy {r['balanced_accuracy']:.0%}")
    return out


if __name__ == "__main__":
    main()
