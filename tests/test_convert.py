"""Parity with the reference implementations (float32, max abs diff <= 1e-4 on the logits)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fuse_builtin_checkpoint, randomize_
from safetensors.torch import load_file, save_file

import xlstm_hf

xlstm = pytest.importorskip("xlstm")
ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4


def xlstm_package_model(slstm_at, num_blocks, embedding_dim=64, vocab_size=101, tie=False):
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMLMModel,
        xLSTMLMModelConfig,
    )

    kwargs = dict(
        context_length=64,
        num_blocks=num_blocks,
        embedding_dim=embedding_dim,
        slstm_at=slstm_at,
        vocab_size=vocab_size,
        tie_weights=tie,
    )
    if len(slstm_at) < num_blocks:
        kwargs["mlstm_block"] = mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, num_heads=4))
    if slstm_at:
        slstm = sLSTMLayerConfig(backend="vanilla", num_heads=4, conv1d_kernel_size=4)
        kwargs["slstm_block"] = sLSTMBlockConfig(slstm=slstm, feedforward=FeedForwardConfig(proj_factor=1.3))
    model = xLSTMLMModel(xLSTMLMModelConfig(**kwargs))
    model.reset_parameters()
    return randomize_(model).eval()


@pytest.mark.parametrize(
    "slstm_at, num_blocks, tie",
    [([], 2, False), ([0, 1], 2, False), ([7], 8, False), ([1], 3, True)],
    ids=["xLSTM[1:0]", "xLSTM[0:1]", "xLSTM[7:1]", "tied"],
)
def test_xlstm_package_parity(slstm_at, num_blocks, tie):
    ref = xlstm_package_model(slstm_at, num_blocks, tie=tie)
    ours = xlstm_hf.convert_from_xlstm_package(ref)
    assert ours.config.slstm_at == slstm_at
    ids = torch.randint(0, 101, (2, 45))
    with torch.no_grad():
        expected = ref(ids)
        got = ours(ids).logits
    assert (expected - got).abs().max() <= ATOL
    # the converted model runs past the package's context_length (its parallel form refuses that)
    assert torch.isfinite(ours(torch.randint(0, 101, (1, 100))).logits).all()


def transformers_xlstm_dir(tmp_path: Path, fused: bool = False, **fields) -> tuple[Path, torch.nn.Module]:
    from transformers.models.xlstm import xLSTMConfig as BuiltinConfig
    from transformers.models.xlstm import xLSTMForCausalLM as BuiltinModel

    # hidden 128: the built-in cache needs q/k widths that are multiples of 64 (a known defect of it). num_blocks is
    # what its model builds; its config.json keeps num_hidden_layers at the default of 32 beside it.
    config = BuiltinConfig(vocab_size=101, hidden_size=128, num_blocks=2, num_heads=4, chunk_size=16, **fields)
    assert config.to_dict()["num_hidden_layers"] == 32
    ref = randomize_(BuiltinModel(config)).eval()
    ref.save_pretrained(tmp_path)
    if fused:
        fuse_builtin_checkpoint(tmp_path)
    return tmp_path, ref


@pytest.mark.parametrize(
    "fields",
    # fields the built-in model does not read: it always has the output norm and never ties the head; with use_bias
    # its output norm alone has no bias (ours has one, zeroed on load)
    [{}, {"tie_word_embeddings": True, "add_out_norm": False}, {"use_bias": True}],
    ids=["defaults", "unread-fields", "use-bias"],
)
@pytest.mark.parametrize("fused", [False, True], ids=["single", "fused"])
def test_transformers_builtin_parity(tmp_path, fused, fields):
    path, ref = transformers_xlstm_dir(tmp_path, fused, **fields)
    ours = xlstm_hf.xLSTMForCausalLM.from_pretrained(path).eval()
    assert ours.config.model_type == "xlstm_hf" and ours.config.architecture == "7b"
    assert ours.config.num_hidden_layers == len(ref.backbone.blocks) == 2
    # only xLSTMConfig's own fields: nothing of the built-in's (weight_mode, kernels) nor of the conversion
    known = {f.name for f in dataclasses.fields(xlstm_hf.xLSTMConfig)} | set(xlstm_hf.xLSTMConfig().to_dict())
    saved = ours.config.to_dict()
    assert "source_weight_mode" not in saved and set(saved) <= known, set(saved) - known
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        assert (ref(ids, use_cache=False).logits - ours(ids).logits).abs().max() <= ATOL
    if fields.get("use_bias"):
        assert ref.backbone.blocks[0].norm_mlstm.bias.abs().max() > 0  # the other biases are the checkpoint's
        assert ref.backbone.out_norm.bias is None and not ours.backbone.out_norm.bias.any()


@pytest.mark.parametrize("fused", [False, True], ids=["single", "fused"])
def test_transformers_builtin_backbone_alone(tmp_path, fused):
    """xLSTMModel from a built-in causal-LM checkpoint, as a base model loads from any: the head is left out, every
    other weight used (the output norm's bias, which the built-in lacks, zero)."""
    path, ref = transformers_xlstm_dir(tmp_path, fused, use_bias=True)
    base, info = xlstm_hf.xLSTMModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        want = ref.backbone(ids, use_cache=False).last_hidden_state
        assert (want - base.eval()(ids).last_hidden_state).abs().max() <= ATOL


def test_transformers_builtin_load_keeps_from_pretrained_options(tmp_path):
    """dtype, loading info and config overrides as for any checkpoint; the fused layout refuses what it cannot do."""
    path, _ = transformers_xlstm_dir(tmp_path)
    model, info = xlstm_hf.xLSTMForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, output_loading_info=True, max_inference_chunksize=8
    )
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.config.max_inference_chunksize == 8
    assert not info["missing_keys"] and not info["unexpected_keys"]
    fused, _ = transformers_xlstm_dir(tmp_path / "fused", fused=True)
    assert xlstm_hf.xLSTMForCausalLM.from_pretrained(fused, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="device_map.*convert_transformers_xlstm"):
        xlstm_hf.xLSTMForCausalLM.from_pretrained(fused, device_map="cpu")


