"""Peak memory of one xLSTM-7B training step on a GPU, estimated on a CPU without one.

One step is the forward of the language-model loss and its backward (gradients in the parameters' dtype, no
optimizer), batch 1, bfloat16, with and without gradient checkpointing. The model is built on the meta device and
run under ``torch._subclasses.fake_tensor.FakeTensorMode`` (tensors with shapes, dtypes and storage sizes, no data)
with ``backend="torch"``: the PyTorch chunkwise kernel, not Triton. A ``TorchDispatchMode`` records every storage an
op creates, with its size, and a weakref finalizer records when it is freed: the live bytes over the step, as a
caching allocator would count them without its 512-byte rounding, fragmentation, the CUDA context or library
workspaces.

Fake tensors stay on the CPU: a fake "cuda" tensor cannot take part in autograd in a CPU build of torch
(``AccumulateGrad`` asks for the CUDA device guard and the process aborts with "PyTorch is not linked with support
for cuda devices"). The model's one device-dependent size, the logits' row blocks of ``fused_ops._row_blocks``
(2 MB on a CPU, 256 MB on an accelerator), is therefore chosen as on a GPU; with ``backend="torch"`` nothing else
depends on the device.

It also lists the allocations the size of a weight: a tensor whose shape is some parameter's (or its transpose), or
with at least as many elements as the smallest 2-D weight. Each is classified by where its values come from, since a
shape cannot tell (at 4096 tokens a [S, D] activation has the shape of a [D, D] weight):
    gradient    the storage that ends as a parameter's .grad
    activation  computed from the batch (tokens, labels, or anything computed from them, the loss's gradient included)
    weight      computed from parameters alone: a per-step copy of weights (a cast, a concatenation, a transpose)
    constant    neither (zeros, aranges)
A step should make one gradient per parameter and no "weight" allocation.

Context parallelism (xlstm_hf/context_parallel.py): the step of one rank of P holding S / P tokens of a row of S,
the model's exchanges run with the collectives replaced by stand-ins (`FakeCollectives`) that leave the buffers the
real ones fill: the gathered summaries, the received states and gradients are counted. The first rank runs one mLSTM
pass per layer, a middle rank two (its summary and its outputs), the last rank one; the per-rank peak is the largest.

    python scripts/memory_gpu_estimate.py                 # xLSTM-7B shape, 32 layers, 4096 tokens
    python scripts/memory_gpu_estimate.py --layers 4      # quicker; parameters and memory scale with the layers
    python scripts/memory_gpu_estimate.py --context_parallel 1048576 8 32   # also 1M tokens over 8 and 32 ranks
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_hf.checks as checks  # noqa: E402
import xlstm_hf.context_parallel as context_parallel  # noqa: E402
import xlstm_hf.fused_ops as fused_ops  # noqa: E402
from xlstm_hf import xLSTMConfig, xLSTMForCausalLM  # noqa: E402

GB = 1e9
H100_BYTES = 80 * 2**30  # an H100 SXM's 80 GiB, of which the CUDA context and workspaces take a few


def config_7b(layers: int = 32, **overrides) -> xLSTMConfig:
    """The shape of NX-AI/xLSTM-7b (its config.json), with the PyTorch kernels."""
    fields = dict(
        architecture="7b",
        vocab_size=50304,
        hidden_size=4096,
        num_hidden_layers=layers,
        num_heads=8,
        qk_dim_factor=0.5,
        v_dim_factor=1.0,
        ffn_proj_factor=2.667,
        proj_round_to=64,
        chunk_size=64,
        gate_soft_cap=15.0,
        output_logit_soft_cap=30.0,
        use_bias=False,
        tie_word_embeddings=False,
    )
    return xLSTMConfig(**{**fields, **overrides})


def analytic_parameter_count(config: xLSTMConfig) -> int:
    """Parameters of a "7b" stack written out from the config (without biases, use_bias=False)."""
    D, V, NH = config.hidden_size, config.vocab_size, config.num_heads
    mlstm = 2 * D * config.qk_dim + 2 * D * config.v_dim + config.v_dim * D  # q, k, v, output gate, out_proj
    gates = 2 * (D * NH + NH)  # input and forget gates with their biases
    ffn = 3 * D * config.ffn_dim
    norms = 2 * D + config.v_dim  # block norms and the multi-head norm
    head = V * D * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * (mlstm + gates + ffn + norms) + head + (D if config.add_out_norm else 0)


@dataclass
class Allocation:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    phase: str
    sources: set[str] = field(default_factory=set)  # "batch", "param": what its values were computed from


class StorageTracker(TorchDispatchMode):
    """Records every new storage made by an op (an allocation) and when it is freed, as events (index, +-1), and
    what each storage's values come from. Storages that exist before (parameters, the batch) are registered with
    `mark` and are not allocations."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[Allocation] = []
        self.events: list[tuple[int, int]] = []
        self.phase = ""
        self._index: dict[int, int] = {}  # id of a live tracked storage -> its allocation
        self._sources: dict[int, set[str]] = {}  # id of a marked storage -> its sources

    def mark(self, t: torch.Tensor, source: str) -> None:
        self._sources[id(t.untyped_storage())] = {source}

    def sources_of(self, t: torch.Tensor) -> set[str]:
        key = id(t.untyped_storage())
        if key in self._index:
            return self.allocations[self._index[key]].sources
        return self._sources.get(key, set())

    def allocation_of(self, t: torch.Tensor) -> int | None:
        return self._index.get(id(t.untyped_storage()))

    def _freed(self, key: int, index: int) -> None:
        del self._index[key]
        self.events.append((index, -1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sources = set().union(*(self.sources_of(t) for t in inputs))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._sources:  # written in place: a parameter or an input
                continue
            if key not in self._index:
                self._index[key] = len(self.allocations)
                self.allocations.append(Allocation(str(func), tuple(t.shape), t.dtype, storage.nbytes(), self.phase))
                self.events.append((self._index[key], +1))
                # the storage's Python object lives exactly as long as the storage (PyObject preservation)
                weakref.finalize(storage, self._freed, key, self._index[key])
            self.allocations[self._index[key]].sources |= sources  # an in-place or out= write taints its target
        return out


@dataclass
class StepMemory:
    """Bytes of one training step; `peak` counts everything live at once, parameters included."""

    parameters: int
    parameter_count: int
    parameter_tensors: int
    gradients: int
    gradient_allocations: int
    peak: int
    peak_phase: str
    peak_op: str  # the allocation that reached the peak
    activation_peak: int  # max over the step of the live bytes that are neither parameters nor gradients
    held_after_forward: int  # live after the forward, parameters excepted: what the backward needs
    weight_sized: Counter = field(default_factory=Counter)  # (kind, phase, op, shape, dtype) -> count
    seconds: float = 0.0

    def flagged(self) -> list[tuple]:
        """The weight-sized allocations computed from weights alone."""
        return [key for key in self.weight_sized if key[0] == "weight"]


def _unique_storage_bytes(tensors) -> int:
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _kind(a: Allocation, is_gradient: bool) -> str:
    if is_gradient:
        return "gradient"
    if "batch" in a.sources:
        return "activation"
    return "weight" if "param" in a.sources else "constant"


def measure_step(model: xLSTMForCausalLM, tokens: int, checkpointing: bool) -> StepMemory:
    """Forward and backward of the LM loss of one row of `tokens` token ids, tracked by a StorageTracker (targets as
    `shift_labels` under context parallelism, where `labels` would need the next rank's first token)."""
    params = list(model.parameters())
    if checkpointing:
        # non-reentrant; activation_checkpointing_enable from transformers 5.23, gradient_checkpointing_enable before
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    ids = torch.zeros(1, tokens, dtype=torch.long)
    tracker = StorageTracker()
    for p in params:
        tracker.mark(p, "param")
    tracker.mark(ids, "batch")  # tokens and labels
    with tracker:
        tracker.phase = "forward"
        if model.backbone.context_parallel is None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            loss = model(input_ids=ids, shift_labels=ids, num_items_in_batch=tokens * 8, use_cache=False).loss
        after_forward = len(tracker.events)
        tracker.phase = "backward"
        loss.backward()
        del loss
    grads = [p.grad for p in params if p.grad is not None]
    grad_allocations = {tracker.allocation_of(g) for g in grads} - {None}

    live = live_other = peak = activation_peak = held_after_forward = 0
    peak_phase = peak_op = ""
    for n, (index, sign) in enumerate(tracker.events):
        a = tracker.allocations[index]
        live += sign * a.nbytes
        if index not in grad_allocations:
            live_other += sign * a.nbytes
        if live > peak:
            peak, peak_phase, peak_op = live, a.phase, f"{a.op} {list(a.shape)} {str(a.dtype).removeprefix('torch.')}"
        activation_peak = max(activation_peak, live_other)
        if n + 1 == after_forward:
            held_after_forward = live
    parameters = _unique_storage_bytes(params)

    shapes = {tuple(p.shape) for p in params}
    shapes |= {s[::-1] for s in shapes}
    smallest_2d = min(p.numel() for p in params if p.dim() == 2)
    weight_sized = Counter()
    for index, a in enumerate(tracker.allocations):
        is_gradient = index in grad_allocations  # a norm's gradient can be made as [1, 1, D] and viewed as [D]
        if is_gradient or a.shape in shapes or torch.Size(a.shape).numel() >= smallest_2d:
            key = (_kind(a, is_gradient), a.phase, a.op, a.shape, str(a.dtype).removeprefix("torch."))
            weight_sized[key] += 1
    for p in params:
        p.grad = None
    return StepMemory(
        parameters=parameters,
        parameter_count=sum(p.numel() for p in params),
        parameter_tensors=len(params),
        gradients=_unique_storage_bytes(grads),
        gradient_allocations=len(grad_allocations),
        peak=parameters + peak,
        peak_phase=peak_phase,
        peak_op=peak_op,
        activation_peak=activation_peak,
        held_after_forward=held_after_forward,
        weight_sized=weight_sized,
    )


def _row_blocks_as_on_gpu(row_blocks: Callable) -> Callable:
    """fused_ops._row_blocks as it chooses for a CUDA tensor of x's shape (it reads only x.shape and x.device)."""
    return lambda x: row_blocks(SimpleNamespace(shape=x.shape, device=torch.device("cuda")))


def training_step_memory(
    config: xLSTMConfig,
    tokens: int,
    checkpointing: bool,
    fake: bool = True,
    as_gpu: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    edit_model: Callable[[xLSTMForCausalLM], None] | None = None,
) -> StepMemory:
    """The memory of one training step of a model of `config` in `dtype`; with `fake`, under a FakeTensorMode (no
    memory is used), else with real CPU tensors. With `as_gpu`, the model's one device-dependent size, the logits'
    row blocks of the fused loss, is chosen as on a GPU. `edit_model` may change the model before the step."""
    if fake:  # on the meta device first: fake parameters cannot be cast by Module.to (swap_tensors refuses them)
        with torch.device("meta"):
            model = xLSTMForCausalLM(config, backend="torch").to(dtype)
    else:
        model = xLSTMForCausalLM(config, backend="torch").to(dtype)
    with ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))  # to_empty reads the meta parameters
            model = model.to_empty(device="cpu")
            # the input checks read token values, which fake tensors do not have
            stack.enter_context(mock.patch.object(checks, "out_of_vocabulary", lambda *args, **kwargs: None))
        if as_gpu:
            gpu_blocks = _row_blocks_as_on_gpu(fused_ops._row_blocks)
            stack.enter_context(mock.patch.object(fused_ops, "_row_blocks", gpu_blocks))
        if edit_model is not None:
            edit_model(model)
        return measure_step(model, tokens, checkpointing)


