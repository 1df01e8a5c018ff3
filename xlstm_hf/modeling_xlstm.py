"""xLSTM models for transformers: the paper's mLSTM/sLSTM stacks and the xLSTM-7B stack.

Reading order: norms, conv, projections, mLSTM layers, sLSTM layer, feed-forward, blocks, cache, PreTrainedModel,
xLSTMModel, xLSTMForCausalLM. `mlstm_sequence` / `slstm_sequence` are the one place where kernel and reference are
chosen. Every tensor inside a layer is [B, S, D] (residual stream) or [B, NH, S, DH] (heads).
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_xlstm import xLSTMConfig
from .fused_ops import (
    FFN_ACTIVATIONS,
    FFN_ACTIVATIONS_INPLACE,
    GatedFFNFunction,
    LogitsLossFunction,
    RMSNormFunction,
    cpu_linear,
    fresh_add,
    fresh_mul,
    functorch_active,
    rms_norm,
    soft_cap,
)
from .mlstm_chunk import HAS_TRITON, mlstm_chunkwise_triton
from .mlstm_chunk_torch import mlstm_chunkwise_torch
from .mlstm_naive import (
    MASKED_IGATE,
    MLSTMState,
    empty_state,
    mlstm_parallel,
    mlstm_recurrent,
    mlstm_recurrent_step,
)
from .mlstm_step import mlstm_step_triton
from .slstm_fused import slstm_triton
from .slstm_naive import SLSTMState, slstm_recurrent

logger = logging.get_logger(__name__)

# Forget-gate pre-activation of a padded position: logsigmoid(1e4) == 0.0 in float32, so the memory is not decayed.
MASKED_FGATE = 1.0e4


def _dropout(dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """The module's dropout, skipped when it is the identity (p = 0 or eval): a decoding step has eight of them."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with float32 reductions; weight (ones) and optional bias."""

    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fresh_mul(F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype), self.weight)
        return fresh_add(y, self.bias) if self.bias is not None else y

    def foldable(self) -> bool:
        """Whether a caller may use the subclass's `normalize` and fold the weight into its next product: no bias, and
        no hook that expects the module called (an accelerate hook loads offloaded weights in it)."""
        return self.bias is None and not _hooked(self)


class RMSNorm(LayerNorm):
    """RMSNorm over the last dim with float32 reductions (the xLSTM-7B norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), without the weight: for a caller that folds the weight into its next products' weights
        ((x / rms * w) W^T = (x / rms) (W w)^T), which `foldable` allows."""
        return self._norm(x, None)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
        if needs_grad and not functorch_active():  # under torch.func, autograd through rms_norm's ops
            return RMSNormFunction.apply(x, weight, self.bias, self.eps)
        return rms_norm(x, weight, self.bias, self.eps)[0]


