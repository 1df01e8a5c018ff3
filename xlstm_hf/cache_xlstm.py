"""The recurrent state of an xLSTM as a transformers `Cache`: one linear-attention cache layer per block, constant in
size whatever the number of tokens, compileable (generate() compiles the decoding step around it)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer

from .configuration_xlstm import xLSTMConfig


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device type, and the same index where both name one ("cuda" matches "cuda:0")."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class xLSTMCacheLayer(LinearAttentionLayer):
    """One block's recurrent state as a transformers linear-attention cache layer: `recurrent_states[j]` hold the
    mixer's state tensors (mLSTM: C [B, NH, DK, DV], n [B, NH, DK], m [B, NH]; sLSTM: h, c, n, m [B, NH, DH]) in the
    cache's `state_dtype`, `conv_states[0]` the conv window [B, KS - 1, D] in the activations' dtype (None without a
    conv). The tensors are allocated by the first update (the prefill) and written in place after it, so that a
    captured graph (generate's compiled decoding) replays into the same memory; an update that carries autograd
    history (training with a cache) replaces them instead, as writing into a tensor that backward has saved would
    break it."""

    def __init__(self, num_recurrent: int):
        super().__init__(number_of_states=num_recurrent)

    def state(self) -> tuple[torch.Tensor, ...] | None:
        """(*recurrent, conv window or None), or None while empty."""
        if not self.has_previous_state[0]:
            return None
        return (*self.recurrent_states.values(), self.conv_states[0])

    def set_state(self, state: tuple[torch.Tensor | None, ...], state_dtype: torch.dtype) -> None:
        """state: (*recurrent, conv window or None) as a layer returns it."""
        *recurrent, conv = state
        tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in state)
        for j, t in enumerate(recurrent):
            self._write(self.recurrent_states, self.is_recurrent_states_initialized, j, t.to(state_dtype), tracked)
            self.has_previous_state[j] = True
        if conv is not None:
            self._write(self.conv_states, self.is_conv_states_initialized, 0, conv, tracked)

    def _write(self, states: dict, initialized: dict, j: int, t: torch.Tensor, tracked: bool) -> None:
        """Into the buffer in place once it exists; a new buffer of its own, at a fixed address, the first time; the
        tensor itself when it carries autograd history."""
        if initialized[j] and not tracked:
            states[j].copy_(t)
            return
        if not tracked:
            t = t.detach().clone(memory_format=torch.contiguous_format)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(t)
        states[j] = t
        initialized[j] = True
        self.device, self.dtype = t.device, t.dtype

    def detach(self) -> None:
        for states in (self.recurrent_states, self.conv_states):
            for j, t in states.items():
                if t is not None:
                    states[j] = t.detach()


class xLSTMCache(Cache):
    """The recurrent state of every block (one `xLSTMCacheLayer` each), constant in size whatever the number of tokens
    processed. Recurrent states are kept in `state_dtype` (float32 by default, whatever the weights' dtype). It counts
    the tokens it has seen (`get_seq_length`), so that generate() passes only the new tokens of a continued prompt;
    the count is a tensor updated in place, so a compiled decoding step does not recompile for every token."""

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
        super().__init__(layers=[xLSTMCacheLayer(3 if t == "m" else 4) for t in config.block_types])
        self.config = config
        self.max_batch_size = batch_size
        self.device = device
        self.block_types = config.block_types
        self.seen_tokens = torch.zeros((), dtype=torch.long, device=device)

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
            self.seen_tokens = self.seen_tokens.to(device)
        self.seen_tokens.add_(count)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens processed so far."""
        return int(self.seen_tokens)

    @property
    def is_linear(self) -> list[bool]:
        # generate() slices a continued prompt by get_seq_length() only when some layer is not "linear" (its name for
        # caches that do not count tokens); this one counts them
        return [False] * len(self.layers)

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
            conv = layer.conv_states[0]
            if conv is not None and conv.dtype != dtype:
                raise ValueError(
                    f"cache block {idx} holds a conv window of dtype {conv.dtype}, but the activations are {dtype}: "
                    "a cache is tied to the dtype of the model that filled it"
                )
        held = next((layer.device for layer in self.layers if layer.device is not None), None)
        held = held if held is not None or self.device is None else torch.device(self.device)
        if device is not None and held is not None and not _same_device(held, device):
            raise ValueError(
                f"cache holds its states on {held}, but the input is on {device}: move the cache with the model "
                "(or start a new one)"
            )

    def activate_past_recording(self, *args, **kwargs) -> None:
        """What generate() calls before assisted or prompt-lookup decoding, to crop the cache back to the accepted
        tokens later. A recurrent state after k candidate tokens does not give the state after fewer (the chunkwise
        form makes none in between), so those strategies are refused (transformers < 5.25 refused stateful models
        itself)."""
        raise ValueError(
            "xLSTM cannot roll its recurrent state back to fewer tokens: assisted generation and prompt lookup "
            "decoding are not supported (use greedy, sampling or beam search)"
        )

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
        super().reset()
        self.seen_tokens.zero_()
