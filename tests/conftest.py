import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import xlstm_hf


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(architecture: str = "paper", **overrides) -> xlstm_hf.xLSTMConfig:
    """A model small enough for CPU tests; chunk_size 8 so that short sequences span several chunks."""
    kwargs = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_heads=2, chunk_size=8)
    if architecture == "paper":
        kwargs["slstm_at"] = [1]
    kwargs.update(overrides)
    return xlstm_hf.xLSTMConfig(architecture=architecture, **kwargs)


def randomize_(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter so that no init symmetry (zero recurrent matrices, unit norms) hides a bug."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch [B, longest] (pad id 0) and its attention mask."""
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return batch, mask


@contextlib.contextmanager
def raises_naming(*facts: str, error: type[Exception] = ValueError) -> Iterator[None]:
    """pytest.raises(error) whose message names every one of `facts` (an argument, a value, a shape), in any
    wording: the test checks what the message tells, not how it says it."""
    with pytest.raises(error) as info:
        yield
    message = str(info.value)
    missing = [fact for fact in facts if fact not in message]
    assert not missing, f"the message does not name {missing}: {message!r}"


def fuse_builtin_checkpoint(path: Path) -> None:
    """Rewrite a checkpoint of transformers' built-in xLSTM saved in its single layout (the built-in cannot init
    weight_mode="fused" itself) into its weight_mode="fused" layout: q/k/v/output gate, input/forget gate and the
    feed-forward's up-projections each one matrix."""
    from safetensors.torch import load_file, save_file

    single = load_file(path / "model.safetensors")
    fused = {}
    for key, value in single.items():
        if ".mlstm_layer.q.weight" in key:
            pre = key.split(".mlstm_layer.q.")[0]
            for kind in ("weight", "bias"):  # the projections' biases with use_bias; the gates' always
                if f"{pre}.mlstm_layer.q.{kind}" in single:
                    fused[f"{pre}.mlstm_layer.qkv_opreact.{kind}"] = torch.cat(
                        [single[f"{pre}.mlstm_layer.{n}.{kind}"] for n in ("q", "k", "v", "ogate_preact")]
                    )
                    fused[f"{pre}.ffn.proj_up_gate_z.{kind}"] = torch.cat(
                        [single[f"{pre}.ffn.proj_up_gate.{kind}"], single[f"{pre}.ffn.proj_up.{kind}"]]
                    )
                fused[f"{pre}.mlstm_layer.ifgate_preact.{kind}"] = torch.cat(
                    [single[f"{pre}.mlstm_layer.{g}_preact.{kind}"] for g in ("igate", "fgate")]
                )
        elif not any(s in key for s in (".q.", ".k.", ".v.", "gate_preact", "proj_up_gate.", "proj_up.")):
            fused[key] = value
    save_file(fused, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "weight_mode": "fused"}))


def generated_cache(out):
    """The cache a generate() output (return_dict_in_generate=True) hands back: `cache` from transformers 5.24,
    `past_key_values` before."""
    from xlstm_hf.cache_xlstm import GENERATE_CACHE_NAME

    return getattr(out, GENERATE_CACHE_NAME)


def enable_checkpointing(model: torch.nn.Module, reentrant: bool | None = None) -> None:
    """model.activation_checkpointing_enable (transformers >= 5.23), gradient_checkpointing_enable before."""
    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model: torch.nn.Module) -> None:
    """model.activation_checkpointing_disable (transformers >= 5.23), gradient_checkpointing_disable before."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
