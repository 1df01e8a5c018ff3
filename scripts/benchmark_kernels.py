"""Kernel benchmark: the Triton kernels of xlstm_hf against their peers, in one run (issue 5).

On CUDA, bfloat16, medians of CUDA-event timings:
  - mLSTM chunkwise, forward and forward+backward, S in {1k, 2k, 4k, 8k, 16k} at 65,536 tokens per batch, at the
    xLSTM-7B head shapes (NH 8, DK 256, DV 512) and the TFLA paper shapes (NH 16, DK 128, DV 256), against
    mlstm_kernels' ``chunkwise--triton_xl_chunk`` and ``chunkwise--triton_limit_chunk`` and torch SDPA (causal, the
    flash / memory-efficient backends);
  - mLSTM decode step at batch 1 and 256 (7B head shapes) against mlstm_kernels' Triton step kernel;
  - sLSTM forward+backward at hidden 1024, batch 8, S 2048, with 8 heads (DH 128) and the paper's 4 heads (DH 256),
    against the ``xlstm`` package's CUDA kernel.
Without CUDA it times, in float32 at the CPU benchmark model's head shapes (NH 4, DK 32, DV 64, 2048 tokens), the
PyTorch chunkwise mLSTM with its hand-written backward (mlstm_chunk_torch), autograd through the reference
(mlstm_naive) and mlstm_kernels' ``chunkwise--native_autograd`` (what transformers' built-in xLSTM trains with on CPU),
plus the reference step and sLSTM at small sizes; the GPU peers and the Triton kernels are reported as skipped (the
Triton interpreter is a correctness tool, not a timing one).
Every peer is imported behind a guard; a missing or failing one is listed under "skipped" with the reason.

    python scripts/benchmark_kernels.py [--out benchmarks/kernels.json] [--repeats 20] [--quick]

``--quick`` (what scripts/gpu_check.py runs) times S in {2k, 8k} only.

Writes the JSON file and a PNG beside it (same name); prints one line per measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xlstm_hf.mlstm_naive import mlstm_chunkwise, mlstm_recurrent_step  # noqa: E402
from xlstm_hf.slstm_naive import slstm_recurrent  # noqa: E402

SEQ_LENS = [1024, 2048, 4096, 8192, 16384]
QUICK_SEQ_LENS = [2048, 8192]
TOKENS_PER_BATCH = 65536
MLSTM_SHAPES = {"xlstm7b": dict(NH=8, DK=256, DV=512), "tfla": dict(NH=16, DK=128, DV=256)}


def call_ms(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one call of fn: CUDA events on a GPU, wall time on a CPU."""
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_ms(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median wall time of fn in milliseconds after two warm-up calls (compilation, autotuning, allocator)."""
    fn()
    fn()
    return statistics.median(call_ms(fn, cuda) for _ in range(repeats))


def fwd_and_fwdbwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """Closures for fn's forward (no autograd) and forward+backward of sum(output)."""

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwdbwd():
        for t in inputs:
            t.grad = None
        fn(*inputs).float().sum().backward()

    return {"fwd": fwd, "fwdbwd": fwdbwd}


def mlstm_inputs(B, NH, S, DK, DV, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(B, NH, S, DK, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(B, NH, S, DV, generator=g).to(device, dtype)
    i = torch.randn(B, NH, S, generator=g).to(device, dtype)
    f = (torch.randn(B, NH, S, generator=g) + 3.0).to(device, dtype)
    return [t.requires_grad_() for t in (q, k, v, i, f)]


def mlstm_impls(cuda: bool, skipped: list[str]) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> fn(q, k, v, i, f) returning h [B, NH, S, DV]."""
    impls: dict[str, Callable[..., torch.Tensor]] = {}
    if not cuda:
        from xlstm_hf.mlstm_chunk_torch import mlstm_chunkwise_torch

        impls["xlstm_hf_torch_chunkwise"] = lambda q, k, v, i, f: mlstm_chunkwise_torch(q, k, v, i, f)[0]
        impls["torch_reference_chunkwise"] = lambda q, k, v, i, f: mlstm_chunkwise(q, k, v, i, f)[0]
        try:  # the kernel transformers' built-in xLSTM trains with on CPU
            from mlstm_kernels.torch import get_mlstm_kernel

            native = get_mlstm_kernel("chunkwise--native_autograd")
            impls["mlstm_kernels_native_autograd"] = lambda q, k, v, i, f: native(q, k, v, i, f, chunk_size=64)
        except Exception as e:  # noqa: BLE001 (any failure of an optional peer is reported, not fatal)
            skipped.append(f"mlstm_kernels native: {type(e).__name__}: {e}")
        skipped += ["xlstm_hf triton (no CUDA)", "mlstm_kernels TFLA (no CUDA)", "torch SDPA flash (no CUDA)"]
        return impls
    from xlstm_hf.mlstm_chunk import mlstm_chunkwise_triton

    impls["xlstm_hf_triton"] = lambda q, k, v, i, f: mlstm_chunkwise_triton(q, k, v, i, f, chunk_size=64)[0]
    try:
        from mlstm_kernels.torch import get_mlstm_kernel

        for name in ("chunkwise--triton_xl_chunk", "chunkwise--triton_limit_chunk"):
            kernel = get_mlstm_kernel(name)
            impls[name] = lambda q, k, v, i, f, kernel=kernel: kernel(q, k, v, i, f, chunk_size=128)
    except Exception as e:  # noqa: BLE001 (any failure of an optional peer is reported, not fatal)
        skipped.append(f"mlstm_kernels: {type(e).__name__}: {e}")

    def sdpa(q, k, v, i, f):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    impls["torch_sdpa"] = sdpa
    return impls


def bench_mlstm(cuda, repeats, results, skipped, quick=False):
    impls = mlstm_impls(cuda, skipped)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = MLSTM_SHAPES if cuda else {"cpu_bench_model": dict(NH=4, DK=32, DV=64)}
    seq_lens = (QUICK_SEQ_LENS if quick else SEQ_LENS) if cuda else [512, 1024, 2048]
    tokens = TOKENS_PER_BATCH if cuda else 2048
    for suite, shape in shapes.items():
        for S in seq_lens:
            B = max(1, tokens // S)
            inputs = mlstm_inputs(B, shape["NH"], S, shape["DK"], shape["DV"], dtype, device)
            for mode in ("fwd", "fwdbwd"):
                runs = {name: fwd_and_fwdbwd(fn, inputs)[mode] for name, fn in impls.items()}
                record_in_turns(results, skipped, f"mlstm_{suite}", runs, mode, S, B, repeats, cuda)


def bench_step(cuda, repeats, results, skipped):
    NH, DK, DV = 8, 256, 512
    device = "cuda" if cuda else "cpu"
    impls: dict[str, Callable] = {}
    if cuda:
        from xlstm_hf.mlstm_step import mlstm_step_triton

        impls["xlstm_hf_triton"] = lambda q, k, v, i, f, s: mlstm_step_triton(q, k, v, i, f, s)
        try:
            from mlstm_kernels.torch import get_mlstm_step_kernel

            step = get_mlstm_step_kernel("triton")
            impls["mlstm_kernels_triton_step"] = lambda q, k, v, i, f, s: step(
                q, k, v, i[..., None], f[..., None], s[0], s[1], s[2][..., None]
            )
        except Exception as e:  # noqa: BLE001
            skipped.append(f"mlstm_kernels step: {type(e).__name__}: {e}")
    else:
        impls["torch_reference_step"] = lambda q, k, v, i, f, s: mlstm_recurrent_step(q, k, v, i, f, s)
        skipped.append("decode step: xlstm_hf triton and mlstm_kernels (no CUDA)")
    dtype = torch.bfloat16 if cuda else torch.float32
    for B in (1, 256) if cuda else (1, 16):
        q, k = (torch.randn(B, NH, DK, device=device, dtype=dtype) for _ in range(2))
        v = torch.randn(B, NH, DV, device=device, dtype=dtype)
        i, f = torch.randn(B, NH, device=device), torch.randn(B, NH, device=device) + 3.0
        for name, fn in impls.items():
            state = (
                torch.zeros(B, NH, DK, DV, device=device),
                torch.zeros(B, NH, DK, device=device),
                torch.zeros(B, NH, device=device),
            )

            def run(fn=fn, state=state, inputs=(q, k, v, i, f)):
                with torch.no_grad():
                    return fn(*inputs, state)

            record(results, skipped, "mlstm_step_7b", name, "step", 1, B, run, repeats, cuda)


def bench_slstm(cuda, repeats, results, skipped):
    for NH, DH in ((8, 128), (4, 256)) if cuda else ((8, 16),):
        bench_slstm_heads(NH, DH, cuda, repeats, results, skipped)


def bench_slstm_heads(NH, DH, cuda, repeats, results, skipped):
    B, S = (8, 2048) if cuda else (2, 128)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(B, NH, S, 4 * DH, device=device, dtype=dtype).requires_grad_()
    r = (torch.randn(NH, DH, 4 * DH, device=device) * DH**-0.5).requires_grad_()
    impls: dict[str, Callable] = {}
    if cuda:
        from xlstm_hf.slstm_fused import slstm_triton

        impls["xlstm_hf_triton"] = lambda: slstm_triton(x, r)[0]
        try:
            from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig

            cell = sLSTMCell(sLSTMCellConfig(hidden_size=NH * DH, num_heads=NH, backend="cuda", batch_size=B)).to(
                device, dtype
            )
            x_pkg = torch.randn(B, S, 4 * NH * DH, device=device, dtype=dtype).requires_grad_()
            impls["xlstm_package_cuda"] = lambda: cell(x_pkg)[0]
        except Exception as e:  # noqa: BLE001 (its nvcc build is the package's most reported failure)
            skipped.append(f"xlstm sLSTM CUDA NH {NH}: {type(e).__name__}: {str(e)[:200]}")
    else:
        impls["torch_reference"] = lambda: slstm_recurrent(x, r)[0]
        skipped.append("sLSTM: xlstm_hf triton and the xlstm package's CUDA kernel (no CUDA)")
    for name, fn in impls.items():

        def fwdbwd(fn=fn):
            x.grad = r.grad = None
            fn().float().sum().backward()

        record(results, skipped, f"slstm_NH{NH}_DH{DH}", name, "fwdbwd", S, B, fwdbwd, repeats, cuda)


def record(results, skipped, suite, impl, mode, S, B, run, repeats, cuda):
    try:
        ms = time_ms(run, repeats, cuda)
    except Exception as e:  # noqa: BLE001 (out of memory or a peer that cannot serve the shape)
        skipped.append(f"{suite}/{impl}/{mode}/S={S}: {type(e).__name__}: {str(e)[:200]}")
        if cuda:
            torch.cuda.empty_cache()
        return
    results.append(dict(suite=suite, impl=impl, mode=mode, S=S, B=B, ms=ms))
    print(f"{suite:18s} {impl:32s} {mode:7s} S={S:6d} B={B:4d} {ms:10.3f} ms", flush=True)


def record_in_turns(results, skipped, suite, runs, mode, S, B, repeats, cuda):
    """Median times of the implementations in `runs` (name -> closure) measured in turns, one call of each per
    repeat, so that a shared machine's drift slows them alike: measured one after another, the first of three
    read slower than the second on a CPU where in turns it is 1.3x faster."""
    live = {}
    for name, run in runs.items():
        try:
            run()
            run()
            live[name] = run
        except Exception as e:  # noqa: BLE001 (out of memory or a peer that cannot serve the shape)
            skipped.append(f"{suite}/{name}/{mode}/S={S}: {type(e).__name__}: {str(e)[:200]}")
            if cuda:
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(repeats):
        for name, run in live.items():
            times[name].append(call_ms(run, cuda))
    for name, ts in times.items():
        ms = statistics.median(ts)
        results.append(dict(suite=suite, impl=name, mode=mode, S=S, B=B, ms=ms))
        print(f"{suite:18s} {name:32s} {mode:7s} S={S:6d} B={B:4d} {ms:10.3f} ms", flush=True)


def plot(results, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = sorted({r["suite"] for r in results})
    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 4), squeeze=False)
    for ax, suite in zip(axes[0], suites, strict=True):
        rows = [r for r in results if r["suite"] == suite]
        x_key = "B" if rows[0]["mode"] == "step" else "S"
        for impl, mode in sorted({(r["impl"], r["mode"]) for r in rows}):
            pts = sorted((r[x_key], r["ms"]) for r in rows if r["impl"] == impl and r["mode"] == mode)
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{impl} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel("ms")
        ax.set_title(suite)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_all(cuda: bool, repeats: int, quick: bool) -> tuple[list[dict], list[str]]:
    """Every benchmark: (results, skipped)."""
    results: list[dict] = []
    skipped: list[str] = []
    bench_mlstm(cuda, repeats, results, skipped, quick)
    bench_step(cuda, repeats, results, skipped)
    bench_slstm(cuda, repeats, results, skipped)
    return results, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kernels.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="S in {2k, 8k} only")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    results, skipped = run_all(cuda, args.repeats, args.quick)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device,
        torch=torch.__version__,
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        results=results,
        skipped=skipped,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(results, args.out.with_suffix(".png"))
    for line in skipped:
        print(f"skipped: {line}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
