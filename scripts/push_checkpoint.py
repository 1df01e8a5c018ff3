"""Push a saved xlstm_hf checkpoint directory (save_pretrained / examples/train.py output) to a Hub repo.

    python scripts/push_checkpoint.py OUT_DIR ORG/NAME [--revision BRANCH] [--private] [--message TEXT]
        [--dataset NAME ...] [--no-card] [--token TOKEN]

The directory is checked first (config.json, safetensors only, no truncated or corrupted file, every shard of the
index, the code files of `auto_map`); a model card (README.md) is written when the directory has none, with the
training arguments and results of `training_args.json` / `all_results.json` when present. Everything goes up in one
commit through huggingface_hub's upload_folder, which shows a progress bar per large file. The token comes from
--token, HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from huggingface_hub.utils import enable_progress_bars

from xlstm_hf.hub import check_checkpoint, push_checkpoint, write_model_card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a directory written by save_pretrained")
    parser.add_argument("repo_id", help="ORG/NAME on the Hub (created if missing)")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--dataset", action="append", default=None, help="training dataset named in the card")
    parser.add_argument("--no-card", action="store_true", help="do not write README.md when it is missing")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    enable_progress_bars()
    start = time.perf_counter()
    files = check_checkpoint(args.directory)
    size = sum(f.stat().st_size for f in files)
    print(f"[1/3] checked {args.directory}: {len(files)} files, {size / 1e6:.1f} MB", flush=True)
    if not args.no_card and (args.dataset or not (args.directory / "README.md").is_file()):
        card = write_model_card(args.directory, repo_id=args.repo_id, datasets=args.dataset)
        print(f"[2/3] wrote the model card {card}", flush=True)
    else:
        print("[2/3] keeping the existing README.md" if not args.no_card else "[2/3] no model card", flush=True)
    print(f"[3/3] uploading to {args.repo_id}" + (f" (branch {args.revision})" if args.revision else ""), flush=True)
    commit = push_checkpoint(
        args.directory,
        args.repo_id,
        token=args.token,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.message,
        create_card=False,
    )
    print(f"done in {time.perf_counter() - start:.1f} s: commit {commit.oid}\n{commit.commit_url}", flush=True)
    return commit.oid


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a damaged or incomplete checkpoint: say what and where, no traceback
        sys.exit(f"error: {e}")
