"""The Triton mLSTM decode step against ``mlstm_naive.mlstm_recurrent_step``: h and the new (C, n, m), from random,
empty (m = 0 and m = -inf) states, with feature dims that need one and several masked tiles.

Tolerances (relative L2 error, see kernel_testing.rel_err):
- float32: 1e-5. The step is one rank-1 update and two dot products in float32, as in the reference; only the
  summation order of q^T C differs.
- bfloat16 inputs: 1e-5 as well. The kernel upcasts q, k, v on load and computes in float32 like the reference, so
  the only extra rounding is that of h to bfloat16, which both apply.
"""

import pytest
import torch
from kernel_testing import DEVICE, assert_rel_close, load_kernels

from xlstm_hf.mlstm_naive import empty_state, mlstm_chunkwise, mlstm_recurrent_step

mlstm_step = load_kernels("mlstm_step")

TOL = 1e-5


def make_inputs(B=2, NH=2, DK=20, DV=24, dtype=torch.float32, state="random"):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, NH, DK, generator=g), torch.randn(B, NH, DK, generator=g)
    v = torch.randn(B, NH, DV, generator=g)
    i, f = torch.randn(B, NH, generator=g) * 2.0, torch.randn(B, NH, generator=g) * 2.0 + 3.0
    if state == "random":
        st = (
            torch.randn(B, NH, DK, DV, generator=g),
            torch.randn(B, NH, DK, generator=g),
            torch.randn(B, NH, generator=g),
        )
    else:
        st = empty_state(B, NH, DK, DV, empty_m=0.0 if state == "empty_0" else float("-inf"))
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [t.to(DEVICE) for t in (i, f)], [t.to(DEVICE) for t in st]


@pytest.mark.parametrize("state", ["random", "empty_0", "empty_inf"])
@pytest.mark.parametrize("dims", [(20, 24), (80, 136)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_reference(state, dims, dtype):
    inputs, st = make_inputs(DK=dims[0], DV=dims[1], dtype=dtype, state=state)
    h_ref, st_ref = mlstm_recurrent_step(*inputs, tuple(t.clone() for t in st))
    given = tuple(t.clone() for t in st)
    h, st_new = mlstm_step.mlstm_step_triton(*inputs, given)
    assert h.dtype == dtype
    assert_rel_close(h.float(), h_ref.float(), TOL, "h")
    for name, a, b in zip("Cnm", st_new, st_ref, strict=True):
        assert a.dtype == torch.float32
        assert_rel_close(a, b, TOL, name)
    assert all(a is b for a, b in zip(st_new, given, strict=True)), "float32 contiguous states are updated in place"


def test_steps_continue_a_chunkwise_prefill():
    g = torch.Generator().manual_seed(2)
    B, NH, S, DK, DV = 1, 2, 11, 16, 16
    q, k = torch.randn(B, NH, S, DK, generator=g), torch.randn(B, NH, S, DK, generator=g)
    v = torch.randn(B, NH, S, DV, generator=g)
    i, f = torch.randn(B, NH, S, generator=g), torch.randn(B, NH, S, generator=g) + 3.0
    q, k, v, i, f = (t.to(DEVICE) for t in (q, k, v, i, f))
    h_full, st_full = mlstm_chunkwise(q, k, v, i, f, chunk_size=4)
    _, state = mlstm_chunkwise(q[:, :, :7], k[:, :, :7], v[:, :, :7], i[:, :, :7], f[:, :, :7], chunk_size=4)
    for t in range(7, S):
        h, state = mlstm_step.mlstm_step_triton(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state)
        assert_rel_close(h, h_full[:, :, t], TOL, f"h[{t}]")
    for name, a, b in zip("Cnm", state, st_full, strict=True):
        assert_rel_close(a, b, TOL, name)


def test_step_refuses_autograd_before_writing_the_state():
    """The step writes the state in place and has no backward: an input that requires grad is refused, and the
    state is left as it was."""
    inputs, st = make_inputs()
    inputs[0].requires_grad_()
    kept = [t.clone() for t in st]
    with pytest.raises(RuntimeError):
        mlstm_step.mlstm_step_triton(*inputs, tuple(st))
    for name, t, t0 in zip("Cnm", st, kept, strict=True):
        assert torch.equal(t, t0), name


def test_step_unsupported_shapes_name_the_reason():
    inputs, st = make_inputs()
    q, v = inputs[0], inputs[2]
    assert mlstm_step.mlstm_step_unsupported(q, v) is None
    wide = torch.zeros(2, 2, 2048, device=DEVICE)
    assert "DV=2048" in mlstm_step.mlstm_step_unsupported(q, wide)
    assert "float64" in mlstm_step.mlstm_step_unsupported(q.double(), v)
