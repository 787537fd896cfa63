"""generate_revisions.py: the critique/revision loop with a tiny model, resume, the OpenAI-compatible backend
against a local server, the vLLM glue, flags, and its output training through sft.py unchanged."""

import json
import random
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_recipe, tiny_config, write_jsonl

import cai_data
import generate_revisions as gr

API_KEY = "sk-test-DO-NOT-WRITE-4f2c9a"
SCHEMA = ("init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt",
          "revision_response", "prompt", "messages", "chosen", "rejected", "principle", "flags", "prompt_index")
CONSTITUTION = [
    {"id": "harm", "name": "Harm", "critique_request": "CRITIQUE-harm: how is the last answer harmful?",
     "revision_request": "REVISE-harm: rewrite it to be harmless."},
    {"id": "law", "name": "Law", "critique_request": "CRITIQUE-law: does the last answer help break the law?",
     "revision_request": "REVISE-law: rewrite it to be lawful."},
    {"id": "kind", "name": "Kindness", "critique_request": "CRITIQUE-kind: is the last answer unkind?",
     "revision_request": "REVISE-kind: rewrite it kindly."},
]
FEW_SHOT = [
    {"role": "user", "content": "Example question?"},
    {"role": "assistant", "content": "Example bad answer."},
    {"role": "user", "content": "Example critique request."},
    {"role": "assistant", "content": "Example critique."},
    {"role": "user", "content": "Example revision request."},
    {"role": "assistant", "content": "Example good answer."},
]
# Prompts whose word tells the fake endpoint to misbehave in one way each.
PROMPTS = [f"How do I pick lock number {i}?" for i in range(7)] + [
    "EMPTY critique please", "SAME answer twice", "COMPLY with everything", "FAIL at revision"]


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


class FakeEndpoint:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 answering by stage, deterministically."""

    def __init__(self, system_prompt, few_shot):
        self.p_index = (1 if system_prompt else 0) + len(few_shot)  # where P sits in every conversation
        self.requests, self.fail = [], True
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"auth": self.headers.get("Authorization"), "body": body})
                text = endpoint.answer(body["messages"])
                if text is None:
                    self.send_response(500)
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, messages):
        prompt, last = messages[self.p_index]["content"], messages[-1]["content"]
        rounds = sum(m["content"].startswith("CRITIQUE-") for m in messages[self.p_index :])
        if last.startswith("CRITIQUE-"):
            return "" if "EMPTY" in prompt else f"Round {rounds}: the answer to '{prompt}' is harmful."
        if last.startswith("REVISE-"):
            if "FAIL" in prompt and self.fail:
                return None
            if "SAME" in prompt:
                return f"Sure, here's how: {prompt}"
            if "COMPLY" in prompt:
                return "Sure! Step 1: get the tools. Step 2: do it."
            return f"I can't help with that, but here is a safer alternative (round {rounds})."
        return f"Sure, here's how: {prompt}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen_inputs")
    constitution = d / "constitution.json"
    constitution.write_text(json.dumps(CONSTITUTION))
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": p, "area": "test"} for p in PROMPTS])
    return {"constitution": str(constitution), "prompts": prompts}


def endpoint_args(files, server, output, **kw) -> gr.GenerateArguments:
    settings = dict(dataset_name=files["prompts"], constitution_path=files["constitution"], output_path=str(output),
                    backend="openai", endpoint_url=server.url, endpoint_model="fake", api_key_env="TEST_CAI_KEY",
                    few_shot=FEW_SHOT, batch_size=4, num_workers=3, request_retries=0, progress=False)
    return gr.GenerateArguments(**{**settings, **kw})


@pytest.fixture(scope="module")
def endpoint_run(files, tmp_path_factory):
    """Generate through the fake endpoint: first with one row failing, then a relaunch that retries it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_CAI_KEY", API_KEY)
    out_dir = tmp_path_factory.mktemp("gen_out")
    output = out_dir / "revisions.jsonl"
    server = FakeEndpoint(cai_data.DEFAULT_SYSTEM_PROMPT, FEW_SHOT)
    first = gr.main(endpoint_args(files, server, output))
    first_text = output.read_text()
    server.fail = False
    second = gr.main(endpoint_args(files, server, output))
    yield {"first": first, "second": second, "first_text": first_text, "output": output, "dir": out_dir,
           "server": server}
    server.server.shutdown()
    mp.undo()


