"""Input checks of the xLSTM models: a wrong shape, id or cache is a ValueError naming it, never a silent result."""

from __future__ import annotations

import torch

from .cache_xlstm import xLSTMCache
from .configuration_xlstm import xLSTMConfig
from .recurrent_ops import functorch_active


def out_of_vocabulary(ids: torch.Tensor, vocab_size: int, ignored: int | None = None) -> int | None:
    """The first id outside [0, vocab_size) (other than `ignored`), or None. A data-dependent check: skipped while
    torch.compile traces, where it would break the graph, and under torch.func.vmap, which cannot take it."""
    if torch.compiler.is_compiling() or functorch_active():
        return None
    bad = (ids < 0) | (ids >= vocab_size)
    if ignored is not None:
        bad &= ids != ignored
    return ids[bad][0].item() if bool(bad.any()) else None


def check_model_inputs(
    config: xLSTMConfig,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: xLSTMCache | None,
    dtype: torch.dtype,
) -> None:
    """Raise a ValueError naming the argument unless exactly one of input_ids [B, S] / inputs_embeds [B, S, D] is
    given with S > 0, the ids are in the vocabulary, the mask is [B, S] and the cache can continue this batch."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("xLSTMModel.forward: pass exactly one of input_ids and inputs_embeds")
    x = input_ids if input_ids is not None else inputs_embeds
    if x.dim() != (2 if input_ids is not None else 3) or x.shape[1] == 0:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(
            f"xLSTMModel.forward: {name} has shape {tuple(x.shape)}, expected [B, S] with S > 0"
            + ("" if input_ids is not None else " and a last dim D")
        )
    bad = out_of_vocabulary(input_ids, config.vocab_size) if input_ids is not None else None
    if bad is not None:
        raise ValueError(
            f"input_ids contains token id {bad} outside the vocabulary [0, vocab_size={config.vocab_size})"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(x.shape[:2])} (the "
            "xLSTM is recurrent: with a cache, pass the mask of the new tokens only)"
        )
    if cache is not None:
        if not isinstance(cache, xLSTMCache):
            raise ValueError(f"cache must be an xLSTMCache, got {type(cache).__name__}")
        cache.check_compatible(config, x.shape[0], dtype, x.device)


def check_labels(name: str, labels: torch.Tensor, inputs: torch.Tensor, vocab_size: int) -> None:
    """labels (or shift_labels) must be [B, S] like the inputs and hold token ids or -100."""
    if tuple(labels.shape) != tuple(inputs.shape[:2]):
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)}, expected {tuple(inputs.shape[:2])} (one label per input "
            "position, [B, S])"
        )
    bad = out_of_vocabulary(labels, vocab_size, ignored=-100)
    if bad is not None:
        raise ValueError(
            f"{name} contains {bad}, neither a token id in [0, vocab_size={vocab_size}) nor -100 (ignored)"
        )
