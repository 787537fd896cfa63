"""evaluate.py's report room: the table printed at the end, eval_report.md, and the answers as JSONL for a blind judge."""

import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import run_dir  # noqa: E402
from eval_answers import REPEAT_N, REPEAT_TIMES, SETS, models_of  # noqa: E402


CONDITION_LABELS = {"system": "system prompt", "no_system": "no system prompt"}


# (metric, direction, label) in table order; a metric missing from every column is not shown. Per-template
# jailbreak compliance rates follow `jailbreak_compliance_rate` (table_rows adds them).
TABLE = [
    ("redteam_declined_rate", None, "declines (opening phrase), red-team"),
    ("jailbreak_declined_rate", None, "declines (opening phrase), jailbreak"),
    ("benign_declined_rate", "lower", "declines (opening phrase), benign: over-refusal"),
    ("benign_risky_sounding_declined_rate", "lower", "declines, risky-sounding benign"),
    ("balanced_refusal_accuracy", "higher", "balanced refusal accuracy (red-team declined, benign answered)"),
    ("answers_clean_stop_rate", "higher", "clean stop, all answers"),
    ("answers_repetition_rate", "lower", f"repetition ({REPEAT_N}-gram x{REPEAT_TIMES}), all answers"),
    ("redteam_clean_stop_rate", "higher", "clean stop, red-team"),
    ("redteam_repetition_rate", "lower", "repetition, red-team"),
    ("jailbreak_clean_stop_rate", "higher", "clean stop, jailbreak"),
    ("jailbreak_repetition_rate", "lower", "repetition, jailbreak"),
    ("benign_clean_stop_rate", "higher", "clean stop, benign"),
    ("benign_repetition_rate", "lower", "repetition, benign"),
    ("redteam_compliance_rate", "lower", "judge: red-team compliance rate"),
    ("redteam_partial_compliance_rate", "lower", "judge: red-team partial compliance"),
    ("redteam_refusal_rate", None, "judge: red-team refusal rate"),
    ("jailbreak_compliance_rate", "lower", "judge: jailbreak compliance rate"),
    ("jailbreak_partial_compliance_rate", "lower", "judge: jailbreak partial compliance"),
    ("jailbreak_refusal_rate", None, "judge: jailbreak refusal rate"),
    ("benign_over_refusal_rate", "lower", "judge: benign over-refusal rate"),
    ("benign_risky_sounding_over_refusal_rate", "lower", "judge: over-refusal, risky-sounding benign"),
    ("redteam_harmless_rate", "higher", "judge: red-team harmless rate"),
    ("redteam_helpful_mean", "higher", "judge: red-team helpfulness 1-5"),
    ("benign_helpful_mean", "higher", "judge: benign helpfulness 1-5"),
    ("cai_test_nll", "lower", "CAI test NLL, revised responses"),
    ("cai_test_perplexity", "lower", "CAI test perplexity"),
    ("preference_accuracy", "higher", "preference accuracy, revision > initial"),
    ("preference_margin", "higher", "preference margin, nats/token"),
    ("jailbreak_nll", "lower", "jailbreak-wrapped NLL, revised responses"),
    ("jailbreak_preference_accuracy", "higher", "jailbreak-wrapped preference accuracy"),
    ("jailbreak_preference_margin", "higher", "jailbreak-wrapped preference margin"),
    ("benign_nll", "lower", "benign NLL"),
    ("benign_perplexity", "lower", "benign perplexity"),
]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def columns(metrics: dict) -> list[tuple[str, str]]:
    """(condition, model) of each table column, in order."""
    return [(c, m) for c in metrics for m in models_of(metrics[c])]


def column_names(metrics: dict) -> list[str]:
    return [f"{m} ({CONDITION_LABELS[c]})" for c, m in columns(metrics)]


def table_rows(metrics: dict) -> list[tuple]:
    """(label, value per column..., key) per metric present; `metrics` is {condition: {model: {key: value}}}."""
    present = {k for c in metrics for m in models_of(metrics[c]) for k in metrics[c][m]}
    fixed = {key for key, _, _ in TABLE}
    per_template = sorted(k for k in present - fixed if k.startswith("jailbreak_") and k.endswith("_compliance_rate"))
    table = []
    for key, direction, label in TABLE:
        table.append((key, direction, label))
        if key == "jailbreak_compliance_rate":
            table += [(k, "lower", f"judge: jailbreak compliance, {k[len('jailbreak_') : -len('_compliance_rate')]}")
                      for k in per_template]  # fmt: skip
    rows = []
    for key, direction, label in table:
        if key in present:
            arrow = {"lower": " (lower=better)", "higher": " (higher=better)"}.get(direction, "")
            rows.append((label + arrow, *[_fmt(metrics[c][m].get(key)) for c, m in columns(metrics)], key))
    return rows


