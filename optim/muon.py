"""Muon (for the matrices inside the transformer blocks) and AdamW (for everything else) in one optimizer.

The math is in pure functions on tensors (:func:`muon_momentum_`, :func:`muon_lr_scale`,
:func:`apply_muon_update_`, :func:`adamw_update_`); :class:`MuonClip` only does the bookkeeping
(state, batching same-shape matrices into one Newton-Schulz call, fp32 master copies). Which
parameter goes where is decided in :mod:`k2train.optim.grouping`; QK-Clip is
:func:`k2train.optim.qk_clip.apply_qk_clip`, called by the trainer after :meth:`MuonClip.step`.

Shapes: a Muon parameter is one matrix ``[out, in]`` or a stack of matrices ``[E, out, in]`` (the
experts of one MoE layer); each matrix of a stack is orthogonalised and RMS-matched on its own.
"""

import contextlib
import math
from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from k2train.kernels.adamw import adamw_corrections, adamw_fused_, fused_adamw_available, skippable
from k2train.kernels.adamw import adamw_reference_ as adamw_update_
from k2train.kernels.muon_fused import apply_update_, fused_muon_available, momentum_to_ns_input_

from .newton_schulz import NS_COEFFICIENTS, ns_input_target_norm, pow2_scale, zeropower_via_newtonschulz
from .sharded import is_dtensor, like_param, local, shard_like, sharded_newton_schulz, wrap_like

GROUP_KINDS = ("muon", "adamw")

# Newton-Schulz inputs of the same matrix shape are concatenated into batches; a batch is closed once
# it holds this many elements (bf16: 1 GiB) or one more matrix would pass it. Params are never split,
# so one expert stack can take a batch past it.
NS_BATCH_MAX_ELEMENTS = 1 << 29

NSFn = Callable[..., Tensor]


# ----------------------------------------------------------------------------------------------
# pure math
# ----------------------------------------------------------------------------------------------


def muon_momentum_(grad: Tensor, momentum_buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """Update ``momentum_buf`` in place and return the Newton-Schulz input.

    Written as torch.optim.Muon writes it: ``B <- mu B + (1 - mu) G`` and, with Nesterov,
    ``NS input = (1 - mu) G + mu B``. That is ``(1 - mu)`` times Moonlight's
    ``M <- mu M + G``, ``NS input = G + mu M``; Newton-Schulz divides by the Frobenius norm, so the
    positive factor cancels and the update is the same. We keep torch's form so that the result is
    bit-identical to torch.optim.Muon (the bf16 cast rounds ``0.05 x`` and ``x`` differently).
    """
    momentum_buf.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buf, momentum) if nesterov else momentum_buf


def muon_lr_scale(shape: torch.Size, rms_match: float) -> float:
    """``rms_match * sqrt(max(rows, cols))`` of one matrix: gives the orthogonalised update the
    RMS of a typical AdamW update (Moonlight), so AdamW's lr and weight decay carry over."""
    rows, cols = shape[-2], shape[-1]
    return rms_match * math.sqrt(max(rows, cols))


def apply_muon_update_(param: Tensor, ortho: Tensor, lr: float, weight_decay: float, lr_scale: float) -> None:
    """``W <- W (1 - lr wd) - lr lr_scale O`` (decoupled weight decay, torch.optim.Muon's op order)."""
    param.mul_(1 - lr * weight_decay)
    param.add_(ortho, alpha=-(lr * lr_scale))


