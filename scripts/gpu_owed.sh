#!/usr/bin/env bash
# The H200 measurements still owed (docs/performance.md, "Still to measure"), in four parts that
# each fit one ~9-minute GPU call; run from the repo root, logs into $OUT.
#   bash scripts/gpu_owed.sh 1   # every mode vs the planner at 1 micro-batch (both optimizers) and AdamW at 8; FP8's cost
#   bash scripts/gpu_owed.sh 2   # where an AdamW step's time goes (eager and compiled, 8 micro-batches); saved tensors
#   bash scripts/gpu_owed.sh 3   # FP8 storage loss curve with its noise floor (3 runs of 200 steps)
#   bash scripts/gpu_owed.sh 4   # the long-context rows vs the planner; compiled m=1 then m=8 with expandable segments
#   bash scripts/gpu_owed.sh 6   # bf16 weights (trainer.param_dtype=bfloat16): GPU test, end to end (eager, compiled)
#   bash scripts/gpu_owed.sh 7   # bf16 weights: FP8's cost, the planner's bf16 precision, saved tensors; MuonClip at 1
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
case "${1:-1}" in
1)
    echo "== activation-memory modes on the proxy vs the planner: 1 micro-batch, then AdamW at 8"
    timeout 140 python3 scripts/bench_trainer.py memory --only "muonclip m=1" --steps 3 2>&1 | tee "$OUT/memory_muonclip_m1.txt"
    timeout 140 python3 scripts/bench_trainer.py memory --only "adamw m=1" --steps 3 2>&1 | tee "$OUT/memory_adamw_m1.txt"
    echo "== FP8 storage's cost, side by side with no FP8 and with K2's recipe (MuonClip, 8 micro-batches)"
    timeout 100 python3 scripts/bench_trainer.py memory --only "muonclip m=8 none$|muonclip m=8 fp8$|muonclip m=8 fp8+offload+selective$" --steps 4 \
        2>&1 | tee "$OUT/fp8_cost.txt"
    timeout 200 python3 scripts/bench_trainer.py memory --only "adamw m=8" --steps 3 2>&1 | tee "$OUT/memory_adamw_m8.txt"
    ;;
2)
    echo "== MuonClip at one micro-batch peaks at 77.5 GiB in every mode (AdamW: 82 at 80.5 static): what is alive at its peak"
    timeout 200 python3 scripts/bench_trainer.py memory --only "muonclip m=1 selective$" --steps 2 --peak 2>&1 | tee "$OUT/muon_m1_peak.txt"
    echo "== where an AdamW step's GPU time goes, 8 micro-batches: eager, then compiled (own processes)"
    timeout 150 python3 scripts/bench_e2e.py --optim adamw --micro 8 --steps 6 --profile --top 30 2>&1 | tee "$OUT/e2e_eager_m8.txt"
    timeout 300 python3 scripts/bench_e2e.py --optim adamw --micro 8 --steps 6 --profile --top 30 --set trainer.compile=true \
        2>&1 | tee "$OUT/e2e_compile_m8.txt"
    echo "== saved tensors per block vs the planner"
    timeout 80 python3 scripts/saved_tensors.py 2>&1 | tail -20 | tee "$OUT/saved_tensors.txt"
    ;;
3)
    echo "== FP8 storage loss curve, k2_small, 200 steps, and a bf16 run from another init seed (the noise floor)"
    timeout 570 python3 scripts/fp8_loss_curve.py --steps 200 --noise 2>&1 | tail -4 | tee "$OUT/fp8_loss.txt"
    ;;
4)
    echo "== long-context rows vs the planner"
    timeout 380 python3 scripts/bench_trainer.py long_context --steps 2 2>&1 | tee "$OUT/long_context.txt"
    echo "== compiled AdamW, m=1 then m=8 in one process (out of memory at m=8 twice): is it fragmentation?"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 190 python3 scripts/bench_e2e.py --optim adamw --micro 1 8 \
        --steps 6 --set trainer.compile=true 2>&1 | tee "$OUT/e2e_compile_expandable.txt"
    ;;
5)
    echo "== MuonClip at one micro-batch: what is alive at its peak (the optimizer step?), then every mode vs the planner"
    timeout 200 python3 scripts/bench_trainer.py memory --only "muonclip m=1 selective$" --steps 2 --peak 2>&1 | tee "$OUT/muon_m1_peak.txt"
    timeout 150 python3 scripts/bench_trainer.py memory --only "muonclip m=1" --steps 3 2>&1 | tee "$OUT/memory_muonclip_m1.txt"
    ;;
6)
    echo "== bf16 weights with fp32 gradients and masters: the GPU test, then AdamW end to end (eager m=1, m=8; compiled m=8)"
    timeout 120 python3 -m pytest -q -m gpu tests/test_precision.py 2>&1 | tail -3
    timeout 120 python3 scripts/bench_e2e.py --optim adamw --micro 1 8 --steps 6 --set trainer.param_dtype=bfloat16 \
        2>&1 | tee "$OUT/e2e_bf16_params.txt"
    timeout 200 python3 scripts/bench_e2e.py --optim adamw --micro 8 --steps 6 --profile --top 30 \
        --set trainer.param_dtype=bfloat16 trainer.compile=true 2>&1 | tee "$OUT/e2e_bf16_params_compile.txt"
    ;;
7)
    echo "== FP8 storage's cost and the planner's bf16 precision with bf16 weights (MuonClip, 8 micro-batches and 1)"
    timeout 170 python3 scripts/bench_trainer.py memory --only "muonclip m=8 none$|muonclip m=8 fp8$|muonclip m=8 fp8+offload+selective$|muonclip m=1 selective$" \
        --steps 4 --set trainer.param_dtype=bfloat16 2>&1 | tee "$OUT/memory_bf16_params.txt"
    echo "== saved tensors per block with bf16 weights vs the planner"
    timeout 80 python3 scripts/saved_tensors.py trainer.param_dtype=bfloat16 2>&1 | tail -20 | tee "$OUT/saved_tensors_bf16.txt"
    echo "== MuonClip at one micro-batch after the Newton-Schulz batch's result goes early (expect ~74.1 GiB)"
    timeout 170 python3 scripts/bench_trainer.py memory --only "muonclip m=1" --steps 3 2>&1 | tee "$OUT/memory_muonclip_m1.txt"
    ;;
*)
    echo "usage: bash scripts/gpu_owed.sh 1|2|3|4|5|6|7" >&2
    exit 2
    ;;
esac
