"""Backward identities shared by the chunkwise mLSTM kernels (``mlstm_chunk_torch`` on any device, ``mlstm_chunk``
in Triton): both compute dq, dk, dv with the stabiliser m held constant, then finish here.

Notation as in ``mlstm_naive``: q, k [B, NH, S, DK]; i, f [B, NH, S]; m0 [B, NH]. Per position, h = num / N with
N = max(|den|, exp(-max(m_row, -80))) + eps, where num and den scale with exp(-m_row).
"""

from __future__ import annotations

import torch

from .mlstm_naive import _MIN_M_FOR_FLOOR


def normaliser_grads(
    h: torch.Tensor, dh: torch.Tensor, m_row: torch.Tensor, den: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From h = num / N with N = max(|den|, exp(-max(m, -80))) + eps, all [B, NH, S]: 1 / N, dL/d den, and dL/d m
    where num and den scale with exp(-m) (so h depends on m only through eps and the clamp)."""
    floor = torch.exp(-m_row.clamp(min=_MIN_M_FOR_FLOOR))
    den_wins = den.abs() >= floor
    N = torch.where(den_wins, den.abs(), floor) + eps
    hdh = (h.float() * dh.float()).sum(-1)  # [B, NH, S]
    dden = torch.where(den_wins, -hdh / N * torch.sign(den), torch.zeros_like(den))
    dN_dm = torch.where(den_wins, -den.abs(), torch.where(m_row > _MIN_M_FOR_FLOOR, -floor, torch.zeros_like(floor)))
    dm_row = -hdh * (1 + dN_dm / N)
    return 1 / N, dden, dm_row


def gate_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    logf: torch.Tensor,
    m0: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dm_row: torch.Tensor,
    dF_last: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """di, df [B, NH, S] and dm0 [B, NH].

    With m constant, i_t enters every term through exp(i_t) k_t and F_t (cumulative log forget gate) through
    exp(F_t) q_t and exp(-F_t) k_t, so di = k . dk and dF = q . dq - k . dk (+ dF_last at the last position, the
    final state's exp(F_S)). dm_row [B, NH, S] is then routed to the term that attains each m_t = max(m0 + F_t,
    max_{j <= t} i_j + F_t - F_j)."""
    kdk = (k.float() * dk).sum(-1)  # [B, NH, S]
    di = kdk.clone()
    dF = (q.float() * dq).sum(-1) - kdk
    dF[..., -1] += dF_last
    Fc = logf.cumsum(-1)  # [B, NH, S]
    best, idx = torch.cummax(i.float() - Fc, dim=-1)  # [B, NH, S]
    from_state = m0[..., None] > best
    dm_pos = torch.where(from_state, torch.zeros_like(dm_row), dm_row)
    dF += dm_row
    di.scatter_add_(-1, idx, dm_pos)
    dF.scatter_add_(-1, idx, -dm_pos)
    dm0 = torch.where(from_state, dm_row, torch.zeros_like(dm_row)).sum(-1)
    dlogf = dF.flip(-1).cumsum(-1).flip(-1)
    return di, dlogf * torch.sigmoid(-f.float()), dm0
