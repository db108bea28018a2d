#!/bin/bash
# pop_nemo smoke job: the layout of slurm/pop_7b.sh on CPUs, with the bundled SmolLM2-135M.
#   het group 0: `pop-nemo serve-critic` (rubric writer + judge, conf/critic_cpu.yaml)
#   het group 1: `pop-nemo train` (conf/smoke_cpu.yaml), critic.url pointing at group 0
# Submit from the repository root:  sbatch slurm/pop_smoke.sh
# Every variable below can be overridden from the environment (sbatch exports it).
# Requeue: `scontrol requeue <job>` or USR1 (time limit) restarts the job; the trainer resumes
# from its last checkpoint because it runs the same command with the same --output-dir.
#SBATCH --job-name=pop-smoke
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --time=01:00:00
#SBATCH --ntasks=1 --cpus-per-task=1
#SBATCH hetjob
#SBATCH --ntasks=1 --cpus-per-task=1
set -euo pipefail

# ---------------------------------------------------------------- variables
POP_ROOT=${POP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}     # the pop_nemo checkout (same path on every node)
POP_NEMO=${POP_NEMO:-pop-nemo}                       # e.g. "$POP_ROOT/.venv/bin/pop-nemo"
CONFIG=${CONFIG:-conf/smoke_cpu.yaml}                # trainer config
CRITIC_CONFIG=${CRITIC_CONFIG:-conf/critic_cpu.yaml} # critic config (its serve: section)
OUTPUT_DIR=${OUTPUT_DIR:-runs/slurm-smoke}           # run folder: resume reads its checkpoints
CRITIC_PORT=${CRITIC_PORT:-8765}
CRITIC_WAIT_S=${CRITIC_WAIT_S:-600}                  # bound on waiting for the critic's /healthz
NUM_THREADS=${NUM_THREADS:-1}                        # torch CPU threads per process
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}                 # extra dotted overrides, e.g. "trainer.max_steps=4"
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}                 # empty: run on the host; else a pyxis image
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$POP_ROOT:$POP_ROOT}
# ----------------------------------------------------------------------------

cd "$POP_ROOT"
# shellcheck source=slurm/lib.sh
source "$POP_ROOT/slurm/lib.sh"
pop_setup
trap pop_on_usr1 USR1
mkdir -p "$OUTPUT_DIR/logs"
RESTART=${SLURM_RESTART_COUNT:-0}
pop_log "job $SLURM_JOB_ID restart $RESTART: critic on group 0, trainer on group 1"

# One bearer token per job, shared by the critic and the trainer through the environment.
if [ -z "${POP_NEMO_CRITIC_TOKEN:-}" ]; then
  POP_NEMO_CRITIC_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
fi
export POP_NEMO_CRITIC_TOKEN
CRITIC_ADDR=$(pop_group_addr 0)
CRITIC_URL="http://$CRITIC_ADDR:$CRITIC_PORT"
pop_log "critic: $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | paste -sd,) at $CRITIC_URL;" \
  "trainer: $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | paste -sd,)"

srun --het-group=0 --ntasks=1 "${POP_SRUN_CONTAINER[@]}" \
  "${POP_CMD[@]}" serve-critic --config "$CRITIC_CONFIG" --host "$CRITIC_ADDR" --port "$CRITIC_PORT" \
  "serve.num_threads=$NUM_THREADS" >>"$OUTPUT_DIR/logs/critic-$SLURM_JOB_ID.log" 2>&1 &
CRITIC_PID=$!
pop_wait_healthy "$CRITIC_URL/healthz" "$CRITIC_PID" "$CRITIC_WAIT_S" || {
  pop_stop_step "$CRITIC_PID"
  exit 1
}

srun --het-group=1 --ntasks=1 "${POP_SRUN_CONTAINER[@]}" \
  "${POP_CMD[@]}" train --config "$CONFIG" --output-dir "$OUTPUT_DIR" \
  "critic.url=$CRITIC_URL" "trainer.num_threads=$NUM_THREADS" "logging.progress=false" "${POP_TRAIN_ARGS[@]}" &
POP_TRAINER_PID=$!
set +e
pop_wait_step "$POP_TRAINER_PID"
set -e
pop_finish "$POP_RC" "$CRITIC_PID"