class MultiHeadLayerNorm(LayerNorm):
    """LayerNorm of every head separately: [B, NH, S, DH] -> [B, S, NH * DH], weight over NH * DH."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head normalisation alone, before weight and bias: [B, NH, S, DH] -> [B, S, NH * DH]."""
        B, NH, S, DH = x.shape
        y = F.layer_norm(x.float(), (DH,), eps=self.eps).to(x.dtype)  # [B, NH, S, DH]
        return y.transpose(1, 2).reshape(B, S, NH * DH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fresh_mul(self.normalize(x), self.weight)
        return fresh_add(y, self.bias) if self.bias is not None else y


@dataclass
class DocumentLayout:
    """Packed rows [B, S] holding several documents, and the right-padded layout [n_docs, longest] in which the
    sequence ops (conv, mLSTM, sLSTM) run, every document from an empty state; the projections, norms and
    feed-forwards stay on the packed tokens. Padding sits after each document's last token, so causal ops never carry
    it into a real position."""

    index: torch.Tensor  # [n_docs, longest] flat position in the B * S tokens (clamped in the padding)
    mask: torch.Tensor | None  # [n_docs, longest] bool, True for real tokens; None when no document is padded
    doc: torch.Tensor  # [B * S] document of each packed token
    pos: torch.Tensor  # [B * S] its position inside the document
    rows: tuple[int, int]  # (B, S)

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> DocumentLayout:
        """starts [B, S] bool marking each document's first token (every row starts one)."""
        B, S = starts.shape
        flat = starts.reshape(-1).clone()
        flat[::S] = True
        doc = flat.long().cumsum(0) - 1
        first = flat.nonzero().squeeze(-1)  # [n_docs] flat index of each document's first token
        pos = torch.arange(B * S, device=starts.device) - first[doc]
        lengths = torch.bincount(doc, minlength=first.shape[0])
        steps = torch.arange(int(lengths.max()), device=starts.device)
        index = (first[:, None] + steps).clamp(max=B * S - 1)
        mask = steps[None, :] < lengths[:, None]
        return cls(index, None if bool(mask.all()) else mask, doc, pos, (B, S))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, S, *F] -> [n_docs, longest, *F]"""
        return t.reshape(-1, *t.shape[2:])[self.index]

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        """[n_docs, longest, *F] -> [B, S, *F]"""
        return t[self.doc, self.pos].view(*self.rows, *t.shape[2:])

    def heads(self, t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """[B, NH, S, ...] -> [n_docs, NH, longest, ...], or back with `inverse`."""
        return (self.scatter if inverse else self.gather)(t.transpose(1, 2)).transpose(1, 2)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time with a state: the last KS - 1 inputs before the sequence.

    x [B, S, D], conv_state [B, KS - 1, D] or None (zeros) -> y [B, S, D], new conv_state [B, KS - 1, D].
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=True)

    def forward(
        self, x: torch.Tensor, conv_state: torch.Tensor | None, docs: DocumentLayout | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With `docs`: over every document of packed rows from zeros, and no window comes out."""
        if docs is not None:
            return docs.scatter(self(docs.gather(x), None)[0]), None
        B, S, D = x.shape
        if conv_state is None:
            conv_state = x.new_zeros(B, self.kernel_size - 1, D)
        xs = torch.cat([conv_state.to(x.dtype), x], dim=1)  # [B, KS - 1 + S, D]
        y = self.conv(xs.transpose(1, 2)).transpose(1, 2)  # the module (no padding): its hooks load offloaded weights
        return y, xs[:, xs.shape[1] - (self.kernel_size - 1) :].contiguous()


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: [.., NH * DI] -> [.., NH * DO] with weight [NH, DO, DI] (one block per head)."""

    def __init__(self, in_features: int, num_heads: int, out_features: int | None = None, bias: bool = False):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, out_features // num_heads, in_features // num_heads))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, self.num_heads, x.shape[-1] // self.num_heads).transpose(0, 1)  # [NH, N, DI]
        y = torch.bmm(x, self.weight.transpose(1, 2)).transpose(0, 1).reshape(*shape, -1)  # [.., NH * DO]
        return y + self.bias if self.bias is not None else y


def _hooked(m: nn.Module) -> bool:
    """Whether m has an accelerate hook (which may load offloaded weights when m is called) or forward hooks."""
    return hasattr(m, "_hf_hook") or bool(m._forward_hooks or m._forward_pre_hooks)


def _plain_linears(linears: tuple[nn.Module, ...] | list[nn.Module], x: torch.Tensor) -> bool:
    """Whether these modules may be bypassed by using their weights directly: plain nn.Linear of x's dtype, without an
    accelerate hook or forward hooks. PEFT adapters, offloaded weights and hooked modules are called as modules."""
    return all(type(m) is nn.Linear and m.weight.dtype == x.dtype and not _hooked(m) for m in linears)


@torch.compiler.assume_constant_result
def _threads() -> int:
    """Intra-op threads; a constant inside a compiled graph (torch.get_num_threads would break it), which is safe:
    any slicing of `linear` gives the same product."""
    return torch.get_num_threads()


def _decoding_step(x: torch.Tensor) -> bool:
    """Whether x [..., D] is a decoding step's input: at most 16 rows and no autograd, whose products `linear`
    splits (so they are left as they are, not folded or fused)."""
    return not torch.is_grad_enabled() and x.numel() // x.shape[-1] <= 16


def linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x). A plain nn.Linear (`_plain_linears`) of many float32 rows on a CPU runs through oneDNN (`cpu_linear`).
    For a few float32 rows on a CPU without autograd (a decoding step), it runs as one batched product over
    P = gcd(out_features, threads) slices of its weight's rows. Decoding the CPU benchmark model at batch 1 (2
    threads), against the module's product:
      - eager, MKL computes the slices on every thread where it computes a one-row product on one: 3.4 - 4.0 against
        3.7 - 4.1 ms per token while the weights come from memory, within 3% when they stay in cache (and at batch
        8); only for weights of 64K entries or more, as smaller ones lose more to the extra op than they gain;
      - compiled (`config.compile_decode`), inductor makes the batched one-row product its own multithreaded C++
        reduction, fused with its neighbours, where it leaves a one-row mm to MKL: 0.89 - 0.90 against 2.0 - 3.1 ms
        per token (every product split while compiling)."""
    if x.device.type != "cpu" or type(m) is not nn.Linear:
        return m(x)
    if not _decoding_step(x):
        return cpu_linear(x, m.weight, m.bias) if _plain_linears((m,), x) else m(x)
    K, N = m.in_features, m.out_features
    rows = x.numel() // K
    parts = math.gcd(N, _threads())
    if (
        parts < 2
        or N * K < (0 if torch.compiler.is_compiling() else 65536)
        or x.dtype != torch.float32
        or not m.weight.is_contiguous()
        or not _plain_linears((m,), x)
    ):
        return m(x)
    slices = m.weight.view(parts, N // parts, K).transpose(1, 2)  # [P, K, N / P]
    y = torch.bmm(x.reshape(1, rows, K).expand(parts, rows, K), slices)  # [P, rows, N / P]
    y = y.transpose(0, 1).reshape(*x.shape[:-1], N)
    return y if m.bias is None else y.add_(m.bias)


def fused_linears(
    owner: nn.Module, names: tuple[str, ...], x: torch.Tensor, in_scale: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The projections `owner.<name>(x * in_scale)` of one input as a single matmul over concatenated weights: one
    pass over x instead of one per projection (the gate projections have only NH outputs each), with `in_scale` (a
    norm's weight, [in_features]) folded into the weights. Used only for many rows (training, prefill), where
    concatenating the weights costs little next to the activations; a single decode step calls the modules. The
    modules are looked up on every call (see `_plain_linears`)."""
    linears = [getattr(owner, name) for name in names]
    if x.numel() // x.shape[-1] < 64 or not _plain_linears(linears, x):
        x = x if in_scale is None else x * in_scale
        return [linear(m, x) for m in linears]
    weight = torch.cat([m.weight for m in linears])
    weight = weight if in_scale is None else weight * in_scale
    sizes = [m.out_features for m in linears]
    if all(m.bias is not None for m in linears):
        return list(cpu_linear(x, weight, torch.cat([m.bias for m in linears])).split(sizes, dim=-1))
    # some biases (the 7B gates' only): added to their own outputs, not as zeros concatenated into a full-width bias
    # whose gradient sums every column
    outs = cpu_linear(x, weight).split(sizes, dim=-1)
    return [y if m.bias is None else y + m.bias for m, y in zip(linears, outs, strict=True)]


def _apply_mask_to_gates(
    i: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """i, f [B, NH, S] float32; mask [B, S] bool. A padded position neither writes nor decays the memory."""
    if mask is None:
        return i, f
    keep = mask[:, None, :]
    return i.masked_fill(~keep, MASKED_IGATE), f.masked_fill(~keep, MASKED_FGATE)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _use_triton(config: xLSTMConfig, t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this call: `backend="auto"` on CUDA, `"triton"` anywhere Triton can run
    (CUDA, or the CPU interpreter with TRITON_INTERPRET=1); otherwise the PyTorch reference, with a one-time warning
    naming why when the kernels were asked for."""
    if config.backend == "torch" or (config.backend == "auto" and not t.is_cuda):
        return False
    if not HAS_TRITON:
        _warn_once(f'xLSTM backend="{config.backend}": triton is not installed, running the PyTorch reference '
                   "(pip install triton)")  # fmt: skip
        return False
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        _warn_once(f'xLSTM backend="triton": the kernels need a CUDA device (or TRITON_INTERPRET=1), inputs are on '
                   f"{t.device.type}: running the PyTorch reference")  # fmt: skip
        return False
    return True


def mlstm_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None,
    config: xLSTMConfig,
    docs: DocumentLayout | None = None,
) -> tuple[torch.Tensor, MLSTMState | None]:
    """q, k [B, NH, S, DK]; v [B, NH, S, DV]; i, f [B, NH, S] -> h [B, NH, S, DV], state. Chooses the kernel: the
    Triton chunkwise kernel and fused step (see `_use_triton`), else the PyTorch reference in the form that
    `config.mlstm_kernel` names. With `docs`: every document of packed rows from an empty state, no state out."""
    if docs is not None:
        i, f = _apply_mask_to_gates(docs.heads(i), docs.heads(f), docs.mask)
        h, _ = mlstm_sequence(docs.heads(q), docs.heads(k), docs.heads(v), i, f, None, config)
        return docs.heads(h, inverse=True), None
    eps, empty_m = config.mlstm_eps, config.mlstm_empty_max_state
    triton_ok = _use_triton(config, q)
    if q.shape[2] == 1:
        B, NH, _, DK = q.shape
        if state is None:
            state = empty_state(B, NH, DK, v.shape[-1], empty_m, q.device)
        step_args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], state, eps)
        if triton_ok and not torch.is_grad_enabled():
            # updates the state in place: a decoding step owns the cache's tensors
            h, state = mlstm_step_triton(*step_args)
        else:
            h, state = mlstm_recurrent_step(*step_args)
        return h[:, :, None], state
    if config.mlstm_kernel == "parallel":
        return mlstm_parallel(q, k, v, i, f, state, eps=eps, empty_m=empty_m)
    if config.mlstm_kernel == "recurrent":
        return mlstm_recurrent(q, k, v, i, f, state, eps=eps, empty_m=empty_m)
    if triton_ok:
        chunk = config.chunk_size
        if max(q.shape[-1], v.shape[-1]) > 512 or chunk < 16 or chunk & (chunk - 1):
            _warn_once(f"xLSTM Triton chunkwise kernel: head dims ({q.shape[-1]}, {v.shape[-1]}) above 512 or "
                       f"chunk_size={chunk} not a power of two >= 16: running the PyTorch reference")  # fmt: skip
        else:
            return mlstm_chunkwise_triton(q, k, v, i, f, state, chunk_size=chunk, eps=eps, empty_m=empty_m)
    return mlstm_chunkwise_torch(q, k, v, i, f, state, chunk_size=config.chunk_size, eps=eps, empty_m=empty_m)


