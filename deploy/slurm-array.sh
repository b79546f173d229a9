#!/usr/bin/env bash
# Input margins of a whole dataset as a SLURM job array: each task runs one shard (whole chunks)
# and resumes by itself when requeued; merge once all tasks are done. brittle must be on the
# PATH of the compute nodes (a prefix made by `scripts/install --prefix DIR`: add DIR/bin).
# Arguments after the script go to `brittle margins` as they are.
#
#   export PATH=/opt/brittle/bin:$PATH
#   sbatch --array=0-15 deploy/slurm-array.sh                   # 16 shards
#   SHARDS=16 sbatch --array=5 deploy/slurm-array.sh            # task 5 again (cancelled, failed)
#   brittle merge margins.shard-*.csv --out margins.csv         # checks every sample appears once
#
# Without SHARDS, brittle takes the shard from SLURM_ARRAY_TASK_ID/COUNT/MIN, which holds for the
# whole array only: an array of one task resubmitted alone would otherwise be shard 0 of 1 (the
# whole dataset). With SHARDS=n the task ID is the shard index, 0..n-1.
# Test: scripts/test-slurm runs this on a one-node Slurm cluster.
#
#SBATCH --job-name=brittle-margins
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=brittle-%A_%a.out
set -euo pipefail
MODEL=${MODEL:-models/resnet_2b.pt}
DATA=${DATA:-data/cifar10/real-pool.bin}
NORM=${NORM:-linf}
shard=()
if [ -n "${SHARDS:-}" ]; then shard=(--shard "$SLURM_ARRAY_TASK_ID/$SHARDS"); fi
exec brittle margins --model "$MODEL" --data "$DATA" --norm "$NORM" --attack best \
  --threads "${SLURM_CPUS_PER_TASK:-4}" --seed 0 "${shard[@]}" \
  --out "margins.shard-${SLURM_ARRAY_TASK_ID}.csv" "$@"
