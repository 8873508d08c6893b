#!/usr/bin/env bash
# Try a parallel layout on one machine's CPU: N gloo processes, Hydra overrides passed through.
#
#   launch/cpu.sh 2 parallel=dp2 trainer.steps=20
#   launch/cpu.sh 4 parallel=ep4 trainer.global_batch_size=16
#
# Each process gets OMP_NUM_THREADS threads (default: the CPU count divided by N, at least 1), so
# N processes do not oversubscribe the cores. The run id is fixed here, once, for every rank.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NUM_PROCESSES [hydra overrides...]   e.g. $0 4 parallel=ep4" >&2
    exit 2
fi
num_procs=$1
shift
cores=$(nproc)
export K2TRAIN_RUN_ID=${K2TRAIN_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / num_procs > 0 ? cores / num_procs : 1 ))}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$num_procs" \
    -m "${K2_ENTRY:-k2train.train}" trainer.device=cpu "$@"
