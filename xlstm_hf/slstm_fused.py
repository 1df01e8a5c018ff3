"""Fused sLSTM in Triton: forward and backward, each one launch per sequence, matching ``slstm_naive.slstm_recurrent``.

Notation as in ``slstm_naive``: x [B, NH, S, 4 * DH] gate pre-activations (i, f, z, o per head), r [NH, DH, 4 * DH],
state (h, c, n, m) each [B, NH, DH] float32, mask [B, S] bool (False: padding, the state is left unchanged).

One program per (head, tile of BB sequences) runs the whole time loop: the head's four [DH, DH] recurrent blocks
are loaded once and stay on chip, every step is one [BB, DH] x [DH, DH] product per gate followed by the fused gate
and stabiliser arithmetic. The forward stores the state after every step ([B, NH, S + 1, DH] each, float32); the
backward walks the steps in reverse, recomputing the gate pre-activations and the step from the stored previous
state, and writes dx. The
gradient of r is then one batched matmul outside the loop, dr = sum over (b, t) of h_{t-1}^T dx_t.

Head dims up to ``MAX_FUSED_DH`` (128) are fused; bigger heads run ``slstm_naive.slstm_recurrent`` (warned once),
since four [DH, DH] float32 blocks beyond that no longer fit in one program's registers and shared memory.
"""

from __future__ import annotations

import warnings

import torch

from .slstm_naive import SLSTMState, slstm_empty_state, slstm_recurrent
from .triton_utils import HAS_TRITON, INTERPRETED, tl, triton

MAX_FUSED_DH = 128
_warned_fallback = False


