"""Conversion of the reference implementations' checkpoints into xlstm_hf.

- transformers' built-in xLSTM (``model_type: xlstm``, the NX-AI/xLSTM-7b layout): ``read_transformers_xlstm_config``
  translates its config as its model reads it, ``split_fused_xlstm_weights`` splits the projections of
  ``weight_mode="fused"``. ``xLSTMForCausalLM.from_pretrained(path)`` converts on load through them;
  ``convert_transformers_xlstm(path, out)`` also saves the result.
- The ``xlstm`` package: ``convert_from_xlstm_package(model)`` turns an ``xlstm.xLSTMLMModel`` (any mix of mLSTM and
  sLSTM blocks, either sLSTM backend) into an equivalent ``xLSTMForCausalLM``, reading the model through its
  attributes (the package is never imported).

The modeling file imports this one; this one never imports it. Functions that build a model take the class, or look up
the class registered for ``xLSTMConfig`` (``causal_lm_class``): the package's ``__init__``, which registers it, runs
before any of its modules.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from .configuration_xlstm import xLSTMConfig

HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder", "force_download", "proxies")
# What loading a `weight_mode="fused"` checkpoint honours besides HUB_KWARGS: it reads a state dict and splits it, so
# device_map, quantisation and the like are refused rather than ignored (convert once, then load the result).
FUSED_LOAD_KWARGS = ("dtype", "torch_dtype", "output_loading_info", "use_safetensors", "trust_remote_code")


def causal_lm_class() -> type[PreTrainedModel]:
    """The causal LM registered with ``AutoModelForCausalLM`` for ``xLSTMConfig`` (by ``xlstm_hf/__init__.py``)."""
    return MODEL_FOR_CAUSAL_LM_MAPPING[xLSTMConfig]


def _builtin_ffn_dim(hidden_size: int, factor: float, multiple: int) -> int:
    """The built-in's rounding (``round_up_to_next_multiple_of`` on a float): 64.5 becomes 64, not 128."""
    return int((hidden_size * factor + multiple - 1) // multiple * multiple)


def config_from_transformers_xlstm(source: dict[str, Any], **overrides: Any) -> xLSTMConfig:
    """The config dict of transformers' built-in xLSTM as ``xLSTMConfig(architecture="7b")``, field by field as the
    built-in model reads it (its config class fills what the file leaves out): the stack has ``num_blocks`` blocks
    (``num_hidden_layers`` keeps its default of 32 when only ``num_blocks`` is given); the embeddings and blocks are
    ``embedding_dim`` wide, the output norm and head ``hidden_size``; the output norm is always there and without bias
    (``add_out_norm`` is not read; with ``use_bias`` ours has one, zero on load: ``builtin_absent_weights``) and the
    head is never tied (``tie_word_embeddings`` is not read). Its kernel and mode fields are choices of its
    implementation and have no counterpart. ``overrides`` set fields of ``xLSTMConfig``."""
    builtin = CONFIG_MAPPING["xlstm"].from_dict(dict(source))
    where = "transformers xLSTM config"
    if builtin.embedding_dim != builtin.hidden_size:
        raise ValueError(
            f"{where}: embedding_dim={builtin.embedding_dim} != hidden_size={builtin.hidden_size}; its model sizes the "
            "embeddings and blocks by the one and the output norm and head by the other, so it cannot run either"
        )
    fields: dict[str, Any] = dict(
        architecture="7b",
        vocab_size=builtin.vocab_size,
        hidden_size=builtin.embedding_dim,
        num_hidden_layers=builtin.num_blocks,
        num_heads=builtin.num_heads,
        use_bias=builtin.use_bias,
        norm_eps=builtin.norm_eps,
        add_out_norm=True,
        tie_word_embeddings=False,
        qk_dim_factor=builtin.qk_dim_factor,
        v_dim_factor=builtin.v_dim_factor,
        mlstm_eps=builtin.eps,
        ffn_proj_factor=builtin.ffn_proj_factor,
        proj_round_to=builtin.ffn_round_up_to_multiple_of,
        gate_soft_cap=builtin.gate_soft_cap,
        output_logit_soft_cap=builtin.output_logit_soft_cap,
        chunk_size=builtin.chunk_size,
        max_inference_chunksize=builtin.max_inference_chunksize,
        use_cache=builtin.use_cache,
        pad_token_id=builtin.pad_token_id,
        bos_token_id=builtin.bos_token_id,
        eos_token_id=builtin.eos_token_id,
        dtype=builtin.dtype,
    )
    config = xLSTMConfig(**{**fields, **overrides})
    ffn_dim = _builtin_ffn_dim(builtin.embedding_dim, builtin.ffn_proj_factor, builtin.ffn_round_up_to_multiple_of)
    if ffn_dim != config.ffn_dim:
        raise ValueError(
            f"{where}: ffn_proj_factor={builtin.ffn_proj_factor} with hidden_size={builtin.embedding_dim} gives a "
            f"feed-forward width of {ffn_dim} by the built-in's rounding and {config.ffn_dim} by xlstm_hf's"
        )
    return config


def read_transformers_xlstm_config(path: Any, kwargs: dict[str, Any]) -> tuple[xLSTMConfig, str] | None:
    """``(config, weight_mode)`` when ``path`` holds a checkpoint of transformers' built-in xLSTM, else None. The
    ``from_pretrained`` keyword arguments in ``kwargs`` that name fields of ``xLSTMConfig`` are taken out of it and
    set on the config, as ``from_pretrained`` does with any config."""
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    source, _ = xLSTMConfig.get_config_dict(path, **hub)
    if source.get("model_type") != "xlstm":
        return None
    names = {f.name for f in dataclasses.fields(xLSTMConfig)} - {"dtype"}  # from_pretrained reads `dtype` itself
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    return config_from_transformers_xlstm(source, **overrides), source.get("weight_mode", "single")


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
                parent = fused.rsplit(".", 1)[0]
                for name, part in zip(names, torch.split(value, sizes, dim=0), strict=True):
                    out[f"{head}.{parent}.{name}.{tail}"] = part.clone()
                break
        else:
            out[key] = value
    return out


def read_safetensors_checkpoint(path: Any, hub: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, local or on the Hub."""
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


def _load_dtype(kwargs: dict[str, Any], config: xLSTMConfig, state: dict[str, torch.Tensor]) -> torch.dtype:
    """``dtype`` as ``from_pretrained`` resolves it: ``"auto"`` (the default) is the config's, else the weights'."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype")) or "auto"
    if dtype == "auto":
        dtype = config.dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_fused_transformers_xlstm(
    cls: type[PreTrainedModel], path: Any, config: xLSTMConfig, kwargs: dict[str, Any]
) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, list[str]]]:
    """A checkpoint of transformers' built-in xLSTM with ``weight_mode="fused"`` as ``cls`` (``config`` from
    ``read_transformers_xlstm_config``): its weights split by ``split_fused_xlstm_weights``, every one used."""
    refused = sorted(k for k in kwargs if k not in HUB_KWARGS + FUSED_LOAD_KWARGS)
    if refused:
        raise ValueError(
            f"{path}: a weight_mode='fused' transformers xLSTM checkpoint loads without {refused}; convert it once "
            "with xlstm_hf.convert_transformers_xlstm(path, out) and load `out` with them"
        )
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    state = read_safetensors_checkpoint(path, hub)
    dtype = _load_dtype(kwargs, config, state)
    model = cls(config)
    prefix = "" if hasattr(model, "lm_head") else f"{model.base_model_prefix}."
    state = split_fused_xlstm_weights(state, config)
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = zero_builtin_absent_weights(model, missing)
    if missing or unexpected:
        raise ValueError(f"{path}: fused transformers xLSTM checkpoint: missing {missing}, unexpected {unexpected}")
    model = model.to(dtype).eval()
    info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return (model, info) if kwargs.get("output_loading_info") else model


