"""The next-token loss of one micro-batch, in every layout.

    loss = sum of cross entropy over the labelled tokens / number of labelled tokens

Labels equal to IGNORE_INDEX add nothing. Under context parallelism a rank holds a part of each
sequence: it returns its part's sum divided by the whole sequence's count (all-reduced over the cp
group), so that the parts add up to the sequence's mean and their gradients, summed over cp, to its
gradient. Under tensor parallelism the logits are vocabulary shards and the cross entropy runs
under ``loss_parallel`` (the caller's ``loss_context``).

``chunk_tokens`` (``trainer.loss_chunk_tokens``): the LM head and the cross entropy run on chunks
of that many tokens of the final hidden states, each recomputed in the backward, so the logits of
the whole sequence (163,840 per token: 21.5 GB in fp32 at 32K tokens) never exist at once; the
loss and the gradients are those of the whole-sequence computation. The model then returns hidden
states (``K2Model.forward(..., head=False)``) and this loss owns the head.
"""

from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kernels.cross_entropy import cross_entropy
from .parallel.recompute import uncached_autocast
from .parallel.tensor_parallel import local_loss

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """Sum of the cross entropy over the labelled tokens, fp32, as a plain tensor. ``impl="torch"``:
    torch's (vocab-parallel under ``loss_parallel``; under bf16 autocast on CUDA its log-softmax is
    bf16); ``"triton"``: the fused kernel (fp32 math from the logits as they are; whole rows)."""
    if impl == "triton":
        return cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1), IGNORE_INDEX).sum()
    return local_loss(F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1), ignore_index=IGNORE_INDEX,
                                      reduction="sum"))


def _head_chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, impl: str) -> torch.Tensor:
    return cross_entropy_sum(F.linear(hidden, weight), labels, impl)


def _chunk_contexts():
    return nullcontext(), uncached_autocast()  # the forward's cast is cached; the backward's goes with its chunk


class NextTokenLoss:
    """``loss(output, labels)`` of one micro-batch: ``output`` is the logits ``[B, S, V]``, or,
    with ``chunk_tokens``, the final hidden states ``[B, S, D]`` (set :attr:`head` to the model's
    LM head first). ``cp_group``: the context-parallel group (None without cp); ``impl``: the cross
    entropy's (``model.loss_impl``: ``torch`` or the fused ``triton`` kernel)."""

    def __init__(self, chunk_tokens: int = 0, cp_group=None, impl: str = "torch"):
        if impl not in ("torch", "triton"):
            raise ValueError(f"NextTokenLoss: impl={impl!r} must be 'torch' or 'triton' (model.loss_impl)")
        self.chunk_tokens = chunk_tokens
        self.cp_group = cp_group
        self.impl = impl
        self.head: Optional[nn.Linear] = None

    def __call__(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        count = (labels != IGNORE_INDEX).sum()
        if self.cp_group is not None:
            dist.all_reduce(count, group=self.cp_group)
        return self.sum(output, labels) / count.clamp_min(1)

    def sum(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.chunk_tokens:
            return cross_entropy_sum(output, labels, self.impl)
        if self.head is None:
            raise RuntimeError("NextTokenLoss with chunk_tokens needs its head (the model's lm_head)")
        B, S, _ = output.shape
        step = max(1, self.chunk_tokens // B)  # chunks cut the sequence; every chunk holds B x step tokens
        total = output.new_zeros((), dtype=torch.float32)
        for start in range(0, S, step):
            end = min(start + step, S)
            total = total + checkpoint(_head_chunk_loss, output[:, start:end], self.head.weight, labels[:, start:end],
                                       self.impl, use_reentrant=False, context_fn=_chunk_contexts)
        return total
