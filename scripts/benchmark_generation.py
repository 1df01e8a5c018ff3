"""CPU generation benchmark: xlstm_hf against transformers' built-in xLSTM with the same weights.

The tiny xLSTM-7B-style model (hidden 256, 4 blocks, 4 heads, vocab 1024), float32, greedy decoding of 256 new tokens
after a 64-token prompt at batch 1 and 8, for xlstm_hf eager, xlstm_hf with generate()'s `compile_config` (the
decoding step through torch.compile, compiled in the warm-up call, whose time is printed) and transformers; then
xlstm_hf alone at 256 and 4096 new tokens (batch 1) to show that tokens/s stay flat, and the median step time over
the first and the last 256 tokens of one 4096-token call (free of the drift between separate runs on a shared
machine), with the peak memory of the 4096-token run. Writes benchmarks/generation.json and .png. On a CUDA machine it
first runs the xLSTM-7B shape in bfloat16 at batch 1, eager and compiled, against the HBM bound (bytes of weights and
state read per token / the device's bandwidth), into benchmarks/generation_cuda.json. Last, prompt lookup decoding
against plain greedy on a copy task and on one with nothing to copy (`prompt_lookup`; alone with
--prompt-lookup-only, into benchmarks/generation_prompt_lookup.json).

    python scripts/benchmark_generation.py [--repeats 5] [--prompt-lookup-only]
"""

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

import xlstm_hf

ROOT = Path(__file__).resolve().parents[1]
WARMUP_S: dict[tuple[str, int], float] = {}  # the first call of each model and batch size (compiling, for +compile)


def compile_config() -> CompileConfig:
    """transformers' compiled decoding, asked for on every device (it compiles by itself on CUDA only)."""
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    return config


def generate_fn(model, batch: int, new_tokens: int, compiled: bool = False):
    prompt = torch.randint(0, 1024, (batch, 64))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:
        kwargs["compile_config"] = compile_config()

    def run() -> None:
        out = model.generate(prompt, **kwargs)
        assert out.shape[1] == 64 + new_tokens

    return run


