"""Fused mLSTM decode step in Triton, matching ``mlstm_naive.mlstm_recurrent_step``.

q, k [B, NH, DK]; v [B, NH, DV]; i, f [B, NH]; state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH]) float32.
One launch per step: every program owns a DV tile of one head's C, reads it once, writes the decayed-and-updated tile
back in place and reduces q^T C over DK on the fly, so C makes one trip through memory per step.
"""

from __future__ import annotations

import torch

from .mlstm_naive import _MIN_M_FOR_FLOOR, MLSTMState
from .triton_utils import HAS_TRITON, device_properties, pow2_tile, require_triton, store_dtype, tl, triton

if HAS_TRITON:
    from .triton_utils import SUM as _SUM
    from .triton_utils import logsigmoid as _logsigmoid

    _MIN_M_C = tl.constexpr(_MIN_M_FOR_FLOOR)

    @triton.jit
    def _mlstm_step_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        i_ptr,
        f_ptr,
        C_ptr,
        n_ptr,
        m_ptr,
        n_out_ptr,
        m_out_ptr,
        h_ptr,
        scale,
        eps,
        DK: tl.constexpr,
        DV: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
    ):
        i_bh = tl.program_id(0).to(tl.int64)
        i_v = tl.program_id(1)
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < DV

        ig = tl.load(i_ptr + i_bh).to(tl.float32)
        fg = tl.load(f_ptr + i_bh).to(tl.float32)
        m = tl.load(m_ptr + i_bh)
        logf = _logsigmoid(fg)
        m_new = tl.maximum(logf + m, ig)
        decay = tl.exp(logf + m - m_new)
        gain = tl.exp(ig - m_new)
        v = tl.load(v_ptr + i_bh * DV + o_v, mask=mask_v, other=0.0).to(tl.float32)  # [BV]

        num = tl.full([BV], 0.0, tl.float32)
        den = tl.full([BK], 0.0, tl.float32)
        for i_k in range(0, (DK + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            mask_k = o_k < DK
            q = tl.load(q_ptr + i_bh * DK + o_k, mask=mask_k, other=0.0).to(tl.float32) * scale  # [BK]
            k = tl.load(k_ptr + i_bh * DK + o_k, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
            p_C = C_ptr + i_bh * DK * DV + o_k[:, None] * DV + o_v[None, :]
            mask_kv = mask_k[:, None] & mask_v[None, :]
            C = decay * tl.load(p_C, mask=mask_kv, other=0.0) + gain * k[:, None] * v[None, :]  # [BK, BV]
            tl.store(p_C, C, mask=mask_kv)
            n = decay * tl.load(n_ptr + i_bh * DK + o_k, mask=mask_k, other=0.0) + gain * k  # [BK]
            if i_v == 0:
                tl.store(n_out_ptr + i_bh * DK + o_k, n, mask=mask_k)
            num += tl.reduce(q[:, None] * C, 0, _SUM)
            den += q * n
        den_sum = tl.reduce(den, 0, _SUM)
        floor = tl.exp(-tl.maximum(m_new, _MIN_M_C))
        h = num / (tl.maximum(tl.abs(den_sum), floor) + eps)
        tl.store(h_ptr + i_bh * DV + o_v, h.to(h_ptr.dtype.element_ty), mask=mask_v)
        if i_v == 0:
            tl.store(m_out_ptr + i_bh, m_new)


MAX_HEAD_DIM = 1024


def mlstm_step_unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton step cannot run q [B, NH, DK], v [B, NH, DV], or None when it can."""
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (float32, bfloat16 or float16 expected)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims DK={q.shape[-1]}, DV={v.shape[-1]} above {MAX_HEAD_DIM}"
    return None


def _launch(BH: int, DK: int, DV: int, device: torch.device) -> tuple[int, int, int]:
    """Tiles (BK, BV) and warps. A step reads and writes each head's C [DK, DV] once: the kernel is bound by that
    traffic, spread over programs that own a DV tile each. 64 x 64 float32 tiles (32 values per thread at 4 warps)
    compile to under 100 registers without spills; BV is halved (down to 16) until the launch has two programs per
    SM, so that a batch-1 step at 7B heads (8 heads, DV 512) runs 256 programs of 64 x 16 rather than 64."""
    _, sm_count = device_properties(device)
    BV = pow2_tile(DV, 64)
    while BH * triton.cdiv(DV, BV) < 2 * sm_count and BV > 16:
        BV //= 2
    return pow2_tile(DK, 64), BV, 4


def mlstm_step_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    C: torch.Tensor,
    n: torch.Tensor,
    m: torch.Tensor,
    eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Updates C [B, NH, DK, DV] in place; returns h [B, NH, DV] and the new n [B, NH, DK], m [B, NH]."""
    B, NH, DK = q.shape
    DV = v.shape[-1]
    BK, BV, num_warps = _launch(B * NH, DK, DV, q.device)
    h = torch.empty(B, NH, DV, device=q.device, dtype=store_dtype(q.dtype))
    n_new = torch.empty_like(n)
    m_new = torch.empty_like(m)
    _mlstm_step_kernel[(B * NH, triton.cdiv(DV, BV))](
        q, k, v, i, f, C, n, m, n_new, m_new, h,
        scale=scale, eps=eps, DK=DK, DV=DV, BK=BK, BV=BV, num_warps=num_warps,
    )  # fmt: skip
    return h.to(q.dtype), n_new, m_new


def mlstm_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    eps: float = 1e-6,
    scale: float | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """One mLSTM step for a batch of single tokens: the same function as ``mlstm_naive.mlstm_recurrent_step``.

    q, k [B, NH, DK]; v [B, NH, DV]; i, f [B, NH]; state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH]).
    Returns h [B, NH, DV] in q's dtype and the new state. The state is updated in place when its tensors are
    contiguous float32 (the returned tensors are then the given ones); otherwise new tensors are returned. Use the
    returned state either way. Inference only: no autograd (train with ``mlstm_chunkwise_triton``).
    """
    require_triton("the Triton mLSTM step")
    C, n, m = state
    B, NH, DK = q.shape
    DV = v.shape[-1]
    expected = ((B, NH, DK), (B, NH, DV), (B, NH), (B, NH), (B, NH, DK, DV), (B, NH, DK), (B, NH))
    got = tuple(tuple(t.shape) for t in (k, v, i, f, C, n, m))
    if got != expected:
        raise ValueError(f"mLSTM step: shapes of k, v, i, f, C, n, m are {got}, expected {expected}")
    reason = mlstm_step_unsupported(q, v)
    if reason is not None:
        raise ValueError(f"mlstm_step_triton: q {tuple(q.shape)}, v {tuple(v.shape)}: {reason}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, i, f, C, n, m)):
        raise RuntimeError("mlstm_step_triton updates the state in place and has no backward; call it under "
                           "torch.no_grad() or train with mlstm_chunkwise_triton")  # fmt: skip
    scale = DK**-0.5 if scale is None else scale
    C, n, m = (t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in (C, n, m))
    q, k, v = (t.contiguous() for t in (q, k, v))
    h, n_new, m_new = mlstm_step_fwd(q, k, v, i.contiguous(), f.contiguous(), C, n, m, eps, scale)
    # Every program reads all of n, so the kernel writes n and m to new buffers; copied back to keep the update
    # in place (two tiny copies beside the DK x DV read and write of C).
    n.copy_(n_new)
    m.copy_(m_new)
    return h, (C, n, m)
