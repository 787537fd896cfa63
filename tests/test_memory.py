"""recipes/memory.py: exact parameter counts from a config, LoRA trainable counts equal to peft's, the per-layer
activation bytes equal to what autograd really saves (CPU), and the GPU estimate equal to the documented formula."""

import json

import pytest
import torch

import memory

GiB = 2**30
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers=2, **kw):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=500, hidden_size=384, intermediate_size=1000, num_hidden_layers=layers,
               num_attention_heads=6, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)  # fmt: skip
    cfg.update(kw)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="module")
def mistral():
    from transformers import MistralConfig

    config = MistralConfig()
    return config, memory.meta_model(config)  # built once on the meta device: no memory, no weights


def test_mistral_7b_parameter_count_is_exact(mistral):
    config, _ = mistral
    assert memory.count_parameters(config) == 7_241_732_096


def test_tied_embeddings_counted_once():
    tied, untied = tiny_llama(tie_word_embeddings=True), tiny_llama()
    assert memory.count_parameters(untied) - memory.count_parameters(tied) == 500 * 384


@pytest.mark.parametrize(
    "targets,dora,to_save",
    [(ALL_LINEAR, False, None), (None, False, None), ("all-linear", False, None), (["q_proj", "v_proj"], True, None),
     (["o_proj"], False, ["lm_head"])],
)  # fmt: skip
def test_lora_trainable_parameters_match_peft(targets, dora, to_save):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = tiny_llama()
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_config(cfg),
        LoraConfig(r=8, target_modules=targets, use_dora=dora, modules_to_save=to_save, task_type="CAUSAL_LM"),
    )
    expected, _ = peft_model.get_nb_trainable_parameters()
    setup = memory.Setup(method="lora", lora_r=8, lora_target_modules=targets, use_dora=dora,
                         lora_modules_to_save=to_save)  # fmt: skip
    assert memory.trainable_parameters(memory.meta_model(cfg), setup, "llama") == expected


