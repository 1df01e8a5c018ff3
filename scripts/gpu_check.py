"""The one command to run when a CUDA machine is lent: every GPU claim of xlstm_hf checked in one go (issue 18).

    python scripts/gpu_check.py [--out benchmarks/gpu_check.json] [--repeats 5] [--skip-bench]

1. The kernel test files (tests/test_mlstm_chunk.py, test_mlstm_step.py, test_slstm_fused.py) on CUDA (compiled,
   not interpreted), through pytest.
2. The kernels at real shapes against the float32 reference on the same GPU, forward, final state and every gradient:
   xLSTM-7B mLSTM heads (NH 8, DK 256, DV 512) and paper 350M heads (NH 4, DK = DV = 512), bfloat16 and float32 (at
   torch's "highest" and "high" matmul precision); the decode step at batch 1 and 256; sLSTM at head dims 256, 192,
   128, 64. Tolerances (relative L2 error) as in the test files, TF32 5e-3 and float32 1e-4, except bfloat16 mLSTM
   8e-2: its backward rounds every matmul operand to bfloat16, and a scaled-down dry run of this script under the
   interpreter (whose bfloat16 conversion truncates; a GPU rounds to nearest) measured dq, dk up to 6.3e-2 at
   DK 32; sLSTM, over 64 steps, 3x its test file's (bfloat16 1e-2, TF32 as float32 inputs' 5e-3, float32 1e-5).
3. Model level: a few AdamW steps of backend="triton" against backend="torch" from the same weights (paper stack with
   an sLSTM block, and a 7B-style stack), losses and parameters after the steps; then greedy generation, tokens equal,
   and prompt lookup decoding (the fused step under a cache that records and rolls back) equal to greedy.
4. scripts/benchmark_kernels.py at reduced repeats (S 2k and 8k), and the sLSTM at column tiles 16, 32, 64.
5. With --vllm-python (an environment with the CUDA `vllm` and xlstm_hf, README "Serving"): tests/test_vllm.py on
   CUDA and scripts/benchmark_serving.py --cuda (issue 22).
Writes one JSON (device, versions, every figure, pass/fail) and exits non-zero when a check failed. It needs CUDA and
says so otherwise. It has not yet run on a GPU: its run time there is unmeasured.

On the GPU machines this project is lent (`.library/device/KINDS.md`, read 2026-12-07): Python 3.12 with torch
2.11.0, triton 3.6.0 and transformers 5.17.0 in its image, below xlstm_hf's declared torch and transformers ranges,
and nothing can be installed there but wheels carried in a 64 MiB working tree (torch, and vLLM's 326 MB CUDA wheel
with its torch 2.13 and flashinfer, cannot). So the check runs on that image's packages as they are: here,
transformers 5.17.0 passes the generation, cache and modeling tests, and triton 3.6.0 compiles every kernel launch
within its limits (benchmarks/RESULTS.md, "GPU kernel compile figures"). Step 5 needs a machine with vLLM installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from kernel_testing import matmul_precision  # noqa: E402  (the kernel tests' helper)

TOL = {"bf16": 8e-2, "tf32": 5e-3, "fp32": 1e-4}
SLSTM_TOL = {"bf16": 3e-2, "tf32": 1.5e-2, "fp32": 3e-5}
MLSTM_HEADS = {"7b": (8, 256, 512), "paper350m": (4, 512, 512)}  # NH, DK, DV
MLSTM_BATCH, MLSTM_SEQ = 2, 1000  # 15 chunks of 64 and a partial one
STEP_BATCHES = (1, 256)
SLSTM_HEADS = ((4, 256), (4, 192), (8, 128), (16, 64))  # NH, DH
SLSTM_BATCH, SLSTM_SEQ = 20, 64  # two 16-sequence tiles, the second partly filled
MODEL_BATCH, MODEL_SEQ = 4, 300  # 4 chunks of 64 and a partial one
PRECISION = {"bf16": (torch.bfloat16, "high"), "tf32": (torch.float32, "high"), "fp32": (torch.float32, "highest")}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    a, e = a[finite], e[finite]
    return ((a - e).norm() / max(e.norm().item(), 1e-3 * e.numel() ** 0.5)).item()


def compare(name: str, outs: dict, refs: dict, tol: float) -> dict:
    errors = {key: rel_err(outs[key].float(), refs[key].float()) for key in refs}
    worst = max(errors.values())
    status = "ok" if worst <= tol else "FAIL"
    print(f"{status:4s} {name:48s} worst rel err {worst:.2e} (tol {tol:.0e})", flush=True)
    return dict(name=name, tol=tol, errors=errors, passed=worst <= tol)


def with_grads(fn, leaves: list[torch.Tensor], seed: int = 1) -> dict:
    """Outputs of fn(*leaves) (a tensor and a state tuple) and the gradients of every leaf for a fixed cotangent."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    h, state = fn(*leaves)
    outs = (h, *state)
    g = torch.Generator(device="cpu").manual_seed(seed)
    cot = [torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in outs]
    finite = [torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for t in outs]
    sum((t * c).sum() for t, c in zip(finite, cot, strict=True)).backward()
    result = {f"out{k}": t.detach() for k, t in enumerate(outs)}
    result.update({f"d{k}": t.grad for k, t in enumerate(leaves)})
    return result


