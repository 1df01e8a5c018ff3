"""Chunkwise mLSTM in Triton: forward and backward, matching ``mlstm_naive.mlstm_chunkwise``.

Notation as in ``mlstm_naive``: q, k [B, NH, S, DK]; v [B, NH, S, DV]; i, f [B, NH, S]; state (C [B, NH, DK, DV],
n [B, NH, DK], m [B, NH]) float32. L is the chunk length, NC = ceil(S / L); the last chunk is padded with positions
that do not touch the memory (input gate ``MASKED_IGATE``, forget gate 1, zero q, k, v), as in the reference.

Forward:
    1. ``_chunk_states_fwd_kernel``: the state entering every chunk, by a recurrence over the NC chunks
       (one program per (B * NH, DK tile, DV tile)).
    2. ``_chunk_output_fwd_kernel``: within each chunk, the stabilised quadratic form over L positions plus the
       entering state (one program per (B * NH, chunk, DV tile)).
Backward, with m treated as a stabiliser (a constant) inside the kernels:
    3. ``_chunk_states_bwd_kernel``: the gradient of every entering state, by the reverse recurrence.
    4. ``_chunk_dqk_bwd_kernel`` and ``_chunk_dv_bwd_kernel``: dq, dk and dv within each chunk.
    5. ``mlstm_grads.gate_grads``: di and df from the identities di_t = k_t . dk_t and dF_t = q_t . dq_t - k_t . dk_t
       (F the cumulative log forget gate), plus the derivative through the stabiliser m (the argmax of each m_t),
       which the reference's autograd also takes: h depends on m only through eps, the returned state through
       its scale exp(m).

All three state tensors, m included, receive gradients (the initial m through the same stabiliser path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mlstm_grads import gate_grads, normaliser_grads
from .mlstm_naive import _MIN_M_FOR_FLOOR, MASKED_IGATE, MLSTMState, _initial_state, check_mlstm_inputs
from .triton_utils import (
    HAS_TRITON,
    device_properties,
    dot_precision,
    pow2_tile,
    require_triton,
    store_dtype,
    tl,
    triton,
)

if HAS_TRITON:
    from .triton_utils import MAX as _MAX
    from .triton_utils import SUM as _SUM
    from .triton_utils import dot as _dot

    _MASKED_IGATE_C = tl.constexpr(MASKED_IGATE)
    _MIN_M_C = tl.constexpr(_MIN_M_FOR_FLOOR)

    @triton.jit
    def _chunk_states_fwd_kernel(
        k_ptr,
        v_ptr,
        i_ptr,
        logf_ptr,
        C0_ptr,
        n0_ptr,
        m0_ptr,
        Cs_ptr,
        ns_ptr,
        ms_ptr,
        C_ptr,
        n_ptr,
        S,
        NC,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_bh = tl.program_id(0).to(tl.int64)
        i_k = tl.program_id(1)
        i_v = tl.program_id(2)
        DT = k_ptr.dtype.element_ty
        o_l = tl.arange(0, BL)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        mask_k = o_k < DK
        mask_v = o_v < DV
        mask_kv = mask_k[:, None] & mask_v[None, :]
        o_kv = o_k[:, None] * DV + o_v[None, :]  # [BK, BV]

        C = tl.load(C0_ptr + i_bh * DK * DV + o_kv, mask=mask_kv, other=0.0)  # [BK, BV]
        n = tl.load(n0_ptr + i_bh * DK + o_k, mask=mask_k, other=0.0)  # [BK]
        m = tl.load(m0_ptr + i_bh)
        for c in range(0, NC):
            tl.store(Cs_ptr + (i_bh * NC + c) * DK * DV + o_kv, C, mask=mask_kv)
            if i_v == 0:
                tl.store(ns_ptr + (i_bh * NC + c) * DK + o_k, n, mask=mask_k)
            if (i_k == 0) & (i_v == 0):
                tl.store(ms_ptr + i_bh * (NC + 1) + c, m)
            o_t = c * BL + o_l
            mask_t = o_t < S
            ig = tl.load(i_ptr + i_bh * S + o_t, mask=mask_t, other=_MASKED_IGATE_C)  # [BL]
            lf = tl.load(logf_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
            b = tl.associative_scan(lf, 0, _SUM)  # [BL]
            g = tl.reduce(lf, 0, _SUM)
            a = g - b + ig  # [BL]
            m_new = tl.maximum(g + m, tl.reduce(a, 0, _MAX))
            w = tl.exp(a - m_new)  # [BL]
            decay = tl.exp(g + m - m_new)
            kc = tl.load(
                k_ptr + (i_bh * S + o_t[:, None]) * DK + o_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0
            ).to(tl.float32)  # [BL, BK]
            vc = tl.load(
                v_ptr + (i_bh * S + o_t[:, None]) * DV + o_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0
            )  # [BL, BV]
            kw = kc * w[:, None]  # [BL, BK]
            C = decay * C + _dot(tl.trans(kw), vc, DT, PRECISION)
            n = decay * n + tl.reduce(kw, 0, _SUM)
            m = m_new
        tl.store(C_ptr + i_bh * DK * DV + o_kv, C, mask=mask_kv)
        if i_v == 0:
            tl.store(n_ptr + i_bh * DK + o_k, n, mask=mask_k)
        if (i_k == 0) & (i_v == 0):
            tl.store(ms_ptr + i_bh * (NC + 1) + NC, m)

    @triton.jit
    def _chunk_output_fwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        i_ptr,
        logf_ptr,
        Cs_ptr,
        ns_ptr,
        ms_ptr,
        h_ptr,
        mrow_ptr,
        den_ptr,
        scale,
        eps,
        S,
        NC,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_bh = tl.program_id(0).to(tl.int64)
        i_c = tl.program_id(1)
        i_v = tl.program_id(2)
        DT = q_ptr.dtype.element_ty
        o_l = tl.arange(0, BL)
        o_t = i_c * BL + o_l
        mask_t = o_t < S
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < DV

        ig = tl.load(i_ptr + i_bh * S + o_t, mask=mask_t, other=_MASKED_IGATE_C)  # [BL]
        lf = tl.load(logf_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
        b = tl.associative_scan(lf, 0, _SUM)  # [BL]
        m_c = tl.load(ms_ptr + i_bh * (NC + 1) + i_c)
        causal = o_l[:, None] >= o_l[None, :]  # [BL, BL]
        log_d = tl.where(causal, b[:, None] - b[None, :] + ig[None, :], float("-inf"))  # [BL, BL]
        m_inter = b + m_c  # [BL]
        m_row = tl.maximum(tl.reduce(log_d, 1, _MAX), m_inter)  # [BL]
        D = tl.exp(log_d - m_row[:, None])  # [BL, BL]
        e = tl.exp(m_inter - m_row)  # [BL]

        qk = tl.full([BL, BL], 0.0, tl.float32)
        qC = tl.full([BL, BV], 0.0, tl.float32)
        qn = tl.full([BL], 0.0, tl.float32)
        for i_k in range(0, (DK + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            mask_k = o_k < DK
            mask_tk = mask_t[:, None] & mask_k[None, :]
            qc = tl.load(q_ptr + (i_bh * S + o_t[:, None]) * DK + o_k[None, :], mask=mask_tk, other=0.0)
            qc = qc.to(tl.float32) * scale  # [BL, BK]
            kc = tl.load(k_ptr + (i_bh * S + o_t[:, None]) * DK + o_k[None, :], mask=mask_tk, other=0.0)  # [BL, BK]
            Cc = tl.load(
                Cs_ptr + (i_bh * NC + i_c) * DK * DV + o_k[:, None] * DV + o_v[None, :],
                mask=mask_k[:, None] & mask_v[None, :],
                other=0.0,
            )  # [BK, BV]
            nc = tl.load(ns_ptr + (i_bh * NC + i_c) * DK + o_k, mask=mask_k, other=0.0)  # [BK]
            qk += _dot(qc, tl.trans(kc), DT, PRECISION)
            qC += _dot(qc, Cc, DT, PRECISION)
            qn += tl.reduce(qc * nc[None, :], 1, _SUM)
        s = qk * D  # [BL, BL]
        vc = tl.load(
            v_ptr + (i_bh * S + o_t[:, None]) * DV + o_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0
        )  # [BL, BV]
        num = _dot(s, vc, DT, PRECISION) + e[:, None] * qC  # [BL, BV]
        den = tl.reduce(s, 1, _SUM) + e * qn  # [BL]
        floor = tl.exp(-tl.maximum(m_row, _MIN_M_C))
        h = num / (tl.maximum(tl.abs(den), floor) + eps)[:, None]
        tl.store(
            h_ptr + (i_bh * S + o_t[:, None]) * DV + o_v[None, :],
            h.to(h_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_v[None, :],
        )
        if i_v == 0:
            tl.store(mrow_ptr + i_bh * S + o_t, m_row, mask=mask_t)
            tl.store(den_ptr + i_bh * S + o_t, den, mask=mask_t)

    @triton.jit
    def _chunk_states_bwd_kernel(
        q_ptr,
        i_ptr,
        logf_ptr,
        ms_ptr,
        mrow_ptr,
        rN_ptr,
        dden_ptr,
        dh_ptr,
        dC_ptr,
        dn_ptr,
        dCs_ptr,
        dns_ptr,
        scale,
        S,
        NC,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_bh = tl.program_id(0).to(tl.int64)
        i_k = tl.program_id(1)
        i_v = tl.program_id(2)
        DT = q_ptr.dtype.element_ty
        o_l = tl.arange(0, BL)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        mask_k = o_k < DK
        mask_v = o_v < DV
        mask_kv = mask_k[:, None] & mask_v[None, :]
        o_kv = o_k[:, None] * DV + o_v[None, :]  # [BK, BV]

        dC = tl.load(dC_ptr + i_bh * DK * DV + o_kv, mask=mask_kv, other=0.0)  # [BK, BV]
        dn = tl.load(dn_ptr + i_bh * DK + o_k, mask=mask_k, other=0.0)  # [BK]
        for cc in range(0, NC):
            c = NC - 1 - cc
            tl.store(dCs_ptr + (i_bh * (NC + 1) + c + 1) * DK * DV + o_kv, dC, mask=mask_kv)
            if i_v == 0:
                tl.store(dns_ptr + (i_bh * (NC + 1) + c + 1) * DK + o_k, dn, mask=mask_k)
            o_t = c * BL + o_l
            mask_t = o_t < S
            lf = tl.load(logf_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
            b = tl.associative_scan(lf, 0, _SUM)  # [BL]
            g = tl.reduce(lf, 0, _SUM)
            m_c = tl.load(ms_ptr + i_bh * (NC + 1) + c)
            m_next = tl.load(ms_ptr + i_bh * (NC + 1) + c + 1)
            m_row = tl.load(mrow_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
            rN = tl.load(rN_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
            dden = tl.load(dden_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
            e = tl.where(mask_t, tl.exp(b + m_c - m_row), 0.0)  # [BL]
            qc = tl.load(
                q_ptr + (i_bh * S + o_t[:, None]) * DK + o_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0
            )
            qe = qc.to(tl.float32) * (scale * e)[:, None]  # [BL, BK]
            dh = tl.load(
                dh_ptr + (i_bh * S + o_t[:, None]) * DV + o_v[None, :],
                mask=mask_t[:, None] & mask_v[None, :],
                other=0.0,
            )
            dnum = dh.to(tl.float32) * rN[:, None]  # [BL, BV]
            decay = tl.exp(g + m_c - m_next)
            dC = decay * dC + _dot(tl.trans(qe), dnum, DT, PRECISION)
            dn = decay * dn + tl.reduce(qe * dden[:, None], 0, _SUM)
        tl.store(dCs_ptr + i_bh * (NC + 1) * DK * DV + o_kv, dC, mask=mask_kv)
        if i_v == 0:
            tl.store(dns_ptr + i_bh * (NC + 1) * DK + o_k, dn, mask=mask_k)

    @triton.jit
    def _chunk_decays(i_ptr, logf_ptr, ms_ptr, mrow_ptr, i_bh, i_c, S, NC, BL: tl.constexpr):
        """The intra-chunk weights that the backward kernels share: D [BL, BL] (row t, column j), e [BL] (the
        entering state's weight in h_t), w [BL] (position j's weight in the next state)."""
        o_l = tl.arange(0, BL)
        o_t = i_c * BL + o_l
        mask_t = o_t < S
        ig = tl.load(i_ptr + i_bh * S + o_t, mask=mask_t, other=_MASKED_IGATE_C)  # [BL]
        lf = tl.load(logf_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
        b = tl.associative_scan(lf, 0, _SUM)  # [BL]
        g = tl.reduce(lf, 0, _SUM)
        m_c = tl.load(ms_ptr + i_bh * (NC + 1) + i_c)
        m_next = tl.load(ms_ptr + i_bh * (NC + 1) + i_c + 1)
        m_row = tl.load(mrow_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
        valid = (o_l[:, None] >= o_l[None, :]) & mask_t[:, None]  # [BL, BL]
        D = tl.where(valid, tl.exp(b[:, None] - b[None, :] + ig[None, :] - m_row[:, None]), 0.0)  # [BL, BL]
        e = tl.where(mask_t, tl.exp(b + m_c - m_row), 0.0)  # [BL]
        w = tl.exp(g - b + ig - m_next)  # [BL]
        return D, e, w

    @triton.jit
    def _chunk_dqk_bwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        i_ptr,
        logf_ptr,
        Cs_ptr,
        ns_ptr,
        ms_ptr,
        mrow_ptr,
        rN_ptr,
        dden_ptr,
        dh_ptr,
        dCs_ptr,
        dns_ptr,
        dq_ptr,
        dk_ptr,
        scale,
        S,
        NC,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_bh = tl.program_id(0).to(tl.int64)
        i_c = tl.program_id(1)
        i_k = tl.program_id(2)
        DT = q_ptr.dtype.element_ty
        o_t = i_c * BL + tl.arange(0, BL)
        mask_t = o_t < S
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < DK
        mask_tk = mask_t[:, None] & mask_k[None, :]
        D, e, w = _chunk_decays(i_ptr, logf_ptr, ms_ptr, mrow_ptr, i_bh, i_c, S, NC, BL)
        rN = tl.load(rN_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
        dden = tl.load(dden_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]

        ds = tl.full([BL, BL], 0.0, tl.float32)
        dqC = tl.full([BL, BK], 0.0, tl.float32)
        dkC = tl.full([BL, BK], 0.0, tl.float32)
        for i_v in range(0, (DV + BV - 1) // BV):
            o_v = i_v * BV + tl.arange(0, BV)
            mask_v = o_v < DV
            mask_tv = mask_t[:, None] & mask_v[None, :]
            mask_kv = mask_k[:, None] & mask_v[None, :]
            dh = tl.load(dh_ptr + (i_bh * S + o_t[:, None]) * DV + o_v[None, :], mask=mask_tv, other=0.0)
            dnum = (dh.to(tl.float32) * rN[:, None]).to(DT)  # [BL, BV]
            vc = tl.load(v_ptr + (i_bh * S + o_t[:, None]) * DV + o_v[None, :], mask=mask_tv, other=0.0).to(DT)
            Cc = tl.load(
                Cs_ptr + (i_bh * NC + i_c) * DK * DV + o_k[:, None] * DV + o_v[None, :], mask=mask_kv, other=0.0
            )
            dCn = tl.load(
                dCs_ptr + (i_bh * (NC + 1) + i_c + 1) * DK * DV + o_k[:, None] * DV + o_v[None, :],
                mask=mask_kv,
                other=0.0,
            )  # [BK, BV]
            ds += _dot(dnum, tl.trans(vc), DT, PRECISION)
            dqC += _dot(dnum, tl.trans(Cc), DT, PRECISION)
            dkC += _dot(vc, tl.trans(dCn), DT, PRECISION)
        ds = (ds + dden[:, None]) * D  # [BL, BL]
        qc = tl.load(q_ptr + (i_bh * S + o_t[:, None]) * DK + o_k[None, :], mask=mask_tk, other=0.0)
        qc = qc.to(tl.float32) * scale  # [BL, BK]
        kc = tl.load(k_ptr + (i_bh * S + o_t[:, None]) * DK + o_k[None, :], mask=mask_tk, other=0.0)  # [BL, BK]
        nc = tl.load(ns_ptr + (i_bh * NC + i_c) * DK + o_k, mask=mask_k, other=0.0)  # [BK]
        dnn = tl.load(dns_ptr + (i_bh * (NC + 1) + i_c + 1) * DK + o_k, mask=mask_k, other=0.0)  # [BK]
        dqs = _dot(ds, kc, DT, PRECISION)
        dqs += e[:, None] * (dqC + dden[:, None] * nc[None, :])  # [BL, BK]
        dk = _dot(tl.trans(ds), qc, DT, PRECISION)
        dk += w[:, None] * (dkC + dnn[None, :])  # [BL, BK]
        o_tk = (i_bh * S + o_t[:, None]) * DK + o_k[None, :]
        tl.store(dq_ptr + o_tk, dqs * scale, mask=mask_tk)
        tl.store(dk_ptr + o_tk, dk, mask=mask_tk)

    @triton.jit
    def _chunk_dv_bwd_kernel(
        q_ptr,
        k_ptr,
        i_ptr,
        logf_ptr,
        ms_ptr,
        mrow_ptr,
        rN_ptr,
        dh_ptr,
        dCs_ptr,
        dv_ptr,
        scale,
        S,
        NC,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_bh = tl.program_id(0).to(tl.int64)
        i_c = tl.program_id(1)
        i_v = tl.program_id(2)
        DT = q_ptr.dtype.element_ty
        o_t = i_c * BL + tl.arange(0, BL)
        mask_t = o_t < S
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < DV
        mask_tv = mask_t[:, None] & mask_v[None, :]
        D, e, w = _chunk_decays(i_ptr, logf_ptr, ms_ptr, mrow_ptr, i_bh, i_c, S, NC, BL)

        qk = tl.full([BL, BL], 0.0, tl.float32)
        kdC = tl.full([BL, BV], 0.0, tl.float32)
        for i_k in range(0, (DK + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            mask_k = o_k < DK
            mask_tk = mask_t[:, None] & mask_k[None, :]
            qc = tl.load(q_ptr + (i_bh * S + o_t[:, None]) * DK + o_k[None, :], mask=mask_tk, other=0.0)
            qc = qc.to(tl.float32) * scale  # [BL, BK]
            kc = tl.load(k_ptr + (i_bh * S + o_t[:, None]) * DK + o_k[None, :], mask=mask_tk, other=0.0).to(DT)
            dCn = tl.load(
                dCs_ptr + (i_bh * (NC + 1) + i_c + 1) * DK * DV + o_k[:, None] * DV + o_v[None, :],
                mask=mask_k[:, None] & mask_v[None, :],
                other=0.0,
            )  # [BK, BV]
            qk += _dot(qc, tl.trans(kc), DT, PRECISION)
            kdC += _dot(kc, dCn, DT, PRECISION)
        rN = tl.load(rN_ptr + i_bh * S + o_t, mask=mask_t, other=0.0)  # [BL]
        dh = tl.load(dh_ptr + (i_bh * S + o_t[:, None]) * DV + o_v[None, :], mask=mask_tv, other=0.0)
        dnum = dh.to(tl.float32) * rN[:, None]  # [BL, BV]
        s = qk * D  # [BL, BL]
        dv = _dot(tl.trans(s), dnum, DT, PRECISION) + w[:, None] * kdC  # [BL, BV]
        tl.store(dv_ptr + (i_bh * S + o_t[:, None]) * DV + o_v[None, :], dv, mask=mask_tv)


MAX_HEAD_DIM = 512
MAX_GRID_YZ = 65535
_IEEE_MAX_CHUNK = 32  # see _launch


@dataclass(frozen=True)
class _ChunkLaunch:
    """Launch parameters of the five kernels for one input shape: chunk length BL, feature tiles of the intra-chunk
    kernels (BK, BV) and of the two chunk-state kernels (SK, SV), warps, pipeline stages and dot precision."""

    BL: int
    BK: int
    BV: int
    SK: int
    SV: int
    num_warps: int
    num_stages: int
    precision: str


def _launch(B: int, NH: int, S: int, DK: int, DV: int, chunk_size: int, dtype: torch.dtype, device) -> _ChunkLaunch:
    """Tiles and warps, chosen from the compile figures of ``tests/test_kernel_compile.py`` (register spills and
    shared memory per target at the 7B and paper head shapes, benchmarks/RESULTS.md):

    - 8 warps everywhere: with 4, the [BL, BL] score block, a [BL, BV] accumulator and the dot operands of the
      intra-chunk kernels need 255 registers and spill (up to 1 KB per thread at 64 x 64 tiles on sm_80).
    - Half-precision operands: 64 x 64 feature tiles on sm_90 and newer, BK 32 on sm_80 (64 x 64 spills 216 B
      there). float32 in TF32: BK 32, BV 64 on both (64 x 64 spills 56-496 B).
    - float32 in full precision ("ieee", torch's "highest"): the dots run on FMA units and need the most
      registers; 32 x 32 tiles and chunks of at most 32 positions compile without spills (64-long chunks spill
      10-30 KB per thread). The chunk length changes the summation order and where the stabiliser m is taken,
      which enters h only through eps.
    - The chunk-state kernels run the recurrence over the NC chunks one after another, so at batch 1 their
      programs, not their tiles, are the parallelism: tiles are halved (down to 16) until the launch has at least
      two programs per SM (7B heads at batch 1 on an H100: 512 programs of 64 x 32 instead of 256 of 64 x 64).
    """
    capability, sm_count = device_properties(device)
    precision = dot_precision(dtype)
    ieee = precision == "ieee"
    BL = min(_IEEE_MAX_CHUNK if ieee else chunk_size, max(16, triton.next_power_of_2(S)))
    half = dtype in (torch.bfloat16, torch.float16)
    BK = pow2_tile(DK, 64 if half and capability[0] >= 9 else 32)
    BV = pow2_tile(DV, 32 if ieee else 64)
    SK, SV = BK, BV
    while B * NH * triton.cdiv(DK, SK) * triton.cdiv(DV, SV) < 2 * sm_count and max(SK, SV) > 16:
        if SV >= SK:
            SV //= 2
        else:
            SK //= 2
    return _ChunkLaunch(BL, BK, BV, SK, SV, num_warps=8, num_stages=2, precision=precision)


def mlstm_chunkwise_unsupported(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> str | None:
    """Why the Triton chunkwise kernel cannot run q [B, NH, S, DK], v [B, NH, S, DV] with this chunk size, or None
    when it can."""
    DK, DV, S = q.shape[-1], v.shape[-1], q.shape[-2]
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (float32, bfloat16 or float16 expected)"
    if max(DK, DV) > MAX_HEAD_DIM:
        return f"head dims DK={DK}, DV={DV} above {MAX_HEAD_DIM}"
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        return f"chunk_size={chunk_size} is not a power of two >= 16"
    BL = min(chunk_size, _IEEE_MAX_CHUNK) if dot_precision(q.dtype) == "ieee" else chunk_size
    if triton.cdiv(S, BL) > MAX_GRID_YZ:
        return f"S={S} makes more than {MAX_GRID_YZ} chunks of {BL} (a grid axis limit)"
    return None


def chunk_mlstm_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    logf: torch.Tensor,
    C0: torch.Tensor,
    n0: torch.Tensor,
    m0: torch.Tensor,
    cfg: _ChunkLaunch,
    eps: float,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    """Returns h [B, NH, S, DV], the final C, n, m, the entering states Cs [B, NH, NC, DK, DV], ns [B, NH, NC, DK],
    ms [B, NH, NC + 1] (the last one the final m), and per position m_row, den [B, NH, S]."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    BL, BK, BV, SK, SV = cfg.BL, cfg.BK, cfg.BV, cfg.SK, cfg.SV
    NC = triton.cdiv(S, BL)
    f32 = dict(device=q.device, dtype=torch.float32)
    Cs = torch.empty(B, NH, NC, DK, DV, **f32)
    ns = torch.empty(B, NH, NC, DK, **f32)
    ms = torch.empty(B, NH, NC + 1, **f32)
    C = torch.empty(B, NH, DK, DV, **f32)
    n = torch.empty(B, NH, DK, **f32)
    warps = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _chunk_states_fwd_kernel[(B * NH, triton.cdiv(DK, SK), triton.cdiv(DV, SV))](
        k, v, i, logf, C0, n0, m0, Cs, ns, ms, C, n,
        S=S, NC=NC, DK=DK, DV=DV, BL=BL, BK=SK, BV=SV, PRECISION=cfg.precision, **warps,
    )  # fmt: skip
    h = torch.empty(B, NH, S, DV, device=q.device, dtype=store_dtype(q.dtype))
    m_row = torch.empty(B, NH, S, **f32)
    den = torch.empty(B, NH, S, **f32)
    _chunk_output_fwd_kernel[(B * NH, NC, triton.cdiv(DV, BV))](
        q, k, v, i, logf, Cs, ns, ms, h, m_row, den,
        scale=scale, eps=eps, S=S, NC=NC, DK=DK, DV=DV, BL=BL, BK=BK, BV=BV, PRECISION=cfg.precision, **warps,
    )  # fmt: skip
    return h.to(q.dtype), C, n, ms[..., -1].clone(), Cs, ns, ms, m_row, den


def chunk_mlstm_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    logf: torch.Tensor,
    Cs: torch.Tensor,
    ns: torch.Tensor,
    ms: torch.Tensor,
    m_row: torch.Tensor,
    rN: torch.Tensor,
    dden: torch.Tensor,
    dh: torch.Tensor,
    dC: torch.Tensor,
    dn: torch.Tensor,
    cfg: _ChunkLaunch,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    """dq, dk [B, NH, S, DK] and dv [B, NH, S, DV] in float32, and the initial state's dC0, dn0, with m held
    constant. rN = 1 / normaliser and dden = d loss / d den, both [B, NH, S]."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    BL, BK, BV, SK, SV = cfg.BL, cfg.BK, cfg.BV, cfg.SK, cfg.SV
    NC = triton.cdiv(S, BL)
    f32 = dict(device=q.device, dtype=torch.float32)
    dCs = torch.empty(B, NH, NC + 1, DK, DV, **f32)
    dns = torch.empty(B, NH, NC + 1, DK, **f32)
    warps = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _chunk_states_bwd_kernel[(B * NH, triton.cdiv(DK, SK), triton.cdiv(DV, SV))](
        q, i, logf, ms, m_row, rN, dden, dh, dC, dn, dCs, dns,
        scale=scale, S=S, NC=NC, DK=DK, DV=DV, BL=BL, BK=SK, BV=SV, PRECISION=cfg.precision, **warps,
    )  # fmt: skip
    dq = torch.empty(B, NH, S, DK, **f32)
    dk = torch.empty(B, NH, S, DK, **f32)
    dv = torch.empty(B, NH, S, DV, **f32)
    _chunk_dqk_bwd_kernel[(B * NH, NC, triton.cdiv(DK, BK))](
        q, k, v, i, logf, Cs, ns, ms, m_row, rN, dden, dh, dCs, dns, dq, dk,
        scale=scale, S=S, NC=NC, DK=DK, DV=DV, BL=BL, BK=BK, BV=BV, PRECISION=cfg.precision, **warps,
    )  # fmt: skip
    _chunk_dv_bwd_kernel[(B * NH, NC, triton.cdiv(DV, BV))](
        q, k, i, logf, ms, m_row, rN, dh, dCs, dv,
        scale=scale, S=S, NC=NC, DK=DK, DV=DV, BL=BL, BK=BK, BV=BV, PRECISION=cfg.precision, **warps,
    )  # fmt: skip
    return dq, dk, dv, dCs[:, :, 0], dns[:, :, 0]


class ChunkMLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, cfg, eps, scale, recompute_states):
        i32 = i.float().contiguous()
        logf = F.logsigmoid(f.float()).contiguous()
        h, C, n, m, Cs, ns, ms, m_row, den = chunk_mlstm_fwd(q, k, v, i32, logf, C0, n0, m0, cfg, eps, scale)
        saved_states = (None, None) if recompute_states else (Cs, ns)
        ctx.save_for_backward(q, k, v, i32, f, logf, C0, n0, m0, *saved_states, ms, m_row, den, h, C, n)
        ctx.cfg = (cfg, eps, scale, recompute_states)
        ctx.dtypes = (i.dtype, f.dtype)
        return h, C, n, m

    @staticmethod
    def backward(ctx, dh, dC, dn, dm):
        q, k, v, i, f, logf, C0, n0, m0, Cs, ns, ms, m_row, den, h, C, n = ctx.saved_tensors
        cfg, eps, scale, recompute_states = ctx.cfg
        if recompute_states:
            _, _, _, _, Cs, ns, _, _, _ = chunk_mlstm_fwd(q, k, v, i, logf, C0, n0, m0, cfg, eps, scale)
        dh = dh.contiguous()
        rN, dden, dm_row = normaliser_grads(h, dh, m_row, den, eps)
        dq, dk, dv, dC0, dn0 = chunk_mlstm_bwd(
            q, k, v, i, logf, Cs, ns, ms, m_row, rN, dden, dh, dC.contiguous(), dn.contiguous(), cfg, scale
        )
        # The returned state is C_true * exp(-m): exp(F_S) enters it as a factor, and m_S (= m_row at S - 1)
        # as its scale.
        state_dot = (dC * C).sum((-2, -1)) + (dn * n).sum(-1)  # [B, NH]
        dm_row[..., -1] += dm - state_dot
        di, df, dm0 = gate_grads(q, k, i, f, logf, m0, dq, dk, dm_row, state_dot)
        dm0 = dm0 + torch.where(torch.isinf(m0), torch.zeros_like(m0), (dC0 * C0).sum((-2, -1)) + (dn0 * n0).sum(-1))
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            di.to(ctx.dtypes[0]),
            df.to(ctx.dtypes[1]),
            dC0,
            dn0,
            dm0,
            None,
            None,
            None,
            None,
        )


def mlstm_chunkwise_triton(
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
    recompute_states: bool = False,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM: the same function as ``mlstm_naive.mlstm_chunkwise`` (differentiable in q, k, v, i, f and
    the initial C, n, m).

    q, k [B, NH, S, DK]; v [B, NH, S, DV]; i, f [B, NH, S]; initial_state (C [B, NH, DK, DV], n [B, NH, DK],
    m [B, NH]) or None (an empty memory with m = ``empty_m``). Returns h [B, NH, S, DV] in q's dtype and the final
    float32 state. Any S; DK, DV up to 512; chunk_size a power of two >= 16 (``mlstm_chunkwise_unsupported`` says
    why a shape cannot run). ``recompute_states`` drops the per-chunk states (NC * DK * DV floats per head) after
    the forward and recomputes them in the backward.
    """
    require_triton("the Triton mLSTM kernels")
    check_mlstm_inputs(q, k, v, i, f)
    reason = mlstm_chunkwise_unsupported(q, v, chunk_size)
    if reason is not None:
        raise ValueError(f"mlstm_chunkwise_triton: q {tuple(q.shape)}, v {tuple(v.shape)}: {reason}")
    B, NH, S, DK = q.shape
    scale = DK**-0.5 if scale is None else scale
    C0, n0, m0 = (t.contiguous() for t in _initial_state(initial_state, q, v, empty_m))
    cfg = _launch(B, NH, S, DK, v.shape[-1], chunk_size, q.dtype, q.device)
    q, k, v = (t.contiguous() for t in (q, k.to(q.dtype), v.to(q.dtype)))
    h, C, n, m = ChunkMLSTMFunction.apply(q, k, v, i, f, C0, n0, m0, cfg, eps, scale, recompute_states)
    return h, (C, n, m)
