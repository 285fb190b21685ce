# Shared by the examples/*.slurm batch scripts: sourced, not run. Submit from the repository root (Slurm starts
# the script in the submission directory) or set CAOPD_ROOT. README, "Running on Slurm".
#
# Knobs (environment variables, all optional):
#   CAOPD_ENV_SETUP   a file sourced first, e.g. one that runs `module load ...` and activates a virtualenv
#   CAOPD             the command (default: caopd; e.g. "python -m caopd_megatron.cli.main")
#   CONTAINER_IMAGE   run every step in this container via pyxis (srun --container-image ...)
#   CONTAINER_MOUNTS  pyxis mounts (e.g. /data:/data,/runs:/runs)
#   CAOPD_MODE        run (one process per task, the whole loop) | phases (rollout / rewrite / distill steps)
#
# Exit codes of caopd (runtime/exit_codes.py): 0 done, 2 user error, 3 a phase found the run complete,
# 75 stopped by a signal or the time budget after saving a checkpoint. On 75 the job requeues itself when it
# was submitted with --requeue (if the requeue is refused it exits 75), else it exits 75 and a resubmission
# continues.

if [ -n "${CAOPD_ENV_SETUP:-}" ]; then
    # shellcheck disable=SC1090
    source "$CAOPD_ENV_SETUP"
fi
CAOPD=${CAOPD:-caopd}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}   # CPUs of the allocation, not a guess
export CUDA_DEVICE_MAX_CONNECTIONS=1               # megatron-core: keep TP communication ordered with compute
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1           # a failed collective ends the job instead of hanging it
CONTAINER_FLAGS=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
    CONTAINER_FLAGS=(--container-image="$CONTAINER_IMAGE" --container-workdir="$PWD")
    [ -n "${CONTAINER_MOUNTS:-}" ] && CONTAINER_FLAGS+=(--container-mounts="$CONTAINER_MOUNTS")
fi
# Rendezvous: caopd finds the head node from SLURM_STEP_NODELIST and derives the port from the job and step
# ids (set MASTER_ADDR / MASTER_PORT to override); both are logged.

CAOPD_STOP_REQUESTED=0   # set by the USR1 trap (Slurm's --signal=B:USR1@<seconds> warning)
CAOPD_STEP_PID=
CAOPD_FORWARD_USR1=1     # run mode: pass the warning on to caopd, which saves at the next step boundary

caopd_on_usr1() {
    echo "caopd launcher: USR1 (time limit or preemption warning) at $(date +%T)"
    CAOPD_STOP_REQUESTED=1
    if [ "$CAOPD_FORWARD_USR1" = 1 ] && [ -n "$CAOPD_STEP_PID" ]; then kill -USR1 "$CAOPD_STEP_PID" 2>/dev/null; fi
}
caopd_on_term() {
    echo "caopd launcher: TERM at $(date +%T)"
    CAOPD_STOP_REQUESTED=1
    if [ -n "$CAOPD_STEP_PID" ]; then kill -TERM "$CAOPD_STEP_PID" 2>/dev/null; fi
}
trap caopd_on_usr1 USR1
trap caopd_on_term TERM

# caopd_srun [srun options] -- caopd arguments: one job step in the background (so the traps run while it
# works; srun forwards the signal to every task), then its exit code.
caopd_srun() {
    local opts=()
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    srun --kill-on-bad-exit=1 "${CONTAINER_FLAGS[@]}" "${opts[@]}" $CAOPD "$@" &
    CAOPD_STEP_PID=$!
    local rc=0
    wait "$CAOPD_STEP_PID" || rc=$?
    while kill -0 "$CAOPD_STEP_PID" 2>/dev/null; do   # a trapped signal interrupts `wait`: wait again
        rc=0
        wait "$CAOPD_STEP_PID" || rc=$?
    done
    CAOPD_STEP_PID=
    return "$rc"
}

# caopd_phase_loop caopd arguments: rollout -> rewrite (one task) -> distill until the run is complete. Each
# phase starts from the checkpoint, so a resubmitted loop resumes where the last one stopped.
caopd_phase_loop() {
    CAOPD_FORWARD_USR1=0   # phases do not save mid-way: let the current phase finish, then stop
    local rc
    while :; do
        rc=0; caopd_srun -- rollout "$@" || rc=$?
        [ "$rc" = 3 ] && return 0
        [ "$rc" = 0 ] || return "$rc"
        caopd_srun --ntasks=1 --nodes=1 -- rewrite "$@" || return
        caopd_srun -- distill "$@" || return
        if [ "$CAOPD_STOP_REQUESTED" = 1 ]; then return 75; fi
    done
}

# caopd_finish RC: requeue on 75 when the job allows it (submitted with --requeue), else exit with RC.
caopd_finish() {
    local rc=$1
    if [ "$rc" = 75 ] && scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q 'Requeue=1'; then
        echo "caopd launcher: checkpoint saved; requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})"
        # Slurm holds the requeued job (AuthInfo cred_expire, 120 s by default) before it starts again.
        if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
        echo "caopd launcher: scontrol requeue failed; the checkpoint is saved, resubmit to continue"
    fi
    echo "caopd launcher: exit code $rc at $(date +%T)"
    exit "$rc"
}

# caopd_main caopd arguments: the whole job (CAOPD_MODE=run or phases), then caopd_finish.
caopd_main() {
    local rc=0
    echo "caopd launcher: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}," \
         "${SLURM_NTASKS} tasks x ${SLURM_CPUS_PER_TASK:-1} CPUs, mode ${CAOPD_MODE:-run}, $(date +%T)"
    if [ "${CAOPD_MODE:-run}" = phases ]; then
        caopd_phase_loop "$@" || rc=$?
    else
        caopd_srun -- run "$@" || rc=$?
    fi
    caopd_finish "$rc"
}
