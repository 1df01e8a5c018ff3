"""xLSTMConfig: one configuration for both xLSTM families.

- ``architecture="paper"``: the stacks of Beck et al. (2024), mLSTM blocks (pre up-projection, causal conv,
  block-diagonal q/k/v, learnable skip, multi-head norm, gated down-projection) mixed with sLSTM blocks (conv,
  head-wise gates, block-diagonal recurrent matrices, multi-head norm, gated feed-forward) at the indices ``slstm_at``:
  xLSTM[1:0] is ``slstm_at=[]``, xLSTM[7:1] puts one sLSTM block in every eight.
- ``architecture="7b"``: the xLSTM-7B stack (Beck et al., 2025), mLSTM-only blocks with q/k/v projections, soft-capped
  gates, multi-head norm, SwiGLU feed-forward and soft-capped output logits.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

ARCHITECTURES = ("paper", "7b")
FFN_ACTIVATIONS = ("gelu", "silu", "relu")
SLSTM_BIAS_INITS = ("powerlaw_blockdependent", "small_init", "zeros")


def round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


class xLSTMConfig(PreTrainedConfig):
    r"""Configuration of an xLSTM language model (``model_type="xlstm_hf"``).

    Shared fields:
        vocab_size: tokens in the vocabulary.
        hidden_size: width of the residual stream (the papers' ``embedding_dim``).
        num_hidden_layers: number of blocks.
        num_heads: heads of every mLSTM layer.
        architecture: ``"paper"`` or ``"7b"`` (see the module docstring).
        slstm_at: indices of the blocks that are sLSTM blocks (``"paper"`` only); every other block is an mLSTM block.
        use_bias: biases in the linear projections (the gate pre-activations always have one).
        norm_eps: epsilon of every norm. Defaults to 1e-5 (``"paper"``, LayerNorm) or 1e-6 (``"7b"``).
        add_out_norm: a norm after the last block.
        dropout: dropout after every layer output (0 disables it).
        chunk_size: chunk length of the chunkwise mLSTM (training and prefill).
        mlstm_eps: epsilon added to the mLSTM normaliser.
        state_dtype: dtype of the recurrent states in the cache (``"float32"`` whatever the weights' dtype).
        fuse_cross_entropy: with ``labels``, compute the (soft-capped) logits' cross-entropy by one autograd
            function over the head's output (``fused_ops.LogitsLossFunction``) instead of autograd through the cap,
            the upcast and the loss: one or two logits-sized tensors per step instead of six (chosen at construction;
            a custom ``loss_function`` always runs unfused).
        max_inference_chunksize: prompts longer than this are processed in pieces of this length when no gradient is
            needed, so that memory stays bounded (``None`` disables it).

    ``"paper"`` fields:
        mlstm_proj_factor: up-projection factor of the mLSTM block (inner width rounded up to ``proj_round_to``).
        conv1d_kernel_size: causal conv width of mLSTM and sLSTM layers (0 disables the conv of sLSTM layers).
        qkv_proj_blocksize: block size of the block-diagonal q/k/v projections.
        slstm_num_heads: heads of the sLSTM layers (block-diagonal recurrent matrices).
        slstm_bias_init: forget-gate bias init of sLSTM layers.
        ffn_proj_factor: feed-forward factor (1.3 for sLSTM blocks of ``"paper"``, 2.667 for ``"7b"``).
        ffn_activation: gate activation of the feed-forward (``"gelu"`` for ``"paper"``, ``"silu"`` for ``"7b"``).
        proj_round_to: the up-projection widths are rounded up to a multiple of this.

    ``"7b"`` fields (ignored by ``"paper"``):
        qk_dim_factor, v_dim_factor: q/k and v widths as fractions of ``hidden_size``.
        gate_soft_cap: soft cap of the input/forget gate pre-activations (``None`` disables it).
        output_logit_soft_cap: soft cap of the output logits (``None`` disables it).

    The empty mLSTM memory has the stabiliser m = -inf for ``"paper"`` (the paper's parallel formulation) and m = 0 for
    ``"7b"`` (the xLSTM-7B kernels); outputs differ only through ``mlstm_eps``, but converted checkpoints match their
    reference exactly this way.
    """

    model_type = "xlstm_hf"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"num_blocks": "num_hidden_layers", "embedding_dim": "hidden_size"}

    vocab_size: int = 50304
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_heads: int = 4
    architecture: str = "paper"
    slstm_at: list[int] | None = None
    use_bias: bool = False
    norm_eps: float | None = None
    add_out_norm: bool = True
    dropout: float = 0.0
    chunk_size: int = 64
    mlstm_eps: float = 1e-6
    state_dtype: str = "float32"
    max_inference_chunksize: int | None = 4096
    fuse_cross_entropy: bool = True
    # "paper"
    mlstm_proj_factor: float = 2.0
    conv1d_kernel_size: int = 4
    qkv_proj_blocksize: int = 4
    slstm_num_heads: int = 4
    slstm_bias_init: str = "powerlaw_blockdependent"
    ffn_proj_factor: float | None = None
    ffn_activation: str | None = None
    proj_round_to: int = 64
    # "7b"
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    # transformers
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        # Removed in favour of generate()'s compile_config; a saved `false` still loads, a request for it is refused
        if kwargs.pop("compile_decode", False):
            raise ValueError(
                "xLSTMConfig.compile_decode=True: the field was removed; compile the decoding step with "
                "model.generate(..., compile_config=transformers.CompileConfig(...)) (README, 'Generation')"
            )
        # Run-time choices that earlier versions saved with the weights: the backend is now a load-time option
        # (`from_pretrained(path, backend=...)`), and the mLSTM runs its chunkwise form (the others compute the same
        # function). A saved value still loads.
        for field, default in (("backend", "auto"), ("mlstm_kernel", "chunkwise")):
            value = kwargs.pop(field, default)
            if value != default:
                logger.warning_once(
                    f"xLSTMConfig.{field}={value!r} is no longer a config field and is ignored"
                    + (": pass backend=... to from_pretrained / from_config / the model" if field == "backend" else "")
                )
        if self.slstm_at is None:
            self.slstm_at = []
        if self.norm_eps is None:
            self.norm_eps = 1e-5 if self.architecture == "paper" else 1e-6
        if self.ffn_proj_factor is None:
            self.ffn_proj_factor = 1.3 if self.architecture == "paper" else 2.667
        if self.ffn_activation is None:
            self.ffn_activation = "gelu" if self.architecture == "paper" else "silu"
        self._validate()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"xLSTMConfig.{field}={getattr(self, field)!r}: {why}")

        def check_int(field: str, minimum: int) -> None:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                fail(field, "must be an integer")
            if value < minimum:
                fail(field, f"must be >= {minimum}")

        def check_float(field: str, minimum: float, allow_none: bool = False, strict: bool = True) -> None:
            value = getattr(self, field)
            if value is None and allow_none:
                return
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                fail(field, "must be a finite number" + (" or None" if allow_none else ""))
            if value < minimum or (strict and value == minimum):
                fail(field, f"must be {'>' if strict else '>='} {minimum}")

        def check_choice(field: str, choices: tuple[str, ...]) -> None:
            if getattr(self, field) not in choices:
                fail(field, f"unknown value, expected one of {list(choices)}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "chunk_size"):
            check_int(field, 1)
        for field in ("conv1d_kernel_size",):
            check_int(field, 0)
        for field in ("qkv_proj_blocksize", "slstm_num_heads", "proj_round_to"):
            check_int(field, 1)
        if self.max_inference_chunksize is not None:
            check_int("max_inference_chunksize", 1)
        check_choice("architecture", ARCHITECTURES)
        check_choice("ffn_activation", FFN_ACTIVATIONS)
        check_choice("slstm_bias_init", SLSTM_BIAS_INITS)
        check_choice("state_dtype", ("float32", "float64", "bfloat16", "float16"))
        check_float("norm_eps", 0.0)
        check_float("mlstm_eps", 0.0, strict=False)
        check_float("dropout", 0.0, strict=False)
        if self.dropout >= 1.0:
            fail("dropout", "must be < 1")
        check_float("mlstm_proj_factor", 0.0)
        check_float("ffn_proj_factor", 0.0)
        check_float("qk_dim_factor", 0.0)
        check_float("v_dim_factor", 0.0)
        check_float("gate_soft_cap", 0.0, allow_none=True)
        check_float("output_logit_soft_cap", 0.0, allow_none=True)
        check_float("initializer_range", 0.0, strict=False)
        for field in ("use_bias", "add_out_norm", "tie_word_embeddings", "use_cache", "fuse_cross_entropy"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "must be a bool")

        if not isinstance(self.slstm_at, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.slstm_at
        ):
            fail("slstm_at", "must be a list of block indices")
        self.slstm_at = sorted(self.slstm_at)
        if len(set(self.slstm_at)) != len(self.slstm_at):
            fail("slstm_at", "has repeated indices")
        for idx in self.slstm_at:
            if not 0 <= idx < self.num_hidden_layers:
                fail("slstm_at", f"index {idx} is out of range for num_hidden_layers={self.num_hidden_layers}")
        if self.architecture == "7b" and self.slstm_at:
            fail("slstm_at", 'the "7b" architecture has mLSTM blocks only; use architecture="paper" for sLSTM blocks')

        if self.vocab_size is not None and self.pad_token_id is not None:
            if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
                fail("pad_token_id", f"must be a token id in [0, vocab_size={self.vocab_size})")

        if self.architecture == "paper":
            if "m" in self.block_types and self.conv1d_kernel_size < 1:
                fail(
                    "conv1d_kernel_size",
                    "must be >= 1: the paper's mLSTM layer has a causal conv (0 is for sLSTM-only)",
                )
            inner = self.mlstm_inner_dim
            if inner % self.num_heads:
                fail("num_heads", f"does not divide the mLSTM inner width {inner} (hidden_size*mlstm_proj_factor)")
            if inner % self.qkv_proj_blocksize:
                fail("qkv_proj_blocksize", f"does not divide the mLSTM inner width {inner}")
            if self.slstm_at and self.hidden_size % self.slstm_num_heads:
                fail("slstm_num_heads", f"does not divide hidden_size={self.hidden_size}")
        else:
            if self.qk_dim < 1 or self.qk_dim % self.num_heads:
                fail("num_heads", f"does not divide the q/k width {self.qk_dim} (hidden_size*qk_dim_factor)")
            if self.v_dim < 1 or self.v_dim % self.num_heads:
                fail("num_heads", f"does not divide the v width {self.v_dim} (hidden_size*v_dim_factor)")

    @property
    def block_types(self) -> list[str]:
        """``"m"`` or ``"s"`` for each block."""
        return ["s" if i in self.slstm_at else "m" for i in range(self.num_hidden_layers)]

    @property
    def mlstm_inner_dim(self) -> int:
        """Width inside a ``"paper"`` mLSTM block (after the up-projection)."""
        return round_up(self.mlstm_proj_factor * self.hidden_size, self.proj_round_to)

    @property
    def qk_dim(self) -> int:
        if self.architecture == "paper":
            return self.mlstm_inner_dim
        return int(self.hidden_size * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        if self.architecture == "paper":
            return self.mlstm_inner_dim
        return int(self.hidden_size * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round_up(self.ffn_proj_factor * self.hidden_size, self.proj_round_to)

    @property
    def mlstm_empty_max_state(self) -> float:
        return float("-inf") if self.architecture == "paper" else 0.0


__all__ = ["xLSTMConfig"]
