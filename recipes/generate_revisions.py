"""Constitutional AI, supervised phase, step 1: critique and revise red-team answers into (P, R_revised) pairs.

For each prompt P the model answers (R_init), is asked to critique that answer against a principle of the
constitution, then to rewrite it (R_revised); `num_rounds` critique/revision rounds, all in one multi-turn chat:

    [system] [few-shot turns] user P / assistant R_init / user critique_request / assistant critique /
    user revision_request / assistant R_revised  (/ user critique_request 2 / ...)

The system prompt and chat template are the ones `sft.py` trains with (`system_prompt`, `chat_template_path`),
so M_SFT is trained on the prompt format the revisions were generated in. The principle of each row and round
is drawn with `random.Random(f"{seed}:{row_index}:{round}")`, so a relaunch or another backend draws the same.

Output: JSONL in the HuggingFaceH4/cai-conversation-harmless schema (init_prompt, init_response, critic_prompt,
critic_response, revision_prompt, revision_response, prompt, messages, chosen, rejected) plus `principle`,
`flags`, `prompt_index` and, when num_rounds > 1, `round_history`. `sft.py` reads it unchanged; rows with
flags are left out of training by `exclude_flagged` (default true) and counted in its data summary.

Rows are appended and flushed batch by batch; a relaunch with the same settings skips the prompts already done
(keyed by row index and prompt text). A summary of failures and flags is printed and written next to the
output as `<output>.summary.json`. The flag heuristics are documented in docs/GENERATION.md.

# Demo on CPU (embedded SmolLM2-135M-Instruct, the bundled red-team prompts and constitution)
```bash
python recipes/generate_revisions.py --config recipes/smollm2-135m/generate_demo.yaml
python recipes/sft.py --model_name_or_path models/SmolLM2-135M-Instruct --dtype float32 --use_peft \
    --lora_target_modules q_proj v_proj --max_steps 10 --per_device_train_batch_size 4 --report_to none \
    --dataset_name outputs/generated/revisions.jsonl --output_dir outputs/smollm2-135m-generated-sft
```
(or add the file to a `datasets:` mixture in your SFT YAML: docs/GENERATION.md)

# One GPU (transformers), vLLM, or any OpenAI-compatible endpoint
```bash
python recipes/generate_revisions.py --config recipes/smollm2-135m/generate_demo.yaml \
    --model_name_or_path mistralai/Mistral-7B-Instruct-v0.2 --batch_size 32 --max_new_tokens 256 \
    --dataset_name my_prompts.jsonl --output_path outputs/generated/mistral.jsonl
python recipes/generate_revisions.py --config recipes/smollm2-135m/generate_demo.yaml --backend vllm \
    --model_name_or_path mistralai/Mistral-7B-Instruct-v0.2 --batch_size 1024 --max_new_tokens 256
OPENAI_API_KEY=... python recipes/generate_revisions.py --config recipes/smollm2-135m/generate_demo.yaml \
    --backend openai --endpoint_url http://localhost:8000/v1 --endpoint_model my-model --num_workers 16
```
Any YAML key can be overridden on the command line; use `--config file.yaml`, not `--config=file.yaml`.
"""

import hashlib
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import cai_data  # noqa: E402
import chat_format  # noqa: E402
import checks  # noqa: E402
import entry  # noqa: E402
import env  # noqa: E402
import generation  # noqa: E402
import run_dir  # noqa: E402

BACKENDS = ("transformers", "vllm", "openai")
OUTPUT_COLUMNS = ("init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt",
                  "revision_response", "prompt", "messages", "chosen", "rejected", "principle", "flags")

