"""Every accelerate / DeepSpeed config in the repo, launched for real: 2 CPU processes talking over gloo.

Each strategy test runs `accelerate launch --config_file accelerate_configs/<file> --num_processes 2
recipes/sft.py` with the repo's files unchanged, on a tiny random Llama (2 layers) for 3 optimizer steps.
The CPU overrides are on the command line:
  --mixed_precision no       bf16 autocast is a GPU setting
  --main_process_port 0      a free port
  --use_cpu true (recipe)    DDP on gloo; accelerate's own `--cpu` would pick its single-process launcher
  --ddp_backend gloo         DeepSpeed; without a backend accelerate counts 1 process while DeepSpeed
                             counts 2, and DeepSpeed's batch-size check fails
Each test proves that the run was distributed the intended way (world size, distributed type, DeepSpeed
stage/offload, all read back from the run's training_args.bin), that the saved model or adapter is
complete (every LoRA target x layer; ZeRO-3 tensors at full shape), that training changed the weights,
that a reload is deterministic, and that the saved weights and the reloaded model's logits equal those of
the SAME recipe run in ONE process (single_gpu.yaml): global_batch_size 4 is 2 per device x 2 processes
there and 2 per device x 2 accumulation steps here, so the optimizer sees the same batches.

The first DeepSpeed run JIT-compiles DeepSpeed's CPU ops into ~/.cache/torch_extensions (shm comm, and
cpu_adam for the offload config): a few minutes once, then cached.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, RECIPES, ROOT, build_model_dir, toy_cai_rows, write_jsonl

CONFIGS = ROOT / "accelerate_configs"
LAUNCH = [PYTHON, "-m", "accelerate.commands.launch"]  # = `accelerate launch` of this venv
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 4
CPU_DDP = ["--use_cpu", "true"]
CPU_DEEPSPEED = ["--ddp_backend", "gloo"]
SAME = 1e-4  # max |difference| between two strategies' weights / logits (float noise is ~1e-6)
MOVED = 5e-3  # min max|change| of trained weights (3 Adam steps at lr 1e-2 move each weight ~1e-2)
NO_FSDP_ON_CPU = (
    "FSDP cannot run on CPU through accelerate 1.15: AcceleratorState switches to DistributedType.FSDP only "
    "from a multi-accelerator type (MULTI_GPU/XPU/NPU/...; accelerate/state.py), and a CPU run is MULTI_CPU, "
    "so the FSDP plugin is silently dropped and the run is plain DDP (checked: training_args.bin says "
    "MULTI_CPU). torch's fully_shard itself works on CPU/gloo; the gate is accelerate's. Needs 2 GPUs."
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {
        "root": root,
        "model": build_model_dir(root / "base", "seed"),
        "data": write_jsonl(root / "cai.jsonl", toy_cai_rows(32)),
    }


def recipe(work, name, **overrides):
    """A recipe YAML for 3 steps of global batch 4 on the tiny model; returns its path."""
    cfg = {
        "model_name_or_path": work["model"],
        "dataset_name": work["data"],
        "chat_template_path": str(RECIPES / "templates" / "cai_seed.jinja"),
        "eos_token": "</s>",
        "eval_fraction": 0.0,
        "max_length": 128,
        "learning_rate": 1e-2,
        "max_steps": 3,
        "global_batch_size": 4,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "activation_checkpointing": False,
        "seed": 0,
        "num_sample_prompts": 0,
        "dataloader_num_workers": 0,
        "dtype": "float32",
    }
    if overrides.pop("lora", False):
        cfg.update(use_peft=True, lora_r=LORA_R, lora_alpha=8, lora_dropout=0.0, lora_target_modules=TARGETS)
    cfg.update(overrides)
    path = Path(work["root"]) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config_file, recipe_path, out, *recipe_cli, processes=2, launcher_cli=(), wait=True, log=None):
    """`accelerate launch --config_file accelerate_configs/<file> ... recipes/sft.py --config <recipe>`."""
    cmd = [
        *LAUNCH, "--config_file", str(CONFIGS / config_file), "--num_processes", str(processes),
        "--mixed_precision", "no", *launcher_cli,
        str(RECIPES / "sft.py"), "--config", str(recipe_path), "--output_dir", str(out), *recipe_cli,
    ]  # fmt: skip
    log = Path(log or f"{out}.log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return finish(proc, out) if wait else proc


def finish(proc, out, timeout=900):
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"launch failed ({rc}):\n" + proc.log.read_text()[-8000:]
    return Path(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_info(out):
    """What the run really was, from the TrainingArguments the Trainer pickled next to the weights."""
    import torch

    args = torch.load(Path(out) / "training_args.bin", weights_only=False)  # written by this test's own run
    return args.world_size, args.distributed_state.distributed_type.name, args.deepspeed_plugin, args


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def max_diff(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def expected_lora_keys(work):
    """adapter key -> (shape) for every LoRA target module of every layer of the base model."""
    out = {}
    for key, w in tensors(Path(work["model"]) / "model.safetensors").items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out[f"base_model.model.{module}.lora_A.weight"] = (LORA_R, w.shape[1])
            out[f"base_model.model.{module}.lora_B.weight"] = (w.shape[0], LORA_R)
    assert len(out) == 2 * len(TARGETS) * 2  # 7 targets x 2 layers x (A, B)
    return out


def assert_complete_adapter(work, out):
    saved = tensors(Path(out) / "adapter_model.safetensors")
    expected = expected_lora_keys(work)
    assert set(saved) == set(expected), f"missing {sorted(set(expected) - set(saved))[:5]}"
    for key, shape in expected.items():
        assert tuple(saved[key].shape) == shape, (key, saved[key].shape)
    untrained = [k for k, v in saved.items() if "lora_B" in k and v.abs().max() < MOVED / 5]
    assert not untrained, f"adapters that did not train (lora_B still ~0): {untrained}"
    assert json.loads((Path(out) / "adapter_config.json").read_text())["base_model_name_or_path"] == work["model"]
    return saved


def assert_complete_model(work, out):
    saved = tensors(Path(out) / "model.safetensors")
    initial = tensors(Path(work["model"]) / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    assert max_diff(saved, initial) > MOVED, "the saved weights are the initial ones: training did not happen"
    return saved


def reload_logits(work, out, lora):
    """Logits of the saved model, loaded twice from disk; the two loads must agree exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 2]])

    def load():
        if lora:
            from peft import PeftModel

            return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work["model"]), str(out))
        return AutoModelForCausalLM.from_pretrained(out)

    with torch.no_grad():
        first, second = (load().eval()(input_ids=ids).logits for _ in range(2))
    assert torch.equal(first, second)
    return first


