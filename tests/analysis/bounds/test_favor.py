"""FAVOR+ bounds: the variance formula, the probabilistic bound's violation rate, and the
deterministic bound for a fixed projection."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds.favor import (
    block_factor,
    favor_error_bound,
    favor_features_needed,
    favor_projection_error_bound,
    favor_variance,
)
from attnprec.analysis.reference import reference
from attnprec.attention import favor_attention, favor_projection
from attnprec.testing.inputs import make_inputs


def test_variance_matches_gaussian_integral():
    # d = 1: Var Z = E[Z^2] - exp(s)^2 with Z = exp(w (a + b) - (a^2 + b^2)/2), w ~ N(0, 1).
    mpmath.mp.dps = 30
    q = torch.tensor([[0.7]], dtype=torch.float64)
    k = torch.tensor([[-0.3], [1.1]], dtype=torch.float64)
    var = favor_variance(q, k, 1, scale=1.0)
    for j in range(2):
        a, b = mpmath.mpf(0.7), mpmath.mpf(float(k[j, 0]))

        def f(w, a=a, b=b):
            return mpmath.npdf(w) * mpmath.exp(2 * w * (a + b) - (a * a + b * b))

        second = mpmath.quad(f, [-mpmath.inf, 0, mpmath.inf])
        exact = second - mpmath.exp(2 * a * b)
        assert float(var[0, j]) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(("orthogonal", "m"), [(False, 16), (True, 8)])
def test_violation_rate_below_delta(orthogonal, m):
    """Draws stay within the bound at the stated rate; with ``orthogonal=True`` its
    variances carry block_factor (m = 8 in blocks of d_k = 4: 4, so the bound is the i.i.d.
    one of 2 features)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = make_inputs("typical", n_q=6, d_k=4, d_v=2, generator=g)
    q, k = q * 0.5, k * 0.5
    delta, trials = 0.2, 200
    bound = favor_error_bound(q, k, v, m, delta, orthogonal=orthogonal)
    if orthogonal:
        iid = favor_error_bound(q, k, v, 2, delta)
        torch.testing.assert_close(bound, iid, rtol=1e-14, atol=0)
    ref = reference("softmax", q, k, v)
    fails = 0
    for _ in range(trials):
        w = favor_projection(m, 4, orthogonal=orthogonal, generator=g)
        y = favor_attention(q, k, v, num_features=m, projection=w)
        fails += int(not bool(ref.contains(y, bound).all()))
    assert fails / trials <= delta


