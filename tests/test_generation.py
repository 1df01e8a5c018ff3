"""generate() on the recurrent cache: exactness, every decoding strategy, constant memory, long prompts."""

import copy
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import generated_cache, left_padded, raises_naming, randomize_, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TextStreamer

import xlstm_hf
from xlstm_hf.cache_xlstm import HAS_ROLLBACK_PROTOCOL

FAMILIES = {"mixed": dict(architecture="paper"), "slstm": dict(slstm_at=[0, 1, 2]), "7b": dict(architecture="7b")}
# float32: step form vs chunkwise form of the same recurrence. Two chunkwise implementations (autograd reference and
# mlstm_chunk_torch) differ from each other by 1.2e-5 on these logits and from the steps by 2.5e-5 to 3.3e-5.
LOGIT_TOL = dict(atol=5e-5, rtol=1e-4)


def make(name="mixed", **overrides):
    config = tiny_config(**{**FAMILIES[name], "pad_token_id": 0, **overrides})
    # a large perturbation makes the next-token distribution peaked, so greedy ties never decide a test
    return randomize_(xlstm_hf.xLSTMForCausalLM(config), 0.3).eval()


def tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character (ids 1..96), built locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = (string.ascii_letters + string.digits + string.punctuation)[:96]
    tok = Tokenizer(models.WordLevel({"<pad>": 0, **{c: j + 1 for j, c in enumerate(chars)}}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_left_padding_equals_single(family):
    model = make(family)
    prompts = [torch.randint(1, 96, (n,)) for n in (11, 3, 7, 1)]
    batch, mask = left_padded(prompts)
    width = batch.shape[1]
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=12, do_sample=False)
        assert torch.equal(out[row, width:], alone[0, len(p) :]), f"row {row}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generated_logits_equal_full_forward(family):
    model = make(family)
    prompt = torch.randint(1, 96, (2, 10))
    out = model.generate(prompt, max_new_tokens=14, do_sample=False, return_dict_in_generate=True, output_logits=True)
    steps = torch.stack(out.logits, dim=1)  # [B, 14, V]
    with torch.no_grad():
        full = model(out.sequences).logits[:, 9:-1]
    torch.testing.assert_close(steps, full, **LOGIT_TOL)


def test_beam_search_returns_the_best_beam():
    model = make()
    prompt = torch.randint(1, 96, (1, 6))
    out = model.generate(
        prompt,
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        logp = model(out.sequences).logits[:, 5:-1].log_softmax(-1)
    totals = logp.gather(-1, out.sequences[:, 6:, None]).squeeze(-1).sum(-1)  # sum of log-probs of each beam
    torch.testing.assert_close(totals, out.sequences_scores, atol=1e-4, rtol=1e-4)
    assert int(totals.argmax()) == 0
    best = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, length_penalty=0.0)
    assert torch.equal(best[0], out.sequences[0])


def test_sampling_is_reproducible_and_strategies_run():
    model = make()
    prompt = torch.randint(1, 96, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    a = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    b = model.generate(prompt, **kwargs)
    assert torch.equal(a, b)
    assert model.generate(prompt, max_new_tokens=4, num_return_sequences=3, do_sample=True).shape == (6, 9)
    assert model.generate(prompt, max_new_tokens=4, num_beams=2, do_sample=True).shape == (2, 9)
    out = model.generate(prompt, max_new_tokens=10, repetition_penalty=100.0, do_sample=False)
    for row in out[:, 5:]:  # a huge repetition penalty forbids repeating a seen token
        assert len(set(row.tolist())) == len(row)


def test_eos_min_max_new_tokens_and_stop_strings():
    model = make()
    prompt = torch.randint(1, 96, (1, 5))
    free = model.generate(prompt, max_new_tokens=10, do_sample=False)
    eos = int(free[0, 7])
    stopped = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert stopped.shape[1] == 8 and stopped[0, -1] == eos
    at_least = model.generate(prompt, max_new_tokens=10, min_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert at_least.shape[1] >= 11 and eos not in at_least[0, 5:11].tolist()
    tok = tokenizer()
    text = tok.decode(free[0, 7:9])  # the 3rd and 4th generated characters
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, stop_strings=[text], tokenizer=tok)
    assert tok.decode(out[0, 5:]).endswith(text) and out.shape[1] <= 9


def test_text_streamer_prints_the_generated_text(capsys):
    model = make()
    tok = tokenizer()
    prompt = tok("xLS", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
    printed = capsys.readouterr().out.strip()
    assert printed == tok.decode(out[0, 3:], skip_special_tokens=True).strip()


def test_cache_memory_is_constant_in_generated_length():
    model = make()
    prompt = torch.randint(1, 96, (1, 4))
    short = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    long = model.generate(
        prompt, max_new_tokens=1000, min_new_tokens=1000, do_sample=False, return_dict_in_generate=True
    )
    assert long.sequences.shape[1] == 1004
    assert generated_cache(short).nbytes == generated_cache(long).nbytes > 0
    assert generated_cache(long).get_seq_length() == 1003  # the last token is sampled, not yet fed


def test_unsupported_strategy_and_bad_arguments_raise():
    model = make()
    prompt = torch.randint(1, 96, (1, 5))
    with pytest.raises(ValueError, match="S > 0"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    cache = model(torch.randint(1, 96, (2, 4)), use_cache=True).cache
    with pytest.raises(ValueError, match="batch size"):
        model(prompt, cache=cache)
    half = make().to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        half(torch.randint(1, 96, (2, 1)), cache=cache)
    with pytest.raises(ValueError, match="state_dtype"):
        xlstm_hf.xLSTMCache(model.config, 1, state_dtype=torch.int32)
    # a cache made for another device, empty or filled there (meta stands in for an accelerator)
    with pytest.raises(ValueError, match="cache holds its states on meta, but the input is on cpu"):
        model(prompt[:1], cache=xlstm_hf.xLSTMCache(model.config, 1, device="meta"))
    on_meta = xlstm_hf.xLSTMCache(model.config, 2)
    for idx, state in enumerate(cache.states):
        on_meta.update_state(idx, tuple(None if t is None else t.to("meta") for t in state))
    with pytest.raises(ValueError, match="cache holds its states on meta"):
        model(torch.randint(1, 96, (2, 1)), cache=on_meta)


# Speculative decoding: the target verifies a draft's k candidates in one forward over k + 1 tokens, and its cache
# rolls back to the state after the accepted ones (transformers >= 5.25).
needs_rollback = pytest.mark.skipif(not HAS_ROLLBACK_PROTOCOL, reason="transformers < 5.25 has no cache rollback")


def llama(seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return randomize_(LlamaForCausalLM(config), 0.3).eval()


def opposite(model: xlstm_hf.xLSTMForCausalLM) -> xlstm_hf.xLSTMForCausalLM:
    """A draft whose every candidate is the target's least likely token: none is ever accepted."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        draft.lm_head.weight.neg_()
    return draft


def forward_lengths(model: torch.nn.Module) -> list[int]:
    """The number of tokens of each forward of `model` from now on."""
    lengths: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return lengths


def copy_task_prompt() -> torch.Tensor:
    """A prompt whose continuation (under these random models) copies n-grams of it, and some that do not."""
    text = torch.randint(1, 96, (1, 10))
    return torch.cat([text, text, text[:, :4]], dim=1)


@needs_rollback
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("draft", ["itself", "opposite", "other xlstm", "llama"])
def test_assisted_generation_equals_greedy(family, draft):
    """An xLSTM target with an xLSTM draft (all candidates accepted, none, some) and with a Llama draft: the tokens
    of plain greedy decoding, k candidates verified in one forward of k + 1 tokens, and the state after them the one
    plain decoding leaves."""
    model, prompt, new, k = make(family), copy_task_prompt(), 17, 4
    assistant = {
        "itself": lambda: copy.deepcopy(model),
        "opposite": lambda: opposite(model),
        "other xlstm": lambda: make(family),
        "llama": lambda: llama(),
    }[draft]()
    # k candidates every round (no early stop of the draft on its confidence)
    assistant.generation_config.update(num_assistant_tokens=k, assistant_confidence_threshold=0.0)
    greedy = model.generate(prompt, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    lengths = forward_lengths(model)
    out = model.generate(
        prompt, max_new_tokens=new, do_sample=False, assistant_model=assistant, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, greedy.sequences)
    assert lengths[0] == prompt.shape[1] + k and all(n <= k + 1 for n in lengths[1:])
    if draft == "itself":  # every candidate accepted: k + 1 tokens a forward
        assert len(lengths) == -(-new // (k + 1))
    if draft == "opposite":  # none accepted: one new token a forward
        assert len(lengths) == new and lengths[1] == k + 1
    assert generated_cache(out).get_seq_length() == generated_cache(greedy).get_seq_length()
    for got, want in zip(generated_cache(out).states, generated_cache(greedy).states, strict=True):
        for s, t in zip(got, want, strict=True):
            assert (s is None) == (t is None) and (s is None or torch.allclose(s, t, **LOGIT_TOL))


@needs_rollback
@pytest.mark.parametrize("family", ["mixed", "7b"])
def test_assisted_generation_with_a_growing_number_of_candidates(family):
    """The "heuristic" schedule drafts 2 more candidates after every round that accepts all of them: the target then
    verifies more than the count its cache was told at activation, and rolls back over them when some are rejected
    (a draft close to the target, which accepts long runs and then rejects)."""
    model, prompt = make(family), copy_task_prompt()
    draft = randomize_(copy.deepcopy(model), 0.02)
    draft.generation_config.update(
        num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic", assistant_confidence_threshold=0.0
    )
    greedy = model.generate(prompt, max_new_tokens=60, do_sample=False)
    lengths = forward_lengths(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=60, do_sample=False, assistant_model=draft), greedy)
    assert max(lengths[1:]) > 3 + 1  # the candidates grew past the 3 of the activation


@needs_rollback
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_lookup_decoding_equals_greedy(family):
    """Candidates looked up in the prompt and the text so far are verified; the tokens are greedy's (the "slstm"
    model falls into a loop, which prompt lookup then copies: accepted candidates)."""
    model, prompt, new = make(family), copy_task_prompt(), 40
    greedy = model.generate(prompt, max_new_tokens=new, do_sample=False)
    lengths = forward_lengths(model)
    looked_up = model.generate(prompt, max_new_tokens=new, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(looked_up, greedy)
    assert max(lengths[1:]) == 4  # 3 candidates verified in one forward
    if family == "slstm":
        assert len(lengths) < new  # fewer forwards than tokens: candidates accepted


@needs_rollback
@pytest.mark.parametrize("family", ["mixed", "7b"])
def test_xlstm_drafts_for_a_llama_target(family):
    """An xLSTM as the assistant of another model: its cache records its steps and rolls back to the accepted ones."""
    target, draft = llama(), make(family)
    draft.generation_config.update(num_assistant_tokens=3, assistant_confidence_threshold=0.0)
    prompt = copy_task_prompt()
    greedy = target.generate(prompt, max_new_tokens=15, do_sample=False)
    assert torch.equal(target.generate(prompt, max_new_tokens=15, do_sample=False, assistant_model=draft), greedy)
    itself = copy.deepcopy(model := make(family))
    itself.generation_config.update(num_assistant_tokens=3, assistant_confidence_threshold=0.0)
    greedy = model.generate(prompt, max_new_tokens=15, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=15, do_sample=False, assistant_model=itself), greedy)


@pytest.mark.skipif(HAS_ROLLBACK_PROTOCOL, reason="this transformers has the cache rollback protocol")
def test_speculative_decoding_is_refused_without_the_rollback_protocol():
    """Before 5.25 transformers refuses stateful models itself (5.19 to 5.24), before our cache hook would refuse them
    naming the release."""
    model, prompt = make(), torch.randint(1, 96, (1, 5))
    refused = "assisted generation is not supported with stateful models|transformers >= 5.25"
    with pytest.raises(ValueError, match=refused):
        model.generate(prompt, max_new_tokens=3, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match=refused):
        model.generate(prompt, max_new_tokens=3, assistant_model=make())


def test_generate_continues_from_a_cache():
    model = make()
    text = torch.randint(1, 96, (1, 9))
    with torch.no_grad():
        cache = model(text[:, :6], use_cache=True).cache
    cont = model.generate(text, cache=cache, max_new_tokens=5, do_sample=False)
    ref = model.generate(text, max_new_tokens=5, do_sample=False)
    assert torch.equal(cont, ref)


def test_the_cache_under_its_name_before_transformers_5_24():
    """Before 5.24 transformers calls the cache `past_key_values` (generate()'s argument and output, the model's
    input and output): the model takes it under that name, its outputs answer to it, and generate() continues from a
    cache passed so on every release of the range. Two different caches under both names are refused."""
    model = make()
    text = torch.randint(1, 96, (1, 9))
    with torch.no_grad():
        out = model(text[:, :6], use_cache=True)
        assert out.past_key_values is out.cache
        assert model.backbone(text[:, :6], use_cache=True).past_key_values is not None
        other = model(text[:, :6], use_cache=True).cache
        with raises_naming("cache", "past_key_values"):
            model(text[:, 6:], cache=out.cache, past_key_values=other)
        nxt = model(text[:, 6:7], past_key_values=out.cache).logits
        torch.testing.assert_close(nxt, model(text[:, :7]).logits[:, -1:], atol=1e-5, rtol=1e-5)
    cont = model.generate(text, past_key_values=other, max_new_tokens=5, do_sample=False)
    assert torch.equal(cont, model.generate(text, max_new_tokens=5, do_sample=False))


def test_long_prompt_prefills_in_bounded_memory():
    """A 100k-token prompt on CPU: the prefill runs in pieces of max_inference_chunksize, so the peak memory stays
    far below what the activations of 100k tokens at once would take (~1 GB for this model)."""
    script = textwrap.dedent(
        """
        import resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        from conftest import tiny_config
        import xlstm_hf
        model = xlstm_hf.xLSTMForCausalLM(tiny_config(chunk_size=64, max_inference_chunksize=2048)).eval()
        ids = torch.randint(0, 97, (1, 100_000))
        with torch.no_grad():
            model(ids[:, :4096], logits_to_keep=1)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = model(ids, use_cache=True, logits_to_keep=1)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out.logits.shape == (1, 1, 97) and out.cache.get_seq_length() == 100_000
        print((after - before) / 1024)
        """
    )
    tests_dir = str(Path(__file__).parent)
    res = subprocess.run([sys.executable, "-c", script, tests_dir], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    grown_mb = float(res.stdout.strip().splitlines()[-1])
    assert grown_mb < 150, f"peak memory grew by {grown_mb:.0f} MB"


@pytest.mark.parametrize("family", ["mixed", "7b"])
def test_generate_from_inputs_embeds(family):
    """The prompt as embeddings (first step) and then token ids: the same new tokens as from the ids."""
    model = make(family)
    prompt = torch.randint(1, 96, (2, 9))
    from_ids = model.generate(prompt, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 9:])


def test_one_token_step_returns_the_cache_it_was_asked_for():
    """A one-token step after a prefill: the same logits and state with or without use_cache and
    output_hidden_states, and use_cache=False returns no cache (the state is still written into the one passed)."""
    model = make("mixed")
    prompt = torch.randint(1, 96, (2, 7))
    token = torch.randint(1, 96, (2, 1))
    with torch.no_grad():
        cache_a = model(prompt, use_cache=True).cache
        cache_b = model(prompt, use_cache=True).cache
        a = model(token, cache=cache_a, use_cache=False)
        b = model(token, cache=cache_b, use_cache=True, output_hidden_states=True)
    assert a.cache is None and b.cache is cache_b and len(b.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)
    for x, y in zip(cache_a.states, cache_b.states, strict=True):
        for s, t in zip(x, y, strict=True):
            torch.testing.assert_close(s, t, atol=1e-6, rtol=1e-6)
    assert cache_a.get_seq_length() == cache_b.get_seq_length() == 8


@pytest.mark.parametrize("family", ["mixed", "7b"])
def test_decoding_step_compiles_without_graph_breaks(family):
    """The whole model's one-token step with a cache is one graph for torch.compile."""
    model = make(family)
    with torch.no_grad():
        cache = model(torch.randint(1, 96, (1, 7)), use_cache=True).cache
        explained = torch._dynamo.explain(model)(torch.tensor([[3]]), cache=cache)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


@pytest.mark.parametrize("family", ["mixed", "7b"])
def test_the_cache_is_a_compileable_transformers_cache(family):
    """What generate() and transformers' tools expect of a recurrent model's cache: a `Cache` of `CacheLayerMixin`
    layers, compileable, float32 states whatever the weights' dtype, constant size, written in place while decoding
    (the addresses a captured graph replays into stay the same)."""
    from transformers import Cache, CacheLayerMixin

    model = make(family).to(torch.bfloat16)
    out = model.generate(torch.randint(1, 96, (2, 5)), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = generated_cache(out)
    assert isinstance(cache, Cache) and cache.is_compileable and len(cache) == model.config.num_hidden_layers
    assert all(isinstance(layer, CacheLayerMixin) for layer in cache.layers)
    assert cache.get_seq_length() == 6  # 5 prompt tokens and the first new one went through the model
    recurrent = [t for layer in cache.layers for t in layer.recurrent]
    assert recurrent and all(t.dtype == torch.float32 for t in recurrent)
    addresses, nbytes = [t.data_ptr() for t in recurrent], cache.nbytes
    with torch.no_grad():
        model(torch.randint(1, 96, (2, 1)), cache=cache)
    assert [t.data_ptr() for layer in cache.layers for t in layer.recurrent] == addresses
    assert cache.nbytes == nbytes and cache.get_seq_length() == 7


@pytest.mark.parametrize("family", ["mixed", "7b"])
def test_generate_hands_back_a_cache_that_continues(family):
    """generate(..., return_dict_in_generate=True) returns the cache; generate(sequences, cache=it) continues with the
    tokens of one longer call (greedy), passing only the tokens the cache has not seen."""
    model = make(family)
    prompt = torch.randint(1, 96, (2, 6))
    first = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    more = model.generate(first.sequences, cache=generated_cache(first), max_new_tokens=5, do_sample=False)
    whole = model.generate(prompt, max_new_tokens=9, do_sample=False)
    assert torch.equal(more, whole)


@pytest.mark.parametrize("family", ["mixed", "7b"])
def test_compile_config_compiles_one_decoding_graph(family):
    """generate(..., compile_config=CompileConfig(...)) compiles the decoding step once per batch size (all devices
    allowed here: transformers compiles by itself on CUDA only) and gives the eager tokens and logits; more tokens
    and a second call do not recompile."""
    from transformers import CompileConfig

    model = make(family)
    prompt = torch.randint(1, 96, (2, 7))
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    eager = model.generate(prompt, **kwargs)
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(prompt, compile_config=config, **kwargs)
    again = model.generate(prompt, compile_config=config, **{**kwargs, "max_new_tokens": 12})
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1, (
        f"{graphs} graphs compiled, expected 1: with 0, generate() did not see the xLSTMCache when it decided to "
        "compile (made by xLSTMHFForCausalLM._prepare_cache_for_generation, see tests/test_cache.py); with more, "
        "the decoding step recompiles"
    )
    assert torch.equal(compiled.sequences, eager.sequences) and torch.equal(again.sequences[:, :15], eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), **LOGIT_TOL)


def test_output_scores_and_num_return_sequences():
    """Scores of every step (processed and raw), and num_return_sequences with sampling and with beams, in the shapes
    generate() documents; greedy scores are the raw logits' argmax."""
    model = make()
    prompt = torch.randint(1, 96, (2, 5))
    out = model.generate(
        prompt, max_new_tokens=4, do_sample=False, output_scores=True, output_logits=True, return_dict_in_generate=True
    )
    assert len(out.scores) == len(out.logits) == 4 and out.scores[0].shape == (2, model.config.vocab_size)
    for step, logits in enumerate(out.logits):
        assert torch.equal(logits.argmax(-1), out.sequences[:, 5 + step])
    sampled = model.generate(prompt, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    beams = model.generate(prompt, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert sampled.shape == beams.shape == (4, 8)
    assert torch.equal(sampled[::2, :5], prompt) and torch.equal(beams[1::2, :5], prompt)
