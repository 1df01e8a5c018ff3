"""mLSTM in plain PyTorch: the ground truth for every mLSTM kernel of this package.

Notation (one layout for every tensor):
    B batch, NH heads, S sequence length, DK q/k head dim, DV v head dim, L chunk length, NC number of chunks.
    q, k: [B, NH, S, DK]; v: [B, NH, S, DV]; i, f: [B, NH, S] input/forget gate pre-activations.
    state (C, n, m): C [B, NH, DK, DV], n [B, NH, DK], m [B, NH], always float32.

Recurrence (exponential input gate, sigmoid forget gate, max stabiliser m; s = DK**-0.5 scales q):
    m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)
    C_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T
    n_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
    h_t = (s q_t)^T C_t / (max(|(s q_t)^T n_t|, exp(-m_t)) + eps)

An empty memory is C = 0, n = 0 and m = ``empty_m``: 0.0 reproduces the xLSTM-7B kernels, -inf the paper's parallel
formulation. The three forms below compute the same function; every one computes in float32 and returns h in the
dtype of q.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Gate pre-activations of a position that must not touch the memory (padding): the input gate keeps it from being
# written (finite, so that a run of such positions never produces inf - inf), the forget gate from decaying it
# (logsigmoid(1e4) == 0.0 in float32).
MASKED_IGATE = -1.0e4
MASKED_FGATE = 1.0e4
# exp(-m) is evaluated at m >= -80 so that it stays finite (exp(88.7) overflows float32) for padded rows whose m is
# MASKED_IGATE or -inf; real rows reach m < -80 only with input gates below -80, where h is 0 at float32 precision.
_MIN_M_FOR_FLOOR = -80.0


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """logsigmoid(x) as -softplus(-x): the same values, but F.logsigmoid enters a parallel region even for a few
    elements on CPU, whose cost dominated the per-token cost of the recurrent forms."""
    return -F.softplus(-x)


def empty_state(
    B: int, NH: int, DK: int, DV: int, empty_m: float, device: torch.device | str | None = None
) -> MLSTMState:
    """An empty memory: C [B, NH, DK, DV], n [B, NH, DK], m [B, NH], float32."""
    C = torch.zeros(B, NH, DK, DV, dtype=torch.float32, device=device)
    n = torch.zeros(B, NH, DK, dtype=torch.float32, device=device)
    m = torch.full((B, NH), empty_m, dtype=torch.float32, device=device)
    return C, n, m


def check_mlstm_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor) -> None:
    """Raises ValueError unless q, k [B, NH, S, DK], v [B, NH, S, DV], i, f [B, NH, S] with S >= 1."""
    B, NH, S, _ = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or i.shape != (B, NH, S) or f.shape != (B, NH, S):
        raise ValueError(
            f"mLSTM inputs: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, i {tuple(i.shape)}, "
            f"f {tuple(f.shape)}; expected q, k [B, NH, S, DK], v [B, NH, S, DV], i, f [B, NH, S]"
        )
    if S == 0:
        raise ValueError("mLSTM needs a sequence of at least one position, got S = 0")


def _initial_state(initial_state: MLSTMState | None, q: torch.Tensor, v: torch.Tensor, empty_m: float) -> MLSTMState:
    B, NH, _, DK = q.shape
    DV = v.shape[-1]
    if initial_state is None:
        return empty_state(B, NH, DK, DV, empty_m, q.device)
    C, n, m = initial_state
    for name, t, shape in (("C", C, (B, NH, DK, DV)), ("n", n, (B, NH, DK)), ("m", m, (B, NH))):
        if tuple(t.shape) != shape:
            raise ValueError(f"mLSTM initial state {name} has shape {tuple(t.shape)}, expected {shape}")
    return C.float(), n.float(), m.float()


def _normalise(num: torch.Tensor, den: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """num [..., DV] / (max(|den|, exp(-m)) + eps) with den, m [...]."""
    floor = torch.exp(-m.clamp(min=_MIN_M_FOR_FLOOR))
    return num / (torch.maximum(den.abs(), floor) + eps)[..., None]


def _segment_decay(g: torch.Tensor) -> torch.Tensor:
    """g [.., NC] -> [.., NC + 1, NC]: entry (c, c') = g[c' + 1] + ... + g[c - 1] for c' < c, -inf elsewhere.
    Summed per entry (a masked cumsum) rather than as a difference of two long cumsums, which would lose precision
    over long sequences."""
    NC = g.shape[-1]
    rows = torch.arange(NC, device=g.device)
    between = rows[:, None] > rows[None, :]  # [NC, NC] (r, c'): r > c'
    cs = (g[..., :, None] * between).cumsum(-2)  # [.., NC, NC] (r, c') = g[c' + 1] + ... + g[r]
    seg = F.pad(cs, (0, 0, 1, 0))  # row c holds the sum up to c - 1
    valid = rows[None, :] < torch.arange(NC + 1, device=g.device)[:, None]  # [NC + 1, NC]: c' < c
    return seg.masked_fill(~valid, float("-inf"))


def mlstm_recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    eps: float = 1e-6,
    scale: float | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """One step of the recurrence.

    q, k [B, NH, DK]; v [B, NH, DV]; i, f [B, NH]; state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH]).
    Returns h [B, NH, DV] in q's dtype and the new float32 state.
    """
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, i, f, C, n, m = (t if t.dtype == torch.float32 else t.float() for t in (q, k, v, i, f, *state))
    logf_m = log_sigmoid(f) + m  # [B, NH]
    m_new = torch.maximum(logf_m, i)
    decay = torch.exp(logf_m - m_new)[..., None]  # [B, NH, 1]
    k_in = torch.exp(i - m_new)[..., None] * k  # [B, NH, DK] the key with its input gate
    C = torch.addcmul(C * decay[..., None], k_in[..., :, None], v[..., None, :])  # [B, NH, DK, DV]
    n = torch.addcmul(k_in, n, decay)
    qs = q * scale
    num = (qs[..., None, :] @ C).squeeze(-2)  # [B, NH, DV]
    den = (qs * n).sum(-1)  # [B, NH]
    return _normalise(num, den, m_new, eps).to(dtype), (C, n, m_new)


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    eps: float = 1e-6,
    scale: float | None = None,
    empty_m: float = 0.0,
) -> tuple[torch.Tensor, MLSTMState]:
    """The recurrence step by step over S: h [B, NH, S, DV] and the final state."""
    state = _initial_state(initial_state, q, v, empty_m)
    hs = []
    for t in range(q.shape[2]):
        h, state = mlstm_recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps, scale)
        hs.append(h)
    return torch.stack(hs, dim=2), state


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    eps: float = 1e-6,
    scale: float | None = None,
    empty_m: float = 0.0,
) -> tuple[torch.Tensor, MLSTMState]:
    """The quadratic (attention-like) form: h [B, NH, S, DV] and the final state. O(S^2) memory."""
    dtype = q.dtype
    B, NH, S, DK = q.shape
    scale = DK**-0.5 if scale is None else scale
    C0, n0, m0 = _initial_state(initial_state, q, v, empty_m)
    q, k, v, i, f = (t.float() for t in (q, k, v, i, f))
    F_cum = log_sigmoid(f).cumsum(-1)  # [B, NH, S]
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_d = (F_cum[..., :, None] - F_cum[..., None, :] + i[..., None, :]).masked_fill(~causal, float("-inf"))
    m_inter = F_cum + m0[..., None]  # [B, NH, S]
    m = torch.maximum(log_d.amax(-1), m_inter)  # [B, NH, S]
    qs = q * scale
    s_mat = (qs @ k.transpose(-1, -2)) * torch.exp(log_d - m[..., None])  # [B, NH, S, S]
    q_inter = qs * torch.exp(m_inter - m)[..., None]  # [B, NH, S, DK]
    num = s_mat @ v + q_inter @ C0
    den = s_mat.sum(-1) + (q_inter * n0[..., None, :]).sum(-1)
    h = _normalise(num, den, m, eps)

    m_last = m[..., -1]  # [B, NH]
    w = torch.exp(F_cum[..., -1:] - F_cum + i - m_last[..., None])  # [B, NH, S]
    decay = torch.exp(F_cum[..., -1] + m0 - m_last)  # [B, NH]
    C = decay[..., None, None] * C0 + (k * w[..., None]).transpose(-1, -2) @ v
    n = decay[..., None] * n0 + (k * w[..., None]).sum(-2)
    return h.to(dtype), (C, n, m_last)


def mlstm_chunkwise(
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
    """The chunkwise form: h [B, NH, S, DV] and the final state, O(S L) memory and time.

    1. inter-chunk: the state entering each chunk, by a recurrence over the NC chunks;
    2. intra-chunk: within every chunk in parallel, the quadratic form over L positions plus the entering state.
    Any S: the last chunk is padded with positions that do not touch the memory.
    """
    dtype = q.dtype
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    scale = DK**-0.5 if scale is None else scale
    C, n, m = _initial_state(initial_state, q, v, empty_m)
    L = min(chunk_size, S)
    NC = math.ceil(S / L)
    pad = NC * L - S
    q, k, v, i = (t.float() for t in (q, k, v, i))
    logf = log_sigmoid(f.float())
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i = F.pad(i, (0, pad), value=MASKED_IGATE)
        logf = F.pad(logf, (0, pad))
    qs = (q * scale).view(B, NH, NC, L, DK)
    k = k.view(B, NH, NC, L, DK)
    v = v.view(B, NH, NC, L, DV)
    i = i.view(B, NH, NC, L)
    b = logf.view(B, NH, NC, L).cumsum(-1)  # [B, NH, NC, L] decay from chunk start to t (inclusive)
    g = b[..., -1]  # [B, NH, NC] decay over the whole chunk

    # 1. inter-chunk: the state entering chunk c (c = 0..NC, the last one is the final state) is a weighted sum of the
    # chunks' own contributions kv[c'] (log scale a_max[c'] at the end of chunk c') decayed by the chunks between,
    # and of the initial state. One matmul instead of a loop over chunks.
    a = g[..., None] - b + i  # [B, NH, NC, L] log weight of position t in the chunk's end state
    a_max = a.amax(-1)  # [B, NH, NC]
    k_w = k * torch.exp(a - a_max[..., None])[..., None]  # [B, NH, NC, L, DK]
    kv = k_w.transpose(-1, -2) @ v  # [B, NH, NC, DK, DV]
    k_sum = k_w.sum(-2)  # [B, NH, NC, DK]
    log_w = a_max[..., None, :] + _segment_decay(g)  # [B, NH, NC + 1, NC] log weight of chunk c' in state c
    log_w0 = m[..., None] + F.pad(g.cumsum(-1), (1, 0))  # [B, NH, NC + 1] log weight of the initial state
    m_in = torch.maximum(log_w.amax(-1), log_w0)  # [B, NH, NC + 1]
    m_ref = torch.where(torch.isinf(m_in), torch.zeros_like(m_in), m_in)  # an empty memory stays 0, not nan
    w = torch.exp(log_w - m_ref[..., None])  # [B, NH, NC + 1, NC]
    w0 = torch.exp(log_w0 - m_ref)  # [B, NH, NC + 1]
    C_all = (w @ kv.flatten(-2)).view(B, NH, NC + 1, DK, DV) + w0[..., None, None] * C[:, :, None]
    n_all = w @ k_sum + w0[..., None] * n[:, :, None]  # [B, NH, NC + 1, DK]
    C_in, n_in, m_in, (C, n, m) = (
        C_all[:, :, :-1],
        n_all[:, :, :-1],
        m_in[..., :-1],
        (
            C_all[:, :, -1],
            n_all[:, :, -1],
            m_in[..., -1],
        ),
    )

    # 2. intra-chunk outputs. log D[t, j] = b[t] - b[j] + i[j] (j <= t); its row max is b[t] + cummax(i - b)[t], so
    # the [L, L] matrix is built once, already stabilised.
    w_col = i - b  # [B, NH, NC, L]
    m_inter = b + m_in[..., None]  # [B, NH, NC, L]
    m_row = torch.maximum(b + w_col.cummax(-1).values, m_inter)  # [B, NH, NC, L]
    upper = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    log_d = ((b - m_row)[..., :, None] + w_col[..., None, :]).masked_fill(upper, float("-inf"))
    s_mat = (qs @ k.transpose(-1, -2)) * torch.exp(log_d)  # [B, NH, NC, L, L]
    q_inter = qs * torch.exp(m_inter - m_row)[..., None]  # [B, NH, NC, L, DK]
    num = s_mat @ v + q_inter @ C_in  # [B, NH, NC, L, DV]
    den = s_mat.sum(-1) + (q_inter * n_in[..., None, :]).sum(-1)  # [B, NH, NC, L]
    h = _normalise(num, den, m_row, eps).reshape(B, NH, NC * L, DV)[:, :, :S]
    return h.to(dtype), (C, n, m)