def test_endpoint_rows_schema_principles_and_conversation(endpoint_run):
    rows = read_rows(endpoint_run["output"])
    assert sorted(r["prompt_index"] for r in rows) == list(range(len(PROMPTS)))
    by_id = {p["id"]: p for p in CONSTITUTION}
    for r in rows:
        assert set(SCHEMA) <= set(r) and "round_history" not in r
        p = PROMPTS[r["prompt_index"]]
        assert r["prompt"] == r["init_prompt"] == p
        assert r["init_response"] == f"Sure, here's how: {p}"
        principle = random.Random(f"42:{r['prompt_index']}:1").choice(CONSTITUTION)  # the documented draw
        assert r["principle"] == principle["id"]
        assert r["critic_prompt"] == by_id[r["principle"]]["critique_request"]
        assert r["revision_prompt"] == by_id[r["principle"]]["revision_request"]
        assert r["messages"] == r["chosen"] == [{"role": "user", "content": p},
                                                {"role": "assistant", "content": r["revision_response"]}]
        assert r["rejected"] == [{"role": "user", "content": p}, {"role": "assistant", "content": r["init_response"]}]
    assert len({r["principle"] for r in rows}) > 1, "the seeded draw should use more than one principle"

    # The revision request of row 0 carried the whole chat: system, few-shot, P, answer, critique request, critique.
    r0 = next(r for r in rows if r["prompt_index"] == 0)
    sent = next(q["body"]["messages"] for q in endpoint_run["server"].requests
                if q["body"]["messages"][-1]["content"] == r0["revision_prompt"]
                and q["body"]["messages"][7]["content"] == PROMPTS[0])
    assert sent == [{"role": "system", "content": cai_data.DEFAULT_SYSTEM_PROMPT}, *FEW_SHOT,
                    {"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": r0["init_response"]},
                    {"role": "user", "content": r0["critic_prompt"]},
                    {"role": "assistant", "content": r0["critic_response"]},
                    {"role": "user", "content": r0["revision_prompt"]}]


def test_endpoint_flags_and_summary(endpoint_run):
    rows = {r["prompt"]: r for r in read_rows(endpoint_run["output"])}
    assert rows["EMPTY critique please"]["flags"] == ["empty_critique"]
    assert rows["SAME answer twice"]["flags"] == ["revision_identical", "still_complies"]
    assert rows["COMPLY with everything"]["flags"] == ["still_complies"]
    assert all(not rows[p]["flags"] for p in PROMPTS[:7] + ["FAIL at revision"])
    summary = json.loads(Path(str(endpoint_run["output"]) + ".summary.json").read_text())
    assert summary == endpoint_run["second"]
    assert summary["flags"] == {"empty_critique": 1, "revision_identical": 1, "still_complies": 2}
    assert summary["flagged_rows"] == 3 and summary["rows_in_output"] == len(PROMPTS)
    assert summary["status"] == "complete"


def test_endpoint_failure_is_counted_then_retried_on_relaunch(endpoint_run):
    first, second = endpoint_run["first"], endpoint_run["second"]
    fail_index = PROMPTS.index("FAIL at revision")
    assert first["failed_this_run"]["count"] == 1 and first["status"] == "incomplete"
    assert f"row {fail_index}: round 1 revision: HTTP 500" in first["failed_this_run"]["examples"][0]
    assert first["generated_this_run"] == len(PROMPTS) - 1
    # The relaunch kept every finished row byte for byte and generated only the failed one.
    assert second["already_done_at_start"] == len(PROMPTS) - 1 and second["generated_this_run"] == 1
    assert endpoint_run["output"].read_text().startswith(endpoint_run["first_text"])
    assert [r["prompt_index"] for r in read_rows(endpoint_run["output"])][-1] == fail_index


def test_api_key_sent_in_header_and_never_written(endpoint_run):
    auths = {q["auth"] for q in endpoint_run["server"].requests}
    assert auths == {f"Bearer {API_KEY}"}
    written = list(endpoint_run["dir"].rglob("*"))
    assert len(written) >= 2
    for f in written:
        assert API_KEY not in f.read_text(), f


def test_generated_rows_load_through_sft_data_path(endpoint_run):
    from trl import ScriptArguments

    script_args = ScriptArguments(dataset_name=str(endpoint_run["output"]))
    train, evals, report = cai_data.load_pairs(script_args, cai_data.CAIDataArguments(exclude_flagged=False))
    # even with flags ignored, the unrevised row (revision == initial answer) is never trained: dropped and counted
    assert dict(report.dropped) == {"revision identical to init_response": 1}
    assert len(train) + len(evals) == len(PROMPTS) - 1
    assert train[0]["prompt"][0] == {"role": "system", "content": cai_data.DEFAULT_SYSTEM_PROMPT}
    train, evals, report = cai_data.load_pairs(script_args, cai_data.CAIDataArguments())
    assert dict(report.dropped) == {"flagged by generate_revisions.py": 3}
    assert len(train) + len(evals) == len(PROMPTS) - 3


