"""The Triton fused sLSTM against ``slstm_naive.slstm_recurrent``: h, the final state (h, c, n, m) and the gradients
of x, r and the initial state, over S = 1 and ragged S, batches that fill a 16-row tile partly, head dims from 12
to 256 (padded, one and several column tiles), with and without initial states (empty m = -inf, random), with and
without a padding mask.

Tolerances (relative L2 error, see kernel_testing.rel_err):
- float32: 1e-5. Same float32 arithmetic as the reference step for step (exact dots, no TF32); only the summation
  order of h @ r and the closed forms of tanh, sigmoid, logsigmoid differ.
- bfloat16 x: 1e-2. x is upcast on load and the recurrence runs in float32, as in the reference; on a GPU the
  recurrent dots use TF32 (10-bit mantissa) and h is rounded to bfloat16 (2^-8 relative) on output.
"""

import pytest
import torch
from conftest import raises_naming
from kernel_testing import DEVICE, assert_rel_close, load_kernels

from xlstm_hf.slstm_naive import slstm_recurrent

slstm_fused = load_kernels("slstm_fused")

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def make_inputs(B=3, NH=2, S=7, DH=12, dtype=torch.float32, state="none", masked=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, NH, S, 4 * DH, generator=g)
    r = torch.randn(NH, DH, 4 * DH, generator=g) * DH**-0.5
    if state == "random":
        initial = (
            torch.randn(B, NH, DH, generator=g),
            torch.randn(B, NH, DH, generator=g),
            torch.rand(B, NH, DH, generator=g) + 0.5,
            torch.randn(B, NH, DH, generator=g),
        )
    elif state == "empty_inf":
        zeros = torch.zeros(B, NH, DH)
        initial = (zeros, zeros.clone(), zeros.clone(), torch.full((B, NH, DH), float("-inf")))
    else:
        initial = None
    mask = None
    if masked:  # left padding of different lengths, and one hole inside a sequence
        mask = torch.ones(B, S, dtype=torch.bool)
        for b in range(B):
            mask[b, : b % S] = False
        mask[0, S // 2] = False
        mask = mask.to(DEVICE)
    initial = None if initial is None else tuple(t.to(DEVICE) for t in initial)
    return x.to(DEVICE, dtype), r.to(DEVICE), initial, mask


def run(fn, x, r, initial, mask):
    x, r = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    state = None if initial is None else tuple(t.detach().clone().requires_grad_() for t in initial)
    h, final = fn(x, r, state, mask)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(t.shape, generator=g).to(DEVICE, t.dtype) for t in (h, *final)]
    sum((t * d).sum() for t, d in zip((h, *final), cot, strict=True)).backward()
    outputs = dict(zip(("h", "h_T", "c_T", "n_T", "m_T"), (h, *final), strict=True))
    grads = {"x": x.grad, "r": r.grad}
    if state is not None:
        grads.update(zip(("h0", "c0", "n0", "m0"), (t.grad for t in state), strict=True))
    return outputs, grads


def check(x, r, initial, mask, tol):
    out_ref, grad_ref = run(slstm_recurrent, x, r, initial, mask)
    out, grad = run(slstm_fused.slstm_triton, x, r, initial, mask)
    assert out["h"].dtype == x.dtype
    for name in out_ref:
        assert_rel_close(out[name].float(), out_ref[name].float(), tol, name)
    for name in grad_ref:
        assert_rel_close(grad[name].float(), grad_ref[name].float(), tol, "d" + name)


@pytest.mark.parametrize("S", [1, 7])
@pytest.mark.parametrize("state", ["none", "random", "empty_inf"])
@pytest.mark.parametrize("masked", [False, True])
def test_slstm_fp32(S, state, masked):
    check(*make_inputs(S=S, state=state, masked=masked), FP32_TOL)


def test_slstm_tiles():
    """17 sequences: two batch tiles; DH = 20: a head padded to 32 lanes."""
    check(*make_inputs(B=17, NH=1, S=4, DH=20, state="random", masked=True), FP32_TOL)


def test_slstm_bf16():
    check(*make_inputs(S=9, dtype=torch.bfloat16, state="random", masked=True), BF16_TOL)


@pytest.mark.parametrize("S", [1, 5])
def test_slstm_no_grad_matches(S):
    """Without autograd the kernel keeps two alternating state slots instead of every step."""
    x, r, initial, mask = make_inputs(S=S, state="random", masked=True)
    with torch.no_grad():
        h_ref, st_ref = slstm_recurrent(x, r, initial, mask)
        h, st = slstm_fused.slstm_triton(x, r, initial, mask)
    assert_rel_close(h, h_ref, FP32_TOL, "h")
    for a, b in zip(st, st_ref, strict=True):
        assert_rel_close(a, b, FP32_TOL, "state")


@pytest.mark.parametrize("DH", [32, 64, 128, 192, 256])
def test_slstm_head_dims(DH):
    """Every head dim of the paper presets and the small-head shapes: one column tile (32, 64), two (128), three
    of 64 (192: hidden 768 with 4 heads), four (256: hidden 1024 with 4 heads)."""
    check(*make_inputs(B=2, NH=1, S=3, DH=DH, state="random", masked=True), FP32_TOL)


def test_slstm_unsupported_inputs_name_the_reason():
    x, r, _, _ = make_inputs(S=2)
    assert slstm_fused.slstm_unsupported(x, r) is None
    assert "float64" in slstm_fused.slstm_unsupported(x.double(), r)
    assert str(tuple(r[:, :-1].shape)) in slstm_fused.slstm_unsupported(x, r[:, :-1])
    with raises_naming(str(tuple(x.shape)), str(tuple(r[:, :-1].shape))):
        slstm_fused.slstm_triton(x, r[:, :-1])
