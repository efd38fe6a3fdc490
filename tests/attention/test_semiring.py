"""Semirings: their terms, the tropical limit, and the linearized forms."""

from __future__ import annotations

import math
from fractions import Fraction

import _attn_bounds as B
import pytest
import torch

from attnprec.analysis.bounds.rounding import upper
from attnprec.analysis.reference import reference
from attnprec.attention import (
    LogExpMean,
    MixtureLSE,
    SoftMaxPlus,
    Tropical,
    favor_attention,
    favor_projection,
    semiring_attention,
)
from attnprec.testing.inputs import make_inputs


def test_terms():
    assert LogExpMean(2).terms == ((1.0, 2.0),)
    assert SoftMaxPlus(0.25).terms == ((1.0, 4.0),)
    assert MixtureLSE((1, 2), (0.5, 3)).terms == ((1.0, 0.5), (2.0, 3.0))
    assert Tropical().terms == ()
    s = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    assert torch.equal(MixtureLSE((1.0,), (1.0,)).rho(s), torch.exp(s))


@pytest.mark.parametrize("causal", [False, True])
def test_tropical_averages_ties_exactly(causal):
    """Integer q, k in {-1, 0, 1} and scale 1: logits exact, many tied maxima; the output is
    the mean of the tied values, off by at most gamma_t of their mean |v| (and the division),
    against the exact rational reference."""
    g = torch.Generator().manual_seed(5)
    q, k, v = make_inputs("ties", n_q=10, d_k=3, d_v=2, batch=(2,), generator=g)
    y = semiring_attention(q, k, v, semiring=Tropical(), causal=causal, scale=1.0)
    ref = reference("semiring", q, k, v, semiring=Tropical(), causal=causal, scale=1.0)
    s = q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), -math.inf)
    ties = s == s.amax(-1, keepdim=True)
    assert bool((ties.sum(-1) > 1).any()), "the family produces ties"
    count = ties.sum(-1, keepdim=True)
    mean_abs = (ties.double() @ v.abs()) / count
    bound = upper(B.gamma(10, B.U64) * mean_abs + B.U64 * (ref.value.abs() + mean_abs), 4)
    assert bool(ref.contains(y, slack=bound).all())


def test_softmaxplus_tends_to_tropical():
    """|y_tau - y_max| <= sum_{j != top} e^{-gap_j/tau} |v_j - v_top| (one exact maximum):
    checked for tau = 1 ... 1/64, with the bound falling like e^{-gap/tau}."""
    g = torch.Generator().manual_seed(6)
    q, k, v = make_inputs("typical", n_q=5, d_k=4, d_v=2, generator=g)
    scale = 0.5
    s = scale * q @ k.T
    trop = semiring_attention(q, k, v, semiring=Tropical(), scale=scale)
    top = s.argmax(-1)
    gap = s.amax(-1, keepdim=True) - s  # exact to within the logit rounding, ignored below 1e-9
    assert bool((gap.sort(-1).values[:, 1] > 1e-3).all()), "unique maxima"
    for tau in (1.0, 0.25, 0.0625, 1 / 64):
        y = semiring_attention(q, k, v, semiring=SoftMaxPlus(tau), scale=scale)
        ref = reference("semiring", q, k, v, semiring=SoftMaxPlus(tau), scale=scale)
        dv = (v.unsqueeze(0) - v[top].unsqueeze(1)).abs()  # [n_q, n_k, d_v]
        theory = (torch.exp(-gap / tau).unsqueeze(-1) * dv).sum(1)
        y_abs = ref.value.abs() + ref.radius
        rb = B.exp_weights_bound(
            q, k, v, y_abs, SoftMaxPlus(tau).terms, causal=False, scale=scale, u=B.U64
        )
        assert bool(((ref.value - trop).abs() <= upper(theory + ref.radius, 4)).all())
        assert bool(ref.contains(y, slack=rb).all())


@pytest.mark.parametrize(
    "semiring", [LogExpMean(0.5), SoftMaxPlus(2.0), MixtureLSE((0.5, 1.5), (0.25, 1.0))]
)
def test_linearized_taylor_converges(semiring):
    """Each c_r e^{lam_r s} replaced by c_r e_P(lam_r s): relative weight error at most
    rho = max_r e^{lam_r R} (lam_r R)^{P+1}/(P+1)!, so |y_P - y| <= rho/(1-rho) max|v - y|."""
    g = torch.Generator().manual_seed(7)
    q, k, v = make_inputs("typical", n_q=6, d_k=4, d_v=2, generator=g)
    scale = 0.5
    big_r = float(upper(scale * (q.abs() @ k.abs().T), 6).max())
    exact = reference("semiring", q, k, v, semiring=semiring, scale=scale)
    spread = (v.unsqueeze(0) - exact.value.unsqueeze(1)).abs().amax(1) + exact.radius
    errs = []
    for p in (2, 4, 6, 8, 10, 12):
        rho = max(
            math.exp(lam * big_r) * (lam * big_r) ** (p + 1) / math.factorial(p + 1)
            for _, lam in semiring.terms
        )
        if rho >= 1:
            continue
        y = semiring_attention(q, k, v, semiring=semiring, linearize=("taylor", p), scale=scale)
        coeffs = [
            sum(Fraction(c) * Fraction(lam) ** i for c, lam in semiring.terms) / math.factorial(i)
            for i in range(p + 1)
        ]
        theory = rho / (1 - rho) * spread
        rb = B.polynomial_bound(
            q,
            k,
            v,
            exact.value.abs() + exact.radius + theory,
            [float(c) for c in coeffs],
            causal=False,
            scale=scale,
            u=B.U64,
            exact_coeffs=coeffs,
        )
        assert bool(exact.contains(y, slack=upper(theory + rb, 4)).all())
        errs.append(float((y - exact.value).abs().max()))
    assert len(errs) >= 3 and errs[-1] < errs[0]


def test_linearized_favor_is_favor_per_term():
    """SoftMaxPlus(1) has the single term (1, 1): its FAVOR+ form is favor_attention."""
    g = torch.Generator().manual_seed(8)
    q, k, v = make_inputs("typical", n_q=7, d_k=4, generator=g)
    w = favor_projection(16, 4, generator=g)
    for causal in (False, True):
        a = semiring_attention(
            q, k, v, semiring=SoftMaxPlus(1.0), linearize=("favor", 16), projection=w, causal=causal
        )
        assert torch.equal(a, favor_attention(q, k, v, projection=w, causal=causal))
