"""Render (P, R_revised) with the model's chat template; tokenize the prompt and the completion apart.

One `ChatFormat` per tokenizer, detected once and used by training, the dry run, evaluation, generation and
the chat template saved with M_SFT, so that all of them see the same tokens:

- system role: `auto` uses the template's system role where it renders one, and otherwise folds the system
  prompt into the first user turn (Gemma-2, Mistral v0.1/v0.2 refuse a system message); `system`, `fold` and
  `off` force a mode. The fold is written into the template itself, so inference renders the same way.
- end-of-turn token: the control token the template writes right after the assistant's answer (`<|im_end|>`,
  `<|eot_id|>`, `<end_of_turn>`, Phi-3's `<|end|>`, `</s>`). It is the last trained token, and it and the
  tokenizer's own EOS are the stop tokens saved in generation_config.
- boundary-exact tokens: prompt ids are exactly `apply_chat_template(prompt, add_generation_prompt=True)`, the
  ids a deployment feeds the model; the completion is tokenized on its own, so a response starting with `{`
  never merges with the prompt's last character. Special-token text inside a response stays text.
- a fixed date for templates that insert today's date (Llama 3.x), so the same data tokenizes the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SYSTEM_MODES = ("auto", "system", "fold", "off")
DEFAULT_TEMPLATE_DATE = "26 Jul 2024"  # Llama 3.x templates' own fallback date
WRAPPER_MARK = "{#- cai-sft chat format"
WRAPPER_END = "{#- end of the cai-sft prelude #}"
_PROBE_SYSTEM, _PROBE_USER, _PROBE_ANSWER = "CAIPROBESYSTEM", "CAIPROBEUSER", "CAIPROBEANSWER"
_ANCHORS = ("\n", "\n\n", ".", " .")  # plain text that completion tokens are tokenized after (see text_ids)


class TemplateError(ValueError):
    """The chat template cannot be trained on as configured: the message names the template's behaviour and fix."""