def _saved_bytes_per_token_per_layer(cfg_kwargs, dtype, lora_dropout, attn, autocast=False):
    """What autograd keeps for backward (parameters excluded), per token and decoder layer: 3 layers minus 1."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    per = []
    for layers in (1, 3):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama(layers, attn_implementation=attn, **cfg_kwargs)).to(dtype)
        if lora_dropout is not None:
            model = get_peft_model(model, LoraConfig(r=8, target_modules=ALL_LINEAR, lora_dropout=lora_dropout))
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        backbone = model.get_base_model().model if lora_dropout is not None else model.model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                backbone(input_ids=torch.randint(0, 500, (2, 64)))
        per.append(sum(seen.values()))
    return (per[1] - per[0]) / 2 / 128


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora_dropout", [None, 0.05, 0.0])
def test_activation_formula_matches_saved_tensors(attn, dtype, lora_dropout):
    measured = _saved_bytes_per_token_per_layer({}, dtype, lora_dropout, attn)
    cfg = tiny_llama(attn_implementation=attn)
    lora = lora_dropout is not None
    setup = memory.Setup(method="lora" if lora else "full", seq_len=64, micro_batch=2, lora_r=8,
                         lora_dropout=lora_dropout or 0.0, lora_target_modules=ALL_LINEAR, attn_implementation=attn,
                         device="cpu")  # fmt: skip
    modules = [(n, 384) for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    modules += [("o_proj", 6 * 32), ("down_proj", 1000)]
    estimated = memory.layer_activation_bytes(cfg, setup, modules if lora else (), 2 if dtype == torch.bfloat16 else 4)
    assert estimated == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("lora_dropout", [0.05, 0.0])
def test_activation_formula_under_bf16_autocast(lora_dropout):
    """The usual GPU LoRA run: bf16 weights, fp32 adapters, bf16 autocast (autocast's weight copies per token)."""
    measured = _saved_bytes_per_token_per_layer({}, torch.bfloat16, lora_dropout, "sdpa", autocast=True)
    cfg = tiny_llama()
    setup = memory.Setup(method="lora", seq_len=64, micro_batch=2, lora_r=8, lora_dropout=lora_dropout,
                         lora_target_modules=ALL_LINEAR, mixed_precision=True, device="cpu")  # fmt: skip
    modules = [(n, 384) for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    modules += [("o_proj", 192), ("down_proj", 1000)]
    adapter_weights = 8 * sum(i + o for i, o in [(384, 192), (384, 64), (384, 64), (192, 384), (384, 1000),
                                                 (384, 1000), (1000, 384)])  # fmt: skip
    estimated = memory.layer_activation_bytes(cfg, setup, modules, 2) + 2 * adapter_weights / 128
    assert estimated == pytest.approx(measured, rel=0.01)


def _mistral_by_hand(tokens, per_layer, checkpointing, frozen):
    """Documented formula, hand-written for Mistral-7B (h 4096, L 32, V 32000, bf16 activations)."""
    h, L, V = 4096, 32, 32000
    head = (4 * h + 4 if frozen else 4 * h + 2 * 2 * h + 4) + 2 * h  # final norm + the LM head's hidden states
    act = tokens * ((L * h * 2 + per_layer + head) if checkpointing else (L * per_layer + head))
    logits = min(tokens, 4096) * min(V, 32768) * (2 + 4) + tokens * h * 4
    return act, logits


def test_full_zero3_estimate_equals_documented_formula(mistral):
    P = 7_241_732_096
    setup = memory.Setup(method="full", seq_len=2048, micro_batch=8, num_gpus=8, zero_stage=3,
                         activation_checkpointing=True, weights_dtype="bfloat16", mixed_precision=True)  # fmt: skip
    est = memory.estimate(mistral[0], setup, model=mistral[1])
    h, qd, kvd, nh, inter = 4096, 4096, 1024, 32, 14336
    per_layer = 2 * (4 * h + 4 * h + 4) + 2 * (2 * qd + 2 * kvd) + 4 * nh + 2 * 4 * inter
    act, logits = _mistral_by_hand(8 * 2048, per_layer, True, frozen=False)
    layer_params = (P - 2 * 32000 * h - h) / 32
    expected = {
        "weights": 2 * P / 8,  # bf16, sharded 8 ways
        "gradients": 2 * P / 8,
        "optimizer": 12 * P / 8,  # fp32 master + m + v, sharded
        "activations": act,
        "logits": logits,
        "gathered": 2 * layer_params * 2,
    }
    for term, value in expected.items():
        assert getattr(est, term) == pytest.approx(value, rel=1e-3), term  # stated tolerance: 0.1 %
    assert est.total == pytest.approx(sum(expected.values()), rel=1e-3)
    assert 20 * GiB < est.total < 26 * GiB  # 22.97 GiB, the number quoted in docs/BENCHMARKS.md


def test_qlora_estimate_equals_documented_formula(mistral):
    P, h, L, inter, kvd = 7_241_732_096, 4096, 32, 14336, 1024
    setup = memory.Setup(method="qlora", seq_len=2048, micro_batch=4, activation_checkpointing=True,
                         weights_dtype="bfloat16", mixed_precision=True, optim="paged_adamw_8bit",
                         lora_target_modules=ALL_LINEAR, lora_r=16, nested_quant=True)  # fmt: skip
    est = memory.estimate(mistral[0], setup, model=mistral[1])
    fan = {"q_proj": (h, h), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (h, h), "gate_proj": (h, inter),
           "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
    T = L * 16 * sum(i + o for i, o in fan.values())
    Q = P - 2 * 32000 * h - (2 * L + 1) * h  # every Linear but lm_head: not embeddings, lm_head or norms
    assert est.trainable == T == 41_943_040
    per_layer = 2 * (4 * h + 4) + 2 * (2 * h + 2 * kvd) + 4 * 32 + 3 * 2 * inter  # frozen base: fewer saved inputs
    per_layer += sum((1 + 2) * i for i, _ in fan.values()) + 2 * 16 * 7  # bf16 adapters: bool mask + dropout out
    act, logits = _mistral_by_hand(4 * 2048, per_layer, True, frozen=True)
    expected = {
        "weights": Q * 4.127 / 8 + (P - Q) * 2 + T * 2,
        "gradients": 2 * T,
        "optimizer": 2 * T,  # 8-bit m and v
        "activations": act,
        "logits": logits,
    }
    for term, value in expected.items():
        assert getattr(est, term) == pytest.approx(value, rel=1e-3), term
    assert est.gathered == 0


def test_sharding_divides_the_right_terms():
    cfg = tiny_llama()
    one = memory.estimate(cfg, memory.Setup(method="full", num_gpus=4, weights_dtype="bfloat16"))
    z2 = memory.estimate(cfg, memory.Setup(method="full", num_gpus=4, zero_stage=2, weights_dtype="bfloat16"))
    z3 = memory.estimate(cfg, memory.Setup(method="full", num_gpus=4, zero_stage=3, weights_dtype="bfloat16"))
    off = memory.estimate(cfg, memory.Setup(method="full", num_gpus=4, zero_stage=3, weights_dtype="bfloat16",
                                            offload_optimizer=True, offload_params=True))  # fmt: skip
    assert one.weights == z2.weights == 4 * z3.weights
    assert z2.gradients == z3.gradients == one.gradients / 4
    assert z2.optimizer == z3.optimizer == one.trainable * 12 / 4  # DeepSpeed: fp32 master + m + v
    assert one.optimizer == one.trainable * 4  # torch AdamW, bf16 states
    assert off.optimizer == off.weights == 0 and off.notes
    assert z3.activations == one.activations  # ZeRO does not shard activations
    fsdp = memory.estimate(cfg, memory.Setup(method="full", num_gpus=4, fsdp="full_shard", weights_dtype="bfloat16",
                                             mixed_precision=True))  # fmt: skip
    # accelerate upcasts FSDP's sharded parameters to fp32: 4 + 4 + 8 bytes per parameter, sharded 4 ways
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (one.params, one.params, 2 * one.params)


def test_launch_setup_reads_deepspeed_fsdp_and_accelerate_env(tmp_path):
    from types import SimpleNamespace

    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    args = SimpleNamespace(world_size=8, deepspeed=str(ds), fsdp=None)
    assert memory.launch_setup(args, env={}) == {"num_gpus": 8, "zero_stage": 3, "offload_optimizer": True,
                                                 "offload_params": False}  # fmt: skip
    plain = SimpleNamespace(world_size=1, deepspeed=None, fsdp=None)
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    assert memory.launch_setup(plain, env=env)["zero_stage"] == 2
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    assert memory.launch_setup(plain, env=env)["fsdp"] == "shard_grad_op"
    assert memory.launch_setup(SimpleNamespace(world_size=2, deepspeed=None, fsdp="full_shard auto_wrap"), env={}) == {
        "num_gpus": 2, "fsdp": "full_shard"}  # fmt: skip
    assert memory.launch_setup(plain, env={}) == {"num_gpus": 1}
    # transformers 5: `--fsdp shard_grad_op` arrives as fsdp=True with the strategy in fsdp_config
    grad_op = SimpleNamespace(world_size=2, deepspeed=None, fsdp=True, fsdp_config={"reshard_after_forward": False})
    assert memory.launch_setup(grad_op, env={})["fsdp"] == "shard_grad_op"
    cut = tmp_path / "cut.json"
    cut.write_text('{"zero_optimization": {"sta')  # unreadable: no estimate of ZeRO, and no traceback
    assert memory.launch_setup(SimpleNamespace(world_size=1, deepspeed=str(cut), fsdp=None), env={}) == {"num_gpus": 1}


def test_dry_run_estimate_from_recipe_args(tiny_model_dir, capsys):
    from trl import ModelConfig, SFTConfig

    targs = SFTConfig(output_dir="/tmp/unused", bf16=False, max_length=128, per_device_train_batch_size=4)
    margs = ModelConfig(model_name_or_path=tiny_model_dir, use_peft=True, lora_r=4, lora_target_modules=ALL_LINEAR)
    est = memory.print_estimate(targs, margs)
    out = capsys.readouterr().out
    assert est is not None and est.setup.method == "lora" and est.setup.micro_batch == 4
    assert f"parameters {est.params:,}" in out and "GiB per GPU" in out
    margs.model_name_or_path = "/no/such/model"
    assert memory.print_estimate(targs, margs) is None  # a dry run never fails on the estimate
    assert "Memory estimate skipped" in capsys.readouterr().out
