#!/usr/bin/env bash
# One GPU session's measurements (run on the lent H200 from the repo root; writes logs to $OUT):
#   1. the MuonClip optimizer step on the K2 layer slice vs torch.optim.Muon and fused AdamW;
#   2. k2_small training steps through the real trainer (tokens/s, MFU, peak memory);
#   3. the planner's estimate for the same run, to compare with the measured peak;
#   4. activation recompute (none/selective/full, full + compile): step time, peak vs the planner.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
SMALL="model=k2_small trainer.dtype=bfloat16 trainer.seq_len=4096 trainer.micro_batch_size=1 trainer.global_batch_size=4"
SMALL="$SMALL model.attn_impl=triton model.moe_impl=triton optim.ns_impl=triton optim.ns_method=gram"
echo "== planner: k2_small, one GPU"
python3 -m k2train.plan $SMALL 2>&1 | tail -30 | tee "$OUT/plan_small.txt"
echo "== k2_small training, 12 steps"
timeout 170 python3 -m k2train.train $SMALL trainer.steps=10 trainer.log_interval=2 logging.wandb=false \
  logging.progress_bar=false trainer.checkpoint.enable=false trainer.output_dir=/tmp/k2gpu 2>&1 | tee "$OUT/train_small.txt" | grep -E "step|error|Error" | tail -12
python3 - <<'PY'
import json, glob
rows = [json.loads(l) for f in glob.glob("/tmp/k2gpu/logs/*/metrics.jsonl") for l in open(f)]
late = rows[4:] or rows
if late:
    tps = sorted(r["tokens_per_s"] for r in late)[len(late) // 2]
    print(f"k2_small median tokens/s {tps:,.0f}  MFU {sorted(r.get('mfu', 0) for r in late)[len(late)//2]*100:.1f}%  "
          f"peak memory {max(r.get('memory_gib', 0) for r in rows):.1f} GiB  loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
PY
echo "== MuonClip optimizer step"
timeout 400 python3 scripts/bench_muon.py 2>&1 | tee "$OUT/bench_muon.txt" | tail -40
echo "== activation recompute and compile: k2_small step time and peak activations vs the planner"
timeout 300 python3 scripts/bench_recompute.py 2>&1 | tee "$OUT/bench_recompute.txt" | tail -8
