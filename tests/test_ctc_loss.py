"""The CTC loss over the LLM's vocabulary (model/ctc.py) is the plain log-softmax + F.ctc_loss, to float
rounding, in value and gradient: the fused form only skips the work the loss never reads."""

import pytest
import torch

from steermoe_core.model import ctc
from steermoe_core.model.ctc import plain_vocab_ctc_loss as plain
from steermoe_core.model.ctc import vocab_ctc_loss


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_fused_ctc_loss_is_the_plain_one(dtype, tol, monkeypatch):
    monkeypatch.setattr(ctc, "ROWS_PER_BLOCK", 5)  # blocks that do not divide the frames
    torch.manual_seed(0)
    blank = 7
    ids = [[3, 3, 9, 41, 3],  # a repeated token needs a blank between its copies
           [12, blank, 30],  # the blank token inside a transcript
           [5] * 9,  # longer than its audio allows: infinite loss, zeroed
           [44, 2, 2, 17],
           []]  # an empty transcript: all blank
    lengths = [16, 11, 8, 16, 6]
    base = torch.randn(5, 16, 50, dtype=torch.float32) * 3
    got_x = base.clone().to(dtype).requires_grad_()
    want_x = base.clone().to(dtype).requires_grad_()
    got, want = vocab_ctc_loss(got_x, lengths, ids, blank), plain(want_x, lengths, ids, blank)
    assert torch.isfinite(got) and abs(got.item() - want.item()) <= tol * abs(want.item())
    got.backward()
    want.backward()
    assert got_x.grad.dtype == dtype
    err = (got_x.grad.float() - want_x.grad.float()).abs().max().item()
    assert err <= tol * want_x.grad.float().abs().max().item(), err
    assert got_x.grad[2].abs().max() == 0  # the impossible row adds nothing
