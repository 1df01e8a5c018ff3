"""The recurrent ops of xLSTM: the one place where an mLSTM or sLSTM recurrence runs and where its implementation is
chosen. The transformers layers, a serving engine's layers and a context-parallel exchange all call these four
functions with tensors and states; none of them needs a model config, and none chooses a kernel.

    mlstm_sequence(q, k, v, i, f, initial_state, ...) -> h [B, NH, S, DV], (C, n, m)
    mlstm_step(q, k, v, i, f, state, ...)             -> h [B, NH, DV],    (C, n, m)
    slstm_sequence(x, r, initial_state, ...)          -> h [B, NH, S, DH], (h, c, n, m)
    slstm_step(x, r, state, ...)                      -> h [B, NH, DH],    (h, c, n, m)

and, for a cache that can be rolled back (speculative decoding), the same sequences returning the state after each
of their last positions: ``mlstm_sequence_states`` and ``slstm_sequence_states``.

Shapes and the recurrences are those of ``mlstm_naive`` and ``slstm_naive``; states are float32. ``mask`` [B, S]
(False: a padded position, which neither writes nor decays the state) and ``docs`` (packed documents, each run from
its own initial state; ``packing.DocumentLayout``) apply to all four.

Every op routes in one order:
    1. export (torch.export, torch.onnx.export): forms that trace one graph for every length (the parallel mLSTM,
       the sLSTM as one scan op);
    2. a torch.func transform (grad, vmap, ...): the autograd references, since the kernels' autograd Functions
       (Triton and the PyTorch chunkwise one) have hand-written backwards without torch.func rules;
    3. Triton: ``backend="triton"``, or ``"auto"`` on CUDA, where the kernel takes the shapes (each kernel module's
       ``*_unsupported`` says why it does not);
    4. PyTorch: the chunkwise mLSTM with its hand-written backward, the recurrent mLSTM step, the sLSTM loop.
A step (S = 1) of a sequence op runs the step. Whenever a route leaves the implementation that ``backend`` asks for,
``fall_back`` warns once, naming why.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from transformers.utils import logging

from .mlstm_chunk import HAS_TRITON, mlstm_chunkwise_triton, mlstm_chunkwise_unsupported
from .mlstm_chunk_torch import mlstm_chunkwise_torch
from .mlstm_naive import (
    MASKED_FGATE,
    MASKED_IGATE,
    MLSTMState,
    empty_state,
    mlstm_chunkwise,
    mlstm_parallel,
    mlstm_recurrent_step,
)
from .mlstm_step import mlstm_step_triton, mlstm_step_unsupported
from .packing import DocumentLayout
from .slstm_fused import slstm_triton, slstm_unsupported
from .slstm_naive import SLSTMState, slstm_empty_state, slstm_recurrent, slstm_recurrent_step, slstm_scan

logger = logging.get_logger(__name__)

BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: unknown value, expected one of {list(BACKENDS)}")
    return backend


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def fall_back(choice: str, why: str, runs: str) -> None:
    """The one warning of a route that leaves what was chosen (a backend, a fused op): once per message and
    process."""
    logger.warning_once(f"xLSTM {choice}: {why}; running {runs}")


def _wants_triton(backend: str, t: torch.Tensor) -> bool:
    return check_backend(backend) == "triton" or (backend == "auto" and t.is_cuda)


def _triton_runs(backend: str, t: torch.Tensor, op: str, refused: Callable[[], str | None]) -> bool:
    """Step 3 of the routing: whether the Triton kernel of `op` runs on inputs like `t`. `refused()` is the kernel's
    own reason not to take these inputs (None: it takes them); where Triton was asked for and cannot run, warns."""
    if not _wants_triton(backend, t):
        return False
    if not HAS_TRITON:
        why = "triton is not installed (pip install triton)"
    elif not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        why = f"the kernels need a CUDA device (or TRITON_INTERPRET=1), inputs are on {t.device.type}"
    else:
        reason = refused()
        why = None if reason is None else f"the kernel does not take {reason}"
    if why is not None:
        fall_back(f'backend="{backend}", {op}', why, "the PyTorch implementation")
    return why is None


def _traced_route(backend: str, t: torch.Tensor, op: str, runs: str | None = None) -> str | None:
    """Steps 1 and 2 of the routing: "export", "func" or None. Warns when the route replaces what would run otherwise:
    Triton where it was asked for, or the PyTorch implementation where the traced route runs another form (`runs`)."""
    route = "export" if torch.compiler.is_exporting() else "func" if functorch_active() else None
    if route is not None and (runs is not None or _wants_triton(backend, t)):
        why = "exporting" if route == "export" else "inside a torch.func transform"
        fall_back(f'backend="{backend}", {op}', why, runs or "the PyTorch reference")
    return route


def mask_gates(i: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """i, f [B, NH, ...] float32; mask [B, ...] bool. A padded position neither writes nor decays the memory."""
    if mask is None:
        return i, f
    keep = mask[:, None]
    return i.masked_fill(~keep, MASKED_IGATE), f.masked_fill(~keep, MASKED_FGATE)


def _doc_mask(docs: DocumentLayout, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The padding of the document layout [n_docs, longest], with the packed rows' own mask [B, S] gathered in."""
    if mask is None:
        return docs.mask
    gathered = docs.gather(mask)
    return gathered if docs.mask is None else gathered & docs.mask


