"""xLSTM in vLLM: the model class that `vllm_plugin.register` names, its layers and their state-cache backend.

A vLLM step hands every layer a flat batch of T tokens [T, D]: the decodes first (one token each), then the prefills
(whole prompts or chunks of them, `query_start_loc_p`). Each sequence owns one slot of the layer's state cache
(`state_indices_tensor_d` / `_p`), which holds its recurrent state (mLSTM C, n, m; sLSTM h, c, n, m) and conv window.
A layer reads the slots of the batch, runs the decodes as rows [Nd, 1, D] and the prefills as one packed row
[1, Tp, D] of documents (`packing.DocumentLayout`, each from its own state: a fresh one for a new sequence, the slot's
for a chunk after the first), and writes the final states back. The recurrences are `recurrent_ops`' (Triton on
CUDA, PyTorch on CPU); the norms, conv and block-diagonal maps are the transformers model's own modules; only the
projections are vLLM's parallel linears, which split the heads over tensor-parallel ranks (each rank owns its
heads' states; the sLSTM output and the paper mLSTM's gate inputs are all-gathered).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadata, BaseMambaAttentionMetadataBuilder
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from .configuration_xlstm import xLSTMConfig
from .convert import builtin_absent_weights
from .mlstm_naive import empty_state
from .modeling_xlstm import (
    FFN_ACTIVATION_FUNCTIONS,
    CausalConv1d,
    HeadwiseLinear,
    LayerNorm,
    MultiHeadLayerNorm,
    RMSNorm,
    _mlstm_options,
    soft_cap,
)
from .packing import DocumentLayout
from .recurrent_ops import mlstm_sequence, slstm_sequence
from .slstm_naive import slstm_empty_state
from .vllm_plugin import STATE_BACKEND, state_layout, xlstm_config

State = tuple[torch.Tensor, ...]


# ---- the state-cache backend: vLLM's common recurrent-model metadata, under the plugin's own name


class xLSTMStateBackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return STATE_BACKEND

    @staticmethod
    def get_builder_cls() -> type[xLSTMStateMetadataBuilder]:
        return xLSTMStateMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True


@dataclass
class xLSTMStateMetadata(BaseMambaAttentionMetadata):
    pass


class xLSTMStateMetadataBuilder(BaseMambaAttentionMetadataBuilder[xLSTMStateMetadata]):
    metadata_cls = xLSTMStateMetadata
    needs_causal_conv1d_metadata = False  # the conv is CausalConv1d over the document layout, not vLLM's kernel


# ---- helpers


def _shard_loader(dim: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A weight_loader that keeps this rank's contiguous 1/tp slice of `dim` (heads or channels of its heads)."""

    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        size = param.shape[dim]
        param.data.copy_(loaded.narrow(dim, get_tensor_model_parallel_rank() * size, size))

    return load


def _shard(module: nn.Module, dim: int = 0) -> nn.Module:
    for p in module.parameters():
        p.weight_loader = _shard_loader(dim)
    return module


def _conv(conv: CausalConv1d, x: torch.Tensor, window: torch.Tensor, docs: DocumentLayout | None) -> State:
    """CausalConv1d from each sequence's window: x [B, S, C] rows, or a packed row with `docs` (windows per
    document) -> y like x, the new windows."""
    if docs is None:
        return conv(x, window)
    y, window = conv(docs.gather(x), window, mask=docs.mask)
    return docs.scatter(y), window


def _documents(query_start_loc: torch.Tensor, num_tokens: int) -> DocumentLayout:
    """The prefills of a step, query_start_loc [Np + 1], as the documents of one packed row [1, num_tokens]."""
    starts = torch.zeros(1, num_tokens, dtype=torch.bool, device=query_start_loc.device)
    starts[0, query_start_loc[:-1].long()] = True
    return DocumentLayout.from_starts(starts)


# ---- the mixers: one vLLM state-cache layer each


