"""Tools that users plug into a transformers model, each used the way its documentation shows.

Every tool runs on the paper stack with an sLSTM block and on the 7B stack. The model has to meet the tool, not the
other way round: quantisers replace `nn.Linear` weights or whole modules, exporters trace with symbolic shapes.

Tolerances, float32 logits unless said:
- int8 weight-only (torchao) against the float32 model holding the same dequantised weights: the same products with
  the row scale applied after instead of before the sum: 1e-4.
- int8 weight-only against float32, as the relative RMS error of the centred logits: per-row rounding to 255 levels of
  the row's max-abs moves each product by ~0.5 - 1% of its size, and two blocks of products, norms and exponential
  gates compound that; measured 1.6 - 2.6% over 8 seeds for both stacks at these sizes. Bound: 5%.
- dynamic int8 (`quantize_dynamic`) against float32, same measure: activations are rounded too, per tensor, so a few
  large entries coarsen every other one; measured 5 - 8% on the generated steps (7 - 12% over a whole forward) over 6
  seeds. Bound: 20%.
- `torch.export`: the exported program runs the mLSTM in its parallel form (one graph for every length), eager in the
  chunkwise one: the same function in another float32 summation order, measured 6e-5 on these logits: 2e-4.
- ONNX Runtime: its own gemm (MLAS) and exp/log in another summation order: 1e-4 on logits of order 1, rtol 1e-4.
"""

import pytest
import torch
from conftest import left_padded, randomize_, tiny_config
from torch import nn

import xlstm_hf

FAMILIES = {
    "paper_slstm": dict(architecture="paper", slstm_at=[1], num_hidden_layers=2),
    "7b": dict(architecture="7b", num_hidden_layers=2),
}
INT8_WEIGHT_ONLY_REL = 0.05
DYNAMIC_INT8_REL = 0.20
EXPORT_TOL = dict(atol=2e-4, rtol=1e-4)
ONNX_TOL = dict(atol=1e-4, rtol=1e-4)


def make(family: str, scale: float = 0.3) -> xlstm_hf.xLSTMForCausalLM:
    """scale 0.3 makes the next-token distribution peaked, so greedy ties never decide a test; the quantisation tests
    take 0.1, where weights stay within the ranges training gives and rounding errors are not amplified by
    saturated gates."""
    config = tiny_config(**{**FAMILIES[family], "pad_token_id": 0})
    return randomize_(xlstm_hf.xLSTMForCausalLM(config), scale).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_relative_rms(actual: torch.Tensor, expected: torch.Tensor, bound: float):
    """||actual - expected|| / ||expected - its mean over the vocabulary|| <= bound (a shift of all logits is no
    error, so the reference is centred)."""
    err = ((actual - expected).norm() / (expected - expected.mean(-1, keepdim=True)).norm()).item()
    assert err <= bound, f"relative RMS error {err:.3g} > {bound}"


def assert_padded_batch_generates_each_row_alone(model: nn.Module, new_tokens: int = 8):
    prompts = [torch.randint(1, 96, (n,)) for n in (11, 4, 7)]
    batch, mask = left_padded(prompts)
    width = batch.shape[1]
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=new_tokens, do_sample=False)
            assert torch.equal(out[row, width:], alone[0, len(p) :]), f"row {row}"


def dequantised_copy(quantised: nn.Module, float_model: nn.Module) -> nn.Module:
    """The float32 model with each quantised linear's weight replaced by its dequantised value."""
    import copy

    ref = copy.deepcopy(float_model)
    q_linears = dict(quantised.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, nn.Linear):
                w = q_linears[name].weight
                m.weight.copy_(w.dequantize() if hasattr(w, "dequantize") else w)
    return ref


# ---------------------------------------------------------------------------------------------------------------------
# torchao int8 weight-only