def mlstm_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    *,
    mask: torch.Tensor | None = None,
    docs: DocumentLayout | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    empty_m: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, MLSTMState]:
    """The mLSTM over a sequence: q, k [B, NH, S, DK]; v [B, NH, S, DV]; i, f [B, NH, S] gate pre-activations;
    initial_state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH]) or None (empty, m = `empty_m`); mask [B, S] bool.
    Returns h [B, NH, S, DV] in q's dtype and the final float32 state.

    With `docs` (packed rows: several documents per row), every document runs from its own initial state: the state
    arguments and results are per document ([n_docs, NH, ...]; None: every document from an empty state)."""
    i, f = i.float(), f.float()
    if docs is not None:
        heads = docs.heads
        h, state = mlstm_sequence(
            heads(q), heads(k), heads(v), heads(i), heads(f), initial_state, mask=_doc_mask(docs, mask),
            chunk_size=chunk_size, eps=eps, empty_m=empty_m, backend=backend,
        )  # fmt: skip
        return heads(h, inverse=True), state
    i, f = mask_gates(i, f, mask)
    if q.shape[2] == 1:
        h, state = mlstm_step(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], initial_state,
            eps=eps, empty_m=empty_m, backend=backend,
        )  # fmt: skip
        return h[:, :, None], state
    op = "mLSTM chunkwise"
    traced = "the parallel form (quadratic in S)" if torch.compiler.is_exporting() else "the autograd reference"
    route = _traced_route(backend, q, op, runs=traced)
    if route == "export":
        # the chunkwise forms' reshapes into ceil(S / chunk) chunks make guards on S that no single graph satisfies:
        # an exported model runs the parallel form (the same function, quadratic in S like attention)
        return mlstm_parallel(q, k, v, i, f, initial_state, eps=eps, empty_m=empty_m)
    if route == "func":
        return mlstm_chunkwise(q, k, v, i, f, initial_state, chunk_size=chunk_size, eps=eps, empty_m=empty_m)
    if _triton_runs(backend, q, op, lambda: mlstm_chunkwise_unsupported(q, v, chunk_size)):
        return mlstm_chunkwise_triton(q, k, v, i, f, initial_state, chunk_size=chunk_size, eps=eps, empty_m=empty_m)
    return mlstm_chunkwise_torch(q, k, v, i, f, initial_state, chunk_size=chunk_size, eps=eps, empty_m=empty_m)


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    empty_m: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, MLSTMState]:
    """One token: q, k [B, NH, DK]; v [B, NH, DV]; i, f [B, NH]; state as in `mlstm_sequence` (None: empty); mask [B]
    bool. Returns h [B, NH, DV] and the new state. The fused Triton step updates the state's tensors in place (a
    decoding step owns its cache's tensors), so it serves only without autograd."""
    i, f = mask_gates(i.float(), f.float(), mask)
    if state is None:
        state = empty_state(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], empty_m, q.device)
    op = "mLSTM step"

    def refused() -> str | None:
        return "gradients (the fused step has no backward)" if torch.is_grad_enabled() else mlstm_step_unsupported(q, v)

    if _traced_route(backend, q, op) is None and _triton_runs(backend, q, op, refused):
        return mlstm_step_triton(q, k, v, i, f, state, eps)
    return mlstm_recurrent_step(q, k, v, i, f, state, eps)


