"""Training xLSTMForCausalLM the way transformers users do: Trainer, gradient checkpointing and accumulation, bf16
autocast on CPU, resume from a checkpoint, evaluation, packed sequences, torch.compile.

Tolerances (float32 unless the test says otherwise):
- gradient checkpointing recomputes the same ops in the same order: 1e-6;
- gradient accumulation splits the batch sum in two: 1e-5 after a few SGD steps (Adam would divide the round-off of
  near-zero gradients by their own size and turn it into steps of the full learning rate);
- resuming restores weights, optimizer, scheduler and RNG: 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import enable_checkpointing, randomize_, tiny_config
from datasets import Dataset
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import xlstm_hf

VOCAB = 61
ARCHITECTURES = ["paper", "7b"]
# the paper stack with an sLSTM block in the middle, of mLSTM blocks only, of sLSTM blocks only; the xLSTM-7B stack
STACKS = [("paper", {}), ("paper", {"slstm_at": []}), ("paper", {"slstm_at": [0, 1, 2]}), ("7b", {})]
STACK_IDS = ["paper", "paper-mlstm", "paper-slstm", "7b"]


def pattern_dataset(n_rows: int, length: int, seed: int = 0) -> Dataset:
    """Rows following x[t + 1] = (3 x[t] + 1) mod VOCAB from a random start: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n_rows, 1), generator=g)
    rows = [start]
    for _ in range(length - 1):
        rows.append((rows[-1] * 3 + 1) % VOCAB)
    ids = torch.cat(rows, dim=1).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def model_for(architecture: str = "paper", **overrides) -> xlstm_hf.xLSTMForCausalLM:
    torch.manual_seed(0)
    return xlstm_hf.xLSTMForCausalLM(tiny_config(architecture, vocab_size=VOCAB, **overrides))


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def logged_losses(trainer: Trainer, after_step: int = 0) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and entry["step"] > after_step]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trainer_loss_falls_and_evaluates(tmp_path, architecture):
    data = pattern_dataset(96, 24)
    trainer = Trainer(
        model=model_for(architecture),
        args=training_args(tmp_path, max_steps=30, logging_steps=5),
        train_dataset=data,
        eval_dataset=pattern_dataset(8, 24, seed=1),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = logged_losses(trainer)
    after = trainer.evaluate()["eval_loss"]
    assert math.isclose(before, math.log(VOCAB), rel_tol=0.1)  # an untrained model is close to uniform
    assert losses[-1] < 0.5 * losses[0]
    assert after < 0.5 * before
    assert trainer.model.config.use_cache is False  # the Trainer turned the cache off, and the model obeyed


def test_trainer_with_flattening_collator(tmp_path):
    """DataCollatorWithFlattening packs a batch of documents into one row; the model restarts at each document."""
    g = torch.Generator().manual_seed(0)
    docs = pattern_dataset(48, 24)["input_ids"]
    lengths = torch.randint(5, 24, (48,), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": [d[:n] for d, n in zip(docs, lengths, strict=True)]})
    trainer = Trainer(
        model=model_for("paper"),
        args=training_args(tmp_path, max_steps=20, logging_steps=5),
        train_dataset=data,
        data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True),
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("architecture,overrides", STACKS, ids=STACK_IDS)
def test_activation_checkpointing_gives_the_same_gradients(architecture, overrides, reentrant):
    """Every block recomputed in the backward (torch.utils.checkpoint, either implementation) gives every parameter
    the gradient of the plain run: 21 tokens (two chunks of 8 and a partial one), the default use_cache=True, and
    dropout, whose masks the recompute must replay (checkpoint restores the RNG state)."""
    model = randomize_(model_for(architecture, dropout=0.1, **overrides)).train()
    ids = torch.randint(0, VOCAB, (2, 21))
    calls = []  # the modules that the blocks' forwards call (module hooks stay outside the checkpoint)
    for block in model.backbone.blocks:
        for module in block.children():
            module.register_forward_pre_hook(lambda module, args: calls.append(module))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads()
    plain_calls = len(calls)
    enable_checkpointing(model, reentrant)
    checkpointed = grads()
    assert len(calls) == 2 * plain_calls  # every block ran again in the backward
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-6, msg=name)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    data = pattern_dataset(32, 16)
    params = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = Trainer(
            model=model_for("paper"),
            args=training_args(
                tmp_path / f"{batch}x{accumulation}",
                max_steps=3,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                optim="sgd",
                learning_rate=0.1,
            ),
            train_dataset=data,
        )
        trainer.train()
        params.append(dict(trainer.model.named_parameters()))
    for name, p in params[0].items():
        torch.testing.assert_close(params[1][name], p, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bf16_autocast_on_cpu(tmp_path, architecture):
    model = randomize_(model_for(architecture)).eval()
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        reference = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids).logits
    # bf16 rounds at 2^-8 = 0.4 %; three blocks of matmuls, norms and gates in bf16 compound it to 2-3 % (measured)
    relative_error = (mixed.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05
    trainer = Trainer(
        model=model_for(architecture),
        args=training_args(tmp_path, bf16=True, max_steps=20, logging_steps=5),
        train_dataset=pattern_dataset(64, 24),
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_resume_from_checkpoint_continues_identically(tmp_path):
    data = pattern_dataset(48, 16)
    args = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear", warmup_steps=2)
    full = Trainer(model=model_for("paper"), args=training_args(tmp_path / "full", **args), train_dataset=data)
    full.train()
    resumed = Trainer(model=model_for("paper"), args=training_args(tmp_path / "resumed", **args), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    # the resumed run's history holds the checkpoint's first three losses, then its own
    full_losses, resumed_losses = logged_losses(full), logged_losses(resumed, after_step=3)
    assert len(full_losses) == 6 and len(resumed_losses) == 3
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(full_losses[3:]), atol=1e-6, rtol=1e-6)
    resumed_params = dict(resumed.model.named_parameters())
    for name, p in full.model.named_parameters():
        torch.testing.assert_close(resumed_params[name], p, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_forward_traces_as_one_graph(architecture):
    """torch.compile of a training step's forward and loss (the PyTorch path, as on CPU): dynamo's explain finds one
    graph and no break, over 19 tokens (a partial last chunk) with labels and the cache off, as the Trainer runs it."""
    model = randomize_(model_for(architecture)).train()
    ids = torch.randint(0, VOCAB, (2, 19))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids, use_cache=False)
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


@pytest.mark.slow
def test_trainer_torch_compile(tmp_path):
    torch._dynamo.reset()
    trainer = Trainer(
        model=model_for("7b"),
        args=training_args(tmp_path, torch_compile=True, max_steps=10, logging_steps=5),
        train_dataset=pattern_dataset(40, 16),
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