class FakeCollectives:
    """torch.distributed as context_parallel.py calls it, for rank `rank` of `size` in one process: the collectives
    return at once, their buffers allocated by the caller as for the real ones (values are not needed)."""

    class ProcessGroup:
        pass

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_rank(self, group: object = None) -> int:
        return self.rank

    def get_world_size(self, group: object = None) -> int:
        return self.size

    def all_gather(self, *args, **kwargs) -> None:
        pass

    all_reduce = send = recv = all_gather


def context_parallel_step_memory(config: xLSTMConfig, tokens: int, ranks: int, rank: int) -> StepMemory:
    """The memory of one training step of rank `rank` of `ranks` under context parallelism, holding tokens / ranks of
    a row of `tokens`, bfloat16, gradient checkpointing, as on a GPU."""
    fake = FakeCollectives(rank, ranks)

    def split(model: xLSTMForCausalLM) -> None:
        context_parallel.enable_context_parallel(model, FakeCollectives.ProcessGroup(), sequence_length=tokens)

    with mock.patch.object(context_parallel, "dist", fake):
        return training_step_memory(config, tokens // ranks, True, edit_model=split)


def context_parallel_memory(config: xLSTMConfig, tokens: int, ranks: int) -> dict[str, StepMemory]:
    """Per position in the group (first, middle, last): the step memory of a rank."""
    positions = {"first": 0, "middle": 1, "last": ranks - 1} if ranks > 2 else {"first": 0, "last": ranks - 1}
    return {name: context_parallel_step_memory(config, tokens, ranks, r) for name, r in positions.items()}


MEMORY_ROW = "| {:<22} | {:>6} | {:>6} | {:>9} | {:>15} | {:>6} |"
ALLOCATION_ROW = "| {:<10} | {:<8} | {:<38} | {:<16} | {:<8} | {:>5} |"


def print_memory_table(results: dict[str, StepMemory]) -> None:
    print(MEMORY_ROW.format("step", "params", "grads", "after fwd", "activation peak", "peak"))
    print(MEMORY_ROW.format(*["-" * n for n in (22, 6, 6, 9, 15, 6)]).replace(" ", "-"))
    for name, m in results.items():
        cells = (m.parameters, m.gradients, m.held_after_forward, m.activation_peak, m.peak)
        print(MEMORY_ROW.format(name, *(f"{b / GB:.2f}" for b in cells)))
    print(
        "GB (1e9 bytes). after fwd: live after the forward, parameters excepted (the logits are not kept); activation "
        "peak: the most live bytes that are neither parameters nor gradients; peak: all live bytes at once."
    )


def print_weight_sized(name: str, m: StepMemory) -> None:
    print(f"\n{name}: peak reached by {m.peak_op} in the {m.peak_phase}")
    print(f"weight-sized allocations: {m.gradient_allocations} gradients for {m.parameter_tensors} parameters")
    print(ALLOCATION_ROW.format("kind", "phase", "op", "shape", "dtype", "count"))
    for (kind, phase, op, shape, dtype), n in sorted(m.weight_sized.items(), key=str):
        if kind != "activation":
            print(ALLOCATION_ROW.format(kind, phase, op.removeprefix("aten."), str(list(shape)), dtype, n))
    activations = sum(n for key, n in m.weight_sized.items() if key[0] == "activation")
    print(ALLOCATION_ROW.format("activation", "", "(computed from the batch)", "", "", activations))
    print("no weight-derived allocation" if not m.flagged() else f"WEIGHT-DERIVED ALLOCATIONS: {m.flagged()}")


def as_json(m: StepMemory) -> dict:
    return {
        "parameters_bytes": m.parameters,
        "gradients_bytes": m.gradients,
        "held_after_forward_bytes": m.held_after_forward,
        "activation_peak_bytes": m.activation_peak,
        "peak_bytes": m.peak,
        "peak_phase": m.peak_phase,
        "peak_op": m.peak_op,
        "gradient_allocations": m.gradient_allocations,
        "parameter_tensors": m.parameter_tensors,
        "weight_derived_allocations": [[str(x) for x in key] for key in m.flagged()],
        "seconds": round(m.seconds, 1),
    }


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "memory_gpu_estimate.json")
    parser.add_argument(
        "--context_parallel",
        type=int,
        nargs="+",
        metavar=("TOKENS", "RANKS"),
        help="also the per-rank step of a row of TOKENS split over each number of RANKS",
    )
    args = parser.parse_args()

    config = config_7b(args.layers)
    results = {}
    for name, checkpointing in (("plain", False), ("gradient checkpointing", True)):
        start = time.perf_counter()
        results[name] = training_step_memory(config, args.tokens, checkpointing)
        results[name].seconds = time.perf_counter() - start
    count = results["plain"].parameter_count
    analytic = analytic_parameter_count(config)

    print(
        f"xLSTM-7B shape, {args.layers} layers, batch 1 x {args.tokens} tokens, bfloat16, backend torch, as on a GPU: "
        f"{count / 1e9:.3f}B parameters (analytic {analytic / 1e9:.3f}B)"
    )
    print_memory_table(results)
    for name, m in results.items():
        print_weight_sized(name, m)

    summary = {
        "command": f"python scripts/memory_gpu_estimate.py --layers {args.layers} --tokens {args.tokens}",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_model_files": git("status", "--porcelain", "--", "xlstm_hf").splitlines(),
        "config": {"layers": args.layers, "tokens": args.tokens, "batch": 1, "dtype": "bfloat16"},
        "estimated_for": "a GPU, by fake tensors on the CPU",
        "parameter_count": count,
        "analytic_parameter_count": analytic,
        "plain": as_json(results["plain"]),
        "gradient_checkpointing": as_json(results["gradient checkpointing"]),
    }
    if args.context_parallel:
        tokens, *rank_counts = args.context_parallel
        summary["command"] += " --context_parallel " + " ".join(map(str, args.context_parallel))
        summary["context_parallel"] = {"tokens": tokens, "h100_bytes": H100_BYTES}
        print(f"\ncontext parallelism: a row of {tokens} tokens, bfloat16, gradient checkpointing, per rank")
        print(MEMORY_ROW.format("ranks, rank", "params", "grads", "after fwd", "activation peak", "peak"))
        for ranks in rank_counts:
            per_position = context_parallel_memory(config, tokens, ranks)
            for name, m in per_position.items():
                cells = (m.parameters, m.gradients, m.held_after_forward, m.activation_peak, m.peak)
                print(MEMORY_ROW.format(f"{ranks} x {tokens // ranks}, {name}", *(f"{b / GB:.2f}" for b in cells)))
            peak = max(m.peak for m in per_position.values())
            print(f"{ranks} ranks: per-rank peak {peak / GB:.2f} GB, {peak / H100_BYTES:.2f} of an 80 GiB H100")
            summary["context_parallel"][str(ranks)] = {
                "tokens_per_rank": tokens // ranks,
                "per_rank_peak_bytes": peak,
                "fraction_of_h100": peak / H100_BYTES,
                **{name: as_json(m) for name, m in per_position.items()},
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