def slstm_sequence(
    x: torch.Tensor,
    r: torch.Tensor,
    initial_state: SLSTMState | None = None,
    *,
    mask: torch.Tensor | None = None,
    docs: DocumentLayout | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, SLSTMState]:
    """The sLSTM over a sequence: x [B, NH, S, 4 * DH] gate pre-activations (bias included); r [NH, DH, 4 * DH];
    initial_state (h, c, n, m) each [B, NH, DH] or None (empty); mask [B, S] bool. Returns h [B, NH, S, DH] in x's
    dtype and the final float32 state. `docs` as in `mlstm_sequence`."""
    if docs is not None:
        h, state = slstm_sequence(docs.heads(x), r, initial_state, mask=_doc_mask(docs, mask), backend=backend)
        return docs.heads(h, inverse=True), state
    if x.shape[2] == 1:
        h, state = slstm_step(x[:, :, 0], r, initial_state, mask=None if mask is None else mask[:, 0], backend=backend)
        return h[:, :, None], state
    op = "sLSTM"
    route = _traced_route(backend, x, op)
    if route == "export" and isinstance(x.shape[2], torch.SymInt):
        return slstm_scan(x, r, initial_state, mask)  # a traced length: one scan op, not a loop unrolled at one length
    if route is None and _triton_runs(backend, x, op, lambda: slstm_unsupported(x, r)):
        return slstm_triton(x, r, initial_state, mask)
    return slstm_recurrent(x, r, initial_state, mask)


def slstm_step(
    x: torch.Tensor,
    r: torch.Tensor,
    state: SLSTMState | None = None,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, SLSTMState]:
    """One token: x [B, NH, 4 * DH]; r [NH, DH, 4 * DH]; state (h, c, n, m) or None (empty); mask [B] bool.
    Returns h [B, NH, DH] in x's dtype and the new state."""
    op = "sLSTM step"
    if _traced_route(backend, x, op) is None and _triton_runs(
        backend, x, op, lambda: slstm_unsupported(x[:, :, None], r)
    ):
        h, state = slstm_triton(x[:, :, None], r, state, None if mask is None else mask[:, None])
        return h[:, :, 0], state
    if state is None:
        state = slstm_empty_state(x.shape[0], r.shape[0], r.shape[1], x.device)
    h, state = slstm_recurrent_step(x, r, state, mask)
    return h.to(x.dtype), state


def _sequence_states(
    run_sequence: Callable[..., tuple[torch.Tensor, tuple]],
    run_step: Callable[..., tuple[torch.Tensor, tuple]],
    inputs: tuple[torch.Tensor, ...],
    state: tuple | None,
    mask: torch.Tensor | None,
    last: int,
) -> tuple[torch.Tensor, list[tuple]]:
    """A sequence op whose result keeps the state after each of the last `last` positions: the positions before
    them run as one sequence, the last ones a step each (the inputs' position axis is 2, the mask's 1). A step gets a
    copy of the state, as the fused mLSTM step writes into its state."""
    S = inputs[0].shape[2]
    last = min(max(last, 1), S)
    hs, states = [], []
    if S > last:
        head = tuple(t[:, :, : S - last] for t in inputs)
        h, state = run_sequence(*head, state, mask=None if mask is None else mask[:, : S - last])
        hs.append(h)
    for t in range(S - last, S):
        state = None if state is None else tuple(x.clone() for x in state)
        h, state = run_step(*(x[:, :, t] for x in inputs), state, mask=None if mask is None else mask[:, t])
        hs.append(h[:, :, None])
        states.append(state)
    return torch.cat(hs, dim=2), states


def mlstm_sequence_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    *,
    last: int,
    mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    empty_m: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, list[MLSTMState]]:
    """`mlstm_sequence` that returns h and the states after each of the last `last` positions (oldest first; the
    final state last): the verification forward of speculative decoding, whose cache must roll back to the state
    after any accepted prefix. The earlier positions run as `mlstm_sequence`, the last ones as `mlstm_step`s."""
    i, f = mask_gates(i.float(), f.float(), mask)
    options = dict(eps=eps, empty_m=empty_m, backend=backend)
    return _sequence_states(
        lambda *a, mask: mlstm_sequence(*a, chunk_size=chunk_size, **options),
        lambda *a, mask: mlstm_step(*a, **options),
        (q, k, v, i, f), initial_state, None, last,
    )  # fmt: skip


def slstm_sequence_states(
    x: torch.Tensor,
    r: torch.Tensor,
    initial_state: SLSTMState | None = None,
    *,
    last: int,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, list[SLSTMState]]:
    """`slstm_sequence` that returns h and the states after each of the last `last` positions (oldest first), as
    `mlstm_sequence_states`."""
    return _sequence_states(
        lambda x, state, mask: slstm_sequence(x, r, state, mask=mask, backend=backend),
        lambda x, state, mask: slstm_step(x, r, state, mask=mask, backend=backend),
        (x,), initial_state, mask, last,
    )  # fmt: skip


__all__ = [
    "BACKENDS",
    "check_backend",
    "functorch_active",
    "mlstm_sequence",
    "mlstm_sequence_states",
    "mlstm_step",
    "slstm_sequence",
    "slstm_sequence_states",
    "slstm_step",
]
