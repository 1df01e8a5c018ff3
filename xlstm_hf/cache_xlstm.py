"""The recurrent state of an xLSTM as a transformers `Cache`: one cache layer per block, constant in size whatever the
number of tokens, compileable (generate() compiles the decoding step around it).

Built on transformers' public `Cache` and `CacheLayerMixin` only, with attributes of its own: the linear-attention
layers of `cache_utils` keep their states in private dicts whose layout has changed between minor releases."""

from __future__ import annotations

import torch
from transformers import Cache, CacheLayerMixin

from .configuration_xlstm import xLSTMConfig


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device type, and the same index where both name one ("cuda" matches "cuda:0")."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _store(buffer: torch.Tensor | None, t: torch.Tensor, tracked: bool) -> torch.Tensor | None:
    """Write t into `buffer` in place and return None, so that a captured graph replays into the same memory; or
    return the tensor to hold instead: a new buffer at a fixed address when there is none of t's shape yet, t itself
    when the update carries autograd history (`tracked`) or the buffer does, as writing into a tensor that backward
    has saved would break it."""
    if tracked:
        return t
    same = buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (t.shape, t.dtype, t.device)
    if same and not buffer.requires_grad:
        buffer.copy_(t)
        return None
    t = t.detach().clone(memory_format=torch.contiguous_format)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


