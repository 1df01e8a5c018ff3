"""xLSTMCache on transformers' public Cache API, and the one private hook of transformers it relies on.

The cache subclasses `transformers.Cache` and `transformers.CacheLayerMixin` and holds its own tensors. One thing the
public API cannot do: make the model's own cache before generate() decides whether to compile the decoding step, so
`xLSTMHFForCausalLM._prepare_cache_for_generation` overrides GenerationMixin's private method of that name. The tests
marked "transformers behaviour" fail with a message naming what changed when a transformers release changes it."""

import functools
import inspect

import pytest
import torch
import transformers
from conftest import generated_cache, raises_naming, randomize_, tiny_config
from transformers import Cache, CacheLayerMixin, GenerationMixin

import xlstm_hf
from xlstm_hf.cache_xlstm import GENERATE_CACHE_NAME, xLSTMCacheLayer

TRANSFORMERS = f"transformers {transformers.__version__}"


def make(**overrides) -> xlstm_hf.xLSTMForCausalLM:
    return randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config(**overrides)), 0.3).eval()


def filled(model, batch: int = 2, tokens: int = 7) -> xlstm_hf.xLSTMCache:
    with torch.no_grad():
        return model(torch.randint(1, 96, (batch, tokens)), use_cache=True).cache


def addresses(cache: xlstm_hf.xLSTMCache) -> list[int]:
    return [t.data_ptr() for state in cache.states for t in state if t is not None]


# transformers behaviour: the private hook


def test_transformers_cache_hook_keeps_its_signature():
    """transformers behaviour: generate() calls GenerationMixin._prepare_cache_for_generation(generation_config,
    model_kwargs, generation_mode, batch_size, max_cache_length); the model's override takes the same arguments."""
    hook = getattr(GenerationMixin, "_prepare_cache_for_generation", None)
    assert hook is not None, (
        f"{TRANSFORMERS} has no GenerationMixin._prepare_cache_for_generation: xLSTMHFForCausalLM overrides it to make "
        "the xLSTMCache before the prefill; find the hook that now makes the cache in generate()"
    )
    theirs = list(inspect.signature(hook).parameters)
    ours = list(inspect.signature(xlstm_hf.xLSTMForCausalLM._prepare_cache_for_generation).parameters)
    assert theirs == ours, (
        f"{TRANSFORMERS} changed GenerationMixin._prepare_cache_for_generation to {theirs}; "
        f"xLSTMHFForCausalLM._prepare_cache_for_generation takes {ours}: update the override"
    )