def ns_input_cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in the Newton-Schulz dtype. For fp16 each matrix is first scaled, in fp32, by the power of
    two nearest to :func:`~k2train.optim.newton_schulz.ns_input_target_norm` / ``||x||_F`` (a raw
    momentum's entries would be subnormal or zero in fp16; a power of two rounds nothing), as the
    fused kernels (k2train.kernels.muon_fused) do. NS normalises its input. Other dtypes are a plain
    cast (bf16 keeps fp32's range; and torch.optim.Muon casts the same way)."""
    if dtype != torch.float16 or x.dtype == dtype:
        return x.to(dtype)
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    return (x.float() * pow2_scale(norm, ns_input_target_norm(*x.shape[-2:]))).to(dtype)


def ns_chunks(shapes: list[tuple[torch.Size, torch.device]]) -> list[tuple[tuple[int, int], list[int]]]:
    """How :func:`batched_newton_schulz` batches matrices: ``(wide shape (M, K), input indices)`` per
    Newton-Schulz call. Inputs ``[r, c]`` / ``[n, r, c]`` are bucketed by wide orientation and device,
    in input order, and each bucket is cut into chunks of about :data:`NS_BATCH_MAX_ELEMENTS` (whole
    params only)."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (shape, device) in enumerate(shapes):
        r, c = shape[-2:]
        buckets[((min(r, c), max(r, c)), device)].append(i)
    chunks = []
    for (wide, _), idx in buckets.items():
        per_matrix = wide[0] * wide[1]
        chunk: list[int] = []
        count = 0
        for j, i in enumerate(idx):
            chunk.append(i)
            count += math.prod(shapes[i][0]) // per_matrix
            if j + 1 == len(idx) or (count + 1) * per_matrix > NS_BATCH_MAX_ELEMENTS:
                chunks.append((wide, chunk))
                chunk, count = [], 0
    return chunks


def batched_newton_schulz(inputs: list[Tensor], ns_fn: NSFn, **ns_kwargs) -> list[Tensor]:
    """Orthogonalise every matrix of ``inputs`` (each ``[r, c]`` or ``[n, r, c]``) with as few
    ``ns_fn`` calls as possible. Matrices are bucketed by their wide orientation (a tall ``[c, r]``
    joins the ``[r, c]`` bucket transposed, as NS would transpose it anyway) and each bucket is
    concatenated into one batch of at most :data:`NS_BATCH_MAX_ELEMENTS`. Returns the results in
    input order and shapes.

    Inputs may be DTensors (tensor-parallel params): one sharded on a matrix dim is orthogonalised
    as the WHOLE matrix (gathered over its mesh, NS on every rank, each keeps its shard; see
    :func:`k2train.optim.sharded.sharded_newton_schulz`); its result is a DTensor placed alike.
    """
    if any(is_dtensor(x) for x in inputs):
        plain_ns = lambda xs, **kw: batched_newton_schulz(xs, ns_fn, **kw)  # noqa: E731
        return sharded_newton_schulz(inputs, plain_ns, NS_BATCH_MAX_ELEMENTS, **ns_kwargs)
    out: list[Optional[Tensor]] = [None] * len(inputs)
    for shape, chunk in ns_chunks([(x.shape, x.device) for x in inputs]):
        if len(chunk) == 1 and inputs[chunk[0]].shape[-2] <= inputs[chunk[0]].shape[-1]:
            i = chunk[0]
            out[i] = ns_fn(ns_input_cast(inputs[i], ns_kwargs.get("dtype", inputs[i].dtype)), **ns_kwargs)
            continue
        # A tall matrix takes this path even alone: NS of a contiguous transposed copy can differ in
        # the last bit from NS of the transposed view, and a matrix must give the same result alone
        # (ZeRO-1 owner, TP gather) as in a batch. Cast before concatenating: the batch copy is then
        # bf16, not fp32.
        per_matrix = shape[0] * shape[1]
        cast = [ns_input_cast(inputs[k], ns_kwargs.get("dtype", inputs[k].dtype)) for k in chunk]
        wide = [x if x.shape[-2] <= x.shape[-1] else x.mT for x in cast]
        result = ns_fn(torch.cat([w.reshape(-1, *shape) for w in wide]), **ns_kwargs)
        start = 0
        for k, w in zip(chunk, wide):
            n = w.numel() // per_matrix
            o = result[start : start + n].reshape(w.shape)
            out[k] = o if o.shape == inputs[k].shape else o.mT
            start += n
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------------


class MuonClip(torch.optim.Optimizer):
    """Muon for the param groups with ``kind="muon"``, AdamW for those with ``kind="adamw"``.

    Use :func:`k2train.optim.build_optimizer` rather than building the groups by hand. Per-group
    keys (defaults from the constructor): ``lr``, ``weight_decay``; Muon: ``momentum``,
    ``nesterov``, ``ns_steps``, ``ns_coefficients``, ``rms_match``; AdamW: ``betas``, ``eps``.
    An optional ``names`` list (parameter FQNs, same order as ``params``) is used in messages.

    Parameters stored in a low precision (bf16) get an fp32 master copy in the optimizer state
    (``state[p]["master"]``); the update runs on it and is copied back. :meth:`master_weight`
    returns it, so that QK-Clip can scale the master too.

    ``ns_fn`` replaces the Newton-Schulz function (e.g. the Triton kernel); it must accept
    ``(G, steps=, coefficients=, dtype=)`` for 3-D batches.

    :meth:`step` takes an optional ``skip``, a bool scalar on the device (the trainer's "this step's
    loss or gradient norm is not finite"): where it is set the step changes nothing (weights, masters,
    moments, momentum buffers and AdamW's step counts keep every bit), and it is never read on the
    host, so deciding a step costs no sync. AdamW's step counts live on the params' device for that.

    ``fused``: the Muon elementwise passes (k2train.kernels.muon_fused) and the AdamW step
    (k2train.kernels.adamw) as Triton kernels. None
    (default): on CUDA when NS runs in half precision and every Muon param is a plain contiguous
    tensor; True: also on CPU under TRITON_INTERPRET=1 (tests); False: never. The unfused path is
    the one that is bit-identical to torch.optim.Muon.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_dtype: torch.dtype = torch.bfloat16,
        rms_match: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_fn: Optional[NSFn] = None,
        fused: Optional[bool] = None,
    ):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr} and weight_decay={weight_decay} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum} must be in [0, 1)")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            rms_match=rms_match,
            betas=tuple(betas),
            eps=eps,
        )
        super().__init__(list(params), defaults)
        self.ns_dtype = ns_dtype
        self.ns_fn = ns_fn or zeropower_via_newtonschulz
        self.fused = fused
        self._ns_scale_hints: dict[Tensor, Tensor] = {}  # fused path: per param, [matrices] powers of two
        for g in self.param_groups:
            kind = g.get("kind")
            if kind not in GROUP_KINDS:
                raise ValueError(f"param group kind={kind!r} must be one of {GROUP_KINDS}")
            names = g.setdefault("names", [f"param{i}" for i in range(len(g["params"]))])
            if kind == "muon":
                for name, p in zip(names, g["params"]):
                    if p.ndim not in (2, 3):
                        raise ValueError(
                            f"{name} has shape {tuple(p.shape)}: Muon takes matrices [out, in] or stacks "
                            "[E, out, in]; put it in an AdamW group"
                        )

    # -- hooks for the distributed subclass ---------------------------------------------------

    def _owns(self, p: Tensor) -> bool:
        """Whether this process keeps the state of ``p`` and computes its update (ZeRO-1)."""
        return True

    def _after_update(self) -> None:
        """Called at the end of :meth:`step` (the ZeRO-1 subclass broadcasts the updated params)."""

    # -- state -------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to the param's dtype; our state of a bf16 param is fp32 on purpose
        # (master copy, moments), so put the fp32 tensors back after torch's load. State saved as
        # full tensors (full_state_dict) of a DTensor param is cut back to this rank's shard.
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            for key, value in saved.items():
                if key == "step" or not torch.is_tensor(value) or not value.is_floating_point():
                    continue
                if p.dtype in (torch.bfloat16, torch.float16):
                    value = value.to(device=p.device, dtype=torch.float32, copy=True)
                    self.state[p][key] = value
                if is_dtensor(p) and not is_dtensor(self.state[p][key]):
                    self.state[p][key] = shard_like(self.state[p][key], p)

    def master_weight(self, p: Tensor) -> Optional[Tensor]:
        """The fp32 master copy of ``p`` held here, or None (fp32 param, or state not on this rank)."""
        state = self.state.get(p)
        return None if not state else state.get("master")

    def _target(self, p: Tensor) -> Tensor:
        """The tensor the update is applied to: the fp32 master if the param is low precision."""
        state = self.state[p]
        if "master" not in state and p.dtype in (torch.bfloat16, torch.float16):
            state["master"] = p.detach().float()  # a DTensor param gets a DTensor master (same shards)
        return state.get("master", p)

    # -- step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, *, skip: Optional[Tensor] = None):
        """One update of every param with a gradient; with ``skip`` (bool scalar on the params'
        device) set, none."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if skip is not None and (skip.dtype != torch.bool or skip.numel() != 1):
            raise ValueError(f"skip must be a bool scalar tensor, got {skip.dtype} of shape {tuple(skip.shape)}")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and self._owns(p)]
            if not params:
                continue
            if group["kind"] == "muon":
                self._muon_group(group, params, skip)
            else:
                self._adamw_group(group, params, skip)
        self._after_update()
        return loss

    def _use_fused(self, params: list[Tensor], targets: list[Tensor]) -> bool:
        """The fused elementwise kernels (k2train.kernels.muon_fused) serve plain contiguous CUDA
        tensors with a half-precision NS; ``fused=True`` also asks for them on CPU (interpreter)."""
        if self.fused is False or self.ns_dtype not in (torch.float16, torch.bfloat16):
            return False
        for p, w in zip(params, targets):
            if is_dtensor(p) or not (p.is_contiguous() and p.grad.is_contiguous() and w.is_contiguous()):
                return False
            if w.dtype != torch.float32 or not fused_muon_available(p) or (p.device.type != "cuda" and not self.fused):
                return False
        return True

    def _muon_group_fused(self, group: dict, params: list[Tensor], targets: list[Tensor], skip: Optional[Tensor]) -> None:
        # Same math as the unfused path: momentum, Nesterov and the scaled half cast go straight into
        # each NS batch (one kernel pair per param), the update is one pass per param.
        for (M, K), chunk in ns_chunks([(p.shape, p.device) for p in params]):
            counts = [params[i].numel() // (M * K) for i in chunk]
            batch = torch.empty(sum(counts), M, K, device=params[chunk[0]].device, dtype=self.ns_dtype)
            start = 0
            for i, n in zip(chunk, counts):
                p = params[i]
                v = batch[start : start + n]
                start += n
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(targets[i])
                ns_in = (v if p.shape[-2] <= p.shape[-1] else v.mT).reshape(p.shape)
                # each matrix's NS-input scale (a power of two) of the last step: a prediction that
                # saves a pass when right, not optimizer state (the result does not depend on it)
                hint = self._ns_scale_hints.get(p)
                if hint is None:
                    hint = self._ns_scale_hints[p] = torch.zeros(n, device=p.device, dtype=torch.float32)
                momentum_to_ns_input_(p.grad, state["momentum_buffer"], ns_in, group["momentum"], group["nesterov"],
                                      scale_hint=hint, skip=skip)
            result = self.ns_fn(batch, steps=group["ns_steps"], coefficients=group["ns_coefficients"], dtype=self.ns_dtype)
            start = 0
            for i, n in zip(chunk, counts):
                p, w = params[i], targets[i]
                r = result[start : start + n]
                start += n
                o = (r if p.shape[-2] <= p.shape[-1] else r.mT).reshape(p.shape)
                scale = muon_lr_scale(p.shape, group["rms_match"])
                apply_update_(w, o, group["lr"], group["weight_decay"], scale, param=p if w is not p else None,
                              skip=skip)
            # let this batch and its result go before the next batch is allocated: kept to the end
            # of the next Newton-Schulz call, the result was a fourth batch-sized buffer at the peak
            del batch, result, r, o

    def _muon_group(self, group: dict, params: list[Tensor], skip: Optional[Tensor]) -> None:
        # Elementwise math on local shards; batched_newton_schulz gathers tp-sharded matrices whole.
        targets = [self._target(p) for p in params]
        if self._use_fused(params, targets):
            return self._muon_group_fused(group, params, targets, skip)
        ns_inputs = []
        for p, w in zip(params, targets):
            state = self.state[p]
            grad = local(like_param(p.grad, p)).to(w.dtype)
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(w)
            buf = local(state["momentum_buffer"])
            with skippable(skip, buf):  # a skipped step's NS input is computed, its update not applied
                ns_in = muon_momentum_(grad, buf, group["momentum"], group["nesterov"])
            ns_inputs.append(wrap_like(ns_in, p))
        orthos = batched_newton_schulz(
            ns_inputs,
            self.ns_fn,
            steps=group["ns_steps"],
            coefficients=group["ns_coefficients"],
            dtype=self.ns_dtype,
        )
        for p, w, o in zip(params, targets, orthos):
            # p.shape is the global shape for a DTensor: the RMS match is the whole matrix's.
            scale = muon_lr_scale(p.shape, group["rms_match"])
            with skippable(skip, *((local(w),) if w is p else (local(w), local(p)))):
                apply_muon_update_(local(w), local(o), group["lr"], group["weight_decay"], scale)
                if w is not p:
                    local(p).copy_(local(w))

    def _adamw_group(self, group: dict, params: list[Tensor], skip: Optional[Tensor]) -> None:
        # The step counts stay on the device, one per param as torch keeps them (a checkpoint's may
        # come back on the CPU), and advance unless skipped; their bias corrections are computed
        # for all params at once, there too.
        targets = [self._target(p) for p in params]
        for p, w in zip(params, targets):
            state, device = self.state[p], local(w).device
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(w)
                state["exp_avg_sq"] = torch.zeros_like(w)
            elif state["step"].device != device:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
        steps = [self.state[p]["step"] for p in params]
        if skip is None:
            torch._foreach_add_(steps, 1.0)
        else:  # the tensor-list form, as torch's fused Adam subtracts its found_inf
            torch._foreach_add_(steps, [(~skip).float()] * len(steps))
        corrections = adamw_corrections(torch.stack(steps), group["lr"], group["betas"])
        for p, w, corr in zip(params, targets, corrections):
            state = self.state[p]
            args = (corr, group["lr"], group["betas"], group["eps"], group["weight_decay"])
            if self._use_fused_adamw(p, w):  # one pass, the bf16 param written from the master in it
                adamw_fused_(w, p.grad, state["exp_avg"], state["exp_avg_sq"], *args,
                             param=p if w is not p else None, skip=skip)
                continue
            with skippable(skip, local(p)) if w is not p else contextlib.nullcontext():
                adamw_update_(local(w), local(like_param(p.grad, p)).to(w.dtype), local(state["exp_avg"]),
                              local(state["exp_avg_sq"]), *args, skip=skip)
                if w is not p:
                    local(p).copy_(local(w))

    def _use_fused_adamw(self, p: Tensor, w: Tensor) -> bool:
        """The one-pass AdamW kernel (k2train.kernels.adamw) serves plain contiguous tensors with an
        fp32 target, on CUDA (``fused`` None or True) and on CPU under the interpreter (``fused=True``)."""
        if self.fused is False or is_dtensor(p) or w.dtype != torch.float32 or not fused_adamw_available(p):
            return False
        if not (p.is_contiguous() and p.grad.is_contiguous() and w.is_contiguous()) or p.grad.shape != p.shape:
            return False
        return p.device.type == "cuda" or bool(self.fused)