def slstm_sequence(
    x: torch.Tensor,
    r: torch.Tensor,
    state: SLSTMState | None,
    mask: torch.Tensor | None,
    config: xLSTMConfig,
    docs: DocumentLayout | None = None,
) -> tuple[torch.Tensor, SLSTMState | None]:
    """x [B, NH, S, 4 * DH]; r [NH, DH, 4 * DH] -> h [B, NH, S, DH], state. Chooses the kernel: the fused Triton
    sLSTM (its time loop in one launch; heads above 128 fall back inside it with a warning) or the reference. With
    `docs`: every document of packed rows from an empty state, no state out."""
    if docs is not None:
        h, _ = slstm_sequence(docs.heads(x), r, None, docs.mask, config)
        return docs.heads(h, inverse=True), None
    if _use_triton(config, x):
        return slstm_triton(x, r, state, mask)
    return slstm_recurrent(x, r, state, mask)


def _init_spec(linear: nn.Linear, **spec: Any) -> nn.Linear:
    """Attach the papers' init of this projection (read by xLSTMPreTrainedModel._init_weights): ``wang_dim`` (Wang
    init of a residual output), ``zero_weight``, ``bias`` in {"linspace_3_6", "normal_0.1", float}."""
    linear.xlstm_init = spec
    return linear


class mLSTMLayer(nn.Module):
    """The paper's mLSTM layer: up-projection, causal conv, block-diagonal q/k/v, mLSTM, multi-head norm, learnable
    skip, output gate and down-projection. State: (C, n, m, conv_state)."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.config = config
        D, inner, NH = config.hidden_size, config.mlstm_inner_dim, config.num_heads
        self.num_heads = NH
        self.inner_dim = inner
        self.proj_up = nn.Linear(D, 2 * inner, bias=config.use_bias)
        self.conv1d = CausalConv1d(inner, config.conv1d_kernel_size)
        blocks = inner // config.qkv_proj_blocksize
        self.q_proj = HeadwiseLinear(inner, blocks, bias=config.use_bias)
        self.k_proj = HeadwiseLinear(inner, blocks, bias=config.use_bias)
        self.v_proj = HeadwiseLinear(inner, blocks, bias=config.use_bias)
        self.igate = _init_spec(nn.Linear(3 * inner, NH), zero_weight=True, bias="normal_0.1")
        self.fgate = _init_spec(nn.Linear(3 * inner, NH), zero_weight=True, bias="linspace_3_6")
        self.multihead_norm = MultiHeadLayerNorm(inner, config.norm_eps)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = _init_spec(nn.Linear(inner, D, bias=config.use_bias), wang_dim=D)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, state: tuple | None, docs: DocumentLayout | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        B, S, _ = x.shape
        NH = self.num_heads
        mlstm_state, conv_state = (None, None) if state is None else (state[:3], state[3])
        x_m, z = linear(self.proj_up, x).chunk(2, dim=-1)  # [B, S, inner] each
        if mask is not None:
            x_m = x_m * mask[..., None].to(x_m.dtype)
        x_c, conv_state = self.conv1d(x_m, conv_state, docs)
        x_c = F.silu(x_c)
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)  # [B, S, inner] each
        qkv = torch.cat([q, k, v], dim=-1)
        i = self.igate(qkv).transpose(1, 2).float()  # [B, NH, S]
        f = self.fgate(qkv).transpose(1, 2).float()
        i, f = _apply_mask_to_gates(i, f, mask)
        q, k, v = (t.view(B, S, NH, -1).transpose(1, 2) for t in (q, k, v))  # [B, NH, S, DH]
        h, mlstm_state = mlstm_sequence(q, k, v, i, f, mlstm_state, self.config, docs)
        state = None if docs is not None else (*mlstm_state, conv_state)
        h = self.multihead_norm(h)  # [B, S, inner]
        h = fresh_mul(fresh_add(self.learnable_skip * x_c, h), F.silu(z))
        return _dropout(self.dropout, linear(self.proj_down, h)), state


class mLSTM7BLayer(nn.Module):
    """The xLSTM-7B mLSTM layer: q/k/v and output-gate projections, soft-capped gates, mLSTM, multi-head norm.
    State: (C, n, m)."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        self.config = config
        D, NH, bias = config.hidden_size, config.num_heads, config.use_bias
        self.num_heads = NH
        self.q = nn.Linear(D, config.qk_dim, bias=bias)
        self.k = nn.Linear(D, config.qk_dim, bias=bias)
        self.v = nn.Linear(D, config.v_dim, bias=bias)
        self.ogate_preact = nn.Linear(D, config.v_dim, bias=bias)
        self.igate_preact = _init_spec(nn.Linear(D, NH, bias=True), zero_weight=True, bias=-10.0)
        self.fgate_preact = _init_spec(nn.Linear(D, NH, bias=True), zero_weight=True, bias="linspace_3_6")
        self.multihead_norm = MultiHeadLayerNorm(config.v_dim, config.norm_eps, bias=bias)
        self.out_proj = _init_spec(nn.Linear(config.v_dim, D, bias=bias), wang_dim=D)
        self.dropout = nn.Dropout(config.dropout)
        self.gate_soft_cap = config.gate_soft_cap

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        state: tuple | None,
        docs: DocumentLayout | None = None,
        in_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """x [B, S, D], times `in_scale` [D] when given (the block's norm weight, folded into the projections)."""
        B, S, _ = x.shape
        NH = self.num_heads
        names = ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact")
        q, k, v, o, i, f = fused_linears(self, names, x, in_scale)
        q, k, v = (t.view(B, S, NH, -1).transpose(1, 2) for t in (q, k, v))  # [B, NH, S, DH]
        i = soft_cap(i.float(), self.gate_soft_cap).transpose(1, 2)  # [B, NH, S]
        f = soft_cap(f.float(), self.gate_soft_cap).transpose(1, 2)
        i, f = _apply_mask_to_gates(i, f, mask)
        h, state = mlstm_sequence(q, k, v, i, f, state, self.config, docs)  # [B, NH, S, DV]
        norm, proj = self.multihead_norm, self.out_proj
        if not _decoding_step(x) and norm.foldable() and _plain_linears((proj,), h):
            # the norm's weight w folded into the projection: (gate * yhat * w) W^T = (gate * yhat) (W w)^T, a product
            # over the [D, v_dim] weight instead of one over the activation forward and two (and a sum) backward
            y = cpu_linear(fresh_mul(torch.sigmoid(o), norm.normalize(h)), proj.weight * norm.weight, proj.bias)
        else:
            y = linear(proj, fresh_mul(torch.sigmoid(o), norm(h)))
        return _dropout(self.dropout, y), state


