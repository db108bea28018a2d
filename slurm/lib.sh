# Shared by slurm/pop_7b.sh and slurm/pop_smoke.sh (sourced from the batch script, never run).
# The heterogeneous-job plumbing: where group 0 (the critic) runs, waiting for it, container
# flags for pyxis, and the USR1 -> checkpoint -> requeue handshake with the trainer.
# shellcheck shell=bash disable=SC2034  # (variables set here are read by the sourcing script)

POP_EXIT_REQUEUE=75 # pop_nemo.signals.EXIT_REQUEUE: the trainer checkpointed and stopped on request

pop_log() { printf '[%s pop-slurm] %s\n' "$(date +%H:%M:%S)" "$*"; }

# Address of the first node of a het group (NodeAddr: what the other group can connect to).
pop_group_addr() {
  local nodelist node addr
  nodelist=$(eval "echo \${SLURM_JOB_NODELIST_HET_GROUP_$1:-}")
  [ -n "$nodelist" ] || { pop_log "SLURM_JOB_NODELIST_HET_GROUP_$1 is unset: submit this script as a heterogeneous job"; return 1; }
  node=$(scontrol show hostnames "$nodelist" | head -n 1)
  addr=$(scontrol show node "$node" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  echo "${addr:-$node}"
}

# Words of $POP_NEMO (e.g. "python -m pop_nemo.cli") and $TRAIN_OVERRIDES as arrays, and the
# pyxis/enroot flags for srun when CONTAINER_IMAGE is set (an enroot .sqsh file or a registry image).
pop_setup() {
  read -r -a POP_CMD <<<"$POP_NEMO"
  read -r -a POP_TRAIN_ARGS <<<"${TRAIN_OVERRIDES:-}"
  POP_SRUN_CONTAINER=()
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    POP_SRUN_CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-workdir="$POP_ROOT" --no-container-mount-home)
    [ -n "${CONTAINER_MOUNTS:-}" ] && POP_SRUN_CONTAINER+=(--container-mounts="$CONTAINER_MOUNTS")
  fi
  return 0
}

# GET url; 0 when it answers 200. curl where the host has it, else Python.
pop_http_ok() {
  local url=$1
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null -m 5 -H "Authorization: Bearer ${POP_NEMO_CRITIC_TOKEN:-}" "$url" 2>/dev/null
  else
    python3 - "$url" <<'PY' 2>/dev/null
import os, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ.get("POP_NEMO_CRITIC_TOKEN", "")})
sys.exit(0 if urllib.request.urlopen(req, timeout=5).status == 200 else 1)
PY
  fi
}

# Wait (bounded) until the critic's /healthz answers 200; fail early if its step died.
pop_wait_healthy() {
  local url=$1 pid=$2 timeout_s=$3 waited=0
  pop_log "waiting for $url (at most ${timeout_s} s)"
  until pop_http_ok "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      pop_log "the critic step exited before it was healthy"
      return 1
    fi
    if [ "$waited" -ge "$timeout_s" ]; then
      pop_log "the critic was not healthy after ${timeout_s} s"
      return 1
    fi
    sleep 2
    waited=$((waited + 2))
  done
  pop_log "critic healthy after ~${waited} s"
}

# USR1 (Slurm's --signal=B:USR1@N before the time limit, or `scancel --batch --signal=USR1`):
# forward to the trainer step, which checkpoints after its current step and exits 75.
POP_REQUEUE=0
pop_on_usr1() {
  POP_REQUEUE=1
  pop_log "USR1: asking the trainer to checkpoint and stop"
  if [ -n "${POP_TRAINER_PID:-}" ]; then kill -USR1 "$POP_TRAINER_PID" 2>/dev/null || true; fi
}

# Wait for a background step; survives the USR1 trap interrupting `wait`. Sets POP_RC.
pop_wait_step() {
  local pid=$1
  while :; do
    wait "$pid"
    declare -g POP_RC=$?
    kill -0 "$pid" 2>/dev/null || break
  done
}

pop_stop_step() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# After the trainer: requeue when it stopped on request (or USR1 killed it), else pass its code on.
pop_finish() {
  local rc=$1 critic_pid=$2
  pop_stop_step "$critic_pid"
  if [ "$POP_REQUEUE" = 1 ] || [ "$rc" = "$POP_EXIT_REQUEUE" ]; then
    pop_log "trainer stopped (exit $rc); requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  pop_log "trainer finished (exit $rc)"
  exit "$rc"
}

# Outside a job (`bash slurm/pop_7b.sh`): submit this script with both het components sized from
# the variables, since #SBATCH lines cannot read them. Command-line options override the script's
# #SBATCH ones. Args: script, trainer nodes, GPUs per trainer node, critic GPUs, critic replicas
# (tasks), CPUs per critic replica.
pop_submit_sized() {
  local script=$1 nodes=$2 gpus=$3 critic_gpus=$4 critic_tasks=$5 critic_cpus=$6
  [ -z "${SLURM_JOB_ID:-}" ] || return 0
  pop_log "submitting $script: critic group 1 node x $critic_gpus GPU(s), $critic_tasks replica(s);" \
    "trainer group $nodes node(s) x $gpus GPUs"
  exec sbatch --nodes=1 --ntasks-per-node="$critic_tasks" --gpus-per-node="$critic_gpus" \
    --cpus-per-task="$critic_cpus" --mem=0 : \
    --nodes="$nodes" --ntasks-per-node="$gpus" --gpus-per-node="$gpus" --cpus-per-task=12 --mem=0 --exclusive \
    "$script"
}

# "http://ADDR:PORT,http://ADDR:PORT+1,..." for n critic replicas on one node (critic.url takes the list).
pop_critic_urls() {
  local addr=$1 port=$2 n=$3 k urls=""
  for ((k = 0; k < n; k++)); do urls+="${urls:+,}http://$addr:$((port + k))"; done
  echo "$urls"
}
