"""Generate text with a saved xLSTM (examples/train.py's output directory, or any xlstm_hf checkpoint).

    python examples/generate.py xlstm-pydoc --prompt "The for statement" --max_new_tokens 100
    python examples/generate.py xlstm-pydoc --prompt "A list" --prompt "A dict" --num_beams 4   # a left-padded batch

The recurrent state is constant in size, so the cost per new token does not grow with the text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import xlstm_hf  # noqa: E402, F401  (registers model_type "xlstm_hf" with the Auto classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a directory (or Hub id) holding the model and its tokenizer")
    parser.add_argument("--prompt", action="append", help="repeat for a batch (default: one prompt)")
    parser.add_argument("--max_new_tokens", type=int, default=80)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=40)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    prompts = args.prompt or ["The with statement"]
    # examples/train.py starts every document with the end-of-text token
    batch = tokenizer([tokenizer.eos_token + p for p in prompts], return_tensors="pt", padding=True)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k) if not args.greedy else {}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    seconds = time.perf_counter() - start
    new_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    for row in out:
        print(tokenizer.decode(row, skip_special_tokens=True))
        print("-" * 40)
    print(f"{new_tokens} new tokens in {seconds:.2f} s ({new_tokens / seconds:.0f} tokens/s)")


if __name__ == "__main__":
    main()
