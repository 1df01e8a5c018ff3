"""Train an xLSTM language model with the Hugging Face Trainer, evaluate it, save it and generate a sample.

    python examples/train.py                                   # the main job: < 10 min on 2 CPU cores, no download
    python examples/train.py --preset 125m --architecture paper71 --dataset_name Salesforce/wikitext \
        --dataset_config wikitext-103-raw-v1 --tokenizer gpt2 --bf16 --max_steps 20000
    torchrun --nproc_per_node 8 examples/train.py --preset 350m ...       # DDP (`accelerate launch` works the same)
    torchrun --nproc_per_node 8 examples/train.py --context_parallel_size 4 --block_size 131072 ...  # 2 (DP) x 4 (CP)

With no data argument the text is Python's own documentation topics (`pydoc_data.topics`, shipped with every CPython,
about 465 KB of English), one document per topic; with no `--tokenizer` a byte-level BPE is trained on the training
split and saved beside the model as a PreTrainedTokenizerFast. Documents are packed into full rows of `--block_size`
tokens, each document starting from an empty recurrent state (`position_ids` restart at 0, as transformers'
DataCollatorWithFlattening marks them), so no padding is computed. Every TrainingArguments flag works
(`--gradient_checkpointing`, passed on as `--activation_checkpointing`, `--gradient_accumulation_steps`, `--bf16`,
`--torch_compile`, `--resume_from_checkpoint`, `--fsdp`, ...); the defaults below are the main job's.

`--context_parallel_size N` splits every row over N processes along the sequence (xlstm_hf/context_parallel.py): the
world is a (data parallel) x (context parallel) mesh with the N ranks of a row adjacent, each data-parallel group of N
reads one batch, and `ContextParallelTrainer` hands each rank its slice. transformers' own context parallelism cannot
carry it: it refuses any model without SDPA attention, and accelerate's `cp_size` shards attention's buffers for ring
attention over SDPA (torch's `context_parallel`), which an xLSTM does not call.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import xlstm_hf  # noqa: E402
from xlstm_hf.context_parallel import disable_context_parallel, enable_context_parallel, shard_batch  # noqa: E402

EOT = "<|endoftext|>"

# 125m .. 1.3b are the paper's model sizes (Beck et al., 2024: 24 blocks of width 768, 1024 and 1536, 48 blocks of
# width 2048, 4 heads, context 2048); tiny and small fit a CPU. The training arguments are defaults that the command
# line overrides.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        # ~110k tokens of training text: about 11 epochs, which dropout keeps from overfitting
        model=dict(hidden_size=128, num_hidden_layers=4, num_heads=4, dropout=0.1),
        block_size=256,
        args=dict(learning_rate=2e-3, per_device_train_batch_size=16, max_steps=300, warmup_steps=30),
    ),
    "small": dict(
        model=dict(hidden_size=256, num_hidden_layers=8, num_heads=4, dropout=0.1),
        block_size=512,
        args=dict(learning_rate=3e-3, per_device_train_batch_size=16, max_steps=2000, warmup_steps=100),
    ),
    "125m": dict(
        model=dict(hidden_size=768, num_hidden_layers=24, num_heads=4),
        block_size=2048,
        args=dict(learning_rate=3e-3, per_device_train_batch_size=16, max_steps=20000, warmup_steps=750),
    ),
    "350m": dict(
        model=dict(hidden_size=1024, num_hidden_layers=24, num_heads=4),
        block_size=2048,
        args=dict(learning_rate=1.5e-3, per_device_train_batch_size=16, max_steps=20000, warmup_steps=750),
    ),
    "760m": dict(
        model=dict(hidden_size=1536, num_hidden_layers=24, num_heads=4),
        block_size=2048,
        args=dict(learning_rate=1.25e-3, per_device_train_batch_size=16, max_steps=20000, warmup_steps=750),
    ),
    "1.3b": dict(
        model=dict(hidden_size=2048, num_hidden_layers=48, num_heads=4),
        block_size=2048,
        args=dict(learning_rate=1e-3, per_device_train_batch_size=16, max_steps=20000, warmup_steps=750),
    ),
}

ARCHITECTURES = ("paper10", "paper71", "7b")


@dataclass
class ScriptArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "a dataset on the Hub (datasets.load_dataset)"})
    dataset_config: str | None = field(default=None, metadata={"help": "its configuration name"})
    train_file: str | None = field(default=None, metadata={"help": "a local .txt (one document per line) or .jsonl"})
    validation_file: str | None = field(default=None, metadata={"help": "local held-out data (same format)"})
    text_column: str = field(default="text", metadata={"help": "the column holding the text"})
    eval_fraction: float = field(default=0.1, metadata={"help": "documents held out when there is no validation set"})
    tokenizer: str | None = field(default=None, metadata={"help": "a Hub or local tokenizer; default: train a BPE"})
    bpe_vocab_size: int = field(default=1024, metadata={"help": "vocabulary of the BPE trained without --tokenizer"})
    preset: str = field(default="tiny", metadata={"help": f"model size: {', '.join(PRESETS)}"})
    architecture: str = field(
        default="paper10",
        metadata={"help": "paper10: xLSTM[1:0] (mLSTM only); paper71: xLSTM[7:1] (one sLSTM block in eight); 7b"},
    )
    config_file: str | None = field(default=None, metadata={"help": "an xLSTMConfig JSON; replaces --preset's model"})
    config_overrides: str | None = field(
        default=None, metadata={"help": "comma-separated config fields, e.g. 'hidden_size=64,num_hidden_layers=2'"}
    )
    block_size: int | None = field(default=None, metadata={"help": "tokens per training row (default: the preset's)"})
    packing: bool = field(
        default=True,
        metadata={"help": "reset the state at document boundaries; --no_packing concatenates documents instead"},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "keep only the first N training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep only the first N evaluation rows"})
    prompt: str = field(default="The with statement", metadata={"help": "prompt of the sample generated at the end"})
    max_new_tokens: int = field(default=80, metadata={"help": "length of the sample"})
    backend: str = field(
        default="auto", metadata={"help": "the recurrences' implementation: auto (Triton on CUDA), triton or torch"}
    )
    context_parallel_size: int = field(
        default=1,
        metadata={"help": "split every row over this many processes along the sequence (a divisor of the world size)"},
    )
    push_to_repo: str | None = field(
        default=None,
        metadata={"help": "push model, tokenizer and a model card (with these arguments and results) to this Hub repo"},
    )


def parse_args() -> tuple[ScriptArguments, TrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    preset = PRESETS.get(_preset_from_argv(sys.argv[1:]), PRESETS["tiny"])
    parser.set_defaults(
        output_dir="xlstm-pydoc",
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=50,
        save_strategy="no",
        eval_strategy="no",
        per_device_eval_batch_size=16,
        report_to="none",
        seed=0,
        **preset["args"],
    )
    script_args, training_args = parser.parse_args_into_dataclasses(args=renamed_flags(sys.argv[1:]))
    if script_args.preset not in PRESETS:
        parser.error(f"--preset {script_args.preset!r}: expected one of {list(PRESETS)}")
    if script_args.architecture not in ARCHITECTURES:
        parser.error(f"--architecture {script_args.architecture!r}: expected one of {list(ARCHITECTURES)}")
    return script_args, training_args


# transformers 5.23 renamed TrainingArguments' gradient_checkpointing* to activation_checkpointing* and warns that the
# old names are deprecated: the flags this script has always documented are passed on under the new names there.
RENAMED_FLAGS = (
    {
        "--gradient_checkpointing": "--activation_checkpointing",
        "--gradient_checkpointing_kwargs": "--activation_checkpointing_kwargs",
    }
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else {}
)


def renamed_flags(argv: list[str]) -> list[str]:
    """`argv` with the old names of RENAMED_FLAGS replaced (`--flag value` and `--flag=value` alike)."""
    renamed = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        renamed.append(RENAMED_FLAGS.get(flag, flag) + eq + value)
    return renamed


def _preset_from_argv(argv: list[str]) -> str:
    for idx, arg in enumerate(argv):
        if arg == "--preset" and idx + 1 < len(argv):
            return argv[idx + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return "tiny"


def load_text(args: ScriptArguments, seed: int) -> datasets.DatasetDict:
    """{"train", "validation"} with a `text` column of documents."""
    if args.dataset_name is not None:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config)
    elif args.train_file is not None:
        files = {"train": args.train_file}
        if args.validation_file is not None:
            files["validation"] = args.validation_file
        kind = "json" if args.train_file.endswith((".json", ".jsonl")) else "text"
        raw = datasets.load_dataset(kind, data_files=files, **({"sample_by": "line"} if kind == "text" else {}))
    else:
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": pydoc_topics()})})
    if args.text_column != "text":
        raw = raw.rename_column(args.text_column, "text")
    raw = raw.filter(lambda ex: bool(ex["text"] and ex["text"].strip()))
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=args.eval_fraction, seed=seed)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return datasets.DatasetDict({"train": raw["train"], "validation": raw["validation"]})


def pydoc_topics() -> list[str]:
    """The topics of Python's documentation, one document each. A fifth of the paragraphs appear in several topics
    (a statement's grammar under both its keyword and its name): each is kept only where it first appears, so that the
    held-out documents share no text with the training ones."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    docs = []
    for text in topics.values():
        kept = []
        for paragraph in text.split("\n\n"):
            key = paragraph.strip()
            if key and key not in seen:
                seen.add(key)
                kept.append(paragraph)
        docs.append("\n\n".join(kept))
    return docs


def train_bpe(texts: datasets.Dataset, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: every byte is a token, so no text is out of vocabulary) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts["text"]), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT)


