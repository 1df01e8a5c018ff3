"""The hand-written backward of ``mlstm_chunk_torch`` against autograd through the reference
``mlstm_naive.mlstm_chunkwise``: h, the final state and the gradients of q, k, v, i, f and of the initial C, n, m.

Tolerances are relative L2 errors (``kernel_testing.rel_err``):
- float32: 1e-4, as for the Triton kernel. Both compute in float32 and differ only in summation order: measured up to
  1.2e-6 on O(1) tensors; tensors that are zero up to rounding (df at S = 1 without a state: 7e-8 against 0) reach
  5e-5 under rel_err's absolute floor.
- bfloat16 inputs: the same. Both upcast to float32 before any arithmetic and round h once at the end.
- saturated gates (+-50): 1e-3. Equal pre-activations make the stabiliser's argmax a tie, and the two break it at
  different positions (both valid subgradients); measured 3.6e-5 on df, 3e-4 on a dm0 that is 0 against 4e-7.
"""

import pytest
import torch
from conftest import raises_naming
from kernel_testing import rel_err
from test_mlstm_chunk import make_inputs, run

from xlstm_hf.mlstm_chunk_torch import mlstm_chunkwise_torch
from xlstm_hf.mlstm_naive import mlstm_chunkwise

TOL = 1e-4


def check(leaves, initial, empty_m=0.0, tol=TOL):
    out_ref, grad_ref = run(mlstm_chunkwise, leaves, initial, empty_m=empty_m)
    out, grad = run(mlstm_chunkwise_torch, leaves, initial, empty_m=empty_m)
    assert out["h"].dtype == leaves[0].dtype and all(out[s].dtype == torch.float32 for s in "Cnm")
    for name in out_ref:
        assert rel_err(out[name].float(), out_ref[name].float()) < tol, name
    assert grad.keys() == grad_ref.keys()
    for name in grad_ref:
        assert grad[name].dtype == grad_ref[name].dtype
        assert rel_err(grad[name].float(), grad_ref[name].float()) < tol, "d" + name


@pytest.mark.parametrize("S", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("state", ["none", "random", "empty_inf"])
def test_matches_autograd_fp32(S, state):
    leaves, initial = make_inputs(S=S, state=state)
    check(leaves, initial)


@pytest.mark.parametrize("empty_m", [0.0, float("-inf")])
def test_empty_memory_conventions(empty_m):
    leaves, _ = make_inputs(S=40)
    check(leaves, None, empty_m=empty_m)


def test_bf16_inputs():
    leaves, initial = make_inputs(S=37, dtype=torch.bfloat16, state="random")
    check(leaves, initial)


def test_extreme_gates():
    """Saturated input gates (+-50) and forget gates, where the stabiliser m moves every step."""
    leaves, initial = make_inputs(S=50, state="random")
    g = torch.Generator().manual_seed(3)
    leaves[3] = torch.randn(leaves[3].shape, generator=g).sign() * 50.0
    leaves[4] = torch.randn(leaves[4].shape, generator=g) * 20.0
    check(leaves, initial, tol=1e-3)


def test_gradient_through_the_state_only():
    """Truncated BPTT differentiates the final state without using h: the backward gets no dh."""
    leaves, _ = make_inputs(S=21)
    grads = []
    for fn in (mlstm_chunkwise, mlstm_chunkwise_torch):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        _, (C, n, _) = fn(*xs, chunk_size=16)
        (C.sum() + n.sum()).backward()
        grads.append([torch.zeros_like(t) if t.grad is None else t.grad for t in xs])  # q does not reach the state
    for a, b in zip(*grads, strict=True):
        assert rel_err(b, a) < TOL


def test_no_grad_path_matches():
    leaves, initial = make_inputs(S=45, state="random")
    with_grad, _ = run(mlstm_chunkwise_torch, leaves, initial)
    with torch.no_grad():
        h, (C, n, m) = mlstm_chunkwise_torch(*leaves, initial, chunk_size=16)
    for name, t in zip("hCnm", (h, C, n, m), strict=True):
        torch.testing.assert_close(t, with_grad[name].detach(), atol=0, rtol=0)


def test_bad_shapes_raise():
    leaves, _ = make_inputs(S=8)
    q, k, v, i, f = leaves
    with raises_naming(str(tuple(q.shape)), str(tuple(k[:, :, :4].shape))):
        mlstm_chunkwise_torch(q, k[:, :, :4], v, i, f)
    with pytest.raises(ValueError):  # an empty sequence
        mlstm_chunkwise_torch(*(t[:, :, :0] for t in leaves))
    with raises_naming("chunk_size", "0"):
        mlstm_chunkwise_torch(*leaves, chunk_size=0)


def test_strided_inputs_and_gradients():
    """In the model q, k, v are head views of one projection and dh arrives in the [B, S, NH, DV] layout."""
    leaves, _ = make_inputs(B=2, S=40)
    grads = []
    for fn in (mlstm_chunkwise, mlstm_chunkwise_torch):
        xs = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in leaves[:3]]
        xs += [t.detach().clone().requires_grad_() for t in leaves[3:]]
        h, _ = fn(*xs, chunk_size=16)
        weight = torch.randn(h.transpose(1, 2).shape, generator=torch.Generator().manual_seed(2))
        (h.transpose(1, 2) * weight).sum().backward()
        grads.append([t.grad for t in xs])
    for a, b in zip(*grads, strict=True):
        assert rel_err(b, a) < TOL