def tokens_per_s(models: dict, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Generated tokens/s of each model (median of `repeats`), the models taking turns within every repeat so that a
    noisy neighbour on the machine slows them alike. The first call of each is a warm-up."""
    fns = {name: generate_fn(m, batch, new_tokens, compiled=name.endswith("+compile")) for name, m in models.items()}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        WARMUP_S[(name, batch)] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: batch * new_tokens / statistics.median(ts) for name, ts in times.items()}


def step_times(model, new_tokens: int, window: int) -> list[float]:
    """Median time between consecutive decoding steps in each `window` of tokens of one generate() call (batch 1): a
    step that got slower as the context grows would show as a trend across the windows, apart from the drift of a
    shared machine, which moves them up and down."""
    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    prompt = torch.randint(0, 1024, (1, 64))
    model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([Clock()]),
    )
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return [statistics.median(steps[lo : lo + window]) for lo in range(0, len(steps), window)]


def hbm_bandwidth_gbs(device: torch.device) -> float | None:
    """Peak memory bandwidth of a CUDA device from its clock and bus width (double data rate), or None where torch does
    not report them."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return None if not clock_khz or not bus_bits else 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def decode_against_hbm(model, bandwidth_gbs: float | None, new_tokens: int = 256) -> dict:
    """Batch-1 greedy decoding of `model` (on its device) eager and through generate()'s compiled step (which
    transformers turns on by itself on CUDA), against the HBM bound: every decoding step reads the weights and the
    recurrent state at least once, so tokens/s <= bandwidth / (weight bytes + state bytes)."""
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    out = {}
    for name, extra in (("eager", {"disable_compile": True}), ("compiled", {"compile_config": compile_config()})):
        model.generate(prompt, **kwargs, **extra)  # warm-up (compiles the step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = model.generate(prompt, **kwargs, **extra, return_dict_in_generate=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = new_tokens / (time.perf_counter() - start)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out["bytes_per_token"] = weight_bytes + result.cache.nbytes
    if bandwidth_gbs:
        out["hbm_bound_tokens_per_s"] = bandwidth_gbs * 1e9 / out["bytes_per_token"]
    return out


def cuda_7b(bandwidth_gbs: float | None) -> dict:
    """The xLSTM-7B shape in bfloat16 on the current CUDA device (random weights: speed does not depend on them)."""
    config = xlstm_hf.xLSTMConfig(
        architecture="7b", vocab_size=50304, hidden_size=4096, num_hidden_layers=32, num_heads=8, pad_token_id=0
    )
    with torch.device("cuda"):
        model = xlstm_hf.xLSTMForCausalLM(config).to(torch.bfloat16).eval()
    bandwidth_gbs = bandwidth_gbs or hbm_bandwidth_gbs(torch.device("cuda"))
    return {
        "device": torch.cuda.get_device_name(),
        "bandwidth_gbs": bandwidth_gbs,
        **decode_against_hbm(model, bandwidth_gbs),
    }


def short_memory_7b() -> xlstm_hf.xLSTMForCausalLM:
    """A 7B-style model (hidden 512, 6 blocks, 4 heads, vocab 32000, float32) whose forget gates are shut (bias
    -30, about -13 after the soft cap): each block's state holds only the current token, so greedy decoding is a
    function of the last token, and the model re-emits any text it produced once, as a code model re-emits an
    unchanged file. Random otherwise (the timing does not depend on the weights)."""
    torch.manual_seed(0)
    config = xlstm_hf.xLSTMConfig(
        architecture="7b", vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_heads=4, pad_token_id=0
    )
    model = xlstm_hf.xLSTMForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for block in model.backbone.blocks:
            block.mlstm_layer.fgate_preact.bias.fill_(-30.0)
    return model


def prompt_lookup(repeats: int, new_tokens: int = 256, lookup: int = 10) -> dict:
    """Prompt lookup decoding (`prompt_lookup_num_tokens`) against plain greedy at batch 1, the same tokens out, on
    two prompts: "copy", a 512-token text the model wrote (its greedy output) followed by its first 8 tokens again,
    which the model then copies on; "no copy", 520 random tokens, whose continuation is nowhere in the prompt. The
    acceptance rate is the share of looked-up candidates that the verification forwards accepted."""
    model = short_memory_7b()
    seed = torch.randint(1, 32000, (1, 1))
    text = model.generate(seed, max_new_tokens=512, min_new_tokens=512, do_sample=False)[:, 1:]
    prompts = {"copy": torch.cat([text, text[:, :8]], dim=1), "no copy": torch.randint(1, 32000, (1, 520))}
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    out = {}
    for task, prompt in prompts.items():
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        runs = {"greedy": {}, "prompt lookup": {"prompt_lookup_num_tokens": lookup}}
        tokens, times = {}, {name: [] for name in runs}
        for name, extra in runs.items():
            tokens[name] = model.generate(prompt, **kwargs, **extra)  # warm-up, and the tokens to compare
        lengths.clear()
        model.generate(prompt, **kwargs, **runs["prompt lookup"])
        # candidates verified: those after the prompt in the first forward, all but one token of each later one
        forwards, verified = len(lengths), lengths[0] - prompt.shape[1] + sum(n - 1 for n in lengths[1:])
        for _ in range(repeats):
            for name, extra in runs.items():
                start = time.perf_counter()
                model.generate(prompt, **kwargs, **extra)
                times[name].append(time.perf_counter() - start)
        rate = {name: new_tokens / statistics.median(ts) for name, ts in times.items()}
        out[task] = {
            **rate,
            "speedup": rate["prompt lookup"] / rate["greedy"],
            "same_tokens": bool(torch.equal(tokens["greedy"], tokens["prompt lookup"])),
            "forwards": forwards,
            # every forward gives one token beyond the candidates it accepts
            "acceptance_rate": (new_tokens - forwards) / verified if verified else 0.0,
        }
    return out


def print_prompt_lookup(r: dict) -> None:
    for task, t in r.items():
        print(
            f"prompt lookup, {task}: {t['prompt lookup']:.0f} tok/s against greedy {t['greedy']:.0f} tok/s "
            f"({t['speedup']:.2f}x), same tokens: {t['same_tokens']}, {t['forwards']} forwards for 256 tokens, "
            f"acceptance {t['acceptance_rate']:.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "generation.json")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="HBM bandwidth, if torch does not report it")
    parser.add_argument("--prompt-lookup-only", action="store_true", help="only the prompt lookup comparison")
    args = parser.parse_args()
    if args.prompt_lookup_only:
        r = prompt_lookup(args.repeats)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name("generation_prompt_lookup.json").write_text(json.dumps(r, indent=2))
        return print_prompt_lookup(r)
    if torch.cuda.is_available():
        r = cuda_7b(args.bandwidth_gbs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name("generation_cuda.json").write_text(json.dumps(r, indent=2))
        bound = r.get("hbm_bound_tokens_per_s")
        print(
            f"{r['device']}, xLSTM-7B bf16, batch 1: eager {r['eager']:.1f} tok/s, compiled {r['compiled']:.1f} tok/s"
            + (f", HBM bound {bound:.1f} tok/s ({r['compiled'] / bound:.0%} of it)" if bound else "")
            + f"; {r['bytes_per_token'] / 1e9:.2f} GB read per token (published with CUDA graphs: 157 tok/s)"
        )
    torch.manual_seed(0)
    from transformers.models.xlstm import xLSTMConfig, xLSTMForCausalLM

    theirs = xLSTMForCausalLM(
        xLSTMConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_heads=4, mode="inference")
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp).eval()

    results: dict = {"setup": {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}}
    for batch in (1, 8):
        models = {"xlstm_hf": ours, "xlstm_hf+compile": ours, "transformers": theirs}
        r = tokens_per_s(models, batch, 256, args.repeats)
        r["speedup"] = r["xlstm_hf"] / r["transformers"]
        r["speedup_compiled"] = r["xlstm_hf+compile"] / r["transformers"]
        r["compile_warmup_s"] = WARMUP_S[("xlstm_hf+compile", batch)]
        results[f"batch{batch}_256"] = r
    flat = {n: tokens_per_s({"m": ours}, 1, n, 1)["m"] for n in (256, 4096)}
    windows = step_times(ours, 4096, window=512)
    results["xlstm_hf_flatness"] = {
        **{str(k): v for k, v in flat.items()},
        "ratio_4096_to_256": flat[4096] / flat[256],
        "step_ms_per_512_tokens": [t * 1e3 for t in windows],
        "step_ratio_last_to_first_window": windows[-1] / windows[0],
    }
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["prompt_lookup"] = prompt_lookup(args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        labels = ["B=1", "B=8"]
        for j, name in enumerate(("xlstm_hf", "xlstm_hf+compile", "transformers")):
            vals = [results[f"batch{b}_256"][name] for b in (1, 8)]
            ax.bar([x + 0.27 * j for x in range(2)], vals, width=0.27, label=name)
        ax.set_xticks([0.27, 1.27], labels)
        ax.set_ylabel("generated tokens/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"))
    except ImportError:
        pass

    for batch in (1, 8):
        r = results[f"batch{batch}_256"]
        print(
            f"batch {batch}, 256 new tokens: xlstm_hf {r['xlstm_hf']:.0f} tok/s ({r['speedup']:.2f}x), "
            f"xlstm_hf+compile {r['xlstm_hf+compile']:.0f} tok/s ({r['speedup_compiled']:.2f}x, first call with "
            f"compiling {r['compile_warmup_s']:.1f} s), transformers {r['transformers']:.0f} tok/s "
            "(targets: eager no slower, compiled >= 2x at batch 1)"
        )
    f = results["xlstm_hf_flatness"]
    print(
        f"xlstm_hf batch 1: {f['256']:.0f} tok/s at 256 new tokens, {f['4096']:.0f} tok/s at 4096 "
        f"(ratio {f['ratio_4096_to_256']:.2f}, separate runs, target within 10%); median step per 512 tokens of "
        f"the 4096-token run: {' '.join(f'{t:.2f}' for t in f['step_ms_per_512_tokens'])} ms (last / first "
        f"{f['step_ratio_last_to_first_window']:.2f}); peak RSS "
        f"{results['peak_rss_mb']:.0f} MB"
    )
    print_prompt_lookup(results["prompt_lookup"])


if __name__ == "__main__":
    main()
