"""The Triton chunkwise mLSTM against the reference ``mlstm_naive.mlstm_chunkwise``: h, the final state and the
gradients of q, k, v, i, f and of the initial C, n, m, over ragged lengths (S = 1, a multiple of the chunk, and
lengths that leave a partial chunk), with and without initial states (m = 0, m = -inf, random).

Tolerances are relative L2 errors ``||kernel - reference|| / ||reference||``:
- float32: 1e-4. Both compute in float32 and differ only in summation order; the exponential gates (pre-activations
  of scale 2 here) and the normaliser amplify that to a few 1e-6 on outputs and ~1e-5 on gradients.
- float32 with torch.set_float32_matmul_precision("high"): 5e-3. The dots then run in TF32 on a GPU, whose operands
  keep float16's 10-bit mantissa (see float16 below); the interpreter multiplies in float32.
- bfloat16: 3e-2, float16: 5e-3, against the reference run on the same rounded inputs. The kernel also rounds every
  matmul operand (q, k, v, the decay-weighted score matrix, the chunk states and their gradients) to the input dtype
  (2^-8 relative for bfloat16, 2^-11 for float16), as a tensor-core kernel must; measured up to 1.2e-2 (bfloat16)
  and 1.8e-3 (float16) here, under the interpreter, whose bfloat16 rounding truncates.
"""

import pytest
import torch
from conftest import raises_naming
from kernel_testing import DEVICE, assert_rel_close, load_kernels, matmul_precision

from xlstm_hf.mlstm_naive import mlstm_chunkwise

mlstm_chunk = load_kernels("mlstm_chunk")

FP32_TOL = 1e-4
TF32_TOL = 5e-3
LOW_PRECISION_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
CHUNK = 16


def make_inputs(B=1, NH=2, S=37, DK=20, DV=24, dtype=torch.float32, state="none"):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, NH, S, DK, generator=g), torch.randn(B, NH, S, DK, generator=g)
    v = torch.randn(B, NH, S, DV, generator=g)
    i = torch.randn(B, NH, S, generator=g) * 2.0
    f = torch.randn(B, NH, S, generator=g) * 2.0 + 3.0
    leaves = [t.to(DEVICE, dtype) for t in (q, k, v)] + [t.to(DEVICE) for t in (i, f)]
    if state == "random":
        initial = (
            torch.randn(B, NH, DK, DV, generator=g),
            torch.randn(B, NH, DK, generator=g).abs(),
            torch.randn(B, NH, generator=g),
        )
    elif state == "empty_inf":
        initial = (torch.zeros(B, NH, DK, DV), torch.zeros(B, NH, DK), torch.full((B, NH), float("-inf")))
    else:
        initial = None
    if initial is not None:
        initial = tuple(t.to(DEVICE) for t in initial)
    return leaves, initial


