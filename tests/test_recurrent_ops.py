"""recurrent_ops: the one place where a recurrence runs. Routing (export, torch.func, Triton, PyTorch), padded
positions, packed documents with their own initial states, and the model-level agreement of the mLSTM forms.

Tolerances: float32 throughout; different summation orders of the same function agree to ~1e-5 relative (logits and
gradients of tiny models, atol 2e-5 / rtol 1e-4 as in test_modeling).
"""

import logging

import pytest
import torch
from conftest import randomize_, tiny_config
from kernel_testing import DEVICE, use_kernels_in_recurrent_ops

import xlstm_hf
from xlstm_hf import recurrent_ops
from xlstm_hf.cache_xlstm import HAS_ROLLBACK_PROTOCOL
from xlstm_hf.mlstm_naive import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent
from xlstm_hf.packing import DocumentLayout
from xlstm_hf.slstm_naive import slstm_recurrent

TOL = dict(atol=2e-5, rtol=1e-4)


def mlstm_inputs(B=2, NH=2, S=19, DK=8, DV=16, requires_grad=False):
    q, k = torch.randn(B, NH, S, DK), torch.randn(B, NH, S, DK)
    v = torch.randn(B, NH, S, DV)
    i, f = torch.randn(B, NH, S), torch.randn(B, NH, S) + 2.0
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v, i, f))


def random_mlstm_state(B=2, NH=2, DK=8, DV=16):
    return torch.randn(B, NH, DK, DV), torch.randn(B, NH, DK), torch.randn(B, NH)


def slstm_inputs(B=2, NH=2, S=13, DH=8):
    return torch.randn(B, NH, S, 4 * DH), torch.randn(NH, DH, 4 * DH) * 0.3


def random_slstm_state(B=2, NH=2, DH=8):
    h, c = torch.randn(B, NH, DH), torch.randn(B, NH, DH)
    return h, c, torch.rand(B, NH, DH) + 0.5, torch.randn(B, NH, DH)


@pytest.fixture
def interpreted_triton(monkeypatch):
    use_kernels_in_recurrent_ops(monkeypatch)


def test_unknown_backend_is_a_value_error_naming_it():
    q, k, v, i, f = mlstm_inputs()
    with pytest.raises(ValueError, match="cuda"):
        recurrent_ops.mlstm_sequence(q, k, v, i, f, backend="cuda")
    with pytest.raises(ValueError, match="fast"):
        xlstm_hf.xLSTMForCausalLM(tiny_config(), backend="fast")


@pytest.mark.parametrize("op", ["mlstm", "slstm"])
def test_one_position_of_a_sequence_is_the_step(op):
    """S = 1 runs the step: the same output and state as the step op and as the reference over one position."""
    if op == "mlstm":
        q, k, v, i, f = mlstm_inputs(S=1)
        state = random_mlstm_state()
        state = (state[0], state[1], state[2].abs())
        h, new = recurrent_ops.mlstm_sequence(q, k, v, i, f, state)
        h_ref, new_ref = mlstm_recurrent(q, k, v, i, f, state)
    else:
        x, r = slstm_inputs(S=1)
        state = random_slstm_state()
        h, new = recurrent_ops.slstm_sequence(x, r, state)
        h_ref, new_ref = slstm_recurrent(x, r, state)
    torch.testing.assert_close(h, h_ref, **TOL)
    for a, b in zip(new, new_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("op", ["mlstm", "slstm"])
@pytest.mark.parametrize("last", [1, 4, 13, 20])
@pytest.mark.parametrize("padded", [False, True])
def test_sequence_states_are_the_states_after_each_prefix(op, last, padded):
    """`*_sequence_states` (a verification forward of speculative decoding) returns the sequence op's outputs and,
    for each of the last `last` positions (all of them when `last` >= S), the final state of the sequence cut
    there."""
    S = 13
    mask = None
    if padded:
        mask = torch.ones(2, S, dtype=torch.bool)
        mask[0, [2, 11]] = False
        mask[1, 0] = False
    if op == "mlstm":
        inputs, state = mlstm_inputs(S=S), random_mlstm_state()
        state = (state[0], state[1], state[2].abs())
        h, states = recurrent_ops.mlstm_sequence_states(*inputs, state, last=last, mask=mask, chunk_size=4)
        sequence = lambda *a, mask: recurrent_ops.mlstm_sequence(*a, state, mask=mask, chunk_size=4)  # noqa: E731
    else:
        x, r = slstm_inputs(S=S)
        inputs, state = (x,), random_slstm_state()
        h, states = recurrent_ops.slstm_sequence_states(x, r, state, last=last, mask=mask)
        sequence = lambda x, mask: recurrent_ops.slstm_sequence(x, r, state, mask=mask)  # noqa: E731
    h_ref, _ = sequence(*inputs, mask=mask)
    real = (torch.ones(2, S, dtype=torch.bool) if mask is None else mask)[:, None, :, None]  # h: only real positions
    torch.testing.assert_close(h * real, h_ref * real, **TOL)
    assert len(states) == min(last, S)
    for j, got in zip(range(S - len(states), S), states, strict=True):
        cut = tuple(t[:, :, : j + 1] for t in inputs)
        _, want = sequence(*cut, mask=None if mask is None else mask[:, : j + 1])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("op", ["mlstm", "slstm"])
def test_padded_positions_leave_the_state_alone(op):
    """A mask with holes (and a padded end) gives, at the real positions, the outputs of the sequence without the
    padded positions, and its final state."""
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, 3:6] = False
    keep[1, [0, 7, 12]] = False
    if op == "mlstm":
        q, k, v, i, f = mlstm_inputs(S=13)
        h, state = recurrent_ops.mlstm_sequence(q, k, v, i, f, mask=keep, chunk_size=4)
    else:
        x, r = slstm_inputs(S=13)
        h, state = recurrent_ops.slstm_sequence(x, r, mask=keep)
    for row in range(2):
        real = keep[row]
        if op == "mlstm":
            args = (t[row : row + 1, :, real] for t in (q, k, v, i, f))
            h_ref, state_ref = mlstm_recurrent(*args)
        else:
            h_ref, state_ref = slstm_recurrent(x[row : row + 1, :, real], r)
        torch.testing.assert_close(h[row : row + 1, :, real], h_ref, **TOL)
        for a, b in zip(state, state_ref, strict=True):
            torch.testing.assert_close(a[row : row + 1], b, **TOL)