def assert_same_as_reference(work, out, reference, lora):
    import torch

    name = "adapter_model.safetensors" if lora else "model.safetensors"
    diff = max_diff(tensors(Path(out) / name), tensors(Path(reference) / name))
    assert diff < SAME, f"weights differ from the 1-process run by {diff:.2e}"
    torch.testing.assert_close(
        reload_logits(work, out, lora), reload_logits(work, reference, lora), atol=SAME, rtol=0
    )


def assert_deepspeed(plugin, stage, offload):
    assert plugin is not None and plugin.zero_stage == stage
    config = plugin.hf_ds_config.config
    assert "auto" not in json.dumps(config), "a DeepSpeed 'auto' value was left unfilled"
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (4, 2)
    assert config["gradient_accumulation_steps"] == 1
    zero = config["zero_optimization"]
    assert zero.get("offload_optimizer", {}).get("device", "none") == offload
    assert zero.get("offload_param", {}).get("device", "none") == (offload if stage == 3 else "none")
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


# --------------------------------------------------------------------------------- 1-process references


@pytest.fixture(scope="module")
def ref_lora(work):
    return launch("single_gpu.yaml", recipe(work, "lora", lora=True), work["root"] / "ref_lora", processes=1)


@pytest.fixture(scope="module")
def ref_full(work):
    return launch("single_gpu.yaml", recipe(work, "full"), work["root"] / "ref_full", processes=1)


