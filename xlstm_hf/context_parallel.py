"""Context parallelism (CP): one batch of sequences split along its length over the ranks of a process group, each rank
holding a contiguous slice [B, S / P] of every row (rank 0 the first). Everything that is not a recurrence (embeddings,
projections, norms, feed-forwards, the loss) runs on the slice alone; the three ops that look back across the slice's
start are completed here by exchanges over torch.distributed, on top of the recurrent ops and the conv module the
layers already call (no second copy of any recurrence):

    mLSTM  the recurrence is affine in its state (C, n) with one scalar decay per head, so a rank needs only a summary
           of each predecessor slice: its final (C, n, m) from a zero state (m = -inf: m is then the largest log weight
           of the slice's own inputs) and its total log forget gate G. One all-gather of the summaries [P, B, NH,
           DK * DV + DK + 2] per layer (independent of S); each rank combines its predecessors' summaries into its
           true initial state (log-space weights, float32) and runs its slice from it. Backward: the summaries'
           gradients are summed over the ranks (one all-reduce) and flow into the zero-state runs. Cost: a middle
           rank runs the chunkwise op twice per layer (summary and outputs; the summary's activations recomputed in
           the backward), the first rank once (its outputs' run is its summary's), the last once (no rank reads its
           summary).
    sLSTM  not affine in its state (h enters the gates through tanh and sigmoids): the state goes from rank to rank in
           order (send/recv of [4, B, NH, DH]), and the gradient back in reverse order. The sLSTM layers run one rank
           after another: wall time of P slices, not one, for those layers (the memory is still split P ways).
    conv   the previous ranks' last kernel_size - 1 usable inputs (all-gathered with their counts: a slice holding
           fewer real inputs than the window, e.g. under left padding, passes on its predecessors' too).

Packed documents (position_ids restarting at 0, the transformers Trainer's padding-free rows) may cross rank
boundaries: a row whose slice starts inside a document continues the previous rank's state; a slice that holds a
document start hands on the state of its last document only (its summary's G is -inf, which cuts the chain). Padding
(attention_mask) neither writes nor decays a state, on whichever rank it falls.

The model takes CP as a set-up option, like `backend` (chosen once, not saved with the weights):

    mesh = init_device_mesh("cuda", (dp, cp), mesh_dim_names=("dp", "cp"))
    enable_context_parallel(model, mesh["cp"])          # or a ProcessGroup
    batch = shard_batch(batch, mesh["cp"])              # every [B, S] tensor -> this rank's [B, S / cp]
    out = model(**batch)                                 # out.loss: this rank's share, summed over cp = the loss

Labels follow transformers' CP contract: `shift_labels` (targets already shifted) sharded with the inputs; unshifted
`labels` alone are refused (the target of a slice's last token lies on the next rank). The loss of each rank is its
tokens' summed loss over the targets of the whole cp group (or over `num_items_in_batch`), so the ranks' losses and
gradients add up to the whole sequence's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .mlstm_naive import MLSTMState, log_sigmoid
from .packing import DocumentLayout
from .recurrent_ops import mask_gates, mlstm_sequence, slstm_sequence
from .slstm_naive import SLSTMState

IGNORE_INDEX = -100


# --- communication: autograd Functions whose backward runs the reverse exchange ---------------------------------


class _AllGather(torch.autograd.Function):
    """x [*F] on every rank -> [P, *F] (rank order). Backward: the gradients of every rank's copy summed over the
    group (one all-reduce), of which each rank keeps its own entry. `anchor` (a tensor of this rank's graph that needs
    gradients) makes the result need them on every rank, where x may not (a rank whose summary nobody reads), so that
    every rank takes part in the backward's all-reduce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None, None


