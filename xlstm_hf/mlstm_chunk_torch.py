"""Chunkwise mLSTM in PyTorch with a hand-written backward: the fast path on CPU (and on any device without Triton).

The same function as ``mlstm_naive.mlstm_chunkwise`` (the autograd reference), in the same notation:
    q, k [B, NH, S, DK]; v [B, NH, S, DV]; i, f [B, NH, S]; state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH]).
Inside, every tensor is split into NC chunks of L positions: [B, NH, NC, L, ...].

Forward: the states entering the chunks by one matmul over the chunks' own contributions, then each chunk's
stabilised quadratic form, with in-place arithmetic where autograd would keep every intermediate. The backward follows
the Triton kernels of ``mlstm_chunk`` (m treated as a stabiliser, then routed through its argmax):
    1. 1 / normaliser, dL/d den and dL/d m_row (``mlstm_grads.normaliser_grads``);
    2. the gradients of the states entering the chunks, by the reverse recurrence written as one matmul;
    3. dq, dk, dv within every chunk from the saved decay matrix D;
    4. di, df and dm0 from the identities of ``mlstm_grads.gate_grads``.
Forward and backward at the CPU benchmark model's heads (NH 4, DK 32, DV 64, 2048 tokens, 2 threads, the three
timed in turns): 8.8 - 11.6 ms here, 10.1 - 20.3 ms with autograd through the reference, 16.3 - 32.3 ms with
mlstm_kernels' native kernel (``scripts/benchmark_kernels.py``, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .mlstm_grads import gate_grads, normaliser_grads
from .mlstm_naive import (
    _MIN_M_FOR_FLOOR,
    MASKED_IGATE,
    MLSTMState,
    _initial_state,
    _segment_decay,
    check_mlstm_inputs,
    log_sigmoid,
)

# exp(x) is computed as exp2(x log2(e)) on full-size tensors: torch.exp is several times slower than torch.exp2 on
# x86 CPUs, more so where its result is subnormal
_LOG2E = math.log2(math.e)


def _backward_segments(g: torch.Tensor) -> torch.Tensor:
    """g [.., NC] -> [.., NC + 1, NC + 1]: entry (c, c') = g[c] + ... + g[c' - 1] for c <= c' (0 on the diagonal),
    -inf below it: the log decay from the start of chunk c to the start of chunk c'."""
    NC = g.shape[-1]
    idx = torch.arange(NC + 1, device=g.device)
    cs = (g[..., None, :] * (idx[:-1][None, :] >= idx[:, None])).cumsum(-1)  # [.., NC + 1, NC] (c, c'') = g[c..c'']
    seg = F.pad(cs, (1, 0))  # column c' holds the sum up to c' - 1
    return seg.masked_fill(idx[None, :] < idx[:, None], float("-inf"))