def builtin_absent_weights(config: xLSTMConfig, prefix: str = "backbone.") -> set[str]:
    """The weights of xlstm_hf's layout that a checkpoint of transformers' built-in xLSTM lacks: with ``use_bias`` its
    output norm still has no bias (the xlstm package's xLSTM-7B, which xlstm_hf follows, has one). A zero bias is the
    built-in's norm exactly; ``prefix`` is where the backbone's weights live in the model loaded."""
    return {f"{prefix}out_norm.bias"} if config.use_bias else set()


@torch.no_grad()
def zero_builtin_absent_weights(model: PreTrainedModel, missing: Any) -> list[str]:
    """Zero the weights of ``builtin_absent_weights`` among ``missing`` (the keys a built-in checkpoint did not
    hold); the keys still missing after that."""
    prefix = f"{model.base_model_prefix}." if hasattr(model, "lm_head") else ""  # the backbone alone: none
    absent = builtin_absent_weights(model.config, prefix) & set(missing)
    for key in absent:
        model.get_parameter(key).zero_()
    return [k for k in missing if k not in absent]


def check_transformers_xlstm_load(path: Any, model: PreTrainedModel, info: dict[str, Any]) -> None:
    """After ``from_pretrained`` of a transformers xLSTM checkpoint (``weight_mode="single"``, our names): raise
    unless every weight was found and used (the built-in never ties the head, so none may be missing) but those it
    never has (``builtin_absent_weights``: zeroed) and, for the backbone alone, the head."""
    info["missing_keys"] = type(info.get("missing_keys", []))(
        zero_builtin_absent_weights(model, info.get("missing_keys", []))
    )
    if not hasattr(model, "lm_head"):  # the backbone alone (xLSTMModel, AutoModel): the head is not used, as anywhere
        unexpected = info.get("unexpected_keys", [])
        info["unexpected_keys"] = type(unexpected)(k for k in unexpected if not k.startswith("lm_head."))
    problems = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise ValueError(f"{path}: the transformers xLSTM checkpoint does not map onto xlstm_hf's layout: {problems}")


def convert_transformers_xlstm(path: str | Path, out: str | Path | None = None, **kwargs: Any) -> PreTrainedModel:
    """A checkpoint of transformers' built-in xLSTM (a local directory or a Hub repo id) as an xLSTMForCausalLM;
    saved to ``out`` with ``save_pretrained`` when given."""
    model = causal_lm_class().from_pretrained(path, **kwargs)
    if out is not None:
        model.save_pretrained(out)
    return model


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


def convert_from_xlstm_package(model: Any) -> PreTrainedModel:
    """An ``xlstm.xLSTMLMModel`` in, an ``xLSTMForCausalLM`` with the same logits (float32) out."""
    config = config_from_xlstm_package(model.config)
    state = state_dict_from_xlstm_package(model, config)

    ours = causal_lm_class()(config)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"xlstm package model does not map onto xlstm_hf: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        ours.tie_weights()
    return ours.eval() if not model.training else ours


__all__ = [
    "causal_lm_class",
    "check_transformers_xlstm_load",
    "config_from_transformers_xlstm",
    "config_from_xlstm_package",
    "convert_from_xlstm_package",
    "convert_transformers_xlstm",
    "load_fused_transformers_xlstm",
    "read_transformers_xlstm_config",
    "split_fused_xlstm_weights",
    "state_dict_from_xlstm_package",
]