class sLSTMLayer(nn.Module):
    """The paper's sLSTM layer: causal conv feeding the input and forget gates, block-diagonal gate projections,
    block-diagonal recurrent matrices, multi-head norm. State: (h, c, n, m, conv_state)."""

    def __init__(self, config: xLSTMConfig, block_idx: int):
        super().__init__()
        self.config = config
        self.block_idx = block_idx  # the forget-gate bias init depends on the depth
        D, NH = config.hidden_size, config.slstm_num_heads
        self.num_heads, self.head_dim = NH, D // NH
        self.conv1d = CausalConv1d(D, config.conv1d_kernel_size) if config.conv1d_kernel_size > 0 else None
        self.igate = HeadwiseLinear(D, NH)
        self.fgate = HeadwiseLinear(D, NH)
        self.zgate = HeadwiseLinear(D, NH)
        self.ogate = HeadwiseLinear(D, NH)
        self.recurrent_kernel = nn.Parameter(torch.zeros(NH, self.head_dim, 4 * self.head_dim))
        self.bias = nn.Parameter(torch.zeros(NH, 4 * self.head_dim))  # gate-major inside a head: i, f, z, o
        self.multihead_norm = MultiHeadLayerNorm(D, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, state: tuple | None, docs: DocumentLayout | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        B, S, _ = x.shape
        NH, DH = self.num_heads, self.head_dim
        slstm_state, conv_state = (None, None) if state is None else (state[:4], state[4])
        if self.conv1d is not None:
            x_in = x * mask[..., None].to(x.dtype) if mask is not None else x
            x_c, conv_state = self.conv1d(x_in, conv_state, docs)
            x_c = F.silu(x_c)
        else:
            x_c = x
        gates = torch.stack([self.igate(x_c), self.fgate(x_c), self.zgate(x), self.ogate(x)], dim=2)  # [B, S, 4, D]
        gates = gates.view(B, S, 4, NH, DH).permute(0, 3, 1, 2, 4).reshape(B, NH, S, 4 * DH)
        gates = gates + self.bias[:, None, :]
        h, slstm_state = slstm_sequence(gates, self.recurrent_kernel, slstm_state, mask, self.config, docs)
        state = None if docs is not None else (*slstm_state, conv_state)
        y = _dropout(self.dropout, self.multihead_norm(h))  # [B, S, D]
        return y, state


class GatedFeedForward(nn.Module):
    """act(proj_up_gate(x)) * proj_up(x) -> proj_down: GeLU-gated in the paper, SwiGLU in xLSTM-7B."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        D, H, bias = config.hidden_size, config.ffn_dim, config.use_bias
        self.proj_up_gate = nn.Linear(D, H, bias=bias)
        self.proj_up = nn.Linear(D, H, bias=bias)
        # Wang init over the model width in the paper, over the FFN width in xLSTM-7B
        self.proj_down = _init_spec(nn.Linear(H, D, bias=bias), wang_dim=D if config.architecture == "paper" else H)
        self.activation = config.ffn_activation
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D], times `in_scale` [D] when given (the block's norm weight, folded into the up-projections)."""
        # Two products rather than one over concatenated weights: the fused [B, S, 2 H] output is large enough that its
        # fresh pages cost more than the second pass over x (training step 304 against 311 ms, 5.5k fewer page faults)
        linears = (self.proj_up_gate, self.proj_up, self.proj_down)
        fused = (
            torch.is_grad_enabled()
            and _plain_linears(linears, x)
            and not torch.is_autocast_enabled(x.device.type)
            and not functorch_active()
        )
        if in_scale is not None and not fused:
            x = fresh_mul(x, in_scale)
        if not torch.is_grad_enabled():
            # in place only over a product that no hook can have handed in
            plain = _plain_linears((self.proj_up_gate,), x)
            act = FFN_ACTIVATIONS_INPLACE[self.activation] if plain else FFN_ACTIVATIONS[self.activation]
            y = linear(self.proj_down, fresh_mul(act(linear(self.proj_up_gate, x)), linear(self.proj_up, x)))
        elif fused:
            weights = [t for m in linears for t in (m.weight, m.bias)]
            if in_scale is not None:
                weights[0], weights[2] = weights[0] * in_scale, weights[2] * in_scale
            keep = x.device.type == "cpu"  # see GatedFFNFunction
            y = GatedFFNFunction.apply(x.reshape(-1, x.shape[-1]), *weights, self.activation, keep)
            y = y.view(*x.shape[:-1], -1)
        else:
            y = self.proj_down(FFN_ACTIVATIONS[self.activation](self.proj_up_gate(x)) * self.proj_up(x))
        return _dropout(self.dropout, y)


class xLSTMBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)) [+ ffn(norm_ffn(x))]. The mixer is an mLSTM layer (paper or 7B) or
    an sLSTM layer; the block is functional: it returns the new recurrent state instead of writing a cache."""

    def __init__(self, config: xLSTMConfig, block_idx: int):
        super().__init__()
        self.block_type = block_type = config.block_types[block_idx]
        norm = RMSNorm if config.architecture == "7b" else LayerNorm
        bias = config.use_bias and config.architecture == "7b"
        if block_type == "s":
            self.norm_slstm = norm(config.hidden_size, config.norm_eps, bias=bias)
            self.slstm_layer = sLSTMLayer(config, block_idx)
        else:
            self.norm_mlstm = norm(config.hidden_size, config.norm_eps, bias=bias)
            self.mlstm_layer = mLSTM7BLayer(config) if config.architecture == "7b" else mLSTMLayer(config)
        self.fold_norms = config.architecture == "7b"  # RMSNorm before the 7B layer and the feed-forward
        if block_type == "s" or config.architecture == "7b":
            self.norm_ffn = norm(config.hidden_size, config.norm_eps, bias=bias)
            self.ffn = GatedFeedForward(config)
        else:
            self.norm_ffn = self.ffn = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
        state: tuple | None = None,
        docs: DocumentLayout | None = None,
        return_state: bool = True,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """hidden_states [B, S, D] -> [B, S, D] and the state after them (None with `return_state=False`: the mixers'
        final states are views of their kernels' buffers, and a module that returns a view requiring grad makes FSDP2
        warn that an in-place op on it would skip its pre-backward hook)."""
        if self.block_type == "s":
            y, state = self.slstm_layer(self.norm_slstm(hidden_states), mask, state, docs)
        elif self._fold(self.norm_mlstm, self.mlstm_layer, hidden_states):
            x = self.norm_mlstm.normalize(hidden_states)
            y, state = self.mlstm_layer(x, mask, state, docs, in_scale=self.norm_mlstm.weight)
        else:
            y, state = self.mlstm_layer(self.norm_mlstm(hidden_states), mask, state, docs)
        hidden_states = hidden_states + y
        state = state if return_state else None
        if self.ffn is None:
            return hidden_states, state
        if self._fold(self.norm_ffn, self.ffn, hidden_states):
            y = self.ffn(self.norm_ffn.normalize(hidden_states), in_scale=self.norm_ffn.weight)
        else:
            y = self.ffn(self.norm_ffn(hidden_states))
        return hidden_states + y, state

    def _fold(self, norm: nn.Module, consumer: nn.Module, x: torch.Tensor) -> bool:
        """Whether the xLSTM-7B norm's weight goes into the next products' weights instead of over the activation:
        training and prefill (a decoding step keeps its products as they are, see `linear`), and no hook on the
        consumer, which would see its input without the weight. The norm's backward then makes four passes instead
        of six and no weight gradient of its own (that comes from the [out, D] product of the fold)."""
        return self.fold_norms and norm.foldable() and not _hooked(consumer) and not _decoding_step(x)


def _out_of_vocabulary(ids: torch.Tensor, vocab_size: int, ignored: int | None = None) -> int | None:
    """The first id outside [0, vocab_size) (other than `ignored`), or None. A data-dependent check: skipped while
    torch.compile traces, where it would break the graph, and under torch.func.vmap, which cannot take it."""
    if torch.compiler.is_compiling() or functorch_active():
        return None
    bad = (ids < 0) | (ids >= vocab_size)
    if ignored is not None:
        bad &= ids != ignored
    return ids[bad][0].item() if bool(bad.any()) else None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device type, and the same index where both name one ("cuda" matches "cuda:0")."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class xLSTMCache:
    """The recurrent state of every block, constant in size whatever the number of tokens processed.

    Per block: mLSTM (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH], and for the paper's layer the conv window
    [B, KS - 1, inner]); sLSTM (h, c, n, m [B, NH, DH] and the conv window [B, KS - 1, D]). The recurrent states are
    stored in `state_dtype` (float32 by default, whatever the weights' dtype); conv windows in the activations' dtype.
    """

    is_compileable = False

    def __init__(
        self,
        config: xLSTMConfig,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        state_dtype: torch.dtype | None = None,
    ):
        self.config = config
        self.batch_size = batch_size
        self.device = device
        self.state_dtype = state_dtype if state_dtype is not None else getattr(torch, config.state_dtype)
        if not self.state_dtype.is_floating_point:
            raise ValueError(f"xLSTMCache: state_dtype={self.state_dtype} must be a floating-point dtype")
        if batch_size < 1:
            raise ValueError(f"xLSTMCache: batch_size={batch_size} must be >= 1")
        self.states: list[tuple[torch.Tensor, ...] | None] = [None] * config.num_hidden_layers
        self.seqlen_offset = 0
        # (C, n, m) of an mLSTM block, (h, c, n, m) of an sLSTM block; a conv window may follow
        self._n_recurrent = [3 if t == "m" else 4 for t in config.block_types]
        self._block_types = config.block_types

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        return (
            f"xLSTMCache(batch_size={self.batch_size}, blocks={len(self.states)}, "
            f"seqlen_offset={self.seqlen_offset}, nbytes={self.nbytes})"
        )

    def get_layer_state(self, idx: int) -> tuple[torch.Tensor, ...] | None:
        return self.states[idx]

    def set_layer_state(self, idx: int, state: tuple[torch.Tensor, ...]) -> None:
        n = self._n_recurrent[idx]
        self.states[idx] = tuple(t.to(self.state_dtype) for t in state[:n]) + tuple(state[n:])

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens processed so far (generate() uses it to pass only the new tokens of a continued prompt)."""
        return self.seqlen_offset

    @property
    def is_linear(self) -> list[bool]:
        # generate() slices a continued prompt by get_seq_length() only for layers that are not "linear" (its name for
        # caches that do not count tokens); this cache counts them.
        return [False] * len(self.states)

    def check_compatible(
        self, config: xLSTMConfig, batch_size: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        """Raise a ValueError naming the mismatch when this cache cannot continue a batch of this model on `device`."""
        if self.config is not config and self._block_types != config.block_types:
            raise ValueError(
                f"cache was built for blocks {''.join(self._block_types)}, the model has {''.join(config.block_types)}"
            )
        if self.batch_size != batch_size:
            raise ValueError(
                f"cache was built for batch size {self.batch_size}, but the input has batch size {batch_size}"
            )
        for idx, state in enumerate(self.states):
            conv = state[-1] if state is not None and len(state) in (4, 5) else None
            if conv is not None and conv.dtype != dtype:
                raise ValueError(
                    f"cache block {idx} holds a conv window of dtype {conv.dtype}, but the activations are {dtype}: "
                    "a cache is tied to the dtype of the model that filled it"
                )
        held = next((t.device for st in self.states if st is not None for t in st if t is not None), None)
        held = held if held is not None or self.device is None else torch.device(self.device)
        if device is not None and held is not None and not _same_device(held, device):
            raise ValueError(
                f"cache holds its states on {held}, but the input is on {device}: move the cache with the model "
                "(or start a new one)"
            )

    @property
    def nbytes(self) -> int:
        """Bytes held by the states."""
        return sum(t.numel() * t.element_size() for s in self.states if s is not None for t in s if t is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search): every state tensor is indexed by `beam_idx` along the batch dim."""
        for idx, s in enumerate(self.states):
            if s is not None:
                self.states[idx] = tuple(t.index_select(0, beam_idx.to(t.device)) if t is not None else None for t in s)
        self.batch_size = int(beam_idx.shape[0])

    def detach(self) -> xLSTMCache:
        """Detach the states from the graph in place (truncated back-propagation through time)."""
        for idx, s in enumerate(self.states):
            if s is not None:
                self.states[idx] = tuple(t.detach() if t is not None else None for t in s)
        return self

    def reset(self) -> None:
        self.states = [None] * len(self.states)
        self.seqlen_offset = 0


@dataclass
class xLSTMOutput(ModelOutput):
    """last_hidden_state [B, S, D]; cache: the recurrent state after the last position; hidden_states: the
    embeddings and the output of every block (the last one after the output norm)."""

    last_hidden_state: torch.Tensor | None = None
    cache: xLSTMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class xLSTMCausalLMOutput(ModelOutput):
    """loss (scalar, with `labels`); logits [B, S, V]; cache; hidden_states as in xLSTMOutput."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: xLSTMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _small_init_std(dim: int) -> float:
    """Nguyen & Salazar (2019), used by both xLSTM papers: sqrt(2 / (5 d))."""
    return math.sqrt(2 / (5 * dim))


def _wang_init_std(dim: int, num_blocks: int) -> float:
    """Wang (2021), the output projections of residual branches: 2 / (num_blocks sqrt(d))."""
    return 2 / num_blocks / math.sqrt(dim)


def split_fused_xlstm_weights(state: dict[str, torch.Tensor], config: xLSTMConfig) -> dict[str, torch.Tensor]:
    """transformers' built-in xLSTM with ``weight_mode="fused"`` keeps q/k/v/output-gate, input/forget gate and the
    two FFN up-projections each in one matrix; ours keeps them apart (the ``"single"`` names)."""
    qk, vd, NH = config.qk_dim, config.v_dim, config.num_heads
    splits = {
        "mlstm_layer.qkv_opreact": (("q", "k", "v", "ogate_preact"), (qk, qk, vd, vd)),
        "mlstm_layer.ifgate_preact": (("igate_preact", "fgate_preact"), (NH, NH)),
        "ffn.proj_up_gate_z": (("proj_up_gate", "proj_up"), (config.ffn_dim, config.ffn_dim)),
    }
    out = {}
    for key, value in state.items():
        for fused, (names, sizes) in splits.items():
            if f".{fused}." in key:
                head, tail = key.split(f".{fused}.")
                parent = fused.rsplit(".", 1)[0] if "." in fused else ""
                for name, part in zip(names, torch.split(value, sizes, dim=0), strict=True):
                    out[f"{head}.{parent + '.' if parent else ''}{name}.{tail}"] = part.clone()
                break
        else:
            out[key] = value
    return out


_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder", "force_download", "proxies")


def _read_safetensors_checkpoint(path: Any, hub: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, local or on the Hub."""
    import json

    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    single = cached_file(path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    if single is not None:
        return load_file(single)
    index = cached_file(path, SAFE_WEIGHTS_INDEX_NAME, **hub)
    with open(index) as fh:
        shards = sorted(set(json.load(fh)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(cached_file(path, shard, **hub)))
    return state


def _only_tied(model: nn.Module, missing: list[str]) -> bool:
    return model.config.tie_word_embeddings and set(missing) <= {"lm_head.weight"}


class xLSTMPreTrainedModel(PreTrainedModel):
    config_class = xLSTMConfig
    config: xLSTMConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["xLSTMBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True
    _supports_cache_class = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """As PreTrainedModel.from_pretrained; a checkpoint of transformers' built-in xLSTM (``model_type: xlstm``,
        the NX-AI/xLSTM-7b layout) is converted on load: its config is translated (xLSTMConfig.from_dict), its
        weights carry the same names as ours, and the fused projections of ``weight_mode="fused"`` are split."""
        if kwargs.get("config") is None:
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            source, _ = xLSTMConfig.get_config_dict(pretrained_model_name_or_path, **hub)
            if source.get("model_type") == "xlstm" and source.get("weight_mode") == "fused":
                return cls._from_fused_transformers_xlstm(pretrained_model_name_or_path, source, hub, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if getattr(model.config, "source_weight_mode", None) is not None:
            del model.config.source_weight_mode
            problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            problems = {k: v for k, v in problems.items() if v and not (k == "missing_keys" and _only_tied(model, v))}
            if problems:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: the transformers xLSTM checkpoint does not map onto "
                    f"xlstm_hf's layout: {problems}"
                )
        return (model, info) if want_info else model

    @classmethod
    def _from_fused_transformers_xlstm(
        cls, path: Any, source: dict[str, Any], hub: dict[str, Any], kwargs: dict[str, Any]
    ) -> xLSTMPreTrainedModel:
        config = xLSTMConfig.from_dict(source)
        del config.source_weight_mode
        model = cls(config)
        prefix = "" if isinstance(model, xLSTMForCausalLM) else "backbone."
        state = split_fused_xlstm_weights(_read_safetensors_checkpoint(path, hub), config)
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [k for k in missing if not _only_tied(model, [k])] or unexpected:
            raise ValueError(f"{path}: fused transformers xLSTM checkpoint: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.eval()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialisation of the xLSTM papers: small init, Wang init for the residual branches' output projections,
        the gate biases of each layer type. Every special case is attached to the parameter's own module (see
        `_init_spec`): transformers skips modules without direct parameters when the model is remote code."""
        config = self.config
        D, L = config.hidden_size, config.num_hidden_layers
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=_small_init_std(D))
        elif isinstance(module, nn.Linear):
            spec = getattr(module, "xlstm_init", {})
            if spec.get("zero_weight"):
                init.zeros_(module.weight)
            else:
                std = _wang_init_std(spec["wang_dim"], L) if "wang_dim" in spec else _small_init_std(D)
                init.normal_(module.weight, std=std)
            if module.bias is not None:
                bias = spec.get("bias", 0.0)
                if bias == "linspace_3_6":
                    init.copy_(module.bias, torch.linspace(3.0, 6.0, module.bias.shape[0]))
                elif bias == "normal_0.1":
                    init.normal_(module.bias, std=0.1)
                else:
                    init.constant_(module.bias, float(bias))
        elif isinstance(module, LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, CausalConv1d):
            bound = 1 / math.sqrt(module.kernel_size)  # nn.Conv1d's default for a depthwise conv
            init.uniform_(module.conv.weight, -bound, bound)
            init.uniform_(module.conv.bias, -bound, bound)
        elif isinstance(module, HeadwiseLinear):
            init.normal_(module.weight, std=_small_init_std(D))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, mLSTMLayer):
            init.ones_(module.learnable_skip)
        elif isinstance(module, sLSTMLayer):
            init.zeros_(module.recurrent_kernel)
            init.copy_(module.bias, self._slstm_bias(module))

    def _slstm_bias(self, layer: sLSTMLayer) -> torch.Tensor:
        """[NH, 4 * DH]: zeros for i, z, o; the forget gate by `slstm_bias_init` (the paper's power law over the head
        dim, steeper in later blocks)."""
        config = self.config
        NH, DH = layer.num_heads, layer.head_dim
        bias = torch.zeros(NH, 4, DH)
        if config.slstm_bias_init == "powerlaw_blockdependent":
            ratio = layer.block_idx / (config.num_hidden_layers - 1) if config.num_hidden_layers > 1 else 0.0
            positions = torch.arange(DH) / max(DH - 1, 1)
            bias[:, 1] = -(-5.0 + 12.0 * positions ** (0.3 + 1.3 * ratio))
        elif config.slstm_bias_init == "small_init":
            bias[:, 1] = torch.linspace(3.0, 6.0, DH)
        return bias.reshape(NH, 4 * DH)