def test_generate_decodes_with_the_cache_made_before_its_compile_decision(monkeypatch):
    """transformers behaviour: generate() calls _prepare_cache_for_generation before it decides whether to compile
    the decoding step (_valid_auto_compile_criteria reads model_kwargs["cache"]), and decodes with that cache."""
    model = make()
    made, seen = [], []
    prepare, criteria = model._prepare_cache_for_generation, model._valid_auto_compile_criteria

    def spy_prepare(generation_config, model_kwargs, *args):
        prepare(generation_config, model_kwargs, *args)
        made.append(model_kwargs.get(GENERATE_CACHE_NAME))

    def spy_criteria(*args, **kwargs):
        seen.extend(a.get(GENERATE_CACHE_NAME) for a in (*args, *kwargs.values()) if isinstance(a, dict))
        return criteria(*args, **kwargs)

    monkeypatch.setattr(model, "_prepare_cache_for_generation", spy_prepare)
    monkeypatch.setattr(model, "_valid_auto_compile_criteria", spy_criteria)
    out = model.generate(torch.randint(1, 96, (2, 5)), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert len(made) == 1 and isinstance(made[0], xlstm_hf.xLSTMCache), (
        f"{TRANSFORMERS} generate() no longer makes its cache through _prepare_cache_for_generation (made: {made}): "
        "without the xLSTMCache from xLSTMHFForCausalLM's override, compile_config never compiles the decoding step"
    )
    assert seen and seen[0] is made[0], (
        f"{TRANSFORMERS} generate() no longer decides to compile through _valid_auto_compile_criteria with the cache "
        "made by _prepare_cache_for_generation: check that its compile decision still sees the xLSTMCache"
    )
    assert generated_cache(out) is made[0], f"{TRANSFORMERS} generate() decoded with another cache than the one it made"


def test_generate_feeds_a_continued_prompt_from_get_seq_length(monkeypatch):
    """transformers behaviour: generate(ids, cache=c) passes only ids[:, c.get_seq_length():] to the model; 5.24 does
    so only when `not all(cache.is_linear)`, which holds because xLSTMCacheLayer is a CacheLayerMixin and not one of
    transformers' linear-attention layers."""
    model = make()
    ids = torch.randint(1, 96, (1, 9))
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).cache
    assert not any(cache.is_linear), f"{TRANSFORMERS} counts xLSTMCacheLayer as linear: {cache.is_linear}"
    fed = []
    forward = model.forward

    @functools.wraps(forward)  # generate() reads the forward's signature
    def spy(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    model.generate(ids, cache=cache, max_new_tokens=2, do_sample=False)
    assert fed == [3, 1], (
        f"{TRANSFORMERS} generate() fed {fed} tokens per step for a 9-token prompt continuing a cache that has seen 6 "
        "(expected [3, 1]): it no longer slices a continued prompt by Cache.get_seq_length() for this cache"
    )


# the cache on its own


def test_layers_are_public_cache_layers():
    cache = xlstm_hf.xLSTMCache(tiny_config(), 2)
    assert isinstance(cache, Cache) and all(isinstance(layer, CacheLayerMixin) for layer in cache.layers)
    assert cache.is_compileable and cache.get_max_length() == -1
    # generate() defers its stop check (on mps) and crops a cache it hands back only when the cache is croppable
    assert not cache.is_croppable
    with pytest.raises(NotImplementedError, match="keys and values"):
        cache.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), 0)


