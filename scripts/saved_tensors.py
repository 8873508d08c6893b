"""What each transformer block keeps for its backward, measured, against the planner's per-layer
activation bytes (k2train.parallel.memory.layer_activation_bytes): the check behind the planner's
activation term at a model's real width, on the device its kernels run on.

    python scripts/saved_tensors.py                         # GPU: the K2-width proxy, bf16 autocast, 1 x 4096
    python scripts/saved_tensors.py parallel.fp8_moe_inputs=true
    python scripts/saved_tensors.py trainer.param_dtype=bfloat16   # bf16 weights
    python scripts/saved_tensors.py --smoke                 # CPU: k2_tiny, fp32

Every tensor autograd saves inside a block is counted once per storage (a storage saved by several
ops or through several views counts once; its whole size); parameters and their compute-dtype
copies (autocast's bf16 weights) are listed apart, as the planner counts those with the weights.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F

from k2train.config import load_config
from k2train.model import K2Model
from k2train.parallel.activation_memory import _from_parameter, apply_fp8_storage
from k2train.parallel.memory import head_activation_bytes, layer_activation_bytes
from k2train.parallel.precision import bf16_params_

PROXY = ["model=k2_1t", "model.num_hidden_layers=2", "model.n_routed_experts=16", "model.attn_impl=triton",
         "model.moe_impl=triton", "trainer.dtype=bfloat16", "trainer.seq_len=4096", "trainer.micro_batch_size=1"]
SMOKE = ["model=k2_tiny", "model.num_hidden_layers=2", "trainer.dtype=float32", "trainer.seq_len=64"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cfg = load_config([*(SMOKE if args.smoke or not torch.cuda.is_available() else PROXY), *args.overrides])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    t = cfg.trainer
    a = 2 if t.dtype == "bfloat16" else 4
    torch.manual_seed(0)
    with torch.device(device):
        model = K2Model(cfg.model)
    model.init_weights(seed=0)
    if cfg.parallel.fp8_moe_inputs:
        apply_fp8_storage(model)
    if t.param_dtype == "bfloat16":  # bf16 weights: a bf16 residual stream, no weight copies
        bf16_params_([model])
    residual = 4 if a == 2 and t.param_dtype != "bfloat16" else a  # autocast keeps the residual stream fp32
    tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), device=device)
    ntok = t.micro_batch_size * t.seq_len

    seen: dict[str, dict[int, tuple]] = defaultdict(dict)  # block -> storage address -> (bytes, description)
    weights: dict[str, dict[int, int]] = defaultdict(dict)
    where = ["outside"]

    def pack(x: torch.Tensor):
        s = x.untyped_storage()
        if isinstance(x, torch.nn.Parameter) or _from_parameter(x):
            weights[where[0]][s.data_ptr()] = s.nbytes()
        else:
            producer = type(x.grad_fn).__name__ if x.grad_fn is not None else "-"
            seen[where[0]].setdefault(s.data_ptr(), (s.nbytes(), f"{tuple(x.shape)} {str(x.dtype)[6:]} {producer}"))
        return x

    def enter(name):
        def hook(module, inputs):
            where[0] = name
        return hook

    def leave(module, inputs, output):
        where[0] = "head"

    for name, block in model.layers.items():
        block.register_forward_pre_hook(enter(f"layer {name}"))
        block.register_forward_hook(leave)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.dtype == "bfloat16"):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    del loss, logits

    precision = ("bf16 autocast" if a == 2 else "fp32") + (", bf16 weights" if t.param_dtype == "bfloat16" else "")
    print(f"{cfg.model.name} width {cfg.model.hidden_size}, {ntok} tokens, {precision}, "
          f"attn {cfg.model.attn_impl}, experts {cfg.model.moe_impl}, fp8 MoE inputs {cfg.parallel.fp8_moe_inputs}")
    print(f"{'block':10s} {'measured MiB':>13s} {'planner MiB':>12s} {'error':>7s} {'weights MiB':>12s}")
    for name in [*(f"layer {i}" for i in model.layers), "head"]:
        got = sum(b for b, _ in seen[name].values())
        if name == "head":
            plan = head_activation_bytes(cfg.model, a) * ntok
        else:
            i = int(name.split()[1])
            plan = layer_activation_bytes(cfg.model, i >= cfg.model.first_k_dense_replace, t.seq_len, "none", a,
                                          fp8_moe_inputs=cfg.parallel.fp8_moe_inputs, residual_bytes=residual) * ntok
        w = sum(weights[name].values())
        print(f"{name:10s} {got / 2**20:13.1f} {plan / 2**20:12.1f} {plan / max(got, 1) - 1:+7.1%} {w / 2**20:12.1f}")
        for nbytes, what in sorted(seen[name].values(), reverse=True)[:14]:
            print(f"    {nbytes / 2**20:9.1f} MiB  {nbytes / ntok:9.1f} B/token  {what}")


if __name__ == "__main__":
    main()
