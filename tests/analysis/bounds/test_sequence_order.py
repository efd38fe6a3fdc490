"""The probabilistic level where the data follow the sequence.

The level's summation model averages a sum's partial sums over the orders of its terms. A
kernel adds the keys in sequence order, so values sorted or trending along the sequence, or
an attention sink at its start, keep its partial sums large: a review measured correct fp32
kernels 4-15x outside the level on values sorted along the keys. The pair evaluations take
the larger of the average and the sequence order's own partial sums
(``rounding.sequence_sq``, exact at block boundaries); the state evaluation of linear
attention takes the same figure from prefix Gram states (``_state.sequence_sq``).
"""

from __future__ import annotations

import pytest
import torch
from _ssm_emulate import Z  # the kernel zoo (benchmarks/_kernels_zoo.py)

from attnprec.analysis.audit import audit
from attnprec.analysis.bounds import _state
from attnprec.analysis.bounds.rounding import order_sq, sequence_sq
from attnprec.analysis.precision import Precision

f64 = torch.float64


def _exact(p, v, vis):
    """The sum over a row's visible keys but its first of the partial sum's square (the
    first visible term is no addition)."""
    a = p.unsqueeze(-1) * v.unsqueeze(1)  # [B, r, m, d]
    S = a.cumsum(-2)
    later = vis & (vis.cumsum(-1) > 1)
    return (S * S * later.unsqueeze(-1)).sum(-2)


