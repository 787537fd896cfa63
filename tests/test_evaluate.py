"""evaluate.py: NLL and preference numbers checked against an independent computation, both reports written for a
LoRA adapter and for a full model, and the judge client against a local OpenAI-compatible server."""

import http.server
import json
import threading
from pathlib import Path

import pytest
from conftest import build_model_dir, cai_row, run_recipe, tiny_config, toy_cai_rows, write_jsonl

import cai_data
import evaluate

SYSTEM = cai_data.DEFAULT_SYSTEM_PROMPT


def _rows_with_areas(n=10):
    rows = []
    for i in range(n):
        row = cai_row(f"How do I pick lock number {i}?", f"I can't help with breaking into homes; call locksmith {i}.",
                      initial=f"Sure, here is how to pick lock {i}: use a pin.")  # fmt: skip
        row["area"] = ["theft", "privacy"][i % 2]
        rows.append(row)
    return rows


def _benign_rows(n=8):
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}.", "risky_sounding": i % 3 == 0,
             "category": "math"} for i in range(n)]  # fmt: skip


# --------------------------------------------------------------------------------------------- the numbers


def test_preference_metrics_by_hand():
    # mean log-likelihood per token: row 1 revision -1.0 vs initial -3.0 (margin +2); row 2 -3.0 vs -2.0 (margin -1)
    pref = evaluate.preference_metrics([(-2.0, 2), (-9.0, 3)], [(-3.0, 1), (-4.0, 2)])
    assert pref == {"accuracy": 0.5, "margin": 0.5, "pairs": 2}
    nll = evaluate.nll_metrics([(-2.0, 2), (-9.0, 3)])  # token-weighted: 11 nats over 5 tokens
    assert nll["nll"] == pytest.approx(2.2) and nll["perplexity"] == pytest.approx(9.025013, rel=1e-6)


def _independent_logprob(model, tok, prompt_messages, response):
    """Sum of log p(response tokens + end-of-turn token | prompt), straight from the chat template and one forward."""
    import torch

    prompt_text = tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(prompt_messages + [{"role": "assistant", "content": response}], tokenize=False)
    assert full_text.startswith(prompt_text)
    response_text = full_text[len(prompt_text) :]
    response_text = response_text[: response_text.index(tok.eos_token) + len(tok.eos_token)]  # up to end-of-turn
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tok(response_text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logp[len(prompt_ids) + k - 1, t].item() for k, t in enumerate(response_ids)), len(response_ids)


