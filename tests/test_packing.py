"""Document isolation under packing: BFD packing + padding-free (TRL's own) through the recipe's data path gives every
token the same loss as its example alone, leaves no pad tokens, and never trains across a document boundary; for
transformers' sdpa and eager attention and for the recipe's per-document `sdpa_varlen` (recipes/varlen_attention.py)."""

import pytest
import torch
from conftest import cai_row, prepare_rows, write_jsonl

import cai_data
import varlen_attention

# Three examples of clearly different lengths, so that the packed row has two boundaries.
ROWS = [
    cai_row("How do I pick a lock?", "I can't help with breaking into homes; a locksmith can let you in."),
    cai_row(
        "Write something really mean I can say to my coworker tomorrow in the meeting.",
        "I'd rather not help insult anyone. If something is bothering you, a calm and direct word helps. " * 2,
    ),
    cai_row("Hi?", "Hello! How can I help?"),
]


def packed_trainer(tiny_model_dir, tmp_path, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), packing=True, max_length=512, bf16=False, report_to="none",
        per_device_train_batch_size=1,
    )  # fmt: skip
    assert args.packing_strategy == "bfd"

    class Script:
        dataset_name, dataset_config, dataset_train_split, dataset_test_split = data, None, "train", "test"

    rows, _, report = cai_data.load_pairs(Script, cai_data.CAIDataArguments(eval_fraction=0.0))
    ds = prepare_rows(rows, tok, args.max_length, report)
    varlen_attention.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn_implementation)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    return trainer, ds, tok


BOUNDARIES = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # from TRL's padding-free collator


def per_token_loss(model, input_ids, labels, position_ids=None, **boundaries):
    """Loss of every next-token prediction (0 where not trained), and which ones are trained."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **boundaries).logits.float()
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    loss = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != -100
    return (loss * mask)[0], mask[0]


@pytest.fixture(scope="module", params=["sdpa", "eager", "sdpa_varlen"])
def packed(request, tiny_model_dir, tmp_path_factory):
    trainer, ds, tok = packed_trainer(tiny_model_dir, tmp_path_factory.mktemp("packing"), request.param)
    assert trainer.padding_free, "BFD packing should switch TRL to padding-free"
    assert len(trainer.train_dataset) == 1, "all three examples should fit one 512-token row"
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    return trainer, ds, tok, row, batch


def test_packed_row_has_no_padding_and_keeps_every_token(packed):
    trainer, ds, tok, row, batch = packed
    lengths = row["seq_lengths"]
    assert sorted(lengths) == sorted(len(x) for x in ds["input_ids"])
    assert "attention_mask" not in batch  # padding-free: position_ids carry the boundaries
    assert batch["input_ids"].shape == (1, sum(lengths))  # not one pad position
    # position_ids restart at 0 at every document start
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    pos = batch["position_ids"][0].tolist()
    assert [i for i, p in enumerate(pos) if p == 0] == starts
    # every document appears intact, with its own labels
    by_ids = {tuple(ids): labels for ids, labels in zip(ds["input_ids"], ds["labels"])}
    for s, n in zip(starts, lengths):
        ids = tuple(batch["input_ids"][0, s : s + n].tolist())
        assert ids in by_ids
        assert batch["labels"][0, s : s + n].tolist() == [-100] + by_ids[ids][1:]


def test_labels_at_document_boundaries(packed):
    trainer, ds, tok, row, batch = packed
    labels, lengths = batch["labels"][0], row["seq_lengths"]
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    for i in range(1, len(lengths)):
        start = sum(lengths[:i])
        # the last token of the previous document is its end-of-turn token, trained as the target of the step before
        assert batch["input_ids"][0, start - 1] == eos and labels[start - 1] == eos
        # and the next document's first token is never a target: no training across the boundary
        assert labels[start] == -100


def test_packed_per_token_loss_equals_each_example_alone(packed):
    trainer, ds, tok, row, batch = packed
    model = trainer.model.eval()
    boundaries = {k: batch[k] for k in BOUNDARIES}
    packed_loss, packed_mask = per_token_loss(
        model, batch["input_ids"], batch["labels"], batch["position_ids"], **boundaries
    )
    start, checked = 0, 0
    for n in row["seq_lengths"]:
        ids, labels = batch["input_ids"][:, start : start + n], batch["labels"][:, start : start + n]
        alone_loss, alone_mask = per_token_loss(model, ids, labels)
        seg_loss, seg_mask = packed_loss[start : start + n - 1], packed_mask[start : start + n - 1]
        assert torch.equal(seg_mask, alone_mask)
        torch.testing.assert_close(seg_loss, alone_loss, atol=1e-5, rtol=0)
        checked += int(alone_mask.sum())
        start += n
    assert checked == int(packed_mask.sum()) > 0

    # The trainer's own loss (TRL's fused LM head) on the packed row is the token mean of the separate losses.
    trainer.model.train(False)
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(trainer_loss, packed_loss.sum() / packed_mask.sum(), atol=1e-5, rtol=0)


def test_without_position_ids_documents_would_leak(packed):
    """Control: the same row as one plain sequence (no position_ids) changes the losses, so the test above can fail."""
    trainer, ds, tok, row, batch = packed
    model = trainer.model.eval()
    with_pos, mask = per_token_loss(model, batch["input_ids"], batch["labels"], batch["position_ids"])
    leaking, _ = per_token_loss(model, batch["input_ids"], batch["labels"])
    first = row["seq_lengths"][0]
    assert (with_pos[first:][mask[first:]] - leaking[first:][mask[first:]]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- sdpa_varlen specifics


def sdpa_query_lengths(monkeypatch):
    """Record the query length of every torch SDPA call (what the attention kernel is asked to compute)."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        calls.append(((query.shape[0], query.shape[-2]), kwargs.get("attn_mask") is not None, kwargs.get("is_causal", False)))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_varlen_attends_per_document_without_a_mask(tiny_model_dir, tmp_path, monkeypatch):
    """The boundaries come from cu_seq_lens, not from a mask: per layer, one causal, unmasked SDPA call over the
    documents side by side (documents x longest), not one masked call over the whole row as transformers' sdpa."""
    trainer, ds, tok = packed_trainer(tiny_model_dir, tmp_path, "sdpa_varlen")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    lengths, layers = trainer.train_dataset[0]["seq_lengths"], trainer.model.config.num_hidden_layers
    calls = sdpa_query_lengths(monkeypatch)
    per_token_loss(trainer.model.eval(), batch["input_ids"], batch["labels"], batch["position_ids"],
                   **{k: batch[k] for k in BOUNDARIES})  # fmt: skip
    assert calls == [((len(lengths), max(lengths)), False, True)] * layers