_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_step(model: nn.Module):
    """torch.compile of `model._decode_step`, one per model instance, kept outside the module so that the model
    still pickles and deep-copies."""
    if model not in _COMPILED_STEPS:
        # inductor's size, stride and alignment asserts on the inputs repeat what dynamo's guards check before every
        # call: 0.82 against 0.92 ms per step of the CPU benchmark model
        options = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
        _COMPILED_STEPS[model] = torch.compile(model._decode_step, dynamic=False, options=options)
    return _COMPILED_STEPS[model]


def _document_starts(
    kwargs: dict[str, Any], attention_mask: torch.Tensor | None, B: int, S: int, device: torch.device
) -> torch.Tensor | None:
    """[B, S] bool marking the first token of each packed document, or None for one document per row.

    Boundaries come from `cu_seq_lens_q` / `cu_seq_lens_k` (cumulative lengths over the flattened batch) or, without
    an attention_mask, from `position_ids` restarting at 0 (what DataCollatorWithFlattening produces)."""
    cu = kwargs.get("cu_seq_lens_q")
    cu = kwargs.get("cu_seq_lens_k") if cu is None else cu
    if cu is not None:
        cu = cu.to(device).long()
        if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != B * S or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"cu_seq_lens_q must rise from 0 to B * S = {B * S} (the flattened batch), got {cu.tolist()}"
            )
        starts = torch.zeros(B * S, dtype=torch.bool, device=device)
        starts[cu[:-1][cu[:-1] < B * S]] = True
        return starts.view(B, S) if bool(starts.view(B, S)[:, 1:].any()) else None
    position_ids = kwargs.get("position_ids")
    if position_ids is None or attention_mask is not None:
        return None
    if tuple(position_ids.shape) != (B, S):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(B, S)}")
    starts = position_ids.to(device) == 0
    return starts if bool(starts[:, 1:].any()) else None