class xLSTMCacheLayer(CacheLayerMixin):
    """One block's recurrent state: `recurrent` holds the mixer's state tensors (mLSTM: C [B, NH, DK, DV],
    n [B, NH, DK], m [B, NH]; sLSTM: h, c, n, m [B, NH, DH]) in the cache's `state_dtype`, `conv` the conv window
    [B, KS - 1, D] in the activations' dtype (None without a conv). The tensors are allocated by the first update
    (the prefill) and written in place after it (`_store`); `reset` empties the layer and keeps them, so the next
    prefill writes into the same memory again.

    Not a key/value layer: `update` and `lazy_initialization` refuse, and the token count is the cache's (one for
    every block). Not a `LinearAttentionCacheLayerMixin` either, so `Cache.is_linear` is False for it and generate()
    passes only the tokens a continued prompt adds beyond `get_seq_length()`."""

    is_compileable = True  # fixed shapes after the prefill, updated in place
    is_croppable = False  # a recurrent state after k tokens does not give the state after fewer
    supports_early_init = False  # the shapes are the block's: nothing to allocate before the prefill

    def __init__(self):
        super().__init__()
        self.recurrent: list[torch.Tensor] = []
        self.conv: torch.Tensor | None = None
        self.filled = False

    def state(self) -> tuple[torch.Tensor | None, ...] | None:
        """(*recurrent, conv window or None), or None while empty."""
        return (*self.recurrent, self.conv) if self.filled else None

    def set_state(self, state: tuple[torch.Tensor | None, ...], state_dtype: torch.dtype) -> None:
        """state: (*recurrent, conv window or None) as a block returns it."""
        *recurrent, conv = state
        self._write([t.to(state_dtype) for t in recurrent], conv)
        if not self.filled:
            self.filled = True

    def _write(self, recurrent: list[torch.Tensor], conv: torch.Tensor | None) -> None:
        """Each state tensor into its buffer (`_store`)."""
        tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*recurrent, conv))
        if len(self.recurrent) != len(recurrent):
            self.recurrent = [None] * len(recurrent)
        for j, t in enumerate(recurrent):
            if (fresh := _store(self.recurrent[j], t, tracked)) is not None:
                self.recurrent[j] = fresh
        if conv is not None and (fresh := _store(self.conv, conv, tracked)) is not None:
            self.conv = fresh

    @property
    def device(self) -> torch.device | None:
        """Where the states are held; None before the first update."""
        return self.recurrent[0].device if self.recurrent else None

    def detach(self) -> None:
        self.recurrent = [t.detach() for t in self.recurrent]
        self.conv = None if self.conv is None else self.conv.detach()

    def reset(self) -> None:
        self.filled = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search), in place where the number of rows stays the same."""
        if not self.filled:
            return
        rows = beam_idx.to(self.device)
        conv = None if self.conv is None else self.conv.index_select(0, rows)
        self._write([t.index_select(0, rows) for t in self.recurrent], conv)

    def get_seq_length(self) -> int:
        raise NotImplementedError("xLSTMCacheLayer: the token count is the cache's, xLSTMCache.get_seq_length()")

    def get_max_length(self) -> int:
        return -1  # transformers' value for "no maximum": the state does not grow with the tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # nothing from the past to attend to: the state carries it

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("xLSTMCacheLayer holds a recurrent state, not keys and values")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        raise NotImplementedError("xLSTMCacheLayer holds a recurrent state, not keys and values: use set_state")


class xLSTMCache(Cache):
    """The recurrent state of every block (one `xLSTMCacheLayer` each), constant in size whatever the number of tokens
    processed. Recurrent states are kept in `state_dtype` (float32 by default, whatever the weights' dtype). It counts
    the tokens it has seen (`get_seq_length`), so that generate() passes only the new tokens of a continued prompt;
    the count is a tensor updated in place, so a compiled decoding step does not recompile for every token."""

    ROLLBACK_REFUSED = (
        "xLSTM cannot roll its recurrent state back to fewer tokens: assisted generation and prompt lookup decoding "
        "are not supported (use greedy, sampling or beam search)"
    )

    def __init__(
        self,
        config: xLSTMConfig,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        state_dtype: torch.dtype | None = None,
    ):
        self.state_dtype = state_dtype if state_dtype is not None else getattr(torch, config.state_dtype)
        if not self.state_dtype.is_floating_point:
            raise ValueError(f"xLSTMCache: state_dtype={self.state_dtype} must be a floating-point dtype")
        if batch_size < 1:
            raise ValueError(f"xLSTMCache: batch_size={batch_size} must be >= 1")
        super().__init__(layers=[xLSTMCacheLayer() for _ in config.block_types])
        self.config = config
        self.max_batch_size = batch_size
        self.device = device
        self.block_types = config.block_types
        self.seen_tokens = self._static(torch.zeros((), dtype=torch.long, device=device))

    @staticmethod
    def _static(t: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(t)
        return t

    def __repr__(self) -> str:
        return f"xLSTMCache(batch_size={self.max_batch_size}, blocks={len(self)}, nbytes={self.nbytes})"

    @property
    def states(self) -> list[tuple[torch.Tensor | None, ...] | None]:
        """Every block's (*recurrent, conv window or None), None while empty."""
        return [layer.state() for layer in self.layers]

    def update_state(self, layer_idx: int, state: tuple[torch.Tensor | None, ...]) -> None:
        self.layers[layer_idx].set_state(state, self.state_dtype)

    def add_tokens(self, count: int, device: torch.device) -> None:
        if self.seen_tokens.device != device:  # a cache made without a device follows the model's
            self.seen_tokens = self._static(self.seen_tokens.to(device))
        self.seen_tokens.add_(count)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens processed so far (every block has seen all of them)."""
        return int(self.seen_tokens)

    @property
    def batch_size(self) -> int:
        return self.max_batch_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the states."""
        return sum(t.numel() * t.element_size() for s in self.states if s is not None for t in s if t is not None)

    def check_compatible(
        self, config: xLSTMConfig, batch_size: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        """Raise a ValueError naming the mismatch when this cache cannot continue a batch of this model on `device`."""
        if self.config is not config and self.block_types != config.block_types:
            raise ValueError(
                f"cache was built for blocks {''.join(self.block_types)}, the model has {''.join(config.block_types)}"
            )
        if self.max_batch_size != batch_size:
            raise ValueError(
                f"cache was built for batch size {self.max_batch_size}, but the input has batch size {batch_size}"
            )
        for idx, layer in enumerate(self.layers):
            if layer.conv is not None and layer.conv.dtype != dtype:
                raise ValueError(
                    f"cache block {idx} holds a conv window of dtype {layer.conv.dtype}, but the activations are "
                    f"{dtype}: a cache is tied to the dtype of the model that filled it"
                )
        held = next((layer.device for layer in self.layers if layer.device is not None), None)
        held = held if held is not None or self.device is None else torch.device(self.device)
        if device is not None and held is not None and not _same_device(held, device):
            raise ValueError(
                f"cache holds its states on {held}, but the input is on {device}: move the cache with the model "
                "(or start a new one)"
            )

    def activate_past_recording(self, **kwargs) -> None:
        """What generate() calls before assisted or prompt-lookup decoding (and on the assistant's cache), to crop
        the cache back to the accepted tokens later. The chunkwise form makes no state between its inputs' tokens, so
        those strategies are refused (transformers < 5.25 refuses stateful models itself)."""
        raise ValueError(self.ROLLBACK_REFUSED)

    def crop(self, tokens_to_remove: int) -> None:
        """Only a no-op crop: the state after fewer tokens is gone."""
        if tokens_to_remove != 0:
            raise ValueError(self.ROLLBACK_REFUSED)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        super().reorder_cache(beam_idx)
        self.max_batch_size = int(beam_idx.shape[0])

    def detach(self) -> xLSTMCache:
        """Detach the states from the graph in place (truncated back-propagation through time)."""
        for layer in self.layers:
            layer.detach()
        return self

    def reset(self) -> None:
        """Empty again (the next update starts a new sequence), keeping the tensors' memory."""
        super().reset()
        self.seen_tokens.zero_()
