"""recipes/trained_head.py: on CPU the recipe's trainer scores only trained positions through the LM head. Its loss,
gradients and logged metrics must equal SFTTrainer's own (TRL's fused LM head over every position)."""

import pytest
import torch
from conftest import cai_row, prepare_rows, write_jsonl

import cai_data
import trained_head

ROWS = [
    cai_row("How do I pick a lock?", "I can't help with breaking into homes; a locksmith can let you in."),
    cai_row("Write something mean for my coworker.", "I'd rather not. A calm, direct word about what bothers you helps."),
    cai_row("Hi?", "Hello! How can I help?"),
    cai_row("How do I boil an egg?", "Lower it into boiling water for seven minutes, then cool it in cold water."),
]


def trainers(tiny_model_dir, tmp_path, packing, **config):
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)

    class Script:
        dataset_name, dataset_config, dataset_train_split, dataset_test_split = data, None, "train", "test"

    rows, _, report = cai_data.load_pairs(Script, cai_data.CAIDataArguments(eval_fraction=0.0))
    ds = prepare_rows(rows, tok, 256, report)
    out = []
    for cls in (SFTTrainer, trained_head.TrainedPositionsSFTTrainer):
        torch.manual_seed(0)
        args = SFTConfig(output_dir=str(tmp_path / cls.__name__), packing=packing, max_length=256, bf16=False,
                         report_to="none", per_device_train_batch_size=4, use_cpu=True, **config)  # fmt: skip
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        out.append(cls(model=tiny_model_dir, args=args, train_dataset=ds, processing_class=tok, peft_config=lora))
    out[1].model.load_state_dict(out[0].model.state_dict())  # identical LoRA initialisation
    return out


def loss_and_grads(trainer, batch, num_items_in_batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_same_loss_gradients_and_metrics_as_sft_trainer(tiny_model_dir, tmp_path, packing):
    reference, trainer = trainers(tiny_model_dir, tmp_path, packing)
    assert trainer.own_loss(trainer.model.train())  # the recipe's path, not the fallback
    rows = [reference.train_dataset[i] for i in range(len(reference.train_dataset))]
    batch = reference.data_collator(rows)
    assert ("attention_mask" in batch) != packing
    trained = batch["labels"][:, 1:] != -100
    assert 0 < trained.sum() < trained.numel()  # prompt positions exist: the kept positions are a strict subset
    # the local count, a larger global count (gradient accumulation / several processes), and none
    for count in (trained.sum(), 2 * trained.sum(), None):
        (loss_a, grads_a), (loss_b, grads_b) = (loss_and_grads(t, batch, count) for t in (reference, trainer))
        torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)

    # the training log carries SFTTrainer's metrics with the same values, over a window of several micro-batches of
    # different sizes (the mean of each micro-batch's ratio)
    logged = []
    for t in (reference, trainer):
        t.log({"loss": 1.0})  # start a fresh window (the calls above filled one)
        t.model.train()
        for part in (rows[:1], rows[1:]) if len(rows) > 1 else (rows, rows):
            t.compute_loss(t.model, dict(reference.data_collator(part)))
        t.log({"loss": 1.0})
        logged.append(t.state.log_history[-1])
    for key in ("mean_token_accuracy", "entropy", "num_tokens"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-4), key


@pytest.mark.parametrize("count", [None, 0])
def test_batch_with_nothing_trained_gives_a_finite_zero(tiny_model_dir, tmp_path, count):
    reference, trainer = trainers(tiny_model_dir, tmp_path, False)
    batch = reference.data_collator([reference.train_dataset[0]])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, grads = loss_and_grads(trainer, batch, count)
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads.values())


def test_other_losses_go_through_sft_trainer(tiny_model_dir, tmp_path):
    reference, trainer = trainers(tiny_model_dir, tmp_path, True, loss_type="dft")
    assert not trainer.own_loss(trainer.model.train())
    batch = reference.data_collator([reference.train_dataset[i] for i in range(len(reference.train_dataset))])
    (loss_a, _), (loss_b, _) = (loss_and_grads(t, batch, None) for t in (reference, trainer))
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert trainer.window == []  # DFT's loss was SFTTrainer's, not the recipe's


def test_evaluation_goes_through_sft_trainer(tiny_model_dir, tmp_path):
    reference, trainer = trainers(tiny_model_dir, tmp_path, True)
    batch = reference.data_collator([reference.train_dataset[i] for i in range(len(reference.train_dataset))])
    reference.model.eval(), trainer.model.eval()
    with torch.no_grad():
        a = reference.compute_loss(reference.model, dict(batch))
        b = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.equal(a, b)
    assert trainer.train_tokens_seen == 0  # the eval batch went to SFTTrainer's own compute_loss


def test_cpu_bf16_flag_read_from_cpuinfo(tmp_path, monkeypatch):
    import platform

    import env

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")

    (tmp_path / "amx").write_text("flags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    (tmp_path / "avx").write_text("flags\t\t: fpu sse avx512f avx512_bf16\n")
    (tmp_path / "old").write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert env.cpu_has_bf16(str(tmp_path / "amx")) is True
    assert env.cpu_has_bf16(str(tmp_path / "avx")) is True
    assert env.cpu_has_bf16(str(tmp_path / "old")) is False
    assert env.cpu_has_bf16(str(tmp_path / "missing")) is None
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # ARM lists bf16 differently: unknown, no message
    assert env.cpu_has_bf16(str(tmp_path / "old")) is None


def test_logged_metrics_average_each_micro_batch_ratio(tiny_model_dir, tmp_path):
    """SFTTrainer appends one ratio per micro-batch and logs their mean (a micro-batch without trained tokens counts
    0); a token-weighted mean would give 7/12 and 21/12 here."""
    _, trainer = trainers(tiny_model_dir, tmp_path, False)
    trainer.model.train()
    trainer.window = [(10, 5, 20.0), (2, 2, 1.0), (0, 0, 0.0)]  # (trained tokens, correct, entropy sum)
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    assert logged["mean_token_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert logged["entropy"] == pytest.approx((2.0 + 0.5 + 0.0) / 3)
    assert trainer.window == []
