"""Loaded by pytest before tests/conftest.py, hence before anything imports triton (torch imports it as soon as
torch._dynamo loads, and xlstm_hf uses torch.compile).

Without a CUDA device, the Triton kernel tests run in Triton's CPU interpreter, which triton selects per function
when it is decorated: both our kernels and triton's own library functions (tl.sum, tl.cumsum, ...), the latter at
`import triton`. The variable must therefore be set before the first import of triton in the process; setting it in
a test module is too late once tests/conftest.py has imported xlstm_hf. It only affects code that launches Triton
kernels, which on a CPU-only machine cannot run any other way. Checking for CUDA here would import torch (cheap; it
does not import triton).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
