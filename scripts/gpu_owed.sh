#!/usr/bin/env bash
# The H200 measurements still owed (docs/performance.md, "Still to measure"), in parts that each fit
# one ~9-minute GPU call; run from the repo root, logs into $OUT. (Parts 1-3 and 5-9 ran on
# 2026-12-04: their results are in docs/performance.md; 8 and 9 stay as the commands behind them.)
#   bash scripts/gpu_owed.sh 4   # the long-context rows vs the planner; compiled m=1 then m=8 with expandable segments
#   bash scripts/gpu_owed.sh 8   # bf16 weights' gradients summed by the one-pass kernel: kernel, tests, end to end
#   bash scripts/gpu_owed.sh 9   # side by side in one session: TorchTitan compiled, then k2train compiled, bf16 weights, m=8
#                                # (TorchTitan's kit set up in .titan/: cp -r <anchors>/titan .titan, its README's set-up)
#   bash scripts/gpu_owed.sh 10  # the FP8 loss curve over 300 steps, bf16 weights (two runs, ~8 min)
#   bash scripts/gpu_owed.sh 11 RUNS.json  # its noise run (bf16 from init seed 1), added to part 10's fp8_loss.json
#   bash scripts/gpu_owed.sh 13 RUNS.json  # FP8's gradient against another batch's (k2_small, after 50 steps); a second
#                                          # pair (FP8 from init seed 1) added to RUNS.json (docs/data/fp8_loss_300.json
#                                          # holds it since 2026-12-05, run on an H100, and the comparison too)
#   bash scripts/gpu_owed.sh 14  # offload's in-flight bound: GPU tests, the proxy's 32K FP8 + offload row (out of memory
#                                # before the bound, planner 97 GiB), then what is alive at the peak (the tests and the
#                                # k2_small rows passed on an H100 on 2026-12-05, where --peak failed in the chunked loss)
#   bash scripts/gpu_owed.sh 15  # the offload rows at 4K after the in-flight bound (step time, peak vs planner);
#                                # PCIE=1 measures PCIe first (53/54 GB/s on an H100 host, 2026-12-05)
#                                # (its short ROWS ran on the H200 on 2026-12-05 evening: -0.9% to +0.7%)
#   bash scripts/gpu_owed.sh 16  # the fused cross entropy (model.loss_impl=triton): GPU test, kernel against torch's,
#                                # end to end and k2_small's 32K peak with and without (all but the proxy's end to
#                                # end ran on an H100 on 2026-12-05: docs/performance.md)
#   bash scripts/gpu_owed.sh 17  # the router's split fp32 matmul (test, against the fp32 GEMM); one K2 MoE layer
#                                # with every kernel fused (norms, SwiGLU), eager and compiled, and
#                                # where its B=2 step spends GPU time (the 400 TFLOP/s target; the H200 measured 393
#                                # compiled on 2026-12-05 evening, the H100 365)
#   bash scripts/gpu_owed.sh 18  # part 15's offload rows on an H100 (80 GB): the proxy with a 32K vocabulary (the
#                                # blocks' activations as the proxy's; the embedding and head 35 GiB smaller)
#   bash scripts/gpu_owed.sh 19  # attention with packed documents (block skipping) against FlexAttention's document mask
#                                # (ran on an H100 on 2026-12-05: docs/kernels_attention.md)
#   bash scripts/gpu_owed.sh 20  # compile with selective recompute and with CUDA graphs (trainer.compile_mode=reduce-overhead,
#                                # 2026-12-05 night, CPU-tested only): the GPU tests, then the K2 layer compiled in the
#                                # default mode and as CUDA graphs (the 400 TFLOP/s target: 393 compiled, ~3.1 ms of the
#                                # B=2 step's 67.45 ms idle between kernels), with the idle line of --profile
#   bash scripts/gpu_owed.sh 21  # the proxy end to end, compiled, AdamW, 8 micro-batches, bf16 weights: no recompute,
#                                # selective recompute, CUDA graphs (one process each)
#   bash scripts/gpu_owed.sh 22  # side by side at ONE micro-batch (part 9 is eight): TorchTitan compiled, then k2train
#                                # compiled and eager, bf16 weights, fused loss (the issue's >= 1.1x at one micro-batch)
#   bash scripts/gpu_owed.sh 12  # no host sync inside a step: the GPU test, the loop's profile (syncs per step, GPU idle),
#                                # the loop against steps timed one by one (the sync each step used to make); SET="..."
#                                # adds overrides (an H100: SET="model.vocab_size=32768 model.bos_token_id=32000
#                                # model.eos_token_id=32001", the proxy's blocks with a 35 GiB smaller embedding and head)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
case "${1:-}" in
4)
    echo "== long-context rows vs the planner"
    timeout 380 python3 scripts/bench_trainer.py long_context --steps 2 2>&1 | tee "$OUT/long_context.txt"
    echo "== compiled AdamW, m=1 then m=8 in one process (out of memory at m=8 twice): is it fragmentation?"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 190 python3 scripts/bench_e2e.py --optim adamw --micro 1 8 \
        --steps 6 --set trainer.compile=true 2>&1 | tee "$OUT/e2e_compile_expandable.txt"
    ;;
