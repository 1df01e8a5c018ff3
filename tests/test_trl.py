"""TRL builds models from a saved checkpoint of ours: SFTTrainer(model=path), and the reference models of DPOTrainer
(no PEFT) and GRPOTrainer (beta > 0), which it loads again from the policy's `config._name_or_path`.

TRL resolves a path with `trl.trainer.utils.create_model_from_path`: `getattr(transformers, config.architectures[0])`
first, the Auto class named in `auto_map` only when transformers has no class of that name. A checkpoint must
therefore not name transformers' built-in `xLSTMForCausalLM`, or TRL loads our weights into the built-in model.

The reference model holds the policy's weights, so before the first optimizer step DPO's sigmoid loss is
-log sigmoid(0) = log 2 and GRPO's per-token KL is 0; with LoRA the reference is the base model with the adapter
disabled, and a fresh adapter (B = 0) is a no-op, so the same holds. Tolerances: policy and reference run the same
float32 computation on the same batch (measured: log 2 to float32 precision, KL 0.0); 1e-4 and 1e-6 only leave room
for a different reduction order, while transformers' built-in model on a 7B checkpoint is off by ~4e-3 (issue 17).
After training, the reference still holds the saved weights and the policy does not: a separate, frozen model.

`bf16=False`: TRL's configs default to bf16 autocast, which on CPU is slow and not what these identities are about.
"""

import math
import string
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config
from transformers import PreTrainedTokenizerFast

import xlstm_hf

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

ARCHITECTURES = ["7b", "paper"]
# PEFT's default LoRA targets for model_type "xlstm_hf" that each stack has (as in tests/test_peft.py)
DEFAULT_LORA_TARGETS = {"paper": {"proj_up", "proj_up_gate", "proj_down"}, "7b": {"q", "k", "v", "out_proj", "proj_up"}}


def tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character or space (ids 1..95) and an end-of-sequence token (96), built locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + string.punctuation + " "
    vocab = {"<pad>": 0, **{c: j + 1 for j, c in enumerate(chars)}, "<eos>": len(chars) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def saved_checkpoint(tmp_path: Path, architecture: str) -> tuple[str, xlstm_hf.xLSTMForCausalLM]:
    """A randomised tiny model saved as a user saves it; returns the path and the model."""
    model = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config(architecture))).eval()
    path = tmp_path / f"xlstm-{architecture}"
    model.save_pretrained(path)
    return str(path), model


def common_args(tmp_path: Path) -> dict:
    return dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        disable_tqdm=True,
    )


def logged(trainer, key: str) -> list[float]:
    """The value of `key` logged at each of the two steps; the first is computed with the saved weights."""
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    assert len(values) == 2, trainer.state.log_history
    assert all(math.isfinite(v) for v in values), values
    return values


def assert_our_class(model: torch.nn.Module) -> None:
    # type(), not isinstance: transformers' built-in xLSTMForCausalLM must not pass as ours
    assert type(model) is xlstm_hf.xLSTMForCausalLM, f"{type(model).__module__}.{type(model).__qualname__}"


def assert_reference_frozen(trainer, saved: torch.nn.Module) -> None:
    """After training, the reference still holds the saved weights and the policy does not: two separate models."""
    ref = trainer.accelerator.unwrap_model(trainer.ref_model).state_dict()
    policy = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name, weight in saved.state_dict().items():
        assert torch.equal(ref[name], weight), name
    assert any(not torch.equal(policy[name], weight) for name, weight in saved.state_dict().items())


def assert_adapter_trained(trainer) -> None:
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero


def lora_layer_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def preference_dataset() -> "datasets.Dataset":
    return datasets.Dataset.from_dict(
        {
            "prompt": ["The sky is", "Two plus two is", "Water is", "Cats say"],
            "chosen": [" blue", " four", " wet", " meow"],
            "rejected": [" green", " five", " dry", " woof"],
        }
    )