def test_single_gpu_lora_reference(work, ref_lora):
    world, kind, plugin, args = run_info(ref_lora)
    assert (world, kind, plugin, args.gradient_accumulation_steps) == (1, "NO", None, 2)
    assert_complete_adapter(work, ref_lora)
    reload_logits(work, ref_lora, lora=True)


def test_single_gpu_full_reference(work, ref_full):
    world, kind, _, args = run_info(ref_full)
    assert (world, kind, args.gradient_accumulation_steps) == (1, "NO", 2)
    assert_complete_model(work, ref_full)


# --------------------------------------------------------------------------------- 2 processes


def test_ddp_lora(work, ref_lora, tmp_path):
    out = launch("multi_gpu.yaml", recipe(work, "lora", lora=True), tmp_path / "ddp", *CPU_DDP)
    world, kind, _, args = run_info(out)
    assert (world, kind, args.gradient_accumulation_steps) == (2, "MULTI_CPU", 1)
    assert_complete_adapter(work, out)
    assert_same_as_reference(work, out, ref_lora, lora=True)


def test_deepspeed_zero2_lora(work, ref_lora, tmp_path):
    out = launch("deepspeed_zero2.yaml", recipe(work, "lora", lora=True), tmp_path / "zero2", *CPU_DEEPSPEED)
    world, kind, plugin, _ = run_info(out)
    assert (world, kind) == (2, "DEEPSPEED")
    assert_deepspeed(plugin, stage=2, offload="none")
    assert_complete_adapter(work, out)
    assert_same_as_reference(work, out, ref_lora, lora=True)


def test_deepspeed_zero3_lora(work, ref_lora, tmp_path):
    out = launch("deepspeed_zero3.yaml", recipe(work, "lora", lora=True), tmp_path / "zero3", *CPU_DEEPSPEED)
    world, kind, plugin, _ = run_info(out)
    assert (world, kind) == (2, "DEEPSPEED")
    assert_deepspeed(plugin, stage=3, offload="none")
    assert_complete_adapter(work, out)  # gathered from the shards, not the [0]-shaped local pieces
    assert_same_as_reference(work, out, ref_lora, lora=True)


def test_deepspeed_zero3_full(work, ref_full, tmp_path):
    out = launch("deepspeed_zero3.yaml", recipe(work, "full"), tmp_path / "zero3_full", *CPU_DEEPSPEED)
    assert_complete_model(work, out)  # full shapes, not ZeRO-3's empty [0] placeholders
    assert_same_as_reference(work, out, ref_full, lora=False)
    world, kind, plugin, _ = run_info(out)
    assert (world, kind) == (2, "DEEPSPEED")
    assert_deepspeed(plugin, stage=3, offload="none")


