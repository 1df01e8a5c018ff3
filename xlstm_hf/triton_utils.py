"""What the Triton kernels of this package share: the import guard, the interpreter switch, reductions, dot precision,
and the device facts that launch geometry is chosen from.

``mlstm_chunk``, ``mlstm_step`` and ``slstm_fused`` take ``triton`` and ``tl`` from here (None without triton) and
import it relatively, so a model exported with remote code carries it beside them; ``import triton`` sits in a
``try`` block, which transformers' remote-code import check skips, so the model loads (and runs the PyTorch
reference) where triton is missing.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the model then runs the PyTorch reference
    triton = tl = None
    HAS_TRITON = False

# Triton decides at decoration (the kernel module's import) whether a kernel runs compiled or in its CPU interpreter.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

# What a launcher assumes when its tensors are not on a CUDA device (the interpreter, meta tensors in the compile
# test): an H100 SXM.
DEFAULT_CAPABILITY = (9, 0)
DEFAULT_SM_COUNT = 132


def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise ImportError(f"{what} needs triton: `pip install triton` (a GPU, or TRITON_INTERPRET=1 on a CPU)")


@functools.cache
def _cuda_properties(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def device_properties(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count) of a CUDA device; ``DEFAULT_CAPABILITY``, ``DEFAULT_SM_COUNT`` elsewhere."""
    if device.type != "cuda":
        return DEFAULT_CAPABILITY, DEFAULT_SM_COUNT
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot for inputs of this dtype. float32 follows torch's own switch,
    ``torch.get_float32_matmul_precision()``: "highest" multiplies in full float32 ("ieee", FMA units, no tensor
    cores), "high" and "medium" in TF32 on tensor cores (10-bit mantissa), as torch's float32 matmuls do. Half
    precision operands use tensor cores whatever this says; under the interpreter they are multiplied as float32
    after rounding ("emulate"), since the interpreter's tl.dot multiplies bfloat16 bit patterns as integers."""
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "emulate" if INTERPRETED else "tf32"


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes a bfloat16 output in: float32 under the interpreter, whose conversion to bfloat16
    truncates (a GPU rounds to nearest even); torch then rounds."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


def pow2_tile(D: int, cap: int) -> int:
    """A power of two covering D, at least 16 (the smallest tl.dot operand) and at most cap."""
    return min(cap, max(16, triton.next_power_of_2(D)))


if HAS_TRITON:
    # Reductions as tl.reduce / tl.associative_scan with triton's own combine functions rather than tl.sum, tl.max,
    # tl.cumsum: those are jit functions of triton's library, decorated at `import triton`, so they run compiled
    # (and fail) inside an interpreted kernel when triton was imported before TRITON_INTERPRET=1 was set; the
    # interpreter recognises these combine functions and reduces with numpy. Compiled, it is what tl.sum does.
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    SUM = getattr(tl.standard, "_sum_combine", _add)
    MAX = getattr(tl.standard, "_elementwise_max", _maximum)

    @triton.jit
    def dot(a, b, DT: tl.constexpr, PRECISION: tl.constexpr):
        """a [M, K] @ b [K, N] with the operands rounded to DT and a float32 result (see ``dot_precision``)."""
        if PRECISION == "emulate":
            return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(DT), b.to(DT), input_precision=PRECISION)

    @triton.jit
    def logsigmoid(x):
        return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def tanh(x):
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)
