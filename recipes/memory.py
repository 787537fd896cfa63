"""Parameter counts and an estimate of peak GPU memory per GPU, from the model config alone (no weights).

Printed by `recipes/sft.py --dry_run` for the configured launch; for other launches:

    python tools/memory_estimate.py --config recipes/mistral-7b/sft_full.yaml --num_gpus 8 --zero_stage 3
    python tools/memory_estimate.py --config recipes/mistral-7b/sft_qlora.yaml --max_length 4096 --per_device_train_batch_size 2

The formula (docs/BENCHMARKS.md has it with the numbers): per GPU, in bytes,

    weights     P_frozen x b_w (+ quantized: 4.5 bits, 4.127 with nested quant) + T x b_t      / N under ZeRO-3/FSDP
    gradients   T x b_t                                                                          / N under ZeRO>=2/FSDP
    optimizer   T x (2 x b_t) for torch AdamW (states in the parameter's dtype), T x 2 for 8-bit AdamW,
                DeepSpeed: T x (8 + 4 if b_t == 2: fp32 master copy)                             / N under ZeRO>=1/FSDP
                (0 on the GPU with optimizer offload)
    activations tokens x [L x per_layer + head]       without activation checkpointing
                tokens x [L x h x b_a + per_layer + head]   with it (layer inputs kept, one layer recomputed)
    logits      TRL's fused LM head: one [min(tokens, 4096) x min(V, 32768)] tile + its fp32 copy + fp32 grad of
                the hidden states; never the full [tokens x V] logits
    gathered    ZeRO-3/FSDP: two decoder layers' weights un-sharded at a time (current + prefetched)

with P parameters (T trainable), L layers, hidden h, tokens = micro-batch x max_length (padded or packed, the upper
bound), b_w / b_t / b_a the bytes of the weights, trainable parameters and activations, and per_layer the bytes
that HF's Llama-family decoder layer saves for backward per token (measured with saved_tensors_hooks, see
tests/test_memory.py):

    per_layer = 2 x (4h + 2 b_a h + 4)            two RMSNorms: fp32 input copy, normalized and scaled outputs
              + b_a x (2 q_dim + 2 kv_dim) + 4 n_heads     q and k after RoPE, v, attention output, fp32 logsumexp
              + b_a x 4 I                              gate, up, act(gate), act(gate) x up
              + LoRA, per adapted Linear: 5 in_features + 4 r with dropout (fp32 dropout output + mask),
                4 r without (4 in_features + 4 r when the base runs in 16 bits: the input is cast to fp32)
              + eager attention only: n_heads x seq x (4 + b_a)   the attention probabilities (fp32 and cast)

Not counted: the CUDA context and cuBLAS/NCCL workspaces (nvidia-smi shows ~0.5-1 GiB more than
torch.cuda.max_memory_allocated), allocator fragmentation, DeepSpeed communication buckets, and the evaluation
forward. GPU peaks are not measured in this repository's CI; CPU RSS comparisons are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
LOGPROB_TOKEN_CHUNK, LOGPROB_VOCAB_CHUNK = 4096, 32768  # trl.kernels.chunked_logprob tile


@dataclass
class Setup:
    """What the estimate depends on besides the model config."""

    method: str = "full"  # full | lora | qlora
    seq_len: int = 1024
    micro_batch: int = 1
    num_gpus: int = 1
    zero_stage: int | None = None  # None: no DeepSpeed; 0-3: DeepSpeed ZeRO stage
    fsdp: str | None = None  # None | full_shard | shard_grad_op
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    weights_dtype: str = "bfloat16"
    mixed_precision: bool = False  # bf16/fp16 autocast (TrainingArguments bf16 / fp16)
    optim: str = "adamw_torch"
    attn_implementation: str = "sdpa"
    lora_r: int = 16
    lora_target_modules: list[str] | str | None = None
    lora_dropout: float = 0.05
    lora_modules_to_save: list[str] | None = None
    use_dora: bool = False
    nested_quant: bool = False
    device: str = "cuda"  # cuda | cpu: CPU dropout masks take the input's dtype, CUDA's are bool


@dataclass
class Estimate:
    params: int
    trainable: int
    setup: Setup
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    gathered: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.gathered

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "setup"}
        return {**d, "total": self.total, "setup": asdict(self.setup)}


# --------------------------------------------------------------------------------------------- parameters


def meta_model(config):
    """The model built on the meta device: shapes and names, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(config) -> int:
    """Exact parameter count (tied weights once)."""
    return sum(p.numel() for p in meta_model(config).parameters())


