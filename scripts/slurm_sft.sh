#!/usr/bin/env bash
# Multi-node CAI SFT on SLURM: one task per node; each task runs `accelerate launch` for its node's GPUs,
# and all of them meet at the first node of the allocation (docs/SCALING.md).
#
#   sbatch --nodes=2 scripts/slurm_sft.sh accelerate_configs/deepspeed_zero3.yaml recipes/mistral-7b/sft_full.yaml
#   sbatch --nodes=4 scripts/slurm_sft.sh accelerate_configs/multi_gpu.yaml recipes/mistral-7b/sft_lora.yaml \
#       --learning_rate 1e-4                     # anything after the recipe is a recipe override
#
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8), MAIN_PORT (29500), PY (.venv/bin/python).
# The recipe's global_batch_size keeps the optimizer batch fixed whatever the node count.
#SBATCH --job-name=cai-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=cai-sft-%j.log
set -euo pipefail

usage="usage: sbatch [--nodes=N] scripts/slurm_sft.sh <accelerate config> <recipe yaml> [recipe overrides...]"
CONFIG_FILE=${1:?$usage}
RECIPE=${2:?$usage}
shift 2

NNODES=${SLURM_NNODES:?run under sbatch/salloc: SLURM_NNODES is not set}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# The first node of the allocation hosts the rendezvous (sed, not head: head exits early and the SIGPIPE
# it sends scontrol fails the job under pipefail).
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PORT=${MAIN_PORT:-29500}
PY=${PY:-.venv/bin/python}
OVERRIDES=""
if (($#)); then OVERRIDES=$(printf ' %q' "$@"); fi  # shell-quoted, so arguments with spaces survive `bash -c`
export CONFIG_FILE RECIPE NNODES GPUS_PER_NODE MAIN_PROCESS_IP MAIN_PORT PY

echo "SFT on $NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous $MAIN_PROCESS_IP:$MAIN_PORT, $CONFIG_FILE, $RECIPE $*"
# Single quotes: SLURM_NODEID is expanded by each task on its own node (it is that node's machine rank).
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  exec "$PY" -m accelerate.commands.launch \
    --config_file "$CONFIG_FILE" \
    --num_machines "$NNODES" \
    --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "$MAIN_PORT" \
    recipes/sft.py --config "$RECIPE"'"$OVERRIDES"
