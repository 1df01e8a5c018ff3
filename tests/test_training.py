"""Training xLSTMForCausalLM the way transformers users do: Trainer, gradient checkpointing and accumulation, bf16
autocast on CPU, resume from a checkpoint, evaluation, packed sequences, torch.compile.

Tolerances (float32 unless the test says otherwise):
- gradient checkpointing recomputes the same ops in the same order: 1e-6;
- a packed document runs in a batch with the others (shorter ones padded and masked), so its matmuls have other shapes
  than alone and round differently: 1e-5;
- gradient accumulation splits the batch sum in two: 1e-5 after a few SGD steps (Adam would divide the round-off of
  near-zero gradients by their own size and turn it into steps of the full learning rate);
- resuming restores weights, optimizer, scheduler and RNG: 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_, tiny_config
from datasets import Dataset
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import xlstm_hf

VOCAB = 61
ARCHITECTURES = ["paper", "7b"]


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


@pytest.mark.parametrize(
    "architecture,overrides",
    [("paper", {}), ("paper", {"slstm_at": [0, 2]}), ("7b", {})],
    ids=["paper", "paper-slstm", "7b"],
)
def test_gradient_checkpointing_same_gradients(architecture, overrides):
    model = randomize_(model_for(architecture, **overrides)).train()
    ids = torch.randint(0, VOCAB, (2, 21))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()  # the default use_cache=True must not get in the way
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    checkpointed = grads()
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


def flattened_batch(docs: list[list[int]], cu_seq_lens: bool) -> dict[str, torch.Tensor]:
    features = [{"input_ids": d} for d in docs]
    return DataCollatorWithFlattening(return_flash_attn_kwargs=cu_seq_lens, return_tensors="pt")(features)


@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize(
    "architecture,overrides",
    [("paper", {}), ("paper", {"slstm_at": [0, 2]}), ("7b", {})],
    ids=["paper", "paper-slstm", "7b"],
)
def test_packed_equals_separate(architecture, overrides, boundaries):
    """Documents of lengths that are not multiples of the chunk (8), one of a single token, packed into one row: the
    same per-document logits, the same token-mean loss and the same gradients as the documents run one by one."""
    model = randomize_(model_for(architecture, **overrides)).train()
    lengths = [13, 1, 8, 21, 5]
    docs = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
    batch = flattened_batch(docs, cu_seq_lens=boundaries == "cu_seq_lens")
    if boundaries == "cu_seq_lens":
        batch.pop("position_ids")  # the boundaries must come from cu_seq_lens alone
    assert batch["input_ids"].shape == (1, sum(lengths))

    model.zero_grad()
    packed = model(**batch)
    packed.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    targets = sum(n - 1 for n in lengths)
    total = 0.0
    offset = 0
    for doc in docs:
        ids = torch.tensor([doc])
        out = model(input_ids=ids, labels=ids)
        torch.testing.assert_close(packed.logits[:, offset : offset + len(doc)], out.logits, atol=1e-5, rtol=1e-5)
        if len(doc) > 1:  # a one-token document has no target (its loss is NaN)
            total = total + out.loss * (len(doc) - 1) / targets
        offset += len(doc)
    total.backward()
    torch.testing.assert_close(packed.loss, total, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_of_a_batch_are_independent():
    """Two packed rows in one batch (as examples/train.py makes them): each equals its documents run separately."""
    model = randomize_(model_for("paper", slstm_at=[1])).eval()
    docs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (7, 9, 16)]
    ids = torch.tensor([docs[0] + docs[1], docs[2]])
    position_ids = torch.tensor([list(range(7)) + list(range(9)), list(range(16))])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids).logits
        for row, start, doc in ((0, 0, docs[0]), (0, 7, docs[1]), (1, 0, docs[2])):
            alone = model(torch.tensor([doc])).logits
            torch.testing.assert_close(packed[row : row + 1, start : start + len(doc)], alone, atol=1e-5, rtol=1e-5)


def test_no_graph_breaks_in_training_forward():
    """torch.compile of the reference path: forward and loss trace as one graph (dynamo's explain, no compilation)."""
    model = model_for("paper", slstm_at=[1]).train()
    ids = torch.randint(0, VOCAB, (2, 19))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids, use_cache=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons


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
