"""What a new user runs first, checked end to end: a saved checkpoint loaded with trust_remote_code=True where xlstm_hf
cannot be imported (then its tokenizer, the text-generation pipeline, PEFT's default targets), `import xlstm_hf` and
the documented flags of examples/train.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import randomize_, tiny_config
from hub_fixtures import WITHOUT_THE_PACKAGE, run_without_the_package
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments, pipeline

import xlstm_hf

ROOT = Path(__file__).resolve().parents[1]
TEXT = "w1 w2 w3 w5 w8 w13"
PROMPT_NEEDED = "Do you wish to run the custom code"  # transformers' trust_remote_code prompt


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[EOS]", *(f"w{i}" for i in range(90))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


# The order of a user's script: the model (remote code), then the tokenizer without trust_remote_code, the pipeline,
# and only then peft, with no target_modules.
REMOTE_CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

path, text = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
print("--- tokenizer", file=sys.stderr, flush=True)
tokenizer = AutoTokenizer.from_pretrained(path)
print("--- pipeline", file=sys.stderr, flush=True)
generator = pipeline("text-generation", model=path, trust_remote_code=True)
generated = generator(text, max_new_tokens=4, do_sample=False)[0]["generated_text"]
print("--- peft", file=sys.stderr, flush=True)
peft_imported_before = "peft" in sys.modules
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
print(json.dumps({
    "tokenizer": type(tokenizer).__name__,
    "tokens": tokenizer(text)["input_ids"],
    "pipeline_class": f"{type(generator.model).__module__}.{type(generator.model).__qualname__}",
    "generated": generated,
    "peft_imported_before": peft_imported_before,
    "lora_layers": sorted({n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if isinstance(m, LoraLayer)}),
    "xlstm_hf_modules": sorted(m for m in sys.modules if m.split(".")[0] == "xlstm_hf"),
}))
"""
)


@pytest.fixture(scope="module")
def remote_code_run(tmp_path_factory) -> tuple[dict, dict[str, str]]:
    """The report of REMOTE_CHILD and its stderr, cut into the sections it marks."""
    tmp = tmp_path_factory.mktemp("remote_code")
    checkpoint = tmp / "checkpoint"
    randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config("paper"))).save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    proc = run_without_the_package(REMOTE_CHILD, str(checkpoint), TEXT, tmp=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sections = {"model": ""}
    name = "model"
    for line in proc.stderr.splitlines(keepends=True):
        if line.startswith("--- "):
            name = line.removeprefix("--- ").strip()
            sections[name] = ""
        else:
            sections[name] += line
    return json.loads(proc.stdout.strip().splitlines()[-1]), sections


def test_tokenizer_after_a_remote_code_load_asks_no_trust(remote_code_run):
    report, stderr = remote_code_run
    assert report["xlstm_hf_modules"] == []
    assert PROMPT_NEEDED not in stderr["tokenizer"], stderr["tokenizer"]
    assert report["tokenizer"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert report["tokens"] == tiny_tokenizer()(TEXT)["input_ids"]


def test_text_generation_pipeline_with_remote_code_logs_no_error(remote_code_run):
    report, stderr = remote_code_run
    assert report["pipeline_class"].startswith("transformers_modules."), report["pipeline_class"]
    assert "not supported" not in stderr["pipeline"], stderr["pipeline"][-2000:]
    assert report["generated"].startswith(TEXT) and len(report["generated"].split()) > len(TEXT.split())


def test_peft_imported_after_a_remote_code_model_finds_the_default_targets(remote_code_run):
    report, _ = remote_code_run
    assert not report["peft_imported_before"]
    assert {"proj_up", "proj_up_gate", "proj_down"} <= set(report["lora_layers"]), report["lora_layers"]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_text_generation_pipeline_with_the_package_logs_no_error(tmp_path):
    model = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config("paper")))
    records = Records()
    library_logger = logging.getLogger("transformers")  # transformers does not propagate to the root logger
    library_logger.addHandler(records)
    try:
        generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer())
    finally:
        library_logger.removeHandler(records)
    assert not [m for m in records.messages if "not supported" in m], records.messages
    generated = generator(TEXT, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert generated.startswith(TEXT) and len(generated.split()) > len(TEXT.split())


# transformers.modeling_utils (the base of every transformers model) is imported first: what it prints (torchao's
# extension loader, when torchao is installed) is transformers', whatever model follows.
IMPORT_CHILD = r"""
import json, sys
import transformers.modeling_utils

print("--- xlstm_hf", file=sys.stderr, flush=True)
import xlstm_hf

print("--- peft", file=sys.stderr, flush=True)
peft_imported = "peft" in sys.modules
model = xlstm_hf.xLSTMForCausalLM(xlstm_hf.xLSTMConfig(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, architecture="7b"))
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
print(json.dumps({
    "peft_imported_by_xlstm_hf": peft_imported,
    "lora_layers": sorted({n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if isinstance(m, LoraLayer)}),
}))
"""


def test_import_prints_nothing_and_defers_peft_until_it_is_imported(tmp_path):
    pytest.importorskip("peft")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CHILD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    own_output = proc.stderr.split("--- xlstm_hf\n", 1)[1].split("--- peft\n", 1)[0]
    assert own_output == "", own_output
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["peft_imported_by_xlstm_hf"]
    assert {"q", "k", "v", "out_proj", "proj_up"} <= set(report["lora_layers"]), report["lora_layers"]


def load_train_example():
    if "train_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_example", ROOT / "examples" / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve the string annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["train_example"]


@pytest.mark.parametrize("form", ["--gradient_checkpointing", "--gradient_checkpointing=true"])
def test_train_example_gradient_checkpointing_flag_is_not_deprecated(tmp_path, monkeypatch, form):
    train = load_train_example()
    kwargs = '{"use_reentrant": false}'
    argv = ["train.py", "--output_dir", str(tmp_path), form, "--gradient_checkpointing_kwargs", kwargs]
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, training_args = train.parse_args()
    # transformers 5.23 renamed the fields; before, the flags are the fields' own names
    renamed = hasattr(training_args, "activation_checkpointing")
    name = "activation_checkpointing" if renamed else "gradient_checkpointing"
    assert getattr(training_args, name) is True
    assert getattr(training_args, f"{name}_kwargs") == {"use_reentrant": False}


def test_trainer_keeps_position_ids_of_packed_rows(tmp_path):
    """`position_ids` is a forward argument: the Trainer's default `remove_unused_columns` keeps it (the packed
    documents' boundaries) and drops a column that forward does not take."""
    import datasets

    train = load_train_example()
    rows = train.pack({"ids": [[2, 5, 6, 7], [2, 8, 9], [2, 10, 11, 12, 13]]}, block_size=6, packing=True)
    rows["note"] = ["not a forward argument"] * len(rows["input_ids"])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none")
    assert args.remove_unused_columns
    model = xlstm_hf.xLSTMForCausalLM(tiny_config("paper"))
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows))
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert sorted(batch["position_ids"].tolist()) == [[0, 1, 2, 3, 0, 1], [2, 0, 1, 2, 3, 4]]  # rows shuffled
