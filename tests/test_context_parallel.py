"""Context parallelism (xlstm_hf/context_parallel.py) against one process, on CPU with gloo.

Each distributed configuration (cp 2, cp 4, dp 2 x cp 2) is one torchrun launch of this file (`worker` below), which
checks everything inside it and writes the relative errors and the set-up errors it saw: for the 7b stack and a paper
stack with an sLSTM block and causal convs, the loss, every logit and every parameter's gradient of a DDP-wrapped
model under CP equal those of the same model run whole on the whole batch, for plain rows, padded rows (left padding
longer than a rank's slice, holes) and packed documents that cross rank boundaries (one spans three ranks, one starts
exactly on a boundary, one is a single token), with 13 tokens per rank (not a multiple of the chunk size 8) and with
gradient checkpointing (reentrant and not) on some cases; on dp 2 x cp 2 also under FSDP2 (HSDP over the mesh).

Tolerance: 2e-5 of the largest magnitude of the loss, of the logits, of all the gradients. Both runs compute in float32;
CP runs the same sums in another order: the chunks restart at every rank boundary, a rank's initial state is the
combine of its predecessors' summaries rather than the chunk recurrence, and the gradients and the loss are summed over
the ranks by all-reduces. Measured: at most 3e-6 (float32's epsilon is 1.2e-7; the gradients sum hundreds of
per-token terms); a state off at a rank boundary (its m by 0.01, or half the conv window) gives 1e-4 to 1.

The summary combine is also checked on its own (no processes) against the sequential recurrence at the slice
boundaries, with gates far from the defaults (forget gates near 0 and near 1, input gates up to +40), where the
combine's log-space weights must keep exp() in range.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from xlstm_hf.context_parallel import combine_summaries, enable_context_parallel
from xlstm_hf.mlstm_naive import mlstm_recurrent

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TOLERANCE = 2e-5
PER_RANK = 13  # tokens per rank: not a multiple of the chunk size (8), longer than the conv window (3)


# --- the combine alone ----------------------------------------------------------------------------------------


def slices_and_boundaries(gates: str, seed: int = 0):
    """q, k, v, i, f [B, NH, S] for S = 4 slices of 7 tokens, with gates of the named regime."""
    g = torch.Generator().manual_seed(seed)
    B, NH, S, DK, DV = 2, 3, 28, 4, 5
    q, k = torch.randn(B, NH, S, DK, generator=g), torch.randn(B, NH, S, DK, generator=g)
    v = torch.randn(B, NH, S, DV, generator=g)
    i, f = torch.randn(B, NH, S, generator=g), torch.randn(B, NH, S, generator=g) + 3
    if gates == "forget_near_0":
        f = f - 30.0  # logsigmoid ~ -30: the state is forgotten within a token
    elif gates == "forget_near_1":
        f = f + 30.0  # logsigmoid ~ -1e-13: nothing decays
    elif gates == "large_input":
        i = i * 10 + 30.0  # exp(i) overflows float32 without the stabiliser
    elif gates == "mixed":
        f[..., ::5] = -30.0
        i[..., 3::7] = 40.0
    return q, k, v, i, f


@pytest.mark.parametrize("gates", ["default", "forget_near_0", "forget_near_1", "large_input", "mixed"])
@pytest.mark.parametrize("empty_m", [0.0, float("-inf")])
def test_combine_equals_the_sequential_recurrence(gates, empty_m):
    """The state entering every slice, combined from the slices' zero-state summaries, against the recurrence run
    token by token up to that boundary: C, n and the stabiliser m itself (the normaliser's floor reads m)."""
    q, k, v, i, f = slices_and_boundaries(gates)
    P, L = 4, q.shape[2] // 4
    summaries = []
    for r in range(P):
        part = slice(r * L, (r + 1) * L)
        B, NH = q.shape[:2]
        m0 = torch.full((B, NH), empty_m if r == 0 else float("-inf"))  # the first slice starts the sequence
        zeros = (torch.zeros(B, NH, 4, 5), torch.zeros(B, NH, 4), m0)
        _, (C, n, m) = mlstm_recurrent(q[:, :, part], k[:, :, part], v[:, :, part], i[:, :, part], f[:, :, part], zeros)
        log_decay = F.logsigmoid(f[:, :, part]).sum(-1)
        summaries.append((C, n, m, log_decay if r > 0 else torch.full_like(log_decay, float("-inf"))))
    for r in range(1, P):
        C, n, m, d = (torch.stack(t) for t in zip(*summaries[:r], strict=True))
        C_in, n_in, m_in = combine_summaries(C, n, m, d)
        _, (C_ref, n_ref, m_ref) = mlstm_recurrent(*(t[:, :, : r * L] for t in (q, k, v, i, f)), empty_m=empty_m)
        torch.testing.assert_close(m_in, m_ref, rtol=1e-6, atol=1e-5, msg=f"m entering slice {r}")
        for name, got, want in (("C", C_in, C_ref), ("n", n_in, n_ref)):
            assert torch.isfinite(got).all()
            scale = want.abs().max().clamp(min=1e-30)
            assert (got - want).abs().max() <= 1e-5 * scale, f"{name} entering slice {r}"


def test_combine_cuts_the_chain_at_a_reset():
    """A slice that holds a document start (log decay -inf) hands on its own state only: what came before it has
    weight 0, whatever its magnitude."""
    C = torch.stack([torch.full((1, 2, 2), 1e3), torch.ones(1, 2, 2)])  # [R=2, B=1, DK=2, DV=2]
    n = torch.stack([torch.full((1, 2), 1e3), torch.ones(1, 2)])
    m = torch.tensor([[50.0], [0.0]])
    d = torch.tensor([[0.0], [float("-inf")]])
    C_in, n_in, m_in = combine_summaries(C, n, m, d)
    assert m_in.item() == 0.0 and C_in.eq(1).all() and n_in.eq(1).all()


def test_set_up_refuses_without_a_process_group():
    from conftest import raises_naming, tiny_config

    import xlstm_hf

    model = xlstm_hf.xLSTMForCausalLM(tiny_config())
    with raises_naming("torch.distributed"):
        enable_context_parallel(model, object())


# --- one process per rank --------------------------------------------------------------------------------------


def run_workers(tmp_path: Path, dp: int, cp: int, backend: str = "torch") -> dict:
    out = tmp_path / f"dp{dp}_cp{cp}_{backend}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(out), PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    cmd = [*TORCHRUN, f"--nproc_per_node={dp * cp}", __file__, str(dp), str(cp), backend]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("dp", "cp"), [(1, 2), (1, 4), (2, 2)])
def test_context_parallel_equals_one_process(tmp_path, dp, cp):
    report = run_workers(tmp_path, dp, cp)
    errors = report["errors"]
    assert len(errors) >= 2 * 3 * 3 + 2 * (dp > 1), sorted(errors)  # 2 stacks x 3 batches x 3 (+ FSDP2 under dp)
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] <= TOLERANCE, worst
    for name, message in report["set_up_errors"].items():
        assert message is not None, f"{name}: no ValueError"