def check_mlstm_chunk(records: list) -> None:
    from xlstm_hf.mlstm_chunk import mlstm_chunkwise_triton
    from xlstm_hf.mlstm_naive import mlstm_chunkwise

    for label, (NH, DK, DV) in MLSTM_HEADS.items():
        for dt, (dtype, precision) in PRECISION.items():
            B, S = MLSTM_BATCH, MLSTM_SEQ
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k = (torch.randn(B, NH, S + 64, DK, generator=g) for _ in range(2))
            v = torch.randn(B, NH, S + 64, DV, generator=g)
            i, f = torch.randn(B, NH, S + 64, generator=g) * 2, torch.randn(B, NH, S + 64, generator=g) * 2 + 3
            # a realistic initial state: the memory after a 64-token prefix of the same sequences
            _, (C0, n0, m0) = mlstm_chunkwise(*(t[:, :, :64].cuda() for t in (q, k, v, i, f)))
            inputs = [t[:, :, 64:].cuda() for t in (q, k, v, i, f)]
            leaves = [t.to(dtype) for t in inputs[:3]] + inputs[3:] + [C0, n0, m0]

            def kernel(q, k, v, i, f, C0, n0, m0):
                return mlstm_chunkwise_triton(q, k, v, i, f, (C0, n0, m0), chunk_size=64)

            def reference(q, k, v, i, f, C0, n0, m0):
                h, state = mlstm_chunkwise(q.float(), k.float(), v.float(), i, f, (C0, n0, m0), chunk_size=64)
                return h.to(q.dtype), state

            with matmul_precision(precision):
                outs = with_grads(kernel, leaves)
            with matmul_precision("highest"):
                refs = with_grads(reference, leaves)
            records.append(compare(f"mlstm_chunk {label} {dt} B{B} S{S}", outs, refs, TOL[dt]))


def check_mlstm_step(records: list) -> None:
    from xlstm_hf.mlstm_naive import mlstm_recurrent_step
    from xlstm_hf.mlstm_step import mlstm_step_triton

    NH, DK, DV = MLSTM_HEADS["7b"]
    for B in STEP_BATCHES:
        for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k = (torch.randn(B, NH, DK, generator=g).cuda().to(dtype) for _ in range(2))
            v = torch.randn(B, NH, DV, generator=g).cuda().to(dtype)
            i, f = torch.randn(B, NH, generator=g).cuda(), (torch.randn(B, NH, generator=g) + 3).cuda()
            state = (torch.randn(B, NH, DK, DV, generator=g), torch.randn(B, NH, DK, generator=g), torch.randn(B, NH))
            state = tuple(t.cuda() for t in state)
            with torch.no_grad():
                h_ref, st_ref = mlstm_recurrent_step(q.float(), k.float(), v.float(), i, f, [s.clone() for s in state])
                h, st = mlstm_step_triton(q, k, v, i, f, tuple(s.clone() for s in state))
            outs = {"h": h, "C": st[0], "n": st[1], "m": st[2]}
            refs = {"h": h_ref.to(dtype), "C": st_ref[0], "n": st_ref[1], "m": st_ref[2]}
            records.append(compare(f"mlstm_step 7b {dt} B{B}", outs, refs, 1e-5 if dt == "fp32" else 1e-2))