def test_deepspeed_zero3_offload_full(work, ref_full, tmp_path):
    out = launch("deepspeed_zero3_offload.yaml", recipe(work, "full"), tmp_path / "zero3_off", *CPU_DEEPSPEED)
    world, kind, plugin, _ = run_info(out)
    assert (world, kind) == (2, "DEEPSPEED")
    assert_deepspeed(plugin, stage=3, offload="cpu")
    assert plugin.hf_ds_config.config["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam, lr etc. filled
    assert_complete_model(work, out)
    assert_same_as_reference(work, out, ref_full, lora=False)


def _workers(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the processes that `accelerate launch` (pid launcher_pid) started."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == launcher_pid:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
                found[int(env[b"RANK"])] = int(entry)
        except (OSError, ValueError, IndexError, KeyError):
            continue
    return found


def test_stop_signal_on_one_of_two_processes(work, tmp_path):
    """SIGTERM to rank 1 alone: both ranks finish the same step, one complete checkpoint is saved, and the relaunch
    (2 processes again) resumes from it and ends where an uninterrupted 2-process run ends."""
    import run_dir
    from safetensors.torch import load_file

    path = recipe(work, "preempt", lora=True, max_steps=8, save_strategy="steps", save_steps=2)
    reference = launch("multi_gpu.yaml", path, tmp_path / "reference", *CPU_DDP)
    out = tmp_path / "preempted"
    proc = launch("multi_gpu.yaml", path, out, *CPU_DDP, wait=False)
    try:
        while proc.poll() is None and not (out / "checkpoint-2").exists():  # most of the run still ahead
            time.sleep(0.01)
        workers = _workers(proc.pid)
        os.kill(workers[1], signal.SIGTERM)
    finally:
        proc.wait(timeout=600)
    log = proc.log.read_text()
    assert proc.returncode != 0, log[-4000:]  # the launcher reports the workers' status 75 as a failure
    record = json.loads((out / run_dir.PREEMPTED).read_text())
    step = record["step"]
    assert record["complete"] and step < 8, (record, log[-4000:])
    # rank 0 was not signalled: it stopped because the ranks agreed
    assert f"Received a stop signal on another process: step {step} finished on every process" in log, log[-4000:]
    assert f"Exit status {run_dir.PREEMPTED_EXIT} (preempted, resumable)" in log
    assert not run_dir.is_complete(out)
    saved = {p.name: p.stat().st_mtime_ns for p in (out / f"checkpoint-{step}").iterdir()}

    launch("multi_gpu.yaml", path, out, *CPU_DDP, log=tmp_path / "relaunch.log")
    relaunch = (tmp_path / "relaunch.log").read_text()
    assert f"Resuming from {out / f'checkpoint-{step}'}" in relaunch, relaunch[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / f"checkpoint-{step}").iterdir()} == saved
    assert run_dir.is_complete(out)
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(reference / "adapter_model.safetensors"))
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= 1e-6, f"resumed 2-process run differs from the uninterrupted one by {diff:.2e}"
    losses = [{h["step"]: h["loss"] for h in json.loads((d / "trainer_state.json").read_text())["log_history"]
               if "loss" in h} for d in (out, reference)]
    assert sorted(losses[0]) == list(range(1, 9))
    assert max(abs(losses[0][s] - losses[1][s]) for s in losses[1]) <= 1e-6