def _output_embedding_names(model) -> set[str]:
    out = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if m is out}


def lora_targets(model, target_modules, model_type: str | None = None) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every Linear that peft's LoRA would adapt."""
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if target_modules is None:
        target_modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
        if target_modules is None:
            raise ValueError(f"no default LoRA target modules for model type {model_type!r}; set lora_target_modules")
    skip = _output_embedding_names(model)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if target_modules == "all-linear" or target_modules == ["all-linear"]:
            hit = name not in skip
        elif isinstance(target_modules, str):  # a regex, matched on the full name as peft does
            import re

            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            out.append((name, module.in_features, module.out_features))
    if not out:
        raise ValueError(f"lora_target_modules {target_modules} match no Linear layer of this model")
    return out


def trainable_parameters(model, setup: Setup, model_type: str | None = None) -> int:
    """Trainable parameters: all for a full fine-tune; LoRA A and B (+ DoRA magnitudes, + modules_to_save)."""
    if setup.method == "full":
        return sum(p.numel() for p in model.parameters())
    targets = lora_targets(model, setup.lora_target_modules, model_type)
    n = sum(setup.lora_r * (i + o) + (o if setup.use_dora else 0) for _, i, o in targets)
    for name in setup.lora_modules_to_save or []:
        n += sum(p.numel() for mn, m in model.named_modules() if mn.split(".")[-1] == name for p in m.parameters())
    return n


def quantized_parameters(model) -> int:
    """Parameters bitsandbytes stores in 4 bits: every Linear weight except the output embedding."""
    import torch

    skip = _output_embedding_names(model)
    return sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skip
    )


# --------------------------------------------------------------------------------------------- activations


def _dims(config) -> dict:
    c = config.get_text_config()
    h, nh = c.hidden_size, c.num_attention_heads
    hd = getattr(c, "head_dim", None) or h // nh
    nkv = getattr(c, "num_key_value_heads", None) or nh
    return {"h": h, "L": c.num_hidden_layers, "nh": nh, "qd": nh * hd, "kvd": nkv * hd, "I": c.intermediate_size,
            "V": c.vocab_size}  # fmt: skip


def layer_activation_bytes(config, setup: Setup, lora_modules=(), act_bytes: int = 2) -> float:
    """Bytes one decoder layer saves for backward, per token (the per_layer formula in the module docstring).

    `lora_modules`: (name, in_features) of the adapted Linears of one layer. With LoRA the base weights are frozen,
    so the inputs saved only for their weight gradients (norm outputs, down_proj input) are not kept.
    """
    d, a, frozen = _dims(config), act_bytes, setup.method != "full"
    h, qd, kvd, nh, inter = d["h"], d["qd"], d["kvd"], d["nh"], d["I"]
    b = 2 * (4 * h + 4) if frozen else 2 * (4 * h + 2 * a * h + 4)  # two RMSNorms
    eager = setup.attn_implementation == "eager"
    if eager:  # q, k and v repeated to every head, output (not with frozen o_proj), fp32 probabilities (+ cast)
        b += (3 if frozen else 4) * a * qd + nh * setup.seq_len * (4 + (a if a == 2 else 0))
    else:  # sdpa / flash: q, k, v, output and the fp32 logsumexp
        b += a * (2 * qd + 2 * kvd) + 4 * nh
    b += (3 if frozen else 4) * a * inter  # SwiGLU MLP
    if not lora_modules:
        return b
    ad = adapter_bytes(setup)
    autocast = setup.mixed_precision and ad != a
    dropout = setup.lora_dropout > 0
    for name, fan_in in lora_modules:
        x = ad if not autocast else 4  # peft casts the input to the adapter's dtype
        mask = (1 if setup.device == "cuda" else x) if dropout else 0  # CUDA dropout masks are bool
        if autocast:  # lora_A keeps autocast's 16-bit copy of its (dropped-out) input
            b += mask * fan_in + a * fan_in
        elif dropout or x != a:  # its own copy: the dropout output or the cast
            b += mask * fan_in + x * fan_in
    if not dropout and not autocast and ad == a:  # adapters read the base input itself, shared by q/k/v, gate/up
        groups = {_input_group(name): fan_in for name, fan_in in lora_modules}
        b += sum(a * fan_in for g, fan_in in groups.items() if eager or g != "o_proj")
    return b + (a if autocast else ad) * setup.lora_r * len(lora_modules)  # lora_A outputs


