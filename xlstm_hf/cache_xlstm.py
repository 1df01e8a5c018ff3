"""The recurrent state of an xLSTM as a transformers `Cache`: one cache layer per block, constant in size whatever the
number of tokens, compileable (generate() compiles the decoding step around it).

Built on transformers' public `Cache` and `CacheLayerMixin` only, with attributes of its own: the linear-attention
layers of `cache_utils` keep their states in private dicts whose layout has changed between minor releases."""

from __future__ import annotations

import torch
from transformers import Cache, CacheLayerMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .configuration_xlstm import xLSTMConfig

# transformers >= 5.25: recurrent caches record their past and roll back (`activate_past_recording`, `crop`), which
# assisted and prompt-lookup decoding need
HAS_ROLLBACK_PROTOCOL = hasattr(Cache, "get_recurrent_states_to_keep")

# The name under which generate() holds the cache, passes it to the model and returns it: `cache` from transformers
# 5.24 (which still accepts `past_key_values` from users, deprecated), `past_key_values` before. The model takes
# either and returns it as `cache` (with `past_key_values` as a read-only alias).
GENERATE_CACHE_NAME = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"

# How many tokens back a recording cache can always roll, beyond `recurrent_states_to_keep`: transformers' "heuristic"
# schedule of assisted decoding drafts more candidates than the count it gave at activation once all are accepted.
ROLLBACK_WINDOW = 64


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
    passes only the tokens a continued prompt adds beyond `get_seq_length()`.

    Rollback (transformers' protocol for recurrent caches, speculative decoding): after `activate_past_recording`,
    `record_past` is True and a forward records, besides the final state, the states after its last positions
    (`history`: `history[-r]` is the state with the last r tokens removed, None for the empty state), at most
    max(`recurrent_states_to_keep`, ROLLBACK_WINDOW) of them; `rollback(r)` restores one and forgets the rest."""

    supports_early_init = False  # the shapes are the block's: nothing to allocate before the prefill

    def __init__(self):
        super().__init__()
        self.recurrent: list[torch.Tensor] = []
        self.conv: torch.Tensor | None = None
        self.filled = False
        self.record_past = False  # the attribute transformers turns off when it hands a recording cache back
        self.recurrent_states_to_keep = 1
        self.history: list[tuple[torch.Tensor | None, ...] | None] = []

    @property
    def is_compileable(self) -> bool:
        """Fixed shapes after the prefill, updated in place; not while recording (the history is a growing list)."""
        return not self.record_past

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can put the layer back as it was: while recording."""
        return self.record_past

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        self.record_past = True
        self.recurrent_states_to_keep = max(1, recurrent_states_to_keep or 1)
        self.history = []

    def record(self, states: list[tuple[torch.Tensor | None, ...]], tokens: int, state_dtype: torch.dtype) -> None:
        """states: the states after each of the last len(states) positions of a forward over `tokens` tokens (oldest
        first). The last becomes the state; the others, with the state before them where they are all the forward's
        positions, go into the history."""
        if len(states) == tokens:  # every position: the history goes on from the state before the forward
            before = None if not self.filled else tuple(None if t is None else t.clone() for t in self.state())
            history = [*self.history, before, *states[:-1]]
        else:
            history = list(states[:-1])
        self.history = history[-max(self.recurrent_states_to_keep, ROLLBACK_WINDOW) :]
        self.set_state(states[-1], state_dtype)

    def rollback(self, tokens: int, state_dtype: torch.dtype) -> None:
        """Back to the state before the last `tokens` tokens (0: keep the state), and forget the history."""
        history, self.history = self.history, []
        if tokens == 0:
            return
        if tokens > len(history):
            raise ValueError(
                f"xLSTMCache.crop: cannot remove {tokens} tokens, the cache recorded the states of the last "
                f"{len(history)} (recurrent_states_to_keep={self.recurrent_states_to_keep} in "
                "activate_past_recording)"
            )
        state = history[-tokens]
        if state is None:
            self.filled = False
        else:
            self.set_state(state, state_dtype)

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
        self.history = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search), in place where the number of rows stays the same."""
        if not self.filled:
            return
        rows = beam_idx.to(self.device)
        conv = None if self.conv is None else self.conv.index_select(0, rows)
        self._write([t.index_select(0, rows) for t in self.recurrent], conv)
        self.history = [
            None if s is None else tuple(None if t is None else t.index_select(0, rows) for t in s)
            for s in self.history
        ]

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
        "assisted generation and prompt lookup decoding need transformers' rollback protocol for recurrent caches "
        "(Cache.get_recurrent_states_to_keep, transformers >= 5.25); this transformers has none: upgrade it, or use "
        "greedy, sampling or beam search"
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
        self._batch_size = batch_size
        self.device = device
        self.block_types = config.block_types
        self.seen_tokens = self._static(torch.zeros((), dtype=torch.long, device=device))

    @staticmethod
    def _static(t: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(t)
        return t

    def __repr__(self) -> str:
        return f"xLSTMCache(batch_size={self._batch_size}, blocks={len(self)}, nbytes={self.nbytes})"

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
        return self._batch_size

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
        if self._batch_size != batch_size:
            raise ValueError(
                f"cache was built for batch size {self._batch_size}, but the input has batch size {batch_size}"
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

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """What generate() calls before assisted or prompt-lookup decoding (and on the assistant's cache): from now
        on, each forward also keeps the states after its last positions, up to `recurrent_states_to_keep` tokens
        back, so that `crop` can return to the state after the accepted tokens."""
        for layer in self.layers:
            layer.activate_past_recording(recurrent_states_to_keep)

    def positions_to_record(self, tokens: int) -> int:
        """How many of a forward's last positions must return their states (0: not recording). A forward that fills
        an empty cache (a prompt, and the first candidates after it) or a long one: the last `recurrent_states_to_keep`
        + 1. A shorter one on a filled cache (the candidates of a verification forward, a draft's tokens): all of
        them, as many as a crop may remove when the number of candidates grows."""
        keep = [layer.recurrent_states_to_keep for layer in self.layers if layer.record_past]
        if not keep:
            return 0
        keep = max(keep)
        if not self.layers[0].filled or tokens > max(keep, ROLLBACK_WINDOW) + 1:
            return min(tokens, keep + 1)
        return tokens

    def record_states(self, layer_idx: int, states: list[tuple[torch.Tensor | None, ...]], tokens: int) -> None:
        """A recording forward's states for one block (see `xLSTMCacheLayer.record`)."""
        self.layers[layer_idx].record(states, tokens, self.state_dtype)

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' rollback of a recurrent cache: `crop(-r)` returns to the state before the last r tokens
        (recorded since `activate_past_recording`); `crop(0)` keeps the state and forgets the recorded ones."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"xLSTMCache.crop({tokens_to_remove}): a recurrent cache is cropped by minus the number of tokens to "
                "remove (crop(-r)), as transformers' linear-attention caches; it cannot be cut to a length"
            )
        tokens = -tokens_to_remove
        if tokens and not all(layer.record_past for layer in self.layers):
            raise ValueError(
                f"xLSTMCache.crop({tokens_to_remove}): the cache is not recording its past states; call "
                "activate_past_recording(recurrent_states_to_keep=...) before the forwards to roll back"
            )
        for layer in self.layers:
            layer.rollback(tokens, self.state_dtype)
        self.seen_tokens.sub_(tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        super().reorder_cache(beam_idx)
        self._batch_size = int(beam_idx.shape[0])

    def detach(self) -> xLSTMCache:
        """Detach the states from the graph in place (truncated back-propagation through time)."""
        for layer in self.layers:
            layer.detach()
        return self

    def reset(self) -> None:
        """Empty again (the next update starts a new sequence), keeping the tensors' memory."""
        super().reset()
        self.seen_tokens.zero_()
