"""xLSTM models for transformers: the paper's mLSTM/sLSTM stacks and the xLSTM-7B stack.

Reading order: norms, conv, head-wise projection, the recurrent ops (the one place where kernel and reference are
chosen), mLSTM layers, sLSTM layer, feed-forward, block, PreTrainedModel, xLSTMHFModel, xLSTMHFForCausalLM. Every
tensor inside a layer is [B, S, D] (residual stream) or [B, NH, S, DH] (heads). A layer calls its modules and nothing
else: quantisers, PEFT, accelerate hooks, FSDP and exporters see ordinary `nn.Linear`s. Beside this file: the
recurrent state as a transformers Cache (cache_xlstm.py), packed documents (packing.py), input checks (checks.py),
the fused logits + loss (fused_ops.py), the kernels and their references.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .cache_xlstm import GENERATE_CACHE_NAME, HAS_ROLLBACK_PROTOCOL, xLSTMCache
from .checks import check_labels, check_model_inputs
from .configuration_xlstm import xLSTMConfig
from .convert import check_transformers_xlstm_load, load_fused_transformers_xlstm, read_transformers_xlstm_config
from .fused_ops import LogitsLossFunction
from .packing import DocumentLayout, document_starts
from .recurrent_ops import (
    check_backend,
    fall_back,
    functorch_active,
    mlstm_sequence,
    mlstm_sequence_states,
    slstm_sequence,
    slstm_sequence_states,
)

if TYPE_CHECKING:
    from .context_parallel import ContextParallel, ContextParallelShard

logger = logging.get_logger(__name__)

FFN_ACTIVATION_FUNCTIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}  # by config.ffn_activation


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) in float32, cast back to x's dtype; the identity without a cap (xLSTM-7B gates, logits)."""
    return x if cap is None else (cap * torch.tanh(x.float() / cap)).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with float32 statistics; weight (ones) and optional bias."""

    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's norms keep float32 statistics for lower-precision inputs: no float32 copy of x is made and saved
        # for backward (layer_norm on every device; rms_norm where torch fuses it, as on CUDA)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class RMSNorm(LayerNorm):
    """RMSNorm over the last dim with float32 statistics (the xLSTM-7B norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return y + self.bias if self.bias is not None else y


class MultiHeadLayerNorm(LayerNorm):
    """LayerNorm of every head separately: [B, NH, S, DH] -> [B, S, NH * DH], weight over NH * DH."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, NH, S, DH = x.shape
        y = F.layer_norm(x, (DH,), eps=self.eps)  # [B, NH, S, DH]
        y = y.transpose(1, 2).reshape(B, S, NH * DH) * self.weight
        return y + self.bias if self.bias is not None else y


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time with a state: the last KS - 1 inputs before the sequence.

    x [B, S, D], conv_state [B, KS - 1, D] or None (zeros), mask [B, S] bool or None -> y [B, S, D], new conv_state
    [B, KS - 1, D]. A padded position (mask False) is skipped: the window of a real position holds the real inputs
    before it, whether the padding is on the left or holes inside the row; y at a padded position is unspecified.
    With `last` > 0, the windows after each of the last `last` positions (a list, oldest first) instead of one.
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None,
        docs: DocumentLayout | None = None,
        mask: torch.Tensor | None = None,
        last: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor] | None]:
        """With `docs`: over every document of packed rows from zeros, and no window comes out."""
        if docs is not None:
            return docs.scatter(self(docs.gather(x), None)[0]), None
        B, S, D = x.shape
        if conv_state is None:
            conv_state = x.new_zeros(B, self.kernel_size - 1, D)
        order = None
        if mask is not None:
            # each row's real inputs first, in order, its padding after them: the conv then sees the row without it
            order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[..., None].expand(B, S, D)
            x = x.gather(1, order)
        xs = torch.cat([conv_state.to(x.dtype), x], dim=1)  # [B, KS - 1 + S, D]
        y = self.conv(xs.transpose(1, 2)).transpose(1, 2)
        if order is not None:
            y = torch.empty_like(y).scatter_(1, order, y)
        if mask is None and not last:
            # a copy, not a view that would keep the whole [B, KS - 1 + S, D] input alive in the cache
            return y, xs[:, S:].contiguous()
        # the window after a position holds the KS - 1 inputs before xs[real inputs up to it + KS - 1]
        seen = torch.arange(1, S + 1, device=x.device).expand(B, S) if mask is None else mask.long().cumsum(1)
        ends = seen[:, S - min(max(last, 1), S) :]  # [B, positions]
        windows = [self._window(xs, end) for end in ends.unbind(1)]
        return y, windows if last else windows[0]

    def _window(self, xs: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The window [B, KS - 1, D] of xs [B, KS - 1 + S, D] after `seen` [B] real inputs of each row."""
        idx = seen[:, None] + torch.arange(self.kernel_size - 1, device=xs.device)
        return xs.gather(1, idx[..., None].expand(-1, -1, xs.shape[-1]))


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: [.., NH * DI] -> [.., NH * DO] with weight [NH, DO, DI] (one block per head)."""

    def __init__(self, in_features: int, num_heads: int, out_features: int | None = None, bias: bool = False):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, out_features // num_heads, in_features // num_heads))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(-1, (self.num_heads, -1))  # [.., NH, DI]
        y = torch.einsum("...hi,hoi->...ho", x, self.weight).flatten(-2)  # [.., NH * DO]
        return y + self.bias if self.bias is not None else y


def _mlstm_options(config: xLSTMConfig, backend: str) -> dict[str, Any]:
    """The keyword arguments of `recurrent_ops.mlstm_sequence` that the config and the backend fix."""
    return dict(
        chunk_size=config.chunk_size, eps=config.mlstm_eps, empty_m=config.mlstm_empty_max_state, backend=backend
    )


def _run_mlstm(
    options: dict[str, Any],
    qkvif: tuple[torch.Tensor, ...],
    state: tuple | None,
    mask,
    docs,
    last: int,
    shard: ContextParallelShard | None = None,
) -> tuple[torch.Tensor, tuple | list[tuple]]:
    """The layers' one call into the mLSTM op: the final state, or with `last` > 0 the states after each of the last
    `last` positions (a cache recording for speculative decoding). With `shard`, this rank's slice of sequences split
    over a context-parallel group (context_parallel.py)."""
    if shard is not None:
        return shard.mlstm_sequence(*qkvif, state, mask=mask, docs=docs, **options)
    if last:
        return mlstm_sequence_states(*qkvif, state, last=last, mask=mask, **options)
    return mlstm_sequence(*qkvif, state, mask=mask, docs=docs, **options)


def _init_spec(linear: nn.Linear, **spec: Any) -> nn.Linear:
    """Attach the papers' init of this projection (read by xLSTMHFPreTrainedModel._init_weights): ``wang_dim`` (Wang
    init of a residual output), ``zero_weight``, ``bias`` in {"linspace_3_6", "normal_0.1", float}."""
    linear.xlstm_init = spec
    return linear


class mLSTMLayer(nn.Module):
    """The paper's mLSTM layer: up-projection, causal conv, block-diagonal q/k/v, mLSTM, multi-head norm, learnable
    skip, output gate and down-projection. State: (C, n, m, conv_state)."""

    def __init__(self, config: xLSTMConfig, backend: str = "auto"):
        super().__init__()
        self.mlstm_options = _mlstm_options(config, backend)
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
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        state: tuple | None,
        docs: DocumentLayout | None = None,
        last: int = 0,
        shard: ContextParallelShard | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | list[tuple[torch.Tensor, ...]] | None]:
        """x [B, S, D]; mask [B, S] bool or None; state (C, n, m, conv_state) or None -> y [B, S, D], state (with
        `last` > 0: the states after each of the last `last` positions, oldest first)."""
        B, S, _ = x.shape
        mlstm_state, conv_state = (None, None) if state is None else (state[:3], state[3])
        x_m, z = self.proj_up(x).chunk(2, dim=-1)  # [B, S, inner] each
        if mask is not None:  # padding must not enter the conv window
            x_m = x_m * mask[..., None].to(x_m.dtype)
        if shard is None:
            x_c, conv_state = self.conv1d(x_m, conv_state, docs, mask, last)
        else:
            x_c = shard.conv(self.conv1d, x_m, docs, mask)
        x_c = F.silu(x_c)
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)  # [B, S, inner] each
        qkv = torch.cat([q, k, v], dim=-1)
        i = self.igate(qkv).float().transpose(1, 2)  # [B, NH, S]
        f = self.fgate(qkv).float().transpose(1, 2)
        q, k, v = (t.view(B, S, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, NH, S, DH]
        h, mlstm_state = _run_mlstm(self.mlstm_options, (q, k, v, i, f), mlstm_state, mask, docs, last, shard)
        h = self.multihead_norm(h)  # [B, S, inner]
        y = self.proj_down((h + self.learnable_skip * x_c) * F.silu(z))
        if last:
            return self.dropout(y), [(*s, w) for s, w in zip(mlstm_state, conv_state, strict=True)]
        return self.dropout(y), None if docs is not None else (*mlstm_state, conv_state)


class mLSTM7BLayer(nn.Module):
    """The xLSTM-7B mLSTM layer: q/k/v and output-gate projections, soft-capped gates, mLSTM, multi-head norm.
    State: (C, n, m, None) (no conv)."""

    def __init__(self, config: xLSTMConfig, backend: str = "auto"):
        super().__init__()
        self.mlstm_options = _mlstm_options(config, backend)
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
        last: int = 0,
        shard: ContextParallelShard | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | list[tuple[torch.Tensor, ...]] | None]:
        """x [B, S, D]; mask [B, S] bool or None; state (C, n, m, None) or None -> y [B, S, D], state (`last` as in
        mLSTMLayer)."""
        B, S, _ = x.shape
        q, k, v = (t.view(B, S, self.num_heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        i = soft_cap(self.igate_preact(x).float(), self.gate_soft_cap).transpose(1, 2)  # [B, NH, S]
        f = soft_cap(self.fgate_preact(x).float(), self.gate_soft_cap).transpose(1, 2)
        mlstm_state = None if state is None else state[:3]
        h, mlstm_state = _run_mlstm(self.mlstm_options, (q, k, v, i, f), mlstm_state, mask, docs, last, shard)
        y = self.out_proj(torch.sigmoid(self.ogate_preact(x)) * self.multihead_norm(h))  # h [B, NH, S, DV]
        if last:
            return self.dropout(y), [(*s, None) for s in mlstm_state]
        return self.dropout(y), None if docs is not None else (*mlstm_state, None)


class sLSTMLayer(nn.Module):
    """The paper's sLSTM layer: causal conv feeding the input and forget gates, block-diagonal gate projections,
    block-diagonal recurrent matrices, multi-head norm. State: (h, c, n, m, conv_state)."""

    def __init__(self, config: xLSTMConfig, block_idx: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
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
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        state: tuple | None,
        docs: DocumentLayout | None = None,
        last: int = 0,
        shard: ContextParallelShard | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | list[tuple[torch.Tensor, ...]] | None]:
        """x [B, S, D]; mask [B, S] bool or None; state (h, c, n, m, conv_state) or None -> y [B, S, D], state
        (`last` as in mLSTMLayer)."""
        B, S, _ = x.shape
        NH, DH = self.num_heads, self.head_dim
        slstm_state, conv_state = (None, None) if state is None else (state[:4], state[4])
        x_c = x
        if self.conv1d is not None:
            x_in = x * mask[..., None].to(x.dtype) if mask is not None else x
            if shard is None:
                x_c, conv_state = self.conv1d(x_in, conv_state, docs, mask, last)
            else:
                x_c = shard.conv(self.conv1d, x_in, docs, mask)
            x_c = F.silu(x_c)
        gates = torch.stack([self.igate(x_c), self.fgate(x_c), self.zgate(x), self.ogate(x)], dim=2)  # [B, S, 4, D]
        gates = gates.view(B, S, 4, NH, DH).permute(0, 3, 1, 2, 4).reshape(B, NH, S, 4 * DH) + self.bias[:, None]
        if last:
            h, states = slstm_sequence_states(
                gates, self.recurrent_kernel, slstm_state, last=last, mask=mask, backend=self.backend
            )
            windows = conv_state if self.conv1d is not None else [None] * len(states)
            state = [(*s, w) for s, w in zip(states, windows, strict=True)]
        else:
            sequence = slstm_sequence if shard is None else shard.slstm_sequence
            h, slstm_state = sequence(
                gates, self.recurrent_kernel, slstm_state, mask=mask, docs=docs, backend=self.backend
            )
            state = None if docs is not None else (*slstm_state, conv_state)
        return self.dropout(self.multihead_norm(h)), state  # [B, S, D]


class GatedFeedForward(nn.Module):
    """proj_down(act(proj_up_gate(x)) * proj_up(x)): GeLU-gated in the paper, SwiGLU in xLSTM-7B."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        D, H, bias = config.hidden_size, config.ffn_dim, config.use_bias
        self.proj_up_gate = nn.Linear(D, H, bias=bias)
        self.proj_up = nn.Linear(D, H, bias=bias)
        # Wang init over the model width in the paper, over the FFN width in xLSTM-7B
        self.proj_down = _init_spec(nn.Linear(H, D, bias=bias), wang_dim=D if config.architecture == "paper" else H)
        self.act = FFN_ACTIVATION_FUNCTIONS[config.ffn_activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj_down(self.act(self.proj_up_gate(x)) * self.proj_up(x)))


class xLSTMBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)) [+ ffn(norm_ffn(x))]. The mixer is an mLSTM layer (paper or 7B) or
    an sLSTM layer; the block is functional: it returns the new recurrent state instead of writing a cache."""

    def __init__(self, config: xLSTMConfig, block_idx: int, backend: str = "auto"):
        super().__init__()
        self.block_type = block_type = config.block_types[block_idx]
        norm = RMSNorm if config.architecture == "7b" else LayerNorm
        bias = config.use_bias and config.architecture == "7b"
        if block_type == "s":
            self.norm_slstm = norm(config.hidden_size, config.norm_eps, bias=bias)
            self.slstm_layer = sLSTMLayer(config, block_idx, backend)
        else:
            self.norm_mlstm = norm(config.hidden_size, config.norm_eps, bias=bias)
            self.mlstm_layer = (mLSTM7BLayer if config.architecture == "7b" else mLSTMLayer)(config, backend)
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
        last: int = 0,
        shard: ContextParallelShard | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | list[tuple[torch.Tensor, ...]] | None]:
        """hidden_states [B, S, D] -> [B, S, D] and the state after them (None with `return_state=False`: the mixers'
        final states are views of their kernels' buffers, and a module that returns a view requiring grad makes FSDP2
        warn that an in-place op on it would skip its pre-backward hook). With `last` > 0, the states after each of
        the last `last` positions, oldest first (a cache recording them to roll back). `shard`: this rank's slice under
        context parallelism."""
        if self.block_type == "s":
            y, state = self.slstm_layer(self.norm_slstm(hidden_states), mask, state, docs, last, shard)
        else:
            y, state = self.mlstm_layer(self.norm_mlstm(hidden_states), mask, state, docs, last, shard)
        hidden_states = hidden_states + y
        if self.ffn is not None:
            hidden_states = hidden_states + self.ffn(self.norm_ffn(hidden_states))
        return hidden_states, state if return_state else None


@dataclass
class xLSTMOutput(ModelOutput):
    """last_hidden_state [B, S, D]; cache: the recurrent state after the last position; hidden_states: the
    embeddings and the output of every block (the last one after the output norm)."""

    last_hidden_state: torch.Tensor | None = None
    cache: xLSTMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> xLSTMCache | None:
        """`cache` under its name before transformers 5.24 (read-only)."""
        return self.cache


@dataclass
class xLSTMCausalLMOutput(ModelOutput):
    """loss (scalar, with `labels` or `shift_labels`); logits [B, S, V]; cache; hidden_states as in xLSTMOutput."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: xLSTMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> xLSTMCache | None:
        """`cache` under its name before transformers 5.24 (read-only)."""
        return self.cache


