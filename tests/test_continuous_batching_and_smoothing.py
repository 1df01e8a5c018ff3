"""Two transformers features that would otherwise go wrong without an error:

- Continuous batching (`generate_batch`, `init_continuous_batching`, `generate(cache_implementation="paged")`,
  `transformers serve --continuous-batching`) pages an attention KV cache; its manager fails every request of an
  xLSTM. The model refuses at the entry point, before a manager or a thread exists, and names generate().
- The Trainer's label smoother shifts the labels only for class names in transformers' static
  `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (looked up by `model._get_name()`); modeling_xlstm.py adds ours. The check is
  the loss itself: Trainer.compute_loss with `label_smoothing_factor` equals torch's label-smoothed cross-entropy of
  the shifted targets (the same formula, averaged over the counted targets: float32 summation order only, 1e-6), so
  the tests fail if transformers changes how it decides to shift.
"""

import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import raises_naming, randomize_, tiny_config
from hub_fixtures import WITHOUT_THE_PACKAGE, run_without_the_package

import xlstm_hf

ARCHITECTURES = ["paper", "7b"]
SMOOTHING = 0.1


def make(architecture: str) -> xlstm_hf.xLSTMForCausalLM:
    return randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config(architecture, pad_token_id=0))).eval()


# ---------------------------------------------------------------------------------------------------------------------
# continuous batching


def assert_refused_before_any_work(model: xlstm_hf.xLSTMForCausalLM, call) -> None:
    threads = threading.active_count()
    with raises_naming("generate()", "padded", "vLLM", error=NotImplementedError):
        call()
    assert getattr(model, "_cached_continuous_batching_manager", None) is None
    assert threading.active_count() == threads  # no batching thread was started


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_generate_batch_is_refused(architecture):
    model = make(architecture)
    assert_refused_before_any_work(model, lambda: model.generate_batch([[5, 6, 7], [8, 9]], max_new_tokens=3))


def test_every_continuous_batching_entry_point_is_refused():
    from transformers import ContinuousBatchingConfig

    model = make("paper")
    assert_refused_before_any_work(model, lambda: model.init_continuous_batching())
    assert_refused_before_any_work(
        model, lambda: model.init_continuous_batching(continuous_batching_config=ContinuousBatchingConfig())
    )

    def enter_context_manager():
        with model.continuous_batching_context_manager():
            pass

    assert_refused_before_any_work(model, enter_context_manager)
    ids = torch.randint(1, 96, (2, 5))
    assert_refused_before_any_work(
        model, lambda: model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="paged")
    )


def test_transformers_serve_continuous_batching_is_refused():
    """`transformers serve` treats the model as a text LLM (the registration below puts it in the causal-LM table) and
    starts continuous batching, when enabled, through `init_continuous_batching` in CBGenerateRunner."""
    from transformers import GenerationConfig
    from transformers.cli.serving import model_manager, utils

    model = make("paper")
    model.config.architectures = [type(model).__name__]
    if hasattr(model_manager, "ModelLoader"):  # transformers 5.25
        assert model_manager.ModelLoader.get_model_modality(model.config, None) == utils.Modality.LLM
        start = lambda: utils.CBGenerateRunner(model, None, send_results=lambda *args: None, cb_config=None)  # noqa: E731
    else:  # before: the manager of the served models, and the continuous-batching manager in utils
        assert model_manager.ModelManager.get_model_modality(model, None) == utils.Modality.LLM
        start = lambda: utils.CBGenerateManager(None).init_cb(model, GenerationConfig())  # noqa: E731
    with raises_naming("generate()", error=NotImplementedError):
        start()


# ---------------------------------------------------------------------------------------------------------------------
# label smoothing


def smoothed_shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label-smoothed cross-entropy of position t's logits against token t + 1, -100 ignored."""
    V = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=SMOOTHING
    )


def labelled_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, vocab_size, (3, 13))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, -3:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def test_causal_lm_table_holds_our_class_under_our_model_type():
    """What the Trainer reads (transformers.trainer.Trainer.compute_loss): an internal, so checked by name here and by
    effect below."""
    import transformers.trainer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[xlstm_hf.xLSTMConfig.model_type] == "xLSTMHFForCausalLM"
    assert transformers.trainer.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES is MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    assert make("paper")._get_name() == "xLSTMHFForCausalLM"  # also the name save_pretrained writes


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trainer_label_smoothing_shifts_the_labels(architecture, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make(architecture)
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=SMOOTHING, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    batch = labelled_batch(model.config.vocab_size)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"]).logits
    expected = smoothed_shifted_loss(logits, batch["labels"])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    unshifted = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), label_smoothing=SMOOTHING
    )
    assert (loss - unshifted).abs() > 1e-4  # 100 times the tolerance: the unshifted target would fail


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_and_evaluation_with_label_smoothing(architecture, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make(architecture).train()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 96, (8, 17))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        label_smoothing_factor=SMOOTHING,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(x) for x in losses + [before, after]), (losses, before, after)
    assert after < before, (before, after)
    # evaluation smooths as training does: against the shifted labels
    batch = torch.stack([row["input_ids"] for row in data[:4]])
    with torch.no_grad():
        expected = smoothed_shifted_loss(model.eval()(input_ids=batch).logits, batch)
    torch.testing.assert_close(trainer.compute_loss(model, {"input_ids": batch, "labels": batch}), expected)


# The child cannot import xlstm_hf (hub_fixtures.WITHOUT_THE_PACKAGE): the checkpoint's own modeling file registers.
REMOTE_CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""

import tempfile
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.randint(1, model.config.vocab_size, (2, 11))
args = TrainingArguments(output_dir=tempfile.mkdtemp(), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
with torch.no_grad():
    loss = Trainer(model=model, args=args).compute_loss(model, {"input_ids": ids, "labels": ids})
    logits = model(input_ids=ids).logits
V = logits.shape[-1]
expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), label_smoothing=0.1)
print(json.dumps({"module": type(model).__module__, "loss": loss.item(), "expected": expected.item()}))
"""
)


def test_remote_code_load_shifts_the_labels(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    make("paper").save_pretrained(checkpoint)
    proc = run_without_the_package(REMOTE_CHILD, str(checkpoint), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules."), report["module"]
    assert report["loss"] == pytest.approx(report["expected"], abs=1e-6), report
