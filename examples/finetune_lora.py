"""Fine-tune a saved xLSTM with LoRA (or DoRA) through PEFT and the Trainer, on a local dataset.

    python examples/train.py --output_dir xlstm-pydoc                        # a base model and its tokenizer
    python examples/finetune_lora.py --model xlstm-pydoc --output_dir xlstm-pydoc-lora
    python examples/finetune_lora.py --model xlstm-pydoc --train_file my.jsonl --use_dora --merge

`LoraConfig(task_type="CAUSAL_LM")` needs no `target_modules`: importing xlstm_hf registers the defaults of
model_type "xlstm_hf" with PEFT (the projections into and out of every mixer and feed-forward). Only the adapter is
saved (a few hundred KB); `--merge` also saves the merged model, loadable without PEFT. With no `--train_file` the
data are the docstrings of some standard-library modules: another register of English than the documentation topics
the base model learnt, so the adapter has something to learn.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, default_data_collator, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import generate_sample, tokenize_and_pack  # noqa: E402

import xlstm_hf  # noqa: E402  (also registers its PEFT defaults)

STDLIB_MODULES = (
    "argparse collections contextlib dataclasses functools heapq itertools json logging pathlib pickle random re "
    "shutil socket string subprocess tempfile textwrap threading typing unittest urllib.parse uuid"
).split()


@dataclass
class FinetuneArguments:
    model: str = field(default="xlstm-pydoc", metadata={"help": "directory of a model and tokenizer (train.py's)"})
    train_file: str | None = field(default=None, metadata={"help": "a local .txt (one document per line) or .jsonl"})
    validation_file: str | None = field(default=None, metadata={"help": "local held-out data (same format)"})
    text_column: str = field(default="text", metadata={"help": "the column holding the text"})
    eval_fraction: float = field(default=0.1, metadata={"help": "documents held out when there is no validation set"})
    block_size: int = field(default=256, metadata={"help": "tokens per training row"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    target_modules: str | None = field(
        default=None, metadata={"help": "comma-separated module names; default: PEFT's registered xlstm_hf targets"}
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA"})
    merge: bool = field(default=False, metadata={"help": "also save the merged model to <output_dir>/merged"})
    prompt: str = field(default="Return a new", metadata={"help": "prompt of the sample generated at the end"})
    max_new_tokens: int = field(default=60, metadata={"help": "length of the sample"})


def load_documents(args: FinetuneArguments, seed: int) -> datasets.DatasetDict:
    if args.train_file is not None:
        files = {"train": args.train_file}
        if args.validation_file is not None:
            files["validation"] = args.validation_file
        kind = "json" if args.train_file.endswith((".json", ".jsonl")) else "text"
        raw = datasets.load_dataset(kind, data_files=files)
        if args.text_column != "text":
            raw = raw.rename_column(args.text_column, "text")
    else:
        docs = [importlib.import_module(name).__doc__ or "" for name in STDLIB_MODULES]
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})})
    raw = raw.filter(lambda ex: bool(ex["text"] and ex["text"].strip()))
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=args.eval_fraction, seed=seed)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return datasets.DatasetDict({"train": raw["train"], "validation": raw["validation"]})


def main() -> None:
    import peft

    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="xlstm-lora",
        learning_rate=2e-3,
        max_steps=60,
        warmup_steps=6,
        lr_scheduler_type="cosine",
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = xlstm_hf.xLSTMForCausalLM.from_pretrained(args.model)
    raw = load_documents(args, training_args.seed)
    data = tokenize_and_pack(raw, tokenizer, args.block_size, True, training_args)
    if len(data["train"]) == 0 or len(data["validation"]) == 0:
        raise ValueError(f"too little text for rows of --block_size={args.block_size} tokens in both splits")

    lora_config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        use_dora=args.use_dora,
        target_modules=args.target_modules.split(",") if args.target_modules else None,
    )
    model = peft.get_peft_model(model, lora_config)
    model.print_trainable_parameters()

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(training_args.output_dir)  # the adapter only
    if training_args.process_index != 0:
        return
    tokenizer.save_pretrained(training_args.output_dir)
    print(f"eval perplexity {math.exp(before):.2f} before, {math.exp(after):.2f} after fine-tuning")
    print(f"saved the adapter to {training_args.output_dir}")
    if args.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(Path(training_args.output_dir) / "merged")
        tokenizer.save_pretrained(Path(training_args.output_dir) / "merged")
        print(f"saved the merged model to {Path(training_args.output_dir) / 'merged'}")
        model = merged
    print(f"sample:\n{generate_sample(model, tokenizer, args)}")


if __name__ == "__main__":
    main()