def get_tokenizer(args: ScriptArguments, train_text: datasets.Dataset, training_args: TrainingArguments):
    if args.tokenizer is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        path = Path(training_args.output_dir) / "tokenizer"
        with training_args.main_process_first(desc="train the BPE"):
            if training_args.process_index == 0:
                train_bpe(train_text, args.bpe_vocab_size).save_pretrained(path)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--tokenizer {args.tokenizer}: an end-of-text token is needed to separate documents")
    return tokenizer


def pack(batch: dict[str, list], block_size: int, packing: bool) -> dict[str, list]:
    """Token lists of documents -> rows of exactly `block_size` tokens (the tail of the stream is dropped).

    Every document is preceded by the end-of-text token. With `packing`, `position_ids` count from 0 at each document
    (the model starts it from an empty state) and the label of that first token is -100: it would be predicted across
    the boundary. Without, documents simply follow one another, as in transformers' run_clm.py."""
    ids = [t for doc in batch["ids"] for t in doc]
    positions = [p for doc in batch["ids"] for p in range(len(doc))]
    n = len(ids) // block_size * block_size
    rows = {"input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)]}
    if packing:
        rows["position_ids"] = [positions[i : i + block_size] for i in range(0, n, block_size)]
        rows["labels"] = [
            [-100 if p == 0 else t for t, p in zip(r, q, strict=True)]
            for r, q in zip(rows["input_ids"], rows["position_ids"], strict=True)
        ]
    else:
        rows["labels"] = [list(r) for r in rows["input_ids"]]
    return rows


def tokenize_and_pack(
    raw: datasets.DatasetDict, tokenizer, block_size: int, packing: bool, training_args: TrainingArguments
) -> datasets.DatasetDict:
    eot = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [[eot, *doc] for doc in enc]}

    with training_args.main_process_first(desc="tokenize and pack"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
        return tokenized.map(
            pack, batched=True, remove_columns=["ids"], fn_kwargs=dict(block_size=block_size, packing=packing)
        )


def build_config(args: ScriptArguments, vocab_size: int, tokenizer) -> xlstm_hf.xLSTMConfig:
    if args.config_file is not None:
        fields = json.loads(Path(args.config_file).read_text())
    else:
        fields = dict(PRESETS[args.preset]["model"])
        fields["architecture"] = "7b" if args.architecture == "7b" else "paper"
        if args.architecture == "paper71":
            # one sLSTM block in every eight, as xLSTM[7:1]; at least one in a shorter stack
            L = fields["num_hidden_layers"]
            fields["slstm_at"] = list(range(7, L, 8)) or [L // 2]
    for item in filter(None, re.split(r",(?![^\[]*\])", args.config_overrides or "")):  # commas outside [...]
        key, value = item.split("=", 1)
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value.strip()  # a bare string, e.g. ffn_activation=silu
    fields.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return xlstm_hf.xLSTMConfig(**fields)


def unigram_perplexity(train: datasets.Dataset, eval_set: datasets.Dataset, vocab_size: int) -> float:
    """Perplexity on the evaluation targets of token frequencies counted on the training rows (add-one smoothed):
    the baseline that a model must beat to have learnt anything beyond the token distribution."""
    counts = Counter(t for row in train["input_ids"] for t in row)
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for row in eval_set["labels"]:
        for t in row[1:]:  # the loss shifts: position 0 is never a target
            if t != -100:
                nll -= math.log((counts[t] + 1) / total)
                n += 1
    return math.exp(nll / n)


def count_sharded_blocks(model: torch.nn.Module) -> int:
    """Blocks that FSDP wrapped as units of their own (by the model's `_no_split_modules`)."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) and isinstance(m, xlstm_hf.modeling_xlstm.xLSTMBlock) for m in model.modules())


def scored_tokens(data: datasets.Dataset) -> int:
    return sum(sum(t != -100 for t in row[1:]) for row in data["labels"])


class ContextParallelTrainer(Trainer):
    """The Trainer with every row split over the ranks of `mesh["cp"]` along the sequence.

    - data: accelerate deals the batches over all processes; here over the data-parallel groups, so the ranks of one
      cp group read the same rows (the Trainer itself re-deals its `BatchRebalanceSampler` the same way);
    - inputs: each rank keeps its slice of every [B, S] tensor (`shift_labels` made first, transformers' CP contract);
    - loss: `get_cp_size` is transformers' hook for ranks that share a batch: `num_items_in_batch` (counted on the
      whole rows, then summed over all processes) is divided by it, so that each rank's loss is its tokens' share of
      the batch's and the ranks' gradients, averaged by DDP and scaled back by the Trainer, are the batch's;
    - evaluation: the loss of the whole rows (the ranks' shares summed over the cp group); no logits are gathered.
    """

    def __init__(self, *args: Any, mesh: Any, **kwargs: Any):
        self.mesh = mesh
        super().__init__(*args, **kwargs)
        if not self.args.average_tokens_across_devices:
            raise ValueError("--context_parallel_size needs --average_tokens_across_devices (the loss's divisor)")

    def get_cp_size(self) -> int:
        return self.mesh["cp"].size()

    def _get_dataloader(self, *args: Any, **kwargs: Any) -> torch.utils.data.DataLoader:
        dataloader = super()._get_dataloader(*args, **kwargs)
        dealt = getattr(dataloader, "batch_sampler", None)
        if not hasattr(dealt, "process_index"):
            raise ValueError("--context_parallel_size needs a map-style dataset (accelerate's BatchSamplerShard)")
        dealt.num_processes, dealt.process_index = self.mesh["dp"].size(), self.mesh["dp"].get_local_rank()
        return dataloader

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return shard_batch(super()._prepare_inputs(inputs), self.mesh["cp"])

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
        torch.distributed.all_reduce(loss, group=self.mesh["cp"].get_group())
        return loss, None, None


def context_parallel_mesh(args: ScriptArguments, training_args: TrainingArguments, block_size: int) -> Any:
    """The (dp, cp) device mesh of `--context_parallel_size`, or None without it."""
    cp, world = args.context_parallel_size, training_args.world_size
    if cp == 1:
        return None
    if cp < 1 or world % cp:
        raise ValueError(f"--context_parallel_size {cp} does not divide the world size {world}")
    if block_size % cp:
        raise ValueError(f"--block_size {block_size} does not split evenly over --context_parallel_size {cp}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(training_args.device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))


def main() -> None:
    args, training_args = parse_args()
    set_seed(training_args.seed)
    raw = load_text(args, training_args.seed)
    tokenizer = get_tokenizer(args, raw["train"], training_args)
    block_size = args.block_size or PRESETS[args.preset]["block_size"]
    mesh = context_parallel_mesh(args, training_args, block_size)
    data = tokenize_and_pack(raw, tokenizer, block_size, args.packing, training_args)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    if len(data["validation"]) == 0:
        raise ValueError(f"the validation split holds fewer than --block_size={block_size} tokens")

    if training_args.fsdp and training_args.device.type == "cpu" and training_args.process_index == 0:
        print(
            "warning: accelerate enables FSDP only on accelerators; on CPU the Trainer falls back to DDP "
            "(tests/test_distributed.py shows FSDP2's fully_shard itself working on CPU with gloo)"
        )
    config = build_config(args, len(tokenizer), tokenizer)
    model = xlstm_hf.xLSTMForCausalLM(config, backend=args.backend)
    if mesh is not None:
        enable_context_parallel(model, mesh["cp"], sequence_length=block_size)
    main_process = training_args.process_index == 0
    if main_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"model: {args.preset} {args.architecture}, {n_params / 1e6:.2f}M parameters, blocks "
            f"{''.join(config.block_types)}, hidden {config.hidden_size}, vocab {config.vocab_size}\n"
            f"data: {len(data['train'])} train rows and {len(data['validation'])} eval rows of {block_size} tokens"
            f" ({'packed, state reset per document' if args.packing else 'concatenated'})"
        )

    trainer = (Trainer if mesh is None else partial(ContextParallelTrainer, mesh=mesh))(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    world = training_args.world_size
    rows = world // args.context_parallel_size  # processes reading different rows
    tokens = trainer.state.global_step * training_args.per_device_train_batch_size * block_size * rows
    metrics["train_tokens"] = tokens * training_args.gradient_accumulation_steps
    metrics["train_tokens_per_second"] = metrics["train_tokens"] / metrics["train_runtime"]

    if trainer.is_fsdp_enabled:
        metrics["fsdp_sharded_blocks"] = count_sharded_blocks(trainer.model)
    eval_metrics = trainer.evaluate()
    metrics.update(eval_metrics)
    metrics["eval_perplexity"] = math.exp(eval_metrics["eval_loss"])
    metrics["eval_unigram_perplexity"] = unigram_perplexity(data["train"], data["validation"], config.vocab_size)
    metrics["eval_tokens"] = scored_tokens(data["validation"])

    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.save_metrics("all", metrics)
    if main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        print(
            f"train loss {metrics['train_loss']:.4f} | {metrics['train_tokens_per_second']:.0f} tokens/s "
            f"({metrics['train_tokens']} tokens in {metrics['train_runtime']:.1f} s, {world} process(es)"
            f"{', FSDP' if trainer.is_fsdp_enabled else ''}"
            f"{f', rows split over {args.context_parallel_size}' if mesh is not None else ''})\n"
            f"eval perplexity {metrics['eval_perplexity']:.2f} vs unigram baseline "
            f"{metrics['eval_unigram_perplexity']:.2f} ({metrics['eval_tokens']} held-out tokens)\n"
            f"saved model and tokenizer to {os.path.abspath(training_args.output_dir)}"
        )
        # generation runs whole sequences: this process alone, as without context parallelism
        print(f"sample:\n{generate_sample(disable_context_parallel(trainer.model), tokenizer, args)}")
        if args.push_to_repo:
            push(training_args, args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank waits for the main one, then the process group is torn down before exit: a rank that exited
        # with it alive was killed by SIGABRT ("terminate called without an active exception") now and then
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def push(training_args: TrainingArguments, args: ScriptArguments) -> None:
    """Model, tokenizer and a model card whose training section holds these arguments and results, in one commit."""
    from xlstm_hf.hub import push_checkpoint, write_model_card

    out = Path(training_args.output_dir)
    (out / "training_args.json").write_text(json.dumps(training_args.to_sanitized_dict(), indent=2, default=str))
    data = args.dataset_name or args.train_file or "pydoc_data.topics (the Python documentation topics)"
    write_model_card(out, repo_id=args.push_to_repo, datasets=[data])
    commit = push_checkpoint(out, args.push_to_repo, commit_message="examples/train.py")
    print(f"pushed to {commit.commit_url}")


@torch.no_grad()
def generate_sample(model: torch.nn.Module, tokenizer, args: ScriptArguments) -> str:
    model.eval()
    prompt = tokenizer(tokenizer.eos_token + args.prompt, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    out = model.generate(
        **{k: v.to(device) for k, v in prompt.items()},
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True)


if __name__ == "__main__":
    main()
