"""Hugging Face Hub helpers: a model card for xLSTM checkpoints and a one-commit push of a saved directory.

Not imported by the modeling files (nor copied to the Hub with them): the Hub export needs only the model code.

    card = model_card(config, repo_id="org/name", num_parameters=n)   # a huggingface_hub.ModelCard
    write_model_card("out/")                                         # README.md from out/config.json + weights
    push_checkpoint("out/", "org/name")                              # validate, card, create repo, upload_folder
    push_model(model, "org/name", tokenizer=tok, datasets=[...])     # save + card + push in one commit

`model.push_to_hub` (transformers) works too, with transformers' template card instead of this one.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData

from .configuration_xlstm import xLSTMConfig

# Pickle-based weight formats never travel: a directory holding one is refused, and stray ones are not uploaded.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
# Trainer output that is not part of a model repo.
IGNORE_PATTERNS = (*PICKLE_PATTERNS, ".git/*", "**/__pycache__/*", "checkpoint-*/*", "runs/*", "*.lock")
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def block_pattern(config: xLSTMConfig) -> str:
    """The papers' notation: ``xLSTM[a:b]`` (mLSTM:sLSTM ratio) for ``"paper"`` stacks, ``xLSTM-7B`` otherwise."""
    if config.architecture != "paper":
        return "xLSTM-7B layout"
    types = config.block_types
    m, s = types.count("m"), types.count("s")
    g = math.gcd(m, s)
    return f"xLSTM[{m // g}:{s // g}]"


def count_parameters(config: xLSTMConfig) -> int:
    """Parameters of `xLSTMForCausalLM(config)`, tied weights counted once, without allocating them."""
    import torch

    from .modeling_xlstm import xLSTMForCausalLM

    with torch.device("meta"):
        model = xLSTMForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size.

    Raises ValueError naming the file when the file is truncated, padded or its header is not valid, so a damaged
    checkpoint is stopped before it is uploaded or loaded.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupted safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupted safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            expected = math.prod(info["shape"]) * SAFETENSORS_DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupted safetensors header entry {name!r}") from e
        if stop - start != expected:
            raise ValueError(f"{path}: tensor {name!r} spans {stop - start} bytes, its shape needs {expected}")
        end = max(end, stop)
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "padded"
        raise ValueError(f"{path}: {state} safetensors file ({size} bytes, the header describes {8 + n + end})")
    return header