def check_slstm(records: list) -> None:
    from xlstm_hf.slstm_fused import slstm_triton
    from xlstm_hf.slstm_naive import slstm_recurrent

    for NH, DH in SLSTM_HEADS:
        for dt, (dtype, precision) in PRECISION.items():
            B, S = SLSTM_BATCH, SLSTM_SEQ
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(B, NH, S, 4 * DH, generator=g).cuda().to(dtype)
            r = (torch.randn(NH, DH, 4 * DH, generator=g) * DH**-0.5).cuda()
            state = [torch.randn(B, NH, DH, generator=g) for _ in range(2)]
            state += [torch.rand(B, NH, DH, generator=g) + 0.5, torch.randn(B, NH, DH, generator=g)]
            mask = torch.ones(B, S, dtype=torch.bool)
            mask[::3, : S // 4] = False  # left padding on every third sequence
            leaves = [x, r, *(t.cuda() for t in state)]
            mask = mask.cuda()

            def kernel(x, r, h0, c0, n0, m0):
                return slstm_triton(x, r, (h0, c0, n0, m0), mask)  # noqa: B023 (called within this iteration)

            def reference(x, r, h0, c0, n0, m0):
                h, st = slstm_recurrent(x.float(), r, (h0, c0, n0, m0), mask)  # noqa: B023
                return h.to(x.dtype), st

            with matmul_precision(precision):
                outs = with_grads(kernel, leaves)
            with matmul_precision("highest"):
                refs = with_grads(reference, leaves)
            records.append(compare(f"slstm NH{NH} DH{DH} {dt} B{B} S{S}", outs, refs, SLSTM_TOL[dt]))


def model_configs():
    import xlstm_hf

    common = dict(vocab_size=512, num_hidden_layers=4, chunk_size=64)
    return {
        "paper_with_slstm": xlstm_hf.xLSTMConfig(hidden_size=256, num_heads=4, slstm_at=[1], **common),
        "7b_style": xlstm_hf.xLSTMConfig(architecture="7b", hidden_size=256, num_heads=4, **common),
    }


def check_models(records: list) -> None:
    """Backend equality: three AdamW steps in float32 ("highest") from the same weights, then greedy generation, and
    prompt lookup decoding equal to greedy where transformers has the cache rollback protocol (5.25 on; the lent
    machines' image holds 5.17: recorded as skipped there)."""
    import xlstm_hf
    from xlstm_hf.cache_xlstm import HAS_ROLLBACK_PROTOCOL

    for label, config in model_configs().items():
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (MODEL_BATCH, MODEL_SEQ), generator=g).cuda()
        runs = {}
        for backend in ("torch", "triton"):
            torch.manual_seed(0)
            model = xlstm_hf.xLSTMForCausalLM(config, backend=backend).cuda()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses = []
            with matmul_precision("highest"):
                for _ in range(3):
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    losses.append(loss.item())
                model.eval()
                with torch.no_grad():
                    tokens = model.generate(ids[:2, :32], max_new_tokens=24, do_sample=False)
                    # speculative decoding: the fused step under a recording cache (states kept, then rolled back)
                    lookup = None
                    if HAS_ROLLBACK_PROTOCOL:
                        prompt = ids[:1, :32].repeat(1, 2)
                        greedy = model.generate(prompt, max_new_tokens=24, do_sample=False)
                        fast = model.generate(prompt, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4)
                        lookup = torch.equal(greedy, fast)
            params = torch.cat([p.detach().flatten() for p in model.parameters()])
            runs[backend] = dict(losses=losses, params=params, tokens=tokens, lookup=lookup)
        t, r = runs["triton"], runs["torch"]
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(t["losses"], r["losses"], strict=True))
        param_err = rel_err(t["params"], r["params"])
        same_tokens = torch.equal(t["tokens"], r["tokens"])
        lookup = None if t["lookup"] is None else t["lookup"] and r["lookup"]
        passed = loss_err <= 1e-4 and param_err <= 1e-3 and same_tokens and lookup is not False
        print(f"{'ok' if passed else 'FAIL':4s} model {label:42s} loss rel err {loss_err:.1e}, params {param_err:.1e}, "
              f"tokens equal {same_tokens}, prompt lookup = greedy "
              f"{'skipped (transformers < 5.25)' if lookup is None else lookup}", flush=True)  # fmt: skip
        records.append(
            dict(
                name=f"model {label}",
                losses={k: v["losses"] for k, v in runs.items()},
                loss_rel_err=loss_err,
                param_rel_err=param_err,
                tokens_equal=same_tokens,
                prompt_lookup_equals_greedy=lookup,  # None: skipped, transformers < 5.25 has no cache rollback
                passed=passed,
            )
        )


def time_slstm_tiles(repeats: int) -> list[dict]:
    """sLSTM forward + backward at the paper shape (hidden 1024, 4 heads: DH 256, batch 8, S 2048, bfloat16) with
    the launcher's column tile BN forced to 16, 32 and 64: the compile test picks BN 16 for TF32 dots because wider
    tiles spill up to 72 B of loop invariants; these times say what that costs."""
    from benchmark_kernels import time_ms

    from xlstm_hf import slstm_fused

    B, NH, DH, S = 8, 4, 256, 2048
    x = torch.randn(B, NH, S, 4 * DH, device="cuda", dtype=torch.bfloat16).requires_grad_()
    r = (torch.randn(NH, DH, 4 * DH, device="cuda") * DH**-0.5).requires_grad_()
    chosen = slstm_fused._launch
    rows = []
    for BN in (16, 32, 64):
        slstm_fused._launch = lambda DH, dtype, backward, BN=BN: (16, BN, 8, "tf32")  # (BB, BN, warps, precision)

        def fwdbwd():
            x.grad = r.grad = None
            slstm_fused.slstm_triton(x, r)[0].float().sum().backward()

        try:
            rows.append(dict(BN=BN, ms=time_ms(fwdbwd, repeats, cuda=True)))
        except Exception as e:  # noqa: BLE001 (a tile that fails to compile or launch is a figure too)
            rows.append(dict(BN=BN, error=f"{type(e).__name__}: {str(e)[:200]}"))
        finally:
            slstm_fused._launch = chosen
        print(f"     slstm tiles BN={BN}: {rows[-1]}", flush=True)
    return rows