def adapter_bytes(setup: Setup) -> int:
    """peft keeps LoRA weights in fp32; TRL casts them to bf16 on a quantized (QLoRA) base."""
    return 2 if setup.method == "qlora" else 4


def _input_group(name: str) -> str:
    short = name.split(".")[-1]
    return {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}.get(
        short, short
    )


def activation_bytes(config, setup: Setup, lora_modules=(), act_bytes: int = 2) -> float:
    d, a = _dims(config), act_bytes
    tokens = setup.micro_batch * setup.seq_len
    per_layer = layer_activation_bytes(config, setup, lora_modules, a)
    # final norm + the hidden states TRL's fused LM head keeps
    head = (4 * d["h"] + 4 if setup.method != "full" else 4 * d["h"] + 2 * a * d["h"] + 4) + a * d["h"]
    if setup.activation_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        return tokens * (d["L"] * d["h"] * a + per_layer + head)
    return tokens * (d["L"] * per_layer + head)


# --------------------------------------------------------------------------------------------- estimate


def estimate(config, setup: Setup, model=None) -> Estimate:
    """Peak memory per GPU for `setup` (see the module docstring for the formula)."""
    model = model if model is not None else meta_model(config)
    model_type = getattr(config, "model_type", None)
    P = sum(p.numel() for p in model.parameters())
    T = trainable_parameters(model, setup, model_type)
    s, N = setup, max(1, setup.num_gpus)
    b_w = DTYPE_BYTES[s.weights_dtype]
    autocast = s.mixed_precision
    fsdp_fp32 = False
    if s.zero_stage is not None and s.mixed_precision:
        b_w, autocast = 2, False  # DeepSpeed bf16/fp16 casts the model itself; the fp32 copy is in the optimizer
    elif s.fsdp and s.mixed_precision:
        # accelerate upcasts the sharded parameters to fp32; FSDP's mixed-precision policy gathers them in 16 bits
        fsdp_fp32, autocast = s.method == "full", False
        b_w = 2
    act_bytes = 2 if (b_w == 2 or autocast) else 4
    b_t = {"full": 4 if fsdp_fp32 else b_w, "lora": 4, "qlora": 2}[s.method]  # peft: fp32 adapters (bf16: QLoRA)
    est = Estimate(params=P, trainable=T, setup=s)

    shard_weights = s.zero_stage == 3 or s.fsdp == "full_shard"
    shard_grads = (s.zero_stage or 0) >= 2 or s.fsdp in ("full_shard", "shard_grad_op")
    shard_optim = (s.zero_stage or 0) >= 1 or s.fsdp in ("full_shard", "shard_grad_op")

    # weights
    if s.method == "qlora":
        Q = quantized_parameters(model)
        bits = 4.127 if s.nested_quant else 4.5  # nf4 + fp32 absmax per 64 (+ 8-bit absmax per 256 blocks nested)
        frozen = Q * bits / 8 + (P - Q) * b_w
    elif s.method == "lora":
        frozen = P * b_w
    else:
        frozen = 0.0
    weights = frozen + T * b_t
    if shard_weights:
        weights /= N
    if s.offload_params and shard_weights:
        weights = 0.0
        est.notes.append("weights offloaded to CPU RAM")
    est.weights = weights

    # gradients (trainable parameters, in their own dtype)
    est.gradients = T * b_t / (N if shard_grads else 1)

    # optimizer
    if "8bit" in s.optim:
        per = 2.0  # bitsandbytes 8-bit m and v
    elif s.zero_stage is not None:
        per = 8.0 + (4.0 if b_t == 2 else 0.0)  # DeepSpeed: fp32 m, v (+ fp32 master copy of 16-bit weights)
    elif "adafactor" in s.optim:
        per = 0.1  # factored second moment; negligible next to the rest
    elif s.optim.startswith("sgd"):
        per = 0.0
    else:
        per = 2.0 * b_t  # torch AdamW: m, v in the parameter's dtype
    est.optimizer = T * per / (N if shard_optim else 1)
    if s.offload_optimizer:
        est.notes.append(f"optimizer states ({T * per / GiB:.1f} GiB) offloaded to CPU RAM")
        est.optimizer = 0.0

    # activations and logits
    lora_modules = ()
    if s.method != "full":
        first_layer = _first_layer_prefix(model)
        targets = lora_targets(model, s.lora_target_modules, model_type)
        lora_modules = [(n, i) for n, i, _ in targets if first_layer in n]
    est.activations = activation_bytes(config, Setup(**{**asdict(s), "mixed_precision": autocast}), lora_modules,
                                       act_bytes)
    if autocast:  # autocast keeps a 16-bit copy of every fp32 weight a matmul used, for backward
        base = P if b_w == 4 and s.method != "qlora" else 0
        fp32_weights = base + (T if s.method == "lora" else 0)
        est.activations += 2 * fp32_weights
        if b_w == 4:
            est.notes.append("fp32 weights under bf16/fp16 autocast: the per-layer activation formula is the 16-bit "
                             "one and reads low (autocast also keeps fp32 residuals); load the weights in bfloat16")
    d = _dims(config)
    tokens = s.micro_batch * s.seq_len
    tile = min(tokens, LOGPROB_TOKEN_CHUNK) * min(d["V"], LOGPROB_VOCAB_CHUNK)
    est.logits = tile * (act_bytes + 4) + tokens * d["h"] * 4

    # un-sharded working set of ZeRO-3 / FSDP: the current and the prefetched decoder layer
    if shard_weights and N > 1:
        layer_params = (P - _non_layer_params(model)) / d["L"]
        est.gathered = 2 * layer_params * (0.5625 if s.method == "qlora" else b_w)
    return est


