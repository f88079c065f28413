#!/usr/bin/env bash
# Stops the slurmd and slurmctld that .ci/slurm_up.sh DIR started (by their pid files), cancelling jobs first.
set -uo pipefail
dir=$(realpath -m "${1:?usage: slurm_down.sh DIR}")
export SLURM_CONF=$dir/slurm.conf
scancel --full --quiet -u root 2>/dev/null
for daemon in slurmd slurmctld; do
    pidfile=$dir/$daemon.pid
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null
    rm -f "$pidfile"
done
exit 0
