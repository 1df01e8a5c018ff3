"""Conversion of the reference implementations' checkpoints into xlstm_hf.

- ``convert_from_xlstm_package(model)``: an ``xlstm.xLSTMLMModel`` (any mix of mLSTM and sLSTM blocks, either sLSTM
  backend) -> an equivalent ``xLSTMForCausalLM``. The package is never imported here: the model is read through its
  attributes.
- ``convert_transformers_xlstm(path, out)``: a directory (or Hub repo) of transformers' built-in xLSTM -> a
  ``save_pretrained`` directory of xlstm_hf. ``xLSTMForCausalLM.from_pretrained(path)`` does the same on load,
  through ``load_transformers_xlstm`` and ``check_transformers_xlstm_load`` (so the modeling file imports this one,
  which imports the model only inside the functions that build one; it never imports the xlstm package).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .configuration_xlstm import xLSTMConfig

if TYPE_CHECKING:
    from .modeling_xlstm import xLSTMForCausalLM, xLSTMPreTrainedModel


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


HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder", "force_download", "proxies")


def read_safetensors_checkpoint(path: Any, hub: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, local or on the Hub."""
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


def load_transformers_xlstm(
    cls: type[xLSTMPreTrainedModel], path: Any, source: dict[str, Any], hub: dict[str, Any], kwargs: dict[str, Any]
) -> xLSTMPreTrainedModel:
    """A checkpoint of transformers' built-in xLSTM with ``weight_mode="fused"`` (config dict ``source``) as ``cls``:
    its weights split into ours by ``split_fused_xlstm_weights``, every key accounted for."""
    config = xLSTMConfig.from_dict(source)
    del config.source_weight_mode
    model = cls(config)
    prefix = "" if hasattr(model, "lm_head") else "backbone."
    state = split_fused_xlstm_weights(read_safetensors_checkpoint(path, hub), config)
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if not _only_tied(model, [k])] or unexpected:
        raise ValueError(f"{path}: fused transformers xLSTM checkpoint: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model.eval()


def check_transformers_xlstm_load(model: nn.Module, path: Any, info: dict[str, list[str]]) -> None:
    """After ``from_pretrained`` of a transformers xLSTM checkpoint (``weight_mode="single"``, our names): raise
    unless every weight was found and used (the tied head excepted)."""
    del model.config.source_weight_mode
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v and not (k == "missing_keys" and _only_tied(model, v))}
    if problems:
        raise ValueError(f"{path}: the transformers xLSTM checkpoint does not map onto xlstm_hf's layout: {problems}")


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
    from .modeling_xlstm import xLSTMForCausalLM  # here: the modeling file imports this one

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
    from .modeling_xlstm import xLSTMForCausalLM  # here: the modeling file imports this one

    model = xLSTMForCausalLM.from_pretrained(path, **kwargs)
    if out is not None:
        model.save_pretrained(out)
    return model


__all__ = [
    "check_transformers_xlstm_load",
    "config_from_xlstm_package",
    "convert_from_xlstm_package",
    "convert_transformers_xlstm",
    "load_transformers_xlstm",
    "split_fused_xlstm_weights",
    "state_dict_from_xlstm_package",
]