# "Still complies": the revision opens like a how-to and has none of the cues of a refusal or a safer alternative.
# A cheap screen, not a classifier: see docs/GENERATION.md for what it catches and misses.
COMPLIANCE_OPENER = re.compile(
    r"^[\s\"'*#>-]*(sure\b|certainly\b|of course\b|absolutely\b|here'?s how|here is how|here are the steps|"
    r"here'?s a step|step 1\b|1\.\s)",
    re.IGNORECASE,
)
REFUSAL_CUES = re.compile(
    r"(can'?t|cannot|can not|won'?t|will not|unable to|not able to|sorry|apologi[sz]e|instead|illegal|unlawful|"
    r"unsafe|harmful|dangerous|not appropriate|inappropriate|unethical|professional|seek help|hotline|"
    r"emergency|consult|safer|legal alternative|not recommend|don'?t recommend|strongly advise)",
    re.IGNORECASE,
)
# "Commentary": the revision talks about the response ("The response explains ...") instead of answering the user,
# a common failure of small models that echo their critique.
COMMENTARY_OPENER = re.compile(
    r"^[\s\"'*#>-]*(the|this) (assistant'?s |last |original |previous |initial |revised )?response\b",
    re.IGNORECASE,
)
# Settings that change what a row contains: a relaunch must use the same ones to extend an output file.
RESUME_KEYS = ("backend", "model", "dataset_name", "dataset_config", "dataset_split", "prompt_column",
               "system_prompt", "chat_template_path", "eos_token", "num_rounds", "seed", "max_new_tokens",
               "temperature", "constitution_sha1", "few_shot_sha1")


