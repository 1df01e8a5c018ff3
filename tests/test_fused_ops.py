"""The fused logits + loss (`fused_ops.LogitsLossFunction`, `config.fuse_cross_entropy`) against autograd through
the written-out formulas and transformers' `ForCausalLMLoss`. float32: the same formulas in a different order, atol
1e-5 on O(1) values; the soft cap's sigmoid form differs from tanh by at most 4 * cap * 2^-24 (7e-6 at cap 30)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import raises_naming, tiny_config
from transformers.loss.loss_utils import ForCausalLMLoss

import xlstm_hf
from xlstm_hf.fused_ops import LogitsLossFunction
from xlstm_hf.modeling_xlstm import soft_cap


@pytest.mark.parametrize("cap", [None, 30.0, 100.0])
@pytest.mark.parametrize("divisor", [None, 37.0])
def test_logits_loss_matches_autograd(cap, divisor):
    """Soft cap and cross-entropy in one function against the soft cap and transformers' ForCausalLMLoss: 300 rows
    (vocabulary 4096: two CPU row blocks of 128 and a partial one), ignored targets, a gradient reaching the logits
    too. Cap 30 sums
    the exponentials directly, cap 100 (whose exponentials could overflow) through logsumexp, as does no cap."""
    torch.manual_seed(0)
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(4096, 16, requires_grad=True)
    targets = torch.randint(0, 4096, (300,))
    targets[::7] = -100
    dlogits = torch.randn(300, 4096) * 1e-3

    logits, loss = LogitsLossFunction.apply(F.linear(h, w), targets, cap, -100, divisor)
    grads = torch.autograd.grad(loss + (logits * dlogits).sum(), [h, w])

    z = F.linear(h, w)
    logits_ref = z if cap is None else cap * torch.tanh(z / cap)
    loss_ref = F.cross_entropy(logits_ref, targets, ignore_index=-100, reduction="sum" if divisor else "mean")
    loss_ref = loss_ref / divisor if divisor else loss_ref
    grads_ref = torch.autograd.grad(loss_ref + (logits_ref * dlogits).sum(), [h, w])
    # the soft cap's sigmoid form: within 4 * cap * 2^-24 of tanh's
    torch.testing.assert_close(logits, logits_ref, atol=max(1e-5, 4 * (cap or 0) * 2**-24), rtol=1e-6)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)

    all_ignored = torch.full((300,), -100)
    _, nan_loss = LogitsLossFunction.apply(F.linear(h, w), all_ignored, cap, -100, None)
    assert torch.isnan(nan_loss)  # as F.cross_entropy's mean over no targets

    # the model's [B, S, V] logits: the same figures in its shape, and never a view (FSDP2 warns of a module's view
    # output), also from a z that is one (F.linear with a bias over 3 dims returns a view) or is strided (both copied)
    for layout in ("plain", "view", "strided"):
        z3 = F.linear(h.view(3, 100, 16), w, torch.zeros(4096) if layout == "view" else None)
        assert (z3._base is not None) == (layout == "view")
        if layout == "strided":  # positions-major in memory, not a view
            z3 = torch.empty_strided(z3.shape, (4096, 3 * 4096, 1)).copy_(z3)
            assert z3._base is None and not z3.is_contiguous()
        logits3, loss3 = LogitsLossFunction.apply(z3, targets, cap, -100, divisor)
        assert logits3.shape == (3, 100, 4096) and logits3._base is None
        torch.testing.assert_close(logits3.view(300, -1), logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(loss3, loss, atol=1e-6, rtol=0)
        grads3 = torch.autograd.grad(loss3 + (logits3 * dlogits.view(3, 100, -1)).sum(), [h, w])
        for g, g3 in zip(grads, grads3, strict=True):
            torch.testing.assert_close(g3, g, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cap", [None, 1.0, 30.0])
def test_logits_loss_in_bfloat16(cap):
    """bfloat16 logits: the same logits and loss as the soft cap followed by ForCausalLMLoss's upcast cross-entropy,
    and a gradient no further from the float32 computation than theirs (at most twice its error; here 0.2 - 0.7% of
    the gradient's scale against 0.2 - 0.9%, since this rounds once where they round twice)."""
    torch.manual_seed(0)
    z = (torch.randn(300, 4096) * 3).to(torch.bfloat16)  # row blocks of 128
    targets = torch.randint(0, 4096, (300,))
    targets[::7] = -100
    z_fused, z_plain, z_ref = z.clone().requires_grad_(), z.clone().requires_grad_(), z.float().requires_grad_()
    logits, loss = LogitsLossFunction.apply(z_fused.clone(), targets, cap, -100, None)
    logits_plain = soft_cap(z_plain, cap)
    loss_plain = F.cross_entropy(logits_plain.float(), targets, ignore_index=-100)
    loss_ref = F.cross_entropy(soft_cap(z_ref, cap), targets, ignore_index=-100)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # one bfloat16 rounding apart, plus the sigmoid form's absolute error against the model's tanh
    torch.testing.assert_close(logits, logits_plain, atol=4 * (cap or 0) * 2**-24, rtol=2**-7)
    torch.testing.assert_close(loss, loss_plain, atol=1e-5, rtol=1e-6)
    grads = [
        torch.autograd.grad(*pair)[0].float() for pair in ((loss, z_fused), (loss_plain, z_plain), (loss_ref, z_ref))
    ]
    scale = grads[2].abs().max()
    assert (grads[0] - grads[2]).abs().max() <= 2 * (grads[1] - grads[2]).abs().max() + 1e-7 * scale


def saved_logits_bytes(model, *args, **kwargs):
    """model(*args, **kwargs) and the bytes of the logits-sized tensors ([B, S, V]) that autograd keeps for the backward
    besides the returned logits: what fusing the loss saves (the soft cap's and log_softmax's float32 outputs, which
    autograd keeps and `LogitsLossFunction` does not)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(*args, **kwargs)
    sizes = {
        t.untyped_storage().data_ptr(): t.numel() * t.element_size()
        for t in saved
        if t.shape[-1:] == out.logits.shape[-1:] and t.numel() == out.logits.numel()
    }
    sizes.pop(out.logits.untyped_storage().data_ptr(), None)
    return out, sum(sizes.values())


@pytest.mark.parametrize("architecture", ["paper", "7b"])
def test_model_loss_equals_transformers_loss(architecture):
    """The model's fused loss and every gradient equal ForCausalLMLoss of its logits (the path taken when the user
    sets loss_function), with -100 labels and Trainer's num_items_in_batch; the logits are the same tensor values."""
    torch.manual_seed(0)
    config = tiny_config(architecture=architecture, output_logit_soft_cap=1.0)  # a cap that bends these logits
    fused, plain = xlstm_hf.xLSTMForCausalLM(config), xlstm_hf.xLSTMForCausalLM(config)
    plain.load_state_dict(fused.state_dict())
    calls = []
    plain.loss_function = lambda **kw: calls.append(1) or ForCausalLMLoss(**kw)
    ids = torch.randint(0, config.vocab_size, (2, 21))
    labels = ids.clone()
    labels[0, :5] = -100
    mean_loss = None
    for num_items in (None, torch.tensor(30)):
        outs, kept = zip(
            *(saved_logits_bytes(m, ids, labels=labels, num_items_in_batch=num_items) for m in (fused, plain)),
            strict=True,
        )
        mean_loss = outs[0].loss.detach() if mean_loss is None else mean_loss
        assert kept[0] < kept[1]  # the fused function ran
        torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(outs[0].loss, outs[1].loss, atol=1e-6, rtol=1e-6)
        for m in (fused, plain):
            m.zero_grad()
        for out in outs:
            out.loss.backward()
        for (name, p0), p1 in zip(fused.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p0.grad, p1.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert len(calls) == 2
    with torch.no_grad():
        evaluated = fused(ids, labels=labels)
    torch.testing.assert_close(evaluated.loss, mean_loss)


def _max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref.float()).abs().max().item()