class _Mixer(nn.Module, MambaBase):
    """A layer with a recurrent state in vLLM's state cache. Subclasses give `fresh_state(n, device)` (the empty
    states, recurrent parts float32) and `mix(x, state, docs)` (x [B, S, D] rows, or a packed row with `docs`;
    state per row or per document) -> y [B, S, D], new state; this class runs a step's decodes and prefills through
    them and moves the states in and out of the cache."""

    def __init__(self, config: xLSTMConfig, block_type: str, prefix: str):
        super().__init__()
        vllm_config = get_current_vllm_config()
        self.prefix = prefix
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        layout = state_layout(config, block_type, self.tp_size)
        state_dtype = getattr(torch, config.state_dtype)
        model_dtype = vllm_config.model_config.dtype
        self.state_shapes = tuple(shape for shape, _ in layout)
        self.state_dtypes = tuple(state_dtype if is_state else model_dtype for _, is_state in layout)
        self.recurrent = tuple(is_state for _, is_state in layout)
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)

    # MambaBase
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum[STATE_BACKEND]

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return self.state_shapes

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return self.state_dtypes

    def fresh_state(self, n: int, device: torch.device) -> State:
        raise NotImplementedError

    def mix(self, x: torch.Tensor, state: State, docs: DocumentLayout | None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D], through a custom op so that a compiled model treats the layer as one opaque call."""
        out = torch.empty_like(x)
        torch.ops.vllm.xlstm_hf_mixer(x, out, self.prefix)
        return out

    def _read(self, slots: torch.Tensor, fresh: torch.Tensor | None) -> State:
        """The states in `slots` [N] as the ops take them (recurrent parts float32); rows where `fresh` [N] is True
        start empty instead."""
        state = tuple(
            cache[slots].float() if recurrent else cache[slots]
            for cache, recurrent in zip(self.kv_cache, self.recurrent, strict=True)
        )
        if fresh is None or not bool(fresh.any()):
            return state
        empty = self.fresh_state(slots.shape[0], slots.device)
        keep = ~fresh
        return tuple(
            torch.where(keep.view(-1, *([1] * (s.dim() - 1))), s, e.to(s.dtype))
            for s, e in zip(state, empty, strict=True)
        )

    def _write(self, slots: torch.Tensor, state: State) -> None:
        for cache, s in zip(self.kv_cache, state, strict=True):
            cache[slots] = s.to(cache.dtype)

    def run(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """One vLLM step of this layer: x [T, D] -> out [T, D] (rows past the step's tokens left alone)."""
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        if metadata is None:  # the profiling run: no cache, every token of one sequence from an empty state
            y, _ = self.mix(x[None], self.fresh_state(1, x.device), None)
            out.copy_(y[0])
            return
        nd, npt = metadata.num_decode_tokens, metadata.num_prefill_tokens
        parts = []
        if metadata.num_decodes > 0:
            slots = metadata.state_indices_tensor_d
            slots = (slots[:, 0] if slots.dim() == 2 else slots)[:nd].long()
            y, state = self.mix(x[:nd, None], self._read(slots, None), None)
            self._write(slots, state)
            parts.append(y[:, 0])
        if metadata.num_prefills > 0:
            slots = metadata.state_indices_tensor_p.reshape(-1)[: metadata.num_prefills].long()
            fresh = ~metadata.has_initial_states_p.reshape(-1)[: metadata.num_prefills]
            docs = _documents(metadata.query_start_loc_p, npt)
            y, state = self.mix(x[nd : nd + npt][None], self._read(slots, fresh), docs)
            self._write(slots, state)
            parts.append(y[0])
        out[: nd + npt] = torch.cat(parts) if len(parts) > 1 else parts[0]


def xlstm_hf_mixer(x: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name].run(x, out)


def _xlstm_hf_mixer_fake(x: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(
    op_name="xlstm_hf_mixer", op_func=xlstm_hf_mixer, mutates_args=["out"], fake_impl=_xlstm_hf_mixer_fake
)


class mLSTM7BMixer(_Mixer):
    """modeling_xlstm.mLSTM7BLayer with q/k/v/output-gate and gate projections split by heads over the ranks."""

    def __init__(self, config: xLSTMConfig, prefix: str):
        super().__init__(config, "m", prefix)
        D, bias, tp = config.hidden_size, config.use_bias, self.tp_size
        self.num_heads = config.num_heads // tp
        self.qk_dim, self.v_dim = config.qk_dim // tp, config.v_dim // tp
        self.options = _mlstm_options(config, "auto")
        self.gate_soft_cap = config.gate_soft_cap
        qk, vd, NH = config.qk_dim, config.v_dim, config.num_heads
        self.qkvo = MergedColumnParallelLinear(
            D, [qk, qk, vd, vd], bias=bias, return_bias=False, prefix=f"{prefix}.qkvo"
        )
        self.if_gates = MergedColumnParallelLinear(
            D, [NH, NH], bias=True, return_bias=False, prefix=f"{prefix}.if_gates"
        )
        self.multihead_norm = _shard(MultiHeadLayerNorm(self.v_dim, config.norm_eps, bias=bias))
        self.out_proj = RowParallelLinear(vd, D, bias=bias, return_bias=False, prefix=f"{prefix}.out_proj")

    def fresh_state(self, n: int, device: torch.device) -> State:
        NH, DK, DV = self.state_shapes[0]
        return empty_state(n, NH, DK, DV, self.options["empty_m"], device)

    def mix(self, x: torch.Tensor, state: State, docs: DocumentLayout | None) -> tuple[torch.Tensor, State]:
        B, S, _ = x.shape
        q, k, v, o = self.qkvo(x).split([self.qk_dim, self.qk_dim, self.v_dim, self.v_dim], dim=-1)
        q, k, v = (t.reshape(B, S, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, NH, S, DH]
        i, f = soft_cap(self.if_gates(x).float(), self.gate_soft_cap).transpose(1, 2).chunk(2, dim=1)  # [B, NH, S]
        h, state = mlstm_sequence(q, k, v, i, f, state, docs=docs, **self.options)
        return self.out_proj(torch.sigmoid(o) * self.multihead_norm(h)), state


class mLSTMPaperMixer(_Mixer):
    """modeling_xlstm.mLSTMLayer: up-projection, causal conv, block-diagonal q/k/v and the gates over q, k, v (all
    heads' widths, all-gathered), mLSTM, multi-head norm, skip, output gate, down-projection."""

    def __init__(self, config: xLSTMConfig, prefix: str):
        super().__init__(config, "m", prefix)
        D, inner, tp, bias = config.hidden_size, config.mlstm_inner_dim, self.tp_size, config.use_bias
        self.num_heads = config.num_heads // tp
        self.options = _mlstm_options(config, "auto")
        local, blocks = inner // tp, inner // config.qkv_proj_blocksize // tp
        self.proj_up = MergedColumnParallelLinear(
            D, [inner, inner], bias=bias, return_bias=False, prefix=f"{prefix}.proj_up"
        )
        self.conv1d = _shard(CausalConv1d(local, config.conv1d_kernel_size))
        self.q_proj = _shard(HeadwiseLinear(local, blocks, bias=bias))
        self.k_proj = _shard(HeadwiseLinear(local, blocks, bias=bias))
        self.v_proj = _shard(HeadwiseLinear(local, blocks, bias=bias))
        self.igate = nn.Linear(3 * inner, config.num_heads)
        self.fgate = nn.Linear(3 * inner, config.num_heads)
        self.multihead_norm = _shard(MultiHeadLayerNorm(local, config.norm_eps))
        self.learnable_skip = nn.Parameter(torch.ones(local))
        self.learnable_skip.weight_loader = _shard_loader(0)
        self.proj_down = RowParallelLinear(inner, D, bias=bias, return_bias=False, prefix=f"{prefix}.proj_down")

    def fresh_state(self, n: int, device: torch.device) -> State:
        NH, DK, DV = self.state_shapes[0]
        window = torch.zeros(n, *self.state_shapes[3], dtype=self.state_dtypes[3], device=device)
        return (*empty_state(n, NH, DK, DV, self.options["empty_m"], device), window)

    def _all_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.tp_size == 1 else tensor_model_parallel_all_gather(t.contiguous(), dim=-1)

    def mix(self, x: torch.Tensor, state: State, docs: DocumentLayout | None) -> tuple[torch.Tensor, State]:
        B, S, _ = x.shape
        x_m, z = self.proj_up(x).chunk(2, dim=-1)  # [B, S, inner / tp] each
        x_c, window = _conv(self.conv1d, x_m, state[3], docs)
        x_c = F.silu(x_c)
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)
        qkv = torch.cat([self._all_heads(q), self._all_heads(k), self._all_heads(v)], dim=-1)
        heads = slice(self.tp_rank * self.num_heads, (self.tp_rank + 1) * self.num_heads)
        i = self.igate(qkv)[..., heads].float().transpose(1, 2)  # [B, NH, S]
        f = self.fgate(qkv)[..., heads].float().transpose(1, 2)
        q, k, v = (t.view(B, S, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, NH, S, DH]
        h, mlstm_state = mlstm_sequence(q, k, v, i, f, state[:3], docs=docs, **self.options)
        h = self.multihead_norm(h)  # [B, S, inner / tp]
        y = self.proj_down((h + self.learnable_skip * x_c) * F.silu(z))
        return y, (*mlstm_state, window)


class sLSTMMixer(_Mixer):
    """modeling_xlstm.sLSTMLayer: each rank runs its heads over its channels of the input; the outputs are
    all-gathered (the layer has no output projection)."""

    def __init__(self, config: xLSTMConfig, prefix: str):
        super().__init__(config, "s", prefix)
        D, tp = config.hidden_size, self.tp_size
        self.num_heads, self.head_dim = config.slstm_num_heads // tp, D // config.slstm_num_heads
        local = D // tp
        self.channels = slice(self.tp_rank * local, (self.tp_rank + 1) * local)
        KS = config.conv1d_kernel_size
        self.conv1d = _shard(CausalConv1d(local, KS)) if KS > 0 else None
        self.igate = _shard(HeadwiseLinear(local, self.num_heads))
        self.fgate = _shard(HeadwiseLinear(local, self.num_heads))
        self.zgate = _shard(HeadwiseLinear(local, self.num_heads))
        self.ogate = _shard(HeadwiseLinear(local, self.num_heads))
        self.recurrent_kernel = nn.Parameter(torch.zeros(self.num_heads, self.head_dim, 4 * self.head_dim))
        self.bias = nn.Parameter(torch.zeros(self.num_heads, 4 * self.head_dim))
        self.recurrent_kernel.weight_loader = self.bias.weight_loader = _shard_loader(0)
        self.multihead_norm = _shard(MultiHeadLayerNorm(local, config.norm_eps))

    def fresh_state(self, n: int, device: torch.device) -> State:
        hcnm = torch.stack(slstm_empty_state(n, self.num_heads, self.head_dim, device), dim=1)  # [n, 4, NH, DH]
        if self.conv1d is None:
            return (hcnm,)
        return hcnm, torch.zeros(n, *self.state_shapes[1], dtype=self.state_dtypes[1], device=device)

    def mix(self, x: torch.Tensor, state: State, docs: DocumentLayout | None) -> tuple[torch.Tensor, State]:
        B, S, _ = x.shape
        NH, DH = self.num_heads, self.head_dim
        x = x[..., self.channels]
        x_c, window = x, None
        if self.conv1d is not None:
            x_c, window = _conv(self.conv1d, x, state[1], docs)
            x_c = F.silu(x_c)
        gates = torch.stack([self.igate(x_c), self.fgate(x_c), self.zgate(x), self.ogate(x)], dim=2)  # [B, S, 4, D]
        gates = gates.view(B, S, 4, NH, DH).permute(0, 3, 1, 2, 4).reshape(B, NH, S, 4 * DH) + self.bias[:, None]
        h, hcnm = slstm_sequence(gates, self.recurrent_kernel, tuple(state[0].unbind(1)), docs=docs, backend="auto")
        y = self.multihead_norm(h)  # [B, S, D / tp]
        if self.tp_size > 1:
            y = tensor_model_parallel_all_gather(y.contiguous(), dim=-1)
        new = (torch.stack(hcnm, dim=1),)
        return y, new if window is None else (*new, window)


# ---- blocks and the model


class FeedForward(nn.Module):
    """modeling_xlstm.GatedFeedForward with the two up-projections as one column-parallel matrix."""

    def __init__(self, config: xLSTMConfig, prefix: str):
        super().__init__()
        D, H, bias = config.hidden_size, config.ffn_dim, config.use_bias
        self.up = MergedColumnParallelLinear(D, [H, H], bias=bias, return_bias=False, prefix=f"{prefix}.up")
        self.proj_down = RowParallelLinear(H, D, bias=bias, return_bias=False, prefix=f"{prefix}.proj_down")
        self.act = FFN_ACTIVATION_FUNCTIONS[config.ffn_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.proj_down(self.act(gate) * up)


class Block(nn.Module):
    """modeling_xlstm.xLSTMBlock on [T, D]: x + mixer(norm(x)) [+ ffn(norm_ffn(x))]; the same attribute names."""

    def __init__(self, config: xLSTMConfig, idx: int, prefix: str):
        super().__init__()
        self.block_type = config.block_types[idx]
        norm = RMSNorm if config.architecture == "7b" else LayerNorm
        bias = config.use_bias and config.architecture == "7b"
        if self.block_type == "s":
            self.norm_slstm = norm(config.hidden_size, config.norm_eps, bias=bias)
            self.slstm_layer = sLSTMMixer(config, f"{prefix}.slstm_layer")
        else:
            self.norm_mlstm = norm(config.hidden_size, config.norm_eps, bias=bias)
            mixer = mLSTM7BMixer if config.architecture == "7b" else mLSTMPaperMixer
            self.mlstm_layer = mixer(config, f"{prefix}.mlstm_layer")
        if self.block_type == "s" or config.architecture == "7b":
            self.norm_ffn = norm(config.hidden_size, config.norm_eps, bias=bias)
            self.ffn = FeedForward(config, f"{prefix}.ffn")
        else:
            self.ffn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_type == "s":
            x = x + self.slstm_layer(self.norm_slstm(x))
        else:
            x = x + self.mlstm_layer(self.norm_mlstm(x))
        if self.ffn is not None:
            x = x + self.ffn(self.norm_ffn(x))
        return x


class Backbone(nn.Module):
    def __init__(self, config: xLSTMConfig, prefix: str):
        super().__init__()
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embeddings")
        self.blocks = nn.ModuleList(
            [Block(config, idx, f"{prefix}.blocks.{idx}") for idx in range(config.num_hidden_layers)]
        )
        norm = RMSNorm if config.architecture == "7b" else LayerNorm
        bias = config.use_bias and config.architecture == "7b"
        self.out_norm = norm(config.hidden_size, config.norm_eps, bias=bias) if config.add_out_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


# Checkpoint names -> (parameter name, shard of a merged projection; None: the checkpoint holds it fused). The 7b
# names are xlstm_hf's and transformers' built-in "single" layout; the fused ones its weight_mode="fused".
MERGED = (
    (".mlstm_layer.q.", ".mlstm_layer.qkvo.", 0),
    (".mlstm_layer.k.", ".mlstm_layer.qkvo.", 1),
    (".mlstm_layer.v.", ".mlstm_layer.qkvo.", 2),
    (".mlstm_layer.ogate_preact.", ".mlstm_layer.qkvo.", 3),
    (".mlstm_layer.qkv_opreact.", ".mlstm_layer.qkvo.", None),
    (".mlstm_layer.igate_preact.", ".mlstm_layer.if_gates.", 0),
    (".mlstm_layer.fgate_preact.", ".mlstm_layer.if_gates.", 1),
    (".mlstm_layer.ifgate_preact.", ".mlstm_layer.if_gates.", None),
    (".ffn.proj_up_gate.", ".ffn.up.", 0),
    (".ffn.proj_up.", ".ffn.up.", 1),
    (".ffn.proj_up_gate_z.", ".ffn.up.", None),
)


class xLSTMvLLMForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    """xLSTM for vLLM: checkpoints of xlstm_hf (``xLSTMHFForCausalLM``) and of transformers' built-in xLSTM
    (``xLSTMForCausalLM``, weight_mode "single" or "fused")."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = xlstm_config(vllm_config.model_config.hf_config)
        self.config = config
        # a checkpoint of transformers' built-in xLSTM lacks these weights of ours (zero: convert.py)
        builtin = getattr(vllm_config.model_config.hf_config, "model_type", None) == "xlstm"
        self.builtin_absent = builtin_absent_weights(config) if builtin else set()
        self.backbone = Backbone(config, f"{prefix}backbone")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=f"{prefix}lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.backbone.embeddings)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.logit_soft_cap = config.output_logit_soft_cap if config.architecture == "7b" else None

    @classmethod
    def _largest_layout(cls, vllm_config: VllmConfig) -> list[tuple[tuple[int, ...], torch.dtype]]:
        config = xlstm_config(vllm_config.model_config.hf_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        state_dtype, model_dtype = getattr(torch, config.state_dtype), vllm_config.model_config.dtype
        layouts = [
            [(shape, state_dtype if is_state else model_dtype) for shape, is_state in state_layout(config, t, tp)]
            for t in sorted(set(config.block_types))
        ]
        return max(layouts, key=lambda lay: sum(torch.Size(s).numel() * d.itemsize for s, d in lay))

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return tuple(shape for shape, _ in cls._largest_layout(vllm_config))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return tuple(dtype for _, dtype in cls._largest_layout(vllm_config))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        return self.backbone(x)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)
        return None if logits is None else soft_cap(logits, self.logit_soft_cap)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for source, target, shard in MERGED:
                if source in name:
                    param_name = name.replace(source, target)
                    param = params[param_name]
                    if shard is None:
                        param.weight_loader(param, tensor)
                    else:
                        param.weight_loader(param, tensor, shard)
                    break
            else:
                if name not in params:
                    raise ValueError(f"xlstm_hf vLLM plugin: the checkpoint's {name!r} has no place in the model")
                param_name = name
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(param_name)
        for name in self.builtin_absent - loaded:
            with torch.no_grad():
                params[name].zero_()
            loaded.add(name)
        return loaded


__all__ = ["xLSTMStateBackend", "xLSTMvLLMForCausalLM"]
