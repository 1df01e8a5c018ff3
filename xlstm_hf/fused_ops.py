"""Autograd functions and elementwise helpers that make fewer passes through memory than autograd over the same ops.

On a CPU an elementwise op over an activation larger than the cache runs at memory speed, and a freshly allocated
activation costs the first touch of its pages, so what counts is how many full-size tensors a layer writes and reads:
  - without autograd, results are written into activations just made (`fresh_mul`, `fresh_add`, the in-place
    activations, `soft_cap(fresh=True)`);
  - with autograd, the soft cap, RMSNorm and the gated feed-forward save less and make fewer new tensors than autograd
    through their ops would.
Float32 matrix products of many rows on an x86 CPU go through oneDNN (`cpu_linear`, `cpu_matmul`).
Every function here equals autograd through the written-out formula (tests/test_fused_ops.py).
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F

# torch.exp runs 2.7x slower than torch.exp2 on a CPU (2 threads, AMD EPYC), and up to 30x slower where its
# result is subnormal; exp(x) is computed as exp2(x log2(e)) where a full-size tensor goes through it
_LOG2E = math.log2(math.e)


# Float32 matrix products of many rows on an x86 CPU run through oneDNN (the library behind PyTorch's bfloat16 CPU
# matmuls) instead of MKL's sgemm, which aten's float32 mm calls: the same float32 arithmetic in another summation
# order. x W^T and dy W: 1.10 - 1.23x faster on 2 AMD EPYC threads at 2048 rows (hidden 256 - 4096); the weight
# gradient dy^T x stays with MKL, which is faster there. Train step of the CPU benchmark model, in-process A/B: 320.6
# against 333.1 ms.
_ONEDNN = (
    torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
_ONEDNN_MIN_ROWS = 256  # below this the two libraries are within 5%


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T runs through oneDNN: float32 on a CPU, at least 256 rows, not under autocast (which casts
    F.linear's inputs) and not inside torch.compile (which chooses its own kernels)."""
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() >= _ONEDNN_MIN_ROWS * x.shape[-1]
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not functorch_active()
    )


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running. The autograd functions of this package
    define no setup_context, which those transforms need, so the model then runs the plain autograd formulas."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, add: torch.Tensor | None = None
) -> torch.Tensor:
    """x weight^T (+ bias) (+ add) by oneDNN's matmul, without autograd. The product runs over x's rows [N, K] and its
    result takes x's leading dims by an untracked view, as aten's matmul does: oneDNN's op would return a view of it,
    and a view cannot be written in place by an autograd function (the logits loss) nor returned by a module under
    FSDP2 without its warning."""
    x2 = x.reshape(-1, x.shape[-1])
    if add is None:
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    else:
        y = torch.ops.mkldnn._linear_pointwise.binary(x2, add.reshape(-1, add.shape[-1]), weight, bias, "add")
    return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))


class LinearFunction(torch.autograd.Function):
    """F.linear with the forward and dL/dx through oneDNN and dL/dW through MKL (see `_ONEDNN`). Its backward is
    differentiable: under create_graph it runs plain, differentiable products."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])  # [N, out]
        dx = cpu_matmul(dy, weight) if needs[0] else None
        dweight = dy2.t() @ x.reshape(-1, x.shape[-1]) if needs[1] else None
        dbias = dy2.sum(0) if ctx.has_bias and needs[2] else None
        return dx, dweight, dbias


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where `_use_onednn` (with autograd through `LinearFunction`)."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return LinearFunction.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias)


def cpu_matmul(a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ add) for b [K, N], through oneDNN where `_use_onednn` and no gradient is taken of it (a backward's
    dL/dx = dy W); else plain, differentiable ops."""
    if not _use_onednn(a, b) or _needs_grad(a, b, add):
        return a @ b if add is None else torch.addmm(add, a, b)
    return _onednn_linear(a, b.t(), add=add)


