"""Taylor and polynomial attention: the packed features, the truncation rate, the normalizer."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import _attn_bounds as B
import mpmath as mp
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds.rounding import gamma, upper
from attnprec.analysis.reference import reference
from attnprec.attention import (
    polynomial_attention,
    taylor_attention,
    taylor_features,
    taylor_multinomials,
)
from attnprec.attention.taylor import taylor_coeffs
from attnprec.testing.inputs import make_inputs


@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("p", [0, 1, 2, 3, 4])
def test_features_are_the_packed_monomials(d, p):
    """Count C(d+p-1, p), lexicographic order of sorted index tuples, exact monomials."""
    primes = torch.tensor([2.0, 3.0, 5.0, 7.0, 11.0][:d], dtype=torch.float64)
    f = taylor_features(primes, p)
    tuples = list(itertools.combinations_with_replacement(range(d), p))
    assert f.shape == (math.comb(d + p - 1, p),) == (len(tuples),)
    expected = [math.prod(int(primes[i]) for i in t) for t in tuples]
    assert f.tolist() == expected  # products of small primes: exact, and unique per tuple
    w = taylor_multinomials(d, p)
    counts = [
        math.factorial(p) // math.prod(math.factorial(t.count(i)) for i in set(t)) for t in tuples
    ]
    assert w.tolist() == counts
    assert int(w.sum()) == d**p  # sum of the multinomials p!/alpha! over |alpha| = p


@given(
    st.integers(1, 6).flatmap(
        lambda d: st.tuples(
            st.lists(st.integers(-9, 9), min_size=d, max_size=d),
            st.lists(st.integers(-9, 9), min_size=d, max_size=d),
        )
    ),
    st.integers(0, 5),
)
def test_features_reproduce_the_power_exactly(xy, p):
    """(x.y)^p = sum_alpha (p!/alpha!) x^alpha y^alpha, exactly on small integers."""
    x = torch.tensor(xy[0], dtype=torch.float64)
    y = torch.tensor(xy[1], dtype=torch.float64)
    d = x.shape[0]
    got = (taylor_multinomials(d, p) * taylor_features(x, p) * taylor_features(y, p)).sum()
    assert float(got) == float(sum(a * b for a, b in zip(xy[0], xy[1], strict=True)) ** p)


@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(0, 5))
def test_features_on_floats_within_bound(seed, d, p):
    """On Gaussian floats: |computed - (x.y)^p| <= gamma_{2p + F} (|x|.|y|)^p (monomials
    2(p-1) roundings, the weight and the two products, the F-term sum), exact in Fractions."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, d, generator=g, dtype=torch.float64)
    f = math.comb(d + p - 1, p)
    got = (taylor_multinomials(d, p) * taylor_features(x, p) * taylor_features(y, p)).sum()
    xf, yf = [Fraction(a) for a in x.tolist()], [Fraction(b) for b in y.tolist()]
    exact = sum((a * b for a, b in zip(xf, yf, strict=True)), Fraction(0)) ** p
    absx = sum((abs(a * b) for a, b in zip(xf, yf, strict=True)), Fraction(0)) ** p
    assert abs(Fraction(float(got)) - exact) <= Fraction(gamma(2 * p + f, B.U64)) * absx


def _two_key_case(r):
    """One query, keys with logits r and 0, values 1 and 0: y = e^r / (e^r + 1)."""
    q = torch.tensor([[r]], dtype=torch.float64)
    k = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("r", [1.0, 2.0, -2.5])
def test_truncation_error_rate(r):
    """|y_P - y| (P+1)!/|r|^{P+1} lies in [min(1, e^r), max(1, e^r)] / ((e_P(r) + 1)(e^r + 1)):
    the error falls like R^{P+1}/(P+1)!, both sides checked, for P = 0..14 (up to the
    rounding bound)."""
    mp.mp.dps = 50
    q, k, v = _two_key_case(r)
    e = mp.exp(r)
    y = e / (e + 1)
    for p in range(15):
        if p % 2 == 1 and r < 0:
            continue  # odd P can make a weight negative; the rate statement is for even P here
        yp = float(taylor_attention(q, k, v, degree=p, scale=1.0)[0, 0])
        ep = mp.fsum(mp.mpf(r) ** i / mp.factorial(i) for i in range(p + 1))
        term = abs(mp.mpf(r)) ** (p + 1) / mp.factorial(p + 1) / ((ep + 1) * (e + 1))
        # Lagrange: e^r - e_P(r) = e^xi r^{P+1}/(P+1)!, xi between 0 and r.
        lo, hi = term * min(1, mp.exp(r)), term * max(1, mp.exp(r))
        rb = B.polynomial_bound(
            q,
            k,
            v,
            torch.tensor([[1.0]]),
            taylor_coeffs(p),
            causal=False,
            scale=1.0,
            u=B.U64,
            exact_coeffs=[Fraction(1, math.factorial(i)) for i in range(p + 1)],
        )
        err = abs(mp.mpf(yp) - y)
        assert lo - float(rb) <= err <= hi + float(rb), (p, err, lo, hi)


