"""Model-level invariants of xLSTMForCausalLM for both families (tolerances: float32 forms of the same function)."""

import math

import pytest
import torch
from conftest import raises_naming, randomize_, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, DataCollatorWithFlattening

import xlstm_hf

FAMILIES = {
    "paper_mixed": dict(architecture="paper"),  # mLSTM blocks with an sLSTM block in the middle
    "paper_mlstm": dict(architecture="paper", slstm_at=[]),
    "paper_slstm": dict(architecture="paper", slstm_at=[0, 1, 2]),
    "7b": dict(architecture="7b"),
}
TOL = dict(atol=2e-5, rtol=1e-4)


def make(name, **overrides):
    model = xlstm_hf.xLSTMForCausalLM(tiny_config(**{**FAMILIES[name], **overrides}))
    return randomize_(model).eval()


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def test_auto_classes_and_safetensors_roundtrip(family, tmp_path):
    config = tiny_config(**FAMILIES[family])
    model = randomize_(AutoModelForCausalLM.from_config(config)).eval()
    assert isinstance(model, xlstm_hf.xLSTMForCausalLM)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, xlstm_hf.xLSTMModel)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(family):
    model = make(family)
    ids = torch.randint(0, 97, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    target = labels[:, 1:].reshape(-1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))


def test_left_padding_gives_the_unpadded_logits(family):
    model = make(family)
    ids = torch.randint(0, 97, (3, 17))
    lengths = [17, 12, 5]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, 17 - n :] = 1
    padded = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        batched = model(padded, attention_mask=mask).logits
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, 17 - n :]).logits
            torch.testing.assert_close(batched[row, 17 - n :], alone[0], **TOL)
            assert torch.isfinite(batched[row]).all()


def test_pieces_with_cache_equal_one_pass(family):
    model = make(family)
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        out, cache, pieces = None, None, []
        for start, stop in ((0, 9), (9, 10), (10, 23)):
            out = model(ids[:, start:stop], cache=cache, use_cache=True)
            cache = out.cache
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)
    assert cache.get_seq_length() == 23


def test_default_use_cache_trains(family):
    model = make(family).train()
    assert model.config.use_cache
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_no_module_fsdp_wraps_returns_a_view_requiring_grad(family):
    """FSDP2 wraps every block (`_no_split_modules`) and the root, and warns when one returns a view that requires
    grad (an in-place op on it would skip the pre-backward hook). Without a cache the blocks return no state (their
    kernels' final states are views of the kernels' buffers), and the LM's logits are never a view, with labels (the
    fused loss) or without; with a cache the states still reach it."""
    from torch.distributed.fsdp._common_utils import collect_grad_tensors

    model = make(family).train()
    views = []

    def record(module, args, output):
        views.extend(
            (type(module).__name__, tuple(t.shape)) for t in collect_grad_tensors(output) if t._base is not None
        )

    for module in model.modules():
        if type(module).__name__ in model._no_split_modules or module is model:
            module.register_forward_hook(record)
    ids = torch.randint(0, 97, (2, 12))
    model(ids, labels=ids, use_cache=False).loss.backward()
    model(ids, use_cache=False)
    assert views == []
    out = model(ids, labels=ids, use_cache=True)
    assert all(state is not None for state in out.cache.states)
    out.loss.backward()


def test_truncated_bptt_with_detached_cache():
    """A detached cache carries the state but no graph: the second piece's gradients equal those from a state
    computed without autograd, and differ from those through an attached cache (which reach the first piece)."""
    model = make("paper_mixed").train()
    ids = torch.randint(0, 97, (2, 16))
    first, second = ids[:, :8], ids[:, 8:]

    def second_piece_grads(cache):
        model.zero_grad()
        model(second, labels=second, cache=cache, use_cache=True).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    detached = model(first, use_cache=True).cache.detach()
    assert all(not t.requires_grad for state in detached.states for t in state)
    truncated = second_piece_grads(detached)
    with torch.no_grad():
        constant = model(first, use_cache=True).cache
    for g, g_ref in zip(truncated, second_piece_grads(constant), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)
    through = second_piece_grads(model(first, use_cache=True).cache)
    assert any((g - g_t).abs().max() > 1e-6 for g, g_t in zip(through, truncated, strict=True))


