#!/usr/bin/env bash
# The H200 measurements still owed (docs/performance.md, "Still to measure"), in four parts that
# each fit one ~9-minute GPU call; run from the repo root, logs into $OUT.
#   bash scripts/gpu_owed.sh 1   # FP8 storage's peak (--peak); the modes vs the planner, MuonClip at 1 micro-batch; CUDA init test
#   bash scripts/gpu_owed.sh 2   # the same, AdamW at 8 micro-batches
#   bash scripts/gpu_owed.sh 3   # FP8 storage loss curve with its noise floor (3 runs of 200 steps)
#   bash scripts/gpu_owed.sh 4   # AdamW at 1 micro-batch; compiled m=1 then m=8 with expandable segments; saved tensors
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
case "${1:-1}" in
1)
    echo "== FP8 storage after the backward that frees as it goes: its peak, and what is alive at it (--peak)"
    timeout 120 python3 scripts/bench_trainer.py memory --only "muonclip m=8 fp8$" --steps 2 --peak 2>&1 | tee "$OUT/fp8_peak.txt"
    echo "== activation-memory modes on the proxy vs the planner: MuonClip at one micro-batch"
    timeout 380 python3 scripts/bench_trainer.py memory --only "muonclip m=1" --steps 3 2>&1 | tee "$OUT/memory_muonclip_m1.txt"
    echo "== GPU test: seeded init drawn by CUDA's generator"
    timeout 40 python3 -m pytest -q -m gpu tests/test_model_impls.py 2>&1 | tail -3
    ;;
2)
    echo "== activation-memory modes on the proxy vs the planner: AdamW at eight micro-batches"
    timeout 570 python3 scripts/bench_trainer.py memory --only "adamw m=8" --steps 3 2>&1 | tee "$OUT/memory_adamw_m8.txt"
    ;;
3)
    echo "== FP8 storage loss curve, k2_small, 200 steps, and a bf16 run from another init seed (the noise floor)"
    timeout 570 python3 scripts/fp8_loss_curve.py --steps 200 --noise 2>&1 | tail -4 | tee "$OUT/fp8_loss.txt"
    ;;
4)
    echo "== activation-memory modes on the proxy vs the planner: AdamW at one micro-batch"
    timeout 330 python3 scripts/bench_trainer.py memory --only "adamw m=1" --steps 3 2>&1 | tee "$OUT/memory_adamw_m1.txt"
    echo "== saved tensors per block vs the planner"
    timeout 80 python3 scripts/saved_tensors.py 2>&1 | tail -20 | tee "$OUT/saved_tensors.txt"
    echo "== compiled AdamW, m=1 then m=8 in one process (out of memory at m=8 twice): is it fragmentation?"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 170 python3 scripts/bench_e2e.py --optim adamw --micro 1 8 \
        --steps 6 --set trainer.compile=true 2>&1 | tee "$OUT/e2e_compile_expandable.txt"
    ;;
*)
    echo "usage: bash scripts/gpu_owed.sh 1|2|3|4" >&2
    exit 2
    ;;
esac
