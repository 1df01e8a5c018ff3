"""Paired A/B of the CPU training step: xlstm_hf as in a git revision against the working tree, with the peer.

The model of `benchmark_cpu.py` (xLSTM-7B style, hidden 256, 4 blocks, vocab 1024, float32, 2 x 1024 tokens) built
three times with the same weights: from the package as committed in `--base` (extracted by `git archive` into a
temporary directory), from the working tree, and as transformers' built-in xLSTM. The three train steps run in turns
(base and working tree swapping order every step, the peer after them, as in the benchmark, so that its heap sits
where it does there), and the script prints each median and the per-step paired difference working tree - base.

Why paired: on a shared 2-core machine the median of a step drifts by 20 ms within an hour, for both models, and a
paired difference over 40 steps still has quartiles about 3 ms either side of its median. A change whose median
difference stays inside its quartiles has not been shown to help. Writes benchmarks/ab_train_step.json and .png (the
steps' times in order).

    python scripts/ab_train_step.py [--base HEAD] [--steps 40]
"""

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import xlstm_hf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from benchmark_cpu import builtin_model, train_step_fn  # noqa: E402


def package_at(revision: str, into: Path):
    """xlstm_hf as committed in `revision`, imported as the package `xlstm_hf_base` from `into`."""
    archive = into / "base.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", revision, "xlstm_hf"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (into / "xlstm_hf").rename(into / "xlstm_hf_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("xlstm_hf_base")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision of the package to compare against")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (paired quartiles), got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base_pkg = package_at(args.base, Path(tmp))
        theirs = builtin_model("train")
        theirs.save_pretrained(Path(tmp) / "model")
        new = xlstm_hf.xLSTMForCausalLM.from_pretrained(Path(tmp) / "model")
        base = base_pkg.xLSTMForCausalLM.from_pretrained(Path(tmp) / "model")
    ids = torch.randint(0, new.config.vocab_size, (2, 1024))
    with torch.no_grad():
        diff = (base(ids[:, :256]).logits - new(ids[:, :256]).logits).abs().max().item()
    steps = {"base": train_step_fn(base, ids), "new": train_step_fn(new, ids), "theirs": train_step_fn(theirs, ids)}
    for fn in steps.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps):
        for name in ("base", "new", "theirs") if i % 2 == 0 else ("new", "base", "theirs"):
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    paired = [n - b for n, b in zip(times["new"], times["base"], strict=True)]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "base": args.base,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "median_ms": medians,
        "speedup_vs_transformers": {k: medians["theirs"] / medians[k] for k in ("base", "new")},
        "paired_new_minus_base_ms_quartiles": quartiles(paired),
        "max_abs_logit_diff": diff,
    }
    out = ROOT / "benchmarks" / "ab_train_step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        for name, label in (("base", args.base), ("new", "working tree"), ("theirs", "transformers")):
            ax.plot(times[name], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("train step ms (T=1024, B=2)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"))
    except ImportError:
        pass
    print(f"logits of the two packages differ by at most {diff:.2e}")
    for name in ("base", "new", "theirs"):
        print(f"{name:7s} {medians[name]:7.1f} ms  ({medians['theirs'] / medians[name]:.3f}x transformers)")
    low, mid, high = result["paired_new_minus_base_ms_quartiles"]
    print(f"paired working tree - {args.base}: median {mid:+.2f} ms, quartiles {low:+.2f} .. {high:+.2f} ms")


if __name__ == "__main__":
    main()