class _Tie(torch.autograd.Function):
    """Returns h; `exchanged` joins h's graph (with a zero gradient), so that the backward of the exchange that made
    it runs on a rank that does not read it (the first rank reads no predecessor)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, exchanged: torch.Tensor) -> torch.Tensor:
        ctx.exchanged = (exchanged.shape, exchanged.dtype)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype = ctx.exchanged
        return dh, torch.zeros(shape, dtype=dtype, device=dh.device)


class _RecvFromPrevious(torch.autograd.Function):
    """Receives a tensor of `shape` from the previous rank; backward sends its gradient back. `anchor` (a tensor of
    this rank's graph that needs gradients) only ties the receive into the graph, so that the backward runs."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, shape: tuple[int, ...], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        buffer = torch.empty(shape, dtype=torch.float32, device=anchor.device)
        dist.recv(buffer, group=group, group_src=dist.get_rank(group) - 1)
        return buffer

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        dist.send(grad.float().contiguous(), group=ctx.group, group_dst=dist.get_rank(ctx.group) - 1)
        return None, None, None


class _SendToNext(torch.autograd.Function):
    """Sends `state` to the next rank and returns `h` unchanged; backward receives the state's gradient from the next
    rank (h carries it into this rank's graph: the layer's output depends on it)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, state: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.shape = group, state.shape
        dist.send(state.float().contiguous(), group=group, group_dst=dist.get_rank(group) + 1)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        dstate = torch.empty(ctx.shape, dtype=torch.float32, device=dh.device)
        dist.recv(dstate, group=ctx.group, group_src=dist.get_rank(ctx.group) + 1)
        return dh, dstate, None


# --- the mLSTM summaries --------------------------------------------------------------------------------------


def combine_summaries(
    C: torch.Tensor, n: torch.Tensor, m: torch.Tensor, log_decay: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mLSTM state entering the slice after R predecessor slices, from their summaries in order:
    C [R, ..., DK, DV], n [R, ..., DK], m [R, ...]: the final state of each slice run alone from a zero state
    (m = -inf, or the empty state's m where the slice starts a document); log_decay [R, ...]: the slice's summed
    log forget gate, -inf where the slice holds a document start (the state leaving it does not depend on the state
    entering it). Returns (C, n, m) [...], float32.

    Slice j's state reaches the end of slice R - 1 decayed by the slices between: log weight
    w_j = m_j + sum_{j < l < R} log_decay_l, and m = max_j w_j, C = sum_j exp(w_j - m) C_j, as the recurrence's own
    stabiliser would have it (every weight <= 1)."""
    C, n, m, log_decay = C.float(), n.float(), m.float(), log_decay.float()
    # decay over the slices after j: a reversed cumulative sum of finite values and -inf, never -inf - (-inf)
    after = F.pad(log_decay[1:].flip(0).cumsum(0).flip(0), (0, 0) * (log_decay.dim() - 1) + (0, 1))  # [R, ...]
    w = m + after  # [R, ...]
    m_in = w.amax(0)
    weight = torch.exp(w - torch.where(torch.isinf(m_in), torch.zeros_like(m_in), m_in))  # [R, ...]
    C_in = (weight[..., None, None] * C).sum(0)
    n_in = (weight[..., None] * n).sum(0)
    return C_in, n_in, m_in


# --- the set-up and one forward's slice -------------------------------------------------------------------------


def _group_of(group_or_mesh: Any) -> dist.ProcessGroup:
    """A ProcessGroup, or a 1-D DeviceMesh (e.g. `mesh["cp"]`), or a DeviceMesh with a dimension named "cp"."""
    if isinstance(group_or_mesh, dist.ProcessGroup):
        return group_or_mesh
    names = getattr(group_or_mesh, "mesh_dim_names", None)
    if hasattr(group_or_mesh, "get_group"):
        if group_or_mesh.ndim == 1:
            return group_or_mesh.get_group()
        if names is not None and "cp" in names:
            return group_or_mesh.get_group("cp")
        raise ValueError(
            f"context parallelism over a {group_or_mesh.ndim}-D device mesh with dimensions {names}: pass its "
            'context-parallel dimension (mesh["cp"]) or name one dimension "cp"'
        )
    raise ValueError(
        f"context parallelism takes a torch.distributed ProcessGroup or DeviceMesh, got {type(group_or_mesh).__name__}"
    )


def _backbones(model: nn.Module) -> list[nn.Module]:
    """The xLSTMHFModel(s) inside `model` (itself, a causal LM, or a PEFT / DDP wrapper of one)."""
    return [m for m in model.modules() if hasattr(m, "context_parallel") and hasattr(m, "blocks")]


def enable_context_parallel(model: nn.Module, group_or_mesh: Any, sequence_length: int | None = None) -> nn.Module:
    """Runs every forward of `model` (an xLSTM model, a causal LM or a wrapper of one) as one slice of sequences split
    over the ranks of `group_or_mesh` (module docstring). Set once, before training; `disable_context_parallel`
    undoes it. With `sequence_length`, checks that it splits evenly over the group. Returns `model`.

    Raises ValueError naming what cannot be honoured: a group that is not initialised, a mesh without a "cp"
    dimension, a sequence length that does not split evenly, a model without xLSTM blocks."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context parallelism needs torch.distributed initialised (torchrun, init_process_group)")
    group = _group_of(group_or_mesh)
    size = dist.get_world_size(group)
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the context-parallel group")
    if sequence_length is not None and sequence_length % size:
        raise ValueError(
            f"sequence length {sequence_length} does not split evenly over the context-parallel group of {size} ranks"
        )
    backbones = _backbones(model)
    if not backbones:
        raise ValueError(f"enable_context_parallel takes an xLSTM model, got {type(model).__name__}")
    for backbone in backbones:
        backbone.context_parallel = ContextParallel(group)
    return model


def disable_context_parallel(model: nn.Module) -> nn.Module:
    """Undoes `enable_context_parallel`: forwards run whole sequences again (generation, a single-process check)."""
    for backbone in _backbones(model):
        backbone.context_parallel = None
    return model


class ContextParallel:
    """What `enable_context_parallel` attaches to an xLSTMHFModel: the group; `shard` describes one forward's slice."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def count_targets(self, shift_labels: torch.Tensor) -> torch.Tensor:
        """The targets (not -100) of the whole rows, over the group: the loss's divisor on every rank."""
        count = (shift_labels != IGNORE_INDEX).sum()
        dist.all_reduce(count, group=self.group)
        return count

    def shard(
        self, B: int, S: int, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, device: Any
    ) -> ContextParallelShard:
        """This rank's slice of [B, S] tokens. Documents are packed as for one process (`packing.document_starts`):
        position_ids (the global positions, sharded with the inputs) restarting at 0 mark document starts when there
        is no attention_mask."""
        first = self.rank == 0
        if position_ids is not None and attention_mask is None:
            starts = position_ids.to(device) == 0  # [B, S]
            continues = ~starts[:, 0] & (not first)
            resets = ~continues | starts[:, 1:].any(1)
        else:
            starts = None
            continues = torch.full((B,), not first, dtype=torch.bool, device=device)
            resets = ~continues
        return ContextParallelShard(self.group, self.rank, self.size, starts, continues, resets)


@dataclass
class _Sequences:
    """The sequences a layer's ops run on (the B rows, or the documents of packed rows) and the rows they meet:
    first_continues [N] bool: sequence continues the previous rank's state (the first one of a continuing row);
    row [N]: its row; last [B]: the sequence that ends each row (None: the sequences are the rows)."""

    first_continues: torch.Tensor
    row: torch.Tensor
    last: torch.Tensor | None


@dataclass
class ContextParallelShard:
    """One forward's slice: starts [B, S] (document starts; None: one document per row), continues [B] (the row's
    slice starts inside the document of the previous rank), resets [B] (the slice holds a document start, so the
    state leaving it does not depend on the state entering it). Its methods take the arguments of the ops they
    complete (`recurrent_ops.mlstm_sequence`, `slstm_sequence`, the layers' `CausalConv1d`)."""

    group: dist.ProcessGroup
    rank: int
    size: int
    starts: torch.Tensor | None
    continues: torch.Tensor
    resets: torch.Tensor

    def _sequences(self, docs: DocumentLayout | None) -> _Sequences:
        B = self.continues.shape[0]
        if docs is None:
            return _Sequences(self.continues, torch.arange(B, device=self.continues.device), None)
        S = docs.rows[1]
        row = docs.index[:, 0] // S  # [n_docs]
        first = docs.doc[::S]  # [B] the document at each row's position 0
        is_first = torch.zeros_like(row, dtype=torch.bool).index_fill_(0, first, True)
        return _Sequences(is_first & self.continues[row], row, docs.doc[S - 1 :: S])

    def mlstm_sequence(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        i: torch.Tensor,
        f: torch.Tensor,
        initial_state: MLSTMState | None = None,
        *,
        mask: torch.Tensor | None = None,
        docs: DocumentLayout | None = None,
        empty_m: float = 0.0,
        **options: Any,
    ) -> tuple[torch.Tensor, MLSTMState]:
        """`recurrent_ops.mlstm_sequence` on this slice, from the state the previous slices leave: h [B, NH, S, DV]
        and this slice's final state (per document with `docs`)."""
        if initial_state is not None:
            raise ValueError("context parallelism runs whole sequences from an empty state: no initial state")
        seqs = self._sequences(docs)
        N, NH = seqs.row.shape[0], q.shape[1]
        DK, DV = q.shape[-1], v.shape[-1]
        run = dict(mask=mask, docs=docs, empty_m=empty_m, **options)
        if self.rank == 0:
            # nothing continues on the first rank: the run of its outputs is its summary's run
            h, final = mlstm_sequence(q, k, v, i, f, None, **run)
            gathered = _AllGather.apply(self._summary(final, seqs, f, mask), q, self.group)
            return _Tie.apply(h, gathered), final

        f32 = dict(dtype=torch.float32, device=q.device)
        zero_C, zero_n = torch.zeros(N, NH, DK, DV, **f32), torch.zeros(N, NH, DK, **f32)
        empty = torch.full((N, NH), empty_m, **f32)
        if self.rank == self.size - 1:
            summary = q.new_zeros(q.shape[0], NH, DK * DV + DK + 2, dtype=torch.float32)  # read by no rank
        else:
            # 1. this slice's summary: from a zero state, m = -inf on a continuing sequence (the weight of the
            # previous ranks' state enters in the combine), the empty state on a document that starts here. Its
            # activations are recomputed in the backward, after the outputs' run has freed its own: the rank holds
            # one run's at a time (12.5 GB less per middle rank for the xLSTM-7B at 131k tokens per rank)
            m0 = torch.where(seqs.first_continues[:, None], torch.full_like(empty, float("-inf")), empty)

            def zero_state_summary(q, k, v, i, f):
                return self._summary(mlstm_sequence(q, k, v, i, f, (zero_C, zero_n, m0), **run)[1], seqs, f, mask)

            if torch.is_grad_enabled():
                summary = checkpoint(zero_state_summary, q, k, v, i, f, use_reentrant=False)
            else:
                summary = zero_state_summary(q, k, v, i, f)

        # 2. every rank's summary; 3. the state entering this slice, from its predecessors'
        gathered = _AllGather.apply(summary, q, self.group)[: self.rank]  # [rank, B, NH, DK * DV + DK + 2]
        Cs, ns, ms, ds = gathered.split([DK * DV, DK, 1, 1], dim=-1)
        C_in, n_in, m_in = combine_summaries(Cs.unflatten(-1, (DK, DV)), ns, ms[..., 0], ds[..., 0])
        cont = seqs.first_continues
        initial = (
            torch.where(cont[:, None, None, None], C_in[seqs.row], zero_C),
            torch.where(cont[:, None, None], n_in[seqs.row], zero_n),
            torch.where(cont[:, None], m_in[seqs.row], empty),
        )
        # 4. the outputs from the true initial state
        return mlstm_sequence(q, k, v, i, f, initial, **run)

    def _summary(self, final: MLSTMState, seqs: _Sequences, f: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, NH, DK * DV + DK + 2]: per row, the final (C, n, m) of the sequence that ends it and the slice's summed
        log forget gate (-inf where the slice holds a document start)."""
        C, n, m = final if seqs.last is None else (t[seqs.last] for t in final)
        log_decay = log_sigmoid(mask_gates(f.float(), f.float(), mask)[1]).sum(-1)  # [B, NH]
        log_decay = log_decay.masked_fill(self.resets[:, None], float("-inf"))
        return torch.cat([C.flatten(2), n, m[..., None], log_decay[..., None]], dim=-1)

    def slstm_sequence(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        initial_state: SLSTMState | None = None,
        *,
        mask: torch.Tensor | None = None,
        docs: DocumentLayout | None = None,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, SLSTMState]:
        """`recurrent_ops.slstm_sequence` on this slice: receives the state of the previous rank (which waits for
        its own predecessor), runs, sends the state each row ends with to the next rank."""
        if initial_state is not None:
            raise ValueError("context parallelism runs whole sequences from an empty state: no initial state")
        seqs = self._sequences(docs)
        B, NH, _, G = x.shape
        N, DH = seqs.row.shape[0], G // 4
        zeros = torch.zeros(N, NH, DH, dtype=torch.float32, device=x.device)
        empty = (zeros, zeros, zeros, torch.full_like(zeros, float("-inf")))
        initial = empty
        if self.rank > 0:
            received = _RecvFromPrevious.apply(x, (4, B, NH, DH), self.group)  # (h, c, n, m) of each row
            cont = seqs.first_continues[:, None, None]
            initial = tuple(torch.where(cont, s[seqs.row], e) for s, e in zip(received, empty, strict=True))
        h, final = slstm_sequence(x, r, initial, mask=mask, docs=docs, backend=backend)
        if self.rank < self.size - 1:
            handed_on = torch.stack(final if seqs.last is None else [s[seqs.last] for s in final])  # [4, B, NH, DH]
            h = _SendToNext.apply(h, handed_on, self.group)
        return h, final

    def conv(
        self, conv1d: nn.Module, x: torch.Tensor, docs: DocumentLayout | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """`conv1d` (a CausalConv1d) over this slice, x [B, S, D] -> y [B, S, D], its window reaching back into the
        previous ranks' inputs: the last kernel_size - 1 inputs that the conv would see there (the real ones, after
        the document's start)."""
        K = conv1d.kernel_size - 1
        B, S, D = x.shape
        usable = torch.ones(B, S, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        if self.starts is not None:  # only the inputs after the row's last document start reach the next rank
            pos = torch.arange(S, device=x.device)
            usable = usable & (pos >= (self.starts * pos).amax(1, keepdim=True))
        tail = _last_usable(x, usable, K)  # [B, K, D]
        count = usable.sum(1).clamp(max=K).to(x.dtype)
        packed = torch.cat([tail.flatten(1), count[:, None], self.resets[:, None].to(x.dtype)], dim=1)
        gathered = _AllGather.apply(packed, x, self.group)[: self.rank]  # [rank, B, K * D + 2]
        window = x.new_zeros(B, K, D)
        if self.rank > 0:
            tails = gathered[..., : K * D].unflatten(-1, (K, D))  # [rank, B, K, D]
            counts, cuts = gathered[..., K * D].long(), gathered[..., K * D + 1].bool()  # [rank, B]
            # a predecessor's inputs reach this rank unless a later predecessor starts a document (rank 0 always does)
            ranks = torch.arange(self.rank, device=x.device)[:, None]
            last_cut = torch.where(cuts, ranks, -1).amax(0)  # [B]
            slot = torch.arange(K, device=x.device)
            reach = (slot >= K - counts[..., None]) & (ranks >= last_cut)[..., None]  # [rank, B, K]
            joined = tails.permute(1, 0, 2, 3).reshape(B, self.rank * K, D)
            window = _last_usable(joined, reach.permute(1, 0, 2).reshape(B, self.rank * K), K)
            window = torch.where(self.continues[:, None, None], window, 0.0)
        if docs is None:
            y = conv1d(x, window, None, mask)[0]
        else:
            seqs = self._sequences(docs)
            doc_window = torch.where(seqs.first_continues[:, None, None], window[seqs.row], 0.0)
            y = docs.scatter(conv1d(docs.gather(x), doc_window)[0])
        return _Tie.apply(y, gathered) if self.rank == 0 else y


def _last_usable(x: torch.Tensor, usable: torch.Tensor, K: int) -> torch.Tensor:
    """x [B, T, D], usable [B, T] bool -> the last K usable entries of each row [B, K, D], in order, zeros before
    them when a row has fewer."""
    order = torch.sort(usable.to(torch.int8), dim=1, stable=True).indices  # unusable first, usable in order last
    kept = (x * usable[..., None]).gather(1, order[..., None].expand_as(x))
    return F.pad(kept, (0, 0, K, 0))[:, kept.shape[1] :]


# --- inputs -------------------------------------------------------------------------------------------------------

SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels", "shift_labels")


def shard_batch(batch: dict[str, Any], group_or_mesh: Any) -> dict[str, Any]:
    """This rank's slice of a batch of whole rows: `shift_labels` made from `labels` (-100 after each row's last
    token) where absent, then every [B, S, ...] entry of SEQUENCE_KEYS cut to its S / P positions; the rest as
    given. Raises ValueError when S does not split evenly over the group."""
    group = _group_of(group_or_mesh)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    batch = dict(batch)
    if batch.get("shift_labels") is None and batch.get("labels") is not None:
        batch["shift_labels"] = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    lengths = {key: batch[key].shape[1] for key in SEQUENCE_KEYS if torch.is_tensor(batch.get(key))}
    for key, S in lengths.items():
        if S % size:
            raise ValueError(
                f"{key} has {S} positions, which do not split evenly over the context-parallel group of {size} ranks"
            )
        batch[key] = batch[key].narrow(1, rank * (S // size), S // size).contiguous()
    return batch


__all__ = [
    "ContextParallel",
    "ContextParallelShard",
    "combine_summaries",
    "disable_context_parallel",
    "enable_context_parallel",
    "shard_batch",
]
