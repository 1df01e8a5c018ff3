"""Fused sLSTM in Triton: forward and backward, each one launch per sequence, matching ``slstm_naive.slstm_recurrent``.

Notation as in ``slstm_naive``: x [B, NH, S, 4 * DH] gate pre-activations (i, f, z, o per head), r [NH, DH, 4 * DH],
state (h, c, n, m) each [B, NH, DH] float32, mask [B, S] bool (False: padding, the state is left unchanged).

One program per (tile of BB sequences, head) runs the whole time loop. A head's recurrent matrix does not fit on
chip at the paper's head dims (DH 256: 4 * 256 * 256 float32 = 1 MB, an SM has 228 KB of shared memory and 256 KB of
registers), so every step streams r from L2 in tiles. A block barrier ends each phase that other warps read back,
after which every warp of the program sees the others' global writes. Any DH works (tiles masked at the edge).

Forward, per step t and BN-wide column tile: x_t + h_{t-1} @ r for the tile's columns of the four gates (h_{t-1}
read back in [BB, BN] slices, r in [BN, BN] tiles), the gate and stabiliser arithmetic, h_t, c_t, n_t, m_t into step
slot t + 1 of float32 buffers [B, NH, NSTEPS, DH]: a column tile needs all of h_{t-1} but computes only its own
columns of h_t. Training keeps every step (NSTEPS = S + 1) and the pre-activations x_t + h_{t-1} @ r
([B, NH, S, 4 * DH] float32) for the backward; inference keeps two alternating slots.
Backward, per step in reverse, in BN-wide column tiles (the carried gradients through [B, NH, 2, DH] buffers):
(A) per column tile, the step recomputed from the stored pre-activations and state, the gate gradients dx_t and the
carried dc, dn, dm; (B) per column tile, dh_{t-1} = dx_t @ r^T (all 4 DH gate columns). dx is written in float32 and
dr = sum over (b, t) of h_{t-1}^T dx_t is one batched matmul after the loop.
"""

from __future__ import annotations

import torch

from .slstm_naive import SLSTMState, slstm_empty_state
from .triton_utils import HAS_TRITON, dot_precision, require_triton, store_dtype, tl, triton

