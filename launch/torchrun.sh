#!/usr/bin/env bash
# Single-node training on all (or GPUS_PER_NODE) GPUs of this machine; Hydra overrides pass through.
#
#   launch/torchrun.sh model=k2_small trainer.dtype=bfloat16 parallel=ep2
#   GPUS_PER_NODE=4 launch/torchrun.sh parallel=tp2_ep2
#
# The product of the parallel degrees must equal GPUS_PER_NODE (parallel.dp=-1 takes the rest).
set -euo pipefail
if [[ -z ${GPUS_PER_NODE:-} ]]; then
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $GPUS_PER_NODE -gt 0 ]] || { echo "no GPU found by nvidia-smi: set GPUS_PER_NODE, or use launch/cpu.sh" >&2; exit 2; }
fi
export K2TRAIN_RUN_ID=${K2TRAIN_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
# A host's worth of CPU threads split over the ranks; NCCL fails after the trainer's own timeout
# (parallel.timeout_s) instead of hanging.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$GPUS_PER_NODE" \
    -m "${K2_ENTRY:-k2train.train}" "$@"