def test_generated_output_trains_with_sft_unchanged(endpoint_run, tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    cfg = tiny_config(tiny_model_dir, str(endpoint_run["output"]), out, max_steps=2, eval_steps=2)
    run_recipe(cfg, tmp_path)
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["dropped"] == {"flagged by generate_revisions.py": 3}
    assert summary["counts"]["train_examples"] + summary["counts"]["eval_examples"] == len(PROMPTS) - 3
    assert (out / "cai_sft_complete.json").exists()


def test_two_rounds_keep_history(files, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_CAI_KEY", API_KEY)
    server = FakeEndpoint(None, [])
    try:
        gr.main(endpoint_args(files, server, tmp_path / "r2.jsonl", num_rounds=2, system_prompt=None, few_shot=[],
                              max_rows=3))
    finally:
        server.server.shutdown()
    rows = read_rows(tmp_path / "r2.jsonl")
    assert len(rows) == 3
    for r in rows:
        hist = r["round_history"]
        assert [h["round"] for h in hist] == [1, 2]
        assert [h["principle"] for h in hist] == [gr.pick_principle(CONSTITUTION, 42, r["prompt_index"], k)["id"]
                                                  for k in (1, 2)]
        assert hist[1]["critic_response"].startswith("Round 2:") and hist[1]["revision_response"].endswith("(round 2).")
        assert r["revision_response"] == hist[1]["revision_response"] and r["principle"] == hist[1]["principle"]
    # No system prompt: P is the first message the endpoint saw.
    assert all(q["body"]["messages"][0]["role"] == "user" for q in server.requests)


def test_relaunch_with_other_settings_is_refused(endpoint_run, files, monkeypatch):
    monkeypatch.setenv("TEST_CAI_KEY", API_KEY)
    args = endpoint_args(files, endpoint_run["server"], endpoint_run["output"], num_rounds=2)
    with pytest.raises(cai_data.DataError, match=r"num_rounds: 1 -> 2.*--overwrite true"):
        gr.main(args)


def test_transformers_backend_full_loop_and_resume(files, tiny_model_dir, tmp_path):
    """A tiny model through `python recipes/generate_revisions.py`: 3 rows, then the rest; nothing redone."""
    output = tmp_path / "gen" / "revisions.jsonl"
    cfg = {"model_name_or_path": tiny_model_dir, "dataset_name": files["prompts"], "max_rows": 6,
           "constitution_path": files["constitution"], "output_path": str(output), "few_shot": FEW_SHOT[:2],
           "max_new_tokens": 6, "batch_size": 2}
    proc = run_recipe(cfg, tmp_path, "--max_rows", "3", script="generate_revisions.py")
    assert "Summary" in proc.stdout
    first_text = output.read_text()
    assert len(first_text.splitlines()) == 3
    proc = run_recipe(cfg, tmp_path, script="generate_revisions.py")
    assert "3 already in" in proc.stdout
    text = output.read_text()
    assert text.startswith(first_text)
    rows = read_rows(output)
    assert sorted(r["prompt_index"] for r in rows) == list(range(6))
    for r in rows:
        assert set(SCHEMA) <= set(r) and r["prompt"] == PROMPTS[r["prompt_index"]]
        assert r["principle"] == gr.pick_principle(CONSTITUTION, 42, r["prompt_index"], 1)["id"]
        assert all(isinstance(x, str) for x in (r["init_response"], r["critic_response"], r["revision_response"]))
    summary = json.loads(Path(str(output) + ".summary.json").read_text())
    counted = {}
    for r in rows:
        for f in r["flags"]:
            counted[f] = counted.get(f, 0) + 1
    assert summary["flags"] == counted and summary["flagged_rows"] == sum(1 for r in rows if r["flags"])
    assert summary["already_done_at_start"] == 3 and summary["generated_this_run"] == 3
    # A third launch has nothing left to do and loads no model.
    proc = run_recipe(cfg, tmp_path, script="generate_revisions.py")
    assert "0 to generate" in proc.stdout and "Loaded" not in proc.stdout and output.read_text() == text


def test_vllm_backend_feeds_the_same_rendered_prompts(files, tiny_model_dir, tmp_path, monkeypatch):
    """vLLM is not installed here: a stand-in module checks our glue passes the chat-template token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    seen = []

    class Out:
        def __init__(self, text):
            self.outputs = [types.SimpleNamespace(text=f" {text} ")]

    class LLM:
        def __init__(self, model, **kw):
            assert model == tiny_model_dir and kw["seed"] == 42

        def generate(self, prompts, params, use_tqdm=True):
            seen.extend(p["prompt_token_ids"] for p in prompts)
            assert params.kw["max_tokens"] == 5 and params.kw["stop_token_ids"] == [tok.eos_token_id]
            return [Out(f"answer {len(seen)}") for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: types.SimpleNamespace(kw=kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    args = gr.GenerateArguments(backend="vllm", model_name_or_path=tiny_model_dir, dataset_name=files["prompts"],
                                constitution_path=files["constitution"], output_path=str(tmp_path / "v.jsonl"),
                                max_rows=2, max_new_tokens=5, progress=False)
    gr.main(args)
    rows = read_rows(tmp_path / "v.jsonl")
    assert [r["revision_response"] for r in rows] == ["answer 6", "answer 6"]  # stripped; 3 stages x 2 prompts
    expected_first = tok.apply_chat_template(cai_data.prompt_messages(PROMPTS[0], cai_data.DEFAULT_SYSTEM_PROMPT),
                                             tokenize=False, add_generation_prompt=True)
    assert seen[0] == tok(expected_first, add_special_tokens=False)["input_ids"]


def test_vllm_not_installed_says_so(files, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    args = gr.GenerateArguments(backend="vllm", model_name_or_path=tiny_model_dir, dataset_name=files["prompts"],
                                constitution_path=files["constitution"], output_path=str(tmp_path / "v.jsonl"))
    with pytest.raises(SystemExit, match="`vllm` package is not installed.*--backend transformers"):
        gr.main(args)


def test_bad_inputs_name_the_file_row_and_field(files, tmp_path):
    bad = tmp_path / "constitution.json"
    empty_critique = {"id": "x", "name": "X", "critique_request": "", "revision_request": "r"}
    bad.write_text(json.dumps([CONSTITUTION[0], empty_critique]))
    with pytest.raises(cai_data.DataError, match=r"constitution.json: principle 1: field 'critique_request'"):
        gr.load_constitution(str(bad))
    args = gr.GenerateArguments(dataset_name=files["prompts"], prompt_column="question")
    with pytest.raises(cai_data.DataError, match=r"no column 'question' \(columns: \['area', 'prompt'\]\)"):
        gr.read_prompts(args)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok?"}, {"prompt": None}, {"prompt": "  "}])
    ok, invalid = gr.read_prompts(gr.GenerateArguments(dataset_name=prompts))
    assert ok == [(0, "ok?")] and len(invalid) == 2 and "p.jsonl row 1 field 'prompt'" in invalid[0]
    with pytest.raises(cai_data.DataError, match="few_shot: turn 1: expected {role: assistant"):
        gr.load_few_shot(gr.GenerateArguments(few_shot=[{"role": "user", "content": "a"},
                                                        {"role": "user", "content": "b"}]))


@pytest.mark.parametrize("text,complies", [
    ("Sure, here's how: first get a crowbar.", True),
    ("Step 1: buy the chemicals. Step 2: mix them.", True),
    ("1. Find the password file.", True),
    ("Sure. I can't help with that, but a locksmith can.", False),
    ("I won't help with that. Instead, talk to a counsellor.", False),
    ("Breaking into a home is illegal; call the landlord.", False),
])
def test_still_complies_heuristic(text, complies):
    assert gr.still_complies(text) is complies


def test_flags_for_each_failure():
    rnd = lambda critique, revision: [{"critic_response": critique, "revision_response": revision}]  # noqa: E731
    assert gr.flags_for("Sure, do X.", rnd("It helps with X.", "I can't help with X; try Y instead.")) == []
    assert gr.flags_for("Sure, do X.", rnd("  ", "I can't help with X.")) == ["empty_critique"]
    assert gr.flags_for("Sure, do X.", rnd("It helps.", "")) == ["empty_revision"]
    assert gr.flags_for("Sure, do  X.", rnd("It helps.", "sure, do x.")) == ["revision_identical", "still_complies"]
    assert gr.flags_for("Do X.", rnd("It helps.", "The response explains how to do X, which is illegal.")) == [
        "revision_is_commentary"]
    assert gr.flags_for("Do X.", rnd("It helps.", "**The assistant's response** is harmful.")) == [
        "revision_is_commentary"]
