"""The hand-written autograd functions of fused_ops (soft cap, RMSNorm, gated feed-forward, logits and loss) against
autograd through the written-out formulas. float32: the same formulas in a different order, atol 1e-5 on O(1) values;
the soft cap's sigmoid form differs from tanh by at most 4 * cap * 2^-24 (7e-6 at cap 30)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers.loss.loss_utils import ForCausalLMLoss

import xlstm_hf
from xlstm_hf import fused_ops
from xlstm_hf.fused_ops import GatedFFNFunction, LogitsLossFunction, cpu_linear, cpu_matmul
from xlstm_hf.modeling_xlstm import GatedFeedForward, RMSNorm, soft_cap


@pytest.mark.parametrize("bias", [False, True])
def test_rmsnorm_matches_autograd(bias):
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-6, bias=bias)
    with torch.no_grad():
        norm.weight.normal_()
        if bias:
            norm.bias.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    dy = torch.randn(3, 5, 16)
    y = norm(x)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__
    grads = torch.autograd.grad(y, [x, *norm.parameters()], dy)
    with torch.no_grad():
        y_eval = norm(x)  # the written-out inference path
    y_ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    if bias:
        y_ref = y_ref + norm.bias
    grads_ref = torch.autograd.grad(y_ref, [x, *norm.parameters()], dy)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y_eval, y_ref, atol=1e-6, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    if not bias:  # without the weight (folded into the next product by the 7B block)
        xhat = norm.normalize(x)
        xhat_ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(xhat, xhat_ref, atol=1e-6, rtol=1e-6)
        (dx,), (dx_ref,) = torch.autograd.grad(xhat, [x], dy), torch.autograd.grad(xhat_ref, [x], dy)
        torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cap_matches_tanh(dtype):
    torch.manual_seed(0)
    x = (torch.randn(1000) * 40).to(dtype).requires_grad_()
    y = soft_cap(x, 30.0)
    assert y.dtype == dtype
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    xf = x.detach().float().requires_grad_()
    y_ref = 30.0 * torch.tanh(xf / 30.0)
    (dx_ref,) = torch.autograd.grad(y_ref, xf, torch.ones_like(y_ref))
    tol = dict(atol=1e-5, rtol=1e-6) if dtype == torch.float32 else dict(atol=0.0, rtol=2**-7)
    torch.testing.assert_close(y.float(), y_ref.to(dtype).float(), **tol)
    torch.testing.assert_close(dx.float(), dx_ref.to(dtype).float(), **tol)
    with torch.no_grad():
        torch.testing.assert_close(soft_cap(x, 30.0), y.detach(), atol=0, rtol=0)
    assert soft_cap(x, None) is x


@pytest.mark.parametrize("keep_products", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_gated_ffn_matches_autograd(activation, bias, keep_products):
    torch.manual_seed(0)
    gate, up, down = (
        torch.nn.Linear(16, 40, bias=bias),
        torch.nn.Linear(16, 40, bias=bias),
        torch.nn.Linear(40, 12, bias=bias),
    )
    x = torch.randn(37, 16, requires_grad=True)
    dy = torch.randn(37, 12)
    params = [x, *gate.parameters(), *up.parameters(), *down.parameters()]
    weights = [t for m in (gate, up, down) for t in (m.weight, m.bias)]
    y = GatedFFNFunction.apply(x, *weights, activation, keep_products)
    assert "GatedFFN" in type(y.grad_fn).__name__
    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation]
    y_ref = down(act(gate(x)) * up(x))
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    grads_ref = torch.autograd.grad(y_ref, params, dy, retain_graph=True)
    for _ in range(2):  # a second backward through the same graph finds the saved tensors intact
        for g, g_ref in zip(torch.autograd.grad(y, params, dy, retain_graph=True), grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    # a frozen input and frozen weights (LoRA-style fine-tuning of other layers) get no gradient computed
    frozen = [w.detach() if w is not None else None for w in weights]
    (dx,) = torch.autograd.grad(GatedFFNFunction.apply(x, *frozen, activation, keep_products), [x], dy)
    torch.testing.assert_close(dx, torch.autograd.grad(y_ref, [x], dy)[0], atol=1e-5, rtol=1e-5)


def _through_gated_ffn(y: torch.Tensor) -> bool:
    """Whether y [.., D] came out of GatedFFNFunction (behind the view back to [B, S, D])."""
    return "GatedFFN" in type(y.grad_fn.next_functions[0][0]).__name__


def test_feed_forward_paths_agree():
    """The module's three paths (fused function with autograd, in-place without, modules called one by one when a
    hook or autocast asks for it) give the same output and gradients."""
    torch.manual_seed(0)
    ffn = GatedFeedForward(tiny_config(architecture="7b", use_bias=True))
    x = torch.randn(2, 9, ffn.proj_up.in_features, requires_grad=True)
    dy = torch.randn(2, 9, ffn.proj_down.out_features)
    params = [x, *ffn.parameters()]
    y = ffn(x)
    assert _through_gated_ffn(y)
    grads = torch.autograd.grad(y, params, dy)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), y, atol=0, rtol=0)
    seen = []
    handle = ffn.proj_up.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    y_hooked = ffn(x)
    handle.remove()
    assert seen and not _through_gated_ffn(y_hooked)
    torch.testing.assert_close(y_hooked, y, atol=0, rtol=0)
    for g, g_ref in zip(torch.autograd.grad(y_hooked, params, dy), grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16 = ffn(x)
    assert y_bf16.dtype == torch.bfloat16 and not _through_gated_ffn(y_bf16)
    torch.testing.assert_close(y_bf16.float(), y, atol=0.05, rtol=0.05)


def test_training_step_equals_module_path():
    """A few optimizer steps of a 7B-style model with the fused feed-forward equal the same steps with every
    feed-forward module hooked (which sends it through the modules one by one)."""
    torch.manual_seed(0)
    config = tiny_config(architecture="7b")
    models = [xlstm_hf.xLSTMForCausalLM(config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for block in models[1].backbone.blocks:
        block.ffn.proj_down.register_forward_pre_hook(lambda m, i: None)
    ids = torch.randint(0, config.vocab_size, (2, 21))
    losses = []
    for model in models:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p0, p1, atol=1e-5, rtol=1e-4)


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
    torch.testing.assert_close(logits, logits_plain, atol=0, rtol=0)
    torch.testing.assert_close(loss, loss_plain, atol=1e-5, rtol=1e-6)
    grads = [
        torch.autograd.grad(*pair)[0].float() for pair in ((loss, z_fused), (loss_plain, z_plain), (loss_ref, z_ref))
    ]
    scale = grads[2].abs().max()
    assert (grads[0] - grads[2]).abs().max() <= 2 * (grads[1] - grads[2]).abs().max() + 1e-7 * scale


def _graph_names(t: torch.Tensor) -> str:
    """The names of every autograd node that t's graph reaches, space-separated."""
    stack, seen, names = [t.grad_fn], set(), []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return " ".join(names)


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
        outs = [m(ids, labels=labels, num_items_in_batch=num_items) for m in (fused, plain)]
        mean_loss = outs[0].loss.detach() if mean_loss is None else mean_loss
        assert "LogitsLoss" in _graph_names(outs[0].loss) and "LogitsLoss" not in _graph_names(outs[1].loss)
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
    losses = []
    for m in (fused, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = m(ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
        assert ("LogitsLoss" in _graph_names(out.loss)) == (m is fused)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert _max_error(losses[0], ref_loss) <= 2 * _max_error(losses[1], ref_loss) + 1e-3
    errors = [
        max(
            _max_error(m.grad, r.grad) / r.grad.abs().max().item()
            for m, r in zip(model.parameters(), refs, strict=True)
        )
        for model, refs in ((fused, reference.parameters()), (plain, reference.parameters()))
    ]
    assert errors[0] <= 2 * errors[1], errors


needs_onednn = pytest.mark.skipif(not fused_ops._ONEDNN, reason="oneDNN matmuls are used on x86 CPUs only")


def _grad_fn_names(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__ if t.grad_fn is not None else ""


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_matches_f_linear(bias):
    """cpu_linear at 300 rows (oneDNN) against F.linear: output and every gradient, also through a second backward
    (create_graph: the backward's products are then plain, differentiable ops); 3-d inputs; below 256 rows, in
    bfloat16 and without oneDNN it is F.linear itself."""
    torch.manual_seed(0)
    x = torch.randn(3, 100, 48, requires_grad=True)
    w = torch.randn(40, 48, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    params = [t for t in (x, w, b) if t is not None]
    dy = torch.randn(3, 100, 40)
    y, y_ref = cpu_linear(x, w, b), F.linear(x, w, b)
    assert "LinearFunction" in _grad_fn_names(y)
    assert y._base is None  # oneDNN's op returns a view of its [N, out] result; a module's view output FSDP2 warns of
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(y, params, dy, create_graph=True)
    grads_ref = torch.autograd.grad(y_ref, params, dy, create_graph=True)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    second = torch.autograd.grad(grads[0].square().sum(), [w])  # d/dw of |dy w|^2
    second_ref = torch.autograd.grad(grads_ref[0].square().sum(), [w])
    torch.testing.assert_close(second[0], second_ref[0], atol=1e-3, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear(x, w, b), y_ref, atol=1e-5, rtol=1e-5)
        add = torch.randn(3, 100, 40)
        torch.testing.assert_close(cpu_matmul(x, w.t(), add=add), x @ w.t() + add, atol=1e-5, rtol=1e-5)
    assert "LinearFunction" not in _grad_fn_names(cpu_linear(x[:, :80], w, b))  # 240 rows
    assert "LinearFunction" not in _grad_fn_names(cpu_linear(x.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's cast, as F.linear gets it
        assert cpu_linear(x, w, b).dtype == F.linear(x, w, b).dtype == torch.bfloat16
        assert cpu_matmul(x.detach().reshape(-1, 48), w.detach().t()).dtype == torch.bfloat16
    frozen = w.detach()  # a frozen weight (as under PEFT): only x gets a gradient
    (dx,) = torch.autograd.grad(cpu_linear(x, frozen, b), [x], dy)
    torch.testing.assert_close(dx, grads_ref[0], atol=1e-5, rtol=1e-5)


@needs_onednn
def test_cpu_matmul_matches_addmm(monkeypatch):
    """cpu_matmul (a backward's dy W, with and without an added product) against torch's products, and its fallback
    when a gradient is taken through it."""
    torch.manual_seed(0)
    a, w, add = torch.randn(300, 40), torch.randn(40, 48), torch.randn(300, 48)
    torch.testing.assert_close(cpu_matmul(a, w), a @ w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpu_matmul(a, w, add=add), torch.addmm(add, a, w), atol=1e-5, rtol=1e-5)
    w.requires_grad_()
    assert cpu_matmul(a, w, add=add).grad_fn is not None
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(fused_ops, "_ONEDNN", False)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or real(*args))
    torch.testing.assert_close(cpu_matmul(a, w.detach()), a @ w.detach(), atol=0, rtol=0)
    assert not calls


@needs_onednn
@pytest.mark.parametrize("architecture", ["paper", "7b"])
def test_model_with_and_without_onednn(architecture, monkeypatch):
    """A model over 2 x 160 tokens (320 rows: the projections, the feed-forward and the head go through oneDNN)
    gives the logits, loss and gradients of the same model with every product left to torch."""
    torch.manual_seed(0)
    config = tiny_config(architecture=architecture, output_logit_soft_cap=1.0)
    model = xlstm_hf.xLSTMForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 160))
    runs = []
    for onednn in (True, False):
        monkeypatch.setattr(fused_ops, "_ONEDNN", onednn)
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        runs.append((out.logits.detach(), out.loss.detach(), grads, "LinearFunction" in _graph_names(out.loss)))
    (logits, loss, grads, used), (logits_ref, loss_ref, grads_ref, used_ref) = runs
    assert used and not used_ref
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    for (name, _), g, g_ref in zip(model.named_parameters(), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4, msg=name)