def test_output_hidden_states(family):
    """The hidden states of one input: the embeddings of its ids, then the output of each block run by hand on the
    one before, the last after the output norm and equal to last_hidden_state; the LM returns the same tuple."""
    model = make(family)
    backbone = model.backbone
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        out = backbone(ids, output_hidden_states=True)
        lm_hidden = model(ids, output_hidden_states=True).hidden_states
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1 == len(backbone.blocks) + 1
        h = backbone.embeddings(ids)
        assert torch.equal(out.hidden_states[0], h)
        for idx, block in enumerate(backbone.blocks):
            h, _ = block(h)
            expected = backbone.out_norm(h) if idx == len(backbone.blocks) - 1 else h
            torch.testing.assert_close(
                out.hidden_states[idx + 1], expected, **TOL, msg=lambda m, idx=idx: f"after block {idx}: {m}"
            )
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    for got, want in zip(lm_hidden, out.hidden_states, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("autocast", [False, True])
def test_no_grad_forward_writes_only_its_own_tensors(family, autocast):
    """Without autograd, the caller's inputs_embeds and every returned hidden state stay as they were, and every
    output equals, bit for bit and in dtype, the autograd forward; under bf16 autocast no op narrows the residual
    stream's float32 to bfloat16."""
    model = make(family, use_bias=True)
    embeds = torch.randn(2, 11, model.config.hidden_size)
    kept = embeds.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            out = model(inputs_embeds=embeds, output_hidden_states=True)
        ref = model(inputs_embeds=embeds.clone().requires_grad_(), output_hidden_states=True)
    assert torch.equal(embeds, kept)
    assert out.hidden_states[0] is embeds
    for got, want in zip((out.logits, *out.hidden_states), (ref.logits, *ref.hidden_states), strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want.detach())
    if autocast:
        assert out.hidden_states[-2].dtype == torch.float32


def test_no_grad_forward_leaves_tensors_returned_by_hooks_alone(family):
    """Forward hooks that hand in a tensor the caller keeps (activation patching) on every module whose output the
    blocks could write into: without autograd the caller's tensors stay as they were, and the outputs equal the
    autograd forward with the same hooks."""
    model = make(family)
    kept = {}

    def patch(name):
        def hook(module, args, output):
            if name not in kept:
                first = output[0] if isinstance(output, tuple) else output
                kept[name] = (torch.randn_like(first), None)
                kept[name] = (kept[name][0], kept[name][0].clone())
            return (kept[name][0], *output[1:]) if isinstance(output, tuple) else kept[name][0]

        return hook

    names = ("out_proj", "proj_down", "proj_up_gate", "proj_up", "multihead_norm", "mlstm_layer", "slstm_layer")
    handles = [
        module.register_forward_hook(patch(name))
        for name, module in model.named_modules()
        if name.split(".")[-1] in names or name == "lm_head"
    ]
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    ref = model(ids, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    assert len(kept) >= 4
    for name, (tensor, copy) in kept.items():
        assert torch.equal(tensor, copy), name
    for got, want in zip((out.logits, *out.hidden_states), (ref.logits, *ref.hidden_states), strict=True):
        assert torch.equal(got, want.detach())


@pytest.mark.parametrize("family", ["paper_mixed", "7b"])
def test_torch_func_grad_and_per_sample_vmap(family):
    """torch.func transforms (the package's autograd functions define no setup_context, so the model runs the plain
    formulas under them): grad equals autograd's gradients, and vmap(grad) gives each sample's own gradient."""
    from torch.func import functional_call, grad, vmap

    model = make(family)
    params = {name: p.detach() for name, p in model.named_parameters()}
    ids = torch.randint(0, 97, (3, 11))

    def loss(p, x):
        return functional_call(model, p, (x,), {"labels": x}).loss

    grads = grad(loss)(params, ids)
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    per_sample = vmap(grad(lambda p, x: loss(p, x[None])), in_dims=(None, 0))(params, ids)
    one = grad(loss)(params, ids[1:2])
    for name in params:
        torch.testing.assert_close(per_sample[name][1], one[name], atol=1e-5, rtol=1e-4, msg=name)


def test_offloaded_weights_are_loaded_by_their_hooks(family):
    """accelerate's cpu_offload leaves meta weights that its hooks load when a module is called: the model calls
    every hooked module (norms whose weight it would otherwise fold, projections it would otherwise bypass) and gives
    the logits of the same model in memory, over enough rows for the fused products (2 x 40 tokens)."""
    accelerate = pytest.importorskip("accelerate")
    model = make(family)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
    offloaded = xlstm_hf.xLSTMForCausalLM(model.config).eval()
    offloaded.load_state_dict(model.state_dict())
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_and_resize(tmp_path):
    model = xlstm_hf.xLSTMForCausalLM(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.backbone.embeddings.weight
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120 and model.lm_head.weight.shape == (120, 32)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    model.save_pretrained(tmp_path)
    loaded = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    ids = torch.randint(0, 120, (1, 5))
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits)
    untied = xlstm_hf.xLSTMForCausalLM(tiny_config())
    assert untied.lm_head.weight is not untied.backbone.embeddings.weight


def test_init_follows_the_papers():
    model = xlstm_hf.xLSTMForCausalLM(tiny_config(architecture="7b"))
    layer = model.backbone.blocks[0].mlstm_layer
    assert torch.all(layer.igate_preact.bias == -10.0) and torch.all(layer.igate_preact.weight == 0)
    torch.testing.assert_close(layer.fgate_preact.bias, torch.linspace(3.0, 6.0, 2))
    paper = xlstm_hf.xLSTMForCausalLM(tiny_config())
    slstm = paper.backbone.blocks[1].slstm_layer
    assert torch.all(slstm.recurrent_kernel == 0)
    f_bias = slstm.bias.view(4, 4, 8)[:, 1]  # slstm_num_heads=4, head dim 8
    assert f_bias[0, 0] == 5.0 and f_bias[0, -1] == -7.0  # the power law from +5 to -7 over the head dim
    assert torch.all(paper.backbone.blocks[0].mlstm_layer.learnable_skip == 1)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_weights_missing_from_a_checkpoint_get_the_papers_init(tmp_path, dtype):
    """A checkpoint without the conv weights (mLSTM and sLSTM), an sLSTM layer's recurrent matrices and gate biases, a
    skip and a norm: each missing weight is initialised as a new model's (conv: nn.Conv1d's uniform +-1/sqrt(KS), never
    zeros or NaN; the rest exactly), every saved weight is kept, and a `dtype` pin is respected."""
    from safetensors.torch import load_file, save_file

    saved = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config()))
    saved.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in state if ".conv1d." in k or "slstm_layer.recurrent_kernel" in k or k.endswith("_layer.bias")]
    dropped += ["backbone.blocks.0.mlstm_layer.learnable_skip", "backbone.blocks.2.norm_mlstm.weight"]
    assert {k.split(".")[3] for k in dropped} >= {"mlstm_layer", "slstm_layer"}
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "model.safetensors", {"format": "pt"})

    loaded, info = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=dtype)
    assert sorted(info["missing_keys"]) == sorted(dropped)
    fresh = xlstm_hf.xLSTMForCausalLM(tiny_config())
    params, fresh_params = dict(loaded.named_parameters()), dict(fresh.named_parameters())
    for name, p in params.items():
        assert p.dtype == (dtype or torch.float32), name
        assert torch.isfinite(p).all(), name
        if name not in dropped:
            torch.testing.assert_close(p.float(), state[name].float(), atol=0, rtol=0 if dtype is None else 1e-2)
        elif ".conv1d." in name:
            bound = 1 / math.sqrt(loaded.config.conv1d_kernel_size)
            assert p.abs().max() <= bound and p.float().std() > bound / 4, name
        else:
            expected = fresh_params[name].to(p.dtype)  # initialised in float32, then cast to the pinned dtype
            torch.testing.assert_close(p, expected, atol=0, rtol=0, msg=name)


