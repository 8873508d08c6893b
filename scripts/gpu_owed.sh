#!/usr/bin/env bash
# The H200 measurements still owed (docs/performance.md, "Still to measure"), in four parts that
# each fit one ~9-minute GPU call; run from the repo root, logs into $OUT.
#   bash scripts/gpu_owed.sh 1   # MuonClip (Gram NS), compiled AdamW at 8 micro-batches; this version's GPU tests
#   bash scripts/gpu_owed.sh 2   # activation-memory modes vs the planner: MuonClip at 1, AdamW at 8 micro-batches
#   bash scripts/gpu_owed.sh 3   # FP8 storage loss curve (300 steps), saved tensors per block
#   bash scripts/gpu_owed.sh 4   # this version's FP8 storage and offload speed; AdamW memory rows at 1 micro-batch
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
case "${1:-1}" in
1)
    echo "== MuonClip end to end, Gram NS fp16, 8 micro-batches"
    timeout 200 python3 scripts/bench_e2e.py --optim muonclip --micro 8 --steps 6 2>&1 | tee "$OUT/e2e_muonclip.txt"
    echo "== AdamW with trainer.compile=true, 8 micro-batches in a process of its own (after m=1 it ran out of memory)"
    timeout 200 python3 scripts/bench_e2e.py --optim adamw --micro 8 --steps 6 --set trainer.compile=true 2>&1 | tee "$OUT/e2e_compile.txt"
    echo "== GPU tests: compile inside full recompute; fused FP8 SwiGLU backward, offload with selective recompute"
    timeout 60 python3 -m pytest -q -m gpu tests/test_compile_kernels.py -k full_recompute 2>&1 | tail -3
    timeout 90 python3 -m pytest -q -m gpu tests/test_activation_memory.py 2>&1 | tail -3
    ;;
2)
    echo "== activation-memory modes on the proxy vs the planner: what the 2026-12-04 table lacks"
    timeout 560 python3 scripts/bench_trainer.py memory --only "muonclip m=1|adamw m=8" --steps 3 2>&1 | tee "$OUT/memory.txt"
    ;;
3)
    echo "== FP8 storage loss curve, k2_small, 300 steps"
    timeout 420 python3 scripts/fp8_loss_curve.py 2>&1 | tail -8 | tee "$OUT/fp8_loss.txt"
    echo "== saved tensors per block vs the planner"
    timeout 100 python3 scripts/saved_tensors.py 2>&1 | tail -20 | tee "$OUT/saved_tensors.txt"
    ;;
4)
    echo "== FP8 storage's cost with the fused SwiGLU backward (was 1.08x none), offload on two streams, offload + selective"
    timeout 240 python3 scripts/bench_trainer.py memory --only "muonclip m=8 none|muonclip m=8 fp8|muonclip m=8 offload" \
        --steps 3 2>&1 | tee "$OUT/fp8_offload.txt"
    echo "== the AdamW rows at one micro-batch"
    timeout 300 python3 scripts/bench_trainer.py memory --only "adamw m=1" --steps 3 2>&1 | tee "$OUT/memory_adamw_m1.txt"
    ;;
*)
    echo "usage: bash scripts/gpu_owed.sh 1|2|3|4" >&2
    exit 2
    ;;
esac
