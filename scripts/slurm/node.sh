#!/bin/bash
# One per node, started by srun from train.sbatch: runs torchrun and relays stop signals to the trainers.
#
#   srun scripts/slurm/node.sh TORCHRUN_ARGS...     # the training step (one task per node)
#   srun --overlap scripts/slurm/node.sh --relay USR1   # a stop request: signals the trainers only
#
# torchrun treats every signal it handles as a death signal: it raises, tears its workers down and
# exits 1 with an elastic traceback, which would turn a planned stop into a crash. So torchrun is
# started deaf to USR1 and TERM (SIG_IGN survives exec, and torchrun handles only SIGINT, SIGHUP
# and SIGQUIT here), and this script hands both signals to torchrun's children, the trainers. They
# checkpoint at their next logging step and exit 0, and torchrun exits 0 with them.
#
# Why train.sbatch asks through `--relay` rather than `kill -USR1 <srun>`: srun's forwarding makes
# slurmstepd signal *every* process of the step, and a helper the trainer runs at that moment
# (DeepSpeed JIT-compiling an op with ninja, a compiler, a tokenizer server) dies of an unexpected
# USR1. The relay reaches only torchrun's children. A trainer that has not installed its handler
# yet inherited SIG_IGN and ignores it; train.sbatch asks again every RESEND_S seconds.
#
# SLURM's own signals (SIGTERM on pre-emption, scancel --signal without --batch) still reach every
# process; the traps below pass them on too, for proctrack plugins that only signal the task's
# process group (torchrun starts each worker in its own session).
# A worker that dies is still a failure: torchrun exits non-zero and srun --kill-on-bad-exit ends
# the step on every node (SIGTERM, then SIGKILL after SLURM's KillWait).
set -uo pipefail

PIDFILE="${TMPDIR:-/tmp}/fusedit-${SLURM_JOB_ID:-0}-${SLURMD_NODENAME:-$(hostname)}.torchrun.pid"

if [ "${1:-}" = "--relay" ]; then
    if [ -f "$PIDFILE" ]; then
        pkill "-${2:-USR1}" -P "$(cat "$PIDFILE")" 2>/dev/null || true
    fi
    exit 0
fi

trap '' USR1 TERM
torchrun --signals-to-handle SIGINT,SIGHUP,SIGQUIT "$@" &
TORCHRUN_PID=$!
echo "$TORCHRUN_PID" > "$PIDFILE"

relay() {
    pkill "-$1" -P "$TORCHRUN_PID" 2>/dev/null || true
}
trap 'relay USR1' USR1
trap 'relay TERM' TERM

# A trapped signal makes `wait` return early (status > 128) while torchrun keeps running: wait again.
while :; do
    wait "$TORCHRUN_PID" && STATUS=0 || STATUS=$?
    kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done
rm -f "$PIDFILE"
exit "$STATUS"
