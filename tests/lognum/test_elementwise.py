"""log1mexp, log1pexp, logaddexp, logsubexp against mpmath (ulps of max(|exact|, 1))."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lognum_ref import (
    ULP_LIMIT,
    logs,
    near_pairs,
    ref_log1mexp,
    ref_log1pexp,
    ref_logaddexp,
    ref_logsubexp,
    ulp_error,
)

from attnprec.lognum import log1mexp, log1pexp, logaddexp, logsubexp

DTYPES = [torch.float32, torch.float64]
LN2_ = math.log(2.0)


def _check_unary(fn, ref, values, dtype):
    x = torch.tensor(values, dtype=dtype)
    got = fn(x)
    assert got.dtype == dtype
    for v, g in zip(values, got.tolist(), strict=True):
        err = ulp_error(g, ref(v), dtype)
        assert err <= ULP_LIMIT[dtype], (fn.__name__, v, g, err)


def _check_binary(fn, ref, pairs, dtype):
    a = torch.tensor([p[0] for p in pairs], dtype=dtype)
    b = torch.tensor([p[1] for p in pairs], dtype=dtype)
    got = fn(a, b)
    for (x, y), g in zip(pairs, got.tolist(), strict=True):
        err = ulp_error(g, ref(x, y), dtype)
        assert err <= ULP_LIMIT[dtype], (fn.__name__, x, y, g, err)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_log1mexp_ulps(dtype, data):
    vals = data.draw(st.lists(logs(dtype, allow_inf=True), min_size=1, max_size=16))
    _check_unary(log1mexp, ref_log1mexp, [-abs(v) for v in vals], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_log1pexp_ulps(dtype, data):
    vals = data.draw(st.lists(logs(dtype, allow_inf=True), min_size=1, max_size=16))
    _check_unary(log1pexp, ref_log1pexp, vals, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_logaddexp_ulps(dtype, data):
    pair = st.tuples(logs(dtype, allow_inf=True), logs(dtype, allow_inf=True))
    pairs = data.draw(st.lists(st.one_of(pair, near_pairs(dtype)), min_size=1, max_size=16))
    _check_binary(logaddexp, ref_logaddexp, pairs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_logsubexp_ulps(dtype, data):
    pair = st.tuples(logs(dtype, allow_inf=True), logs(dtype, allow_inf=True))
    pairs = data.draw(st.lists(st.one_of(pair, near_pairs(dtype)), min_size=1, max_size=16))
    pairs = [(max(a, b), min(a, b)) for a, b in pairs]  # the domain a >= b
    _check_binary(logsubexp, ref_logsubexp, pairs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    inf, nan = math.inf, math.nan
    t = lambda *v: torch.tensor(v, dtype=dtype)
    assert log1mexp(t(0.0)).item() == -inf
    assert log1mexp(t(-inf)).item() == 0.0
    assert math.isnan(log1mexp(t(1e-30)).item())
    assert math.isnan(log1mexp(t(nan)).item())
    assert log1pexp(t(inf)).item() == inf and log1pexp(t(-inf)).item() == 0.0
    assert logaddexp(t(-inf), t(-inf)).item() == -inf
    assert logaddexp(t(inf), t(inf)).item() == inf
    assert logaddexp(t(inf), t(-inf)).item() == inf
    assert math.isnan(logaddexp(t(nan), t(1.0)).item())
    x = t(-3.0, 0.0, 5.5, 1e30, -inf)
    assert torch.equal(logsubexp(x, x), torch.full_like(x, -inf))  # exactly -inf
    assert math.isnan(logsubexp(t(1.0), t(2.0)).item())
    assert math.isnan(logsubexp(t(inf), t(inf)).item())
    assert logsubexp(t(2.0), t(-inf)).item() == 2.0


def test_half_precision_computed_wider():
    x = torch.tensor([-1e-3, -0.5, -2.0], dtype=torch.float16)
    got = log1mexp(x)
    assert got.dtype == torch.float16
    want = log1mexp(x.to(torch.float64)).to(torch.float16)
    assert torch.equal(got, want)  # one rounding from the float64 result


def test_broadcasting_and_promotion():
    a = torch.zeros(3, 1, dtype=torch.float32)
    b = torch.zeros(1, 4, dtype=torch.float64)
    out = logaddexp(a, b)
    assert out.shape == (3, 4) and out.dtype == torch.float64


def _d_log1pexp(a):
    return 1 / (1 + mpmath.exp(-a))  # sigmoid


def _d_log1mexp(a):
    return mpmath.ninf if a == 0 else -1 / mpmath.expm1(-a)  # log(1 - e^a) -> -inf at 0


def _d_logaddexp(a, b):
    return 1 / (1 + mpmath.exp(b - a)), 1 / (1 + mpmath.exp(a - b))


def _d_logsubexp(a, b):
    if a == b:  # log(e^a - e^b) -> -inf: the derivatives diverge, +inf and -inf
        return mpmath.inf, mpmath.ninf
    return -1 / mpmath.expm1(b - a), -1 / mpmath.expm1(a - b)


def _near(x, k=2):
    """x and its k float64 neighbours on each side."""
    out = [x]
    for direction in (math.inf, -math.inf):
        y = x
        for _ in range(k):
            y = math.nextafter(y, direction)
            out.append(y)
    return out


# Far smaller second arguments: d/db ~ e^(b - a) had the relative error u |a - b| of the
# rounded difference (64 x the 8u rule at |a - b| ~ 580).
FAR = [(-396.31505974760677, -977.844758472748), (300.123456789, -400.987654321),
       (0.1, -700.3), (707.7, 0.2)]  # fmt: skip
# Differences below 2^-149: d/da = -1/(b - a) was inf (torch.frexp's derivative divides
# by a float32 power of two).
TINY_GAPS = [(0.0, -1e-100), (0.0, -1e-300), (1e-300, 0.0), (-1e-300, -1.000001e-300),
             (0.0, -1e-160), (5.0, 5.0 - 2.0**-50)]  # fmt: skip

GRAD_CASES = [
    (log1pexp, _d_log1pexp, [(v,) for v in [0.0, 5e-324, -5e-324, 1.0, -1.0, 18.0, 33.3,
                                            -37.0, -745.0, 709.0, math.inf, -math.inf]]),
    (log1mexp, _d_log1mexp, [(v,) for v in _near(-LN2_) + [-5e-324, -1e-300, -1e-3, -1.0,
                                                         -37.0, -745.0, 0.0, -math.inf]]),
    (logaddexp, _d_logaddexp, [(0.0, 0.0), (1.0, 1.0), (-5.0, -5.0), (3.0, 3.0 - 1e-15),
                               (0.0, -LN2_), (-745.0, 0.0), (700.0, -700.0), (-math.inf, 0.0),
                               (0.0, -math.inf), (math.inf, 0.0), (0.0, math.inf)] + FAR),
    (logsubexp, _d_logsubexp, [(0.0, b) for b in _near(-LN2_)]
     + [(1.0, 1.0), (30.0, 30.0 - 4e-15), (0.0, -1e-3), (0.0, -745.0), (2.0, 0.5),
        (1.0, -math.inf)] + FAR + TINY_GAPS),
]  # fmt: skip


@pytest.mark.parametrize("fn, deriv, points", GRAD_CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_gradients_at_special_points(fn, deriv, points):
    # Autograd against the analytic derivatives (mpmath) at the branch switches, ties,
    # zero and infinities. Rule (docs/accuracy.md): each gradient is the analytic
    # derivative evaluated with one exp/expm1 (2u), one log/log1p argument (u) and at most
    # three products or quotients (u each) at exact arguments: relative error <= 8u;
    # infinite and zero derivatives exactly, ones beyond the float range as +-inf, and
    # below the normal range an absolute 2^-1072 more. sigmoid(0) = 1/2 exactly.
    big = float(torch.finfo(torch.float64).max)
    for args in points:
        xs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in args]
        fn(*xs).backward()
        with mpmath.workprec(200):
            want = deriv(*(mpmath.mpf(v) for v in args))
            want = want if isinstance(want, tuple) else (want,)
            for x, w in zip(xs, want, strict=True):
                got = x.grad.item()
                if mpmath.isinf(w) or w == 0 or abs(w) > big:
                    assert got == float(w), (fn.__name__, args, got, w)
                else:
                    tol = 8 * 2.0**-53 * abs(w) + 2.0**-1072
                    assert abs(mpmath.mpf(got) - w) <= tol, (fn.__name__, args, got, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_halves(dtype):
    # The derivative of log1pexp at 0 is sigmoid(0) = 1/2 (it was 1: the kinks of
    # max(a, 0) and |a| at 0), and logaddexp(a, a) splits 1/2 and 1/2, in every dtype.
    a = torch.zeros(3, dtype=dtype, requires_grad=True)
    log1pexp(a).sum().backward()
    assert a.grad.tolist() == [0.5] * 3
    x = torch.tensor([0.0, 2.0], dtype=dtype, requires_grad=True)
    y = torch.tensor([0.0, 2.0], dtype=dtype, requires_grad=True)
    logaddexp(x, y).sum().backward()
    assert x.grad.tolist() == y.grad.tolist() == [0.5, 0.5]


def test_gradients_finite_away_from_branch_singularities():
    a = torch.tensor([-1e-3, -0.5, -LN2_, -3.0, -50.0], dtype=torch.float64, requires_grad=True)
    (log1mexp(a).sum() + log1pexp(a).sum()).backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize(
    "fn, args, name, exc",
    [
        (log1mexp, (torch.tensor([1, 2]),), "a", TypeError),
        (log1pexp, (torch.tensor([1j]),), "a", TypeError),
        (logaddexp, (torch.zeros(2), [0.0]), "b", TypeError),
        (logaddexp, (torch.zeros(2), torch.zeros(3)), "b", ValueError),
        (logsubexp, (torch.zeros(2, dtype=torch.int32), torch.zeros(2)), "a", TypeError),
    ],
)
def test_bad_input(fn, args, name, exc):
    with pytest.raises(exc, match=f"^{name}:"):
        fn(*args)
