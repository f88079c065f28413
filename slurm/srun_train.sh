#!/bin/bash
# The body of slurm/train_*.sbatch: one `python train.py` per task (one task per GPU), SLURM's layout
# handed to Lightning, one run directory per job, resume by default. Not meant to be run by hand.
#   usage (inside an allocation): srun_train.sh STAGE [hydra overrides...]
set -euo pipefail
stage=$1
shift
repo=${LDM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
nodes=${SLURM_JOB_NUM_NODES:-1}
tasks_per_node=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / nodes))}
# All tasks of the job, and the job again after a requeue (same id), share this directory, so
# ckpt_path=auto resumes it. RUN_DIR=... names a run so that a new submission continues it.
run_dir=${RUN_DIR:-runs/$stage/slurm-$SLURM_JOB_ID}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
echo "$(date -Is) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $tasks_per_node task(s), run_dir=$run_dir"
# trainer.devices / trainer.num_nodes must equal SLURM's tasks per node / nodes: Lightning checks it.
# Each rank logs to <run_dir>/train_rank<k>.log (Hydra resolves SLURM_PROCID per task).
srun --kill-on-bad-exit=1 "${PYTHON:-python}" "$repo/train.py" \
    stage="$stage" trainer=ddp \
    trainer.devices="$tasks_per_node" trainer.num_nodes="$nodes" \
    run_dir="$run_dir" ckpt_path=auto \
    'hydra.job.name=train_rank${oc.env:SLURM_PROCID}' \
    "$@"