8)
    echo "== the fp32 gradient accumulator against torch's mixed-dtype add; the GPU tests"
    timeout 60 python3 scripts/bench_kernels.py --only accumulate 2>&1 | tee "$OUT/accumulate.txt"
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_precision.py tests/test_kernel_grad_accumulate.py 2>&1 | tail -3
    echo "== bf16 weights end to end, AdamW: eager m=1, m=8; compiled m=8 with the profile"
    timeout 120 python3 scripts/bench_e2e.py --optim adamw --micro 1 8 --steps 6 --set trainer.param_dtype=bfloat16 \
        2>&1 | tee "$OUT/e2e_bf16_params.txt"
    timeout 200 python3 scripts/bench_e2e.py --optim adamw --micro 8 --steps 6 --profile --top 12 \
        --set trainer.param_dtype=bfloat16 trainer.compile=true 2>&1 | tee "$OUT/e2e_bf16_params_compile.txt"
    ;;
9)
    echo "== TorchTitan compiled at 8 micro-batches, then k2train compiled with bf16 weights, one after the other"
    timeout 560 python3 scripts/bench_e2e.py --run-titan .titan --titan-runs compile --optim adamw --micro 8 --steps 6 \
        --set trainer.param_dtype=bfloat16 trainer.compile=true 2>&1 | tee "$OUT/e2e_side_by_side.txt"
    ;;
10)
    echo "== FP8 storage against bf16 storage over 300 steps of k2_small, bf16 weights"
    timeout 570 python3 scripts/fp8_loss_curve.py --steps 300 --set trainer.param_dtype=bfloat16 2>&1 | grep -v "^step " | tee "$OUT/fp8_loss_curve.txt"
    ;;
11)
    echo "== the noise floor's run, added to an earlier call's runs (${2:?usage: bash scripts/gpu_owed.sh 11 PART10/fp8_loss.json})"
    timeout 570 python3 scripts/fp8_loss_curve.py --steps 300 --noise --runs-from "$2" --set trainer.param_dtype=bfloat16 \
        2>&1 | grep -v "^step " | tee "$OUT/fp8_loss_curve_noise.txt"
    ;;
13)
    echo "== a second pair: FP8 storage from init seed 1, against the bf16 run from seed 1 (${2:?usage: bash scripts/gpu_owed.sh 13 PART11/fp8_loss.json})"
    timeout 120 python3 scripts/fp8_grad_noise.py --warm 50 --set trainer.param_dtype=bfloat16 2>&1 | tee "$OUT/fp8_grad_noise.txt"
    timeout 400 python3 scripts/fp8_loss_curve.py --steps 300 --second-pair --runs-from "$2" --set trainer.param_dtype=bfloat16 \
        2>&1 | grep -v "^step " | tee "$OUT/fp8_loss_curve_pair2.txt"
    ;;