class RowProblem(ValueError):
    """Why one example cannot be tokenized exactly; `reason` is what the data report counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason + (f" ({detail})" if detail else ""))
        self.reason, self.detail = reason, detail


def load_tokenizer(name_or_path: str, chat_template_path: str | None = None, **kwargs):
    """The model's tokenizer with its own chat template, or the one in `chat_template_path` (a .jinja file)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if chat_template_path:
        if not os.path.isfile(chat_template_path):
            raise TemplateError(f"chat_template_path: {chat_template_path} does not exist. Fix the path.")
        with open(chat_template_path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    if not tokenizer.chat_template:
        raise TemplateError(
            f"{name_or_path}: the tokenizer has no chat template (a base model?). Set `chat_template_path: "
            "recipes/templates/cai_seed.jinja` (or your own .jinja file) in the YAML."
        )
    return tokenizer


def control_tokens(tokenizer) -> dict[str, int]:
    """{text: id} of every special token: the named ones and the added tokens flagged special."""
    found = {t: i for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}
    for i, added in tokenizer.added_tokens_decoder.items():
        if added.special:
            found[added.content] = i
    return found


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _renders_system(tokenizer, template: str) -> tuple[bool, str]:
    """Whether the template renders a system message, both in the inference prompt and in a training example
    (Mistral v0.3 keeps it only while the user turn is the last message), and why not."""
    system = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
    try:
        prompt = _render(tokenizer, template, system, True)
        full = _render(tokenizer, template, [*system, {"role": "assistant", "content": _PROBE_ANSWER}], False)
    except Exception as e:  # noqa: BLE001 - templates refuse with raise_exception (a jinja TemplateError)
        return False, f"it raises {str(e).strip()!r}"
    if _PROBE_SYSTEM not in prompt:
        return False, "it drops the system message"
    if _PROBE_SYSTEM not in full:
        return False, "it drops the system message once the answer follows"
    return True, ""


def wrap_template(template: str, fold: bool, date: str | None) -> str:
    """The model's template behind a short prelude: a fixed date, and the system message folded into the
    first user turn when `fold`. Saved with M_SFT, so that inference renders as training did."""
    lines = [f"{WRAPPER_MARK}: fold={fold}, date={date!r} (recipes/chat_format.py) #}}"]
    if date:
        lines.append("{%- if date_string is not defined %}{%- set date_string = " + repr(date) + " %}{%- endif %}")
    if fold:
        lines.append(
            "{%- if messages and messages[0]['role'] == 'system' %}"
            "{%- if messages|length > 1 and messages[1]['role'] == 'user' %}"
            "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + "
            "messages[1]['content']}] + messages[2:] %}"
            "{%- else %}{%- set messages = [{'role': 'user', 'content': messages[0]['content']}] + messages[1:] %}"
            "{%- endif %}{%- endif %}"
        )
    return "\n".join([*lines, WRAPPER_END]) + "\n" + template


def unwrap_template(template: str) -> tuple[str, str | None]:
    """(the model's own template, the date the prelude fixed) of a template saved with M_SFT; others unchanged."""
    if WRAPPER_MARK not in template or WRAPPER_END not in template:
        return template, None
    head, own = template.split(WRAPPER_END + "\n", 1)
    date = re.search(r"date=('([^']*)'|None)", head)
    return own, (date.group(2) if date and date.group(2) is not None else None)


@dataclass
class ChatFormat:
    """How every prompt is rendered and every example tokenized for one tokenizer (see the module docstring)."""

    tokenizer: object
    template: str  # the model's template behind the prelude of `wrap_template`; installed on the tokenizer
    mode: str  # system | fold | off, after `auto` was resolved
    end_of_turn: str
    end_of_turn_id: int
    stop_token_ids: list[int]
    answer_prefix: str  # template text between the generation prompt and the answer (usually "")
    answer_suffix: str  # template text after the answer: the end-of-turn token and what follows it
    notes: list[str]  # what was detected, said once by the caller
    controls: dict[str, int]  # control_tokens(tokenizer), read once: looked up for every row

    @classmethod
    def detect(cls, tokenizer, system_prompt: str | None = None, mode: str = "auto", eos_token: str | None = None,
               date: str | None = DEFAULT_TEMPLATE_DATE) -> ChatFormat:
        """Resolve the system mode, detect the end-of-turn token, and install the wrapped template on `tokenizer`."""
        if mode not in SYSTEM_MODES:
            raise TemplateError(f"system_prompt_mode: {mode!r} is not one of {list(SYSTEM_MODES)}.")
        # A saved M_SFT's template: detect on the model's own template again, keeping the date it was trained with.
        original, saved_date = unwrap_template(tokenizer.chat_template)
        if saved_date is not None and date == DEFAULT_TEMPLATE_DATE:
            date = saved_date
        notes = []
        has_system, why = _renders_system(tokenizer, original)
        if mode == "auto":
            mode = "system" if has_system else "fold"
            if mode == "fold" and system_prompt:
                notes.append(f"system prompt: the chat template has no system role ({why}); the system prompt is "
                             "folded into the first user turn, in training and in the saved template "
                             "(system_prompt_mode: fold; `off` drops it)")
            else:
                notes.append(f"system prompt: {'sent as the system role' if system_prompt else 'none'} "
                             f"(system_prompt_mode: auto)")
        elif mode == "system" and not has_system:
            raise TemplateError(
                f"system_prompt_mode: system, but the chat template does not render a system message ({why}). Use "
                "`system_prompt_mode: auto` or `fold` (the system prompt goes into the first user turn), or `off`."
            )
        template = wrap_template(original, mode == "fold", date)
        if "strftime_now" in original and "date_string" not in original:
            notes.append("the template writes today's date with strftime_now (not through date_string): its prompts "
                         "change from day to day, and template_date cannot fix them")
        tokenizer.chat_template = template

        user = [{"role": "user", "content": _PROBE_USER}]
        try:
            prompt = _render(tokenizer, template, user, True)
            full = _render(tokenizer, template, [*user, {"role": "assistant", "content": _PROBE_ANSWER}], False)
        except Exception as e:  # noqa: BLE001 - any template failure on a plain user/assistant exchange
            raise TemplateError(f"the chat template cannot render a user/assistant exchange: {e}") from None
        if not full.startswith(prompt) or _PROBE_ANSWER not in full[len(prompt):]:
            raise TemplateError(
                "the chat template renders the prompt differently once the answer is added (the text before the "
                "answer is not the generation prompt), so training would not match inference. Use a template "
                "whose `add_generation_prompt=True` output is the start of the rendered conversation."
            )
        prefix, suffix = full[len(prompt):].split(_PROBE_ANSWER, 1)
        controls = control_tokens(tokenizer)
        suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        emitted = [tokenizer.convert_ids_to_tokens(i) for i in suffix_ids if i in controls.values()]
        if eos_token:
            if eos_token not in controls and eos_token not in tokenizer.get_vocab():
                raise TemplateError(f"eos_token: {eos_token!r} is not a token of this tokenizer. Remove `eos_token` "
                                    "(the end-of-turn token is detected from the chat template).")
            if eos_token not in suffix:
                does = f"it emits {emitted[0]!r}" if emitted else f"it writes {suffix!r} and no special token"
                raise TemplateError(
                    f"eos_token: {eos_token!r} never closes the assistant's answer in this chat template ({does}). "
                    f"Remove `eos_token` (it is detected){f' or set it to {emitted[0]!r}' if emitted else ''}."
                )
            if emitted and emitted[0] != eos_token:
                raise TemplateError(
                    f"eos_token: {eos_token!r} comes after {emitted[0]!r} in this chat template, which ends the "
                    f"answer first; the tokens between them would be trained as text. Remove `eos_token` (it is "
                    f"detected as {emitted[0]!r})."
                )
            end = eos_token
            notes.append(f"end-of-turn token: {end!r} (eos_token)")
        elif emitted:
            end = emitted[0]
            notes.append(f"end-of-turn token: {end!r}, detected from the chat template")
        else:
            raise TemplateError(
                f"the chat template closes the assistant's answer with {suffix!r} and no special token, so a model "
                "trained on it never learns to stop. Use a template that ends the answer with the EOS token (e.g. "
                "`chat_template_path: recipes/templates/cai_seed.jinja`), or set `eos_token`."
            )
        end_id = tokenizer.convert_tokens_to_ids(end)
        stops = [end_id] + [i for i in (tokenizer.eos_token_id,) if i is not None and i != end_id]
        suffix = suffix[suffix.index(end):]
        return cls(tokenizer, template, mode, end, end_id, stops, prefix, suffix, notes, controls)

    def fingerprint(self) -> dict:
        """What decides this format's tokens, for the data cache's key: the tokenizer's model, normalizer and
        special tokens, its settings, the installed template, the system mode and the end-of-turn token."""
        import hashlib
        import json

        tok = self.tokenizer
        backend = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else json.dumps(
            sorted(tok.get_vocab().items()))
        settings = {k: v for k, v in tok.init_kwargs.items() if k != "name_or_path" and not k.endswith("_file")}
        return {"class": type(tok).__name__, "backend": hashlib.sha256(backend.encode()).hexdigest(),
                "settings": json.dumps(settings, sort_keys=True, default=str), "template": self.template,
                "mode": self.mode, "end_of_turn": self.end_of_turn}

    # ----------------------------------------------------------------------------------------- render

    def prompt_messages(self, context: list[dict]) -> list[dict]:
        """The conversation up to the user's P as the template receives it: a system turn stays the system role
        (the wrapped template folds it where the model has none); mode `off` sends no system message at all."""
        return [m for m in context if m["role"] != "system"] if self.mode == "off" else list(context)

    def render_prompt(self, messages: list[dict]) -> str:
        return _render(self.tokenizer, self.template, messages, True)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Exactly the ids a deployment feeds M_SFT: the template with the generation prompt."""
        return self.tokenizer(self.render_prompt(messages), add_special_tokens=False)["input_ids"]

    # ----------------------------------------------------------------------------------------- tokenize

    def text_ids(self, text: str) -> list[int]:
        """Ids of `text` as plain text (special-token text stays text), tokenized as a continuation: after an
        anchor, so that tokenizers that prepend a word-start marker to a string (Llama/Mistral) do not."""
        def encode(s):
            return self.tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

        for anchor in _ANCHORS:
            head, ids = encode(anchor), encode(anchor + text)
            if ids[: len(head)] == head:
                return ids[len(head):]
        return encode(text)

    def tokenize(self, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of one example; the completion is the answer as the template renders it
        plus the end-of-turn token, and nothing after it. Raises RowProblem when that cannot be exact."""
        for m in messages:
            inside = has_special_text(self, m["content"])
            if inside:
                raise RowProblem(
                    "prompt contains special-token text", f"{m['role']} turn holds {inside!r}, which a deployment's "
                    "apply_chat_template reads as a control token; remove or escape it"
                )
        try:
            prompt = self.render_prompt(messages)
            full = _render(self.tokenizer, self.template, [*messages, {"role": "assistant", "content": response}],
                           False)
        except Exception as e:  # noqa: BLE001 - a template refusing this conversation (raise_exception)
            raise RowProblem("chat template refuses this conversation", str(e).strip()) from None
        if not full.startswith(prompt + self.answer_prefix) or not full.endswith(self.answer_suffix):
            raise RowProblem("template renders this example differently from the generation prompt")
        answer = full[len(prompt) + len(self.answer_prefix): len(full) - len(self.answer_suffix)]
        if not answer.strip():
            raise RowProblem("no response text left after the chat template")
        if has_special_text(self, self.answer_prefix):  # a header of control tokens stays control tokens
            head = self.tokenizer(self.answer_prefix, add_special_tokens=False)["input_ids"]
            completion = head + self.text_ids(answer) + [self.end_of_turn_id]
        else:
            completion = self.text_ids(self.answer_prefix + answer) + [self.end_of_turn_id]
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"], completion  # = prompt_ids(messages)

    def overhead(self, system_prompt: str | None) -> int:
        """Tokens the template takes for an empty exchange: what max_length must exceed."""
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages = self.prompt_messages([*system, {"role": "user", "content": ""}])
        return len(self.prompt_ids(messages)) + 1


def has_special_text(fmt: ChatFormat, text: str) -> str | None:
    """The first special token whose text appears in `text` (kept as text by `ChatFormat.tokenize`), or None."""
    return next((t for t in fmt.controls if t and t in text), None)
