#!/usr/bin/env bash
# Input margins of a whole dataset as a SLURM job array: each task runs one shard (whole chunks)
# and resumes by itself when requeued; merge once all tasks are done.
#
#   sbatch --array=0-15 deploy/slurm-array.sh
#   brittle merge margins.shard-*.csv --out margins.csv   # checks every sample appears once
#
#SBATCH --job-name=brittle-margins
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=logs/brittle-%A_%a.out
set -euo pipefail
MODEL=${MODEL:-models/resnet_2b.pt}
DATA=${DATA:-data/cifar10/real-pool.bin}
NORM=${NORM:-linf}
# brittle reads SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_MIN itself.
exec brittle margins --model "$MODEL" --data "$DATA" --norm "$NORM" --attack best \
  --threads "${SLURM_CPUS_PER_TASK:-4}" --seed 0 \
  --out "margins.shard-${SLURM_ARRAY_TASK_ID}.csv"