def _writable(fresh: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether an elementwise op of `fresh` (an activation just made here, held by nobody else) with `other` (which
    broadcasts to its shape) may be written into `fresh`: autograd is off and the result keeps fresh's dtype. On a CPU a
    new activation costs the first touch of its pages: writing into the fresh one takes the forward at T = 2048 of the
    benchmark model from 259 to 242 ms for the feed-forward's product alone."""
    return not torch.is_grad_enabled() and torch.promote_types(fresh.dtype, other.dtype) == fresh.dtype


def fresh_mul(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh * other, in place when `_writable`."""
    return fresh.mul_(other) if _writable(fresh, other) else fresh * other


def fresh_add(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, in place when `_writable`."""
    return fresh.add_(other) if _writable(fresh, other) else fresh + other


def _soft_cap(x: torch.Tensor, cap: float, fresh: bool = False) -> torch.Tensor:
    """cap * tanh(x / cap) in float32 as cap * (2 sigmoid(2 x / cap) - 1): torch.tanh costs 2.6 ms on 2M floats with
    2 CPU threads against 0.4 ms for torch.sigmoid; the absolute error stays below 4 * cap * 2^-24. With `fresh`, a
    float32 x is overwritten."""
    y = x.mul_(2.0 / cap) if fresh and x.dtype == torch.float32 else x.float() * (2.0 / cap)
    return y.sigmoid_().mul_(2.0 * cap).sub_(cap)


def _soft_cap_backward(dy: torch.Tensor, y: torch.Tensor, cap: float, into: torch.Tensor | None = None) -> torch.Tensor:
    """dy * d/dx cap * tanh(x / cap) = dy * (1 - (y / cap)^2) from the float32 output y, as tanh's backward of y / cap
    (two passes where the slope written out takes four), written into `into` if given."""
    t = y * (1.0 / cap)
    if into is None:
        return torch.ops.aten.tanh_backward(dy, t)
    return torch.ops.aten.tanh_backward.grad_input(dy, t, grad_input=into)


class SoftCapFunction(torch.autograd.Function):
    """y = cap * tanh(x / cap) with dy/dx = 1 - (y / cap)^2 from the saved output: one saved tensor and one new
    tensor backward, where autograd keeps x / cap and tanh and makes three."""

    @staticmethod
    def forward(ctx, x, cap):
        y = _soft_cap(x, cap)
        ctx.save_for_backward(y)
        ctx.cap = cap
        return y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _soft_cap_backward(dy.float(), y, ctx.cap).to(dy.dtype), None


def soft_cap(x: torch.Tensor, cap: float | None, fresh: bool = False) -> torch.Tensor:
    """cap * tanh(x / cap), computed in float32 and cast back; identity when cap is None. `fresh`: x was just made
    here and may be overwritten when autograd is off."""
    if cap is None:
        return x
    if functorch_active():
        return (cap * torch.tanh(x.float() / cap)).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return SoftCapFunction.apply(x, cap)
    return _soft_cap(x, cap, fresh and not torch.is_grad_enabled()).to(x.dtype)


def _row_blocks(x: torch.Tensor) -> list[slice]:
    """The row blocks that the logits functions walk over x [N, V]: about 2 MB of float32 on a CPU, where a full-size
    temporary costs the first touch of its pages and each pass over it runs at memory speed, not cache speed (the
    loss of the CPU benchmark model took 4.9 - 5.6 ms per train step with 2 MB blocks, 5.6 - 7.0 with 512 KB and
    6.1 - 6.5 with 4 - 8 MB: smaller blocks make more ops, each with its own fixed cost); about 256 MB on an
    accelerator, which bounds the temporaries of a large vocabulary at a few launches more."""
    N, V = x.shape
    rows = max(16, (1 << 19) // V) if x.device.type == "cpu" else max(1, (1 << 26) // V)
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


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim with float32 statistics: y in x's dtype and 1 / rms [..., 1] in float32; without a
    weight, x / rms(x). Written out: F.rms_norm costs ~30 us on a single decode token on CPU, twice these ops."""
    xf = x if x.dtype == torch.float32 else x.float()
    if functorch_active():  # autograd through it: no in-place op over the norm that its backward keeps
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    else:
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    y = (xf * rstd).to(x.dtype)
    y = fresh_mul(y, weight) if weight is not None else y
    return (fresh_add(y, bias) if bias is not None else y), rstd


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dim with float32 statistics, the backward written out from the saved 1 / rms. With
    xhat = x r (r = 1 / rms) and p = dy * x, the backward's reductions are two matrix-vector products over p:
        dweight = sum_n r_n p_n,    c_n = r_n^3 mean_d(p_nd w_d),    dx = r dy w - c x,
    one new [.., D] tensor and six passes over it where the written-out formula makes three and nine. Without a
    weight (folded into the next product, see `RMSNorm.normalize`), four passes."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, rstd = rms_norm(x, weight, bias, eps)
        ctx.save_for_backward(x, rstd, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        D = x.shape[-1]
        dyf, xf = dy.float(), x.float()
        p = dyf * xf  # [.., D]
        if weight is None:  # dx = r dy - c x with c = r^3 mean_d(p_d)
            c = p.sum(-1, keepdim=True).mul_(rstd.pow(3)).div_(D)
            dx, dweight = torch.mul(dyf, rstd, out=p).addcmul_(xf, c, value=-1.0), None
        else:
            r, wf = rstd.reshape(-1), weight.float()  # [N], [D]
            dweight = torch.mv(p.reshape(-1, D).t(), r).to(weight.dtype) if ctx.needs_input_grad[1] else None
            c = torch.mv(p.reshape(-1, D), wf).mul_(r.pow(3)).div_(D)  # [N]
            dx = torch.mul(dyf, wf, out=p).mul_(rstd).addcmul_(xf, c.view(rstd.shape), value=-1.0)
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dyf.sum(tuple(range(dy.dim() - 1))).to(dy.dtype)
        return dx.to(x.dtype), dweight, dbias, None


# the activation by the config's `ffn_activation`, and its backward (grad, input) written into grad (elementwise, so
# grad may be its own output)
FFN_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
FFN_BACKWARDS_INPLACE = {
    "gelu": lambda grad, x: torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=grad),
    "silu": lambda grad, x: torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=grad),
    "relu": lambda grad, x: torch.ops.aten.threshold_backward.grad_input(grad, x, 0, grad_input=grad),
}
# without autograd the activation overwrites the fresh up-projection (see `_writable`)
FFN_ACTIVATIONS_INPLACE = {"gelu": torch.ops.aten.gelu_, "silu": torch.ops.aten.silu_, "relu": torch.ops.aten.relu_}


class GatedFFNFunction(torch.autograd.Function):
    """y = (act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd over x [N, D] with weights Wg, Wu [H, D], Wd [D', H].

    Saves x, g = x Wg^T + bg and u = x Wu^T + bu. Without `keep_products` (the model's choice on an accelerator),
    act(g) * u is recomputed in the backward: three [N, H] tensors written forward (g, u, the product) and three
    backward (act(g), the product, dL/da; dL/du and dL/dg are written into the last two), against four and four
    through autograd, and two kept for the backward against four. With it (on a CPU, where a fresh tensor costs the
    first touch of its pages), act(g) and the product are kept too: four forward, two backward. Training step of the
    CPU benchmark model, in-process A/B runs: keeping 323 - 344 against 331 - 354 ms; dL/dg written into dL/da 0.2 -
    6.2 ms less in four runs; recomputing took 307 against 319 ms through autograd before.
    """

    @staticmethod
    def forward(ctx, x, wg, bg, wu, bu, wd, bd, activation, keep_products):
        g, u = cpu_linear(x, wg, bg), cpu_linear(x, wu, bu)
        a = FFN_ACTIVATIONS[activation](g)
        p = a * u if keep_products else a.mul_(u)
        y = cpu_linear(p, wd, bd)
        ctx.save_for_backward(x, wg, wu, wd, g, u, *((a, p) if keep_products else ()))
        ctx.activation = activation
        ctx.has_bias = (bg is not None, bu is not None, bd is not None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, wg, wu, wd, g, u, *kept = ctx.saved_tensors
        act = FFN_ACTIVATIONS[ctx.activation]
        needs = ctx.needs_input_grad
        if kept:
            a, p = kept  # [N, H] each
        else:
            a = act(g)
            p = a * u
        dwd = dy.t() @ p if needs[5] else None
        da = cpu_matmul(dy, wd)  # [N, H]
        du = da * a if kept else torch.mul(da, a, out=p)  # saved tensors stay intact for a second backward
        dg = FFN_BACKWARDS_INPLACE[ctx.activation](da.mul_(u), g)  # into da, which nothing else holds
        dx = cpu_matmul(du, wu, add=cpu_matmul(dg, wg)) if needs[0] else None
        dwg = dg.t() @ x if needs[1] else None
        dwu = du.t() @ x if needs[3] else None
        has_bg, has_bu, has_bd = ctx.has_bias
        dbg = dg.sum(0) if has_bg and needs[2] else None
        dbu = du.sum(0) if has_bu and needs[4] else None
        dbd = dy.sum(0) if has_bd and needs[6] else None
        return dx, dwg, dbg, dwu, dbu, dwd, dbd, None, None
