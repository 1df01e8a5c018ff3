"""The model's `backend` (a load-time option) picks the Triton kernels or the PyTorch implementation in
`recurrent_ops`, with the same results.

Without CUDA the Triton kernels run under the CPU interpreter (see kernel_testing.py); `recurrent_ops` imported the
kernel functions before the interpreter was switched on, so the tests hand it the interpreted ones.
Tolerances: float32 kernel vs float32 reference, relative ~1e-5 on logits after summation-order differences.
"""

import logging

import pytest
import torch
from conftest import randomize_, tiny_config
from kernel_testing import DEVICE, use_kernels_in_recurrent_ops

import xlstm_hf
from xlstm_hf import recurrent_ops

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture
def triton_kernels(monkeypatch):
    use_kernels_in_recurrent_ops(monkeypatch)


def pair(architecture: str):
    """The same weights under backend="torch" and backend="triton" (chunk_size 16: the kernel's smallest tile); the
    paper stack has an sLSTM block in the middle."""
    config = tiny_config(architecture, chunk_size=16, pad_token_id=0)
    ref = randomize_(xlstm_hf.xLSTMForCausalLM(config), 0.1).to(DEVICE)
    fast = xlstm_hf.xLSTMForCausalLM(tiny_config(architecture, chunk_size=16), backend="triton")
    fast.load_state_dict(ref.state_dict())
    return ref, fast.to(DEVICE)


@pytest.mark.parametrize("architecture", ["paper", "7b"])
def test_triton_backend_trains_like_the_reference(architecture, triton_kernels):
    ref, fast = pair(architecture)
    ids = torch.randint(1, 97, (2, 21), device=DEVICE)
    # a moderate step: with lr 0.1 the gates reach +-100 within two steps, where h is ill-conditioned and both
    # float32 implementations drift apart by ~1e-3 (see test_mlstm_naive's saturated-gate tolerance)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (ref, fast)]
    for _ in range(3):
        losses = []
        for model, opt in zip((ref, fast), opts, strict=True):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], **TOL)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast, p_ref, **TOL, msg=name)


@pytest.mark.parametrize("architecture", ["paper", "7b"])
def test_triton_backend_generates_the_same_tokens(architecture, triton_kernels):
    ref, fast = pair(architecture)
    prompt = torch.randint(1, 97, (2, 9), device=DEVICE)
    a = ref.eval().generate(prompt, max_new_tokens=8, do_sample=False)
    b = fast.eval().generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_auto_runs_the_reference_on_cpu_and_triton_without_a_device_warns_once(monkeypatch, caplog):
    ref = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config())).eval()
    ids = torch.randint(0, 97, (1, 10))
    expected = ref(ids).logits
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    recurrent_ops.logger.warning_once.cache_clear()  # transformers' once-per-process warning
    model = xlstm_hf.xLSTMForCausalLM(tiny_config(), backend="triton").eval()
    model.load_state_dict(ref.state_dict())
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
    warnings = [r.getMessage() for r in caplog.records if r.name == recurrent_ops.logger.name]
    # once for each op that fell back (the mLSTM and sLSTM sequence ops), naming the backend and the device
    assert len(warnings) == 2 and all('"triton"' in w and "cpu" in w for w in warnings), warnings


def test_model_trained_with_kernels_loads_on_cpu_with_the_reference(tmp_path, triton_kernels):
    """Trained a few steps with the Triton kernels (backend="triton"), saved, and loaded as a plain checkpoint
    (backend "auto": the PyTorch implementation without CUDA): the loaded model gives the kernel model's logits."""
    config = tiny_config("paper", chunk_size=16)
    model = randomize_(xlstm_hf.xLSTMForCausalLM(config, backend="triton"), 0.1).to(DEVICE)
    ids = torch.randint(1, 97, (2, 21), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(tmp_path)
    assert "backend" not in (tmp_path / "config.json").read_text()  # a run-time choice, not a fact of the weights
    loaded = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    assert loaded.backend == "auto"
    with torch.no_grad():
        kernel_logits = model.eval()(ids).logits
        torch.testing.assert_close(loaded(ids).logits, kernel_logits, **TOL)


def test_a_shape_the_kernel_refuses_runs_the_reference_and_says_why(triton_kernels, caplog):
    """The dispatch asks the kernel (`mlstm_chunkwise_unsupported`): chunk_size 8 is below the kernel's smallest tile,
    so the chunkwise op runs the PyTorch implementation, warns once naming the reason, and gives its logits."""
    ref = randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config("7b", chunk_size=8))).to(DEVICE).eval()
    fast = xlstm_hf.xLSTMForCausalLM(tiny_config("7b", chunk_size=8), backend="triton").to(DEVICE).eval()
    fast.load_state_dict(ref.state_dict())
    recurrent_ops.logger.warning_once.cache_clear()
    ids = torch.randint(1, 97, (1, 19), device=DEVICE)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fast(ids).logits, ref(ids).logits, atol=0, rtol=0)
    reasons = [r.getMessage() for r in caplog.records if r.name == recurrent_ops.logger.name]
    assert len(reasons) == 1 and "chunk_size=8" in reasons[0], reasons
