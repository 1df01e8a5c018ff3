"""The sLSTM reference's two forms: the Python loop (`slstm_recurrent`) and torch's scan operator (`slstm_scan`, what
an exported model runs over a traced length) give the same values: the same float32 ops in the same order."""

import pytest
import torch

from xlstm_hf.slstm_naive import slstm_recurrent, slstm_scan


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_scan_equals_the_loop(with_state, with_mask):
    torch.manual_seed(0)
    B, NH, S, DH = 2, 3, 9, 4
    x = torch.randn(B, NH, S, 4 * DH)
    r = torch.randn(NH, DH, 4 * DH) * 0.3
    state = (*(torch.randn(B, NH, DH) for _ in range(3)), torch.zeros(B, NH, DH)) if with_state else None
    mask = torch.rand(B, S) > 0.3 if with_mask else None
    h, final = slstm_scan(x, r, state, mask)
    h_ref, final_ref = slstm_recurrent(x, r, state, mask)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    for t, t_ref in zip(final, final_ref, strict=True):
        torch.testing.assert_close(t, t_ref, atol=0, rtol=0)
