"""Taylor truncation bounds: exact suprema, minimal degrees, a-posteriori soundness."""

from __future__ import annotations

import math
import sys

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds.taylor import (
    _Balls,
    _ratio_range,
    taylor_degree_needed,
    taylor_error_bound,
    taylor_output_bound,
    taylor_ratio_range,
    taylor_weight_bound,
)
from attnprec.analysis.reference import reference
from attnprec.testing.inputs import FAMILIES, make_inputs

mpmath.mp.prec = 200


def _ratio(x: float, p: int) -> mpmath.mpf:
    x = mpmath.mpf(x)
    return mpmath.fsum(x**i / mpmath.factorial(i) for i in range(p + 1)) * mpmath.exp(-x)


@pytest.mark.parametrize(("radius", "degree"), [(0.5, 0), (1, 3), (2, 8), (4, 8), (8, 20), (3, 5)])
def test_weight_bound_is_the_supremum(radius, degree):
    b = taylor_weight_bound(radius, degree)
    grid = [radius * (2 * i / 400 - 1) for i in range(401)]
    sampled = max(abs(_ratio(x, degree) - 1) for x in grid)
    # Sound: above every sampled point; exact: the extremes are at +-R (monotone ratio).
    assert sampled <= b <= sampled * (1 + 1e-12)
    lagrange = radius ** (degree + 1) * math.exp(radius) / math.factorial(degree + 1)
    assert b <= lagrange * (1 + 1e-12)


def test_weight_bound_measured_figures():
    assert taylor_weight_bound(2, 8) == pytest.approx(8.66e-3, rel=1e-3)
    assert taylor_weight_bound(4, 8) == pytest.approx(27.9, rel=1e-2)


def _worst_exact(radius: float, degree: int) -> mpmath.mpf:
    """sup over inputs of |y_T - y| / max|v - y|, attained by two balanced key clusters at the
    extremes of r = T_P / exp (exact weight 1/2 each, v = 1 and 0): (b - a) / (b + a)."""
    pts = [-radius, radius] if degree % 2 == 0 else [-radius, 0.0, radius]
    vals = [_ratio(x, degree) for x in pts]
    a, b = min(vals), max(vals)
    y, y_t = mpmath.mpf(1) / 2, b / (a + b)  # cluster at the max ratio carries v = 1
    return abs(y_t - y) / y if a > 0 else mpmath.inf


@pytest.mark.parametrize("radius", [1, 2, 4, 8])
@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4, 2.0**-11, 2.0**-8])
def test_degree_needed_is_minimal(radius, tol):
    p = taylor_degree_needed(radius, tol)
    assert taylor_output_bound(radius, p) <= tol
    assert _worst_exact(radius, p) <= tol
    if p > 0:  # the degree below fails on an explicit (limit) input
        assert _worst_exact(radius, p - 1) > tol


def test_odd_degree_can_vanish():
    lo, _ = taylor_ratio_range(4.0, 1)  # T_1(-4) = -3 < 0
    assert lo < 0
    assert taylor_output_bound(4.0, 1) == math.inf


def test_bad_arguments():
    with pytest.raises(ValueError, match="degree"):
        taylor_weight_bound(1.0, -1)
    with pytest.raises(ValueError, match="radius"):
        taylor_weight_bound(math.inf, 2)
    with pytest.raises(ValueError, match="tol"):
        taylor_degree_needed(1.0, 0.0)
    q = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="q"):
        taylor_error_bound(q * math.nan, q, q, 2)


