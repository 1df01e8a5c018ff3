"""The hand-written autograd functions of modeling_xlstm (soft cap, RMSNorm) against autograd through the written-out
formulas. float32: the same formulas in a different order, atol 1e-5 on O(1) values; the soft cap's sigmoid form
differs from tanh by at most 4 * cap * 2^-24 (7e-6 at cap 30)."""

import pytest
import torch

from xlstm_hf.modeling_xlstm import RMSNorm, soft_cap


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
