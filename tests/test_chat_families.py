"""Nine chat families with their real templates (tests/templates/SOURCES.md) x three schemas x tricky rows.

Each template is paired with a tiny tokenizer holding the family's special tokens, of the family's kind:
byte-level BPE (SmolLM2, Llama 3.2, Qwen2.5), SentencePiece-style with a word-start marker prepended
(Mistral, Zephyr, Phi-3) or without (Gemma). With the defaults (no system-prompt or EOS flag) every example is
exact: the untrained prefix is, id for id, the inference prompt; the trained part is the answer as the template
renders it plus the end-of-turn token and nothing else; special-token text inside a response stays text.
"""

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_recipe, write_jsonl

import cai_data
import chat_format
import sft

TEMPLATES = Path(__file__).parent / "templates"
SYSTEM = cai_data.DEFAULT_SYSTEM_PROMPT
PROMPT = "How do I pick a lock?"
# (family: template file, tokenizer kind, bos, eos, other special tokens, end-of-turn, stop tokens, system mode)
FAMILIES = {
    "smollm2": ("byte", None, "<|im_end|>", ["<|im_start|>"], "<|im_end|>", ["<|im_end|>"], "system"),
    "llama3_2": ("byte", "<|begin_of_text|>", "<|eot_id|>",
                 ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>", "<|eom_id|>"], "<|eot_id|>",
                 ["<|eot_id|>"], "system"),
    "qwen2_5": ("byte", None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], "<|im_end|>", ["<|im_end|>"],
                "system"),
    "gemma2": ("never", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>",
               ["<end_of_turn>", "<eos>"], "fold"),
    "gemma3": ("never", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"], "<end_of_turn>",
               ["<end_of_turn>", "<eos>"], "system"),
    "mistral_v02": ("first", "<s>", "</s>", [], "</s>", ["</s>"], "fold"),
    "mistral_v03": ("first", "<s>", "</s>", ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                             "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], "</s>", ["</s>"],
                    "fold"),  # its template keeps the system message only while the user turn is the last one
    "zephyr": ("first", "<s>", "</s>", [], "</s>", ["</s>"], "system"),
    "phi3": ("first", "<s>", "<|endoftext|>", ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], "<|end|>",
             ["<|end|>", "<|endoftext|>"], "system"),
}  # fmt: skip
TRICKY = [
    'Here is JSON: {"ok": true}',
    '{"answer": "no"}',
    "(I can't help with that.)",
    ": a colon first",
    "  two leading spaces",
    "\nA newline first.",
    "Emoji are fine 🙂 here.",
    "Close tags like </s> and <|im_end|> and <end_of_turn> stay text.",
]


