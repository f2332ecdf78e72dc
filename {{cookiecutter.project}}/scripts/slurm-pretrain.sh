#!/usr/bin/env bash
# Multi-node data-parallel pre-training under Slurm: one torchrun launcher per node, all nodes meeting at a c10d
# rendezvous on the job's first node. Submit from the project root:
#
#   sbatch scripts/slurm-pretrain.sh                              # configs/pretrain.yaml, 2 nodes x 8 GPUs
#   sbatch --nodes=4 scripts/slurm-pretrain.sh --train.max_steps 20000
#
# Everything after the script name is passed to the pretrain entry point. The run resumes from its latest
# checkpoint (--train.resume auto), so a requeued or resubmitted job continues where it stopped; runs/ must be on
# a file system that every node sees.
#
#SBATCH --job-name=pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

PACKAGE="{{ cookiecutter.package }}"
CONFIG="${CONFIG:-configs/pretrain.yaml}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
RDZV_PORT="${RDZV_PORT:-29500}"
# srun does not inherit --cpus-per-task from sbatch since Slurm 22.05 (sbatch(1), --cpus-per-task): without passing it
# on, each torchrun launcher is bound to one CPU and its ranks and DataLoader workers share that core.
CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:?is unset: keep '#SBATCH --cpus-per-task' (srun needs it passed on)}"
# sed reads the whole list: `head -n 1` would exit early and, under pipefail, scontrol's SIGPIPE would end the job.
HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"

if [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi

# One thread per rank for CPU-side ops; NCCL picks the network itself (set NCCL_SOCKET_IFNAME if it picks wrong).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, rendezvous at $HEAD_NODE:$RDZV_PORT"
srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS_PER_TASK" torchrun \
  --nnodes="$SLURM_NNODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" \
  -m "$PACKAGE.pretrain" --config "$CONFIG" --train.resume auto "$@"