def test_union_bound_counts_the_batch_items():
    """Batch items share the kernel's one projection, so the union bound is over all their
    events: B identical items at delta bound as one item at delta / B (it counted one item's
    events only: a review measured some element outside in 71% of draws at delta = 0.5)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = make_inputs("typical", n_q=4, d_k=4, d_v=2, generator=g)
    q, k = q * 0.1, k * 0.1
    B, delta = 7, 0.3
    one = favor_error_bound(q, k, v, 256, delta / B)
    many = favor_error_bound(*(x.expand(B, *x.shape) for x in (q, k, v)), 256, delta)
    assert bool(torch.isfinite(one).all())
    torch.testing.assert_close(many, one.expand_as(many), rtol=1e-12, atol=0.0)


def test_orthogonal_features_can_exceed_the_iid_variance():
    """One orthogonal block (d = m = 2), query 0, keys (r, 0) and (0, r): by exact quadrature
    (Haar angle and reflection; chi(2) norms in closed form) the normalizer's estimate has a
    variance above the i.i.d. one, so the i.i.d. formula is no bound for orthogonal
    features; :func:`block_factor` (2 here) covers it."""
    mpmath.mp.dps = 30
    r = mpmath.mpf(1.5)
    keys, w = ((r, 0), (0, r)), mpmath.exp(-r * r / 2)

    def chi2_mgf(c):  # E[exp(rho c)], rho ~ chi(2)
        return 1 + c * mpmath.sqrt(2 * mpmath.pi) * mpmath.exp(c * c / 2) * mpmath.ncdf(c)

    def pair(th, s):  # E[Z(omega_1) Z(omega_2) | angle, reflection]
        u, p = (mpmath.cos(th), mpmath.sin(th)), (-s * mpmath.sin(th), s * mpmath.cos(th))
        return sum(w * w * chi2_mgf(u[0] * b[0] + u[1] * b[1]) * chi2_mgf(p[0] * c[0] + p[1] * c[1])
                   for b in keys for c in keys)  # fmt: skip

    grid = [j * mpmath.pi / 2 for j in range(5)]
    cross = sum(mpmath.quad(lambda t, s=s: pair(t, s), grid) for s in (1, -1)) / (4 * mpmath.pi)
    second = sum(w * w * mpmath.exp(((b[0] + c[0]) ** 2 + (b[1] + c[1]) ** 2) / 2)
                 for b in keys for c in keys)  # fmt: skip
    var, cov = second - 4, cross - 4  # E[Z] = 2
    ratio = float(1 + cov / var)  # Var of the mean of 2: orthogonal over i.i.d.
    assert 1 < ratio <= block_factor(2, 2)  # (1.0022)


def test_features_needed_grows_exponentially():
    for r in (0.5, 1.0, 1.5):
        expected = 2 * math.expm1(4 * r * r) * 1.1**2 / (0.1 * 0.1**2)
        assert favor_features_needed(r, 0.1, 0.1) == math.ceil(expected)
    with pytest.raises(ValueError, match="delta"):
        favor_features_needed(1.0, 0.1, 1.0)
    expected = 16 * 2 * math.expm1(4.0) * 1.1**2 / (0.1 * 0.1**2)
    assert favor_features_needed(1.0, 0.1, 0.1, block=16) == math.ceil(expected)
    with pytest.raises(ValueError, match="block"):
        favor_features_needed(1.0, 0.1, 0.1, block=0)
    assert block_factor(10, 4) == (2 * 16 + 4) / 10 and block_factor(7, 1) == 1


def test_bad_arguments():
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_features"):
        favor_error_bound(x, x, x, 0, 0.1)
    with pytest.raises(ValueError, match="projection"):
        favor_projection_error_bound(x, x, x, torch.zeros(4, 3))
    with pytest.raises(TypeError, match="^orthogonal"):
        favor_error_bound(x, x, x, 4, 0.1, orthogonal="yes")


@given(
    st.sampled_from(["typical", "outliers", "ties", "cancel", "sinks"]),
    st.integers(1, 12),
    st.integers(1, 8),
    st.sampled_from([4, 16, 32]),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_projection_bound_sound(family, n, d, m, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(family, n_q=n, d_k=d, d_v=2, generator=g)
    w = favor_projection(m, d, generator=g)
    bound = favor_projection_error_bound(q, k, v, w, causal=causal)
    ref_f = reference("favor", q, k, v, projection=w, causal=causal)
    ref_s = reference("softmax", q, k, v, causal=causal)
    assert bool(ref_f.contains(ref_s.value, bound + ref_s.radius).all())


def test_stabilizer_is_checked():
    from attnprec.analysis.bounds import attention_error_bound

    q = k = v = torch.zeros(1, 2, 2, dtype=torch.float64)
    W = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="^stabilizer: expected 'exponent' or 'data_dash'"):
        attention_error_bound("favor", q, k, v, projection=W, stabilizer="max")
    with pytest.raises(ValueError, match="^stabilizer: 'data_dash' is a shift of FAVOR"):
        attention_error_bound("softmax", q, k, v, stabilizer="data_dash")


def test_the_union_bound_counts_the_broadcast_batch():
    """q [1, n, d] against k, v [B, n, .] is B outputs sharing one projection: the union
    bound took q's batch (1) and was 45x smaller than for q expanded to B (a review: 52 of
    100 draws outside at delta = 0.5). Now the two agree."""
    g = torch.Generator().manual_seed(0)
    B, d = 200, 2
    q = 1.3 * torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    k = 1.3 * torch.randn(B, 4, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, 4, 1, generator=g, dtype=torch.float64)
    shared = favor_error_bound(q, k, v, 1024, 0.5, scale=1.0)
    expanded = favor_error_bound(q.expand(B, 1, d), k, v, 1024, 0.5, scale=1.0)
    assert torch.equal(shared, expanded)


def test_features_needed_past_float64_name_the_radius():
    with pytest.raises(ValueError, match="radius: no finite number of features"):
        favor_features_needed(30.0, 0.1, 0.1)


def test_a_feature_count_past_float64_names_the_radius():
    """e^(4 R^2) finite but the count 2 g (1 + tol)^2 / (delta tol^2) past float64 raised
    OverflowError from math.ceil (a review)."""
    from attnprec.analysis.bounds.favor import mixture_features_needed

    with pytest.raises(ValueError, match="radius: no finite number of features"):
        mixture_features_needed(((1.0, 1.0),), math.sqrt(700 / 4), 1e-3, 1e-6)


@pytest.mark.parametrize(
    "args, error, name",
    [
        (("1", 0.1, 0.1), TypeError, "radius"),  # float("1") before
        ((True, 0.1, 0.1), TypeError, "radius"),
        ((1.0, None, 0.1), TypeError, "tol"),  # "'<' not supported" before
        ((1.0, 0.1, None), TypeError, "delta"),
        ((1.0, 0.1, 1.5), ValueError, "delta"),
    ],
)
def test_features_needed_arguments_named(args, error, name):
    with pytest.raises(error, match=f"^{name}: expected"):
        favor_features_needed(*args)