@given(
    st.sampled_from([f for f in FAMILIES if f != "real"]),
    st.integers(1, 16),
    st.integers(1, 8),
    st.integers(0, 8),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_aposteriori_sound(family, n, d, degree, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(family, n_q=n, d_k=d, d_v=2, generator=g)
    bound = taylor_error_bound(q, k, v, degree, causal=causal)
    ref_t = reference("taylor", q, k, v, degree=degree, causal=causal)
    ref_s = reference("softmax", q, k, v, causal=causal)
    # |y_T - y| <= bound, with both exact values known to within their radii.
    assert bool(ref_t.contains(ref_s.value, bound + ref_s.radius).all())


def test_aposteriori_tightness():
    # Goal (docs/bounds.md): max-element ratio bound / |y_T - y| <= 4 on typical inputs.
    g = torch.Generator().manual_seed(7)
    q, k, v = make_inputs("typical", n_q=24, d_k=8, generator=g)
    for degree in (2, 4, 6):
        bound = taylor_error_bound(q, k, v, degree)
        ref_t = reference("taylor", q, k, v, degree=degree)
        ref_s = reference("softmax", q, k, v)
        obs = (ref_t.value - ref_s.value).abs()
        rad = ref_t.radius + ref_s.radius
        lo = obs - rad
        assert bool((lo > 0).all())
        assert float((bound / lo).max()) <= 4.0


def test_certified_ranges_without_python_flint(monkeypatch):
    """Without python-flint the ranges come from mpmath intervals: still enclosing, same figures."""
    from attnprec.analysis.bounds import minimax
    from attnprec.analysis.bounds.minimax import minimax_exp_coeffs, polynomial_ratio_range

    coeffs = minimax_exp_coeffs(2.0, 4)
    with_flint = _ratio_range.__wrapped__(3.0, 4), polynomial_ratio_range(coeffs, 2.0, 8)
    monkeypatch.setitem(sys.modules, "flint", None)  # import flint -> ImportError
    assert _Balls(64).flint is None
    minimax._ratio_range.cache_clear()
    without = _ratio_range.__wrapped__(3.0, 4), polynomial_ratio_range(coeffs, 2.0, 8)
    with mpmath.workprec(200):
        x = mpmath.mpf(3)
        t = sum(x**p / mpmath.factorial(p) for p in range(5))
        exact = (
            t * mpmath.exp(-x),
            sum((-x) ** p / mpmath.factorial(p) for p in range(5)) * mpmath.exp(x),
        )
    lo, hi = without[0]
    assert lo <= exact[0] and exact[1] <= hi
    poly = [float(c) for c in coeffs]
    samples = [
        float(mpmath.polyval(poly[::-1], x) * mpmath.exp(-x)) for x in mpmath.linspace(-2, 2, 201)
    ]
    for a, b in zip(with_flint, without, strict=True):
        assert b == pytest.approx(a, rel=1e-6)  # both overestimate by O(h^2), differently
    for lo, hi in (with_flint[1], without[1]):
        assert lo <= min(samples) and max(samples) <= hi


@pytest.mark.parametrize("method, kw", [("log", {})])
def test_a_scale_compute_does_not_hold_counts_its_representation(method, kw):
    """A kernel multiplies by the scale as rounded to compute (PyTorch rounds a Python
    float to the tensor's format first): where compute does not hold it, each of a term's
    scaled entries carries that rounding too (one per exponent in log's). The bound with a
    scale fp32 does not hold exceeds the one with its nearest fp32 value by at least that
    rounding's share. (The featured count takes the representation of a root of the scale
    on each side whatever the scale: ``_featured._roundings``.)"""
    from attnprec.analysis.bounds import attention_error_bound
    from attnprec.analysis.precision import Precision

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 32, 12, generator=g, dtype=torch.float64) for _ in range(3))
    s = 1 / math.sqrt(12) if method == "taylor" else 1 / 3
    s32 = float(torch.tensor(s, dtype=torch.float32))
    assert s32 != s
    prec = Precision("fp32", sums="linear") if method == "log" else Precision("fp32")
    loose = attention_error_bound(method, q, k, v, prec, scale=s, **kw).rounding
    held = attention_error_bound(method, q, k, v, prec, scale=s32, **kw).rounding
    assert bool((loose > held * (1 + 2.0**-16)).all())  # (0.09% at least here; 1e-7 before)


def _exact_gap(q, k, v, weight, scale):
    """|sum w v / sum w - sum e^s v / sum e^s| for one query row and one value column,
    with 300-bit mpmath (``weight(s)`` the method's weight of a logit)."""
    with mpmath.workprec(300):
        s = [scale * mpmath.fsum(mpmath.mpf(float(a)) * float(b)
                                 for a, b in zip(q[0], kj, strict=True)) for kj in k]  # fmt: skip
        vs = [mpmath.mpf(float(x)) for x in v[:, 0]]
        w, e = [weight(x) for x in s], [mpmath.exp(x) for x in s]
        yw = mpmath.fsum(a * b for a, b in zip(w, vs, strict=True)) / mpmath.fsum(w)
        ye = mpmath.fsum(a * b for a, b in zip(e, vs, strict=True)) / mpmath.fsum(e)
        return abs(yw - ye)