def test_bad_inputs_raise_errors_naming_them():
    """Each bad input is a ValueError whose message names the argument and the offending value or shapes."""
    model = make("paper_mixed")  # vocabulary [0, 97)
    for bad in (120, -3):
        with raises_naming("input_ids", str(bad)):
            model(torch.tensor([[1, 2, bad]]))
    with raises_naming("input_ids"):
        model(torch.tensor([[1, 2, 97]]))  # the first id past the vocabulary
    with raises_naming("attention_mask", "(1, 2)", "(1, 3)"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    cache = model(torch.randint(0, 97, (5, 3)), use_cache=True).cache
    with raises_naming("cache", "5", "2"):
        model(torch.tensor([[1], [2]]), cache=cache)
    with raises_naming("input_ids", "(1, 0)"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with raises_naming("input_ids", "inputs_embeds"):
        model()
    ids = torch.randint(0, 97, (2, 5))
    with raises_naming("labels", "(2, 4)", "(2, 5)"):
        model(ids, labels=ids[:, 1:])
    with raises_naming("labels", "(10,)"):
        model(ids, labels=ids.reshape(-1))  # flat labels would be shifted across the rows
    with raises_naming("labels"):
        model(ids, labels=torch.full_like(ids, 97))
    for bad in (1000, -5):
        with raises_naming("labels", str(bad)):
            model(ids, labels=torch.full_like(ids, bad))
    assert model(ids, labels=torch.full_like(ids, -100)).loss.isnan()  # nothing to predict, as ForCausalLMLoss


def test_bf16_weights_keep_float32_states():
    model = make("7b").to(torch.bfloat16)
    out = model(torch.randint(0, 97, (2, 9)), use_cache=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in out.cache.states[0][:3])


def test_cache_reorder_selects_rows():
    model = make("paper_mixed")
    ids = torch.randint(0, 97, (3, 7))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        cache.reorder_cache(torch.tensor([2, 2, 0]))
        nxt = torch.randint(0, 97, (3, 1))
        got = model(nxt, cache=cache).logits
        ref = model(torch.cat([ids[[2, 2, 0]], nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens_q"])
def test_packed_documents_equal_separate_runs(family, boundaries):
    """Two rows of documents, each packed by DataCollatorWithFlattening (its labels: -100 at every document's first
    token) and stacked as examples/train.py makes rows; lengths that are not multiples of the chunk (8), one of a
    single token; the boundaries from position_ids, or from cu_seq_lens_q alone. Every document's logits, the
    token-mean loss and every parameter's gradient (of the loss, and of the logits under a random cotangent) equal
    those of the documents run one by one: the sequence ops start each document from an empty state. No cache comes
    out, and packed rows refuse to continue one."""
    model = make(family).train()
    lengths = [[13, 1, 8, 21, 5], [7, 16, 25]]
    docs = [[torch.randint(0, 97, (n,)) for n in row] for row in lengths]
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")
    rows = [collate([{"input_ids": d.tolist()} for d in row]) for row in docs]
    S = rows[0]["input_ids"].shape[1]
    assert all(row["input_ids"].shape == (1, S) for row in rows)
    batch = {key: torch.cat([row[key] for row in rows]) for key in ("input_ids", "labels", "position_ids")}
    if boundaries == "cu_seq_lens_q":
        batch["cu_seq_lens_q"] = torch.cat([rows[0]["cu_seq_lens_q"], rows[1]["cu_seq_lens_q"][1:] + S])
        del batch["position_ids"]
    params = list(model.parameters())
    weights = torch.randn(*batch["input_ids"].shape, model.config.vocab_size)

    packed = model(**batch)
    assert packed.cache is None
    grads = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for loss in (packed.loss, (packed.logits * weights).sum())
    ]
    targets = sum(n - 1 for row in lengths for n in row)
    loss, logits_loss = 0.0, 0.0
    for r, row in enumerate(docs):
        offset = 0
        for d in row:
            alone = model(d[None], labels=d[None])
            torch.testing.assert_close(packed.logits[r, offset : offset + len(d)], alone.logits[0], **TOL)
            if len(d) > 1:  # a one-token document has no target (its own loss is NaN)
                loss = loss + alone.loss * (len(d) - 1) / targets
            logits_loss = logits_loss + (alone.logits[0] * weights[r, offset : offset + len(d)]).sum()
            offset += len(d)
    torch.testing.assert_close(packed.loss, loss, atol=1e-5, rtol=1e-5)
    # float32 rounding of differently chunked runs: 1e-5 on the loss's gradients; the logits' are summed over every
    # position with O(1) weights, 2e-4 of an O(1) gradient
    for separate, packed_grads, tol in zip((loss, logits_loss), grads, (1e-5, 1e-3), strict=True):
        separate_grads = torch.autograd.grad(separate, params, retain_graph=True, allow_unused=True)
        for (name, _), g, g_ref in zip(model.named_parameters(), packed_grads, separate_grads, strict=True):
            if g_ref is None:
                assert g is None or not g.any(), name
            else:
                torch.testing.assert_close(g, g_ref, atol=tol, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")

    cache = model(batch["input_ids"][:, :3], use_cache=True).cache
    with raises_naming("cache", boundaries):
        model(**batch, cache=cache)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_in_pieces_equals_one_pass(family, use_cache):
    """Without autograd, a prompt longer than max_inference_chunksize goes through the stack in pieces of that many
    tokens, the state carried between them: 23 tokens in pieces of 5 (the last of 3) give the logits of one pass of
    the same weights and, with a cache, the same state in every tensor of every block."""
    whole = make(family, max_inference_chunksize=None)
    pieces = xlstm_hf.xLSTMForCausalLM(tiny_config(**FAMILIES[family], max_inference_chunksize=5)).eval()
    pieces.load_state_dict(whole.state_dict())
    lengths = []
    for block in pieces.backbone.blocks:
        block.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        expected, got = whole(ids, use_cache=use_cache), pieces(ids, use_cache=use_cache)
    assert set(lengths) == {5, 3}  # the pieces did run
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    if not use_cache:
        assert got.cache is None
        return
    assert got.cache.get_seq_length() == 23
    assert_same_states(got.cache.states, expected.cache.states)


def test_mask_with_holes_gives_the_logits_without_the_masked_tokens(family):
    """An attention_mask with zeros inside and at the end of a row, not only left padding: at the real positions, the
    logits of the row with the masked tokens removed, and after the row the state of that shorter row."""
    model = make(family)
    ids = torch.randint(0, 97, (2, 19))
    mask = torch.ones_like(ids)
    mask[0, 5:8] = mask[0, 12] = mask[0, 18] = 0  # a hole of three inside the first chunk, one in the second, the end
    mask[1, :2] = mask[1, 9] = 0  # left padding and a hole
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        for row in range(2):
            keep = mask[row].bool()
            alone = model(ids[row : row + 1, keep], use_cache=True)
            torch.testing.assert_close(
                out.logits[row, keep], alone.logits[0], **TOL, msg=lambda m, row=row: f"row {row}: {m}"
            )
            row_states = [tuple(None if t is None else t[row : row + 1] for t in s) for s in out.cache.states]
            assert_same_states(row_states, alone.cache.states)


def assert_same_states(got: list[tuple], expected: list[tuple]) -> None:
    """Every state tensor of every block (recurrent states and conv windows) within TOL."""
    for block, (a, b) in enumerate(zip(got, expected, strict=True)):
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            if y is None:
                assert x is None, f"block {block} state {j}"
            else:
                torch.testing.assert_close(x, y, **TOL, msg=lambda m, b=block, j=j: f"block {b} state {j}: {m}")