@pytest.mark.parametrize("op", ["mlstm", "slstm"])
def test_packed_documents_run_from_their_own_initial_states(op):
    """Packed rows (documents of lengths 5, 9, 6 in row 0 and 11, 9 in row 1), each document from its own initial
    state: the outputs and final states of every document run alone (what a serving engine's batch of prefills and a
    context-parallel rank need)."""
    starts = torch.zeros(2, 20, dtype=torch.bool)
    starts[0, [0, 5, 14]] = True
    starts[1, [0, 11]] = True
    docs = DocumentLayout.from_starts(starts)
    spans = [(0, 0, 5), (0, 5, 14), (0, 14, 20), (1, 0, 11), (1, 11, 20)]
    if op == "mlstm":
        q, k, v, i, f = mlstm_inputs(S=20)
        initial = tuple(torch.cat([t, t[:1]]) for t in random_mlstm_state(B=4))  # 5 documents
        initial = (initial[0], initial[1], initial[2].abs())
        h, final = recurrent_ops.mlstm_sequence(q, k, v, i, f, initial, docs=docs, chunk_size=4)
    else:
        x, r = slstm_inputs(S=20)
        initial = tuple(torch.cat([t, t[:1]]) for t in random_slstm_state(B=4))
        h, final = recurrent_ops.slstm_sequence(x, r, initial, docs=docs)
    for d, (row, a, b) in enumerate(spans):
        state = tuple(t[d : d + 1] for t in initial)
        if op == "mlstm":
            h_ref, final_ref = mlstm_recurrent(*(t[row : row + 1, :, a:b] for t in (q, k, v, i, f)), state)
        else:
            h_ref, final_ref = slstm_recurrent(x[row : row + 1, :, a:b], r, state)
        torch.testing.assert_close(h[row : row + 1, :, a:b], h_ref, **TOL)
        for got, want in zip(final, final_ref, strict=True):
            torch.testing.assert_close(got[d : d + 1], want, **TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_func_routes_to_the_references(backend, interpreted_triton, caplog):
    """Under torch.func.grad the ops run the autograd references (the kernels' autograd Functions have no
    torch.func rules), with the gradients that autograd gives through the default route; each op that leaves what it
    would otherwise run warns once (the mLSTM always: its chunkwise kernel; the sLSTM when Triton was asked for)."""
    q, k, v, i, f = mlstm_inputs(S=21, DK=16, DV=16)
    x, r = slstm_inputs(S=5)
    state = tuple(t.abs() if j == 2 else t for j, t in enumerate(random_mlstm_state(DK=16, DV=16)))

    def loss(q, x):
        h, (C, n, m) = recurrent_ops.mlstm_sequence(q, k, v, i, f, state, chunk_size=16, backend=backend)
        y, _ = recurrent_ops.slstm_sequence(x, r, backend=backend)
        return (h**2).sum() + C.sum() + (y**2).sum()

    recurrent_ops.logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        dq, dx = torch.func.grad(loss, argnums=(0, 1))(q, x)
    q1, x1 = q.clone().requires_grad_(), x.clone().requires_grad_()
    loss(q1, x1).backward()
    torch.testing.assert_close(dq, q1.grad, **TOL)
    torch.testing.assert_close(dx, x1.grad, **TOL)
    routed = [r.getMessage() for r in caplog.records if "torch.func" in r.getMessage()]
    assert len(routed) == (2 if backend == "triton" else 1) and all(backend in m for m in routed), routed


def test_the_model_under_torch_func_with_the_triton_backend(interpreted_triton):
    """torch.func.grad of a model built with backend="triton" (the interpreter on CPU) equals autograd's gradients
    through the Triton kernels."""
    from torch.func import functional_call, grad

    model = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config("paper", chunk_size=16), backend="triton")).to(DEVICE)
    params = {name: p.detach() for name, p in model.named_parameters()}
    ids = torch.randint(0, 97, (2, 19), device=DEVICE)
    grads = grad(lambda p: functional_call(model, p, (ids,), {"labels": ids}).loss)(params)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


