#!/bin/bash
# pop_nemo at 32B: slurm/pop_7b.sh with 32B sizes (read that script for what each group does).
#   het group 0: 4 critic GPUs, 2 serve-critic replicas of Qwen2.5-32B-Instruct at TensorRT-LLM TP=2
#                (64 GB of bf16 weights do not leave room for a KV cache on one 80 GB GPU)
#   het group 1: 2 trainer nodes x 8 GPUs, Megatron TP=8 (one node per model copy), DP=2
# Submit from the repository root:  sbatch slurm/pop_32b.sh  (the sizes below), or other sizes:
#   TRAINER_NODES=4 CRITIC_GPUS=8 bash slurm/pop_32b.sh     (layouts and memory: docs/CLUSTER.md)
# Never submitted: no GPU cluster here; shellcheck-clean only (docs/CLUSTER.md, support table).
#SBATCH --job-name=pop-32b
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@1800
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --nodes=1 --ntasks-per-node=2 --gpus-per-node=4 --cpus-per-task=16 --mem=0
#SBATCH hetjob
#SBATCH --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 --mem=0 --exclusive
set -euo pipefail

POP_ROOT=${POP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
MODEL=${MODEL:-Qwen/Qwen2.5-32B-Instruct}
export POP_ROOT POP_SCRIPT=slurm/pop_32b.sh
export TRAINER_NODES=${TRAINER_NODES:-2} CRITIC_GPUS=${CRITIC_GPUS:-4} CRITIC_TP=${CRITIC_TP:-2} TP=${TP:-8}
export OUTPUT_DIR=${OUTPUT_DIR:-runs/pop-32b} CRITIC_WAIT_S=${CRITIC_WAIT_S:-3600}
export CRITIC_OVERRIDES=${CRITIC_OVERRIDES:-model.path=$MODEL}
# The 7B config with the 32B model: docs/MEMORY.md says what to change if the update does not fit.
export TRAIN_OVERRIDES="model.path=$MODEL megatron.use_distributed_optimizer=true ${TRAIN_OVERRIDES:-}"
exec bash "$POP_ROOT/slurm/pop_7b.sh"