class xLSTMModel(xLSTMPreTrainedModel):
    """Embeddings, the stack of blocks and the output norm."""

    def __init__(self, config: xLSTMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        self.blocks = nn.ModuleList([xLSTMBlock(config, idx) for idx in range(config.num_hidden_layers)])
        norm = RMSNorm if config.architecture == "7b" else LayerNorm
        bias = config.use_bias and config.architecture == "7b"
        self.out_norm = norm(config.hidden_size, config.norm_eps, bias=bias) if config.add_out_norm else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def _check_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: xLSTMCache | None,
    ) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("xLSTMModel.forward: pass exactly one of input_ids and inputs_embeds")
        x = input_ids if input_ids is not None else inputs_embeds
        if x.dim() != (2 if input_ids is not None else 3) or x.shape[1] == 0:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(
                f"xLSTMModel.forward: {name} has shape {tuple(x.shape)}, expected [B, S] with S > 0"
                + ("" if input_ids is not None else " and a last dim D")
            )
        bad = _out_of_vocabulary(input_ids, self.config.vocab_size) if input_ids is not None else None
        if bad is not None:
            raise ValueError(
                f"input_ids contains token id {bad} outside the vocabulary [0, vocab_size={self.config.vocab_size})"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(x.shape[:2])} (the "
                "xLSTM is recurrent: with a cache, pass the mask of the new tokens only)"
            )
        if cache is not None:
            if not isinstance(cache, xLSTMCache):
                raise ValueError(f"cache must be an xLSTMCache, got {type(cache).__name__}")
            cache.check_compatible(self.config, x.shape[0], self.embeddings.weight.dtype, x.device)

    def _run_blocks(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        states: list,
        output_hidden_states: bool,
        docs: DocumentLayout | None = None,
        return_states: bool = True,
    ) -> tuple[torch.Tensor, list, tuple[torch.Tensor, ...] | None]:
        """x [B, S, D] through every block, each from its state in `states` (None: empty); with `docs`, packed rows
        whose documents each start from an empty state (no state comes out), and without `return_states` (no cache)
        the blocks return none."""
        piece = self.config.max_inference_chunksize
        long_prompt = piece is not None and x.shape[1] > piece and not torch.is_grad_enabled()
        if long_prompt and docs is None and not output_hidden_states:
            # Long prompts without gradients: pieces through the whole stack, the state carried between them, so the
            # activations held at once are bounded by the piece length.
            outs = []
            for start in range(0, x.shape[1], piece):
                sl = slice(start, start + piece)
                h = x[:, sl]
                for idx, block in enumerate(self.blocks):
                    h, states[idx] = block(h, None if mask is None else mask[:, sl], states[idx])
                outs.append(h)
            return torch.cat(outs, dim=1), states, None
        all_hidden = (x,) if output_hidden_states else None
        for idx, block in enumerate(self.blocks):
            x, states[idx] = block(x, mask, states[idx], docs, return_state=return_states)
            if output_hidden_states:
                all_hidden += (x,)
        return x, states, all_hidden

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: xLSTMCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.LongTensor | None = None,
        cu_seq_lens_k: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> xLSTMOutput | tuple:
        """input_ids [B, S] (or inputs_embeds [B, S, D]); attention_mask [B, S] (1 real, 0 padding) of these tokens;
        cache: the state after the previous tokens (None: an empty state)."""
        if "cache_params" in kwargs or "past_key_values" in kwargs:
            cache = kwargs.pop("cache_params", None) or kwargs.pop("past_key_values", None) or cache
        self._check_inputs(input_ids, inputs_embeds, attention_mask, cache)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        mask = None
        if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
            mask = attention_mask.bool()

        boundaries = {"position_ids": position_ids, "cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k}
        starts = _document_starts(boundaries, attention_mask, x.shape[0], x.shape[1], x.device)
        if starts is not None:
            if cache is not None:
                raise ValueError(
                    "packed sequences (position_ids restarting at 0 or cu_seq_lens_q) start every document from an "
                    "empty state: they cannot continue from a cache"
                )
            # several documents per row: the sequence ops run them apart (DocumentLayout), the rest on the packed tokens
            docs = DocumentLayout.from_starts(starts)
            x, _, all_hidden = self._run_blocks(x, None, [None] * len(self.blocks), output_hidden_states, docs)
            use_cache = False
        else:
            if use_cache and cache is None:
                cache = xLSTMCache(self.config, x.shape[0], device=x.device)
            states = list(cache.states) if cache is not None else [None] * len(self.blocks)
            x, states, all_hidden = self._run_blocks(
                x, mask, states, output_hidden_states, return_states=cache is not None
            )
            if cache is not None:
                for idx, state in enumerate(states):
                    cache.set_layer_state(idx, state)
                cache.seqlen_offset += x.shape[1]
        x = self.out_norm(x)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (x,)
        out = xLSTMOutput(last_hidden_state=x, cache=cache if use_cache else None, hidden_states=all_hidden)
        return out if return_dict else out.to_tuple()


class xLSTMForCausalLM(xLSTMPreTrainedModel, GenerationMixin):
    """xLSTMModel with a language-model head; `labels` give the shifted cross-entropy (-100 ignored)."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: xLSTMConfig):
        super().__init__(config)
        self.backbone = xLSTMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> xLSTMModel:
        return self.backbone

    def _is_plain_decode_step(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        cache: xLSTMCache | None,
        labels: torch.LongTensor | None,
        output_hidden_states: bool | None,
        kwargs: dict[str, Any],
    ) -> bool:
        """A plain decoding step (one token per row after a prefill, no mask, labels or extras, no gradients) goes
        through `_decode_step`: the blocks alone, without the checks and bookkeeping of a general forward (2.3 against
        2.9 ms per token for the benchmark model on 2 CPU threads), compiled with `config.compile_decode`."""
        return bool(
            input_ids is not None
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and attention_mask is None
            and labels is None
            and not output_hidden_states
            and not kwargs
            and isinstance(cache, xLSTMCache)
            and all(s is not None for s in cache.states)
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        )

    def _decode_step(self, input_ids: torch.LongTensor, states: list) -> tuple[torch.Tensor, list]:
        """One token per row [B, 1] through the whole model from non-empty states -> logits [B, 1, V] and the new
        states: the function that `compile_decode` compiles."""
        x = self.backbone.embeddings(input_ids)
        new = []
        for block, state in zip(self.backbone.blocks, states, strict=True):
            x, state = block(x, None, state)
            new.append(state)
        return self._logits(self.backbone.out_norm(x)), new

    def _check_labels(self, labels: torch.Tensor, inputs: torch.Tensor | None) -> None:
        """labels must be [B, S] like the inputs (they are shifted inside, row by row) and hold token ids or -100."""
        if inputs is not None and tuple(labels.shape) != tuple(inputs.shape[:2]):
            raise ValueError(
                f"labels has shape {tuple(labels.shape)}, expected {tuple(inputs.shape[:2])} (one label per input "
                "position, [B, S]; they are shifted inside)"
            )
        bad = _out_of_vocabulary(labels, self.config.vocab_size, ignored=-100)
        if bad is not None:
            raise ValueError(
                f"labels contains {bad}, neither a token id in [0, vocab_size={self.config.vocab_size}) nor -100 "
                "(ignored)"
            )

    def _logit_cap(self) -> float | None:
        return self.config.output_logit_soft_cap if self.config.architecture == "7b" else None

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head, soft-capped in xLSTM-7B (in place over the head's own output when no hook can have handed it in)."""
        return soft_cap(linear(self.lm_head, h), self._logit_cap(), fresh=_plain_linears((self.lm_head,), h))

    def _logits_and_loss(
        self, h: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits [B, S, V] and the shifted LM loss of h [B, S, D] (the kept positions: when `logits_to_keep`
        drops some, they no longer match the labels and the loss function gets the logits). With a plain lm_head and
        the default loss, `LogitsLossFunction` computes both from the head's output in one pass, in float32 whatever
        the logits' dtype: a training step makes 2 new [B * S, V] tensors instead of 6 (more in bfloat16, where the
        loss upcasts the logits). Vocabulary 32000, 2 x 1024 tokens, 2 CPU threads: a training step of a 1-block
        model takes 635 - 663 against 865 - 870 ms and 860 against 1108 MB peak memory in float32; 468 - 479 against
        1017 - 1110 ms and 560 - 587 against 1179 MB in bfloat16."""
        if not (
            labels.shape == h.shape[:-1]
            and _plain_linears((self.lm_head,), h)
            and self.loss_function is ForCausalLMLoss
            and not functorch_active()
        ):
            logits = self._logits(h)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch
            )
            return logits, loss
        z = linear(self.lm_head, h)  # [B, S, V]
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1).to(z.device)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(z.device)
        return LogitsLossFunction.apply(z, targets, self._logit_cap(), -100, num_items_in_batch)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: xLSTMCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The inputs of one generate() step: the new tokens (or the prompt's embeddings at the first step), the
        cache, and the attention mask of the new tokens only (the state carries the rest; an all-ones mask is
        dropped), no position ids. Written out rather than built on GenerationMixin's, which inspects the forward
        signature of remote-code models at every step (about 0.1 ms per token on CPU)."""
        if inputs_embeds is not None and is_first_iteration:
            embeds = inputs_embeds if next_sequence_length is None else inputs_embeds[:, -next_sequence_length:]
            inputs: dict[str, Any] = {"input_ids": None, "inputs_embeds": embeds.contiguous()}
            new_tokens = embeds.shape[1]
        else:
            ids = input_ids if next_sequence_length is None else input_ids[:, -next_sequence_length:]
            inputs = {"input_ids": ids.clone(memory_format=torch.contiguous_format)}  # one stride for compile
            new_tokens = ids.shape[1]
        if cache is not None:
            inputs["cache"] = cache
        if attention_mask is not None:
            mask = attention_mask[:, -new_tokens:]
            inputs["attention_mask"] = None if bool(mask.all()) else mask
        for key, value in kwargs.items():
            if key not in ("labels", "position_ids", "token_type_ids") and key not in inputs:
                inputs[key] = value
        device = self.lm_head.weight.device
        for key in ("input_ids", "inputs_embeds", "attention_mask"):
            t = inputs.get(key)
            if isinstance(t, torch.Tensor) and t.device != device and device.type != "meta":
                inputs[key] = t.to(device)
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: xLSTMCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.LongTensor | None = None,
        cu_seq_lens_k: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> xLSTMCausalLMOutput | tuple:
        """As xLSTMModel.forward; labels [B, S] (shifted inside, -100 ignored); logits_to_keep: compute the logits of
        the last positions only (0: all)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        packed = position_ids is not None or cu_seq_lens_q is not None or cu_seq_lens_k is not None
        if not packed and self._is_plain_decode_step(
            input_ids, attention_mask, cache, labels, output_hidden_states, kwargs
        ):
            self.backbone._check_inputs(input_ids, None, None, cache)
            step = _compiled_step(self) if self.config.compile_decode else self._decode_step
            logits, states = step(input_ids, list(cache.states))
            for idx, state in enumerate(states):
                cache.set_layer_state(idx, state)
            cache.seqlen_offset += 1
            use_cache = use_cache if use_cache is not None else self.config.use_cache
            result = xLSTMCausalLMOutput(logits=logits, cache=cache if use_cache else None)
            return result if return_dict else result.to_tuple()
        if labels is not None:
            self._check_labels(labels, input_ids if input_ids is not None else inputs_embeds)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        h = out.last_hidden_state[:, keep]
        if labels is None:
            logits, loss = self._logits(h), None
        else:
            logits, loss = self._logits_and_loss(h, labels, num_items_in_batch)
        result = xLSTMCausalLMOutput(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()


__all__ = ["xLSTMCache", "xLSTMForCausalLM", "xLSTMModel", "xLSTMPreTrainedModel"]
