#!/bin/bash
# pop_nemo at 7B on a Slurm cluster: one heterogeneous job, inside the NGC-based container
# (containers/Dockerfile, imported with enroot; launched through pyxis).
#   het group 0: `pop-nemo serve-critic` replicas, one per $CRITIC_TP GPU(s) of $CRITIC_GPUS: the frozen
#                Qwen2.5-7B-Instruct as rubric writer and judge (conf/critic_7b.yaml, engine
#                $CRITIC_ENGINE: TensorRT-LLM by default), replica k on port $CRITIC_PORT + k
#   het group 1: `pop-nemo train` with srun on $TRAINER_NODES node(s), one rank per GPU: Megatron
#                policy (TP=2, data parallel over the rest), rollouts on TensorRT-LLM refit every
#                step, critic.url -> every replica (the client spreads the judge calls over them)
# Submit from the repository root:  sbatch slurm/pop_7b.sh  (the #SBATCH sizes below: 1 critic GPU,
# 1 trainer node of 8 GPUs), or for other sizes, run it and it submits itself sized from the
# variables:  TRAINER_NODES=4 CRITIC_GPUS=4 bash slurm/pop_7b.sh   (layouts: docs/CLUSTER.md)
# Requeue: `--signal=B:USR1@900` asks the trainer 15 minutes before the time limit to checkpoint
# after its current step (keep that above one step plus a checkpoint); the script then requeues
# the job, and the rerun resumes from the checkpoint. `scontrol requeue` (or a node failure with
# --requeue) resumes from the last periodic checkpoint (trainer.save_every).
#SBATCH --job-name=pop-7b
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@900
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=16 --mem=0
#SBATCH hetjob
#SBATCH --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 --mem=0 --exclusive
set -euo pipefail

# ---------------------------------------------------------------- variables
POP_ROOT=${POP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}            # checkout visible on every node
CONTAINER_IMAGE=${CONTAINER_IMAGE:-$POP_ROOT/pop-nemo.sqsh} # `enroot import` output (docs/CLUSTER.md)
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$POP_ROOT:$POP_ROOT,${HF_HOME:-$HOME/.cache/huggingface}:/root/.cache/huggingface}
POP_NEMO=${POP_NEMO:-pop-nemo}                              # inside the container
CONFIG=${CONFIG:-conf/pop_7b.yaml}                          # trainer: model, data, Megatron, schedule
CRITIC_CONFIG=${CRITIC_CONFIG:-conf/critic_7b.yaml}
CRITIC_ENGINE=${CRITIC_ENGINE:-trtllm}                      # serve.engine of the critic (hf | trtllm)
OUTPUT_DIR=${OUTPUT_DIR:-runs/pop-7b}                       # on a shared filesystem: checkpoints live here
CRITIC_PORT=${CRITIC_PORT:-8765}                            # replica k listens on CRITIC_PORT + k
CRITIC_GPUS=${CRITIC_GPUS:-1}                               # GPUs of het group 0 (one node)
CRITIC_TP=${CRITIC_TP:-1}                                   # GPUs per critic replica (TRT-LLM TP)
CRITIC_CPUS=${CRITIC_CPUS:-16}                              # CPUs per critic replica
TRAINER_NODES=${TRAINER_NODES:-1}                           # nodes of het group 1
GPUS_PER_NODE=${GPUS_PER_NODE:-8}                           # trainer ranks per node
CRITIC_WAIT_S=${CRITIC_WAIT_S:-1800}                        # first start builds the TRT-LLM engine
TP=${TP:-2}                                                 # Megatron tensor parallel (DP = ranks / TP)
ROLLOUT_BACKEND=${ROLLOUT_BACKEND:-trtllm}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}                        # e.g. "trainer.max_steps=200 rollout.n=16"
NUM_THREADS=${NUM_THREADS:-8}
CRITIC_OVERRIDES=${CRITIC_OVERRIDES:-}                      # extra overrides of serve-critic, e.g. "model.path=..."
# ----------------------------------------------------------------------------

