"""FAVOR+: projections, the features, and unbiasedness for exp(scale q.k)."""

from __future__ import annotations

import math

import _attn_bounds as B
import mpmath as mp
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds.rounding import gamma
from attnprec.attention import favor_attention, favor_features, favor_projection

# z-test threshold: under the normal approximation of a mean of 2^14 i.i.d. block means,
# P(|Z| > 5) = 5.7e-7 is the false-failure rate of the unbiasedness tests (fixed seeds,
# so a run is reproducible; the rate is what a different seed would risk).
Z_MAX = 5.0
BLOCKS = 2**14


@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize(("m", "d"), [(1, 1), (5, 3), (8, 4), (13, 4), (64, 16)])
def test_projection_shape_and_seed(orthogonal, m, d):
    w = favor_projection(m, d, orthogonal=orthogonal, generator=torch.Generator().manual_seed(1))
    assert w.shape == (m, d) and w.dtype == torch.float64
    again = favor_projection(
        m, d, orthogonal=orthogonal, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(w, again)
    other = favor_projection(
        m, d, orthogonal=orthogonal, generator=torch.Generator().manual_seed(2)
    )
    assert not torch.equal(w, other)
    assert favor_projection(m, d, dtype=torch.float32).dtype == torch.float32


def _z(orthogonal: bool, seed: int, stretch: float = 1.0) -> float:
    """z statistic of the mean of the single-feature estimates m phi_f(q) phi_f(k) against
    exp(scale q.k); rows are grouped in blocks of d (independent across blocks)."""
    d = 4
    g = torch.Generator().manual_seed(seed)
    q, k = 0.6 * torch.randn(2, d, generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(d)
    w = stretch * favor_projection(d * BLOCKS, d, orthogonal=orthogonal, generator=g)
    est = w.shape[0] * favor_features(q, w, scale) * favor_features(k, w, scale)
    blocks = est.reshape(BLOCKS, d).mean(-1)
    mean, sd = float(blocks.mean()), float(blocks.std())
    return (mean - math.exp(scale * float(q @ k))) / (sd / math.sqrt(BLOCKS))


@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_unbiased_for_exp(orthogonal, seed):
    assert abs(_z(orthogonal, seed)) < Z_MAX


@pytest.mark.parametrize("orthogonal", [True, False])
def test_unbiasedness_test_detects_a_bias(orthogonal):
    """Power check: rows stretched by 1.1 (E = exp(1.21 |x'|^2/2 - ...), biased by about
    10 % here) fail the same test."""
    assert abs(_z(orthogonal, 0, stretch=1.1)) > Z_MAX


# Each example evaluates up to 3 x 32 features in 60-digit mpmath (~5 ms).
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.sampled_from([1, 7, 32]))
def test_features_within_bound(seed, d, m):
    """Relative error <= (1 + 2u) exp(gamma_{d+6} T) - 1, T = sum_c |W_fc x'_c| + |x'|^2/2
    + log(m)/2 (docstring of favor_features), against 60-digit mpmath."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(3, d, generator=g, dtype=torch.float64)
    w = favor_projection(m, d, generator=g)
    scale = 0.3
    got = favor_features(x, w, scale)
    mp.mp.dps = 60
    rs = mp.sqrt(mp.mpf(scale))
    for i in range(3):
        xs = [rs * mp.mpf(a) for a in x[i].tolist()]
        norm = mp.fsum(a * a for a in xs) / 2
        for f in range(m):
            wf = [mp.mpf(a) for a in w[f].tolist()]
            t = mp.fsum(a * b for a, b in zip(wf, xs, strict=True)) - norm - mp.log(m) / 2
            big_t = mp.fsum(abs(a * b) for a, b in zip(wf, xs, strict=True)) + norm
            big_t += mp.log(m) / 2
            exact = mp.exp(t)
            rel = (1 + 2 * B.U64) * mp.exp(gamma(d + 6, B.U64) * big_t) - 1
            assert abs(mp.mpf(float(got[i, f])) - exact) <= rel * exact


def test_large_inputs_do_not_overflow():
    """In float32, features of |x'| ~ 30 leave exp's range; the attention works with
    shifted log-features and stays finite."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (12 * torch.randn(3, 10, 4, generator=g, dtype=torch.float64)).float()
    w = favor_projection(16, 4, generator=g)
    f = favor_features(k, w, 0.5)
    assert bool(((f == 0) | torch.isinf(f)).any())
    assert torch.isfinite(favor_attention(q, k, v, projection=w)).all()


def test_underflowed_normalizer_raises():
    """Keys opposite to the queries (k = -q, |x'| ~ 40): every feature product is about
    e^-200 relative to the shifts, below float32's range, so the normalizer is exactly 0:
    ValueError naming num_features, or NaN rows with allow_nonpositive. float64 holds it."""
    g = torch.Generator().manual_seed(0)
    x = 30 * torch.randn(10, 4, generator=g)
    v = torch.randn(10, 4, generator=g)
    w = favor_projection(16, 4, generator=g)
    with pytest.raises(ValueError, match="num_features"):
        favor_attention(x, -x, v, projection=w, causal=True)
    y = favor_attention(x, -x, v, projection=w, causal=True, allow_nonpositive=True)
    assert bool(torch.isnan(y).any())
    y64 = favor_attention(x.double(), -x.double(), v.double(), projection=w, causal=True)
    assert torch.isfinite(y64).all()


def test_num_features_and_projection_agree():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    w = favor_projection(12, 4, generator=g)
    a = favor_attention(q, k, v, projection=w)
    assert torch.equal(a, favor_attention(q, k, v, projection=w, num_features=12))
    b = favor_attention(q, k, v, num_features=12, generator=torch.Generator().manual_seed(9))
    w9 = favor_projection(12, 4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(b, favor_attention(q, k, v, projection=w9))