def prompt_dataset() -> "datasets.Dataset":
    return datasets.Dataset.from_dict({"prompt": ["The sky is", "Two plus two is", "Water is", "Cats say"]})


def alternating_reward(completions: list[str], **kwargs) -> list[float]:
    """1, 0, 1, 0, ...: each group of two generations gets advantages +1 and -1, so the policy moves at step 1."""
    return [float(j % 2 == 0) for j in range(len(completions))]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sft_from_path_builds_our_model(tmp_path, architecture):
    path, model = saved_checkpoint(tmp_path, architecture)
    data = datasets.Dataset.from_dict({"text": ["The sky is blue.", "Two plus two is four.", "Water is wet."] * 2})
    args = trl.SFTConfig(**common_args(tmp_path), max_length=32)
    trainer = trl.SFTTrainer(model=path, args=args, train_dataset=data, processing_class=tokenizer())
    assert_our_class(trainer.model)
    ids = torch.randint(1, 96, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(ids).logits, model(ids).logits)
    trainer.train()
    logged(trainer, "loss")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_dpo_reference_model_is_ours(tmp_path, architecture):
    path, saved = saved_checkpoint(tmp_path, architecture)
    args = trl.DPOConfig(**common_args(tmp_path), max_length=32)
    trainer = trl.DPOTrainer(model=path, args=args, train_dataset=preference_dataset(), processing_class=tokenizer())
    assert_our_class(trainer.model)
    assert_our_class(trainer.accelerator.unwrap_model(trainer.ref_model))
    trainer.train()
    assert logged(trainer, "loss")[0] == pytest.approx(math.log(2), abs=1e-4)
    assert_reference_frozen(trainer, saved)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_dpo_default_lora(tmp_path, architecture):
    path, _ = saved_checkpoint(tmp_path, architecture)
    args = trl.DPOConfig(**common_args(tmp_path), max_length=32)
    trainer = trl.DPOTrainer(
        model=path,
        args=args,
        train_dataset=preference_dataset(),
        processing_class=tokenizer(),
        peft_config=peft.LoraConfig(task_type="CAUSAL_LM", r=4),
    )
    assert trainer.ref_model is None  # the reference is the base model with the adapter disabled
    assert_our_class(trainer.model.get_base_model())
    assert DEFAULT_LORA_TARGETS[architecture] <= lora_layer_names(trainer.model)
    trainer.train()
    assert logged(trainer, "loss")[0] == pytest.approx(math.log(2), abs=1e-4)
    assert_adapter_trained(trainer)


def grpo_args(tmp_path: Path) -> "trl.GRPOConfig":
    return trl.GRPOConfig(**common_args(tmp_path), beta=0.1, num_generations=2, max_completion_length=4)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_grpo_reference_model_is_ours(tmp_path, architecture):
    path, saved = saved_checkpoint(tmp_path, architecture)
    trainer = trl.GRPOTrainer(
        model=path,
        reward_funcs=alternating_reward,
        args=grpo_args(tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer(),
    )
    assert_our_class(trainer.model)
    assert_our_class(trainer.accelerator.unwrap_model(trainer.ref_model))
    trainer.train()
    assert logged(trainer, "kl")[0] == pytest.approx(0.0, abs=1e-6)
    assert_reference_frozen(trainer, saved)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_grpo_default_lora(tmp_path, architecture):
    path, _ = saved_checkpoint(tmp_path, architecture)
    trainer = trl.GRPOTrainer(
        model=path,
        reward_funcs=alternating_reward,
        args=grpo_args(tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer(),
        peft_config=peft.LoraConfig(task_type="CAUSAL_LM", r=4),
    )
    assert trainer.ref_model is None
    assert_our_class(trainer.model.get_base_model())
    assert DEFAULT_LORA_TARGETS[architecture] <= lora_layer_names(trainer.model)
    trainer.train()
    assert logged(trainer, "kl")[0] == pytest.approx(0.0, abs=1e-6)
    assert_adapter_trained(trainer)