def _first_layer_prefix(model) -> str:
    for name, _ in model.named_modules():
        if name.endswith(".layers.0") or name.endswith(".h.0"):
            return name + "."
    return ".0."


def _non_layer_params(model) -> int:
    import torch

    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.get_text_config().num_hidden_layers:
            inside = {id(p) for p in module.parameters()}
            return sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return 0


# --------------------------------------------------------------------------------------------- from the recipe


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes", "cpu", "nvme")


def launch_setup(training_args, env=None) -> dict:
    """Number of GPUs, ZeRO stage / FSDP and offload of the current launch (accelerate's env or TrainingArguments)."""
    env = os.environ if env is None else env
    out = {"num_gpus": max(1, int(getattr(training_args, "world_size", 1) or 1))}
    ds = training_args.deepspeed or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if isinstance(ds, str) and os.path.isfile(ds):
        try:
            with open(ds, encoding="utf-8") as f:
                ds = json.load(f)
        except (OSError, ValueError):  # an unreadable DeepSpeed config is reported by DeepSpeed itself
            ds = None
    if isinstance(ds, dict):
        z = ds.get("zero_optimization", {})
        out["zero_stage"] = int(z.get("stage", 0))
        out["offload_optimizer"] = _truthy(z.get("offload_optimizer", {}).get("device", "none"))
        out["offload_params"] = _truthy(z.get("offload_param", {}).get("device", "none"))
    elif _truthy(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
        out["zero_stage"] = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
        out["offload_optimizer"] = _truthy(env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"))
        out["offload_params"] = _truthy(env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"))
    fsdp = training_args.fsdp
    if fsdp is True:  # transformers >= 5 turns `--fsdp full_shard` into True + fsdp_config
        reshard = (getattr(training_args, "fsdp_config", None) or {}).get("reshard_after_forward", True)
        fsdp = "full_shard" if _truthy(reshard) else "shard_grad_op"
    fsdp = " ".join(str(getattr(x, "value", x)) for x in fsdp) if isinstance(fsdp, list) else (fsdp or "")
    if "shard_grad_op" in fsdp:
        out["fsdp"] = "shard_grad_op"
    elif "full_shard" in fsdp or "hybrid_shard" in fsdp:
        out["fsdp"] = "full_shard"
    elif _truthy(env.get("ACCELERATE_USE_FSDP", "false")):
        strategy = env.get("FSDP_SHARDING_STRATEGY", "")
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
        grad_op = strategy.upper() in ("2", "SHARD_GRAD_OP") or (not strategy and not _truthy(reshard))
        out["fsdp"] = "shard_grad_op" if grad_op else "full_shard"
    if out.get("fsdp") and ("offload" in fsdp or _truthy(env.get("FSDP_OFFLOAD_PARAMS", "false"))):
        out["offload_params"] = out["offload_optimizer"] = True
    return out


def setup_from_args(training_args, model_args, config=None, **overrides) -> Setup:
    method = "qlora" if model_args.load_in_4bit else "lora" if model_args.use_peft else "full"
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else None
    if dtype is None and config is not None:
        dtype = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    dtype = dtype or "float32"
    ckpt = getattr(training_args, "activation_checkpointing", None)
    if ckpt is None:
        ckpt = training_args.gradient_checkpointing
    kw = dict(
        method=method,
        seq_len=training_args.max_length or 1024,
        micro_batch=training_args.per_device_train_batch_size,
        activation_checkpointing=bool(ckpt),
        weights_dtype=dtype,
        mixed_precision=bool(training_args.bf16 or training_args.fp16),
        optim=str(getattr(training_args.optim, "value", training_args.optim)),
        attn_implementation=model_args.attn_implementation or "sdpa",
        lora_r=model_args.lora_r,
        lora_target_modules=model_args.lora_target_modules,
        lora_dropout=model_args.lora_dropout,
        lora_modules_to_save=model_args.lora_modules_to_save,
        use_dora=model_args.use_dora,
        nested_quant=model_args.use_bnb_nested_quant,
        **launch_setup(training_args),
    )
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return Setup(**kw)


def describe(est: Estimate) -> str:
    s = est.setup
    where = f"{s.num_gpus} GPU" + ("s" if s.num_gpus > 1 else "")
    if s.zero_stage is not None:
        where += f", DeepSpeed ZeRO-{s.zero_stage}"
    if s.fsdp:
        where += f", FSDP {s.fsdp}"
    if s.offload_optimizer or s.offload_params:
        where += ", offload " + "+".join(x for x, on in (("optimizer", s.offload_optimizer),
                                                          ("params", s.offload_params)) if on)  # fmt: skip
    lines = [
        f"Memory estimate ({s.method}, {where}, micro-batch {s.micro_batch} x {s.seq_len} tokens, "
        f"activation checkpointing {'on' if s.activation_checkpointing else 'off'}, weights {s.weights_dtype}, "
        f"autocast {'on' if s.mixed_precision else 'off'}):",
        f"  parameters {est.params:,}; trainable {est.trainable:,} ({100 * est.trainable / est.params:.2f}%)",
    ]
    for name in ("weights", "gradients", "optimizer", "activations", "logits", "gathered"):
        v = getattr(est, name)
        if v:
            lines.append(f"  {name:<12} {v / GiB:8.2f} GiB")
    lines.append(f"  {'total':<12} {est.total / GiB:8.2f} GiB per GPU (peak, +~0.5-1 GiB CUDA context not counted)")
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


def load_config(name_or_path: str, revision=None, trust_remote_code=False):
    """AutoConfig of a model folder or hub id, or a transformers config class's defaults ("MistralConfig")."""
    import transformers

    if name_or_path.endswith("Config") and hasattr(transformers, name_or_path):
        return getattr(transformers, name_or_path)()
    return transformers.AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def print_estimate(training_args, model_args, config=None, **overrides) -> Estimate | None:
    """Print the estimate for the configured launch and, for contrast, with activation checkpointing toggled."""
    try:
        if config is None:
            config = load_config(model_args.model_name_or_path, model_args.model_revision,
                                 getattr(training_args, "trust_remote_code", False))  # fmt: skip
        setup = setup_from_args(training_args, model_args, config, **overrides)
        model = meta_model(config)
        est = estimate(config, setup, model)
        other = estimate(config, Setup(**{**asdict(setup), "activation_checkpointing": not setup.activation_checkpointing}), model)
    except Exception as e:  # noqa: BLE001 - an estimate must never stop a dry run
        print(f"\nMemory estimate skipped: {type(e).__name__}: {e}")
        return None
    print("\n" + describe(est))
    print(f"  (activation checkpointing {'on' if other.setup.activation_checkpointing else 'off'}: "
          f"{other.total / GiB:.2f} GiB; other launches: python tools/memory_estimate.py --config <yaml> --num_gpus 8 "
          f"--zero_stage 3)")  # fmt: skip
    return est
