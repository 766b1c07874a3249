"""CTC over the LLM's vocabulary without a (tokens x vocabulary) log-softmax.

The CTC loss reads only the log-probabilities of the blank and of each row's target tokens, yet
``F.ctc_loss`` takes all of them: the plain way (``logits.float().log_softmax(-1)``) makes several
(B, T', 49,152) fp32 tensors a step (the cast, the log-softmax, and in the backward its gradient, the
CTC loss's dense gradient and the cast back), which made the backward of the CTC logits most of a
CTC-only training step on a CPU. Here each frame's log-normaliser is computed once, in fp32, a block of
frames at a time; only the columns CTC reads are gathered, relabelled to a small per-row alphabet
(``[blank] + the row's distinct target tokens``, a one-to-one relabelling, so repeats still need a blank
between them and the loss is the same); and the backward writes the logits' gradient in one pass, in
their own dtype: ``softmax * dL/dlse``, plus the gathered columns' own gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# frames per block of the normaliser's pass: 32 x 49,152 fp32 is 6.3 MB, within a core's share of cache (blocks of
# 16-64 frames ran the fastest on a 2-core AMD EPYC; a block of all frames, as the plain way, twice as slow)
ROWS_PER_BLOCK = 32


def _logsumexp_fp32(x: torch.Tensor) -> torch.Tensor:
    """(N, V) in any dtype -> (N,) fp32 logsumexp, without an (N, V) fp32 copy."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], ROWS_PER_BLOCK):
        out[i : i + ROWS_PER_BLOCK] = torch.logsumexp(x[i : i + ROWS_PER_BLOCK].float(), dim=-1)
    return out


class _PickedLogProbs(torch.autograd.Function):
    """log_softmax(logits)[n, cols[n, k]] for (N, V) logits and (N, K) columns, as (N, K) fp32."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # noqa: D401 - autograd's names
        lse = _logsumexp_fp32(logits)
        ctx.save_for_backward(logits, cols, lse)
        return logits.gather(1, cols).float() - lse[:, None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, cols, lse = ctx.saved_tensors
        g_lse = -grad.sum(1)  # each picked column is (its logit - lse): dL/dlse = -sum of their gradients
        out = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ROWS_PER_BLOCK):
            block = slice(i, i + ROWS_PER_BLOCK)
            out[block] = ((logits[block].float() - lse[block, None]).exp() * g_lse[block, None]).to(out.dtype)
        out.scatter_add_(1, cols, grad.to(out.dtype))
        return out, None


def plain_vocab_ctc_loss(logits: torch.Tensor, lengths: list[int], ids: list[list[int]], blank: int) -> torch.Tensor:
    """The same loss the plain way, through a (B, T', V) fp32 log-softmax: the reference ``vocab_ctc_loss``
    is checked against, and what `benchmarks/train_step.py --ab fused_ctc` times it against."""
    logp = logits.float().log_softmax(-1).transpose(0, 1)
    flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=logits.device)
    return F.ctc_loss(logp, flat, torch.tensor(lengths), torch.tensor([len(r) for r in ids]), blank=blank, zero_infinity=True)


def vocab_ctc_loss(logits: torch.Tensor, lengths: list[int], ids: list[list[int]], blank: int) -> torch.Tensor:
    """``F.ctc_loss(logits.log_softmax(-1), ids, blank=blank, zero_infinity=True)`` (the mean over the batch
    of each row's loss over its target length) for (B, T', V) ``logits``, computed as the module docstring says."""
    b, t, v = logits.shape
    alphabets = [[blank] + sorted(set(row) - {blank}) for row in ids]
    width = max(len(a) for a in alphabets)
    cols = torch.full((b, width), blank, dtype=torch.long)  # spare columns repeat the blank, and no label reads them
    for i, a in enumerate(alphabets):
        cols[i, : len(a)] = torch.tensor(a)
    index = [{tok: k for k, tok in enumerate(a)} for a in alphabets]
    labels = torch.tensor([index[i][tok] for i, row in enumerate(ids) for tok in row], dtype=torch.long)
    cols = cols.to(logits.device)[:, None, :].expand(b, t, width).reshape(b * t, width)
    picked = _PickedLogProbs.apply(logits.reshape(b * t, v), cols).reshape(b, t, width)
    loss = F.ctc_loss(picked.transpose(0, 1), labels.to(logits.device), torch.tensor(lengths),
                      torch.tensor([len(r) for r in ids]), blank=0, zero_infinity=True)
    # F.ctc_loss's backward returns w * (exp(log_probs) - occupancy) for each row's weight w in the loss:
    # the gradient with respect to the logits of a full log-softmax (whose own backward then leaves it as
    # it is, the probabilities summing to one). With respect to the picked log-probabilities themselves it
    # is -w * occupancy, so the exp(picked) term is taken back out here, value unchanged, on every frame
    # and column the loss's backward writes (rows whose loss is infinite, and so zeroed, get none).
    weight = torch.zeros(b, t, 1, device=logits.device)
    for i, (n, row) in enumerate(zip(lengths, ids)):
        if n >= len(row) + sum(x == y for x, y in zip(row, row[1:])):  # CTC needs a frame between repeats
            weight[i, :n] = 1.0 / (b * max(len(row), 1))
    extra = (picked.exp() * weight).sum()
    return loss - (extra - extra.detach())
