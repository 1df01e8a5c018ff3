"""Conversion of the reference implementations' checkpoints into xlstm_hf (not imported by the model files).

- ``convert_from_xlstm_package(model)``: an ``xlstm.xLSTMLMModel`` (any mix of mLSTM and sLSTM blocks, either sLSTM
  backend) -> an equivalent ``xLSTMForCausalLM``. The package is never imported here: the model is read through its
  attributes.
- ``convert_transformers_xlstm(path, out)``: a directory (or Hub repo) of transformers' built-in xLSTM -> a
  ``save_pretrained`` directory of xlstm_hf. ``xLSTMForCausalLM.from_pretrained(path)`` does the same on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .configuration_xlstm import xLSTMConfig
from .modeling_xlstm import xLSTMForCausalLM

_ACTIVATIONS = {"gelu": "gelu", "swish": "silu", "relu": "relu"}


def _proj_round(up_proj_config: Any) -> int:
    if not getattr(up_proj_config, "round_proj_up_dim_up", True):
        raise ValueError("xlstm package config: round_proj_up_dim_up=False is not supported")
    return int(up_proj_config.round_proj_up_to_multiple_of)


def config_from_xlstm_package(pkg_config: Any) -> xLSTMConfig:
    """An ``xlstm.xLSTMLMModelConfig`` -> ``xLSTMConfig(architecture="paper")``."""
    mlstm = pkg_config.mlstm_block.mlstm if pkg_config.mlstm_block is not None else None
    slstm_block = pkg_config.slstm_block
    slstm = slstm_block.slstm if slstm_block is not None else None
    ffn = slstm_block.feedforward if slstm_block is not None else None
    kwargs: dict[str, Any] = dict(
        architecture="paper",
        vocab_size=pkg_config.vocab_size,
        hidden_size=pkg_config.embedding_dim,
        num_hidden_layers=pkg_config.num_blocks,
        slstm_at=list(pkg_config.slstm_at),
        tie_word_embeddings=bool(pkg_config.tie_weights),
        add_out_norm=bool(pkg_config.add_post_blocks_norm),
        use_bias=bool(pkg_config.bias),
        dropout=float(pkg_config.dropout),
        norm_eps=1e-5,
    )
    rounds = set()
    conv_sizes = set()
    if mlstm is not None:
        kwargs.update(
            num_heads=mlstm.num_heads, mlstm_proj_factor=mlstm.proj_factor, qkv_proj_blocksize=mlstm.qkv_proj_blocksize
        )
        rounds.add(_proj_round(mlstm))
        conv_sizes.add(mlstm.conv1d_kernel_size)
    if slstm is not None:
        kwargs.update(slstm_num_heads=slstm.num_heads, slstm_bias_init=slstm.bias_init)
        conv_sizes.add(slstm.conv1d_kernel_size)
    if ffn is not None:
        if ffn.act_fn not in _ACTIVATIONS:
            raise ValueError(f"xlstm package config: feedforward act_fn={ffn.act_fn!r} has no xlstm_hf counterpart")
        kwargs.update(ffn_proj_factor=ffn.proj_factor, ffn_activation=_ACTIVATIONS[ffn.act_fn])
        rounds.add(_proj_round(ffn))
    if len(rounds) > 1:
        raise ValueError(f"xlstm package config: mLSTM and feed-forward round to different multiples {sorted(rounds)}")
    if len(conv_sizes) > 1:
        raise ValueError(f"xlstm package config: mLSTM and sLSTM conv1d_kernel_size differ {sorted(conv_sizes)}")
    if rounds:
        kwargs["proj_round_to"] = rounds.pop()
    if conv_sizes:
        kwargs["conv1d_kernel_size"] = conv_sizes.pop()
    return xLSTMConfig(**kwargs)


def _offset_norm(norm: Any) -> torch.Tensor:
    """The package's LayerNorm stores weight - 1 (residual_weight); a missing weight is 1."""
    if norm.weight is None:
        return torch.ones(norm.ndim)
    return (1.0 + norm.weight.detach()) if norm.residual_weight else norm.weight.detach()