def _chunk_fwd(
    qs: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    b: torch.Tensor,
    C0: torch.Tensor,
    n0: torch.Tensor,
    m0: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """qs (q * scale), k [B, NH, NC, L, DK], v [B, NH, NC, L, DV], i and b (within-chunk cumulative log forget gate)
    [B, NH, NC, L], float32. Returns h [B, NH, NC, L, DV] float32, the states entering every chunk and the final one
    C_in [B, NH, NC, DK, DV], the final C [B, NH, DK, DV], n_all [B, NH, NC + 1, DK], m_all [B, NH, NC + 1] (entering
    and final), and per position m_row, den
    [B, NH, NC, L] and the stabilised decay matrix D [B, NH, NC, L, L]."""
    B, NH, NC, L, DK = qs.shape
    DV = v.shape[-1]
    g = b[..., -1]  # [B, NH, NC]

    # 1. the states entering the chunks: chunk c' contributes its kv (scaled by exp(a_max[c'])) decayed over the
    # chunks between; the initial state decays over all chunks before.
    a = g[..., None] - b + i  # [B, NH, NC, L] log weight of position t in its chunk's end state
    a_max = a.amax(-1)  # [B, NH, NC]
    k_w = k * (a - a_max[..., None]).exp_()[..., None]  # [B, NH, NC, L, DK]
    kv = k_w.transpose(-1, -2) @ v  # [B, NH, NC, DK, DV]
    k_sum = k_w.sum(-2)  # [B, NH, NC, DK]
    log_w = a_max[..., None, :] + _segment_decay(g)  # [B, NH, NC + 1, NC]
    log_w0 = m0[..., None] + F.pad(g.cumsum(-1), (1, 0))  # [B, NH, NC + 1]
    m_all = torch.maximum(log_w.amax(-1), log_w0)  # [B, NH, NC + 1]
    m_ref = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)  # an empty memory stays 0, not nan
    w = (log_w - m_ref[..., None]).exp_()  # [B, NH, NC + 1, NC]
    w0 = (log_w0 - m_ref).exp_()  # [B, NH, NC + 1]
    # the entering states C_in and the final one C computed apart, so that C_in is contiguous for the matmuls below
    w, w0, kv = w.view(B * NH, NC + 1, NC), w0.view(B * NH, NC + 1, 1), kv.view(B * NH, NC, DK * DV)
    C0f = C0.reshape(B * NH, 1, DK * DV)
    C_in = torch.baddbmm(w0[:, :NC] * C0f, w[:, :NC], kv).view(B, NH, NC, DK, DV)
    C = torch.baddbmm(w0[:, NC:] * C0f, w[:, NC:], kv).view(B, NH, DK, DV)
    n_all = w.view(B, NH, NC + 1, NC) @ k_sum + w0.view(B, NH, NC + 1, 1) * n0[:, :, None]  # [B, NH, NC + 1, DK]
    n_in, m_in = n_all[:, :, :-1], m_all[..., :-1]

    # 2. within every chunk: log D[t, j] = b[t] - b[j] + i[j] (j <= t), whose row max is b[t] + cummax(i - b)[t].
    w_col = i - b  # [B, NH, NC, L]
    m_inter = b + m_in[..., None]  # [B, NH, NC, L]
    m_row = torch.maximum(b + w_col.cummax(-1).values, m_inter)  # [B, NH, NC, L]
    # exp2 of log2 D, scaled on the [.., L] vectors (see _LOG2E), then the causal mask by tril_ (an order of magnitude
    # faster on CPU than masked_fill_ with a broadcast [L, L] mask)
    D = ((b - m_row).mul_(_LOG2E)[..., :, None] + (w_col * _LOG2E)[..., None, :]).exp2_().tril_()  # [.., L, L]
    s = (qs @ k.transpose(-1, -2)).mul_(D)  # [B, NH, NC, L, L]
    e = (m_inter - m_row).exp_()  # [B, NH, NC, L] weight of the entering state
    q_inter = qs * e[..., None]  # [B, NH, NC, L, DK]
    num = (q_inter.view(-1, L, DK) @ C_in.view(-1, DK, DV)).baddbmm_(s.view(-1, L, L), v.view(-1, L, DV))
    num = num.view(B, NH, NC, L, DV)
    den = s.sum(-1).add_((q_inter @ n_in[..., None]).squeeze(-1))  # [B, NH, NC, L]
    floor = (-m_row.clamp(min=_MIN_M_FOR_FLOOR)).exp_()
    h = num.div_((torch.maximum(den.abs(), floor) + eps)[..., None])
    return h, C_in, C, n_all, m_all, m_row, den, D


def _contiguous_padded(t: torch.Tensor, length: int) -> torch.Tensor:
    """t [B, NH, S, D] as a contiguous float32 tensor of `length` >= S positions (zeros after S): t itself when it
    already is one, else one copy (the layer's q, k, v arrive as strided head views), not a cast, a pad and a copy."""
    B, NH, S, D = t.shape
    if S == length and t.dtype == torch.float32 and t.is_contiguous():
        return t
    out = torch.empty(B, NH, length, D, device=t.device, dtype=torch.float32)
    out[:, :, :S] = t
    if length > S:
        out[:, :, S:] = 0.0
    return out