if HAS_TRITON:
    from .triton_utils import logsigmoid as _logsigmoid
    from .triton_utils import sigmoid as _sigmoid
    from .triton_utils import tanh as _tanh

    @triton.jit
    def _preactivations(
        x_ptr, r_ptr, hs_ptr, p_x, p_h, cols, mask_b, DH: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr
    ):
        """x_t + h_{t-1} @ r for the gate columns ``cols`` [BN] of one head, each gate [BB, BN] float32. p_x [BB]
        points at x[b, head, t, 0], p_h [BB] at h_{t-1}[b, head, 0]; r_ptr at r[head, 0, 0]."""
        mask_n = cols < DH
        mask_bn = mask_b[:, None] & mask_n[None, :]
        p_xn = x_ptr + p_x[:, None] + cols[None, :]  # [BB, BN]
        g_i = tl.load(p_xn, mask=mask_bn, other=0.0).to(tl.float32)
        g_f = tl.load(p_xn + DH, mask=mask_bn, other=0.0).to(tl.float32)
        g_z = tl.load(p_xn + 2 * DH, mask=mask_bn, other=0.0).to(tl.float32)
        g_o = tl.load(p_xn + 3 * DH, mask=mask_bn, other=0.0).to(tl.float32)
        for k in range(0, DH, BN):
            rows = k + tl.arange(0, BN)
            mask_k = rows < DH
            h = tl.load(hs_ptr + p_h[:, None] + rows[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            p_r = r_ptr + rows[:, None] * 4 * DH + cols[None, :]  # [BN, BN]
            mask_r = mask_k[:, None] & mask_n[None, :]
            g_i += tl.dot(h, tl.load(p_r, mask=mask_r, other=0.0).to(tl.float32), input_precision=PRECISION)
            g_f += tl.dot(h, tl.load(p_r + DH, mask=mask_r, other=0.0).to(tl.float32), input_precision=PRECISION)
            g_z += tl.dot(h, tl.load(p_r + 2 * DH, mask=mask_r, other=0.0).to(tl.float32), input_precision=PRECISION)
            g_o += tl.dot(h, tl.load(p_r + 3 * DH, mask=mask_r, other=0.0).to(tl.float32), input_precision=PRECISION)
        return g_i, g_f, g_z, g_o

    @triton.jit
    def _slstm_fwd_kernel(
        x_ptr,
        r_ptr,
        mask_ptr,
        y_ptr,
        hs_ptr,
        cs_ptr,
        ns_ptr,
        ms_ptr,
        gates_ptr,
        B,
        S,
        NSTEPS,
        NH: tl.constexpr,
        DH: tl.constexpr,
        BB: tl.constexpr,
        BN: tl.constexpr,
        HAS_MASK: tl.constexpr,
        STORE_GATES: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_b = tl.program_id(0)
        i_h = tl.program_id(1)
        o_b = i_b * BB + tl.arange(0, BB)
        mask_b = o_b < B
        o_bh = (o_b * NH + i_h).to(tl.int64)  # [BB]
        r_ptr += i_h * DH * 4 * DH
        for t in range(0, S):
            p_prev = (o_bh * NSTEPS + t % NSTEPS) * DH  # [BB] step slot of the state before step t
            p_next = (o_bh * NSTEPS + (t + 1) % NSTEPS) * DH
            p_x = (o_bh * S + t) * 4 * DH
            if HAS_MASK:
                keep = (tl.load(mask_ptr + o_b * S + t, mask=mask_b, other=0) != 0)[:, None]  # [BB, 1]
            for j in range(0, DH, BN):
                cols = j + tl.arange(0, BN)
                mask_bn = mask_b[:, None] & (cols < DH)[None, :]
                g_i, g_f, g_z, g_o = _preactivations(x_ptr, r_ptr, hs_ptr, p_x, p_prev, cols, mask_b, DH, BN, PRECISION)
                if STORE_GATES:
                    p_g = gates_ptr + p_x[:, None] + cols[None, :]  # [BB, BN]
                    tl.store(p_g, g_i, mask=mask_bn)
                    tl.store(p_g + DH, g_f, mask=mask_bn)
                    tl.store(p_g + 2 * DH, g_z, mask=mask_bn)
                    tl.store(p_g + 3 * DH, g_o, mask=mask_bn)
                o_prev = p_prev[:, None] + cols[None, :]  # [BB, BN]
                c = tl.load(cs_ptr + o_prev, mask=mask_bn, other=0.0)
                n = tl.load(ns_ptr + o_prev, mask=mask_bn, other=0.0)
                m = tl.load(ms_ptr + o_prev, mask=mask_bn, other=0.0)
                logf_m = _logsigmoid(g_f) + m
                m_new = tl.maximum(logf_m, g_i)
                decay = tl.exp(logf_m - m_new)
                gain = tl.exp(g_i - m_new)
                c_new = decay * c + gain * _tanh(g_z)
                n_new = decay * n + gain
                h = _sigmoid(g_o) * c_new / n_new
                if HAS_MASK:
                    h = tl.where(keep, h, tl.load(hs_ptr + o_prev, mask=mask_bn, other=0.0))
                    c_new = tl.where(keep, c_new, c)
                    n_new = tl.where(keep, n_new, n)
                    m_new = tl.where(keep, m_new, m)
                o_next = p_next[:, None] + cols[None, :]
                tl.store(hs_ptr + o_next, h, mask=mask_bn)
                tl.store(cs_ptr + o_next, c_new, mask=mask_bn)
                tl.store(ns_ptr + o_next, n_new, mask=mask_bn)
                tl.store(ms_ptr + o_next, m_new, mask=mask_bn)
                p_y = y_ptr + (o_bh[:, None] * S + t) * DH + cols[None, :]
                tl.store(p_y, h.to(y_ptr.dtype.element_ty), mask=mask_bn)
            tl.debug_barrier()  # h_t complete before step t + 1 reads it

    @triton.jit
    def _slstm_bwd_kernel(
        gates_ptr,
        r_ptr,
        mask_ptr,
        cs_ptr,
        ns_ptr,
        ms_ptr,
        dy_ptr,
        dhs_ptr,
        dcs_ptr,
        dns_ptr,
        dms_ptr,
        dx_ptr,
        B,
        S,
        NH: tl.constexpr,
        DH: tl.constexpr,
        BB: tl.constexpr,
        BN: tl.constexpr,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """gates [B, NH, S, 4 * DH] the forward's pre-activations x_t + h_{t-1} @ r; cs, ns, ms [B, NH, S + 1, DH]
        its states; dhs..dms [B, NH, 2, DH] the carried gradients, slot S % 2 holding those of the final state on
        entry and slot 0 those of the initial state on exit."""
        i_b = tl.program_id(0)
        i_h = tl.program_id(1)
        o_b = i_b * BB + tl.arange(0, BB)
        mask_b = o_b < B
        o_bh = (o_b * NH + i_h).to(tl.int64)  # [BB]
        r_ptr += i_h * DH * 4 * DH
        for tt in range(0, S):
            t = S - 1 - tt
            p_prev = (o_bh * (S + 1) + t) * DH  # [BB] the state before step t
            p_in = (o_bh * 2 + (t + 1) % 2) * DH  # carried gradients of the state after step t
            p_out = (o_bh * 2 + t % 2) * DH
            p_x = (o_bh * S + t) * 4 * DH
            p_y = (o_bh * S + t) * DH
            if HAS_MASK:
                keep = (tl.load(mask_ptr + o_b * S + t, mask=mask_b, other=0) != 0)[:, None]  # [BB, 1]
            # (A) gate gradients and the carried dc, dn, dm, column tile by column tile
            for j in range(0, DH, BN):
                cols = j + tl.arange(0, BN)
                mask_bn = mask_b[:, None] & (cols < DH)[None, :]
                p_g = gates_ptr + p_x[:, None] + cols[None, :]  # [BB, BN]
                g_i = tl.load(p_g, mask=mask_bn, other=0.0)
                g_f = tl.load(p_g + DH, mask=mask_bn, other=0.0)
                g_z = tl.load(p_g + 2 * DH, mask=mask_bn, other=0.0)
                g_o = tl.load(p_g + 3 * DH, mask=mask_bn, other=0.0)
                o_prev = p_prev[:, None] + cols[None, :]  # [BB, BN]
                o_in = p_in[:, None] + cols[None, :]
                c_p = tl.load(cs_ptr + o_prev, mask=mask_bn, other=0.0)
                n_p = tl.load(ns_ptr + o_prev, mask=mask_bn, other=0.0)
                m_p = tl.load(ms_ptr + o_prev, mask=mask_bn, other=0.0)
                dh = tl.load(dhs_ptr + o_in, mask=mask_bn, other=0.0)
                dh += tl.load(dy_ptr + p_y[:, None] + cols[None, :], mask=mask_bn, other=0.0).to(tl.float32)
                dc = tl.load(dcs_ptr + o_in, mask=mask_bn, other=0.0)
                dn = tl.load(dns_ptr + o_in, mask=mask_bn, other=0.0)
                dm = tl.load(dms_ptr + o_in, mask=mask_bn, other=0.0)
                # The step recomputed as in the forward (the same operations, so the same values): cheaper than
                # loading the stored step-t state, and finite on padded steps, whose stored state is the previous one.
                logf_m = _logsigmoid(g_f) + m_p
                m_t = tl.maximum(logf_m, g_i)
                decay = tl.exp(logf_m - m_t)
                gain = tl.exp(g_i - m_t)
                s_o = _sigmoid(g_o)
                tz = _tanh(g_z)
                c_t = decay * c_p + gain * tz
                n_t = decay * n_p + gain

                d_o = dh * c_t / n_t * s_o * (1.0 - s_o)
                dc_t = dc + dh * s_o / n_t
                dn_t = dn - dh * s_o * c_t / (n_t * n_t)
                dlog_decay = (dc_t * c_p + dn_t * n_p) * decay
                dlog_gain = (dc_t * tz + dn_t) * gain
                dm_t = dm - dlog_decay - dlog_gain
                i_wins = g_i > logf_m
                dlogf_m = dlog_decay + tl.where(i_wins, 0.0, dm_t)
                d_i = dlog_gain + tl.where(i_wins, dm_t, 0.0)
                d_f = dlogf_m * _sigmoid(-g_f)
                d_z = dc_t * gain * (1.0 - tz * tz)
                dc_t *= decay
                dn_t *= decay
                if HAS_MASK:
                    d_i = tl.where(keep, d_i, 0.0)
                    d_f = tl.where(keep, d_f, 0.0)
                    d_z = tl.where(keep, d_z, 0.0)
                    d_o = tl.where(keep, d_o, 0.0)
                    dc_t = tl.where(keep, dc_t, dc)
                    dn_t = tl.where(keep, dn_t, dn)
                    dlogf_m = tl.where(keep, dlogf_m, dm)
                p_dx = dx_ptr + p_x[:, None] + cols[None, :]
                tl.store(p_dx, d_i, mask=mask_bn)
                tl.store(p_dx + DH, d_f, mask=mask_bn)
                tl.store(p_dx + 2 * DH, d_z, mask=mask_bn)
                tl.store(p_dx + 3 * DH, d_o, mask=mask_bn)
                o_out = p_out[:, None] + cols[None, :]
                tl.store(dcs_ptr + o_out, dc_t, mask=mask_bn)
                tl.store(dns_ptr + o_out, dn_t, mask=mask_bn)
                tl.store(dms_ptr + o_out, dlogf_m, mask=mask_bn)
            tl.debug_barrier()  # dx_t complete before (B) reads all its columns
            # (B) dh_{t-1} = dx_t @ r^T, for the rows j of r (the columns of h)
            for j in range(0, DH, BN):
                rows = j + tl.arange(0, BN)
                mask_j = rows < DH
                mask_bj = mask_b[:, None] & mask_j[None, :]
                dh_p = tl.full([BB, BN], 0.0, tl.float32)
                for k in range(0, DH, BN):
                    cols = k + tl.arange(0, BN)
                    mask_k = cols < DH
                    p_dx = dx_ptr + p_x[:, None] + cols[None, :]  # [BB, BN]
                    mask_bk = mask_b[:, None] & mask_k[None, :]
                    p_r = r_ptr + rows[:, None] * 4 * DH + cols[None, :]  # [BN (rows j), BN (columns k)]
                    mask_r = mask_j[:, None] & mask_k[None, :]
                    for g in range(0, 4):
                        d_g = tl.load(p_dx + g * DH, mask=mask_bk, other=0.0)
                        r_g = tl.load(p_r + g * DH, mask=mask_r, other=0.0).to(tl.float32)
                        dh_p += tl.dot(d_g, tl.trans(r_g), input_precision=PRECISION)
                if HAS_MASK:
                    dh = tl.load(dhs_ptr + p_in[:, None] + rows[None, :], mask=mask_bj, other=0.0)
                    dh += tl.load(dy_ptr + p_y[:, None] + rows[None, :], mask=mask_bj, other=0.0).to(tl.float32)
                    dh_p = tl.where(keep, dh_p, dh)
                tl.store(dhs_ptr + p_out[:, None] + rows[None, :], dh_p, mask=mask_bj)
            tl.debug_barrier()  # the carried gradients complete before step t - 1 reads them


def _launch(DH: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int, str]:
    """(BB, BN, num_warps, precision), chosen from the compile figures of ``tests/test_kernel_compile.py`` at head
    dims 48 to 256 (benchmarks/RESULTS.md): a tile of 16 sequences (the smallest tl.dot operand) and BN-wide column
    and row tiles of the head. float32 x follows torch's matmul precision switch; bfloat16 x multiplies the float32 h
    and r in TF32: 16-wide tiles with 8 warps, which do not spill on sm_80 and sm_90 (32-wide ones spill up to 72 B
    per thread; sm_100's ptxas parks up to 32 B of loop invariants at either width). Full-precision float32 dots
    ("highest"): the forward with 32-wide tiles and 4 warps (at most 8 B; 16-wide with 8 warps spill 16-24 B), the
    backward with 16-wide tiles and 8 warps (none; 32-wide with 4 warps spill 16-24 B on sm_80)."""
    precision = dot_precision(torch.float32) if dtype == torch.float32 else "tf32"
    BN, num_warps = (32, 4) if precision == "ieee" and not backward else (16, 8)
    return 16, min(BN, max(16, triton.next_power_of_2(DH))), num_warps, precision


def slstm_unsupported(x: torch.Tensor, r: torch.Tensor) -> str | None:
    """Why the fused kernel cannot run x [B, NH, S, 4 * DH] with r [NH, DH, 4 * DH], or None when it can."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} (float32, bfloat16 or float16 expected)"
    if x.shape[-1] % 4 or r.shape != (x.shape[1], x.shape[-1] // 4, x.shape[-1]):
        return f"x {tuple(x.shape)} and r {tuple(r.shape)} are not [B, NH, S, 4 * DH] and [NH, DH, 4 * DH]"
    if x.shape[1] > 65535:
        return f"{x.shape[1]} heads, above the grid limit 65,535"
    return None


def slstm_fwd(
    x: torch.Tensor, r: torch.Tensor, state: SLSTMState, mask: torch.Tensor | None, store_states: bool
) -> tuple[torch.Tensor, ...]:
    """y [B, NH, S, DH] in x's dtype, the final (h, c, n, m), and with ``store_states`` the pre-activations
    x_t + h_{t-1} @ r [B, NH, S, 4 * DH] and the states before and after every step, each [B, NH, S + 1, DH], all
    float32 (else None)."""
    B, NH, S, G = x.shape
    DH = G // 4
    BB, BN, num_warps, precision = _launch(DH, x.dtype, backward=False)
    NSTEPS = S + 1 if store_states else 2
    seq = [torch.empty(B, NH, NSTEPS, DH, device=x.device, dtype=torch.float32) for _ in range(4)]
    for buffer, initial in zip(seq, state, strict=True):
        buffer[:, :, 0] = initial
    y = torch.empty(B, NH, S, DH, device=x.device, dtype=store_dtype(x.dtype))
    gates = torch.empty(B, NH, S, G, device=x.device, dtype=torch.float32) if store_states else None
    _slstm_fwd_kernel[(triton.cdiv(B, BB), NH)](
        x, r, mask if mask is not None else x, y, *seq, gates if store_states else y,
        B=B, S=S, NSTEPS=NSTEPS, NH=NH, DH=DH, BB=BB, BN=BN, HAS_MASK=mask is not None, STORE_GATES=store_states,
        PRECISION=precision, num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    final = [t[:, :, S % NSTEPS].clone() for t in seq]
    return y.to(x.dtype), *final, gates, *(seq if store_states else [None] * 4)


def slstm_bwd(
    x: torch.Tensor,
    r: torch.Tensor,
    mask: torch.Tensor | None,
    gates: torch.Tensor,
    states: tuple[torch.Tensor, ...],
    dy: torch.Tensor,
    dfinal: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """dx [B, NH, S, 4 * DH] and dr [NH, DH, 4 * DH] (float32) and the initial state's dh0, dc0, dn0, dm0."""
    B, NH, S, G = x.shape
    DH = G // 4
    BB, BN, num_warps, precision = _launch(DH, x.dtype, backward=True)
    dx = torch.empty(B, NH, S, G, device=x.device, dtype=torch.float32)
    carried = [torch.empty(B, NH, 2, DH, device=x.device, dtype=torch.float32) for _ in range(4)]
    for buffer, d in zip(carried, dfinal, strict=True):
        buffer[:, :, S % 2] = d
    _slstm_bwd_kernel[(triton.cdiv(B, BB), NH)](
        gates, r, mask if mask is not None else x, *states[1:], dy, *carried, dx,
        B=B, S=S, NH=NH, DH=DH, BB=BB, BN=BN, HAS_MASK=mask is not None, PRECISION=precision,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    dr = torch.einsum("bhsd,bhsg->hdg", states[0][:, :, :-1], dx)
    return dx, dr, *(t[:, :, 0] for t in carried)


class SLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, h0, c0, n0, m0, mask):
        y, h, c, n, m, gates, *states = slstm_fwd(x, r, (h0, c0, n0, m0), mask, store_states=True)
        ctx.save_for_backward(x, r, mask, gates, *states)
        return y, h, c, n, m

    @staticmethod
    def backward(ctx, dy, dh, dc, dn, dm):
        x, r, mask, gates, *states = ctx.saved_tensors
        dx, dr, dh0, dc0, dn0, dm0 = slstm_bwd(x, r, mask, gates, tuple(states), dy.contiguous(), (dh, dc, dn, dm))
        return dx.to(x.dtype), dr.to(r.dtype), dh0, dc0, dn0, dm0, None


def slstm_triton(
    x: torch.Tensor,
    r: torch.Tensor,
    initial_state: SLSTMState | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SLSTMState]:
    """The sLSTM recurrence over S: the same function as ``slstm_naive.slstm_recurrent``, differentiable in x, r and
    the initial (h, c, n, m).

    x [B, NH, S, 4 * DH]; r [NH, DH, 4 * DH]; initial_state (h, c, n, m) each [B, NH, DH] or None (empty, m = -inf);
    mask [B, S] bool or None. Returns h [B, NH, S, DH] in x's dtype and the final float32 state. Any DH
    (``slstm_unsupported`` says why an input cannot run).
    """
    require_triton("the Triton sLSTM kernel")
    reason = slstm_unsupported(x, r)
    if reason is not None:
        raise ValueError(f"slstm_triton: x {tuple(x.shape)}, r {tuple(r.shape)}: {reason}")
    B, NH, S, G = x.shape
    DH = G // 4
    if mask is not None and mask.shape != (B, S):
        raise ValueError(f"sLSTM mask has shape {tuple(mask.shape)}, expected {(B, S)}")
    if initial_state is None:
        initial_state = slstm_empty_state(B, NH, DH, x.device)
    for t in initial_state:
        if tuple(t.shape) != (B, NH, DH):
            raise ValueError(f"sLSTM initial state has shape {tuple(t.shape)}, expected {(B, NH, DH)}")
    h0, c0, n0, m0 = (t.float() for t in initial_state)
    mask = None if mask is None else mask.to(torch.int8).contiguous()
    x, r = x.contiguous(), r.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, r, h0, c0, n0, m0)):
        y, h, c, n, m = SLSTMFunction.apply(x, r, h0, c0, n0, m0, mask)
    else:
        y, h, c, n, m, *_ = slstm_fwd(x, r, (h0, c0, n0, m0), mask, store_states=False)
    return y, (h, c, n, m)