14)
    echo "== offload with at most two blocks' copies in flight (2026-12-05): the GPU tests, then the rows that"
    echo "   ran out of memory (the proxy at 32K with FP8 + offload, planner 97 GiB) with what is alive at the peak,"
    echo "   and the proxy at 32K with full recompute (planner 87.48 GiB after its backward walk; the CPU trace 86.70:"
    echo "   python scripts/trace_memory.py long_context --only 'proxy S=32K full' --top 30 prints the same by line)"
    timeout 170 python3 -m pytest -q -m gpu tests/test_activation_memory.py tests/test_trainer.py 2>&1 | tail -3
    timeout 200 python3 scripts/bench_trainer.py long_context --only "proxy S=32K" --steps 2 2>&1 | tee "$OUT/long_context_32k.txt"
    echo "== what is alive at the second step's peak (or its out of memory), the proxy at 32K and k2_small at 32K"
    timeout 200 python3 scripts/bench_trainer.py long_context --only "proxy S=32K|k2_small S=32K full" --steps 2 --peak \
        2>&1 | tee "$OUT/long_context_peak.txt"
    ;;
15)
    echo "== what PCIe carries to pinned host memory (offload's ceiling), then the offload rows at 4K (the proxy,"
    echo "   MuonClip, 8 micro-batches) after the in-flight bound, against none"
    [ -n "${PCIE:-}" ] && timeout 60 python3 scripts/bench_kernels.py --only pcie 2>&1 | tee "$OUT/pcie.txt"
    # ROWS=... picks fewer (bench_trainer's --only: '|'-separated names, '$' for an exact one)
    timeout 450 python3 scripts/bench_trainer.py memory --steps 3 \
        --only "${ROWS:-muonclip m=8 none\$|muonclip m=8 offload\$|muonclip m=8 offload+selective\$|muonclip m=8 fp8+offload+selective\$}" \
        2>&1 | tee "$OUT/memory_offload.txt"
    ;;
12)
    echo "== no host sync inside a step, evaluation and profile (GPU tests), then the trainer's loop profiled: syncs per step, GPU idle"
    timeout 150 python3 -m pytest -q -m gpu tests/test_trainer.py -k "host_sync or evaluation_and_profile" 2>&1 | tail -3
    timeout 200 python3 scripts/bench_e2e.py --optim adamw muonclip --micro 8 --steps 6 --profile --top 4 \
        --set trainer.param_dtype=bfloat16 ${SET:-} 2>&1 | tee "$OUT/e2e_idle.txt"
    echo "== the same, each step timed on its own between device synchronizations (what the loop saves)"
    timeout 120 python3 scripts/bench_e2e.py --optim adamw --micro 1 8 --steps 6 --sync-steps \
        --set trainer.param_dtype=bfloat16 ${SET:-} 2>&1 | tee "$OUT/e2e_sync_steps.txt"
    timeout 120 python3 scripts/bench_e2e.py --optim adamw --micro 1 8 --steps 6 \
        --set trainer.param_dtype=bfloat16 ${SET:-} 2>&1 | tee "$OUT/e2e_loop_steps.txt"
    ;;
16)
    echo "== the fused cross entropy: the GPU test (K2's vocabulary), the kernel against torch's, end to end"
    timeout 120 python3 -m pytest -q -m gpu tests/test_kernel_cross_entropy.py 2>&1 | tail -3
    timeout 90 python3 scripts/bench_kernels.py --only loss 2>&1 | tee "$OUT/loss_kernel.txt"
    for impl in torch triton; do
        timeout 130 python3 scripts/bench_e2e.py --optim adamw --micro 1 8 --steps 6 \
            --set trainer.param_dtype=bfloat16 model.loss_impl=$impl 2>&1 | tee "$OUT/e2e_loss_$impl.txt"
        timeout 60 python3 scripts/bench_trainer.py long_context --only "k2_small S=32K full" --steps 2 \
            --set model.loss_impl=$impl 2>&1 | tee "$OUT/k2s_32k_loss_$impl.txt"
    done
    ;;