def run_kernel_tests() -> dict:
    files = ["tests/test_mlstm_chunk.py", "tests/test_mlstm_step.py", "tests/test_slstm_fused.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    print(f"{'ok' if proc.returncode == 0 else 'FAIL':4s} kernel tests on CUDA: {summary}", flush=True)
    return dict(name="kernel tests (pytest, CUDA)", summary=summary, passed=proc.returncode == 0,
                output_tail=proc.stdout[-4000:])  # fmt: skip


def run_vllm_checks(vllm_python: Path | None, bench: bool) -> dict:
    """Issue 22 on CUDA: tests/test_vllm.py (vLLM's greedy tokens and logprobs equal generate()'s, sampling, start-up
    refusals, the OpenAI server) with the vLLM of `vllm_python`, an environment holding the CUDA `vllm` and xlstm_hf
    (README "Serving"); then scripts/benchmark_serving.py --cuda (the 7B shape's decode tokens/s at batch 1 and 64
    against the HBM bound; not with --skip-bench). Skipped, and said so, without such an environment."""
    if vllm_python is None:
        print("skip vLLM checks: no --vllm-python (an environment with vllm and xlstm_hf)", flush=True)
        return dict(name="vLLM (tests/test_vllm.py on CUDA)", skipped="no --vllm-python", passed=True)
    env = {**os.environ, "XLSTM_VLLM_PYTHON": str(vllm_python)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_vllm.py"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    print(f"{'ok' if proc.returncode == 0 else 'FAIL':4s} vLLM exactness on CUDA: {summary}", flush=True)
    record = dict(name="vLLM (tests/test_vllm.py on CUDA)", summary=summary, passed=proc.returncode == 0,
                  output_tail=proc.stdout[-4000:])  # fmt: skip
    if bench:
        run = subprocess.run(
            [str(vllm_python), "scripts/benchmark_serving.py", "--cuda"], cwd=ROOT, capture_output=True, text=True
        )
        serving = ROOT / "benchmarks" / "serving_cuda.json"
        record["serving"] = json.loads(serving.read_text()) if run.returncode == 0 else run.stderr[-4000:]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_check.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-bench", action="store_true", help="correctness checks only")
    parser.add_argument("--vllm-python", type=Path, help="Python of an environment with vllm and xlstm_hf (issue 22)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); this script checks the Triton "
            "kernels on a GPU. On a CPU run the interpreted and compile tests instead: pytest "
            "tests/test_mlstm_chunk.py tests/test_mlstm_step.py tests/test_slstm_fused.py tests/test_kernel_compile.py",
            file=sys.stderr,
        )
        return 2
    import triton

    start = time.perf_counter()
    sections: dict[str, list] = {"kernel_tests": [], "real_shapes": [], "models": [], "vllm": []}
    sections["kernel_tests"].append(run_kernel_tests())
    sections["vllm"].append(run_vllm_checks(args.vllm_python, bench=not args.skip_bench))
    for check in (check_mlstm_chunk, check_mlstm_step, check_slstm):
        try:
            check(sections["real_shapes"])
        except Exception:  # noqa: BLE001 (a crash is a failed check, recorded with its traceback)
            sections["real_shapes"].append(dict(name=check.__name__, passed=False, error=traceback.format_exc()))
            print(f"FAIL {check.__name__}: {traceback.format_exc()}", flush=True)
    try:
        check_models(sections["models"])
    except Exception:  # noqa: BLE001
        sections["models"].append(dict(name="models", passed=False, error=traceback.format_exc()))
        print(f"FAIL models: {traceback.format_exc()}", flush=True)
    bench = dict(results=[], skipped=["--skip-bench"])
    if not args.skip_bench:
        from benchmark_kernels import run_all

        results, skipped = run_all(cuda=True, repeats=args.repeats, quick=True)
        bench = dict(results=results, skipped=skipped, slstm_tiles=time_slstm_tiles(args.repeats))
    passed = all(r["passed"] for rows in sections.values() for r in rows)
    props = torch.cuda.get_device_properties(0)
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=dict(name=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count),
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            triton=triton.__version__,
            cuda=torch.version.cuda,
        ),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        seconds=round(time.perf_counter() - start, 1),
        passed=passed,
        **sections,
        benchmarks=bench,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"{'PASSED' if passed else 'FAILED'} in {report['seconds']} s; wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