def test_products_below_the_normal_range_are_covered():
    """The float64 products ``w_j v_j`` may underflow (an absolute 2^-1075 each, which no
    relative rounding covers): polynomial weights of 1e-300 times a value of 1e-30 were
    bounded 353x below the error, subnormal values by taylor_error_bound's 0 (a review's
    find; the output does not depend on the coefficients' scale)."""
    from attnprec.analysis.bounds import polynomial_error_bound

    q = torch.tensor([[1.0]], dtype=torch.float64)
    k = torch.tensor([[-3.0], [3.0]], dtype=torch.float64)
    v = torch.tensor([[1e-30], [0.0]], dtype=torch.float64)
    for c in (1.0, 1e-300):
        b = float(polynomial_error_bound(q, k, v, [4 * c, -c], scale=1.0)[0, 0])
        gap = _exact_gap(q, k, v, lambda s, c=c: 4 * mpmath.mpf(c) - mpmath.mpf(c) * s, 1.0)
        assert gap <= b
    g = torch.Generator().manual_seed(1)
    q, k = (
        torch.randn(1, 4, generator=g, dtype=torch.float64),
        torch.randn(64, 4, generator=g, dtype=torch.float64),
    )
    v = torch.randint(0, 2**12, (64, 1), generator=g).double() * 2.0**-1074
    b = float(taylor_error_bound(q, k, v, 1, scale=0.5)[0, 0])
    assert _exact_gap(q, k, v, lambda s: 1 + s, 0.5) <= b


def test_bad_degree_and_coefficients_are_refused_by_name():
    """taylor_error_bound raised a bare OverflowError past degree 170; polynomial_error_bound
    flattened 2-D coefficients and took all zeros (the methods refuse both)."""
    from attnprec.analysis.bounds import polynomial_error_bound

    q = k = v = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="degree: expected at most 170"):
        taylor_error_bound(q, k, v, 171)
    with pytest.raises(ValueError, match="coeffs: expected a 1-D sequence"):
        polynomial_error_bound(q, k, v, torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="coeffs: expected a nonzero coefficient"):
        polynomial_error_bound(q, k, v, [0.0, 0.0])


def test_output_bound_where_the_ratio_overflows_float64():
    """r(-R) = T_P(-R) e^R past float64 (R ~ 700): (b - a) / (b + a) was inf / inf = NaN
    (a review); its supremum is 1 (mpmath: (b - a) / (b + a) = 1.0 to double precision)."""
    for radius, degree in ((700.0, 2), (690.0, 8)):
        lo, hi = taylor_ratio_range(radius, degree)
        assert lo > 0 and hi == math.inf
        assert taylor_output_bound(radius, degree) == 1.0
        mp_hi = sum(
            mpmath.mpf(-radius) ** p / mpmath.factorial(p) for p in range(degree + 1)
        ) * mpmath.exp(radius)
        assert (mp_hi - lo) / (mp_hi + lo) <= 1


def test_arguments_of_the_a_priori_bounds_are_checked():
    with pytest.raises(TypeError, match="radius"):
        taylor_weight_bound("1", 2)
    with pytest.raises(ValueError, match="max_degree"):
        taylor_degree_needed(1.0, 0.1, -1)
    with pytest.raises(TypeError, match="max_degree"):
        taylor_degree_needed(1.0, 0.1, 2.5)


def test_checked_before_the_cache():
    """The cache's keys equate ``True`` with 1 and 4.0 with 4: a call that raised in a fresh
    process was accepted once the equal key had been computed."""
    taylor_weight_bound(1.0, 4)
    taylor_weight_bound(2.0, 4)
    with pytest.raises(TypeError, match="^radius"):
        taylor_weight_bound(True, 4)
    with pytest.raises(TypeError, match="^degree"):
        taylor_weight_bound(2.0, 4.0)


def test_degree_needed_arguments_named():
    # "'<' not supported" before
    with pytest.raises(TypeError, match="^tol: expected a real number"):
        taylor_degree_needed(2.0, None)
    with pytest.raises(TypeError, match="^tol: expected a real number"):
        taylor_degree_needed(2.0, "0.1")
    with pytest.raises(TypeError, match="^max_degree"):
        taylor_degree_needed(2.0, 1e-3, None)
    # no degree taylor_attention takes (<= 170) reaches it: named max_degree, not degree
    with pytest.raises(ValueError, match="^max_degree: no degree <= 170"):
        taylor_degree_needed(200.0, 1e-3)
