"""Jailbreak wrappers: load data/jailbreaks.json and wrap red-team prompts in its templates.

One place for both users: `cai_data.py` wraps a `jailbreak_fraction` of a source's training prompts in the
`train` templates (so M_SFT learns to refuse through them), `evaluate.py` wraps the held-out red-team prompts
in the `eval` templates. The two lists must share no template. No imports from other recipes modules.
"""

from __future__ import annotations

import json
import os
import random

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "jailbreaks.json")
PLACEHOLDER = "{prompt}"
SPLITS = ("train", "eval")


class JailbreakError(ValueError):
    """data/jailbreaks.json is missing or malformed; the message names the file, list, entry and fix."""


def load(path: str | None = None) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]}, each entry {"id", "family", "template"}; checked, disjoint lists."""
    path = path or DEFAULT_PATH
    if not os.path.isfile(path):
        raise JailbreakError(f"{path}: jailbreak templates not found. Restore data/jailbreaks.json from the "
                             "repository, or point `jailbreak_file` at your own file (docs/EVALUATION.md).")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise JailbreakError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}.") from None
    if not isinstance(data, dict):
        raise JailbreakError(f"{path}: expected an object with lists `train` and `eval`.")
    seen: dict[str, str] = {}
    for split in SPLITS:
        entries = data.get(split)
        if not isinstance(entries, list) or not entries:
            raise JailbreakError(f"{path}: `{split}` must be a non-empty list of {{id, family, template}} objects.")
        for i, e in enumerate(entries):
            where = f"{path} `{split}`[{i}]"
            if not isinstance(e, dict) or not all(isinstance(e.get(k), str) and e[k].strip()
                                                  for k in ("id", "family", "template")):  # fmt: skip
                raise JailbreakError(f"{where}: needs non-empty string keys `id`, `family` and `template`.")
            if e["template"].count(PLACEHOLDER) != 1:
                raise JailbreakError(f"{where} ({e['id']}): the template must contain {PLACEHOLDER} exactly once.")
            for key in (e["id"], " ".join(e["template"].lower().split())):
                if key in seen:
                    raise JailbreakError(
                        f"{where} ({e['id']}): the same id or template is also in `{seen[key]}`. Train and eval "
                        "templates must all differ, so the evaluation uses wrappers never trained on."
                    )
                seen[key] = split
    return {split: data[split] for split in SPLITS}


def wrap(template: dict, prompt: str) -> str:
    # str.replace, not str.format: a prompt may hold braces of its own.
    return template["template"].replace(PLACEHOLDER, prompt)


def wrap_messages(messages: list[dict], template: dict) -> list[dict]:
    """A copy of a conversation whose last user turn is wrapped in `template`."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = [dict(m) for m in messages]
    out[last]["content"] = wrap(template, out[last]["content"])
    return out


def wrap_fraction(examples: list[dict], fraction: float, templates: list[dict], seed: int) -> tuple[list[dict], int]:
    """(examples with round(fraction x n) of them wrapped, number wrapped): a seeded choice of rows, templates
    taken in turn so each is used about equally. Each example is {"prompt": messages, ...}; the others are kept."""
    chosen = chosen_rows(len(examples), fraction, seed)
    out = list(examples)
    for k, i in enumerate(chosen):
        template = templates[k % len(templates)]
        out[i] = {**examples[i], "prompt": wrap_messages(examples[i]["prompt"], template)}
    return out, len(chosen)


def chosen_rows(n: int, fraction: float, seed: int) -> list[int]:
    """Which of `n` rows `wrap_fraction` wraps: round(fraction x n) of them, a seeded choice, in row order."""
    return sorted(random.Random(seed).sample(range(n), round(fraction * n)))