@pytest.mark.parametrize("causal", [False, True])
def test_sequence_sq_is_exact_for_blocks_of_one_key(causal):
    g = torch.Generator().manual_seed(0)
    B, r, m, d = 2, 7, 75, 3
    first = torch.tensor([1, 2, 31, 32, 33, 64, 75]) if causal else torch.full((r,), m)
    vis = (torch.arange(m) < first[:, None]).unsqueeze(0)
    window = vis & (torch.arange(m) >= first[:, None] - 20)  # later first keys
    p = torch.rand(B, r, m, generator=g, dtype=f64) * vis
    v = torch.randn(B, m, d, generator=g, dtype=f64)
    one = torch.ones(B, m, 1, dtype=f64)
    for mask in (vis, window):
        pm = p * mask
        num, den = sequence_sq(pm, v, mask, block=1)
        torch.testing.assert_close(num, _exact(pm, v, mask), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(den, _exact(pm, one, mask), rtol=1e-12, atol=1e-12)
    for block in (1, 8, 32):  # a prefix counted from `first`, or from the mask, or all keys
        a, b = sequence_sq(p, v, vis, first, block), sequence_sq(p, v, vis, None, block)
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
        if not causal:
            torch.testing.assert_close(sequence_sq(p, v, None, None, block), b, rtol=1e-13, atol=0)


def test_sequence_sq_sees_sorted_values_the_average_does_not():
    g = torch.Generator().manual_seed(1)
    B, r, m, d = 1, 4, 2048, 2
    p = torch.rand(B, r, m, generator=g, dtype=f64)
    p = p / p.sum(-1, keepdim=True)
    vis = torch.ones(1, r, m, dtype=torch.bool)
    v = torch.randn(B, m, d, generator=g, dtype=f64)
    for vv, lo, hi in ((v, 0.5, 2.0), (v.sort(-2).values, 0.9, 1.1)):
        exact = _exact(p, vv, vis)
        num, _ = sequence_sq(p, vv, None)
        assert bool(((num / exact) > lo).all() and ((num / exact) < hi).all())
    a = p.unsqueeze(-1) * v.sort(-2).values.unsqueeze(1)
    average = order_sq(a.sum(-2), (a * a).sum(-2), m)
    assert bool((_exact(p, v.sort(-2).values, vis) > 50 * average).all())  # what it missed


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 33, 70, 200])
def test_state_sequence_sq_is_the_pairs_figure(monkeypatch, causal, n, log):
    g = torch.Generator().manual_seed(n)
    B, F, K = 2, 3, 4
    a, b = (torch.randn(B, n, F, generator=g, dtype=f64) for _ in range(2))
    if log:  # exponents: keys rising along the sequence (the units rescale), one far above
        b = b + torch.linspace(0, 40, n, dtype=f64)[:, None]
        b[:, n // 2, 0] += 300.0
    v = torch.randn(B, n, K, generator=g, dtype=f64)
    for rows in (None, torch.tensor(sorted({0, n // 3, n // 2, n - 1}))):
        idx = torch.arange(n) if rows is None else rows
        if log:
            p = torch.exp(a[:, idx].unsqueeze(-2) + b.unsqueeze(-3)).sum(-1)
        else:
            p = a[:, idx] @ b.transpose(-1, -2)
        vis = idx[:, None] >= torch.arange(n) if causal else torch.ones(idx.numel(), n).bool()
        p = p * vis
        if log:
            p = p / p.sum(-1, keepdim=True)
        want, _ = sequence_sq(p, v, vis.unsqueeze(0), idx + 1 if causal else None)
        scale = n * float(((p.abs() @ v.abs()) ** 2).max())
        for entries in (_state.GRAM_ENTRIES, 1):  # one step, or one block per step
            monkeypatch.setattr(_state, "GRAM_ENTRIES", entries)
            got, tot = _state.sequence_sq(a[:, idx], b, v, causal, rows, log)
            if log:  # in the row's own unit
                ones = torch.ones_like(v[..., :1])
                _, tot1 = _state.sequence_sq(a[:, idx], b, ones, causal, rows, log)
                got = got / tot1**2
                torch.testing.assert_close(tot / tot1, p @ v, rtol=1e-12, atol=1e-12)
            assert float((got - want).abs().max()) <= 1e-12 * scale, (rows, entries)


def test_state_sequence_sq_under_a_far_later_key():
    # A key 400 above the rest (beyond _state.RISE): the steps end before its block, each
    # row in a unit of its own; before, rows far below a later key of their step had their
    # sums' squares underflow (0 / 0: the level took the sound bound, 7-78x the pairs')
    g = torch.Generator().manual_seed(0)
    n, F, K = 256, 4, 3
    a, b = (torch.randn(1, n, F, generator=g, dtype=f64) for _ in range(2))
    b[:, 200] += 400.0
    v = torch.randn(1, n, K, generator=g, dtype=f64)
    rows = torch.tensor([10, 100, 191, 199, 230])
    got, _ = _state.sequence_sq(a[:, rows], b, v, True, rows, log=True)
    _, tot = _state.sequence_sq(a[:, rows], b, torch.ones_like(v[..., :1]), True, rows, log=True)
    assert bool(got.isfinite().all()) and bool(tot.isfinite().all())
    p = torch.exp(a[:, rows].unsqueeze(-2) + b.unsqueeze(-3)).sum(-1)
    vis = rows[:, None] >= torch.arange(n)
    p = p * vis / (p * vis).sum(-1, keepdim=True)
    want, _ = sequence_sq(p, v, vis.unsqueeze(0), rows + 1)
    # row 199 shares key 200's block of 32: no figure (zeros), never a non-finite one
    keep = torch.tensor([True, True, True, False, True])
    torch.testing.assert_close((got / tot**2)[:, keep], want[:, keep], rtol=1e-9, atol=0)
    assert float(got[0, 3].abs().max()) == 0.0


@pytest.mark.parametrize(
    ("method", "evaluation"),
    [("softmax", "pairs"), ("linear", "pairs"), ("log", "pairs"), ("linear", "state")],
)
def test_correct_kernels_on_values_sorted_along_the_keys_are_not_atypical(method, evaluation):
    # before: 11,435 (7.9x the level) / 16,317 (14.7x) / 2,854 (3.7x) / ... of 32,768 elements
    q, k, v, params = Z.method_inputs(method, "typical", n=2048, d=16, dtype=torch.float32, seed=0)
    v = v.sort(-2).values  # negative first along the keys
    spec = Z.correct_kernel(method, Precision("fp32"))
    rep = audit(spec.fn, method, q, k, v, precision=spec.precision, **params, **spec.how,
                bound_options={"evaluation": evaluation})  # fmt: skip
    assert rep.cases[0].counts["atypical"] == 0, rep.cases[0].counts
    assert rep.cases[0].counts["within"] == 2048 * 16
