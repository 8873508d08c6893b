"""bf16 weights with fp32 gradients (``trainer.param_dtype=bfloat16``), applied from outside the model.

Under ``trainer.dtype=bfloat16`` alone the weights stay fp32 and autocast makes a bf16 copy of each
one for its matmuls, and the routed experts cast their stacks, every micro-batch (or, through
autocast's cache, every step): memory traffic that grows with the parameter count, not the tokens.
Stored in bf16 (as Megatron's ``--bf16`` and Kimi K2 keep them), the weights need no cast; what
must not lose precision lives elsewhere:

- **gradients** are fp32 and accumulate over the micro-batches in fp32: a post-accumulate hook
  takes each micro-batch's bf16 gradient off ``.grad`` as soon as autograd leaves it there and adds
  it into the parameter's fp32 ``main_grad`` in one pass (k2train.kernels.grad_accumulate: autograd's
  own mixed-dtype ``+=`` is the slow elementwise path); after the step's last backward,
  :func:`publish_fp32_grads_` makes each ``main_grad`` the parameter's ``.grad`` (a parameter takes
  a gradient of any dtype: ``Tensor.grad_dtype = None``, torch >= 2.10);
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

from k2train.kernels.grad_accumulate import accumulate_
from k2train.optim.sharded import local


def _into_main_grad(p: torch.Tensor) -> None:
    # a post-accumulate hook: autograd just left this backward's bf16 gradient on .grad (.grad was
    # None); it goes into the fp32 sum and .grad is None again for the next micro-batch
    g = p.grad
    if g is None:
        return
    if p.main_grad is None:  # the step's first: cast in the same one-pass kernel (torch's cast is slow too)
        p.main_grad = torch.empty_like(g, dtype=torch.float32)
        accumulate_(local(p.main_grad), local(g), add=False)
    else:
        accumulate_(local(p.main_grad), local(g))
    p.grad = None


def _fp32_grads(p: nn.Parameter) -> None:
    p.grad_dtype = None  # an fp32 .grad on a bf16 parameter
    p.main_grad = None
    p.register_post_accumulate_grad_hook(_into_main_grad)


def publish_fp32_grads_(model_parts: Iterable[nn.Module]) -> None:
    """After the step's last backward: each bf16 parameter's fp32 gradient sum (``main_grad``)
    becomes its ``.grad``, which the gradient reduction, clipping and the optimizer read, and the
    next step's sums start from nothing. A no-op for parameters :func:`bf16_params_` did not convert."""
    for part in model_parts:
        for p in part.parameters():
            main = getattr(p, "main_grad", None)
            if main is not None:
                p.grad, p.main_grad = main, None


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
