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
#
# Time limits and preemption: SLURM sends SIGUSR1 to every process of the job 10 minutes before the time limit
# (--signal). The training processes finish the current step, save a complete checkpoint and exit 75; this script
# then requeues the job (--requeue, `scontrol requeue`), and the requeued job resumes from that checkpoint. The
# launchers ignore SIGUSR1 (`trap '' USR1`), so only the training processes act on it. SIGTERM (scancel, or
# preemption with PreemptMode=REQUEUE, where SLURM requeues by itself) also ends training with a checkpoint; allow
# a step and a save within the cluster's GraceTime/KillWait, and within the 30 s after which torchrun SIGKILLs the
# workers it forwarded SIGTERM to. Raise the 600 s for slow saves (7B full: minutes). A SIGUSR1 that arrives
# before training begins is ignored (inherited from the launcher).
#SBATCH --job-name=cai-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=cai-sft-%j.log
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
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
# The recipe writes this file when it stopped on a signal after saving a checkpoint (recipes/run_dir.py).
CAI_PREEMPTED_FILE=${CAI_PREEMPTED_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.cai-sft-${SLURM_JOB_ID:-local}.preempted}
rm -f "$CAI_PREEMPTED_FILE"
export CONFIG_FILE RECIPE NNODES GPUS_PER_NODE MAIN_PROCESS_IP MAIN_PORT PY CAI_PREEMPTED_FILE

echo "SFT on $NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous $MAIN_PROCESS_IP:$MAIN_PORT, $CONFIG_FILE, $RECIPE $*"
# Single quotes: SLURM_NODEID is expanded by each task on its own node (it is that node's machine rank).
status=0
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  trap "" USR1
  exec "$PY" -m accelerate.commands.launch \
    --config_file "$CONFIG_FILE" \
    --num_machines "$NNODES" \
    --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "$MAIN_PORT" \
    recipes/sft.py --config "$RECIPE"'"$OVERRIDES" || status=$?

if [[ -f "$CAI_PREEMPTED_FILE" ]]; then
  echo "Stopped on a signal with a complete checkpoint: $(cat "$CAI_PREEMPTED_FILE")"
  rm -f "$CAI_PREEMPTED_FILE"
  echo "Requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1))); it resumes from that checkpoint."
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
