"""sLSTM in plain PyTorch: the ground truth for every sLSTM kernel of this package.

Notation: B batch, NH heads, S sequence length, DH head dim.
    x: [B, NH, S, 4 * DH] gate pre-activations from the input (bias included), gate-major inside a head: i, f, z, o.
    r: [NH, DH, 4 * DH] block-diagonal recurrent matrices, same gate order: the pre-activations are x_t + h_{t-1} @ r.
    state (h, c, n, m): each [B, NH, DH], always float32.

Recurrence (exponential input gate, sigmoid forget gate, max stabiliser m):
    m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)
    c_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) c_{t-1} + exp(i_t - m_t) tanh(z_t)
    n_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t)
    h_t = sigmoid(o_t) c_t / n_t

An empty state is h = c = n = 0 and m = -inf (the first step then sets m_1 = i_1).
"""

from __future__ import annotations

import torch

from .mlstm_naive import log_sigmoid

SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def slstm_empty_state(B: int, NH: int, DH: int, device: torch.device | str | None = None) -> SLSTMState:
    """An empty state (h, c, n, m), each [B, NH, DH] float32."""
    zeros = torch.zeros(B, NH, DH, dtype=torch.float32, device=device)
    return zeros, zeros.clone(), zeros.clone(), torch.full_like(zeros, float("-inf"))


def slstm_recurrent_step(
    x: torch.Tensor, r: torch.Tensor, state: SLSTMState, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, SLSTMState]:
    """One step. x [B, NH, 4 * DH]; r [NH, DH, 4 * DH]; state (h, c, n, m) each [B, NH, DH];
    mask [B] bool (False: the position is padding and leaves the state unchanged).
    Returns h [B, NH, DH] float32 and the new state."""
    h, c, n, m = state
    raw = x.float() + torch.einsum("bhd,hdg->bhg", h, r.float())  # [B, NH, 4 * DH]
    i, f, z, o = raw.chunk(4, dim=-1)
    logf_m = log_sigmoid(f) + m
    m_new = torch.maximum(logf_m, i)
    decay = torch.exp(logf_m - m_new)
    gain = torch.exp(i - m_new)
    c_new = decay * c + gain * torch.tanh(z)
    n_new = decay * n + gain
    h_new = torch.sigmoid(o) * c_new / n_new
    new = (h_new, c_new, n_new, m_new)
    if mask is not None:
        keep = mask[:, None, None]
        new = tuple(torch.where(keep, a, b) for a, b in zip(new, state, strict=True))
    return new[0], new


def slstm_recurrent(
    x: torch.Tensor,
    r: torch.Tensor,
    initial_state: SLSTMState | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SLSTMState]:
    """The recurrence over S. x [B, NH, S, 4 * DH]; r [NH, DH, 4 * DH]; mask [B, S] bool or None.
    Returns h [B, NH, S, DH] in x's dtype and the final float32 state."""
    B, NH, S, G = x.shape
    DH = G // 4
    if r.shape != (NH, DH, 4 * DH):
        raise ValueError(f"sLSTM recurrent matrix has shape {tuple(r.shape)}, expected {(NH, DH, 4 * DH)}")
    if initial_state is None:
        state = slstm_empty_state(B, NH, DH, x.device)
    else:
        state = tuple(t.float() for t in initial_state)
        for t in state:
            if tuple(t.shape) != (B, NH, DH):
                raise ValueError(f"sLSTM initial state has shape {tuple(t.shape)}, expected {(B, NH, DH)}")
    hs = []
    for t in range(S):
        h, state = slstm_recurrent_step(x[:, :, t], r, state, None if mask is None else mask[:, t])
        hs.append(h)
    return torch.stack(hs, dim=2).to(x.dtype), state


def slstm_scan(
    x: torch.Tensor,
    r: torch.Tensor,
    initial_state: SLSTMState | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SLSTMState]:
    """`slstm_recurrent` as one `scan` operator over S instead of a Python loop: a graph that torch.export traces
    once for every length (the loop would be unrolled at the traced one). Same arguments and results."""
    from torch._higher_order_ops.scan import scan  # torch's scan operator, not yet a public name

    B, NH, S, G = x.shape
    DH = G // 4
    state = slstm_empty_state(B, NH, DH, x.device) if initial_state is None else tuple(t.float() for t in initial_state)
    keep = torch.ones(S, B, dtype=torch.bool, device=x.device) if mask is None else mask.t()

    def step(carry: SLSTMState, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[SLSTMState, torch.Tensor]:
        h, new = slstm_recurrent_step(inputs[0], r, carry, inputs[1])
        return new, h.clone()  # an output of scan may not alias its carry

    state, hs = scan(step, state, (x.permute(2, 0, 1, 3), keep))  # hs [S, B, NH, DH]
    return hs.permute(1, 2, 0, 3).to(x.dtype), state