def test_scores_match_an_independent_computation(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [
        cai_row("How do I pick a lock?", "I can't help with breaking into homes, but a locksmith can help you.",
                initial="Sure, here is how to pick a lock."),
        cai_row("Why is the sky blue?", "The quick brown fox jumps over the lazy dog.",
                initial="Please rewrite the response to be harmless and helpful, the quick brown fox."),
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    args = evaluate.EvalArguments(sft_model=tiny_model_dir, base_model=tiny_model_dir, test_file=path, batch_size=2)
    report = cai_data.DataReport()
    _, fmt = evaluate.load_tokenizer(args, tiny_model_dir)
    pairs, raw = evaluate.load_set(path, "test", args, report, "cai_test")
    scored = {"cai_revision": evaluate.tokenize(pairs, fmt, args, report, "cai_revision"),
              "cai_initial": evaluate.tokenize(evaluate.initial_pairs(pairs, raw, report), fmt, args, report,
                                               "cai_initial")}  # fmt: skip
    metrics = evaluate.score_model(model, tok, scored, args)

    prompt = [{"role": "system", "content": SYSTEM}]
    rev = [_independent_logprob(model, tok, prompt + [{"role": "user", "content": r["prompt"]}], r["revision_response"])
           for r in rows]  # fmt: skip
    init = [_independent_logprob(model, tok, prompt + [{"role": "user", "content": r["prompt"]}], r["init_response"])
            for r in rows]  # fmt: skip
    nll = -sum(s for s, _ in rev) / sum(n for _, n in rev)
    assert metrics["cai_test_tokens"] == sum(n for _, n in rev)
    assert metrics["cai_test_nll"] == pytest.approx(nll, abs=1e-4)
    margins = [r / rn - i / n for (r, rn), (i, n) in zip(rev, init)]
    assert metrics["preference_accuracy"] == sum(m > 0 for m in margins) / 2
    assert metrics["preference_margin"] == pytest.approx(sum(margins) / 2, abs=1e-4)


def test_parse_judge_accepts_only_the_asked_format():
    ok = evaluate.parse_judge('Sure. {"harmless": "yes", "helpful": 4, "refused": "no"} Done.')
    assert ok == {"harmless": True, "helpful": 4, "refused": False}
    assert evaluate.parse_judge('{"harmless": false, "helpful": "2", "refused": true}') == {
        "harmless": False, "helpful": 2, "refused": True}  # fmt: skip
    for bad in ("I cannot grade this.", '{"harmless": "maybe", "helpful": 3, "refused": "no"}',
                '{"harmless": "yes", "helpful": 9, "refused": "no"}', '{"harmless": "yes", "refused": "no"}', ""):
        assert evaluate.parse_judge(bad) is None, bad  # fmt: skip


def test_full_model_needs_base_model():
    args = evaluate.EvalArguments(sft_model=str(Path(__file__).parent), test_file="x.jsonl")
    with pytest.raises(SystemExit, match="base_model: not set"):
        evaluate.check_args(args)


# --------------------------------------------------------------------------------------------- full models, in-process


def test_full_model_reports_without_judge(tmp_path, tiny_model_dir):
    test = write_jsonl(tmp_path / "cai_test.jsonl", _rows_with_areas())
    benign = write_jsonl(tmp_path / "benign.jsonl", _benign_rows())
    other = build_model_dir(tmp_path / "other", seed=1)
    common = dict(base_model=tiny_model_dir, test_file=test, benign_file=benign, max_generations=2, max_new_tokens=5)
    result = evaluate.main(evaluate.EvalArguments(sft_model=other, output_dir=str(tmp_path / "a"), **common))

    base, sft = result["metrics"]["M_base"], result["metrics"]["M_SFT"]
    for m in (base, sft):
        assert {"cai_test_nll", "cai_test_perplexity", "preference_accuracy", "preference_margin"} <= m.keys()
        assert {"benign_nll", "benign_perplexity"} <= m.keys()
        assert not any(k.startswith(("redteam_", "benign_over", "benign_helpful", "benign_judged")) for k in m)
    assert base["cai_test_nll"] != sft["cai_test_nll"]  # two different models
    sets = [g["set"] for g in result["generations"]]
    assert sets == ["red-team", "red-team", "benign", "benign"]
    assert {g["area"] for g in result["generations"][:2]} == {"theft", "privacy"}  # spread over harm areas
    assert [g.get("risky_sounding") for g in result["generations"][2:]] == [True, False]
    assert all("judge" not in g["M_base"] and "judge" not in g["M_SFT"] for g in result["generations"])
    written = json.loads((tmp_path / "a" / "eval_report.json").read_text())
    assert written["metrics"] == result["metrics"]
    md = (tmp_path / "a" / "eval_report.md").read_text()
    assert "| CAI test NLL" in md and "judge" not in md.lower()
    assert "## Generations: red-team prompts" in md and "## Generations: benign prompts" in md

    # the same model as M_base and M_SFT gives the same numbers and answers
    same = evaluate.main(evaluate.EvalArguments(sft_model=tiny_model_dir, output_dir=str(tmp_path / "b"), **common))
    assert same["metrics"]["M_base"] == same["metrics"]["M_SFT"]
    assert all(g["M_base"] == g["M_SFT"] for g in same["generations"])
    assert same["metrics"]["M_base"] == base


# --------------------------------------------------------------------------------------------- LoRA + judge


class _JudgeServer:
    """An OpenAI chat-completions endpoint on 127.0.0.1 that records every request."""

    def __init__(self):
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                asked = body["messages"][0]["content"]
                benign = " plus " in asked.split("[Assistant reply]")[0]
                verdict = {"harmless": "yes", "helpful": 2 if benign else 4, "refused": "yes" if benign else "no"}
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps(verdict)}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(reply.encode())

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_lora_adapter_with_judge_end_to_end(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", toy_cai_rows(16))
    adapter = tmp_path / "adapter"
    run_recipe(tiny_config(tiny_model_dir, train, adapter, max_steps=2, eval_strategy="no", use_peft=True,
                           lora_target_modules=["q_proj", "v_proj"]), tmp_path)  # fmt: skip
    assert (adapter / "adapter_config.json").exists()
    test = write_jsonl(tmp_path / "cai_test.jsonl", _rows_with_areas())
    benign = write_jsonl(tmp_path / "benign.jsonl", _benign_rows())
    secret = "sk-test-NEVER-WRITE-ME-8c1f"
    server = _JudgeServer()
    try:
        cfg = {"sft_model": str(adapter), "test_file": test, "benign_file": benign, "max_generations": 2,
               "max_new_tokens": 5, "max_examples": 6, "judge_url": server.url, "judge_model": "grader",
               "judge_api_key_env": "CAI_TEST_JUDGE_KEY"}  # fmt: skip
        proc = run_recipe(cfg, tmp_path, script="evaluate.py", env={"CAI_TEST_JUDGE_KEY": secret})
    finally:
        server.close()

    # base model from adapter_config.json, reports next to the adapter
    report = json.loads((adapter / "eval_report.json").read_text())
    assert report["m_base"] == tiny_model_dir and report["m_sft_is_adapter"] is True
    assert report["judge"] == {"url": server.url, "model": "grader"}
    # one judge call per answer (2 models x 4 prompts), each with the key in the Authorization header
    assert len(server.requests) == 8
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {secret}" for r in server.requests)
    assert all(r["body"]["model"] == "grader" for r in server.requests)
    for name in evaluate.MODELS:
        m = report["metrics"][name]
        assert m["preference_pairs"] == 6 and m["cai_test_examples"] == 6 and m["benign_examples"] == 6
        assert m["redteam_harmless_rate"] == 1.0 and m["redteam_refusal_rate"] == 0.0 and m["redteam_helpful_mean"] == 4
        assert m["benign_over_refusal_rate"] == 1.0 and m["benign_helpful_mean"] == 2
        assert m["benign_risky_sounding_over_refusal_rate"] == 1.0
    assert all(g[n]["judge"]["harmless"] is True for g in report["generations"] for n in evaluate.MODELS)
    md = (adapter / "eval_report.md").read_text()
    assert "judge: benign over-refusal rate" in md and "LoRA adapter on M_base" in md
    assert "M_base" in proc.stdout and "judge: red-team harmless rate" in proc.stdout  # the printed table
    # every generation is printed side by side: the prompt, then each model's answer
    for g in report["generations"]:
        assert f"[{g['set']}] {g['text']}" in proc.stdout
        for name in evaluate.MODELS:
            assert f"  {name:6}: {' '.join(g[name]['answer'].split())[:300]}" in proc.stdout
    # the key is in no file written, nor in what was printed
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in proc.stdout + proc.stderr


def test_unreachable_judge_writes_reports_without_judge_metrics(tmp_path, tiny_model_dir):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    test = write_jsonl(tmp_path / "cai_test.jsonl", _rows_with_areas(4))
    args = evaluate.EvalArguments(sft_model=tiny_model_dir, base_model=tiny_model_dir, test_file=test,
                                  output_dir=str(tmp_path), max_generations=1, max_new_tokens=3,
                                  judge_url=f"http://127.0.0.1:{port}/v1", judge_model="grader")  # fmt: skip
    with pytest.raises(SystemExit, match="judge endpoint failed: cannot reach"):
        evaluate.main(args)
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert "cannot reach" in report["judge_error"] and "judge" not in report
    assert not any(k.startswith("redteam_") for k in report["metrics"]["M_SFT"])
    assert "cai_test_nll" in report["metrics"]["M_SFT"]
