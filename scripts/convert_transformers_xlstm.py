"""Convert a checkpoint of transformers' built-in xLSTM (model_type "xlstm", the NX-AI/xLSTM-7b layout) to xlstm_hf.

    python scripts/convert_transformers_xlstm.py SOURCE OUT [--dtype bfloat16] [--push-to-hub ORG/NAME]

SOURCE is a local directory or a Hub repo id; OUT is the save_pretrained directory written.
"""

import argparse

import torch

import xlstm_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="directory or Hub repo id of a transformers xLSTM checkpoint")
    parser.add_argument("out", help="output directory (save_pretrained)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push the result to this repo")
    args = parser.parse_args()
    kwargs = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    model = xlstm_hf.convert_transformers_xlstm(args.source, args.out, **kwargs)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
    print(f"wrote {args.out}: {model.config.num_hidden_layers} blocks, {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
