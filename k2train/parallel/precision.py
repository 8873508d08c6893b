"""bf16 weights with fp32 gradients (``trainer.param_dtype=bfloat16``), applied from outside the model.

Under ``trainer.dtype=bfloat16`` alone the weights stay fp32 and autocast makes a bf16 copy of each
one for its matmuls, and the routed experts cast their stacks, every micro-batch (or, through
autocast's cache, every step): memory traffic that grows with the parameter count, not the tokens.
Stored in bf16 (as Megatron's ``--bf16`` and Kimi K2 keep them), the weights need no cast; what
must not lose precision lives elsewhere:

- **gradients** are fp32 and accumulate over the micro-batches in fp32: each parameter accepts a
  gradient of any dtype (``Tensor.grad_dtype = None``, torch >= 2.10), and a hook turns the first
  bf16 gradient of a step into an fp32 ``.grad``; autograd then adds each later micro-batch's bf16
  gradient into it in place (one pass, no separate cast);
- **master weights** are fp32 in the optimizer (``MuonClip`` keeps one for every low-precision
  parameter it updates, ZeRO-1-sharded with the rest of its state; QK-Clip scales both);
- autocast stays on, so the ops it runs in fp32 (softmax, the loss, norms' statistics) still do.

The residual stream is then bf16 (the embedding's output), as in Megatron and the planner's
``bf16`` precision. Buffers (RoPE tables, the routers' bias) keep their dtype.
"""

from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _fp32_grad(p: torch.Tensor) -> None:
    # a post-accumulate hook: the step's first gradient arrives in bf16 and becomes fp32; the next
    # ones are added into that fp32 tensor by autograd itself (the hook then finds fp32)
    if p.grad is not None and p.grad.dtype != torch.float32:
        p.grad = p.grad.float()


def _fp32_grads(p: nn.Parameter) -> None:
    p.grad_dtype = None  # an fp32 .grad on a bf16 parameter
    p.register_post_accumulate_grad_hook(_fp32_grad)


def bf16_params_(model_parts: Iterable[nn.Module]) -> int:
    """Store every floating-point parameter of ``model_parts`` in bf16 with fp32 gradients (module
    docstring): plain tensors in place (the same Parameter objects), tensor-parallel DTensors as new
    Parameters over bf16 shards. Call after the weights are initialized or loaded and before
    anything holds the parameters (the optimizer, whose fp32 masters are made from these weights).
    Returns the number of parameters converted."""
    if not hasattr(torch.Tensor, "grad_dtype"):
        raise RuntimeError(f"trainer.param_dtype=bfloat16 needs torch >= 2.10 (Tensor.grad_dtype); this is "
                           f"{torch.__version__}: use trainer.param_dtype=float32")
    n = 0
    replaced: dict[int, nn.Parameter] = {}  # a tensor-parallel weight shared by two modules stays shared
    for part in model_parts:
        for module in part.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.is_floating_point() or p.dtype == torch.bfloat16:
                    continue
                if p.grad is not None:
                    raise ValueError("bf16_params_ runs before the first backward (a parameter already has a gradient)")
                if isinstance(p, DTensor):
                    # assigning .data to a DTensor changes its dtype but not its shards': a new
                    # Parameter over bf16 shards (nothing holds the old one yet: no optimizer)
                    if id(p) not in replaced:
                        replaced[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
                        _fp32_grads(replaced[id(p)])
                        n += 1
                    module._parameters[name] = replaced[id(p)]
                    continue
                p.data = p.data.to(torch.bfloat16)
                _fp32_grads(p)
                n += 1
    return n