def test_transformers_builtin_config_with_two_widths_is_refused():
    from transformers.models.xlstm import xLSTMConfig as BuiltinConfig

    from xlstm_hf.convert import config_from_transformers_xlstm

    source = BuiltinConfig(vocab_size=101, hidden_size=256, embedding_dim=128, num_blocks=2, num_heads=4).to_dict()
    with pytest.raises(ValueError, match="embedding_dim=128 != hidden_size=256"):
        config_from_transformers_xlstm(source)


def test_transformers_checkpoint_with_foreign_weights_fails_loudly(tmp_path):
    path, _ = transformers_xlstm_dir(tmp_path)
    sd = load_file(path / "model.safetensors")
    sd["backbone.blocks.0.mlstm_layer.mystery.weight"] = torch.zeros(2)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mystery"):
        xlstm_hf.xLSTMForCausalLM.from_pretrained(path)


def test_cli_converters(tmp_path):
    src, ref = transformers_xlstm_dir(tmp_path / "hf")
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_transformers_xlstm.py"), str(src), str(out)], check=True
    )
    ours = xlstm_hf.xLSTMForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (ref(ids, use_cache=False).logits - ours(ids).logits).abs().max() <= ATOL

    pkg = xlstm_package_model([1], 2)
    (tmp_path / "pkg").mkdir()
    torch.save(pkg.state_dict(), tmp_path / "pkg" / "model.pt")
    cfg = {
        "vocab_size": 101,
        "context_length": 64,
        "num_blocks": 2,
        "embedding_dim": 64,
        "slstm_at": [1],
        "mlstm_block": {"mlstm": {"conv1d_kernel_size": 4, "num_heads": 4}},
        "slstm_block": {
            "slstm": {"backend": "vanilla", "num_heads": 4, "conv1d_kernel_size": 4},
            "feedforward": {"proj_factor": 1.3},
        },
    }
    (tmp_path / "pkg" / "config.json").write_text(json.dumps(cfg))
    out2 = tmp_path / "out2"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert_xlstm_package.py"),
            "--config",
            str(tmp_path / "pkg" / "config.json"),
            "--checkpoint",
            str(tmp_path / "pkg" / "model.pt"),
            str(out2),
        ],
        check=True,
    )
    ours2 = xlstm_hf.xLSTMForCausalLM.from_pretrained(out2).eval()
    with torch.no_grad():
        assert (pkg(ids) - ours2(ids).logits).abs().max() <= ATOL
