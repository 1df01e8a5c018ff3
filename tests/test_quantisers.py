"""transformers' quantisers on both stacks: the big projections are quantised, the gate projections (one output per
head, `xLSTMHFPreTrainedModel._keep_in_fp32_modules`) stay float `nn.Linear`s by default.

hidden_size 64: bitsandbytes' CPU 4-bit inference kernel packs weights in blocks of 64 input features.

Tolerance, float32 logits, as the relative RMS error of the centred logits (test_tools.assert_relative_rms): at most
twice the error of the float32 model holding the same dequantised weights (the error a same-weights float run makes;
mamba_ssm's rule for a kernel against its reference). Weight rounding is nearly all of it: bitsandbytes 4-bit measured
1.00x (fp4 rounds these random weights coarsely: 34 - 59% on its own over 3 seeds), LLM.int8 1.4 - 1.65x (it rounds
the activations to int8 as well).
"""

import copy

import pytest
import torch
from conftest import randomize_, tiny_config
from torch import nn

import xlstm_hf

bnb = pytest.importorskip("bitsandbytes")

FAMILIES = {
    "paper_slstm": dict(architecture="paper", slstm_at=[1], num_hidden_layers=2),
    "7b": dict(architecture="7b", num_hidden_layers=2),
}
GATES = {"igate", "fgate", "igate_preact", "fgate_preact"}
SAME_WEIGHTS_ERROR_FACTOR = 2.0


def make(family: str) -> xlstm_hf.xLSTMForCausalLM:
    config = tiny_config(**{**FAMILIES[family], "hidden_size": 64, "pad_token_id": 0})
    return randomize_(xlstm_hf.xLSTMForCausalLM(config), 0.1).eval()


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / (expected - expected.mean(-1, keepdim=True)).norm()).item()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def linears(model: nn.Module, cls: type = nn.Linear) -> dict[str, nn.Module]:
    """The projections of the blocks by module name, lm_head left out (transformers keeps it float by default)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, cls) and ".blocks." in name}


def assert_gates_float_rest_quantised(model: nn.Module, quantised_type: type) -> None:
    projections = linears(model)
    gates = {n for n in projections if n.rsplit(".", 1)[-1] in GATES}
    mlstm_layers = sum(name.endswith(".mlstm_layer") for name, _ in model.named_modules())
    assert mlstm_layers > 0 and len(gates) == 2 * mlstm_layers, sorted(gates)
    for name, m in projections.items():
        if name in gates:
            assert type(m) is nn.Linear and type(m.weight) is nn.Parameter, name
            assert m.weight.dtype == torch.float32, name
        else:
            assert isinstance(m, quantised_type), (name, type(m))


def dequantised_copy(quantised: nn.Module, float_model: nn.Module) -> nn.Module:
    """The float32 model with each bitsandbytes linear's weight replaced by its dequantised value (before the first
    forward: bitsandbytes' CPU inference repacks 4-bit weights in place)."""
    ref = copy.deepcopy(float_model)
    q_modules = dict(quantised.named_modules())
    with torch.no_grad():
        for name, m in linears(ref).items():
            q = q_modules[name]
            if isinstance(q, bnb.nn.Linear4bit):
                m.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
            elif isinstance(q, bnb.nn.Linear8bitLt):
                m.weight.copy_(q.weight.data.float() * q.weight.SCB[:, None] / 127)
    return ref


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bitsandbytes_keeps_the_gates_float(family, bits, tmp_path):
    from transformers import BitsAndBytesConfig

    model = make(family)
    model.save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    quantised = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path, quantization_config=config).eval()
    assert_gates_float_rest_quantised(quantised, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    ids = torch.randint(1, 96, (2, 19))  # two chunks of 8 and a partial one
    reference, same_weights = logits(model, ids), logits(dequantised_copy(quantised, model), ids)
    error, bound = relative_rms(logits(quantised, ids), reference), relative_rms(same_weights, reference)
    assert error <= SAME_WEIGHTS_ERROR_FACTOR * bound, (error, bound)
    with torch.no_grad():
        out = quantised.generate(ids[:, :7], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_qlora_trains_and_generates(family, tmp_path):
    import math

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    make(family).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    quantised = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    assert_gates_float_rest_quantised(quantised, bnb.nn.Linear4bit)
    model = get_peft_model(prepare_model_for_kbit_training(quantised), LoraConfig(task_type="CAUSAL_LM", r=4))
    ids = torch.randint(1, 96, (2, 21))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids[:, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torchao_keeps_the_gates_float(family, tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    make(family).save_pretrained(tmp_path)
    quantised = xlstm_hf.xLSTMForCausalLM.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    ).eval()
    for name, m in linears(quantised).items():
        is_gate = name.rsplit(".", 1)[-1] in GATES
        assert (type(m.weight) is nn.Parameter) == is_gate, (name, type(m.weight))  # torchao swaps weight tensors


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quanto_keeps_the_gates_float(family, tmp_path):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear
    from transformers import QuantoConfig

    model = make(family)
    model.save_pretrained(tmp_path)
    quantised = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path, quantization_config=QuantoConfig(weights="int8"))
    assert_gates_float_rest_quantised(quantised.eval(), QLinear)
    ids = torch.randint(1, 96, (2, 19))
    with torch.no_grad():
        out = quantised.generate(ids[:, :7], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float16_load_keeps_the_gates_in_the_model_dtype(family, tmp_path):
    """`_keep_in_fp32_modules` would also upcast the gates of a float16 load, and the layers feed them float16
    activations: xLSTMHFPreTrainedModel._get_dtype_plan (a transformers hook) takes them out of that plan. Fails
    if transformers renames the hook."""
    model = make(family)
    model.save_pretrained(tmp_path)
    half = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert {m.weight.dtype for m in linears(half).values()} == {torch.float16}
    ids = torch.randint(1, 96, (2, 11))
    assert torch.isfinite(logits(half, ids)).all()
