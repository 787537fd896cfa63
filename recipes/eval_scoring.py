"""evaluate.py's scoring room: reference responses tokenized as sft.py tokenizes them, then per-token log-likelihood.

NLL and perplexity of the revised responses (and of the benign completions), token-weighted over the response
tokens and the end-of-turn token; the preference of the revision over the initial answer (accuracy and margin of
the mean per-token log-likelihood). No generation: one forward pass per batch.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import chat_format  # noqa: E402


def tokenize(pairs: list[dict], fmt, args, report, split: str) -> list[dict]:
    """{input_ids, labels} per pair, tokenized as sft.py does (prompt and completion apart); long ones cut, counted."""
    out = []
    for p in pairs:
        where = f"{p['source']} [{split}] row {p['row']}"
        try:
            prompt_ids, completion_ids = fmt.tokenize(fmt.prompt_messages(p["prompt"]), p["completion"][0]["content"])
        except chat_format.RowProblem as e:
            report.drop(f"{split}: {e.reason}", where)
            continue
        ids, labels = prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids
        if len(ids) > args.max_length:
            if len(prompt_ids) >= args.max_length:
                report.drop(f"{split}: prompt longer than max_length", where)
                continue
            report.change(f"{split}: truncated to max_length", where)
            ids, labels = ids[: args.max_length], labels[: args.max_length]
        out.append({"input_ids": ids, "labels": labels, "source": p["source"], "row": p["row"]})
    return out


def response_logprobs(model, rows: list[dict], pad_id: int, batch_size: int = 8, desc: str = "scoring", bar=None):
    """(sum of log p, number of tokens) over the trained tokens (labels != -100) of each row, in input order.
    With `bar` (a tqdm bar shared by several calls), that bar counts the batches instead of one of its own."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))  # less padding per batch
    out = [None] * len(rows)
    starts = range(0, len(order), batch_size)
    for start in starts if bar is not None else tqdm(starts, desc=desc, unit="batch", disable=not rows):
        if bar is not None:
            bar.update(1)
        idx = order[start : start + batch_size]
        width = max(len(rows[i]["input_ids"]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            n = len(rows[i]["input_ids"])
            ids[j, :n] = torch.tensor(rows[i]["input_ids"])
            labels[j, :n] = torch.tensor(rows[i]["labels"])
            mask[j, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        targets = labels[:, 1:].to(device)
        keep = targets != -100
        # Only the response positions go to float32: the full (batch, length, vocab) tensor never does.
        token_lp = -torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
        counts = keep.sum(dim=1).tolist()
        for j, chunk in zip(idx, torch.split(token_lp, counts)):
            out[j] = (chunk.sum().item(), len(chunk))
    return out


def nll_metrics(scores: list[tuple[float, int]]) -> dict:
    total, n = sum(s for s, _ in scores), sum(c for _, c in scores)
    nll = -total / n
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": n, "examples": len(scores)}


def preference_metrics(revised: list[tuple[float, int]], initial: list[tuple[float, int]]) -> dict:
    """Accuracy and mean margin of mean-per-token log-likelihood, revision_response vs init_response."""
    margins = [r / rn - i / inn for (r, rn), (i, inn) in zip(revised, initial)]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin": sum(margins) / len(margins),
        "pairs": len(margins),
    }


def score_batches(scored: dict, batch_size: int) -> int:
    """How many forward passes score_model makes for `scored`, for one progress bar over all of them."""
    return sum(math.ceil(len(rows) / batch_size) for rows in scored.values())


def score_model(model, tok, scored: dict, args, bar=None) -> dict:
    """NLL/perplexity per set and the preference metrics, flat; the jailbreak-wrapped set with prefix `jailbreak_`."""
    metrics = {}
    bs = args.batch_size
    for nll_name, pref_name, rev_key, init_key, label in (
        ("cai_test", "preference", "cai_revision", "cai_initial", "CAI"),
        ("jailbreak", "jailbreak_preference", "jailbreak_revision", "jailbreak_initial", "jailbreak-wrapped CAI"),
    ):
        if not scored.get(rev_key):
            continue
        rev = response_logprobs(model, scored[rev_key], tok.pad_token_id, bs, f"scoring {label} revisions", bar)
        metrics.update({f"{nll_name}_{k}": v for k, v in nll_metrics(rev).items()})
        if scored.get(init_key):
            by_row = {r["row"]: s for r, s in zip(scored[rev_key], rev)}
            init = response_logprobs(model, scored[init_key], tok.pad_token_id, bs, f"scoring {label} initial answers",
                                     bar)
            pairs = [(by_row[r["row"]], s) for r, s in zip(scored[init_key], init) if r["row"] in by_row]
            if pairs:
                pref = preference_metrics([p[0] for p in pairs], [p[1] for p in pairs])
                metrics.update({f"{pref_name}_{k}": v for k, v in pref.items()})
    if scored.get("benign"):
        ben = response_logprobs(model, scored["benign"], tok.pad_token_id, bs, "scoring benign completions", bar)
        metrics.update({f"benign_{k}": v for k, v in nll_metrics(ben).items()})
    return metrics