@pytest.mark.parametrize("family", ["typical", "outliers", "sinks", "ties", "cancel"])
@pytest.mark.parametrize("degree", [2, 4, 6, 8])
def test_taylor_converges_to_softmax(family, degree):
    """|y_P - y_softmax| <= rho/(1 - rho) max_j |v_j - y_softmax|, rho = e^R R^{P+1}/(P+1)!
    with R = max |s_ij| (Lagrange remainder, relative to e^s), plus rounding and radii."""
    g = torch.Generator().manual_seed(degree)
    q, k, v = make_inputs(family, n_q=6, d_k=4, d_v=2, generator=g)
    scale = 0.5
    # Rescale so that R = max |s_ij| is 3/4: the bound is informative (rho < 1) from P = 2.
    c = math.sqrt(0.75 / float((scale * q.abs() @ k.abs().T).max()))
    q, k = c * q, c * k
    big_r = float(upper(scale * (q.abs() @ k.abs().T), 6).max())
    rho = math.exp(big_r) * big_r ** (degree + 1) / math.factorial(degree + 1)
    assert rho < 1, "inputs chosen so that the bound is informative"
    soft = reference("softmax", q, k, v, scale=scale)
    spread = (v.unsqueeze(0) - soft.value.unsqueeze(1)).abs().amax(1) + soft.radius
    theory = rho / (1 - rho) * spread
    y = taylor_attention(q, k, v, degree=degree, scale=scale)
    y_abs = soft.value.abs() + soft.radius + theory
    rb = B.polynomial_bound(
        q,
        k,
        v,
        y_abs,
        taylor_coeffs(degree),
        causal=False,
        scale=scale,
        u=B.U64,
        exact_coeffs=[Fraction(1, math.factorial(i)) for i in range(degree + 1)],
    )
    assert bool(soft.contains(y, slack=upper(theory + rb, 4)).all())


def test_odd_degree_nonpositive_normalizer_raises():
    q = torch.tensor([[1.0]], dtype=torch.float64)
    k = torch.tensor([[-3.0], [0.5]], dtype=torch.float64)
    v = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    # P = 1: weights 1 - 3 = -2 and 1.5, normalizer -0.5.
    with pytest.raises(ValueError, match="degree"):
        taylor_attention(q, k, v, degree=1, scale=1.0)
    with pytest.raises(ValueError, match="degree"):
        taylor_attention(q, k, v, degree=1, scale=1.0, causal=False, chunk_size=1)
    y = taylor_attention(q, k, v, degree=1, scale=1.0, allow_nonpositive=True)
    assert float(y) == (-2.0 * 1.0 + 1.5 * 2.0) / -0.5  # the raw quotient, exact here
    with pytest.raises(ValueError, match="coeffs"):
        polynomial_attention(q, k, v, (1.0, 1.0), scale=1.0)


@pytest.mark.parametrize("degree", [0, 2, 4, 6])
def test_even_degree_never_raises(degree):
    """e_P(s) > 0 for even P: huge negative logits still give a positive normalizer."""
    g = torch.Generator().manual_seed(3)
    q, k, v = make_inputs("outliers", n_q=8, d_k=4, generator=g)
    y = taylor_attention(30 * q, -30 * k, v, degree=degree, causal=True)
    assert torch.isfinite(y).all()


def test_taylor_is_polynomial_with_inverse_factorials():
    g = torch.Generator().manual_seed(4)
    q, k, v = make_inputs("typical", n_q=9, d_k=3, generator=g)
    for causal in (False, True):
        a = taylor_attention(q, k, v, degree=3, causal=causal)
        b = polynomial_attention(q, k, v, taylor_coeffs(3), causal=causal)
        assert torch.equal(a, b)


def test_zero_coefficients_skip_their_features():
    """c = (1, 0, 1): only powers 0 and 2 are features, and the result is the same."""
    g = torch.Generator().manual_seed(5)
    q, k, v = make_inputs("typical", n_q=7, d_k=3, generator=g)
    y = polynomial_attention(q, k, v, (1.0, 0.0, 1.0))
    ref = reference("polynomial", q, k, v, coeffs=(1.0, 0.0, 1.0))
    y_abs = ref.value.abs() + ref.radius
    s = 1 / math.sqrt(3)
    bound = B.polynomial_bound(q, k, v, y_abs, (1.0, 0.0, 1.0), causal=False, scale=s, u=B.U64)
    assert bool(ref.contains(y, slack=bound).all())