def print_table(metrics: dict, paths: dict) -> None:
    rows = [("metric", *column_names(metrics))] + [r[:-1] for r in table_rows(metrics)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n" + " | ".join(c.ljust(w) for c, w in zip(rows[0], widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows[1:]:
        print(" | ".join([r[0].ljust(widths[0]), *[v.rjust(w) for v, w in zip(r[1:], widths[1:])]]))
    for label, path in paths.items():
        print(f"{label}: {path}")


def print_generations(generations: list[dict], per_set: int = 3, width: int = 300) -> None:
    """The first `per_set` answers of each condition and set, both models, as `make demo` shows them."""
    shown = Counter()
    for g in generations:
        shown[g["condition"], g["set"]] += 1
        if shown[g["condition"], g["set"]] > per_set:
            continue
        print(f"\n[{g['set']}, {CONDITION_LABELS[g['condition']]}] {g['text']}")
        for name in models_of(g):
            answer = " ".join(g[name]["answer"].split())
            print(f"  {name:6}: {answer[:width]}{'...' if len(answer) > width else ''}")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _answer_note(answer: dict) -> str:
    notes = [] if answer["stopped_cleanly"] else ["no clean stop"]
    notes += ["repeats"] if answer["repeated"] else []
    notes += ["declines"] if answer.get("declined") else []
    j = answer.get("judge")
    if j:
        notes.append(f"judge: {'harmless' if j['harmless'] else 'HARMFUL'}, helpful {j['helpful']}/5, complied "
                     f"{j['complied']}{', refused' if j['refused'] else ''}")  # fmt: skip
    elif "judge_unparsed" in answer:
        notes.append("judge: unparsed reply")
    return f"<br>*{'; '.join(notes)}*" if notes else ""


def write_markdown(report: dict, path: str) -> None:
    gen = report["settings"]["generation"]
    models = models_of(gen)
    lines = [
        "# CAI SFT evaluation: " + " vs ".join(models),
        "",
        f"- M_base: `{report['m_base']}`",
        f"- M_SFT: `{report['m_sft']}`" + (" (LoRA adapter on M_base)" if report["m_sft_is_adapter"] else ""),
        *([f"- M_DPO: `{report['m_dpo']}` (the preference stage from M_SFT)"] if report.get("m_dpo") else []),
        f"- Greedy generations, at most {report['settings']['max_new_tokens']} new tokens, with each model's saved "
        "generation settings: " + "; ".join(f"{m}: {json.dumps(v)}" for m, v in gen.items()) + ". Prompts rendered "
        "with the chat template saved with M_SFT, with the training system prompt and without one.",
        f"- Repetition: an answer in which some run of {REPEAT_N} words occurs {REPEAT_TIMES} times or more.",
    ]
    if report.get("jailbreak_templates"):
        lines.append("- Jailbreak templates (eval list): " + ", ".join(f"`{t}`" for t in report["jailbreak_templates"]))
    if "judge" in report:
        lines.append(f"- Judge: `{report['judge']['model']}` at `{report['judge']['url']}`")
    if "judge_error" in report:
        lines.append(f"- Judge failed: {report['judge_error']} (judge metrics are absent)")
    names = column_names(report["metrics"])
    lines += ["", "## Metrics", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += ["| " + " | ".join(r[:-1]) + " |" for r in table_rows(report["metrics"])]
    lines += ["", "What each metric means and how to read it: `docs/EVALUATION.md`.", "", "## Data", ""]
    lines += [f"- {k}: {v}" for k, v in report["data"]["counts"].items()]
    for reason, n in report["data"]["dropped"].items():
        lines.append(f"- dropped {n}: {reason}")
    for reason, n in report["data"]["changed"].items():
        lines.append(f"- changed {n}: {reason}")
    for condition in report["metrics"]:
        for set_name in SETS:
            items = [g for g in report["generations"] if g["set"] == set_name and g["condition"] == condition]
            if not items:
                continue
            lines += ["", f"## Generations: {set_name} prompts, {CONDITION_LABELS[condition]}", "",
                      "| # | prompt | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
            for i, g in enumerate(items, 1):
                tag = (" *(risky-sounding)*" if g.get("risky_sounding") else f" *({g['template']})*"
                       if g.get("template") else f" *({g['area']})*" if g.get("area") else "")  # fmt: skip
                lines.append(f"| {i} | {_cell(g['text'])}{tag} | "
                             + " | ".join(f"{_cell(g[m]['answer'])}{_answer_note(g[m])}" for m in models) + " |")
    run_dir.write_text(path, "\n".join(lines) + "\n")


def write_generations(items: list[dict], path: str) -> None:
    """One JSON line per answer: model, condition, set, template, prompt_id, prompt, answer, stopped_cleanly,
    repeated, declined (and the judge verdict when there is one), for a separate, blind judge."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            for m in models_of(it):
                row = {"model": m, "condition": it["condition"], "set": it["set"], "template": it.get("template"),
                       "prompt_id": it["id"], "prompt": it["text"], "messages": it["prompt"], **it[m]}  # fmt: skip
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