def test_cache_before_and_after_the_prefill():
    model = make()
    cache = xlstm_hf.xLSTMCache(model.config, 2)
    assert cache.states == [None] * 3 and cache.nbytes == 0 and cache.get_seq_length() == 0
    assert cache.batch_size == 2
    with torch.no_grad():
        model(torch.randint(1, 96, (2, 7)), cache=cache)
    kinds = [len(state) for state in cache.states]  # mLSTM: C, n, m, conv; sLSTM: h, c, n, m, conv
    assert kinds == [4, 5, 4] and all(isinstance(layer, xLSTMCacheLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 7 and cache.nbytes > 0
    assert "batch_size=2" in repr(cache)


def test_tensors_written_in_place_are_static_inputs():
    """The decoding step writes the states and the token count in place; CUDA graph trees skip a graph that mutates
    an input not marked as a static address (torch._inductor's check_for_mutation), so all of them are marked."""
    cache = filled(make())
    written = [t for state in cache.states for t in state if t is not None] + [cache.seen_tokens]
    unmarked = [tuple(t.shape) for t in written if getattr(t, "_dynamo_static_input_type", None) is None]
    assert not unmarked, f"tensors of these shapes are not marked static: {unmarked}"


def test_reset_empties_the_cache_and_keeps_its_memory():
    """After reset() the cache is empty (the next prefill starts from no state, as a new cache would) and the
    next prefill writes into the same tensors."""
    model = make()
    cache = filled(model)
    before = addresses(cache)
    cache.reset()
    assert cache.states == [None] * 3 and cache.get_seq_length() == 0 and cache.nbytes == 0
    ids = torch.randint(1, 96, (2, 7))
    with torch.no_grad():
        again = model(ids, cache=cache).logits
        fresh = model(ids, use_cache=True)
    assert addresses(cache) == before and cache.get_seq_length() == 7
    torch.testing.assert_close(again, fresh.logits, atol=0, rtol=0)
    for got, want in zip(cache.states, fresh.cache.states, strict=True):
        for s, t in zip(got, want, strict=True):
            torch.testing.assert_close(s, t, atol=0, rtol=0)


def test_reorder_cache_selects_rows_in_place():
    model = make()
    cache = filled(model, batch=3)
    rows = torch.tensor([2, 0, 0])
    want = [tuple(t[rows].clone() for t in state) for state in cache.states]
    before = addresses(cache)
    cache.reorder_cache(rows)
    assert addresses(cache) == before and cache.batch_size == 3
    for got, ref in zip(cache.states, want, strict=True):
        for s, t in zip(got, ref, strict=True):
            assert torch.equal(s, t)
    cache.reorder_cache(torch.tensor([1, 0]))  # fewer rows: new tensors of the new batch size
    assert cache.batch_size == 2 and all(t.shape[0] == 2 for state in cache.states for t in state)


def states_close(a: xlstm_hf.xLSTMCache, b: xlstm_hf.xLSTMCache) -> bool:
    pairs = [(s, t) for x, y in zip(a.states, b.states, strict=True) for s, t in zip(x, y, strict=True)]
    return all((s is None) == (t is None) for s, t in pairs) and all(
        torch.allclose(s.float(), t.float(), atol=1e-5, rtol=1e-4) for s, t in pairs if s is not None
    )


@pytest.mark.parametrize("architecture", ["paper", "7b"])
def test_a_recording_cache_rolls_back_to_the_state_after_any_prefix(architecture):
    """crop(-r) after a recording forward gives the state a plain forward of the first tokens gives, for every r
    the forward can remove (the conv windows included), and the token count follows."""
    model = make(architecture=architecture)
    prompt, more = torch.randint(1, 96, (2, 9)), torch.randint(1, 96, (2, 5))
    with torch.no_grad():
        for r in range(6):
            cache = model(prompt, use_cache=True).cache
            cache.activate_past_recording(recurrent_states_to_keep=5)
            assert cache.is_croppable and not cache.is_compileable
            model(more, cache=cache, use_cache=True)
            cache.crop(-r)
            want = model(torch.cat([prompt, more[:, : 5 - r]], 1), use_cache=True).cache
            assert cache.get_seq_length() == want.get_seq_length() == 14 - r
            assert states_close(cache, want), f"crop(-{r})"


def test_rollback_over_one_token_forwards_grown_candidates_and_from_the_empty_state():
    """A draft model records one forward per token before its crop; a prefill keeps only what a crop of the
    candidates after it may remove (a crop beyond that is refused and leaves the state); a verification forward of
    more candidates than `recurrent_states_to_keep` (transformers' heuristic schedule grows them) rolls back over all
    of them; rolling back over every token of a recording cache's first forward empties it."""
    model = make()
    ids = torch.randint(1, 96, (1, 16))
    with torch.no_grad():
        cache = xlstm_hf.xLSTMCache(model.config, 1)
        cache.activate_past_recording(recurrent_states_to_keep=3)
        model(ids[:, :2], cache=cache, use_cache=True)
        cache.crop(-2)
        assert cache.get_seq_length() == 0 and cache.states == [None] * len(cache)
        model(ids[:, :8], cache=cache, use_cache=True)  # a prefill: the last 3 tokens can be removed, not 4
        with raises_naming("4", "3"):
            cache.crop(-4)
        assert cache.get_seq_length() == 8 and states_close(cache, model(ids[:, :8], use_cache=True).cache)
        for t in range(8, 11):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache.crop(-3)
        assert states_close(cache, model(ids[:, :8], use_cache=True).cache)
        model(ids[:, 8:15], cache=cache, use_cache=True)  # 1 + 6 candidates, more than the 3 asked for
        cache.crop(-6)
        assert cache.get_seq_length() == 9 and states_close(cache, model(ids[:, :9], use_cache=True).cache)


def test_crop_refuses_what_it_cannot_do():
    cache = filled(make())
    assert not cache.is_croppable
    cache.crop(0)  # nothing to remove: allowed
    with raises_naming("crop(-1)", "activate_past_recording"):
        cache.crop(-1)
    with raises_naming("crop(3)"):
        cache.crop(3)


def test_detach_drops_the_graph_and_keeps_the_values():
    model = make().train()
    out = model(torch.randint(1, 96, (2, 7)), use_cache=True)
    assert any(t.requires_grad for state in out.cache.states for t in state)
    values = [t.detach().clone() for state in out.cache.states for t in state]
    assert out.cache.detach() is out.cache
    kept = [t for state in out.cache.states for t in state]
    assert not any(t.requires_grad for t in kept)
    assert all(torch.equal(s, t) for s, t in zip(kept, values, strict=True))
