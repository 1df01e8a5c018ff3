"""Shared by the Triton kernel tests: device choice, interpreter set-up, and the error measure.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), which triton chooses when a function
is decorated: our kernels and their helpers in ``xlstm_hf.triton_utils`` when their modules are first imported,
triton's own library (tl.sum, tl.cumsum, ...) at `import triton`. In a pytest run, tests/conftest.py imports
xlstm_hf, whose torch.compile use imports torch._dynamo, which imports triton: setting the variable in a test module
is too late for triton's library. So the kernels use only triton builtins plus the combine functions of
``triton_utils``, and ``load_kernels`` sets the variable and re-imports ``triton_utils`` and every kernel module that
was first imported without it. The variable then stays set for the rest of the process; that matters only to code
that launches Triton kernels, which on a machine without CUDA cannot run otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_MODULES = ("mlstm_chunk", "mlstm_step", "slstm_fused")


def load_kernels(name: str) -> ModuleType:
    """Imports ``xlstm_hf.<name>``, interpreted when there is no GPU."""
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    utils = importlib.import_module("xlstm_hf.triton_utils")
    module = importlib.import_module(f"xlstm_hf.{name}")
    if DEVICE == "cpu" and not utils.INTERPRETED:
        importlib.reload(utils)
        for other in KERNEL_MODULES:
            if f"xlstm_hf.{other}" in sys.modules:
                importlib.reload(sys.modules[f"xlstm_hf.{other}"])
    return module


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(precision) inside the block (float32 kernels follow it: "highest" -> ieee
    dots, "high" / "medium" -> tf32), the previous setting after it."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, 1e-3 sqrt(numel)), in float64. The floor compares tensors that
    are zero up to eps-sized terms (df at S = 1 without a state, for instance) absolutely, at 1e-3 per element."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / max(e.norm().item(), 1e-3 * e.numel() ** 0.5)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)  # an empty memory's m is -inf in both
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: not finite where the reference is"
    assert torch.equal(actual[~finite], expected[~finite]), f"{name}: different non-finite values"
    err = rel_err(actual[finite], expected[finite])
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def use_kernels_in_recurrent_ops(monkeypatch) -> None:
    """Hands `xlstm_hf.recurrent_ops` the Triton kernels as `load_kernels` imports them (interpreted without CUDA):
    it imported the kernel functions before the interpreter could be switched on."""
    from xlstm_hf import recurrent_ops

    chunk, step, slstm = load_kernels("mlstm_chunk"), load_kernels("mlstm_step"), load_kernels("slstm_fused")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(recurrent_ops, "mlstm_chunkwise_triton", chunk.mlstm_chunkwise_triton)
    monkeypatch.setattr(recurrent_ops, "mlstm_step_triton", step.mlstm_step_triton)
    monkeypatch.setattr(recurrent_ops, "slstm_triton", slstm.slstm_triton)