def _form(fn):
    """An mLSTM form with the signature of mlstm_chunkwise_torch (the chunk size is a chunkwise argument)."""

    def run(q, k, v, i, f, initial_state=None, chunk_size=64, eps=1e-6, empty_m=0.0):
        if fn is mlstm_chunkwise:
            return fn(q, k, v, i, f, initial_state, chunk_size=chunk_size, eps=eps, empty_m=empty_m)
        return fn(q, k, v, i, f, initial_state, eps=eps, empty_m=empty_m)

    return run


@pytest.mark.parametrize("architecture", ["paper", "7b"])
@pytest.mark.parametrize("form", ["chunkwise_autograd", "recurrent", "chunkwise_torch"])
def test_mlstm_forms_agree_at_model_level(form, architecture, monkeypatch):
    """Each form of the mLSTM in the model against the quadratic parallel form (the paper's own formulation): logits,
    the loss's gradient of every parameter, and the logits continued from a cache (19 tokens in chunks of 8: a partial
    last chunk; the cache after 11)."""
    forms = {"parallel": mlstm_parallel, "chunkwise_autograd": mlstm_chunkwise, "recurrent": mlstm_recurrent}
    ids = torch.randint(0, 97, (2, 19))
    model = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config(architecture), backend="torch"))
    results = {}
    for name in ("parallel", form):
        if name in forms:
            monkeypatch.setattr(recurrent_ops, "mlstm_chunkwise_torch", _form(forms[name]))
        else:
            monkeypatch.undo()
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            cache = model(ids[:, :11], use_cache=True).cache
            continued = model(ids[:, 11:], cache=cache).logits
        results[name] = (out.logits.detach(), grads, continued)
    (ref_logits, ref_grads, _), (logits, grads, continued) = results["parallel"], results[form]
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(continued, ref_logits[:, 11:], **TOL)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-3, msg=n)


def test_the_loss_is_chosen_at_construction_and_a_custom_one_is_honoured():
    """fuse_cross_entropy is decided when the model is built; a loss function set afterwards is the one that runs
    (on the soft-capped logits) instead of the fused loss."""
    model = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config("7b")))
    assert model.fuse_cross_entropy
    assert not xlstm_hf.xLSTMForCausalLM(tiny_config("7b", fuse_cross_entropy=False)).fuse_cross_entropy
    ids = torch.randint(0, 97, (2, 9))
    fused = model(ids, labels=ids)
    seen = []

    def custom(logits, labels, vocab_size, **kwargs):
        seen.append(logits)
        return logits.float().mean()

    model.loss_function = custom
    assert not model.fuse_cross_entropy
    out = model(ids, labels=ids)
    assert len(seen) == 1 and torch.equal(seen[0], out.logits)
    torch.testing.assert_close(out.loss, out.logits.float().mean())
    torch.testing.assert_close(out.logits, fused.logits)


@pytest.mark.skipif(not HAS_ROLLBACK_PROTOCOL, reason="transformers < 5.25 has no cache rollback")
@pytest.mark.parametrize("architecture", ["paper", "7b"])
def test_speculative_decoding_with_the_triton_kernels(architecture, interpreted_triton):
    """Prompt lookup decoding through the Triton kernels (interpreted on CPU): the fused step writes its state in
    place, which must not reach the states a recording cache keeps to roll back. The tokens are greedy's."""
    model = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config(architecture), backend="triton"), 0.3).to(DEVICE).eval()
    text = torch.randint(1, 97, (1, 6), device=DEVICE)
    prompt = torch.cat([text, text, text[:, :2]], dim=1)
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3), greedy)