cd "$POP_ROOT"
# shellcheck source=slurm/lib.sh
source "$POP_ROOT/slurm/lib.sh"
if ((CRITIC_GPUS < 1 || CRITIC_TP < 1 || CRITIC_GPUS % CRITIC_TP != 0)); then
  pop_log "CRITIC_GPUS=$CRITIC_GPUS must be a positive multiple of CRITIC_TP=$CRITIC_TP"
  exit 2
fi
CRITIC_REPLICAS=$((CRITIC_GPUS / CRITIC_TP))
pop_submit_sized "${POP_SCRIPT:-slurm/pop_7b.sh}" "$TRAINER_NODES" "$GPUS_PER_NODE" "$CRITIC_GPUS" \
  "$CRITIC_REPLICAS" "$CRITIC_CPUS"
pop_setup
read -r -a CRITIC_ARGS <<<"$CRITIC_OVERRIDES"
trap pop_on_usr1 USR1
mkdir -p "$OUTPUT_DIR/logs"
pop_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: image $CONTAINER_IMAGE"

# The critic listens beyond loopback, so it requires a bearer token; one per job, shared
# with the trainer through the environment (srun exports it to both groups).
if [ -z "${POP_NEMO_CRITIC_TOKEN:-}" ]; then
  POP_NEMO_CRITIC_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
fi
export POP_NEMO_CRITIC_TOKEN
CRITIC_ADDR=$(pop_group_addr 0)
CRITIC_URL=$(pop_critic_urls "$CRITIC_ADDR" "$CRITIC_PORT" "$CRITIC_REPLICAS") # comma-separated
MASTER_ADDR=$(pop_group_addr 1) # torch.distributed rendezvous of the trainer ranks
export MASTER_ADDR MASTER_PORT
pop_log "critic: $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | paste -sd,) at $CRITIC_URL;" \
  "trainer: $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | paste -sd,) (master $MASTER_ADDR:$MASTER_PORT)"

# One task per replica, each bound to its own $CRITIC_TP GPU(s) (--gpus-per-task); task k serves
# on CRITIC_PORT + k (SLURM_LOCALID), its lines prefixed with the task number (--label).
export POP_CRITIC_PORT0=$CRITIC_PORT
# shellcheck disable=SC2016  # $POP_CRITIC_PORT0 and $SLURM_LOCALID expand in each task, not here
srun --het-group=0 --ntasks="$CRITIC_REPLICAS" --gpus-per-task="$CRITIC_TP" --cpus-per-task="$CRITIC_CPUS" \
  --label "${POP_SRUN_CONTAINER[@]}" \
  bash -c 'exec "$@" "serve.port=$((POP_CRITIC_PORT0 + SLURM_LOCALID))"' pop-critic \
  "${POP_CMD[@]}" serve-critic --config "$CRITIC_CONFIG" --host 0.0.0.0 \
  "serve.engine=$CRITIC_ENGINE" "serve.num_threads=$NUM_THREADS" "rollout.trtllm.tensor_parallel_size=$CRITIC_TP" \
  "${CRITIC_ARGS[@]}" >>"$OUTPUT_DIR/logs/critic-$SLURM_JOB_ID.log" 2>&1 &
CRITIC_PID=$!
IFS=, read -r -a CRITIC_URLS <<<"$CRITIC_URL"
for url in "${CRITIC_URLS[@]}"; do
  pop_wait_healthy "$url/healthz" "$CRITIC_PID" "$CRITIC_WAIT_S" || {
    pop_stop_step "$CRITIC_PID"
    exit 1
  }
done

# One task per GPU; pop_nemo.launch maps SLURM_PROCID/NTASKS/LOCALID to torch.distributed.
srun --het-group=1 "${POP_SRUN_CONTAINER[@]}" --kill-on-bad-exit=1 \
  "${POP_CMD[@]}" train --config "$CONFIG" --output-dir "$OUTPUT_DIR" \
  "critic.url=$CRITIC_URL" "policy.backend=megatron" "megatron.tensor_model_parallel_size=$TP" \
  "rollout.backend=$ROLLOUT_BACKEND" "trainer.num_threads=$NUM_THREADS" "logging.progress=false" \
  "${POP_TRAIN_ARGS[@]}" &
POP_TRAINER_PID=$!
set +e
pop_wait_step "$POP_TRAINER_PID"
set -e
pop_finish "$POP_RC" "$CRITIC_PID"