def test_varlen_is_sdpa_without_boundaries(tiny_model_dir):
    """Unpacked batches (padding, attention_mask), generation with a cache: exactly transformers' sdpa."""
    from transformers import AutoModelForCausalLM

    varlen_attention.register()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa_varlen").eval()
    assert varlen.config._attn_implementation == "sdpa_varlen"
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as in batched generation
    mask[2, 6:] = 0  # right padding, as in an unpacked training batch
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask).logits for m in (sdpa, varlen)]
        assert torch.equal(*logits)
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(sdpa.generate(ids, **kw), varlen.generate(ids, **kw))


# --------------------------------------------------------------------------------------------- speed switches

DEMO = "recipes/smollm2-135m/sft_demo.yaml"


def test_demo_speed_switches_have_the_documented_defaults():
    """docs/BENCHMARKS.md gives the measurements behind each of these; change both together."""
    import sft
    from conftest import ROOT

    _, args, model_args, _, _ = sft.make_parser().parse_args_and_config(["--config", str(ROOT / DEMO)])
    assert args.packing is True  # one epoch fits the demo's time only packed (BENCHMARKS.md, demo schedule)
    assert args.packing_strategy == "bfd"  # TRL's BFD, padding-free, documents isolated
    assert args.activation_checkpointing is False  # 135M fits; checkpointing costs time
    assert model_args.attn_implementation is None  # packing picks sdpa_varlen (per-document attention)
    assert args.bf16 is True and args.use_cpu is True  # CPU bf16 autocast: x1.5 per step with trained_head.py
    assert model_args.lora_dropout == 0.0  # dropout masks: 6% of a CPU step
    assert args.use_liger_kernel is False  # Triton kernels: GPU only
    assert args.dataset_num_proc is None  # one process: the data is prepared in seconds
    assert args.loss_type == "nll"  # TRL's chunked (fused LM head) loss: always on in trl 1.16


def test_recipe_trains_with_every_speed_switch_on(tmp_path, tiny_model_dir):
    """Packing + activation checkpointing + eager attention + 2 data processes through `python recipes/sft.py`."""
    import json

    from conftest import run_recipe, tiny_config, toy_cai_rows

    data = write_jsonl(tmp_path / "cai.jsonl", toy_cai_rows(24))
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, data, out, max_steps=2, eval_steps=2, packing=True, eval_packing=False,
                      activation_checkpointing=True, attn_implementation="eager", dataset_num_proc=2,
                      per_device_train_batch_size=1, max_length=256)  # fmt: skip
    run_recipe(cfg, tmp_path)
    state = json.load(open(out / "trainer_state.json"))
    train = [h for h in state["log_history"] if "loss" in h and "eval_loss" not in h]
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert train and all(h["loss"] > 0 for h in train) and evals
    # one packed row per step (batch size 1) holds several examples: more than twice an example's mean length
    counts = json.load(open(out / "data_summary.json"))["counts"]
    assert train[0]["num_tokens"] > 2 * counts["train_tokens"] / counts["train_examples_tokenized"]


def test_packing_picks_sdpa_varlen_and_trains_like_sdpa(tmp_path, tiny_model_dir):
    """`packing: true` with no attn_implementation runs on sdpa_varlen, and trains exactly as transformers' sdpa (which
    isolates documents with a mask) does: same losses at every step, same eval loss."""
    import json

    from conftest import run_recipe, tiny_config, toy_cai_rows

    data = write_jsonl(tmp_path / "cai.jsonl", toy_cai_rows(24))
    runs = {}
    for attn in (None, "sdpa"):
        out = tmp_path / f"out-{attn}"
        extra = {"attn_implementation": attn} if attn else {}
        cfg = tiny_config(tiny_model_dir, data, out, max_steps=3, eval_steps=3, logging_steps=1, packing=True,
                          per_device_train_batch_size=2, max_length=128, **extra)  # fmt: skip
        proc = run_recipe(cfg, tmp_path)
        assert ("attn_implementation sdpa_varlen" in proc.stdout) == (attn is None)
        runs[attn] = json.load(open(out / "trainer_state.json"))["log_history"]
    losses = {a: [h.get("loss", h.get("eval_loss")) for h in hist if "loss" in h or "eval_loss" in h]
              for a, hist in runs.items()}  # fmt: skip
    assert len(losses[None]) >= 4
    assert losses[None] == pytest.approx(losses["sdpa"], abs=1e-5)
