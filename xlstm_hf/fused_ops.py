"""The fused logits + loss of the language-model head: fewer passes through memory than autograd over the same ops.

`LogitsLossFunction` computes the (soft-capped) logits of the head's output and their cross-entropy in one autograd
function, the arithmetic of transformers' `ForCausalLMLoss` in float32: one or two new logits-sized tensors per training
step where autograd makes six or more (`config.fuse_cross_entropy`). It equals autograd through the written-out
formula (tests/test_fused_ops.py).
"""

from __future__ import annotations

import math

import torch

# exp(x) is computed as exp2(x log2(e)) where a full-size tensor goes through it: torch.exp is several times slower
# than torch.exp2 on x86 CPUs, more so where its result is subnormal
_LOG2E = math.log2(math.e)


def _soft_cap(x: torch.Tensor, cap: float, fresh: bool = False) -> torch.Tensor:
    """cap * tanh(x / cap) in float32 as cap * (2 sigmoid(2 x / cap) - 1), which CPUs compute several times faster
    than torch.tanh; the absolute error stays below 4 * cap * 2^-24. With `fresh`, a float32 x is overwritten."""
    y = x.mul_(2.0 / cap) if fresh and x.dtype == torch.float32 else x.float() * (2.0 / cap)
    return y.sigmoid_().mul_(2.0 * cap).sub_(cap)


def _soft_cap_backward(dy: torch.Tensor, y: torch.Tensor, cap: float, into: torch.Tensor | None = None) -> torch.Tensor:
    """dy * d/dx cap * tanh(x / cap) = dy * (1 - (y / cap)^2) from the float32 output y, as tanh's backward of y / cap
    (two passes where the slope written out takes four), written into `into` if given."""
    t = y * (1.0 / cap)
    if into is None:
        return torch.ops.aten.tanh_backward(dy, t)
    return torch.ops.aten.tanh_backward.grad_input(dy, t, grad_input=into)


def _row_blocks(x: torch.Tensor) -> list[slice]:
    """The row blocks that the logits functions walk over x [N, V]: about 2 MB of float32 on a CPU, which stay in
    cache between the passes over a block; about 64 MB on an accelerator, which bounds the float32 temporaries of a
    large vocabulary (at the 7B shape, 256 MB blocks raised the training step's peak by ~0.9 GB,
    scripts/memory_gpu_estimate.py)."""
    N, V = x.shape
    rows = max(16, (1 << 19) // V) if x.device.type == "cpu" else max(1, (1 << 24) // V)
    return [slice(start, start + rows) for start in range(0, N, rows)]


class LogitsLossFunction(torch.autograd.Function):
    """The logits y = cap * tanh(z / cap) (y = z without a cap) of the lm_head output z [..., V] (N positions) and
    their cross-entropy against targets [N] (`ignore_index` ignored), averaged over the counted targets or, with
    `divisor`, summed and divided by it: ``transformers.loss_utils.ForCausalLMLoss`` of the soft-capped logits, with
    the same float32 arithmetic over logits in z's dtype. Returns y in z's shape and dtype (z itself, written in place,
    when it is float32 or there is no cap; never a view, which FSDP2 would warn about) and the float32 loss.

    Saves y (or, capped in a lower precision, z, from which the backward recomputes the cap's derivative as the
    soft cap does, not from the rounded y) and the rows' log-sum-exp [N]. Autograd through the soft cap, the upcast,
    log_softmax and nll_loss makes six or more new [N, V] tensors per training step; this makes one or two, and both
    passes walk the rows in blocks that stay in cache (`_row_blocks`)."""

    @staticmethod
    def forward(ctx, z, targets, cap, ignore_index, divisor):
        valid = targets != ignore_index  # [N]
        picked = torch.where(valid, targets, 0)
        in_place = cap is None or z.dtype == torch.float32  # y written over z's values, in z itself or a copy
        # an autograd function cannot write into a view and return two tensors: a view z (or a strided one) is copied
        # (the model's z never is)
        copied = in_place and (z._base is not None or not z.is_contiguous())
        if in_place:
            y = z.clone(memory_format=torch.contiguous_format) if copied else z
        else:
            y = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        y2 = y.view(-1, z.shape[-1])  # [N, V]
        src = y2 if in_place else z.reshape(y2.shape)  # what the soft cap reads
        lse = torch.empty(y2.shape[0], device=z.device, dtype=torch.float32)
        # capped logits are at most cap: their exponentials sum to a finite float32 without subtracting the row max
        bounded = cap is not None and cap + math.log(y2.shape[1]) < 80.0
        for rows in _row_blocks(y2):
            if cap is not None:
                capped = _soft_cap(src[rows], cap, fresh=in_place)  # float32; y's rows themselves when in place
                if not in_place:
                    y2[rows] = capped
            logits = y2[rows].float()  # as returned
            if bounded:
                torch.log(torch.mul(logits, _LOG2E).exp2_().sum(-1), out=lse[rows])
            else:
                torch.logsumexp(logits, -1, out=lse[rows])
        total = (lse - y2.gather(1, picked[:, None]).squeeze(1).float()).masked_fill_(~valid, 0.0).sum()
        divisor = valid.sum() if divisor is None else divisor
        if in_place and not copied:
            ctx.mark_dirty(z)
        ctx.set_materialize_grads(False)  # an unused logits output gets no [N, V] of zeros
        ctx.save_for_backward(y if in_place else z, lse, picked, valid)
        ctx.cap, ctx.divisor, ctx.in_place = cap, divisor, in_place
        return y, total / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogits, dloss):
        saved, lse, picked, valid = ctx.saved_tensors
        cap = ctx.cap
        grad_out = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
        saved, grad = saved.reshape(-1, saved.shape[-1]), grad_out.view(-1, saved.shape[-1])  # [N, V]
        dlogits = None if dlogits is None else dlogits.reshape(grad.shape)
        weight = torch.zeros_like(lse) if dloss is None else valid * (dloss.float() / ctx.divisor)  # [N]
        upcast = saved.dtype != torch.float32  # then g is a float32 block, else a view into grad
        shift = lse * -_LOG2E  # softmax = exp2(y log2(e) - lse log2(e))
        for rows in _row_blocks(saved):
            if ctx.in_place:
                y32 = y = saved[rows].float()  # a view of the saved logits in float32
            else:
                y32 = _soft_cap(saved[rows], cap)  # [R, V] float32, as the soft cap computes it
                y = y32.to(saved.dtype).float()  # the logits as returned
            g = torch.empty_like(y) if upcast else grad[rows]
            softmax = torch.add(shift[rows, None], y, alpha=_LOG2E, out=g).exp2_()
            softmax.mul_(weight[rows, None])
            g.scatter_add_(1, picked[rows, None], -weight[rows, None])
            if dlogits is not None:
                g.add_(dlogits[rows])
            if cap is not None:
                _soft_cap_backward(g, y32, cap, into=g)
            if upcast:
                grad[rows] = g
        return grad_out, None, None, None, None
