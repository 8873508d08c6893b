#!/usr/bin/env bash
# The H200 measurements still owed (docs/performance.md, "Still to measure"), in three parts that
# each fit one ~9-minute GPU call; run from the repo root, logs into $OUT.
#   bash scripts/gpu_owed.sh 1   # compile parity on the GPU, MuonClip (Gram NS) end to end, compile's speed
#   bash scripts/gpu_owed.sh 2   # every activation-memory mode on the proxy vs the planner (MuonClip)
#   bash scripts/gpu_owed.sh 3   # FP8 storage loss curve (300 steps), saved tensors per block
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
case "${1:-1}" in
1)
    echo "== compiled Triton blocks vs eager (GPU parity test)"
    timeout 150 python3 -m pytest -q -m gpu tests/test_compile_kernels.py 2>&1 | grep -v DEBUG | tail -30 | tee "$OUT/compile_gpu.txt"
    echo "== MuonClip end to end, Gram NS fp16, 1 and 8 micro-batches"
    timeout 200 python3 scripts/bench_e2e.py --optim muonclip --steps 6 2>&1 | tee "$OUT/e2e_muonclip.txt"
    echo "== AdamW end to end with trainer.compile=true"
    timeout 200 python3 scripts/bench_e2e.py --optim adamw --steps 6 --set trainer.compile=true 2>&1 | tee "$OUT/e2e_compile.txt"
    ;;
2)
    echo "== activation-memory modes on the proxy vs the planner (m=8 and m=1, MuonClip)"
    timeout 540 python3 scripts/bench_trainer.py memory --only "muonclip" --steps 3 2>&1 | tee "$OUT/memory.txt"
    ;;
3)
    echo "== FP8 storage loss curve, k2_small, 300 steps"
    timeout 420 python3 scripts/fp8_loss_curve.py 2>&1 | tail -8 | tee "$OUT/fp8_loss.txt"
    echo "== saved tensors per block vs the planner"
    timeout 100 python3 scripts/saved_tensors.py 2>&1 | tail -20 | tee "$OUT/saved_tensors.txt"
    ;;
*)
    echo "usage: bash scripts/gpu_owed.sh 1|2|3" >&2
    exit 2
    ;;
esac
