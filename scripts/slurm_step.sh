#!/usr/bin/env bash
# Run one training command under SLURM so that it survives preemption and time limits:
#   scripts/slurm_step.sh python -m pgt.launch ... train.py ... --resume auto
# The command runs as a job step (srun) with the batch job's --cpus-per-task: Slurm 22.05-23.02 do not pass it down
# to srun, which would leave every rank and loader worker of the node on one core.
# SLURM signals the batch shell (#SBATCH --signal=B:USR1@300, or SIGTERM on preemption). This script forwards
# SIGTERM to the job step; pgt.launch (torchrun) passes it to every rank; train.py finishes its step, writes
# recovery.pth and exits 75, and so does pgt.launch. The job then requeues itself, and the next start resumes with
# --resume auto. Any other end (bad input exits 2, a diverged run 3, a crash) is final: no requeue.
set -uo pipefail
requeue=0
forward() {
    requeue=1
    echo "slurm_step: preemption signal, stopping the run at the next step" >&2
    kill -TERM "$child" 2>/dev/null
}
trap forward USR1 TERM
srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} "$@" &
child=$!
status=0
while kill -0 "$child" 2>/dev/null; do  # wait returns early when a trapped signal arrives: wait again
    wait "$child"
    status=$?
done
if [ "$requeue" -eq 1 ] || [ "$status" -eq 75 ]; then
    job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    scontrol requeue "${job:-$SLURM_JOB_ID}"
fi
exit "$status"
