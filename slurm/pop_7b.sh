#!/bin/bash
# pop_nemo at 7B on a Slurm cluster: one heterogeneous job, inside the NGC-based container
# (containers/Dockerfile, imported with enroot; launched through pyxis).
#   het group 0: `pop-nemo serve-critic` on 1 GPU: the frozen Qwen2.5-7B-Instruct as rubric writer
#                and judge (conf/critic_7b.yaml, engine $CRITIC_ENGINE: TensorRT-LLM by default)
#   het group 1: `pop-nemo train` with srun, one rank per GPU: Megatron policy (TP=2, data
#                parallel over the rest), rollouts on TensorRT-LLM refit every step, critic.url ->
#                group 0 (address discovered from Slurm, waited on through /healthz)
# Submit from the repository root after editing the variables:  sbatch slurm/pop_7b.sh
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
CRITIC_PORT=${CRITIC_PORT:-8765}
CRITIC_WAIT_S=${CRITIC_WAIT_S:-1800}                        # first start builds the TRT-LLM engine
TP=${TP:-2}                                                 # Megatron tensor parallel (DP = ranks / TP)
ROLLOUT_BACKEND=${ROLLOUT_BACKEND:-trtllm}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}                        # e.g. "trainer.max_steps=200 rollout.n=16"
NUM_THREADS=${NUM_THREADS:-8}
# ----------------------------------------------------------------------------

cd "$POP_ROOT"
# shellcheck source=slurm/lib.sh
source "$POP_ROOT/slurm/lib.sh"
pop_setup
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
CRITIC_URL="http://$CRITIC_ADDR:$CRITIC_PORT"
MASTER_ADDR=$(pop_group_addr 1) # torch.distributed rendezvous of the trainer ranks
export MASTER_ADDR MASTER_PORT
pop_log "critic: $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | paste -sd,) at $CRITIC_URL;" \
  "trainer: $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | paste -sd,) (master $MASTER_ADDR:$MASTER_PORT)"

srun --het-group=0 --ntasks=1 "${POP_SRUN_CONTAINER[@]}" \
  "${POP_CMD[@]}" serve-critic --config "$CRITIC_CONFIG" --host 0.0.0.0 --port "$CRITIC_PORT" \
  "serve.engine=$CRITIC_ENGINE" "serve.num_threads=$NUM_THREADS" \
  >>"$OUTPUT_DIR/logs/critic-$SLURM_JOB_ID.log" 2>&1 &
CRITIC_PID=$!
pop_wait_healthy "$CRITIC_URL/healthz" "$CRITIC_PID" "$CRITIC_WAIT_S" || {
  pop_stop_step "$CRITIC_PID"
  exit 1
}

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
