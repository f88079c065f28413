#!/usr/bin/env bash
# Starts a real single-node SLURM cluster (Debian's slurmctld + slurmd, as root, no systemd) whose
# configuration, state and logs live in DIR, and waits until its node is idle. The node claims 64 CPUs
# and 8 GPUs (gres files are /dev/null links) so that slurm/*.sbatch, written for 8-GPU nodes, schedule
# as they are; CI submits them with --ntasks-per-node=2 and trainer.accelerator=cpu (gloo DDP).
#   .ci/slurm_up.sh DIR && export SLURM_CONF=DIR/slurm.conf;  ...;  .ci/slurm_down.sh DIR
set -euo pipefail
dir=$(realpath -m "${1:?usage: slurm_up.sh DIR}")
for tool in slurmctld slurmd sbatch sinfo; do
    command -v "$tool" >/dev/null || { echo "slurm_up: $tool not found (apt-get install slurmctld slurmd slurm-client)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "slurm_up: must run as root (slurmd starts jobs as their user)" >&2; exit 1; }
mkdir -p "$dir/state" "$dir/spool" "$dir/gres"
for i in 0 1 2 3 4 5 6 7; do ln -sf /dev/null "$dir/gres/gpu$i"; done
cat > "$dir/slurm.conf" <<CONF
ClusterName=ldmci
SlurmctldHost=localhost
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=64 RealMemory=64000 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
echo "Name=gpu File=$dir/gres/gpu[0-7]" > "$dir/gres.conf"
export SLURM_CONF=$dir/slurm.conf
slurmctld -i
slurmd -N localhost
for _ in $(seq 1 60); do
    if [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = idle ]; then
        echo "slurm_up: node idle; export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm_up: the node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