def _chunked_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor, L: int, scale: float
) -> tuple[torch.Tensor, ...]:
    """Float32 inputs padded to NC * L positions (the padding does not touch the memory) and split into chunks:
    qs (q * scale), k [B, NH, NC, L, DK], v [B, NH, NC, L, DV], i, logf, b [B, NH, NC, L]."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    NC = math.ceil(S / L)
    pad = NC * L - S
    qs, kc, vc = (_contiguous_padded(t, NC * L) for t in (q, k, v))
    i32 = i.float()
    logf = log_sigmoid(f.float())
    if pad:
        i32 = F.pad(i32, (0, pad), value=MASKED_IGATE)
        logf = F.pad(logf, (0, pad))
    logf = logf.reshape(B, NH, NC, L)
    return (
        (qs.mul_(scale) if qs is not q else q * scale).view(B, NH, NC, L, DK),
        kc.view(B, NH, NC, L, DK),
        vc.view(B, NH, NC, L, DV),
        i32.reshape(B, NH, NC, L),
        logf,
        logf.cumsum(-1),
    )


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    C0: torch.Tensor,
    n0: torch.Tensor,
    m0: torch.Tensor,
    chunk_size: int,
    eps: float,
    scale: float,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor, MLSTMState]:
    """The chunked inputs (``_chunked_inputs``), what ``_chunk_fwd`` returns, h [B, NH, S, DV] in q's dtype and the
    final state."""
    S = q.shape[2]
    chunked = _chunked_inputs(q, k, v, i, f, min(chunk_size, S), scale)
    qs, kc, vc, ic, _, b = chunked
    with torch.autocast(q.device.type, enabled=False):  # float32 throughout, under autocast too
        out = _chunk_fwd(qs, kc, vc, ic, b, C0, n0, m0, eps)
    h, _, C, n_all, m_all = out[:5]
    h_out = h.reshape(*q.shape[:2], -1, h.shape[-1])[:, :, :S].to(q.dtype)
    return chunked, out, h_out, (C, n_all[:, :, -1], m_all[..., -1])


class ChunkMLSTMTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, chunk_size, eps, scale):
        (qs, kc, vc, ic, logf, b), fwd, h, (C, n, m) = _forward(q, k, v, i, f, C0, n0, m0, chunk_size, eps, scale)
        h_chunks, C_in, _, n_all, m_all, m_row, den, D = fwd
        ctx.save_for_backward(qs, kc, vc, ic, logf, b, f, C_in, C, n_all, m_all, m_row, den, D, h_chunks, m0, C0, n0)
        ctx.cfg = (q.shape[2], eps, scale, q.dtype, k.dtype, v.dtype, i.dtype, f.dtype)
        ctx.set_materialize_grads(False)
        ctx.device_type = q.device.type
        return h, C, n, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh, dC, dn, dm):
        with torch.autocast(ctx.device_type, enabled=False):
            return ChunkMLSTMTorchFunction._backward(ctx, dh, dC, dn, dm)

    @staticmethod
    def _backward(ctx, dh, dC, dn, dm):
        qs, k, v, i, logf, b, f, C_in, C_last, n_all, m_all, m_row, den, D, h, m0, C0, n0 = ctx.saved_tensors
        S, eps, scale, *dtypes = ctx.cfg
        B, NH, NC, L, DK = qs.shape
        DV = v.shape[-1]
        f32 = dict(device=qs.device, dtype=torch.float32)
        dh = torch.zeros(B, NH, S, DV, **f32) if dh is None else dh.float().contiguous()
        if NC * L > S:
            dh = F.pad(dh, (0, 0, 0, NC * L - S))
        dh = dh.reshape(B, NH, NC, L, DV)
        # the final state's gradients are None when only h is used (training without carrying the state)
        dC = torch.zeros(B, NH, DK, DV, **f32) if dC is None and dn is not None else dC
        dn = torch.zeros(B, NH, DK, **f32) if dn is None and dC is not None else dn

        # 1. the normaliser
        rN, dden, dm_row = normaliser_grads(h, dh, m_row, den, eps)  # [B, NH, NC, L]
        dnum = dh * rN[..., None]  # [B, NH, NC, L, DV]

        # 2. the gradients of the states entering the chunks (and of the final one): dS[c] = X[c] + decay[c] dS[c+1]
        # with X[c] chunk c's use of its entering state and decay[c] = exp(g[c] + m[c] - m[c + 1]) <= 1.
        g = b[..., -1]  # [B, NH, NC]
        m_in = m_all[..., :-1]
        e = (b + m_in[..., None] - m_row).exp_()  # [B, NH, NC, L]
        qe_t = (qs * e[..., None]).transpose(-1, -2)  # [B, NH, NC, DK, L]
        X_C = qe_t @ dnum  # [B, NH, NC, DK, DV]
        X_n = (qe_t @ dden[..., None]).squeeze(-1)  # [B, NH, NC, DK]
        m_ref = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
        log_r = _backward_segments(g) + m_ref[..., :, None] - m_ref[..., None, :]  # [B, NH, NC + 1, NC + 1]
        log_r[..., 0, 1:] = log_r[..., 0, 1:].masked_fill(torch.isinf(m_all[..., :1]), float("-inf"))
        r = log_r.exp_()
        X_C = X_C.view(B, NH, NC, DK * DV)

        def state_grads(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            """dS_C [B, NH, R, DK * DV] and dS_n [B, NH, R, DK] of these rows of dS (row c: the state entering c)."""
            dS_C, dS_n = r[..., rows, :NC] @ X_C, r[..., rows, :NC] @ X_n
            if dC is not None:
                dS_C += r[..., rows, NC, None] * dC.float().view(B, NH, 1, DK * DV)
                dS_n += r[..., rows, NC, None] * dn.float()[:, :, None]
            return dS_C, dS_n

        dC_next, dn_next = state_grads(slice(1, None))  # of the states leaving the chunks, contiguous
        dC_next = dC_next.view(-1, DK, DV)

        # 3. within every chunk, with w[j] = exp(g - b[j] + i[j] - m[c + 1]) position j's weight in the leaving state
        w = (g[..., None] - b + i - m_all[..., 1:, None]).exp_()[..., None]  # [B, NH, NC, L, 1]
        C_in = C_in.view(-1, DK, DV)
        q3, k3, v3, D3 = qs.reshape(-1, L, DK), k.reshape(-1, L, DK), v.reshape(-1, L, DV), D.reshape(-1, L, L)
        dnum3 = dnum.reshape(-1, L, DV)
        ds = torch.bmm(dnum3, v3.transpose(1, 2)).add_(dden.reshape(-1, L, 1)).mul_(D3)  # [B * NH * NC, L, L]
        # in-place baddbmm_ on fresh tensors: torch.baddbmm would first copy its input into a new one
        dqs = ((e * dden)[..., None] * n_all[:, :, :-1, None, :]).view(-1, L, DK)
        dqs.baddbmm_((dnum * e[..., None]).view(-1, L, DV), C_in.transpose(1, 2)).baddbmm_(ds, k3)
        dk = (w * dn_next[..., None, :]).view(-1, L, DK)
        dk.baddbmm_((v * w).view(-1, L, DV), dC_next.transpose(1, 2)).baddbmm_(ds.transpose(1, 2), q3)
        s = torch.bmm(q3, k3.transpose(1, 2)).mul_(D3)
        dv = ((k * w).view(-1, L, DK) @ dC_next).baddbmm_(s.transpose(1, 2), dnum3)

        # 4. the gates, on the unpadded sequence; the returned state is C_true * exp(-m), which puts exp(F_S) and
        # m_S into it.
        def unchunk(t: torch.Tensor, *features: int) -> torch.Tensor:
            """[B, NH, NC, L, *features] or [B * NH * NC, L, *features] -> [B, NH, S, *features]"""
            return t.reshape(B, NH, NC * L, *features)[:, :, :S]

        state_dot = torch.zeros(B, NH, **f32)  # [B, NH]
        if dC is not None:
            state_dot = (dC.float() * C_last).sum((-2, -1)) + (dn.float() * n_all[:, :, -1]).sum(-1)
        dm_row = unchunk(dm_row).clone()
        dm_row[..., -1] += (0.0 if dm is None else dm.float()) - state_dot
        dqs, dk, dv = unchunk(dqs, DK), unchunk(dk, DK), unchunk(dv, DV)
        di, df, dm0 = gate_grads(
            unchunk(qs, DK), unchunk(k, DK), unchunk(i), f, unchunk(logf), m0, dqs, dk, dm_row, state_dot
        )
        dq = dqs.mul_(scale)
        dC0 = dn0 = None
        if any(ctx.needs_input_grad[5:8]):  # an initial state that takes gradients
            dC0, dn0 = state_grads(slice(0, 1))
            dC0, dn0 = dC0.view(B, NH, DK, DV), dn0.view(B, NH, DK)
            from_C0 = (dC0 * C0).sum((-2, -1)) + (dn0 * n0).sum(-1)
            dm0 = dm0 + torch.where(torch.isinf(m0), torch.zeros_like(m0), from_C0)
        q_dt, k_dt, v_dt, i_dt, f_dt = dtypes
        return dq.to(q_dt), dk.to(k_dt), dv.to(v_dt), di.to(i_dt), df.to(f_dt), dC0, dn0, dm0, None, None, None


def mlstm_chunkwise_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    scale: float | None = None,
    empty_m: float = 0.0,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM: h [B, NH, S, DV] in q's dtype and the final float32 state; differentiable in q, k, v, i, f
    and the initial C, n, m. Arguments as ``mlstm_naive.mlstm_chunkwise``."""
    check_mlstm_inputs(q, k, v, i, f)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    DK = q.shape[-1]
    scale = DK**-0.5 if scale is None else scale
    C0, n0, m0 = _initial_state(initial_state, q, v, empty_m)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, i, f, C0, n0, m0)):
        h, C, n, m = ChunkMLSTMTorchFunction.apply(q, k, v, i, f, C0, n0, m0, chunk_size, eps, scale)
        return h, (C, n, m)
    _, _, h, state = _forward(q, k, v, i, f, C0, n0, m0, chunk_size, eps, scale)
    return h, state