def _int8_weight_only_config():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _check_int8_weight_only(quantised: nn.Module, float_model: nn.Module, keep_float: tuple[str, ...] = ()):
    for name, m in quantised.named_modules():
        if isinstance(m, nn.Linear):
            assert (type(m.weight) in (nn.Parameter, torch.Tensor)) == (name.rsplit(".", 1)[-1] in keep_float), name
    ids = torch.randint(1, 96, (4, 19))  # 76 rows: past any row-count threshold; 19: two chunks of 8 and a partial one
    got = logits(quantised, ids)
    torch.testing.assert_close(got, logits(dequantised_copy(quantised, float_model), ids), atol=1e-4, rtol=1e-4)
    assert_relative_rms(got, logits(float_model, ids), INT8_WEIGHT_ONLY_REL)
    assert_padded_batch_generates_each_row_alone(quantised)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torchao_int8_weight_only_through_from_pretrained(family, tmp_path):
    from transformers import TorchAoConfig

    model = make(family, 0.1)
    model.save_pretrained(tmp_path)
    quantised = xlstm_hf.xLSTMForCausalLM.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(_int8_weight_only_config())
    ).eval()
    # transformers keeps the output embeddings in float by default (TorchAoConfig.modules_to_not_convert), and the
    # model's _keep_in_fp32_modules keeps the mLSTM gate projections (one output per head) out of every quantiser
    _check_int8_weight_only(quantised, model, keep_float=("lm_head", "igate", "fgate", "igate_preact", "fgate_preact"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torchao_int8_weight_only_through_quantize_(family):
    import copy

    from torchao.quantization import quantize_

    model = make(family, 0.1)
    quantised = copy.deepcopy(model)
    quantize_(quantised, _int8_weight_only_config())  # every nn.Linear, head included
    _check_int8_weight_only(quantised, model)


# ---------------------------------------------------------------------------------------------------------------------
# torch.ao dynamic int8


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantize_dynamic_of_every_linear_generates(family):
    model = make(family, 0.1)
    quantised = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)  # a copy; head included
    assert isinstance(quantised.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    assert not any(type(m) is nn.Linear for m in quantised.modules())
    prompt = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        out = quantised.generate(
            prompt, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    assert out.sequences.shape == (2, 19)
    # each decoding step's logits against the float32 model's full forward over the same tokens
    steps = torch.stack(out.logits, dim=1)  # [B, 10, V]
    assert_relative_rms(steps, logits(model, out.sequences)[:, 8:-1], DYNAMIC_INT8_REL)


# ---------------------------------------------------------------------------------------------------------------------
# export


class LogitsOnly(nn.Module):
    """input_ids -> logits, the signature exporters and serving runtimes take."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def dynamic_shapes():
    """Any batch, any length from 2 (one token is a decoding step, which the model may run in its step form)."""
    batch = torch.export.Dim("batch", min=1, max=16)
    seq = torch.export.Dim("seq", min=2, max=512)
    return {"input_ids": {0: batch, 1: seq}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_export_with_dynamic_batch_and_length_equals_eager(family):
    model = LogitsOnly(make(family))
    traced = torch.export.export(model, (torch.randint(1, 96, (2, 11)),), dynamic_shapes=dynamic_shapes())
    for shape in [(3, 19), (1, 5), (4, 40)]:  # traced at 2 chunks; here 3, 1 (partial) and 5 chunks of 8
        ids = torch.randint(1, 96, shape)
        with torch.no_grad():
            torch.testing.assert_close(traced.module()(ids), model(ids), **EXPORT_TOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_export_runs_in_onnxruntime(family, tmp_path):
    """Dynamic batch and length for the mLSTM-only 7B stack. With an sLSTM block the length is fixed: over a traced
    length the sLSTM recurrence is torch's `scan` operator (see test_torch_export...), which torch 2.13's ONNX
    decomposition cannot lower yet ("'SymInt' object has no attribute 'unsqueeze'" in scan's stack_y); at a fixed
    length the loop is unrolled."""
    import onnxruntime

    model = LogitsOnly(make(family))
    path = tmp_path / "model.onnx"
    has_slstm = "s" in model.model.config.block_types
    shapes = dynamic_shapes()
    if has_slstm:
        shapes["input_ids"].pop(1)
    torch.onnx.export(model, (torch.randint(1, 96, (2, 11)),), path, dynamo=True, dynamic_shapes=shapes, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for shape in [(3, 11), (1, 11)] if has_slstm else [(3, 19), (1, 5)]:
        ids = torch.randint(1, 96, shape)
        (got,) = session.run(None, {name: ids.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(ids), **ONNX_TOL)