def state_dict_from_xlstm_package(model: Any, config: xLSTMConfig) -> dict[str, torch.Tensor]:
    """The weights of an ``xlstm.xLSTMLMModel`` under xlstm_hf's names."""
    sd: dict[str, torch.Tensor] = {"backbone.embeddings.weight": model.token_embedding.weight.detach()}
    if not config.tie_word_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight.detach()
    stack = model.xlstm_block_stack
    if config.add_out_norm:
        sd["backbone.out_norm.weight"] = _offset_norm(stack.post_blocks_norm)
    for idx, block in enumerate(stack.blocks):
        p = f"backbone.blocks.{idx}."
        layer = block.xlstm
        if config.block_types[idx] == "m":
            sd[p + "norm_mlstm.weight"] = _offset_norm(block.xlstm_norm)
            q = p + "mlstm_layer."
            for name in ("proj_up", "proj_down", "q_proj", "k_proj", "v_proj"):
                for attr in ("weight", "bias"):
                    t = getattr(getattr(layer, name), attr)
                    if t is not None:
                        sd[f"{q}{name}.{attr}"] = t.detach()
            sd[q + "conv1d.conv.weight"] = layer.conv1d.conv.weight.detach()
            sd[q + "conv1d.conv.bias"] = layer.conv1d.conv.bias.detach()
            cell = layer.mlstm_cell
            for name in ("igate", "fgate"):
                sd[f"{q}{name}.weight"] = getattr(cell, name).weight.detach()
                sd[f"{q}{name}.bias"] = getattr(cell, name).bias.detach()
            sd[q + "multihead_norm.weight"] = _offset_norm(cell.outnorm)
            sd[q + "learnable_skip"] = layer.learnable_skip.detach()
        else:
            sd[p + "norm_slstm.weight"] = _offset_norm(block.xlstm_norm)
            q = p + "slstm_layer."
            if config.conv1d_kernel_size > 0:
                sd[q + "conv1d.conv.weight"] = layer.conv1d.conv.weight.detach()
                sd[q + "conv1d.conv.bias"] = layer.conv1d.conv.bias.detach()
            # The package's module named `fgate` computes the input gate and `igate` the forget gate.
            for ours, theirs in (("igate", "fgate"), ("fgate", "igate"), ("zgate", "zgate"), ("ogate", "ogate")):
                sd[f"{q}{ours}.weight"] = getattr(layer, theirs).weight.detach()
            cell = layer.slstm_cell
            NH, DH = cell.config.num_heads, cell.config.head_dim
            # Through the package's canonical (backend-independent) layouts: R (NH, DH_in, 4, DH_out), b (NH, 4, DH).
            r = cell._recurrent_kernel_int2ext(cell._recurrent_kernel_.detach())
            sd[q + "recurrent_kernel"] = r.reshape(NH, DH, 4 * DH).float()
            sd[q + "bias"] = cell._bias_int2ext(cell._bias_.detach()).reshape(NH, 4 * DH).float()
            sd[q + "multihead_norm.weight"] = _offset_norm(layer.group_norm)
            sd[p + "norm_ffn.weight"] = _offset_norm(block.ffn_norm)
            up = block.ffn.proj_up.weight.detach()
            gate_w, up_w = up.chunk(2, dim=0)
            sd[p + "ffn.proj_up_gate.weight"], sd[p + "ffn.proj_up.weight"] = gate_w, up_w
            if block.ffn.proj_up.bias is not None:
                gate_b, up_b = block.ffn.proj_up.bias.detach().chunk(2)
                sd[p + "ffn.proj_up_gate.bias"], sd[p + "ffn.proj_up.bias"] = gate_b, up_b
            sd[p + "ffn.proj_down.weight"] = block.ffn.proj_down.weight.detach()
            if block.ffn.proj_down.bias is not None:
                sd[p + "ffn.proj_down.bias"] = block.ffn.proj_down.bias.detach()
    return {k: v.contiguous().clone() for k, v in sd.items()}


def convert_from_xlstm_package(model: Any) -> xLSTMForCausalLM:
    """An ``xlstm.xLSTMLMModel`` in, an ``xLSTMForCausalLM`` with the same logits (float32) out."""
    config = config_from_xlstm_package(model.config)
    state = state_dict_from_xlstm_package(model, config)
    ours = xLSTMForCausalLM(config)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"xlstm package model does not map onto xlstm_hf: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        ours.tie_weights()
    return ours.eval() if not model.training else ours


def convert_transformers_xlstm(path: str | Path, out: str | Path | None = None, **kwargs: Any) -> xLSTMForCausalLM:
    """A checkpoint of transformers' built-in xLSTM (a local directory or a Hub repo id) as an xLSTMForCausalLM;
    saved to ``out`` with ``save_pretrained`` when given."""
    model = xLSTMForCausalLM.from_pretrained(path, **kwargs)
    if out is not None:
        model.save_pretrained(out)
    return model


__all__ = [
    "config_from_xlstm_package",
    "convert_from_xlstm_package",
    "convert_transformers_xlstm",
    "state_dict_from_xlstm_package",
]