def test_context_parallel_runs_the_triton_kernels(tmp_path):
    """backend="triton" under CP (the kernels interpreted on CPU, or compiled on CUDA): the exchange hands the
    chunkwise and sLSTM kernels their initial states and reads their final states, and the loss, logits and
    gradients equal one process's through the PyTorch ops. The kernels ran (counted), no fallback."""
    report = run_workers(tmp_path, 1, 2, backend="triton")
    assert report["kernel_calls"]["mlstm_chunkwise_triton"] > 0 and report["kernel_calls"]["slstm_triton"] > 0
    worst = sorted(report["errors"].items(), key=lambda kv: -kv[1])[:5]
    assert len(report["errors"]) == 2 * 3 * 3 and worst[0][1] <= TOLERANCE, worst


# --- examples/train.py under torchrun ------------------------------------------------------------------------------


def test_train_example_dp2_cp2_matches_one_process(tmp_path):
    """`--context_parallel_size 2` on 4 processes (2 data-parallel groups of 2) against one process on the same global
    batch (the whole training set, so both read the same rows in every step): the Trainer's logged losses, the eval
    loss and the weights after four SGD steps, with an sLSTM block and gradient checkpointing. SGD, not Adam: Adam
    turns the round-off of near-zero gradients into steps of the learning rate (see test_distributed.py)."""
    from test_distributed import run_train, train_losses

    extra = [
        "--config_overrides=hidden_size=32,num_hidden_layers=2,num_heads=2,chunk_size=16,dropout=0.0,slstm_at=[1]",
        "--optim=sgd",
        "--learning_rate=0.5",
        "--gradient_checkpointing",
    ]
    single = run_train(tmp_path / "single", 1, 8, *extra)
    split = run_train(tmp_path / "cp", 4, 4, *extra, "--context_parallel_size=2")
    assert len(train_losses(single)) == 4
    torch.testing.assert_close(torch.tensor(train_losses(split)), torch.tensor(train_losses(single)), rtol=1e-5, atol=0)
    evals = [[e["eval_loss"] for e in state["log_history"] if "eval_loss" in e] for state in (single, split)]
    torch.testing.assert_close(torch.tensor(evals[1]), torch.tensor(evals[0]), rtol=1e-5, atol=0)
    single_weights = load_file(tmp_path / "single" / "model.safetensors")
    split_weights = load_file(tmp_path / "cp" / "model.safetensors")
    for name, w in single_weights.items():
        torch.testing.assert_close(split_weights[name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_train_example_refuses_a_split_it_cannot_make():
    from conftest import raises_naming
    from test_user_flows import load_train_example

    mesh = load_train_example().context_parallel_mesh
    with raises_naming("--context_parallel_size 3", "world size 4"):
        mesh(SimpleNamespace(context_parallel_size=3), SimpleNamespace(world_size=4), 96)
    with raises_naming("--block_size 63", "--context_parallel_size 2"):
        mesh(SimpleNamespace(context_parallel_size=2), SimpleNamespace(world_size=2), 63)


# --- the worker -------------------------------------------------------------------------------------------------


def _models(backend: str = "torch"):
    """The two stacks, each with one seed on every rank and every parameter perturbed (no init symmetry)."""
    from conftest import randomize_, tiny_config

    import xlstm_hf

    chunk = dict(chunk_size=16) if backend == "triton" else {}  # the Triton chunkwise kernel's smallest chunk
    for name, config in (
        ("7b", tiny_config("7b", num_hidden_layers=2, **chunk)),
        ("paper", tiny_config("paper", num_hidden_layers=3, slstm_at=[1], **chunk)),  # convs in all three blocks
    ):
        torch.manual_seed(0)
        yield name, randomize_(xlstm_hf.xLSTMForCausalLM(config, backend=backend))


def _batches(B: int, S: int, cp: int) -> dict[str, dict[str, torch.Tensor]]:
    """Whole rows [B, S]: plain, padded, packed."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (B, S), generator=g)
    labels = ids.clone()
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, : PER_RANK + 5] = 0  # left padding longer than the first rank's slice
    mask[1:, 7:9] = 0  # holes, one across the first boundary
    mask[1:, PER_RANK] = 0
    lengths = [PER_RANK - 4, 1, 3 * PER_RANK + 2]  # then one doc starting exactly on a boundary, then the rest
    positions = torch.zeros(B, S, dtype=torch.long)
    for row in range(B):
        cuts = [0, *torch.tensor(lengths[: 1 + row % 3]).cumsum(0).tolist()]
        cuts = sorted({c for c in cuts if c < S} | {2 * PER_RANK})
        for a, b in zip(cuts, [*cuts[1:], S], strict=True):
            positions[row, a:b] = torch.arange(b - a)
    packed_labels = labels.masked_fill(positions == 0, -100)  # a document's first token is no target
    # targets of real positions only (a padded position's logits are unspecified) that are real tokens
    padded_targets = F.pad(labels.masked_fill(mask == 0, -100), (0, 1), value=-100)[:, 1:].masked_fill(mask == 0, -100)
    return {
        "plain": dict(input_ids=ids, labels=labels),
        "padded": dict(input_ids=ids, attention_mask=mask, shift_labels=padded_targets),
        "packed": dict(input_ids=ids, position_ids=positions, labels=packed_labels),
    }


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def _set_up_errors(mesh, model) -> dict[str, str | None]:
    """The ValueErrors of a bad set-up or bad input under CP: their messages, None where none was raised."""
    from xlstm_hf.cache_xlstm import xLSTMCache
    from xlstm_hf.context_parallel import shard_batch

    def message(fn) -> str | None:
        try:
            fn()
        except ValueError as error:
            return str(error)
        return None

    cp = mesh["cp"].size()
    ids = torch.zeros(1, 2 * cp, dtype=torch.long)
    return {
        "2-D mesh without a cp dimension": message(
            lambda: enable_context_parallel(model, mesh.__class__("cpu", mesh.mesh, mesh_dim_names=("a", "b")))
        )
        if mesh.ndim == 2
        else "1-D",
        "sequence length that does not split": message(lambda: enable_context_parallel(model, mesh["cp"], 2 * cp + 1)),
        "batch that does not split": message(lambda: shard_batch({"input_ids": ids[:, 1:]}, mesh["cp"])),
        "labels without shift_labels": message(lambda: model(input_ids=ids[:, :2], labels=ids[:, :2])),
        "cache": message(lambda: model(input_ids=ids[:, :2], cache=xLSTMCache(model.config, 1))),
        "not an xLSTM model": message(lambda: enable_context_parallel(torch.nn.Linear(2, 2), mesh["cp"])),
    }


def _fsdp2_errors(mesh, rows: int, S: int) -> dict[str, float]:
    """The 7b stack under FSDP2 on the dp x cp mesh (HSDP: replicated over dp, sharded over cp, every block then the
    root, as `_no_split_modules` asks) and CP over cp, packed rows: loss and gradients against one process. FSDP2
    averages the gradients over all ranks, so each rank's loss share is scaled by their number."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from xlstm_hf.context_parallel import shard_batch

    _, model = next(_models())
    reference = copy.deepcopy(model)
    batch = _batches(mesh["dp"].size() * rows, S, mesh["cp"].size())["packed"]
    ref = reference(**batch, use_cache=False)
    ref.loss.backward()
    for block in model.backbone.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    enable_context_parallel(model, mesh["cp"])
    dp_rank = mesh["dp"].get_local_rank()
    mine = shard_batch({k: v[dp_rank * rows : (dp_rank + 1) * rows] for k, v in batch.items()}, mesh)
    targets = batch["labels"][:, 1:].ne(-100).sum()
    out = model(**mine, num_items_in_batch=targets)
    (out.loss * dist.get_world_size()).backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    scale = max(float(q.grad.abs().max()) for q in reference.parameters())
    grads = [p.grad.full_tensor() for p in model.parameters()]
    return {
        "7b/fsdp2/packed/loss": _relative_error(loss, ref.loss.detach()),
        "7b/fsdp2/packed/gradients": max(
            float((g - q.grad).abs().max()) / scale for g, q in zip(grads, reference.parameters(), strict=True)
        ),
    }


def _count_kernel_calls() -> dict[str, int]:
    """Hands recurrent_ops the Triton kernels (interpreted without CUDA) and counts their calls."""
    from kernel_testing import use_kernels_in_recurrent_ops

    from xlstm_hf import recurrent_ops

    use_kernels_in_recurrent_ops(pytest.MonkeyPatch())
    calls = {"mlstm_chunkwise_triton": 0, "slstm_triton": 0}
    for name in calls:
        kernel = getattr(recurrent_ops, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        setattr(recurrent_ops, name, counted)
    return calls


def worker(dp: int, cp: int, backend: str = "torch") -> None:
    import copy

    import torch.distributed as dist
    from conftest import disable_checkpointing, enable_checkpointing
    from torch.distributed.device_mesh import init_device_mesh

    from xlstm_hf.context_parallel import shard_batch

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (dp, cp), mesh_dim_names=("dp", "cp"))
    dp_rank, cp_rank = mesh["dp"].get_local_rank(), mesh["cp"].get_local_rank()
    rows, S = 3, cp * PER_RANK
    errors: dict[str, float] = {}
    set_up_errors = {}
    kernel_calls = _count_kernel_calls() if backend == "triton" else {}
    for model_name, model in _models(backend):
        # one process, whole rows (every rank computes it alike), through the PyTorch ops
        reference = copy.deepcopy(model)
        if backend != "torch":
            reference = type(model)(model.config, backend="torch")
            reference.load_state_dict(model.state_dict())
        enable_context_parallel(model, mesh["cp"], sequence_length=S)
        for case, batch in _batches(dp * rows, S, cp).items():
            reference.zero_grad()
            ref = reference(**batch, use_cache=False)
            ref.loss.backward()
            targets = (batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]).ne(-100).sum()

            # dp x cp: this rank's rows, then its slice of them; the ranks' losses and gradients add up
            model.zero_grad()
            reentrant = {"padded": False, "packed": True}.get(case) if model_name == "paper" else None
            if reentrant is None:
                disable_checkpointing(model)
            else:
                enable_checkpointing(model, reentrant)
            mine = shard_batch({k: v[dp_rank * rows : (dp_rank + 1) * rows] for k, v in batch.items()}, mesh)
            out = model(**mine, num_items_in_batch=targets)
            out.loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)

            key = f"{model_name}/{case}"
            errors[f"{key}/loss"] = _relative_error(loss, ref.loss.detach())
            ref_logits = ref.logits.detach()[dp_rank * rows : (dp_rank + 1) * rows]
            ref_logits = ref_logits[:, cp_rank * PER_RANK : (cp_rank + 1) * PER_RANK]
            real = mine.get("attention_mask", torch.ones_like(mine["input_ids"])).bool()  # padding's logits: any
            errors[f"{key}/logits"] = _relative_error(out.logits.detach()[real], ref_logits[real])
            # at the scale of the model's largest gradient: a few gradients (the forget gates' biases) are small sums
            # of per-token terms of both signs, whose round-off is that of the terms, not of the sum
            scale = max(float(q.grad.abs().max()) for q in reference.parameters())
            errors[f"{key}/gradients"] = max(
                float((p.grad - q.grad).abs().max()) / scale
                for p, q in zip(model.parameters(), reference.parameters(), strict=True)
            )
        if not set_up_errors:
            set_up_errors = _set_up_errors(mesh, model)
    if dp > 1:
        errors.update(_fsdp2_errors(mesh, rows, S))

    gathered = [None] * world
    dist.all_gather_object(gathered, errors)
    if rank == 0:
        worst = {k: max(e[k] for e in gathered) for k in errors}
        report = {"errors": worst, "set_up_errors": set_up_errors, "kernel_calls": kernel_calls}
        Path(os.environ["OUT"]).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