if HAS_TRITON:
    from .triton_utils import logsigmoid as _logsigmoid
    from .triton_utils import sigmoid as _sigmoid
    from .triton_utils import tanh as _tanh

    @triton.jit
    def _load_r(r_ptr, i_h, DH: tl.constexpr, BD: tl.constexpr):
        """The head's four recurrent blocks r[i_h, :, g * DH : (g + 1) * DH], each [BD, BD] float32."""
        o_d = tl.arange(0, BD)
        mask_dd = (o_d[:, None] < DH) & (o_d[None, :] < DH)
        p_r = r_ptr + i_h * DH * 4 * DH + o_d[:, None] * 4 * DH + o_d[None, :]
        r_i = tl.load(p_r, mask=mask_dd, other=0.0).to(tl.float32)
        r_f = tl.load(p_r + DH, mask=mask_dd, other=0.0).to(tl.float32)
        r_z = tl.load(p_r + 2 * DH, mask=mask_dd, other=0.0).to(tl.float32)
        r_o = tl.load(p_r + 3 * DH, mask=mask_dd, other=0.0).to(tl.float32)
        return r_i, r_f, r_z, r_o

    @triton.jit
    def _preactivations(x_ptr, p_x, mask_bd, h, r_i, r_f, r_z, r_o, DH: tl.constexpr, PRECISION: tl.constexpr):
        """x_t + h_{t-1} @ r per gate, each [BB, BD] float32; p_x points at x[b, head, t, 0:DH]."""
        x_i = tl.load(x_ptr + p_x, mask=mask_bd, other=0.0).to(tl.float32)
        x_f = tl.load(x_ptr + p_x + DH, mask=mask_bd, other=0.0).to(tl.float32)
        x_z = tl.load(x_ptr + p_x + 2 * DH, mask=mask_bd, other=0.0).to(tl.float32)
        x_o = tl.load(x_ptr + p_x + 3 * DH, mask=mask_bd, other=0.0).to(tl.float32)
        g_i = x_i + tl.dot(h, r_i, input_precision=PRECISION)
        g_f = x_f + tl.dot(h, r_f, input_precision=PRECISION)
        g_z = x_z + tl.dot(h, r_z, input_precision=PRECISION)
        g_o = x_o + tl.dot(h, r_o, input_precision=PRECISION)
        return g_i, g_f, g_z, g_o

    @triton.jit
    def _slstm_fwd_kernel(
        x_ptr,
        r_ptr,
        h0_ptr,
        c0_ptr,
        n0_ptr,
        m0_ptr,
        mask_ptr,
        y_ptr,
        hs_ptr,
        cs_ptr,
        ns_ptr,
        ms_ptr,
        hT_ptr,
        cT_ptr,
        nT_ptr,
        mT_ptr,
        B,
        S,
        NH: tl.constexpr,
        DH: tl.constexpr,
        BB: tl.constexpr,
        BD: tl.constexpr,
        HAS_MASK: tl.constexpr,
        STORE_STATES: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_h = tl.program_id(0)
        i_b = tl.program_id(1)
        o_b = i_b * BB + tl.arange(0, BB)
        o_d = tl.arange(0, BD)
        mask_b = o_b < B
        mask_bd = mask_b[:, None] & (o_d[None, :] < DH)
        o_bh = (o_b * NH + i_h).to(tl.int64)  # [BB]
        p_state = o_bh[:, None] * DH + o_d[None, :]  # [BB, BD]
        r_i, r_f, r_z, r_o = _load_r(r_ptr, i_h, DH, BD)

        h = tl.load(h0_ptr + p_state, mask=mask_bd, other=0.0)  # [BB, BD]
        c = tl.load(c0_ptr + p_state, mask=mask_bd, other=0.0)
        n = tl.load(n0_ptr + p_state, mask=mask_bd, other=0.0)
        m = tl.load(m0_ptr + p_state, mask=mask_bd, other=0.0)
        p_seq = o_bh[:, None] * (S + 1) * DH + o_d[None, :]  # [BB, BD] step 0 of the stored states
        if STORE_STATES:
            tl.store(hs_ptr + p_seq, h, mask=mask_bd)
            tl.store(cs_ptr + p_seq, c, mask=mask_bd)
            tl.store(ns_ptr + p_seq, n, mask=mask_bd)
            tl.store(ms_ptr + p_seq, m, mask=mask_bd)
        for t in range(0, S):
            p_x = (o_bh[:, None] * S + t) * 4 * DH + o_d[None, :]
            g_i, g_f, g_z, g_o = _preactivations(x_ptr, p_x, mask_bd, h, r_i, r_f, r_z, r_o, DH, PRECISION)
            logf_m = _logsigmoid(g_f) + m
            m_new = tl.maximum(logf_m, g_i)
            decay = tl.exp(logf_m - m_new)
            gain = tl.exp(g_i - m_new)
            c_new = decay * c + gain * _tanh(g_z)
            n_new = decay * n + gain
            h_new = _sigmoid(g_o) * c_new / n_new
            if HAS_MASK:
                keep = (tl.load(mask_ptr + o_b * S + t, mask=mask_b, other=0) != 0)[:, None]  # [BB, 1]
                h = tl.where(keep, h_new, h)
                c = tl.where(keep, c_new, c)
                n = tl.where(keep, n_new, n)
                m = tl.where(keep, m_new, m)
            else:
                h, c, n, m = h_new, c_new, n_new, m_new
            tl.store(y_ptr + (o_bh[:, None] * S + t) * DH + o_d[None, :], h.to(y_ptr.dtype.element_ty), mask=mask_bd)
            if STORE_STATES:
                p_t = p_seq + (t + 1) * DH
                tl.store(hs_ptr + p_t, h, mask=mask_bd)
                tl.store(cs_ptr + p_t, c, mask=mask_bd)
                tl.store(ns_ptr + p_t, n, mask=mask_bd)
                tl.store(ms_ptr + p_t, m, mask=mask_bd)
        tl.store(hT_ptr + p_state, h, mask=mask_bd)
        tl.store(cT_ptr + p_state, c, mask=mask_bd)
        tl.store(nT_ptr + p_state, n, mask=mask_bd)
        tl.store(mT_ptr + p_state, m, mask=mask_bd)

    @triton.jit
    def _slstm_bwd_kernel(
        x_ptr,
        r_ptr,
        mask_ptr,
        hs_ptr,
        cs_ptr,
        ns_ptr,
        ms_ptr,
        dy_ptr,
        dhT_ptr,
        dcT_ptr,
        dnT_ptr,
        dmT_ptr,
        dx_ptr,
        dh0_ptr,
        dc0_ptr,
        dn0_ptr,
        dm0_ptr,
        B,
        S,
        NH: tl.constexpr,
        DH: tl.constexpr,
        BB: tl.constexpr,
        BD: tl.constexpr,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_h = tl.program_id(0)
        i_b = tl.program_id(1)
        o_b = i_b * BB + tl.arange(0, BB)
        o_d = tl.arange(0, BD)
        mask_b = o_b < B
        mask_bd = mask_b[:, None] & (o_d[None, :] < DH)
        o_bh = (o_b * NH + i_h).to(tl.int64)  # [BB]
        p_state = o_bh[:, None] * DH + o_d[None, :]  # [BB, BD]
        p_seq = o_bh[:, None] * (S + 1) * DH + o_d[None, :]  # [BB, BD]
        r_i, r_f, r_z, r_o = _load_r(r_ptr, i_h, DH, BD)

        dh = tl.load(dhT_ptr + p_state, mask=mask_bd, other=0.0)  # [BB, BD]
        dc = tl.load(dcT_ptr + p_state, mask=mask_bd, other=0.0)
        dn = tl.load(dnT_ptr + p_state, mask=mask_bd, other=0.0)
        dm = tl.load(dmT_ptr + p_state, mask=mask_bd, other=0.0)
        for tt in range(0, S):
            t = S - 1 - tt
            p_y = (o_bh[:, None] * S + t) * DH + o_d[None, :]
            dh += tl.load(dy_ptr + p_y, mask=mask_bd, other=0.0).to(tl.float32)
            p_prev = p_seq + t * DH
            h_p = tl.load(hs_ptr + p_prev, mask=mask_bd, other=0.0)
            c_p = tl.load(cs_ptr + p_prev, mask=mask_bd, other=0.0)
            n_p = tl.load(ns_ptr + p_prev, mask=mask_bd, other=1.0)
            m_p = tl.load(ms_ptr + p_prev, mask=mask_bd, other=0.0)
            p_x = (o_bh[:, None] * S + t) * 4 * DH + o_d[None, :]
            g_i, g_f, g_z, g_o = _preactivations(x_ptr, p_x, mask_bd, h_p, r_i, r_f, r_z, r_o, DH, PRECISION)
            # The step recomputed as in the forward (the same operations, so the same values): cheaper than loading
            # the stored step-t state, and finite on padded steps, whose stored state is the previous one.
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
            dh_p = tl.dot(d_i, tl.trans(r_i), input_precision=PRECISION)
            dh_p += tl.dot(d_f, tl.trans(r_f), input_precision=PRECISION)
            dh_p += tl.dot(d_z, tl.trans(r_z), input_precision=PRECISION)
            dh_p += tl.dot(d_o, tl.trans(r_o), input_precision=PRECISION)
            if HAS_MASK:
                keep = (tl.load(mask_ptr + o_b * S + t, mask=mask_b, other=0) != 0)[:, None]  # [BB, 1]
                d_i = tl.where(keep, d_i, 0.0)
                d_f = tl.where(keep, d_f, 0.0)
                d_z = tl.where(keep, d_z, 0.0)
                d_o = tl.where(keep, d_o, 0.0)
                dh = tl.where(keep, dh_p, dh)
                dc = tl.where(keep, dc_t * decay, dc)
                dn = tl.where(keep, dn_t * decay, dn)
                dm = tl.where(keep, dlogf_m, dm)
            else:
                dh, dc, dn, dm = dh_p, dc_t * decay, dn_t * decay, dlogf_m
            tl.store(dx_ptr + p_x, d_i, mask=mask_bd)
            tl.store(dx_ptr + p_x + DH, d_f, mask=mask_bd)
            tl.store(dx_ptr + p_x + 2 * DH, d_z, mask=mask_bd)
            tl.store(dx_ptr + p_x + 3 * DH, d_o, mask=mask_bd)
        tl.store(dh0_ptr + p_state, dh, mask=mask_bd)
        tl.store(dc0_ptr + p_state, dc, mask=mask_bd)
        tl.store(dn0_ptr + p_state, dn, mask=mask_bd)
        tl.store(dm0_ptr + p_state, dm, mask=mask_bd)


def _tiles(DH: int) -> tuple[int, int, int]:
    """A tile of 16 sequences (the smallest tl.dot operand), the head dim padded to a power of two >= 16, and the
    warps per program: the four [BD, BD] float32 blocks of r live in registers, 64 K floats at BD = 128, so the
    program gets up to 16 warps (128 floats of r per thread)."""
    BD = max(16, triton.next_power_of_2(DH))
    return 16, BD, max(4, BD // 8)


def _precision(dtype: torch.dtype) -> str:
    """float32 inputs get full-precision dots (no TF32), so that they match the float32 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def slstm_fwd(
    x: torch.Tensor, r: torch.Tensor, state: SLSTMState, mask: torch.Tensor | None, store_states: bool
) -> tuple[torch.Tensor, ...]:
    """y [B, NH, S, DH] in x's dtype, the final (h, c, n, m), and with ``store_states`` the states before and after
    every step, each [B, NH, S + 1, DH] float32 (else None)."""
    B, NH, S, G = x.shape
    DH = G // 4
    BB, BD, num_warps = _tiles(DH)
    f32 = dict(device=x.device, dtype=torch.float32)
    # The interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest even): there torch rounds.
    y_dtype = torch.float32 if INTERPRETED and x.dtype == torch.bfloat16 else x.dtype
    y = torch.empty(B, NH, S, DH, device=x.device, dtype=y_dtype)
    final = [torch.empty(B, NH, DH, **f32) for _ in range(4)]
    seq = [torch.empty(B, NH, S + 1, DH, **f32) for _ in range(4)] if store_states else [y] * 4
    h0, c0, n0, m0 = state
    _slstm_fwd_kernel[(NH, triton.cdiv(B, BB))](
        x, r, h0, c0, n0, m0, mask if mask is not None else x, y, *seq, *final,
        B=B, S=S, NH=NH, DH=DH, BB=BB, BD=BD, HAS_MASK=mask is not None, STORE_STATES=store_states,
        PRECISION=_precision(x.dtype), num_warps=num_warps,
    )  # fmt: skip
    return y.to(x.dtype), *final, *(seq if store_states else [None] * 4)


def slstm_bwd(
    x: torch.Tensor,
    r: torch.Tensor,
    mask: torch.Tensor | None,
    states: tuple[torch.Tensor, ...],
    dy: torch.Tensor,
    dfinal: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """dx [B, NH, S, 4 * DH] and dr [NH, DH, 4 * DH] (float32) and the initial state's dh0, dc0, dn0, dm0."""
    B, NH, S, G = x.shape
    DH = G // 4
    BB, BD, num_warps = _tiles(DH)
    dx = torch.empty(B, NH, S, G, device=x.device, dtype=torch.float32)
    dinitial = [torch.empty(B, NH, DH, device=x.device, dtype=torch.float32) for _ in range(4)]
    _slstm_bwd_kernel[(NH, triton.cdiv(B, BB))](
        x, r, mask if mask is not None else x, *states, dy, *dfinal, dx, *dinitial,
        B=B, S=S, NH=NH, DH=DH, BB=BB, BD=BD, HAS_MASK=mask is not None, PRECISION=_precision(x.dtype),
        num_warps=num_warps,
    )  # fmt: skip
    dr = torch.einsum("bhsd,bhsg->hdg", states[0][:, :, :-1], dx)
    return dx, dr, *dinitial


class SLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, h0, c0, n0, m0, mask):
        y, h, c, n, m, *states = slstm_fwd(x, r, (h0, c0, n0, m0), mask, store_states=True)
        ctx.save_for_backward(x, r, mask, *states)
        return y, h, c, n, m

    @staticmethod
    def backward(ctx, dy, dh, dc, dn, dm):
        x, r, mask, *states = ctx.saved_tensors
        dfinal = tuple(t.contiguous() for t in (dh, dc, dn, dm))
        dx, dr, dh0, dc0, dn0, dm0 = slstm_bwd(x, r, mask, tuple(states), dy.contiguous(), dfinal)
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
    mask [B, S] bool or None. Returns h [B, NH, S, DH] in x's dtype and the final float32 state. Head dims above
    ``MAX_FUSED_DH`` run the PyTorch reference (warned once).
    """
    global _warned_fallback
    if not HAS_TRITON:
        raise ImportError("the Triton sLSTM kernel needs triton: `pip install triton` (a GPU, or TRITON_INTERPRET=1)")
    B, NH, S, G = x.shape
    DH = G // 4
    if G != 4 * DH or r.shape != (NH, DH, 4 * DH):
        raise ValueError(
            f"sLSTM: x {tuple(x.shape)} and r {tuple(r.shape)}; expected [B, NH, S, 4 * DH], [NH, DH, 4 * DH]"
        )
    if mask is not None and mask.shape != (B, S):
        raise ValueError(f"sLSTM mask has shape {tuple(mask.shape)}, expected {(B, S)}")
    if DH > MAX_FUSED_DH:
        if not _warned_fallback:
            warnings.warn(
                f"slstm_triton: head dim {DH} > {MAX_FUSED_DH} does not fit the fused kernel's on-chip recurrent "
                "matrix; running the PyTorch reference (slstm_naive.slstm_recurrent)",
                stacklevel=2,
            )
            _warned_fallback = True
        return slstm_recurrent(x, r, initial_state, mask)
    if initial_state is None:
        initial_state = slstm_empty_state(B, NH, DH, x.device)
    for t in initial_state:
        if tuple(t.shape) != (B, NH, DH):
            raise ValueError(f"sLSTM initial state has shape {tuple(t.shape)}, expected {(B, NH, DH)}")
    h0, c0, n0, m0 = (t.float().contiguous() for t in initial_state)
    mask = None if mask is None else mask.to(torch.int8).contiguous()
    x, r = x.contiguous(), r.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, r, h0, c0, n0, m0)):
        y, h, c, n, m = SLSTMFunction.apply(x, r, h0, c0, n0, m0, mask)
    else:
        y, h, c, n, m, *_ = slstm_fwd(x, r, (h0, c0, n0, m0), mask, store_states=False)
    return y, (h, c, n, m)
