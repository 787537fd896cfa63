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


def trainers(tiny_model_dir, tmp_path, packing):
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
                         report_to="none", per_device_train_batch_size=4, use_cpu=True)  # fmt: skip
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        out.append(cls(model=tiny_model_dir, args=args, train_dataset=ds, processing_class=tok, peft_config=lora))
    return out


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_same_loss_gradients_and_metrics_as_sft_trainer(tiny_model_dir, tmp_path, packing):
    reference, trainer = trainers(tiny_model_dir, tmp_path, packing)
    batch = reference.data_collator([reference.train_dataset[i] for i in range(len(reference.train_dataset))])
    assert ("attention_mask" in batch) != packing
    trained = batch["labels"][:, 1:] != -100
    assert 0 < trained.sum() < trained.numel()  # prompt positions exist: the kept positions are a strict subset
    losses, grads = [], []
    for t in (reference, trainer):
        t.model.load_state_dict(reference.model.state_dict())  # identical LoRA initialisation
        t.model.train()
        t.model.zero_grad()
        loss = t.compute_loss(t.model, dict(batch), num_items_in_batch=trained.sum())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)

    # the training log carries SFTTrainer's metrics, with the same values
    logged = []
    for t in (reference, trainer):
        t.log({"loss": float(losses[0])})
        logged.append(t.state.log_history[-1])
    for key in ("mean_token_accuracy", "entropy", "num_tokens"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-4), key


def test_evaluation_goes_through_sft_trainer(tiny_model_dir, tmp_path):
    reference, trainer = trainers(tiny_model_dir, tmp_path, True)
    batch = reference.data_collator([reference.train_dataset[i] for i in range(len(reference.train_dataset))])
    trainer.model.load_state_dict(reference.model.state_dict())
    reference.model.eval(), trainer.model.eval()
    with torch.no_grad():
        a = reference.compute_loss(reference.model, dict(batch))
        b = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.equal(a, b)
    assert trainer.train_tokens_seen == 0  # the eval batch went to SFTTrainer's own compute_loss


def test_cpu_bf16_flag_read_from_cpuinfo(tmp_path):
    import env

    (tmp_path / "amx").write_text("flags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    (tmp_path / "avx").write_text("flags\t\t: fpu sse avx512f avx512_bf16\n")
    (tmp_path / "old").write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert env.cpu_has_bf16(str(tmp_path / "amx")) is True
    assert env.cpu_has_bf16(str(tmp_path / "avx")) is True
    assert env.cpu_has_bf16(str(tmp_path / "old")) is False
    assert env.cpu_has_bf16(str(tmp_path / "missing")) is None
