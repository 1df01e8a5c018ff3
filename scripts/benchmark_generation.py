"""CPU generation benchmark: xlstm_hf against transformers' built-in xLSTM with the same weights.

The tiny xLSTM-7B-style model (hidden 256, 4 blocks, 4 heads, vocab 1024), float32, greedy decoding of 256 new tokens
after a 64-token prompt at batch 1 and 8, for xlstm_hf eager, xlstm_hf with `compile_decode=True` (each decoding step
through torch.compile; compiled during the warm-up) and transformers; then xlstm_hf alone at 256 and 4096 new tokens
(batch 1) to show that tokens/s stay flat, with the peak memory of the 4096-token run. Writes
benchmarks/generation.json and .png.

    python scripts/benchmark_generation.py [--repeats 3]
"""

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

import xlstm_hf

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_s(model, batch: int, new_tokens: int, repeats: int) -> float:
    prompt = torch.randint(0, 1024, (batch, 64))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(prompt, **kwargs)  # warm-up (and, with compile_decode, compilation for this batch size)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        times.append(time.perf_counter() - start)
        assert out.shape[1] == 64 + new_tokens
    return batch * new_tokens / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "generation.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers.models.xlstm import xLSTMConfig, xLSTMForCausalLM

    theirs = xLSTMForCausalLM(
        xLSTMConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_heads=4, mode="inference")
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp).eval()
        compiled = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp, compile_decode=True).eval()

    results: dict = {"setup": {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}}
    for batch in (1, 8):
        models = (("xlstm_hf", ours), ("xlstm_hf+compile", compiled), ("transformers", theirs))
        r = {name: tokens_per_s(m, batch, 256, args.repeats) for name, m in models}
        r["speedup"] = r["xlstm_hf"] / r["transformers"]
        r["speedup_compiled"] = r["xlstm_hf+compile"] / r["transformers"]
        results[f"batch{batch}_256"] = r
    flat = {n: tokens_per_s(compiled, 1, n, 1) for n in (256, 4096)}
    results["xlstm_hf_flatness"] = {**{str(k): v for k, v in flat.items()}, "ratio_4096_to_256": flat[4096] / flat[256]}
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
            f"xlstm_hf+compile {r['xlstm_hf+compile']:.0f} tok/s ({r['speedup_compiled']:.2f}x), "
            f"transformers {r['transformers']:.0f} tok/s" + (" (target >= 2x)" if batch == 1 else "")
        )
    f = results["xlstm_hf_flatness"]
    print(
        f"xlstm_hf+compile batch 1: {f['256']:.0f} tok/s at 256 new tokens, {f['4096']:.0f} tok/s at 4096 "
        f"(ratio {f['ratio_4096_to_256']:.2f}, target within 10%); peak RSS {results['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