def family_tokenizer(family: str):
    """A tiny tokenizer of the family's kind with its special tokens and real chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    kind, bos, eos, others, *_ = FAMILIES[family]
    specials = ["<pad>", "<unk>"] + [t for t in (bos, eos) if t] + others
    corpus = [SYSTEM, PROMPT, *TRICKY, "system user assistant model INST Cutting Knowledge Date Today ipython"] * 4
    alphabet = sorted({c for line in corpus for c in line} | set("{}()[]:;,.<>|/_-\n '\"0123456789"))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "byte":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: spaces become "▁"; Llama/Mistral prepend one to a string, Gemma does not
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=kind, split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=kind, split=False)
        alphabet = alphabet + ["▁"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                        initial_alphabet=alphabet))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token=eos,
                                   bos_token=bos, additional_special_tokens=others)
    fast.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    return fast


def text_of(tok, family: str, ids: list[int]) -> str:
    """The text of `ids` piece by piece (no decoder clean-up), to see a leading word-start marker if one slipped in."""
    if FAMILIES[family][0] == "byte":
        return tok.decode(ids)
    return "".join(tok.convert_ids_to_tokens(ids)).replace("▁", " ")


def rows_of(schema: str, prompt: str, response: str) -> dict:
    if schema == "cai":
        return {"prompt": prompt, "init_prompt": prompt, "init_response": "Sure, here is how.",
                "revision_response": response, "chosen": "x"}  # fmt: skip
    if schema == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    return {"prompt": prompt, "completion": response}


def load(tmp_path, schema, rows, system_prompt=SYSTEM):
    path = write_jsonl(tmp_path / f"{schema}.jsonl", rows)

    class Script:
        dataset_name, dataset_config, dataset_train_split, dataset_test_split = path, None, "train", "test"

    return cai_data.load_pairs(Script, cai_data.CAIDataArguments(eval_fraction=0.0, system_prompt=system_prompt))


@pytest.mark.parametrize("schema", ["cai", "messages", "pc"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_defaults_exact(tmp_path, family, schema):
    kind, bos, eos, others, end, stops, mode = FAMILIES[family]
    tok = family_tokenizer(family)
    original = tok.chat_template
    tricky = [*TRICKY[:-1], f"Close tags like {end} stay text."]  # the family's own end-of-turn text
    rows = [rows_of(schema, f"{PROMPT} ({i})", r) for i, r in enumerate(tricky)]
    rows += [rows_of(schema, "Say nothing.", " "), rows_of(schema, f"Repeat {end} please.", "No.")]
    train, _, report = load(tmp_path, schema, rows)
    fmt = chat_format.ChatFormat.detect(tok, SYSTEM)  # the defaults: no system-prompt mode, no eos_token
    assert (fmt.mode, fmt.end_of_turn) == (mode, end)
    assert fmt.stop_token_ids == tok.convert_tokens_to_ids(stops)
    ds = sft.prepare(train, fmt, 512, report, "train")

    end_id = tok.convert_tokens_to_ids(end)
    special_ids = set(chat_format.control_tokens(tok).values())
    by_row = {ex["row"]: ex for ex in ds}
    for i, response in enumerate(tricky):
        ex = by_row[i]
        ids, labels = ex["input_ids"], ex["labels"]
        n = next(k for k, lab in enumerate(labels) if lab != -100)
        user = {"role": "user", "content": f"{PROMPT} ({i})"}
        messages = [{"role": "system", "content": SYSTEM}, user]
        # the prefix is the inference prompt of the model's OWN template (the oracle: not the recipe's wrap), with
        # the system prompt as its system role, or folded into the user turn where it has none
        own_messages = messages if mode == "system" else [
            {"role": "user", "content": SYSTEM + "\n\n" + user["content"]}]
        own = tok.apply_chat_template(own_messages, chat_template=original, add_generation_prompt=True,
                                      tokenize=True, return_dict=True, date_string="26 Jul 2024")["input_ids"]
        assert ids[:n] == own, (family, schema, i)
        # ... and what a deployment of M_SFT feeds it: the template saved with M_SFT renders the same ids
        inference = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ids[:n] == inference["input_ids"], (family, schema, i)
        # the trained part: the answer as the template renders it, then the end-of-turn token, nothing after
        assert labels[n:] == ids[n:] and ids[-1] == end_id
        answer = tok.apply_chat_template([*own_messages, {"role": "assistant", "content": response}],
                                         chat_template=original, tokenize=False, date_string="26 Jul 2024")
        answer = answer[len(tok.apply_chat_template(own_messages, chat_template=original, tokenize=False,
                                                    add_generation_prompt=True, date_string="26 Jul 2024")):]
        answer = answer[: answer.rindex(end)]
        assert text_of(tok, family, ids[n:-1]) == answer, (family, schema, i)
        assert not special_ids & set(ids[n:-1])  # special-token text stayed text
    empty = "messages: empty or non-string content" if schema == "messages" else "response empty or whitespace"
    assert report.dropped == {empty: 1, "train: prompt contains special-token text": 1}
    assert report.changed["train: response holds special-token text (trained as plain text)"] == 1


def test_fold_and_date_reproduced_by_saved_template(tmp_path):
    # Gemma-2 refuses a system role: folded. Llama 3.2 writes today's date: fixed. Both through the saved template.
    gemma = family_tokenizer("gemma2")
    chat_format.ChatFormat.detect(gemma, SYSTEM)
    gemma.save_pretrained(tmp_path / "g")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "g")
    text = again.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                                     tokenize=False, add_generation_prompt=True)
    assert text == f"<bos><start_of_turn>user\n{SYSTEM}\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    llama = family_tokenizer("llama3_2")
    fmt = chat_format.ChatFormat.detect(llama, SYSTEM)
    assert "Today Date: 26 Jul 2024" in fmt.render_prompt([{"role": "user", "content": "Hi"}])
    other = family_tokenizer("llama3_2")
    assert "Today Date: 01 Jan 2030" in chat_format.ChatFormat.detect(other, SYSTEM, date="01 Jan 2030").render_prompt(
        [{"role": "user", "content": "Hi"}])


def test_boundary_merge_cannot_happen_exact_ids():
    # Mistral v0.2 + a response starting with "{": the prompt ends "[/INST]" and "]{" must not become one token.
    tok = family_tokenizer("mistral_v02")
    fmt = chat_format.ChatFormat.detect(tok, None)
    messages = fmt.prompt_messages([{"role": "user", "content": "Give JSON"}])
    prompt_ids, completion = fmt.tokenize(messages, '{"a": 1}')
    assert prompt_ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
    assert tok.convert_ids_to_tokens(prompt_ids)[-1] == "]"
    assert "".join(tok.convert_ids_to_tokens(completion)) == '{"a":▁1}</s>'


def test_exact_golden_ids_phi3():
    # Phi-3 (Llama-style tokenizer): tokenizing "No." alone gives "▁No." (a word-start marker the model never sees
    # after "<|assistant|>\n"); the completion must be "N o . <|end|>", and the prompt the inference ids.
    tok = family_tokenizer("phi3")
    fmt = chat_format.ChatFormat.detect(tok, SYSTEM)
    prompt_ids, completion = fmt.tokenize(fmt.prompt_messages(cai_data.prompt_messages("Hi", SYSTEM)), "No.")
    assert prompt_ids == [7, 8, 151, 294, 327, 281, 4, 8, 5, 8, 37, 56, 4, 8, 6, 8]
    assert tok.convert_ids_to_tokens(prompt_ids)[:2] + tok.convert_ids_to_tokens(prompt_ids)[-4:] == [
        "<|system|>", "\n", "<|end|>", "\n", "<|assistant|>", "\n"]
    assert completion == [41, 62, 16, 4]
    assert tok.convert_ids_to_tokens(completion) == ["N", "o", ".", "<|end|>"]
    assert tok.convert_ids_to_tokens(tok("No.", add_special_tokens=False)["input_ids"])[0] == "▁"


@pytest.mark.parametrize("override, message", [
    ("<eos>", "never closes the assistant's answer in this chat template (it emits '<end_of_turn>')"),
    ("<nope>", "is not a token of this tokenizer"),
])  # fmt: skip
def test_eos_override_errors_name_the_emitted_token(override, message):
    with pytest.raises(chat_format.TemplateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        chat_format.ChatFormat.detect(family_tokenizer("gemma2"), SYSTEM, eos_token=override)


def test_system_mode_system_refused_where_template_has_none():
    with pytest.raises(chat_format.TemplateError, match="does not render a system message"):
        chat_format.ChatFormat.detect(family_tokenizer("gemma2"), SYSTEM, mode="system")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dry_run_demo_settings_every_family(tmp_path, family):
    """sft.py --dry_run with the demo YAML, only the model and the data changed: cai, messages and pc sources."""
    from transformers import LlamaConfig

    model = tmp_path / "model"
    tok = family_tokenizer(family)
    tok.save_pretrained(model)
    LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(model)
    cfg = yaml.safe_load((ROOT / "recipes/smollm2-135m/sft_demo.yaml").read_text())
    cfg["model_name_or_path"] = str(model)
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["datasets"] = [
        {"path": write_jsonl(tmp_path / f"{s}.jsonl", [rows_of(s, f"{s} question {i}?", r)
                                                        for i, r in enumerate(TRICKY * 2)])}
        for s in ("cai", "messages", "pc")
    ]
    proc = run_recipe(cfg, tmp_path, "--dry_run")
    assert "Traceback" not in proc.stderr
    preview = [json.loads(line) for line in (tmp_path / "out" / "preview.jsonl").read_text().splitlines()]
    assert len(preview) >= 3 * 12
    end_id = tok.convert_tokens_to_ids(FAMILIES[family][4])
    for ex in preview:
        assert ex["input_ids"][-1] == end_id and ex["labels"][-1] == end_id
        assert ex["input_ids"].count(end_id) >= 1


def test_trained_model_saves_fold_template_and_every_stop_token(tmp_path):
    """Gemma-2 end to end with the defaults: the saved template folds the system prompt, generation_config stops at
    <end_of_turn> and <eos>."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    model = tmp_path / "model"
    tok = family_tokenizer("gemma2")
    tok.save_pretrained(model)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(model)
    from conftest import tiny_config

    data = write_jsonl(tmp_path / "d.jsonl", [rows_of("cai", f"Question {i}?", "No, sorry.") for i in range(12)])
    cfg = tiny_config(str(model), data, tmp_path / "out", max_steps=2, eval_strategy="no")
    run_recipe(cfg, tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = saved.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                                     tokenize=False, add_generation_prompt=True)
    assert text == f"<bos><start_of_turn>user\n{SYSTEM}\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    stops = GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id
    assert stops == tok.convert_tokens_to_ids(["<end_of_turn>", "<eos>"])