def _small_init_std(dim: int) -> float:
    """Nguyen & Salazar (2019), used by both xLSTM papers: sqrt(2 / (5 d))."""
    return math.sqrt(2 / (5 * dim))


def _wang_init_std(dim: int, num_blocks: int) -> float:
    """Wang (2021), the output projections of residual branches: 2 / (num_blocks sqrt(d))."""
    return 2 / num_blocks / math.sqrt(dim)


class xLSTMHFPreTrainedModel(PreTrainedModel):
    config_class = xLSTMConfig
    config: xLSTMConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["xLSTMBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True
    _supports_cache_class = True
    # The gate projections (one output per head) that transformers' quantisers leave unconverted: bitsandbytes,
    # torchao, quanto and the others add `_keep_in_fp32_modules` to their skip list and match it as a name suffix,
    # of the module (bitsandbytes, quanto) or of the parameter (torchao), hence both forms. "mlstm_layer.igate"
    # leaves out the sLSTM's block-diagonal gates, which no quantiser converts. The exponential input gate turns a
    # rounding error of its preactivation into a relative error of the whole update, and bitsandbytes' 4-bit CPU
    # kernel asserts on out_features that are not a multiple of 32.
    _keep_in_fp32_modules = [
        name + suffix
        for name in ("mlstm_layer.igate", "mlstm_layer.fgate", "igate_preact", "fgate_preact")
        for suffix in ("", ".weight")
    ]

    def _get_dtype_plan(self, dtype: torch.dtype) -> dict:
        """As PreTrainedModel's, without the float16 upcast of `_keep_in_fp32_modules`: the layers feed the gates
        activations in the model's dtype, so a float16 load keeps them in float16 (the gate math itself runs in
        float32 after the projection). tests/test_quantisers.py fails if transformers renames this hook."""
        plan = super()._get_dtype_plan(dtype)
        for pattern in self._keep_in_fp32_modules:
            plan.pop(pattern, None)
        return plan

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """As PreTrainedModel.from_pretrained; a checkpoint of transformers' built-in xLSTM (``model_type: xlstm``,
        the NX-AI/xLSTM-7b layout) is converted on load (convert.py): its config is translated, its weights carry our
        names (``weight_mode="single"``, loaded here with every key used) or are split (``"fused"``)."""
        path = pretrained_model_name_or_path
        builtin = read_transformers_xlstm_config(path, kwargs) if kwargs.get("config") is None else None
        if builtin is None:
            return super().from_pretrained(path, *model_args, **kwargs)
        config, weight_mode = builtin
        if weight_mode == "fused":
            return load_fused_transformers_xlstm(cls, path, config, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *model_args, config=config, output_loading_info=True, **kwargs)
        check_transformers_xlstm_load(path, model, info)
        return (model, info) if want_info else model

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
        elif isinstance(module, nn.Conv1d):
            # nn.Conv1d's own default, on the leaf module that transformers initialises when its weights are missing
            bound = 1 / math.sqrt(module.weight[0].numel())
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
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


class xLSTMHFModel(xLSTMHFPreTrainedModel):
    """Embeddings, the stack of blocks and the output norm. `backend` chooses the implementation of the recurrences
    (`recurrent_ops`): "auto" (the Triton kernels on CUDA, PyTorch elsewhere), "triton" or "torch"; a load-time
    option like transformers' `attn_implementation` (`from_pretrained(path, backend=...)`), not saved with the
    weights."""

    def __init__(self, config: xLSTMConfig, backend: str = "auto"):
        super().__init__(config)
        self.backend = check_backend(backend)
        # the context-parallel group, a set-up option like `backend` (context_parallel.enable_context_parallel)
        self.context_parallel: ContextParallel | None = None
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        self.blocks = nn.ModuleList([xLSTMBlock(config, idx, backend) for idx in range(config.num_hidden_layers)])
        norm = RMSNorm if config.architecture == "7b" else LayerNorm
        bias = config.use_bias and config.architecture == "7b"
        self.out_norm = norm(config.hidden_size, config.norm_eps, bias=bias) if config.add_out_norm else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def _pieces(self, S: int, docs: DocumentLayout | None, output_hidden_states: bool) -> list[slice]:
        """The slices of the sequence that go through the stack one after another, the state carried between them:
        pieces of `max_inference_chunksize` for a long prompt without gradients (the activations held at once stay
        bounded), else the whole sequence."""
        piece = self.config.max_inference_chunksize
        whole = piece is None or torch.is_grad_enabled() or docs is not None or output_hidden_states
        # traced (torch.compile, torch.export): one graph for every length, without a guard on S
        if whole or torch.compiler.is_compiling() or S <= piece:
            return [slice(0, S)]
        return [slice(start, start + piece) for start in range(0, S, piece)]

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
        cache: the state after the previous tokens (None: an empty state). Packed rows (position_ids restarting at 0,
        or cu_seq_lens_q) run every document from an empty state."""
        for other_name in ("past_key_values", "cache_params"):  # the cache's names before transformers 5.24, Mamba's
            given = kwargs.pop(other_name, None)
            if given is not None and cache is not None and given is not cache:
                raise ValueError(f"got both `cache` and `{other_name}`: pass the cache once")
            cache = given if given is not None else cache
        check_model_inputs(self.config, input_ids, inputs_embeds, attention_mask, cache, self.embeddings.weight.dtype)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        mask = None
        if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
            mask = attention_mask.bool()

        boundaries = {"position_ids": position_ids, "cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k}
        starts = document_starts(boundaries, attention_mask, B, S, x.device)
        docs = shard = None
        if self.context_parallel is not None:
            # this rank holds one slice of every row (context_parallel.py): no cache, the state comes from other ranks
            if cache is not None or cu_seq_lens_q is not None or cu_seq_lens_k is not None:
                raise ValueError(
                    "under context parallelism the model runs slices of whole sequences: no cache, and packed "
                    "documents are marked by position_ids (sharded with the inputs), not cu_seq_lens_q"
                )
            shard, use_cache = self.context_parallel.shard(B, S, position_ids, attention_mask, x.device), False
        if starts is not None:
            if cache is not None:
                raise ValueError(
                    "packed sequences (position_ids restarting at 0 or cu_seq_lens_q) start every document from an "
                    "empty state: they cannot continue from a cache"
                )
            # several documents per row: the sequence ops run them apart (DocumentLayout), the rest on the packed tokens
            docs, use_cache = DocumentLayout.from_starts(starts), False
        elif use_cache and cache is None:
            cache = xLSTMCache(self.config, B, device=x.device)
        states = list(cache.states) if cache is not None else [None] * len(self.blocks)

        all_hidden = (x,) if output_hidden_states else None
        outs = []
        pieces = [slice(0, S)] if shard is not None else self._pieces(S, docs, output_hidden_states)
        carried = cache is not None or len(pieces) > 1  # the state goes on to the next piece or into the cache
        # a cache recording its past (speculative decoding) keeps the states after the last positions, to roll back
        recorded = 0 if cache is None else min(cache.positions_to_record(S), len(range(S)[pieces[-1]]))
        for piece in pieces:
            h = x[:, piece]
            piece_mask = None if mask is None else mask[:, piece]
            last = recorded if piece is pieces[-1] else 0
            for idx, block in enumerate(self.blocks):
                h, states[idx] = block(h, piece_mask, states[idx], docs, return_state=carried, last=last, shard=shard)
                if output_hidden_states:
                    all_hidden += (h,)
            outs.append(h)
        x = self.out_norm(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
        if cache is not None:
            for idx, state in enumerate(states):
                if recorded:
                    cache.record_states(idx, state, S)
                else:
                    cache.update_state(idx, state)
            cache.add_tokens(S, x.device)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (x,)
        out = xLSTMOutput(last_hidden_state=x, cache=cache if use_cache else None, hidden_states=all_hidden)
        return out if return_dict else out.to_tuple()


class xLSTMHFForCausalLM(xLSTMHFPreTrainedModel, GenerationMixin):
    """xLSTMModel with a language-model head; `labels` give the shifted cross-entropy (-100 ignored), `shift_labels`
    the cross-entropy against targets already shifted (what context-parallel training passes)."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: xLSTMConfig, backend: str = "auto"):
        super().__init__(config)
        self.backbone = xLSTMHFModel(config, backend=backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_soft_cap = config.output_logit_soft_cap if config.architecture == "7b" else None
        # the loss is chosen here: the fused logits + loss, unless the config turns it off or the loss function is not
        # transformers' causal-LM loss (a custom `loss_function` set later turns it off too)
        self.fuse_cross_entropy = config.fuse_cross_entropy and self.loss_function is ForCausalLMLoss
        self.post_init()

    @property
    def backend(self) -> str:
        return self.backbone.backend

    @property
    def loss_function(self) -> Callable[..., torch.Tensor]:
        return PreTrainedModel.loss_function.fget(self)

    @loss_function.setter
    def loss_function(self, value: Callable[..., torch.Tensor]) -> None:
        PreTrainedModel.loss_function.fset(self, value)
        self.fuse_cross_entropy = False  # a custom loss takes the logits

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> xLSTMHFModel:
        return self.backbone

    CONTINUOUS_BATCHING_REFUSED = (
        "xLSTM does not support transformers' continuous batching (generate_batch, init_continuous_batching, "
        "generate(cache_implementation='paged'), transformers serve --continuous-batching): it pages an attention "
        "KV cache, and an xLSTM's state is one fixed-size recurrent state per sequence. Use generate() with a "
        "left-padded batch (tokenizer padding_side='left', pass the attention_mask), or serve the model with "
        "vLLM, whose continuous batching keeps one recurrent state per sequence (xlstm_hf's vLLM plugin: README "
        "'Serving')."
    )

    def init_continuous_batching(self, *args: Any, **kwargs: Any) -> Any:
        """Refused before anything is built: the entry point of transformers' continuous batching
        (`continuous_batching_context_manager`, `generate_batch` and `transformers serve` all start here), whose
        manager would otherwise fail every request for want of attention heads in the config."""
        raise NotImplementedError(self.CONTINUOUS_BATCHING_REFUSED)

    def generate_batch(self, *args: Any, **kwargs: Any) -> Any:
        """Refused, as `init_continuous_batching`: raised before the prompts are read."""
        raise NotImplementedError(self.CONTINUOUS_BATCHING_REFUSED)

    def _loss(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None,
        shift_labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits [B, S, V] from the head's output z and transformers' causal-LM loss: against `shift_labels`
        as given, else against `labels` shifted left by one, -100 ignored, averaged over the counted targets (or
        summed and divided by `num_items_in_batch`). With `fuse_cross_entropy` and the default loss function, one
        autograd function computes the soft cap and the loss (`LogitsLossFunction`, float32 whatever z's dtype)."""
        fused = self.fuse_cross_entropy
        if fused and functorch_active():
            fall_back("fuse_cross_entropy", "inside a torch.func transform", "the unfused loss")
            fused = False
        if not fused:
            logits = soft_cap(z, self.logit_soft_cap)
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=num_items_in_batch,
                shift_labels=shift_labels,
            )
            return logits, loss
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(z.device)
        targets = shift_labels.reshape(-1).to(z.device)
        return LogitsLossFunction.apply(z, targets, self.logit_soft_cap, -100, num_items_in_batch)

    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict[str, Any],
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """The one private hook of transformers that xlstm_hf overrides, and why: generate() decides whether to compile
        the decoding step (`compile_config`; by itself on CUDA) from the cache in `model_kwargs` before the prefill,
        and no public hook makes a model's own cache class there (transformers makes none for a class named xLSTM,
        a `DynamicCache` for others). So the xLSTMCache is made here, recording its past as transformers' own
        caches do when this model drafts for another (`is_assistant`); a cache passed by the user is checked by
        transformers as for any model. Where transformers has no rollback protocol for recurrent caches, assisted and
        prompt-lookup decoding are refused before anything runs. tests/test_cache.py fails, naming this method, if
        transformers changes its signature or stops calling it before the compile decision."""
        if generation_mode == "assisted_generation" and not HAS_ROLLBACK_PROTOCOL:
            raise ValueError(xLSTMCache.ROLLBACK_REFUSED)
        given = {name: model_kwargs.pop(name) for name in ("cache", "past_key_values") if name in model_kwargs}
        if len([c for c in given.values() if c is not None]) > 1:
            raise ValueError("generate() got both `cache` and `past_key_values`: pass the cache once")
        model_kwargs[GENERATE_CACHE_NAME] = next((c for c in given.values() if c is not None), None)
        if model_kwargs[GENERATE_CACHE_NAME] is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
        cache = xLSTMCache(self.config, rows, device=self.get_input_embeddings().weight.device)
        if getattr(generation_config, "is_assistant", False):
            cache.activate_past_recording(recurrent_states_to_keep=generation_config.num_assistant_tokens)
        model_kwargs[GENERATE_CACHE_NAME] = cache

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: xLSTMCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        past_key_values: xLSTMCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The inputs of one generate() step: the new tokens (or the prompt's embeddings at the first step), the
        cache, and the attention mask of the new tokens only (the state carries the rest; an all-ones mask is
        dropped), no position ids. Written out rather than built on GenerationMixin's, which inspects the forward
        signature of remote-code models at every step. The cache comes as `past_key_values` before transformers 5.24
        (named here, so that generate() of those releases admits a user's `past_key_values`)."""
        cache = cache if cache is not None else past_key_values
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
        """As xLSTMModel.forward; labels [B, S] (shifted inside) or, in kwargs as transformers' loss takes them,
        shift_labels [B, S] (already shifted) and num_items_in_batch; -100 ignored; logits_to_keep: compute the logits
        of the last positions only (0: all). (The Trainer reads its label names from this signature: `shift_labels`
        stays out of it, as in transformers' own models, or evaluation would wait for it.)"""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        inputs = input_ids if input_ids is not None else inputs_embeds
        for name, t in (("labels", labels), ("shift_labels", shift_labels)):
            if t is not None and inputs is not None:
                check_labels(name, t, inputs, self.config.vocab_size)
        context_parallel = self.backbone.context_parallel
        if context_parallel is not None and labels is not None and shift_labels is None:
            raise ValueError(
                "under context parallelism the target of a slice's last token lies on the next rank: pass "
                "shift_labels sharded with the inputs (context_parallel.shard_batch makes them from labels)"
            )
        if context_parallel is not None and shift_labels is not None and num_items_in_batch is None:
            # over the targets of the whole rows: the ranks' losses add up to the loss of the whole sequences
            num_items_in_batch = context_parallel.count_targets(shift_labels)
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
        z = self.lm_head(out.last_hidden_state[:, keep])  # [B, S', V]
        if labels is None and shift_labels is None:
            logits, loss = soft_cap(z, self.logit_soft_cap), None
        elif z.shape[1] != (labels if shift_labels is None else shift_labels).shape[1]:
            raise ValueError(
                f"logits_to_keep={logits_to_keep} keeps {z.shape[1]} positions: a loss needs the logits of every "
                "labelled position (logits_to_keep=0)"
            )
        else:
            logits, loss = self._loss(z, labels, shift_labels, num_items_in_batch)
        result = xLSTMCausalLMOutput(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()


# The public names. The classes' own names differ from transformers' built-in xLSTM classes (xLSTMForCausalLM, ...):
# save_pretrained writes the class name into config.json's `architectures`, which clients such as TRL look up in
# transformers first, and the built-in class of the same name would load these weights.
xLSTMPreTrainedModel = xLSTMHFPreTrainedModel
xLSTMModel = xLSTMHFModel
xLSTMForCausalLM = xLSTMHFForCausalLM

__all__ = [
    "xLSTMCache",
    "xLSTMForCausalLM",
    "xLSTMHFForCausalLM",
    "xLSTMHFModel",
    "xLSTMHFPreTrainedModel",
    "xLSTMModel",
    "xLSTMPreTrainedModel",
]


# The Auto classes and PEFT's default LoRA targets, registered from this file so that a Hub copy run under
# trust_remote_code registers them as `import xlstm_hf` does (registration.py says what transformers leaves undone).
from .registration import register  # noqa: E402

register(xLSTMConfig, xLSTMModel, xLSTMForCausalLM)