def count_checkpoint_parameters(directory: str | Path) -> int:
    """Parameters stored in the safetensors files of a saved checkpoint (tied weights are stored once)."""
    total = 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        header = read_safetensors_header(path)
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def model_card(
    config: xLSTMConfig,
    *,
    repo_id: str,
    num_parameters: int | None = None,
    training_arguments: Mapping[str, Any] | None = None,
    datasets: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    license: str | None = None,
    description: str | None = None,
) -> ModelCard:
    """A model card: architecture (block pattern, sizes, parameter count), how to load it with and without
    `xlstm_hf`, and the training data, arguments and results when given."""
    num_parameters = count_parameters(config) if num_parameters is None else num_parameters
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["xlstm", "xlstm_hf", "recurrent", "custom_code"],
        license=license,
        datasets=list(datasets) if datasets else None,
    )
    types = config.block_types
    rows = [
        ("Architecture", f"`{config.architecture}`: {block_pattern(config)}"),
        ("Blocks", f"{config.num_hidden_layers} (`{''.join(types)}`, m = mLSTM, s = sLSTM)"),
        ("sLSTM blocks at", ", ".join(map(str, config.slstm_at)) or "none"),
        ("Hidden size", config.hidden_size),
        ("mLSTM heads", f"{config.num_heads} (q/k head dim {config.qk_head_dim}, v head dim {config.v_head_dim})"),
        ("Feed-forward width", config.ffn_dim),
        ("Vocabulary", config.vocab_size),
        ("Parameters", _format_count(num_parameters)),
        ("Tied embeddings", config.tie_word_embeddings),
        ("Weights dtype", str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")),
        ("Context", "unbounded: a recurrent state of constant size per sequence"),
    ]
    if "s" in types:
        rows.insert(5, ("sLSTM heads", config.slstm_num_heads))
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        description or f"An xLSTM language model ({block_pattern(config)}) in the `xlstm_hf` format for transformers.",
        "",
        "## Architecture",
        "",
        _table(rows),
        "",
        "## How to load",
        "",
        "With the `xlstm_hf` package installed (`import xlstm_hf` registers the model with the Auto classes):",
        "",
        "```python",
        "import xlstm_hf",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
        "Without it, the modeling code stored in this repository is used (read it before trusting it):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)  # reads config.json too',
        "```",
        "",
        "On CPU the PyTorch reference path runs; with CUDA and Triton available the kernels are used.",
    ]
    if datasets or training_arguments or metrics:
        lines += ["", "## Training", ""]
        if datasets:
            lines += ["Data: " + ", ".join(f"`{d}`" for d in datasets), ""]
        if training_arguments:
            lines += ["Arguments:", "", _table([(f"`{k}`", f"`{v}`") for k, v in training_arguments.items()]), ""]
        if metrics:
            lines += ["Results:", "", _table([(f"`{k}`", v) for k, v in metrics.items()]), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_model_card(
    directory: str | Path,
    *,
    repo_id: str | None = None,
    training_arguments: Mapping[str, Any] | None = None,
    datasets: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Path:
    """Write README.md into a saved checkpoint directory, from its config.json and safetensors files.

    `training_args.json` and `all_results.json` in the directory (written by `examples/train.py`) fill the training
    section unless `training_arguments` / `metrics` are given.
    """
    directory = Path(directory)
    config = xLSTMConfig.from_pretrained(directory)
    training_arguments = training_arguments or _read_json(directory / "training_args.json")
    metrics = metrics or _read_json(directory / "all_results.json")
    card = model_card(
        config,
        repo_id=repo_id or directory.resolve().name,
        num_parameters=count_checkpoint_parameters(directory),
        training_arguments=training_arguments,
        datasets=datasets,
        metrics=metrics,
        **kwargs,
    )
    path = directory / "README.md"
    card.save(path)
    return path


def check_checkpoint(directory: str | Path) -> list[Path]:
    """The files that a push would upload, after checking that the directory is a loadable safetensors checkpoint.

    Raises ValueError when config.json is missing, when the weights are only in a pickle format, when a safetensors
    file is truncated or corrupted, when the index names a missing shard, or when a code file of `auto_map` is absent.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory}: no config.json, not a saved model directory")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern))
        found = f" (found {', '.join(pickles)}: re-save with safe_serialization)" if pickles else ""
        raise ValueError(f"{directory}: no safetensors weights{found}; weights are pushed only as safetensors")
    for path in weights:
        read_safetensors_header(path)
    index = _read_json(directory / "model.safetensors.index.json")
    if index is not None:
        missing = sorted({f for f in index["weight_map"].values() if not (directory / f).is_file()})
        if missing:
            raise ValueError(f"{directory}: the index names missing shards {missing}")
    auto_map = (_read_json(directory / "config.json") or {}).get("auto_map", {})
    for reference in auto_map.values():
        for ref in reference if isinstance(reference, list) else [reference]:
            if ref and not (directory / f"{ref.split('--')[-1].rsplit('.', 1)[0]}.py").is_file():
                raise ValueError(f"{directory}: auto_map names {ref} but its module file is missing")
    ignored = {p for pattern in IGNORE_PATTERNS for p in directory.glob(pattern)}
    return sorted(p for p in directory.rglob("*") if p.is_file() and p not in ignored and "__pycache__" not in p.parts)


def push_checkpoint(
    directory: str | Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_card: bool = True,
    api: HfApi | None = None,
) -> CommitInfo:
    """Upload a saved checkpoint directory to a Hub repo in one commit (creating the repo and branch if needed).

    The directory is checked first (`check_checkpoint`); a README.md is generated when absent and `create_card`.
    Pickle files and Trainer leftovers (`checkpoint-*`, `runs/`) are not uploaded. huggingface_hub shows progress
    bars for the large files.
    """
    api = api or HfApi()
    directory = Path(directory)
    check_checkpoint(directory)
    if create_card and not (directory / "README.md").is_file():
        write_model_card(directory, repo_id=repo_id)
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=directory,
        token=token,
        revision=revision,
        commit_message=commit_message or f"Upload xLSTM checkpoint from {directory.resolve().name}",
        ignore_patterns=list(IGNORE_PATTERNS),
    )


def push_model(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    training_arguments: Mapping[str, Any] | None = None,
    datasets: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    **push_kwargs: Any,
) -> CommitInfo:
    """Save `model` (and `tokenizer`) with a model card and push them in one commit (see `push_checkpoint`)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_model_card(
            tmp, repo_id=repo_id, training_arguments=training_arguments, datasets=datasets, metrics=metrics
        )
        return push_checkpoint(tmp, repo_id, **push_kwargs)
