"""scripts/memory_gpu_estimate.py on a 2-layer "7b" model at 64 tokens: the estimator's bytes against analytic counts,
against real tensors and against torch's own MemTracker, and its detector of per-step weight copies.

The tiny widths (vocab 97, hidden 32, q/k 16, FFN 128, 2 heads) differ from the 64 tokens, so no activation has the
shape of a weight by accident; chunk_size 8 runs the chunkwise kernel over several chunks.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import enable_checkpointing

import xlstm_hf.modeling_xlstm as modeling

TOKENS = 64


def load_script():
    path = Path(__file__).parents[1] / "scripts" / "memory_gpu_estimate.py"
    spec = importlib.util.spec_from_file_location("memory_gpu_estimate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


estimate = load_script()


def tiny_config():
    return estimate.config_7b(2, vocab_size=97, hidden_size=32, num_heads=2, chunk_size=8)


@pytest.fixture(scope="module")
def steps():
    return {ckpt: estimate.training_step_memory(tiny_config(), TOKENS, ckpt) for ckpt in (False, True)}


def test_parameters_and_gradients_match_the_analytic_bytes(steps):
    config = tiny_config()
    model = modeling.xLSTMForCausalLM(config).to(torch.bfloat16)
    params = list(model.parameters())
    analytic = sum(p.numel() * p.element_size() for p in params)
    assert estimate.analytic_parameter_count(config) * 2 == analytic
    for m in steps.values():
        assert m.parameters == analytic
        assert m.gradients == m.parameters
        assert m.gradient_allocations == m.parameter_tensors == len(params)  # one new storage per gradient
        assert m.peak >= m.parameters + m.gradients


def test_checkpointing_lowers_the_activation_peak(steps):
    plain, ckpt = steps[False], steps[True]
    assert ckpt.activation_peak < plain.activation_peak
    assert ckpt.held_after_forward < plain.held_after_forward
    assert ckpt.peak < plain.peak


def non_activations(m) -> dict:
    return {key: n for key, n in m.weight_sized.items() if key[0] != "activation"}


def test_fake_tensors_count_the_bytes_of_real_ones():
    for ckpt in (False, True):
        fake = estimate.training_step_memory(tiny_config(), TOKENS, ckpt, as_gpu=False)
        real = estimate.training_step_memory(tiny_config(), TOKENS, ckpt, fake=False, as_gpu=False)
        assert (fake.peak, fake.activation_peak, fake.held_after_forward) == (
            real.peak,
            real.activation_peak,
            real.held_after_forward,
        )
        # the real run also checks the token ids (a few [1, S] masks, activations): compare the rest
        assert non_activations(fake) == non_activations(real)


def test_peak_equals_torch_memtracker():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    config = tiny_config()
    for ckpt in (False, True):
        ours = estimate.training_step_memory(config, TOKENS, ckpt, fake=False, as_gpu=False)
        model = modeling.xLSTMForCausalLM(config).to(torch.bfloat16)
        if ckpt:
            enable_checkpointing(model)
        ids = torch.zeros(1, TOKENS, dtype=torch.long)
        tracker = mem_tracker.MemTracker()
        tracker.track_external(model)
        with tracker:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
        assert ours.peak == peak["Total"]


def test_no_weight_sized_temporaries(steps):
    for m in steps.values():
        assert m.flagged() == []
        kinds = {key[0] for key in m.weight_sized}
        assert kinds <= {"gradient", "activation", "constant"}


def concatenate_ffn_weights(model):
    """The first block's FFN runs on one weight concatenated per step, a weight-sized temporary."""
    ffn = model.backbone.blocks[0].ffn

    def forward(x):
        weight = torch.cat([ffn.proj_up_gate.weight, ffn.proj_up.weight])  # [2H, D]
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
        return ffn.proj_down(ffn.act(gate) * up)

    ffn.forward = forward


def test_detector_flags_a_concatenated_weight():
    config = tiny_config()
    m = estimate.training_step_memory(config, TOKENS, False, edit_model=concatenate_ffn_weights)
    weight_shape = (2 * config.ffn_dim, config.hidden_size)
    assert [(key[2], key[3]) for key in m.flagged()] == [("aten.cat.default", weight_shape)]


def test_context_parallel_estimate_counts_the_bytes_of_real_tensors():
    """The step of each rank position of 4 (first: one mLSTM pass per layer, middle: two, last: one), with the
    collectives' stand-ins, on fake tensors and on real ones: the same bytes."""
    config = tiny_config()
    fake = estimate.context_parallel_memory(config, 4 * TOKENS, 4)
    for name, rank in (("first", 0), ("middle", 1), ("last", 3)):
        with mock.patch.object(estimate.context_parallel, "dist", estimate.FakeCollectives(rank, 4)):
            real = estimate.training_step_memory(
                config,
                TOKENS,
                True,
                fake=False,
                edit_model=lambda m: estimate.context_parallel.enable_context_parallel(
                    m, estimate.FakeCollectives.ProcessGroup()
                ),
            )
        assert (fake[name].peak, fake[name].activation_peak) == (real.peak, real.activation_peak), name


def test_context_parallel_splits_the_activations():
    """A row of 4 x 64 tokens over 4 ranks: every rank's activation peak is a fraction of one process's on the whole
    row (a quarter of the tokens; a middle rank also holds its summary pass and the gathered summaries)."""
    config = tiny_config()
    whole = estimate.training_step_memory(config, 4 * TOKENS, True)
    per_rank = estimate.context_parallel_memory(config, 4 * TOKENS, 4)
    assert per_rank["middle"].activation_peak > per_rank["first"].activation_peak  # the two passes are counted
    for name, m in per_rank.items():
        assert m.activation_peak < 0.5 * whole.activation_peak, (name, m.activation_peak, whole.activation_peak)