def run(fn, leaves, initial, chunk_size=CHUNK, **kwargs):
    """h, final (C, n, m) and the gradients of every input and initial state for a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    state = None if initial is None else tuple(t.detach().clone().requires_grad_() for t in initial)
    h, (C, n, m) = fn(*leaves, state, chunk_size=chunk_size, **kwargs)
    g = torch.Generator().manual_seed(1)
    dh, dC, dn, dm = (torch.randn(t.shape, generator=g).to(DEVICE, t.dtype) for t in (h, C, n, m))
    ((h * dh).sum() + (C * dC).sum() + (n * dn).sum() + (m * dm).sum()).backward()
    grads = {name: t.grad for name, t in zip("q k v i f".split(), leaves, strict=True)}
    if state is not None:
        grads.update({name: t.grad for name, t in zip(("C0", "n0", "m0"), state, strict=True)})
    return {"h": h, "C": C, "n": n, "m": m}, grads


def check(leaves, initial, tol, empty_m=0.0, **kwargs):
    out_ref, grad_ref = run(mlstm_chunkwise, leaves, initial, empty_m=empty_m)
    out, grad = run(mlstm_chunk.mlstm_chunkwise_triton, leaves, initial, empty_m=empty_m, **kwargs)
    assert out["h"].dtype == leaves[0].dtype
    assert all(out[s].dtype == torch.float32 for s in "Cnm")
    for name in out_ref:
        assert_rel_close(out[name].float(), out_ref[name].float(), tol, name)
    for name in grad_ref:
        if name == "m0" and initial is not None and torch.isinf(initial[2]).all():
            assert (grad[name] == 0).all()
            continue
        assert_rel_close(grad[name].float(), grad_ref[name].float(), tol, "d" + name)


@pytest.mark.parametrize("S", [1, 16, 37])
@pytest.mark.parametrize("state", ["none", "random", "empty_inf"])
def test_chunk_fp32(S, state):
    leaves, initial = make_inputs(S=S, state=state)
    check(leaves, initial, FP32_TOL)


@pytest.mark.parametrize("S", [1, 21])
def test_chunk_empty_m_inf(S):
    leaves, initial = make_inputs(S=S)
    check(leaves, initial, FP32_TOL, empty_m=float("-inf"))


def test_chunk_many_chunks():
    leaves, initial = make_inputs(NH=1, S=150, state="random")
    check(leaves, initial, FP32_TOL)


def test_chunk_normaliser_floor():
    """Input gates far below the empty memory's m = 0: |q . n| < exp(-m), so h is divided by the floor, whose
    gradient path (none to den, the eps-sized one to m) differs from the usual one."""
    leaves, _ = make_inputs(S=37)
    leaves[3] = leaves[3] * 0.3 - 6.0
    check(leaves, None, FP32_TOL)


def test_chunk_recompute_states():
    leaves, initial = make_inputs(S=40, state="random")
    check(leaves, initial, FP32_TOL, recompute_states=True)


def test_chunk_several_feature_tiles():
    """DK, DV above the 64-wide tile and not multiples of 16: the kernels loop over masked feature tiles."""
    leaves, initial = make_inputs(NH=1, S=23, DK=80, DV=72, state="random")
    check(leaves, initial, FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_low_precision(dtype):
    leaves, _ = make_inputs(S=40, dtype=dtype)
    # A realistic initial state: the memory after a prefix of the same sequence.
    _, initial = mlstm_chunkwise(*(t[:, :, :9].float() for t in leaves))
    check([t[:, :, 9:] for t in leaves], initial, LOW_PRECISION_TOL[dtype])


def test_chunk_full_precision_float32_runs_32_position_chunks():
    """float32 at torch's "highest" precision caps the kernel's chunk at 32 positions (register budget of the FMA
    dots): chunk_size 64 over S = 70 then runs three chunks, the last one partial. The reference runs the same
    chunks, since the chunking places the stabiliser m, which enters h through eps."""
    leaves, initial = make_inputs(NH=1, S=70)
    out_ref, grad_ref = run(mlstm_chunkwise, leaves, initial, chunk_size=32)
    out, grad = run(mlstm_chunk.mlstm_chunkwise_triton, leaves, initial, chunk_size=64)
    for name in out_ref:
        assert_rel_close(out[name], out_ref[name], FP32_TOL, name)
    for name in grad_ref:
        assert_rel_close(grad[name], grad_ref[name], FP32_TOL, "d" + name)


def test_chunk_matches_naive_default_chunk():
    """The default chunk_size (64) with S shorter than one chunk: one padded chunk."""
    leaves, _ = make_inputs(S=5)
    h_ref, state_ref = mlstm_chunkwise(*leaves)
    h, state = mlstm_chunk.mlstm_chunkwise_triton(*leaves)
    assert_rel_close(h, h_ref, FP32_TOL, "h")
    for a, b in zip(state, state_ref, strict=True):
        assert_rel_close(a, b, FP32_TOL, "state")


@pytest.fixture
def tf32_matmuls():
    with matmul_precision("high"):
        yield


def test_chunk_fp32_follows_torch_matmul_precision(tf32_matmuls):
    leaves, initial = make_inputs(S=40, state="random")
    check(leaves, initial, TF32_TOL)


def test_chunk_unsupported_shapes_name_the_reason():
    leaves, _ = make_inputs(S=5)
    q, v = leaves[0], leaves[2]
    assert mlstm_chunk.mlstm_chunkwise_unsupported(q, v, 64) is None
    assert "chunk_size=24" in mlstm_chunk.mlstm_chunkwise_unsupported(q, v, 24)
    wide = torch.zeros(1, 2, 5, 520, device=DEVICE)
    assert "DK=520" in mlstm_chunk.mlstm_chunkwise_unsupported(wide, v, 64)
    assert str(torch.int32) in mlstm_chunk.mlstm_chunkwise_unsupported(q.to(torch.int32), v, 64)
    long = torch.empty(1, 1, 32 * 65535 + 1, 16, device="meta")  # full-precision float32 runs 32-long chunks
    assert f"S={32 * 65535 + 1}" in mlstm_chunk.mlstm_chunkwise_unsupported(long, long, 64)
    with raises_naming("(1, 2, 5, 20)", "chunk_size=24"):
        mlstm_chunk.mlstm_chunkwise_triton(*leaves, chunk_size=24)