def test_saved_template_detected_again_keeps_fold_and_date():
    # evaluate.py / generate_revisions.py load M_SFT's saved template and detect again: same fold, same date.
    tok = family_tokenizer("gemma2")
    first = chat_format.ChatFormat.detect(tok, SYSTEM, date="01 Jan 2030")
    again = chat_format.ChatFormat.detect(tok, SYSTEM)  # tok now holds the wrapped template
    assert (again.mode, again.template) == ("fold", first.template)
    assert again.template.count(chat_format.WRAPPER_MARK) == 1 and "01 Jan 2030" in again.template
    off = chat_format.ChatFormat.detect(tok, None, mode="off")
    assert "fold=False" in off.template and off.template.count(chat_format.WRAPPER_MARK) == 1


def test_eos_override_after_the_end_of_turn_token_is_refused():
    # Phi-3 writes <|end|> then <|endoftext|>: ending at the second would train "<|end|>\n" as text.
    with pytest.raises(chat_format.TemplateError, match="comes after '<\\|end\\|>'"):
        chat_format.ChatFormat.detect(family_tokenizer("phi3"), SYSTEM, eos_token="<|endoftext|>")
    assert chat_format.ChatFormat.detect(family_tokenizer("phi3"), SYSTEM, eos_token="<|end|>").end_of_turn == "<|end|>"


def test_chat_template_path_is_wrapped_in_training_and_saved(tmp_path):
    """A template given by file (Gemma-2's, no system role) is folded in training and in the saved M_SFT (TRL
    would otherwise re-read the raw file)."""
    import torch
    from conftest import tiny_config
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model = tmp_path / "model"
    tok = family_tokenizer("gemma2")
    tok.chat_template = None
    tok.save_pretrained(model)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(model)
    data = write_jsonl(tmp_path / "d.jsonl", [rows_of("pc", f"Question {i}?", "No, sorry.") for i in range(12)])
    cfg = tiny_config(str(model), data, tmp_path / "out", max_steps=2, eval_strategy="steps", eval_steps=2,
                      chat_template_path=str(TEMPLATES / "gemma2.jinja"), eval_fraction=0.25)
    run_recipe(cfg, tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = saved.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                                     tokenize=False, add_generation_prompt=True)
    assert text == f"<bos><start_of_turn>user\n{SYSTEM}\n\nHi<end_of_turn>\n<start_of_turn>model\n"
