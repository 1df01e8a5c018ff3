"""Context parallelism on CPU (gloo): per-rank memory and throughput of a training step against one process.

A small xLSTM-7B-style model (hidden 128, 4 blocks, 4 heads, vocab 512, chunk 64), float32, batch 1, one training
step (forward and backward of the LM loss) after a warm-up step:
  - memory: one row of 32768 tokens on 1, 2 and 4 processes (32768 / P tokens each); per rank, the peak resident
    memory of the steps above the resident memory before them (the activations, the gradients and the temporaries;
    the parameters and the interpreter are below it). Target: the 4-rank peak <= 0.35x the 1-rank peak.
  - throughput: 2 processes with one thread each on a row of 2 x 8192 tokens, against a process with one thread on
    8192 tokens (the same slice per process) without context parallelism. The same two processes time both in turns,
    step by step (each process runs its own slice alone, at the same time as the other: the cores are as busy in both
    and a neighbour's load slows both alike); the medians of the turns. Target: tokens/s per rank >= 0.8x.
The mLSTM-only stack: an sLSTM layer runs the ranks one after another (context_parallel.py), which this does not time.
Writes benchmarks/context_parallel.json and .png; prints a table.

    python scripts/benchmark_context_parallel.py
    python scripts/benchmark_context_parallel.py --tokens 4096 --slice 1024    # quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_hf  # noqa: E402
from xlstm_hf.context_parallel import disable_context_parallel, enable_context_parallel, shard_batch  # noqa: E402

MODEL = dict(architecture="7b", vocab_size=512, hidden_size=128, num_hidden_layers=4, num_heads=4, chunk_size=64)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(tokens: int, steps: int, out: str) -> None:
    """One rank (or the one process) of a row of `tokens`; writes its figures to `out`.rank.json: the peak memory of
    its steps and the median step time, and with 2 or more ranks the median step time of its slice run alone."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = xlstm_hf.xLSTMForCausalLM(xlstm_hf.xLSTMConfig(**MODEL, use_cache=False), backend="torch")
    ids = torch.randint(0, MODEL["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    targets = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
    batch = {"input_ids": ids, "shift_labels": targets, "num_items_in_batch": tokens - 1}  # as the Trainer passes
    if distributed:
        group = dist.new_group(list(range(world)))
        batch = shard_batch(batch, group)
    alone = {k: v for k, v in batch.items() if k != "num_items_in_batch"}  # this slice as a whole sequence

    def step(inputs: dict) -> float:
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        model(**inputs).loss.backward()
        return time.perf_counter() - start

    before = resident_bytes()
    if distributed:
        enable_context_parallel(model, group, sequence_length=tokens)
    step(batch)  # warm-up: the gradients' storage, the allocator's arenas
    times = [step(batch) for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times_alone = []
    if distributed and steps > 1:
        for _ in range(steps):  # in turns: context parallel, then the slice alone
            times.append(step(batch))
            disable_context_parallel(model)
            times_alone.append(step(alone))
            enable_context_parallel(model, group)
    figures = {"rank": rank, "world": world, "tokens": tokens // world, "peak_bytes": peak}
    figures.update(step_s=statistics.median(times), alone_step_s=statistics.median(times_alone or [float("nan")]))
    Path(f"{out}.{rank}.json").write_text(json.dumps(figures))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def launch(processes: int, tokens: int, steps: int, out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = [str(Path(__file__).resolve()), "--worker", f"--tokens={tokens}", f"--steps={steps}", f"--out={out}"]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(processes)]


def plot(memory: dict[int, list[dict]], throughput: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for P, ranks in memory.items():
        ax1.bar([f"{P} x {r['tokens']}\nrank {r['rank']}" for r in ranks], [r["peak_bytes"] / 2**20 for r in ranks])
    ax1.set_ylabel("peak MiB per rank above the start")
    ax1.set_title("one row of 32768 tokens over P processes")
    ax1.tick_params(axis="x", labelsize=7)
    ax2.bar(list(throughput), list(throughput.values()), color=["tab:gray", "tab:blue"])
    ax2.set_ylabel("tokens / s per process (1 thread)")
    ax2.set_title("same slice per process")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768, help="the row of the memory comparison")
    parser.add_argument("--slice", type=int, default=8192, help="tokens per process of the throughput comparison")
    parser.add_argument("--steps", type=int, default=5, help="timed turns of the throughput comparison")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.tokens, args.steps, args.out)

    tmp = ROOT / "benchmarks" / ".context_parallel_runs"
    tmp.mkdir(exist_ok=True)
    memory = {P: launch(P, args.tokens, 1, tmp / f"memory{P}") for P in (1, 2, 4)}
    split = launch(2, 2 * args.slice, args.steps, tmp / "split")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()

    one = memory[1][0]["peak_bytes"]
    print(f"{'processes':>9} {'tokens/rank':>11} {'peak MiB per rank (max, ranks)':>40} {'x 1 process':>11}")
    for P, ranks in memory.items():
        peaks = [r["peak_bytes"] / 2**20 for r in ranks]
        print(f"{P:>9} {ranks[0]['tokens']:>11} {max(peaks):>10.0f} {str([round(p) for p in peaks]):>29} "
              f"{max(r['peak_bytes'] for r in ranks) / one:>11.2f}")  # fmt: skip
    single_tps = args.slice / max(r["alone_step_s"] for r in split)
    split_tps = args.slice / max(r["step_s"] for r in split)  # the step ends with the slowest rank
    print(f"throughput, {args.slice} tokens per process, 1 thread: one process {single_tps:.0f} tokens/s, "
          f"2 ranks {split_tps:.0f} tokens/s per rank ({split_tps / single_tps:.2f}x)")  # fmt: skip

    result = {
        "model": MODEL,
        "memory_tokens": args.tokens,
        "memory": {str(P): ranks for P, ranks in memory.items()},
        "memory_ratio_4_to_1": max(r["peak_bytes"] for r in memory[4]) / one,
        "throughput_slice": args.slice,
        "single_tokens_per_s": single_tps,
        "cp2_tokens_per_s_per_rank": split_tps,
        "throughput_ratio": split_tps / single_tps,
        "torch": torch.__version__,
    }
    (ROOT / "benchmarks" / "context_parallel.json").write_text(json.dumps(result, indent=1))
    plot(
        memory,
        {"slice alone, no CP": single_tps, "2 ranks (CP)": split_tps},
        ROOT / "benchmarks" / "context_parallel.png",
    )


if __name__ == "__main__":
    main()