18)
    echo "== the offload rows at 4K after the in-flight bound, on an H100: the proxy with a 32K vocabulary"
    timeout 330 python3 scripts/bench_trainer.py memory --steps 3 \
        --only 'muonclip m=8 none$|muonclip m=8 offload+selective$|muonclip m=8 fp8+offload+selective$|muonclip m=8 offload$' \
        --set model.vocab_size=32768 model.bos_token_id=32000 model.eos_token_id=32001 2>&1 | tee "$OUT/memory_offload_v32k.txt"
    ;;
17)
    echo "== the router's fp32 matmul as split bf16 GEMMs: GPU test (eager, compiled), against the fp32 GEMM"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_split_matmul.py 2>&1 | tail -3
    timeout 60 python3 scripts/bench_kernels.py --only router 2>&1 | tee "$OUT/router.txt"
    echo "== one K2 MoE layer, all Triton (attention, MoE, norms, SwiGLU), eager then compiled; the B=2 step's kernels"
    # two ~64 GiB layers one after the other: on an 80 GB card only without fragmentation
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 400 python3 scripts/bench_layer.py --skip-hf --skip-small --fused --profile 2>&1 | tee "$OUT/bench_layer_fused.txt"
    ;;
19)
    echo "== attention with packed documents: the GPU tests, then fwd+bwd with documents of 4096 / 2048 / 512 tokens"
    echo "   (the kernels skip other documents' blocks) against FlexAttention's document mask"
    timeout 320 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernel_attention.py 2>&1 | tail -3  # ~200 s warm; more cold
    timeout 300 python3 scripts/bench_attention.py --docs 2>&1 | tee "$OUT/attention_docs.txt"
    ;;
22)
    echo "== TorchTitan compiled at 1 micro-batch, then k2train compiled and eager (bf16 weights, fused loss), one after the other"
    timeout 330 python3 scripts/bench_e2e.py --run-titan .titan --titan-runs compile --optim adamw --micro 1 --steps 8 \
        --set trainer.param_dtype=bfloat16 model.loss_impl=triton trainer.compile=true 2>&1 | tee "$OUT/e2e_side_by_side_m1.txt"
    timeout 150 python3 scripts/bench_e2e.py --titan "$OUT/titan" --optim adamw --micro 1 --steps 8 \
        --set trainer.param_dtype=bfloat16 model.loss_impl=triton 2>&1 | tee -a "$OUT/e2e_side_by_side_m1.txt"
    ;;
20)
    echo "== compile with selective recompute, compile with CUDA graphs: the GPU tests"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_compile_kernels.py tests/test_recompute.py \
        -k "selective or cuda_graphs" 2>&1 | tail -4
    echo "== one K2 MoE layer, all Triton: eager, compiled, compiled as CUDA graphs (B=2 step profiled in each)"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 360 python3 scripts/bench_layer.py --skip-hf --skip-small \
        --fused --profile --compile-mode reduce-overhead 2>&1 | tee "$OUT/bench_layer_graphs.txt"
    ;;
21)
    echo "== the proxy compiled, AdamW, 8 micro-batches, bf16 weights, fused loss: none / selective / CUDA graphs"
    for extra in "" "parallel.recompute=selective" "trainer.compile_mode=reduce-overhead"; do
        timeout 180 python3 scripts/bench_e2e.py --optim adamw --micro 8 --steps 6 --set trainer.param_dtype=bfloat16 \
            model.loss_impl=triton trainer.compile=true $extra 2>&1 | tee -a "$OUT/e2e_compile_modes.txt"
    done
    ;;
*)
    echo "usage: bash scripts/gpu_owed.sh 4|8|9|10|11|12|13|14|15|16|17|18|19|20|21|22" >&2
    exit 2
    ;;
esac