@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
def test_model_loss_in_bfloat16(mode):
    """bfloat16 weights, and float32 weights under bfloat16 autocast: the fused loss (float32 arithmetic over the
    bfloat16 logits, like ForCausalLMLoss after its upcast) is no further from a float32 run than ForCausalLMLoss is:
    the loss within twice its error (+ 1e-3), the gradients' largest error relative to each gradient's scale within
    twice its largest (both are bfloat16 rounding noise: 4 - 11% here for either, in no fixed order)."""
    torch.manual_seed(0)
    config = tiny_config(architecture="7b", output_logit_soft_cap=1.0)
    reference = xlstm_hf.xLSTMForCausalLM(config)
    fused, plain = xlstm_hf.xLSTMForCausalLM(config), xlstm_hf.xLSTMForCausalLM(config)
    for m in (fused, plain):
        m.load_state_dict(reference.state_dict())
        if mode == "bfloat16":
            m.to(torch.bfloat16)
    plain.loss_function = lambda **kw: ForCausalLMLoss(**kw)
    ids = torch.randint(0, config.vocab_size, (2, 21))
    ref_loss = reference(ids, labels=ids).loss
    ref_loss.backward()
    losses, kept = [], []
    for m in (fused, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out, saved_bytes = saved_logits_bytes(m, ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
        out.loss.backward()
        losses.append(out.loss.detach())
        kept.append(saved_bytes)
    assert kept[0] < kept[1]  # the fused function ran
    assert _max_error(losses[0], ref_loss) <= 2 * _max_error(losses[1], ref_loss) + 1e-3
    errors = [
        max(
            _max_error(m.grad, r.grad) / r.grad.abs().max().item()
            for m, r in zip(model.parameters(), refs, strict=True)
        )
        for model, refs in ((fused, reference.parameters()), (plain, reference.parameters()))
    ]
    assert errors[0] <= 2 * errors[1], errors


@pytest.mark.parametrize("architecture", ["paper", "7b"])
def test_fuse_cross_entropy_false_runs_transformers_loss(architecture):
    """`fuse_cross_entropy=False` is chosen at construction: the loss goes through autograd over ForCausalLMLoss,
    which keeps more logits-sized tensors for the backward than the fused function, with the fused model's loss and
    logits."""
    torch.manual_seed(0)
    fused = xlstm_hf.xLSTMForCausalLM(tiny_config(architecture=architecture, output_logit_soft_cap=1.0))
    plain = xlstm_hf.xLSTMForCausalLM(
        tiny_config(architecture=architecture, output_logit_soft_cap=1.0, fuse_cross_entropy=False)
    )
    plain.load_state_dict(fused.state_dict())
    ids = torch.randint(0, fused.config.vocab_size, (2, 21))
    outs, kept = zip(*(saved_logits_bytes(m, ids, labels=ids) for m in (fused, plain)), strict=True)
    assert kept[0] < kept[1]
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("fuse", [True, False])
def test_shift_labels_are_the_targets_as_given(fuse):
    """`shift_labels` (what context-parallel training passes) are the targets of each position as they are, exactly as
    ForCausalLMLoss takes them: the loss equals the one of `labels` whose shift gives them, and differs from treating
    them as unshifted labels; -100 ignored."""
    torch.manual_seed(0)
    model = xlstm_hf.xLSTMForCausalLM(tiny_config(architecture="7b", fuse_cross_entropy=fuse))
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    labels = ids.clone()
    labels[1, :4] = -100
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    by_labels = model(ids, labels=labels)
    by_shift = model(ids, shift_labels=shifted)
    torch.testing.assert_close(by_shift.loss, by_labels.loss, atol=1e-6, rtol=1e-6)
    expected = ForCausalLMLoss(by_shift.logits, None, model.config.vocab_size, shift_labels=shifted)
    torch.testing.assert_close(by_shift.loss, expected, atol=1e-5, rtol=1e-6)
    misread = model(ids, labels=shifted).loss  # the targets shifted once more
    assert (misread - by_shift.loss).abs() > 1e-3
    both = model(ids, labels=ids, shift_labels=shifted)  # shift_labels win, as in ForCausalLMLoss
    torch.testing.assert_close(both.loss, by_labels.loss, atol=1e-6, rtol=1e-6)
    with raises_naming("shift_labels", "(2, 20)", "(2, 21)"):
        model(ids, shift_labels=shifted[:, :-1])