@dataclass
class GenerateArguments:
    """Options of generate_revisions.py (YAML keys or --flags)."""

    # what to read and write
    dataset_name: str = field(
        default="data/redteam_prompts.jsonl",
        metadata={"help": "Prompts: a .jsonl/.json/.csv/.parquet file, a local folder or a hub dataset id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read (hub datasets and folders)."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the red-team prompt P."})
    constitution_path: str = field(
        default="data/constitution.json",
        metadata={"help": "JSON list of principles: {id, name, critique_request, revision_request}."},
    )
    output_path: str = field(
        default="outputs/generated/revisions.jsonl", metadata={"help": "JSONL written (appended) row by row."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Start afresh instead of resuming output_path."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an output_path this program did not write (else refused)."}
    )
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N prompts (index order)."})
    # prompt format: the same as sft.py
    system_prompt: str | None = field(
        default=cai_data.DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "System message before every conversation, as in sft.py; null or '' for none."},
    )
    system_prompt_mode: str = field(
        default="auto", metadata={"help": "As in sft.py: auto | system | fold | off (transformers and vllm backends)."}
    )
    chat_template_path: str | None = field(
        default=None, metadata={"help": "A .jinja chat template, as in sft.py (transformers and vllm backends)."}
    )
    eos_token: str | None = field(
        default=None, metadata={"help": "End-of-turn token generation stops at, if not the tokenizer's eos."}
    )
    few_shot: list[dict] = field(
        default_factory=list,
        metadata={"help": "Example turns put before every prompt: {role, content} user/assistant alternating."},
    )
    few_shot_path: str | None = field(
        default=None, metadata={"help": "A .json file holding such a list of turns (instead of few_shot)."}
    )
    num_rounds: int = field(default=1, metadata={"help": "Critique/revision rounds per prompt."})
    seed: int = field(default=42, metadata={"help": "Seeds the principle drawn for each row and round."})
    # generation
    backend: str = field(default="transformers", metadata={"help": f"One of {BACKENDS}."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder or hub id (transformers and vllm backends)."}
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on a bf16 GPU, else float32) or a dtype."})
    device: str | None = field(default=None, metadata={"help": "transformers backend: cuda if available, else cpu."})
    max_new_tokens: int = field(default=256, metadata={"help": "Length limit of every answer, critique, revision."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 samples (seeded per run)."})
    batch_size: int = field(
        default=8, metadata={"help": "Prompts that go through each stage together and are written together."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm backend: GPUs per model."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm backend: share of GPU memory."})
    endpoint_url: str | None = field(
        default=None, metadata={"help": "openai backend: base URL, e.g. http://localhost:8000/v1."}
    )
    endpoint_model: str | None = field(default=None, metadata={"help": "openai backend: the served model name."})
    api_key_env: str | None = field(
        default="OPENAI_API_KEY", metadata={"help": "openai backend: environment variable holding the API key."}
    )
    num_workers: int = field(default=8, metadata={"help": "openai backend: concurrent requests."})
    request_timeout: float = field(default=120.0, metadata={"help": "openai backend: seconds per request."})
    request_retries: int = field(default=2, metadata={"help": "openai backend: retries on 5xx/429/network."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (rows/s)."})

    def __post_init__(self):
        # `null`/`none`/'' mean no system prompt; mode `off` sends none either (as sft.py).
        self.system_prompt = None if self.system_prompt_mode == "off" else cai_data.none_if_null(self.system_prompt)


def make_parser():
    from trl import TrlParser

    return TrlParser((GenerateArguments,))


# --------------------------------------------------------------------------------------------- inputs


def validate(args: GenerateArguments) -> None:
    problems = []
    if args.backend not in BACKENDS:
        problems.append(f"backend: '{args.backend}' is not one of {BACKENDS}.")
    if args.backend in ("transformers", "vllm") and not args.model_name_or_path:
        problems.append(f"model_name_or_path: required by backend {args.backend} (a local folder or hub id).")
    if args.backend == "openai" and not (args.endpoint_url and args.endpoint_model):
        problems.append("endpoint_url and endpoint_model: both required by backend openai.")
    if args.few_shot and args.few_shot_path:
        problems.append("few_shot and few_shot_path: set one of them, not both.")
    problems += rules(asdict(args))
    if problems:
        raise checks.ConfigError(problems)


def rules(cfg: dict) -> list[str]:
    """Ranges of the numeric options and the output guard (entry.parse runs them before anything loads)."""
    model = cfg.get("model_name_or_path")
    missing = [f"model_name_or_path: {model} does not exist{checks.where(model)}. Fix the path."] if (
        model and cfg.get("backend") != "openai" and env.is_local_path(model) and not os.path.exists(model)) else []
    return checks.range_problems(cfg) + missing + output_problems(cfg)


def own_summary(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        return isinstance(summary, dict) and isinstance(summary.get("settings"), dict) and "output" in summary
    except (OSError, ValueError):
        return False


def output_problems(cfg: dict) -> list[str]:
    """output_path and its summary: never an input; an existing file only if this program wrote it (its summary
    is next to it), or with --overwrite_output_dir."""
    out = cfg.get("output_path")
    if not out:
        return ["output_path: not set. Give the JSONL file to write, e.g. outputs/generated/revisions.jsonl."]
    inputs = {k: cfg.get(k) for k in ("dataset_name", "constitution_path", "few_shot_path", "chat_template_path")}
    overwrite = bool(cfg.get("overwrite_output_dir"))
    p = run_dir.file_problems("output_path", out, overwrite, inputs, lambda path: own_summary(summary_path(path)),
                              "generate_revisions.py (no summary file next to it)")
    p += run_dir.file_problems("output_path", summary_path(out), overwrite, inputs, own_summary, "generate_revisions.py")
    return list(dict.fromkeys(p))


def load_constitution(path: str) -> list[dict]:
    """The principles, each with a non-empty id, critique_request and revision_request; errors name the entry."""
    principles = cai_data.read_local(path)
    if not principles:
        raise cai_data.DataError(f"{path}: no principles in the constitution file.")
    seen = set()
    for i, p in enumerate(principles):
        for key in ("critique_request", "revision_request"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                raise cai_data.DataError(
                    f"{path}: principle {i}: field '{key}' is missing or empty. Each principle needs id, name, "
                    "critique_request and revision_request (non-empty strings)."
                )
        if p.get("id") in (None, ""):
            raise cai_data.DataError(f"{path}: principle {i}: field 'id' is missing; give each principle an id.")
        if p["id"] in seen:
            raise cai_data.DataError(f"{path}: principle {i}: id {p['id']!r} is used twice; ids must be unique.")
        seen.add(p["id"])
    return principles


def load_few_shot(args: GenerateArguments) -> list[dict]:
    """Example turns (user, assistant, user, assistant, ...) put between the system prompt and P."""
    where = "few_shot"
    turns = args.few_shot
    if args.few_shot_path:
        where = args.few_shot_path
        turns = cai_data.read_local(args.few_shot_path)
    for i, t in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(t, dict) or t.get("role") != expected or not isinstance(t.get("content"), str) \
                or not t["content"].strip():
            raise cai_data.DataError(
                f"{where}: turn {i}: expected {{role: {expected}, content: <non-empty text>}}, got {t!r}. Few-shot "
                "turns alternate user/assistant, start with user and end with assistant (no system turns)."
            )
    if len(turns) % 2:
        raise cai_data.DataError(f"{where}: the last turn must be an assistant turn ({len(turns)} turns given).")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def read_prompts(args: GenerateArguments) -> tuple[list[tuple[int, str]], list[str]]:
    """(row index, P) for every usable row, and where each unusable row is (printed, counted, never silent)."""
    source = {"path": args.dataset_name, "name": args.dataset_config}
    rows = cai_data.read_split(source, args.dataset_split)
    if not rows:
        raise cai_data.DataError(f"{args.dataset_name}: no rows.")
    columns = sorted({k for r in rows[:100] for k in r})
    if args.prompt_column not in columns:
        raise cai_data.DataError(
            f"{args.dataset_name}: no column '{args.prompt_column}' (columns: {columns}). Set `prompt_column` to the "
            "column that holds the prompt text."
        )
    if args.max_rows is not None:
        rows = rows[: args.max_rows]
    prompts, invalid = [], []
    for i, row in enumerate(rows):
        p = row.get(args.prompt_column)
        if isinstance(p, str) and p.strip():
            prompts.append((i, p))
        else:
            invalid.append(f"{args.dataset_name} row {i} field '{args.prompt_column}': "
                           f"{'empty' if isinstance(p, str) else type(p).__name__}, not prompt text")
    return prompts, invalid


def _sha1(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def settings_of(args: GenerateArguments, constitution: list[dict], few_shot: list[dict]) -> dict:
    s = {k: v for k, v in asdict(args).items() if k in RESUME_KEYS}
    s["model"] = args.endpoint_model if args.backend == "openai" else args.model_name_or_path
    s["constitution_sha1"], s["few_shot_sha1"] = _sha1(constitution), _sha1(few_shot)
    return s


def summary_path(output_path: str) -> str:
    return output_path + ".summary.json"


def read_done(args: GenerateArguments, prompts: list[tuple[int, str]], settings: dict) -> dict[int, dict]:
    """Rows already in output_path, by prompt index, after checking they came from this input and these settings."""
    path = args.output_path
    if args.overwrite or args.overwrite_output_dir or not os.path.exists(path):
        for p in (path, summary_path(path)):
            if os.path.exists(p):
                os.remove(p)
        return {}
    problems = output_problems(asdict(args))  # the file is this program's own before anything in it changes
    if problems:
        raise checks.ConfigError(problems)
    with open(path, "rb") as f:
        data = f.read()
    cut = data.rfind(b"\n") + 1  # after it: a line cut short by a crash (that prompt is generated again)
    if os.path.exists(summary_path(path)):
        with open(summary_path(path), encoding="utf-8") as f:
            before = json.load(f).get("settings", {})
        changed = sorted(k for k in RESUME_KEYS if before.get(k) != settings.get(k))
        if changed:
            what = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise cai_data.DataError(
                f"{path} was generated with other settings ({what}). "
                "Resume with the same settings, choose another output_path, or pass --overwrite true to start afresh."
            )
    by_index = dict(prompts)
    done = {}
    # Only the complete lines, parsed here: cai_data.read_json_lines takes a whole file, and the last line may be cut.
    for n, line in enumerate(data[:cut].decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise cai_data.DataError(f"{path} line {n}: not a JSON row of generate_revisions.py. Fix or remove the "
                                     "line, or use another output_path.") from None
        i = row.get("prompt_index") if isinstance(row, dict) else None
        if i not in by_index or by_index[i] != row.get("prompt"):
            raise cai_data.DataError(
                f"{path} line {n}: prompt_index {i} does not match {args.dataset_name} row {i} (the prompts file "
                "changed, or max_rows shrank?). Use another output_path, or --overwrite true to start afresh."
            )
        if i in done:
            raise cai_data.DataError(f"{path} line {n}: prompt_index {i} appears twice; remove one of the lines.")
        done[i] = row
    if cut < len(data):
        print(f"{path}: removing an incomplete last line (interrupted write); that prompt will be generated again.")
        with open(path, "r+b") as f:
            f.truncate(cut)
    return done


# --------------------------------------------------------------------------------------------- backends


def load_tokenizer(args: GenerateArguments):
    """The tokenizer with the chat format sft.py trains with: system role native or folded, a fixed date."""
    tokenizer = chat_format.load_tokenizer(args.model_name_or_path, args.chat_template_path,
                                           revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    fmt = chat_format.ChatFormat.detect(tokenizer, args.system_prompt, args.system_prompt_mode, args.eos_token)
    print("Chat format: " + "; ".join(fmt.notes))
    tokenizer.eos_token = fmt.end_of_turn  # generation stops at the end of the assistant's turn
    return tokenizer


class TransformersBackend:
    """Local generation with generation.generate_local: batched, left padding, CPU or one GPU."""

    def __init__(self, args: GenerateArguments):
        import torch
        from transformers import AutoModelForCausalLM

        self.args = args
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        self.tokenizer = load_tokenizer(args)
        self.model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, revision=args.model_revision, trust_remote_code=args.trust_remote_code,
            dtype=getattr(torch, dtype),
        ).to(device)
        if args.temperature > 0:
            torch.manual_seed(args.seed)
        print(f"Loaded {args.model_name_or_path} on {device} ({dtype}).")

    def __call__(self, conversations: list[list[dict]]) -> list:
        a = self.args
        return generation.generate_local(self.model, self.tokenizer, conversations, max_new_tokens=a.max_new_tokens,
                                         batch_size=a.batch_size, do_sample=a.temperature > 0,
                                         temperature=a.temperature or 1.0)


class VLLMBackend:
    """vLLM's offline engine, fed the prompts rendered by the same tokenizer and chat template."""

    def __init__(self, args: GenerateArguments):
        try:
            import vllm
        except ImportError:
            raise SystemExit(
                "backend vllm: the `vllm` package is not installed. Install it on a CUDA machine (`pip install vllm`; "
                "it is not in requirements.txt because it pulls CUDA), or use `--backend transformers`."
            ) from None
        self.args = args
        self.tokenizer = load_tokenizer(args)
        self.llm = vllm.LLM(
            model=args.model_name_or_path, revision=args.model_revision, trust_remote_code=args.trust_remote_code,
            dtype=args.dtype, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
        )

    def __call__(self, conversations: list[list[dict]]) -> list:
        a = self.args
        return generation.generate_vllm(self.llm, self.tokenizer, conversations, max_new_tokens=a.max_new_tokens,
                                        temperature=a.temperature, seed=a.seed)


class EndpointBackend:
    """Any OpenAI-compatible chat-completions endpoint via generation.openai_chat, a few requests at a time."""

    def __init__(self, args: GenerateArguments):
        self.args = args
        if args.chat_template_path:
            print("note: chat_template_path is not used by backend openai; the server applies its own template.")
        if args.api_key_env and not os.environ.get(args.api_key_env):
            print(f"note: ${args.api_key_env} is not set; requests go without an Authorization header.")

    def _one(self, messages: list[dict]):
        a = self.args
        try:
            return generation.openai_chat(a.endpoint_url, a.endpoint_model, messages, api_key_env=a.api_key_env,
                                          max_tokens=a.max_new_tokens, temperature=a.temperature,
                                          timeout=a.request_timeout, retries=a.request_retries)
        except generation.EndpointError as e:
            return e

    def __call__(self, conversations: list[list[dict]]) -> list:
        with ThreadPoolExecutor(max_workers=self.args.num_workers) as pool:
            return list(pool.map(self._one, conversations))


def make_backend(args: GenerateArguments):
    return {"transformers": TransformersBackend, "vllm": VLLMBackend, "openai": EndpointBackend}[args.backend](args)


# --------------------------------------------------------------------------------------------- critique and revise


def pick_principle(constitution: list[dict], seed: int, row_index: int, round_: int) -> dict:
    return random.Random(f"{seed}:{row_index}:{round_}").choice(constitution)


def still_complies(text: str) -> bool:
    return bool(COMPLIANCE_OPENER.match(text)) and not REFUSAL_CUES.search(text)


def flags_for(init_response: str, rounds: list[dict]) -> list[str]:
    flags = []
    if any(not r["critic_response"].strip() for r in rounds):
        flags.append("empty_critique")
    final = rounds[-1]["revision_response"]
    if not final.strip():
        flags.append("empty_revision")
    elif " ".join(final.lower().split()) == " ".join(init_response.lower().split()):
        flags.append("revision_identical")
    if final.strip() and still_complies(final):
        flags.append("still_complies")
    if COMMENTARY_OPENER.match(final):
        flags.append("revision_is_commentary")
    return flags


def _stage(backend, states: list[dict], label: str) -> None:
    """One model turn for every conversation still alive; a failed request ends that row (counted, retried later)."""
    alive = [s for s in states if s["error"] is None]
    if not alive:
        return
    for s, out in zip(alive, backend([s["messages"] for s in alive])):
        if isinstance(out, Exception):
            s["error"] = f"{label}: {out}"
        else:
            s["messages"].append({"role": "assistant", "content": out})


def revise_batch(backend, batch: list[tuple[int, str]], constitution, few_shot, args) -> list[dict]:
    """Initial answer, then num_rounds of critique + revision, each stage batched across the prompts."""
    states = []
    for i, prompt in batch:
        messages = cai_data.prompt_messages(prompt, args.system_prompt)
        messages[-1:-1] = few_shot  # example turns go between the system prompt and P
        states.append({"index": i, "prompt": prompt, "messages": messages, "start": len(messages), "rounds": [],
                       "error": None})
    _stage(backend, states, "initial response")
    for round_ in range(1, args.num_rounds + 1):
        for s in states:
            s["principle"] = pick_principle(constitution, args.seed, s["index"], round_)
            s["messages"].append({"role": "user", "content": s["principle"]["critique_request"]})
        _stage(backend, states, f"round {round_} critique")
        for s in states:
            s["messages"].append({"role": "user", "content": s["principle"]["revision_request"]})
        _stage(backend, states, f"round {round_} revision")
        for s in states:
            if s["error"] is None:
                m = s["messages"]
                s["rounds"].append({"round": round_, "principle": s["principle"]["id"],
                                    "critic_prompt": m[-4]["content"], "critic_response": m[-3]["content"],
                                    "revision_prompt": m[-2]["content"], "revision_response": m[-1]["content"]})
    return states


def to_row(s: dict, num_rounds: int) -> dict:
    """A row in the HuggingFaceH4/cai-conversation-harmless schema (+ principle, flags, prompt_index, rounds)."""
    prompt, init = s["prompt"], s["messages"][s["start"]]["content"]
    last = s["rounds"][-1]
    revised = last["revision_response"]
    row = {
        "init_prompt": prompt,
        "init_response": init,
        "critic_prompt": last["critic_prompt"],
        "critic_response": last["critic_response"],
        "revision_prompt": last["revision_prompt"],
        "revision_response": revised,
        "prompt": prompt,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": revised}],
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": revised}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": init}],
        "principle": last["principle"],
        "flags": flags_for(init, s["rounds"]),
        "prompt_index": s["index"],
    }
    if num_rounds > 1:
        row["round_history"] = s["rounds"]
    return row


# --------------------------------------------------------------------------------------------- summary


def summarize(args, settings, prompts, invalid, n_done_before, generated, failures, elapsed, status) -> dict:
    rows = cai_data.read_json_lines(args.output_path) if os.path.exists(args.output_path) else []
    flags, examples = {}, {}
    for r in rows:
        for fl in r.get("flags") or []:
            flags[fl] = flags.get(fl, 0) + 1
            examples.setdefault(fl, [])
            if len(examples[fl]) < cai_data.MAX_LOCATIONS:
                examples[fl].append(r["prompt_index"])
    return {
        "status": status,
        "output": args.output_path,
        "prompts": len(prompts),
        "invalid_prompts": {"count": len(invalid), "examples": invalid[: cai_data.MAX_LOCATIONS]},
        "rows_in_output": len(rows),
        "already_done_at_start": n_done_before,
        "generated_this_run": generated,
        "failed_this_run": {"count": len(failures), "examples": failures[: cai_data.MAX_LOCATIONS]},
        "flagged_rows": sum(1 for r in rows if r.get("flags")),
        "flags": flags,
        "flag_examples_prompt_index": examples,
        "elapsed_s": round(elapsed, 1),
        "rows_per_s": round(generated / elapsed, 3) if elapsed > 0 and generated else None,
        "settings": settings,
    }


def write_summary(summary: dict) -> None:
    path = summary_path(summary["output"])
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)


def print_summary(s: dict) -> None:
    print(f"\nSummary ({summary_path(s['output'])}):")
    print(f"  rows in {s['output']}: {s['rows_in_output']} of {s['prompts']} prompts "
          f"({s['already_done_at_start']} done before, {s['generated_this_run']} generated now, "
          f"{s['rows_per_s'] or '-'} rows/s)")
    print(f"  flagged rows (left out of SFT by exclude_flagged): {s['flagged_rows']}")
    for flag, n in sorted(s["flags"].items()):
        print(f"    {flag}: {n}, e.g. prompt_index {s['flag_examples_prompt_index'][flag]}")
    if s["invalid_prompts"]["count"]:
        print(f"  invalid prompts skipped: {s['invalid_prompts']['count']}, e.g. {s['invalid_prompts']['examples']}"
              " - fix those rows and relaunch to add them.")
    if s["failed_this_run"]["count"]:
        print(f"  failed rows (not written; a relaunch retries them): {s['failed_this_run']['count']}, "
              f"e.g. {s['failed_this_run']['examples']}")


# --------------------------------------------------------------------------------------------- main


def main(args: GenerateArguments) -> dict:
    validate(args)
    run_dir.RunLock(args.output_path, "generate_revisions.py", inside=False).acquire()  # one run per output file
    constitution = load_constitution(args.constitution_path)
    few_shot = load_few_shot(args)
    prompts, invalid = read_prompts(args)
    for where in invalid[: cai_data.MAX_LOCATIONS]:
        print(f"warning: skipping {where}")
    settings = settings_of(args, constitution, few_shot)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_path)), exist_ok=True)
    done = read_done(args, prompts, settings)
    todo = [(i, p) for i, p in prompts if i not in done]
    print(f"{len(prompts)} prompts from {args.dataset_name}, {len(constitution)} principles, "
          f"{len(done)} already in {args.output_path}, {len(todo)} to generate with backend {args.backend}.")

    start, generated, failures = time.perf_counter(), 0, []
    write_summary(summarize(args, settings, prompts, invalid, len(done), 0, [], 0.0, "running"))
    if todo:
        from tqdm.auto import tqdm

        backend = make_backend(args)
        start = time.perf_counter()  # rows/s measures generation, not model loading
        bar = tqdm(total=len(todo), unit="row", desc="critique-revise", disable=not args.progress)
        n_flagged = 0
        with open(args.output_path, "a", encoding="utf-8") as out:
            for b in range(0, len(todo), args.batch_size):
                states = revise_batch(backend, todo[b : b + args.batch_size], constitution, few_shot, args)
                rows = [to_row(s, args.num_rounds) for s in states if s["error"] is None]
                failures += [f"row {s['index']}: {s['error']}" for s in states if s["error"] is not None]
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                out.flush()
                os.fsync(out.fileno())
                generated += len(rows)
                n_flagged += sum(1 for r in rows if r["flags"])
                bar.update(len(states))
                bar.set_postfix(flagged=n_flagged, failed=len(failures))
        bar.close()
    elapsed = time.perf_counter() - start
    status = "complete" if not failures and not invalid else "incomplete"
    summary = summarize(args, settings, prompts, invalid, len(done), generated, failures, elapsed, status)
    write_summary(summary)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    entry.run(main, make_parser(), rules)