def test_two_nodes_on_one_machine(work, ref_lora, tmp_path):
    """multi_node.yaml as two machines: two launchers, 1 process each, meeting at 127.0.0.1:<port>."""
    port, out, path = free_port(), tmp_path / "two_nodes", recipe(work, "lora", lora=True)
    nodes = [
        launch(
            "multi_node.yaml", path, out, *CPU_DDP, wait=False, log=tmp_path / f"node{rank}.log",
            launcher_cli=["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                          "--main_process_port", str(port)],
        )
        for rank in (0, 1)
    ]  # fmt: skip
    for node in nodes:
        finish(node, out)
    world, kind, _, args = run_info(out)
    assert (world, kind, args.gradient_accumulation_steps) == (2, "MULTI_CPU", 1)
    assert_complete_adapter(work, out)
    assert_same_as_reference(work, out, ref_lora, lora=True)


def test_qlora_4bit_single_process(work, ref_lora, tmp_path):
    """QLoRA (bitsandbytes nf4 + double quant, CPU backend) trains and saves a complete adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qlora = recipe(work, "qlora", lora=True, load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    out = launch("single_gpu.yaml", qlora, tmp_path / "qlora", processes=1)
    assert_complete_adapter(work, out)
    # The forward ran through 4-bit weights: with lora_B = 0 the first loss is the base model's loss, which
    # 4-bit rounding changes (an ignored load_in_4bit would reproduce the fp32 reference exactly).
    first = [json.loads((Path(d) / "trainer_state.json").read_text())["log_history"][0]["loss"] for d in (out, ref_lora)]
    assert abs(first[0] - first[1]) > 1e-5, first

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float32"
    )
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(work["model"], quantization_config=bnb).eval()
        plain = base(input_ids=ids).logits
        tuned = [
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(work["model"], quantization_config=bnb), str(out)
            ).eval()(input_ids=ids).logits
            for _ in range(2)
        ]
    assert torch.equal(tuned[0], tuned[1])
    assert (tuned[0] - plain).abs().max() > 1e-3  # the adapter changes the 4-bit model's output


# --------------------------------------------------------------------------------- FSDP2


def probe_script(tmp_path) -> Path:
    """A launched script that reports, per rank, the FSDP plugin accelerate builds from the config file."""
    script = tmp_path / "fsdp_probe.py"
    script.write_text(
        "import json, os, sys\n"
        "from accelerate.utils import FullyShardedDataParallelPlugin\n"
        "p = FullyShardedDataParallelPlugin()\n"
        "rank = int(os.environ['RANK'])\n"
        "info = dict(rank=rank, world_size=int(os.environ['WORLD_SIZE']), use_fsdp=os.environ.get('ACCELERATE_USE_FSDP'),\n"
        "            fsdp_version=p.fsdp_version, cpu_ram_efficient_loading=p.cpu_ram_efficient_loading,\n"
        "            state_dict_type=p.state_dict_type.name, reshard_after_forward=p.reshard_after_forward,\n"
        "            auto_wrap_policy=getattr(p.auto_wrap_policy, '__name__', str(p.auto_wrap_policy)))\n"
        "json.dump(info, open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w'))\n"
    )
    return script


@pytest.mark.parametrize("config_file", ["fsdp2.yaml", "fsdp2_qlora.yaml"])
def test_fsdp2_config_reaches_accelerate(config_file, tmp_path):
    """Both FSDP2 files launch 2 processes and give accelerate the FSDP2 plugin the docs promise."""
    cmd = [*LAUNCH, "--config_file", str(CONFIGS / config_file), "--num_processes", "2", "--main_process_port", "0"]
    proc = subprocess.run(
        [*cmd, str(probe_script(tmp_path)), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert info == {
            "rank": r, "world_size": 2, "use_fsdp": "true", "fsdp_version": 2, "cpu_ram_efficient_loading": True,
            "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
            "auto_wrap_policy": "transformer_auto_wrap_policy",
        }  # fmt: skip


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.skipif(_cuda_devices() < 2, reason=NO_FSDP_ON_CPU)
@pytest.mark.parametrize("config_file,quantized", [("fsdp2.yaml", False), ("fsdp2_qlora.yaml", True)])
def test_fsdp2_training_on_two_gpus(work, config_file, quantized, tmp_path):
    extra = {}
    if quantized:  # FSDP needs the packed 4-bit weights stored in the compute dtype
        extra = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage="float32")
    out = launch(config_file, recipe(work, f"fsdp_{quantized}", lora=True, **extra), tmp_path / "fsdp")
    world, kind, _, _ = run_info(out)
    assert (world, kind) == (2, "FSDP")
    assert_complete_adapter(work, out)
    reload_logits(work, out, lora=True)


# --------------------------------------------------------------------------------- launch scripts


def fake_slurm(tmp_path, python_body: str) -> dict:
    """PATH with fake srun/scontrol and PY a fake python running `python_body` on each node; returns the env."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\n"\n'
        '[ "$1" = requeue ] && echo "$*" > "$RECORD/scontrol"\nexit 0\n'
    )
    # srun: run the task once per node with that node's SLURM_NODEID, as SLURM does with --ntasks-per-node=1.
    (fake / "srun").write_text(
        '#!/usr/bin/env bash\necho "$*" > "$RECORD/srun"\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit 1; done\n'
    )
    (fake / "fake_python").write_text("#!/usr/bin/env bash\n" + python_body)
    for f in fake.iterdir():
        f.chmod(0o755)
    return {
        **os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "RECORD": str(tmp_path), "PY": str(fake / "fake_python"),
        "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "991",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }  # fmt: skip


def test_slurm_script_rendezvous_on_first_node(tmp_path):
    """scripts/slurm_sft.sh with fake srun/scontrol: one launcher per node, all meeting at the first node."""
    script = ROOT / "scripts" / "slurm_sft.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # The python that would run `accelerate launch`: records its arguments, one file per node.
    env = fake_slurm(tmp_path, 'printf "%s\\n" "$@" > "$RECORD/node$SLURM_NODEID"\n')
    proc = subprocess.run(
        ["bash", str(script), "accelerate_configs/deepspeed_zero3.yaml", "recipes/mistral-7b/sft_full.yaml",
         "--learning_rate", "1e-5", "--run_name", "two words"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--nodes=2 --ntasks-per-node=1" in (tmp_path / "srun").read_text()
    for rank in (0, 1):
        argv = (tmp_path / f"node{rank}").read_text().splitlines()
        assert argv[:2] == ["-m", "accelerate.commands.launch"]
        assert dict(zip(argv[2:14:2], argv[3:14:2])) == {
            "--config_file": "accelerate_configs/deepspeed_zero3.yaml", "--num_machines": "2",
            "--num_processes": "8", "--machine_rank": str(rank), "--main_process_ip": "gpu-a",
            "--main_process_port": "29500",
        }  # fmt: skip
        assert argv[14:] == ["recipes/sft.py", "--config", "recipes/mistral-7b/sft_full.yaml",
                             "--learning_rate", "1e-5", "--run_name", "two words"]  # fmt: skip


def test_make_train_7b_dry_run(tmp_path):
    """`make train-7b DRY_RUN=1`: the QLoRA 7B recipe, offline, on Mistral-7B's config and a stand-in tokenizer."""
    standin, out = tmp_path / "standin", tmp_path / "dry"
    proc = subprocess.run(
        ["make", "-s", "train-7b", "DRY_RUN=1", f"PY={PYTHON}", f"STANDIN_7B={standin}", f"ARGS=--output_dir {out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    config = json.loads((standin / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("mistral", 4096, 32)
    assert not any(standin.glob("*.safetensors"))  # no weights exist, so none can have been loaded
    rows = [json.loads(line) for line in (out / "preview.jsonl").read_text().splitlines()]
    assert len(rows) > 100
    for row in rows:  # trained tokens: the revision and the closing </s> (id 2 in Mistral's vocabulary)
        assert row["input_ids"][-1] == 2 and row["labels"][-1] == 2
        assert row["labels"][0] == -100
    assert "no weights were loaded" in proc.stdout



@pytest.mark.parametrize("stopped", [True, False])
def test_slurm_script_signal_and_requeue(tmp_path, stopped):
    """The launchers ignore SIGUSR1 (SLURM sends it to every process of the step; the training processes install
    their own handler when training begins: test_stop_signal_on_one_of_two_processes); when the recipe stopped on
    it (it wrote $CAI_PREEMPTED_FILE), the script requeues the job and exits 0; otherwise it keeps the status."""
    script = ROOT / "scripts" / "slurm_sft.sh"
    headers = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--signal=USR1@600" in headers and "--requeue" in headers and "--open-mode=append" in headers
    # The fake launcher: records whether it ignores SIGUSR1 (bit 10 of SigIgn), then stops as the recipe does.
    stop = 'echo "{\\"step\\": 6}" > "$CAI_PREEMPTED_FILE"; exit 1' if stopped else "exit 3"
    env = fake_slurm(tmp_path, 'grep SigIgn /proc/$$/status > "$RECORD/sigign$SLURM_NODEID"\n' + stop + "\n")
    proc = subprocess.run(["bash", str(script), "accelerate_configs/multi_gpu.yaml", "recipes/mistral-7b/sft_lora.yaml"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    ignored = int((tmp_path / "sigign0").read_text().split()[1], 16)
    assert ignored & (1 << (signal.SIGUSR1 - 1)), "the launcher must ignore SIGUSR1"
    if stopped:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (tmp_path / "scontrol").read_text().split() == ["requeue", "991"]
        assert "Requeueing job 991" in proc.stdout and not (tmp_path / ".cai-sft-991.preempted").exists()
    else:
        assert proc.returncode == 1 and not (tmp_path / "scontrol").exists(), proc.stdout + proc.stderr

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
