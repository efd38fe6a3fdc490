"""Signed sums, prefix sums and matrix products against mpmath, within their bound."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given
from hypothesis import strategies as st
from lognum_ref import (
    NP,
    PREC,
    U,
    check_sum_grad,
    exact_log_sum,
    exact_prefix_log_sums,
    log_diff,
    log_err,
    mlog,
)

from attnprec.lognum import (
    SignedLog,
    log_matmul_exp,
    logcumsumexp,
    logsumexp,
    signed_sum_error_bound,
)

DTYPES = [torch.float32, torch.float64]
F32, F64 = torch.float32, torch.float64
inf = math.inf
U64 = 2.0**-53


def weight_log_error(ws):
    """``term_log_error`` for weights (docstring of ``signed_sum_error_bound``): the
    largest term's weight enters through ``log|b_p|``, rounded; 0 for weights +-1."""
    return 3 * U64 * max((abs(math.log(abs(w))) for w in ws if w != 0), default=0.0)


def _check_ref(got_log, got_sign, ref, dtype, n, term_log_error=0.0):
    """``got`` within the relative bound (``log_abs_max`` given) of the exact
    ``ref = (log|s|, sign, log sum|x|, log max|x|)``; the sign exact where it is finite."""
    exact, sign, las, lam = ref
    if got_log == -inf:
        assert got_sign == 0  # a sum computed as exactly zero is (-inf, 0)
    if sign == 0:  # an exact zero: the bound is infinite (x + (-x) is tested apart)
        return math.inf
    bound = signed_sum_error_bound(n, las, float(exact), dtype, term_log_error, lam).item()
    if math.isfinite(bound):
        assert got_sign == sign
        assert log_diff(got_log, exact) <= bound, (got_log, float(exact), bound)
    return bound


@st.composite
def signed_vectors(draw, dtype, max_n=24):
    """Logs over a narrow, a wide and a huge range, random signs, and exact or near
    cancellation (a term repeated with the opposite sign, or nudged by one ulp)."""
    n = draw(st.integers(1, max_n))
    width = 32 if dtype == torch.float32 else 64
    scale = draw(st.sampled_from([3.0, 50.0, 800.0, 1e6]))
    elem = st.one_of(
        st.floats(-scale, scale, width=width), st.just(-inf), st.floats(-1.0, 1.0, width=width)
    )
    ls = draw(st.lists(elem, min_size=n, max_size=n))
    rs = draw(st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n))
    ss = [0 if v == -inf else r for v, r in zip(ls, rs, strict=True)]
    pick = draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))
    for i in range(n):
        if ls[i] != -inf and pick[i] < 2:
            v = NP[dtype](ls[i])
            if pick[i] == 1:
                v = np.nextafter(v, NP[dtype](-np.inf))
            ls.append(float(v))
            ss.append(-ss[i])
    return ls, ss


def _check_sum(got_log, got_sign, ls, ss, dtype, n, sums=None, term_log_error=0.0):
    """Within the bound of the exact sum: relative (``_check_ref``) given the terms, the
    absolute bound (without ``log_abs_max``) given only ``sums = (s, sum |x|)``."""
    if sums is None:
        ref = exact_log_sum(ls, ss)
        _check_ref(got_log, got_sign, ref, dtype, n, term_log_error)
        return ref[0], None
    exact, abs_sum = sums
    if got_log == -inf:
        assert got_sign == 0  # a sum computed as exactly zero is (-inf, 0)
    bound = signed_sum_error_bound(n, mlog(abs_sum), mlog(exact), dtype, term_log_error).item()
    if math.isfinite(bound):
        with mpmath.workprec(PREC):
            assert got_sign == (1 if exact > 0 else -1)
        assert log_err(got_log, exact) <= bound, (got_log, mlog(exact), bound)
    return exact, bound


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_sum_within_bound(dtype, data):
    ls, ss = data.draw(signed_vectors(dtype))
    x = SignedLog(torch.tensor(ls, dtype=dtype), torch.tensor(ss, dtype=torch.int8))
    s = x.sum()
    _check_sum(s.log.item(), s.sign.item(), ls, ss, dtype, len(ls))
    lse, sign = logsumexp(x.log, 0, b=x.sign.to(dtype), return_sign=True)
    _check_sum(lse.item(), int(sign.item()), ls, ss, dtype, len(ls))


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_cumsum_within_bound(dtype, data):
    ls, ss = data.draw(signed_vectors(dtype, max_n=10))
    x = SignedLog(torch.tensor(ls, dtype=dtype), torch.tensor(ss, dtype=torch.int8))
    c = x.cumsum(0)
    lc, sc = logcumsumexp(x.log, 0, b=x.sign.to(dtype), return_sign=True)
    for t, ref in enumerate(exact_prefix_log_sums(ls, ss)):
        _check_ref(c.log[t].item(), c.sign[t].item(), ref, dtype, t + 1)
        _check_ref(lc[t].item(), int(sc[t].item()), ref, dtype, t + 1)


@pytest.mark.parametrize("wide", [False, True])
def test_cumsum_many_blocks(wide):
    # Several blocks of 1024; "wide" spreads logs over +-3000 so that blocks take the
    # exact-shift scan (a prefix far below its block's largest log).
    g = torch.Generator().manual_seed(1)
    n = 2600
    spread = 3000.0 if wide else 4.0
    ls = ((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * spread).tolist()
    ss = [1 if v > 0.3 else -1 for v in torch.rand(n, generator=g).tolist()]
    x = SignedLog(torch.tensor(ls, dtype=torch.float64), torch.tensor(ss, dtype=torch.int8))
    c = x.cumsum(0)
    for t, ref in enumerate(exact_prefix_log_sums(ls, ss)):
        _check_ref(c.log[t].item(), c.sign[t].item(), ref, torch.float64, t + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_matmul_within_bound(dtype, data):
    n, k, p = (
        data.draw(st.integers(1, 2)),
        data.draw(st.integers(1, 5)),
        data.draw(st.integers(1, 2)),
    )
    width = 32 if dtype == torch.float32 else 64
    elem = st.one_of(st.floats(-40, 40, width=width), st.just(-inf))
    a = data.draw(st.lists(elem, min_size=n * k, max_size=n * k))
    b = data.draw(st.lists(elem, min_size=k * p, max_size=k * p))
    ra = data.draw(st.lists(st.sampled_from([-1, 1]), min_size=n * k, max_size=n * k))
    rb = data.draw(st.lists(st.sampled_from([-1, 1]), min_size=k * p, max_size=k * p))
    sa = [0 if v == -inf else r for v, r in zip(a, ra, strict=True)]
    sb = [0 if v == -inf else r for v, r in zip(b, rb, strict=True)]
    A = SignedLog(torch.tensor(a, dtype=dtype).reshape(n, k), torch.tensor(sa).reshape(n, k))
    B = SignedLog(torch.tensor(b, dtype=dtype).reshape(k, p), torch.tensor(sb).reshape(k, p))
    C = A @ B
    L, S = log_matmul_exp(A.log, B.log, A.sign, B.sign, return_sign=True)
    for i in range(n):
        for j in range(p):
            # The terms' logs a_ik + b_kj are formed exactly (double-double): no
            # term_log_error, and the bound is relative near 0.
            with mpmath.workprec(PREC):
                mt = [mpmath.mpf(a[i * k + r]) + mpmath.mpf(b[r * p + j]) for r in range(k)]
            st_ = [sa[i * k + r] * sb[r * p + j] for r in range(k)]
            ref = exact_log_sum(mt, st_)
            for got_l, got_s in (
                (C.log[i, j].item(), C.sign[i, j].item()),
                (L[i, j].item(), S[i, j].item()),
            ):
                _check_ref(got_l, got_s, ref, dtype, k)


@st.composite
def near_one_vectors(draw, dtype, max_n=12):
    """Sums near 1, where log|s| is small: a largest term ``+-e^p`` (``p`` 0 or a few ulps
    from it, or ``p = log(1/k)`` with ``k`` copies) and the others far below it (1 to
    2000 in log), with random signs; or cancellation among the others."""
    width = 32 if dtype == torch.float32 else 64
    k = draw(st.integers(1, 3))
    p = draw(st.sampled_from([0.0, -math.log(k), 2.0**-20, -(2.0**-30)]))
    p = float(NP[dtype](p))
    n = draw(st.integers(0, max_n))
    gaps = st.one_of(st.floats(1.0, 60.0, width=width), st.floats(60.0, 2000.0, width=width))
    ls = [p] * k + [float(NP[dtype](p - g)) for g in draw(st.lists(gaps, min_size=n, max_size=n))]
    ss = [draw(st.sampled_from([-1, 1]))] * k + draw(
        st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n)
    )
    if n and draw(st.booleans()):  # an exactly cancelling pair below the pivot
        ls.append(ls[-1])
        ss.append(-ss[-1])
    order = draw(st.permutations(range(len(ls))))
    return [ls[i] for i in order], [ss[i] for i in order]


def _well_conditioned(ref):
    exact, sign, las, _ = ref
    return sign != 0 and las - float(exact) <= 1.0  # kappa <= e


@given(data=st.data())
def test_float32_at_least_as_accurate_as_scipy(data):
    # Rule: ours is the float32 rounding of a float64 value within beta of the exact log,
    # so for any float32 f (SciPy's): |ours - exact| <= |f - exact| + 2 beta. beta is the
    # relative bound, so this holds near 0 too (SciPy's log1p form since gh-18295).
    ls, ss = data.draw(st.one_of(signed_vectors(F32), near_one_vectors(F32)))
    a = np.array(ls, dtype=np.float32)
    b = np.array(ss, dtype=np.float32)
    ref = exact_log_sum(ls, ss)
    if not _well_conditioned(ref):
        return  # the claim is for well-conditioned sums (kappa <= e)
    exact, _, las, lam = ref
    want, _ = scipy.special.logsumexp(a, b=b, return_sign=True)
    got = logsumexp(torch.from_numpy(a), 0, b=torch.from_numpy(b), return_sign=True)[0].item()
    beta = signed_sum_error_bound(len(ls), las, float(exact), F64, 0.0, lam).item()
    assert log_diff(got, exact) <= log_diff(float(want), exact) + 2 * beta


@given(data=st.data())
def test_float64_rounded_once(data):
    # float64 results are computed in double-double and rounded once (lognum/_dd.py): within
    # half an ulp of the exact log plus 2^-60 (|L| + |l_p| + |log|b_p|| + kappa') (l_p, b_p
    # the largest term's log and weight, kappa' the others' condition number), relative
    # near 0 when the largest term is near 1; hence never measurably less accurate than
    # SciPy's float64 logsumexp (weights of any size, or SignedLog signs).
    ls, ss = data.draw(st.one_of(signed_vectors(F64), near_one_vectors(F64)))
    if data.draw(st.booleans()):
        mags = data.draw(st.lists(st.floats(0.01, 100.0), min_size=len(ls), max_size=len(ls)))
        ss = [s * w for s, w in zip(ss, mags, strict=True)]
    ref = exact_log_sum(ls, ss)
    if not _well_conditioned(ref):
        return  # the claim is for well-conditioned sums (kappa <= e)
    exact, sign_x, las, lam = ref
    big_l = float(exact)
    parts = max(  # over the terms within 2^-30 of the largest (the pivot is one of them)
        abs(v) + abs(math.log(abs(w)))
        for v, w in zip(ls, ss, strict=True)
        if w != 0 and v != -inf and v + math.log(abs(w)) >= lam - 2.0**-30
    )
    k_rest = math.exp(las - big_l) * -math.expm1(lam - las)
    slack = 2.0**-60 * (abs(big_l) + parts + k_rest)
    a, b = torch.tensor(ls, dtype=F64), torch.tensor(ss, dtype=F64)
    got, sign = logsumexp(a, 0, b=b, return_sign=True)
    assert sign.item() == sign_x
    assert log_diff(got.item(), exact) <= math.ulp(abs(big_l)) / 2 + slack
    want, _ = scipy.special.logsumexp(np.array(ls), b=np.array(ss), return_sign=True)
    assert log_diff(got.item(), exact) <= log_diff(float(want), exact) + slack
    if all(abs(s) in (0, 1) for s in ss):
        got_sl = SignedLog(a, torch.tensor(ss, dtype=torch.int8)).sum()
        assert got_sl.log.item() == got.item()


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_near_one_relative(dtype, data):
    # log|s| near 0 keeps its relative accuracy: every reduction within the relative bound
    # (log_abs_max given), which near 0 is a multiple of |L| (and of D, kappa').
    ls, ss = data.draw(near_one_vectors(dtype))
    n = len(ls)
    ref = exact_log_sum(ls, ss)
    a, sg = torch.tensor(ls, dtype=dtype), torch.tensor(ss, dtype=torch.int8)
    x = SignedLog(a, sg)
    s = x.sum()
    _check_ref(s.log.item(), s.sign.item(), ref, dtype, n)
    got, sign = logsumexp(a, 0, b=sg.to(dtype), return_sign=True)
    _check_ref(got.item(), int(sign.item()), ref, dtype, n)
    if all(v > 0 for v in ss):
        _check_ref(logsumexp(a, 0).item(), 1, ref, dtype, n)
    # the same sum as a [1, n] @ [n, 1] product: a_i - 1/2 and 1/2 (the terms' logs exact)
    half = torch.full((n, 1), 0.5, dtype=dtype)
    with mpmath.workprec(PREC):
        lm = [mpmath.mpf(v) + mpmath.mpf(0.5) for v in (a - 0.5).tolist()]
    ref_m = exact_log_sum(lm, ss)
    lme, sme = log_matmul_exp((a - 0.5)[None], half, sg.to(dtype)[None], None, return_sign=True)
    _check_ref(lme.item(), int(sme.item()), ref_m, dtype, n)
    c = (SignedLog(a - 0.5, sg)[None] @ SignedLog(half)).log.item()
    _check_ref(c, s.sign.item(), ref_m, dtype, n)
    cs = x.cumsum(0)
    lc, sc = logcumsumexp(a, 0, b=sg.to(dtype), return_sign=True)
    for t, r in enumerate(exact_prefix_log_sums(ls, ss)):
        _check_ref(cs.log[t].item(), cs.sign[t].item(), r, dtype, t + 1)
        _check_ref(lc[t].item(), int(sc[t].item()), r, dtype, t + 1)


def test_scipy_gh18295_examples():
    # SciPy's examples: log(1 + e^-40) = 4.248e-18 in float32 and log(1 + e^-60) =
    # 8.756e-27 in float64, formerly 0; the results are now within the relative bound of
    # the exact value and at least as accurate as SciPy's (rule of the test above).
    for dtype, gap in ((F32, 40.0), (F64, 60.0)):
        a = torch.tensor([0.0, -gap], dtype=dtype)
        ref = exact_log_sum([0.0, -gap], [1, 1])
        beta = signed_sum_error_bound(2, ref[2], float(ref[0]), F64, 0.0, ref[3]).item()
        want = float(scipy.special.logsumexp(a.numpy()))
        results = [
            logsumexp(a, 0).item(),
            logsumexp(a, 0, b=torch.ones(2, dtype=dtype)).item(),
            SignedLog(a).sum().log.item(),
            logcumsumexp(a, 0)[1].item(),
            SignedLog(a).cumsum(0).log[1].item(),
            log_matmul_exp(a[None], torch.zeros(2, 1, dtype=dtype)).item(),
        ]
        for got in results:
            assert got > 0
            _check_ref(got, 1, ref, dtype, 2)
            assert log_diff(got, ref[0]) <= log_diff(want, ref[0]) + 2 * beta
        # the bound itself is relative: a few dozen units of roundoff of L
        assert signed_sum_error_bound(
            2, ref[2], float(ref[0]), F64, 0.0, ref[3]
        ) <= 48 * U64 * float(ref[0])


def test_scipy_semantics():
    a = torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, -inf]], dtype=torch.float64)
    b = torch.tensor([[1.0, -2.0, 0.5], [1.0, -1.0, 0.0]], dtype=torch.float64)
    got, sign = logsumexp(a, 1, b=b, return_sign=True)
    want, wsign = scipy.special.logsumexp(a.numpy(), axis=1, b=b.numpy(), return_sign=True)
    assert sign.tolist() == wsign.tolist() == [-1.0, 0.0]
    assert got[1].item() == -inf and abs(got[0].item() - want[0]) < 1e-15
    assert math.isnan(logsumexp(a, 1, b=b)[0].item())  # negative sum without return_sign
    assert logsumexp(a, None).shape == () and logsumexp(a, None, keepdim=True).shape == (1, 1)
    assert logsumexp(a, 0, keepdim=True).shape == (1, 3)
    # A zero weight drops its term even where a is inf or NaN (SciPy).
    r = logsumexp(torch.tensor([inf, math.nan, 0.0]), 0, b=torch.tensor([0.0, 0.0, 1.0]))
    assert r.item() == 0.0
    c, cs = logcumsumexp(a, 1, b=b, return_sign=True)
    assert cs[1].tolist() == [1.0, 0.0, 0.0] and c[1, 1].item() == -inf


def test_special_values():
    big = torch.tensor([1000.0, 1000.0], dtype=torch.float64)
    assert logsumexp(big, 0).item() == 1000.0 + math.log(2.0)
    assert logcumsumexp(big, 0, b=torch.tensor([1.0, -1.0], dtype=torch.float64))[1].item() == -inf
    assert logsumexp(torch.tensor([inf, 1.0]), 0).item() == inf
    assert math.isnan(logsumexp(torch.tensor([inf, inf]), 0, b=torch.tensor([1.0, -1.0])).item())
    assert logsumexp(torch.tensor([-inf, -inf]), 0).item() == -inf
    assert math.isnan(logsumexp(torch.tensor([0.0, math.nan]), 0).item())
    c = logcumsumexp(torch.tensor([0.0, 1.0, math.nan, 2.0]), 0)
    assert torch.isfinite(c[:2]).all() and torch.isnan(c[2:]).all()
    c = logcumsumexp(torch.tensor([0.0, inf, 1.0]), 0)
    assert abs(c[0].item()) <= signed_sum_error_bound(1, 0.0, 0.0, torch.float32).item()
    assert c[1:].tolist() == [inf, inf]
    assert logsumexp(torch.zeros(0), 0).item() == -inf


@pytest.mark.parametrize(
    "call, name, exc",
    [
        (lambda: logsumexp(torch.tensor([1, 2]), 0), "a", TypeError),
        (lambda: logsumexp(torch.zeros(3), 0, b=torch.zeros(2)), "b", ValueError),
        (lambda: logsumexp(torch.zeros(3), 2), "dim", ValueError),
        (lambda: logcumsumexp(torch.zeros(3, dtype=torch.complex64), 0), "a", TypeError),
        (lambda: log_matmul_exp(torch.zeros(2, 3), torch.zeros(2, 3)), "b", ValueError),
        (
            lambda: log_matmul_exp(
                torch.zeros(2, 3), torch.zeros(3, 2), a_sign=torch.full((2, 3), 2)
            ),
            "a_sign",
            ValueError,
        ),
    ],
)
def test_bad_input(call, name, exc):
    with pytest.raises(exc, match=f"^{name}:"):
        call()


def test_bound_properties():
    assert signed_sum_error_bound(10, 0.0, -inf).item() == inf  # exact zero
    assert signed_sum_error_bound(10, 60.0, 0.0).item() == inf  # kappa ~ 1e26: sign unknown
    b1 = signed_sum_error_bound(10, 0.0, 0.0).item()
    b2 = signed_sum_error_bound(10, 5.0, 0.0).item()
    assert 0 < b1 < b2 < 1e-10
    assert signed_sum_error_bound(10, 0.0, 0.0, torch.float32).item() > b1


@pytest.mark.parametrize(
    ("args", "exc", "name"),
    [
        ((4, 1.0, 0.5, torch.float64, -1.0), ValueError, "term_log_error"),  # gave a negative bound
        ((0, 1.0, 0.5), ValueError, "n"),  # -inf
        ((-1, 1.0, 0.5), ValueError, "n"),  # NaN
        ((2.5, 1.0, 0.5), TypeError, "n"),
        ((True, 1.0, 0.5), TypeError, "n"),
        ((4, 0.0, 1.0), ValueError, "log_abs_value"),  # |s| > sum |x|: clamped to kappa = 1
        ((4, 1.0, 0.5, torch.float64, 0.0, 2.0), ValueError, "log_abs_max"),
        ((4, torch.tensor(1 + 1j), 0.5), TypeError, "log_abs_sum"),
        ((4, math.nan, 0.5), ValueError, "log_abs_sum"),
    ],
)
def test_bound_arguments_checked(args, exc, name):
    """A review: no argument was checked; a negative error bound came back."""
    with pytest.raises(exc, match=f"^{name}:"):
        signed_sum_error_bound(*args)
    # a rounding of float32 logs is taken (|s| computed a few ulps above sum |x|)
    assert signed_sum_error_bound(4, 700.0, 700.0 + 2e-4).item() < 1e-10


@pytest.mark.parametrize("dim", [0, 1])
def test_piecewise_sums_within_bound(monkeypatch, dim):
    # Sums and prefix sums run through pieces of 2^20 elements; shrink the pieces so that
    # the piece loop (and the running total carried between pieces) runs at a small size.
    import attnprec.lognum.reductions as R

    monkeypatch.setattr(R, "_PIECE", 8)
    monkeypatch.setattr(R, "_PIECE_DD", 8)  # and the double-double float64 sums
    g = torch.Generator().manual_seed(3)
    shape = (37, 29)
    ls = (torch.rand(shape, generator=g, dtype=torch.float64) * 20 - 10).tolist()
    ss = [[1 if u > 0.4 else -1 for u in row] for row in torch.rand(shape, generator=g).tolist()]
    x = SignedLog(torch.tensor(ls, dtype=torch.float64), torch.tensor(ss, dtype=torch.int8))
    s, c = x.sum(dim), x.cumsum(dim)
    lines = range(shape[1 - dim])
    for i in lines:
        idx = [(t, i) if dim == 0 else (i, t) for t in range(shape[dim])]
        with mpmath.workprec(PREC):
            run, abs_run = mpmath.mpf(0), mpmath.mpf(0)
            for t, (a, b) in enumerate(idx):
                term = ss[a][b] * mpmath.exp(mpmath.mpf(ls[a][b]))
                run, abs_run = run + term, abs_run + abs(term)
                _check_sum(
                    c.log[a, b].item(), c.sign[a, b].item(), None, None, torch.float64, t + 1,
                    (run, abs_run),
                )  # fmt: skip
            _check_sum(
                s.log[i].item(), s.sign[i].item(), None, None, torch.float64, len(idx),
                (run, abs_run),
            )  # fmt: skip


@pytest.mark.parametrize("dtype, grad", [(F32, False), (F32, True), (F64, False)])
@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("probe", [1, None])
def test_sums_of_mixed_slices(monkeypatch, dtype, grad, dim, probe):
    # float32 sums are first tried without a shift, each slice accepted a posteriori;
    # the rest (zero, underflowing, overflowing, NaN, +inf sums) are summed again with a
    # shift. Autograd and float64 always shift. One batch mixes all kinds, reduced along
    # every dim: each slice must equal its own 1-d sum and lie within its bound. The
    # direct attempt is made when a sample of logs is in range: probe=1 samples the
    # first log of each slice (in range here), the default all of them (not).
    import attnprec.lognum.reductions as R

    if probe is not None:
        monkeypatch.setattr(R, "_PROBE", probe)
    rows = [
        ([0.5, -1.0, 2.0, 0.0], [1, -1, 1, 1]),  # ordinary, signed
        ([-inf] * 4, [0] * 4),  # exact zero
        ([-inf, -900.0, -901.0, -905.0], [0, 1, 1, -1]),  # underflows without a shift
        ([1.0, 709.5, 709.5, 709.0], [1, 1, 1, 1]),  # overflows without a shift
        ([0.0, 720.0, 719.0, -inf], [1, 1, -1, 0]),  # terms overflow without a shift
        ([3.0, 3.0, -inf, -inf], [1, -1, 0, 0]),  # exact cancellation
        ([0.0, math.nan, 1.0, 2.0], [1, 1, 1, 1]),  # NaN
        ([0.0, inf, 1.0, 2.0], [1, 1, -1, 1]),  # +inf
        ([0.0, -1000.0, -2.0, -inf], [1, 1, 1, 0]),  # a term that underflows alone
    ]
    # [2, 9, 4] with the summed axis moved to `dim`: slice i of the result is rows[i % 9].
    ls = torch.tensor([r[0] for r in rows] * 2, dtype=dtype).reshape(2, 9, 4).movedim(2, dim)
    ss = torch.tensor([r[1] for r in rows] * 2, dtype=torch.int8).reshape(2, 9, 4).movedim(2, dim)
    x = SignedLog(ls.clone().requires_grad_(grad), ss)
    s = x.sum(dim)
    got_l, got_s = s.log.detach().reshape(-1).tolist(), s.sign.reshape(-1).tolist()
    for i, (gl, gs) in enumerate(zip(got_l, got_s, strict=True)):
        rl, rs = rows[i % len(rows)]
        one = SignedLog(torch.tensor(rl, dtype=dtype), torch.tensor(rs, dtype=torch.int8)).sum()
        assert gs == one.sign.item()
        if math.isnan(gl):
            assert math.isnan(one.log.item()) and any(math.isnan(v) for v in rl)
            continue
        assert gl == one.log.item()
        if inf in rl:
            assert gl == inf and gs == 1
        else:
            _check_sum(gl, gs, rl, rs, dtype, len(rl))
    if grad:  # finite gradients, zero for unused sums, except where a NaN spreads
        used = torch.isfinite(s.log) & (s.sign != 0)
        s.log[used].sum().backward()
        clean = ~torch.isnan(x.log).any(dim, keepdim=True).expand_as(x.log)
        assert torch.isfinite(x.log.grad[clean]).all()
        assert (x.log.grad[~used.unsqueeze(dim).expand_as(x.log) & clean] == 0).all()


# --- infinite, subnormal and huge weights ------------------------------------------------

nan = math.nan
INF_CASES = [  # (a, b): SciPy's results where a weight is infinite
    ([0.0, 1.0], [inf, 1.0]),  # (inf, +1)
    ([0.0, 1.0], [-inf, 1.0]),  # (inf, -1)
    ([0.0, 1.0], [inf, -inf]),  # NaN
    ([-inf, 1.0], [inf, 1.0]),  # inf * exp(-inf) = inf * 0: NaN
    ([inf, 1.0], [inf, 1.0]),  # (inf, +1)
    ([inf, 1.0], [-inf, 1.0]),  # (inf, -1)
    ([nan, 1.0], [inf, 1.0]),  # NaN
    ([inf, 0.0], [-1.0, inf]),  # -inf + inf: NaN
    ([0.0, 1.0], [inf, 0.0]),  # a zero weight drops its term: (inf, +1)
    ([0.0, 5.0, -3.0], [-inf, 2.0, 1e300]),  # (inf, -1)
]


def _same_special(got, got_sign, want, want_sign):
    if math.isnan(want):
        assert math.isnan(got) and got_sign == 1  # our NaN carries sign +1 (SignedLog's)
    else:
        assert got == want and got_sign == want_sign


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a, b", INF_CASES)
def test_infinite_weights_match_scipy(dtype, a, b):
    ta, tb = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)  # 1e300: inf in f32
    with np.errstate(all="ignore"):
        want, want_sign = scipy.special.logsumexp(ta.numpy(), b=tb.numpy(), return_sign=True)
    got, sign = logsumexp(ta, 0, b=tb, return_sign=True)
    _same_special(got.item(), sign.item(), float(want), float(want_sign))
    assert math.isnan(logsumexp(ta, 0, b=tb).item()) == (math.isnan(want) or want_sign < 0)
    # every prefix is SciPy's logsumexp of that prefix; along another dim of a batch too
    lc, sc = logcumsumexp(ta, 0, b=tb, return_sign=True)
    lc2, sc2 = logcumsumexp(ta[:, None].expand(-1, 3), 0, b=tb[:, None], return_sign=True)
    for t in range(len(a)):
        with np.errstate(all="ignore"):
            w, ws = scipy.special.logsumexp(
                ta[: t + 1].numpy(), b=tb[: t + 1].numpy(), return_sign=True
            )
        if math.isinf(w) or math.isnan(w):
            _same_special(lc[t].item(), sc[t].item(), float(w), float(ws))
            for j in range(3):
                _same_special(lc2[t, j].item(), sc2[t, j].item(), float(w), float(ws))


def test_matmul_special_values_like_floats():
    # log_matmul_exp(a, b) is the log of (sa e^a) @ (sb e^b); with e^inf = inf and
    # e^-inf = 0, infinite and NaN entries give what float64 arithmetic gives
    # (inf * 0 = NaN, inf - inf = NaN), signs included.
    vals = [-inf, 0.0, 1.0, inf, nan]
    g = torch.Generator().manual_seed(7)
    for _ in range(40):
        a = torch.tensor(vals, dtype=F64)[torch.randint(0, 5, (2, 3), generator=g)]
        b = torch.tensor(vals, dtype=F64)[torch.randint(0, 5, (3, 2), generator=g)]
        sa = torch.where(torch.rand(2, 3, generator=g) < 0.5, -1.0, 1.0)
        sb = torch.where(torch.rand(3, 2, generator=g) < 0.5, -1.0, 1.0)
        sa, sb = torch.where(a == -inf, 0.0, sa), torch.where(b == -inf, 0.0, sb)
        with np.errstate(all="ignore"):
            want = (sa * torch.exp(a)).numpy() @ (sb * torch.exp(b)).numpy()
        got, sign = log_matmul_exp(a, b, sa, sb, return_sign=True)
        for i in range(2):
            for j in range(2):
                w = float(want[i, j])
                if math.isnan(w):
                    assert math.isnan(got[i, j].item())
                elif math.isinf(w):
                    assert got[i, j].item() == inf and sign[i, j].item() == math.copysign(1, w)
                else:
                    assert math.isfinite(got[i, j].item()) or (w == 0 and sign[i, j] == 0)


@st.composite
def extreme_weights(draw, dtype):
    """Weights +-2^k (1 + f) with k over the subnormal range, near the largest float, or
    normal; logs moderate: finite sums far from where a product of weights fits."""
    fi = np.finfo(NP[dtype])
    lo_e, hi_e = fi.minexp - fi.nmant, fi.maxexp - 1  # -1074, 1023 / -149, 127
    n = draw(st.integers(1, 8))
    kind = st.sampled_from(["sub", "big", "normal"])
    ws = []
    for _ in range(n):
        k = {"sub": st.integers(lo_e, fi.minexp - 1),
             "big": st.integers(hi_e - 8, hi_e),
             "normal": st.integers(-20, 20)}[draw(kind)]  # fmt: skip
        v = float(NP[dtype](math.ldexp(1 + draw(st.floats(0, 0.99)), draw(k))))
        ws.append(v * draw(st.sampled_from([-1.0, 1.0])))
    width = 32 if dtype == torch.float32 else 64
    ls = draw(st.lists(st.floats(-50, 50, width=width), min_size=n, max_size=n))
    return ls, ws


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_extreme_weights_within_bound(dtype, data):
    # Subnormal weights (and weights near the largest float) give finite results within
    # the bound (weights are rescaled by powers of two, exactly, before any product).
    ls, ws = data.draw(extreme_weights(dtype))
    a, b = torch.tensor(ls, dtype=dtype), torch.tensor(ws, dtype=dtype)
    eps = weight_log_error(ws)
    ref = exact_log_sum(ls, ws)
    got, sign = logsumexp(a, 0, b=b, return_sign=True)
    if ref[1] != 0 and abs(float(ref[0])) < float(torch.finfo(dtype).max):
        assert math.isfinite(got.item())
    _check_ref(got.item(), int(sign.item()), ref, dtype, len(ls), eps)
    lc, sc = logcumsumexp(a, 0, b=b, return_sign=True)
    for t, r in enumerate(exact_prefix_log_sums(ls, ws)):
        _check_ref(lc[t].item(), int(sc[t].item()), r, dtype, t + 1, eps)
    # autograd takes the shifted float64 sums (weights rescaled there)
    got, sign = logsumexp(a.clone().requires_grad_(True), 0, b=b, return_sign=True)
    _check_ref(got.item(), int(sign.item()), ref, dtype, len(ls), eps)


# --- empty dimensions -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)])
def test_empty_reductions(dtype, shape):
    # A sum over an empty dim is log 0 = -inf with sign 0; slices of no elements give an
    # empty result; prefix sums of an empty dim are empty, of the input's shape.
    a = torch.zeros(shape, dtype=dtype)
    for dim in range(-len(shape), len(shape)):
        want = torch.zeros(shape).sum(dim)  # torch's reduction: the result's shape
        for b in (None, torch.ones(shape, dtype=dtype)):
            got, sign = logsumexp(a, dim, b=b, return_sign=True)
            assert got.shape == sign.shape == want.shape and got.dtype == dtype
            assert (got == -inf).all() and (sign == 0).all()
            kept = logsumexp(a, dim, b=b, keepdim=True)
            assert kept.shape == torch.zeros(shape).sum(dim, keepdim=True).shape
            lc, sc = logcumsumexp(a, dim, b=b, return_sign=True)
            assert lc.shape == sc.shape == shape and lc.dtype == dtype
        if a.numel() == 0:
            assert logsumexp(a, None).item() == -inf and logsumexp(a, None).shape == ()
    # matrix products with an empty inner dim are zeros, with an empty outer dim empty
    m, s = log_matmul_exp(torch.zeros(2, 0, dtype=dtype), torch.zeros(0, 3, dtype=dtype),
                          return_sign=True)  # fmt: skip
    assert m.shape == (2, 3) and (m == -inf).all() and (s == 0).all()
    assert log_matmul_exp(torch.zeros(0, 2, dtype=dtype), torch.zeros(2, 3, dtype=dtype)).shape == (
        0,
        3,
    )
    assert log_matmul_exp(
        torch.zeros(4, 0, 2, dtype=dtype), torch.zeros(2, 3, dtype=dtype)
    ).shape == (4, 0, 3)


# --- every path near 1 ------------------------------------------------------------------


def _rows_check(got_log, got_sign, rows_l, rows_w, dtype, prefix=False, eps=0.0):
    for i, (ls, ws) in enumerate(zip(rows_l, rows_w, strict=True)):
        if prefix:
            for t, r in enumerate(exact_prefix_log_sums(ls, ws)):
                _check_ref(got_log[i, t].item(), got_sign[i, t].item(), r, dtype, t + 1, eps)
        else:
            ref = exact_log_sum(ls, ws)
            _check_ref(got_log[i].item(), got_sign[i].item(), ref, dtype, len(ls), eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_near_one_every_path(dtype):
    # Results below 2 in magnitude are recomputed relative to their largest term, except
    # direct sums where sum |x| >= 2 max |x| (then kept, within the relative bound). One
    # batch per path, each row near 1: the float32 direct sums (kept and recomputed), the
    # shifted sums (logs out of the direct range, autograd, weights with a tiny scaled
    # total), and prefix sums: direct positive (bisection), direct signed beyond the
    # first block of 1024 (block bounds), block-shifted, and weights spread beyond 2^100.
    g = torch.Generator().manual_seed(11)
    n = 2500
    rnd = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    # many similar positive terms summing to about 1 (kept), and [0, -40, ...] (recomputed)
    similar = (torch.log(rnd(3, n) * 2 / n)).to(dtype)
    dominant = torch.tensor([[0.0] + [-40.0 - 5 * i for i in range(9)]] * 2, dtype=dtype)
    far = torch.tensor([[0.0, -900.0, -1e4, -inf], [-800.0, -800.0 - 1e-3, -2000.0, -850.0]],
                       dtype=dtype)  # fmt: skip
    signs = lambda x: (
        torch.where(rnd(*x.shape) < 0.3, -1, 1)
        .to(torch.int8)
        .masked_fill(  # noqa: E731
            x == -inf, 0
        )
    )
    for x in (similar, dominant, far):
        for sg in (torch.ones_like(x, dtype=torch.int8).masked_fill(x == -inf, 0), signs(x)):
            sg[:, 0] = torch.where(x[:, 0] == -inf, 0, 1)
            s = SignedLog(x, sg).sum(1)
            _rows_check(s.log, s.sign, x.tolist(), sg.tolist(), dtype)
            xg = x.clone().requires_grad_(True)
            sgr = SignedLog(xg, sg).sum(1)
            _rows_check(sgr.log.detach(), sgr.sign, x.tolist(), sg.tolist(), dtype)
            used = torch.isfinite(sgr.log) & (sgr.sign != 0)
            sgr.log[used].sum().backward()
            assert torch.isfinite(xg.grad).all()
    # weights that cancel their logs: the scaled total is tiny (flagged, recomputed)
    a = torch.tensor([[0.0, -700.0, 30.0], [-745.0, 0.0, -20.0]], dtype=dtype)
    b = torch.tensor([[2.0**-1000, 1.0, 2.0**-1030], [1.0, 2.0**-1070, 1e-20]], dtype=F64)
    la, sa = logsumexp(a.double(), 1, b=b, return_sign=True)
    _rows_check(
        la, sa, a.double().tolist(), b.tolist(), F64, eps=weight_log_error(b.flatten().tolist())
    )
    # prefix sums: positive near 1, signed random walks through 1 beyond the first block
    pos = (torch.log(rnd(2, n) / n)).to(dtype)
    walk = torch.log(rnd(2, n) + 0.5).to(dtype)
    wsg = torch.where(rnd(2, n) < 0.5, -1, 1).to(torch.int8)
    wide = torch.cat([torch.zeros(2, 1, dtype=dtype), -rnd(2, 300).to(dtype) * 2000], 1)
    for x, sg in ((pos, torch.ones_like(pos, dtype=torch.int8)), (walk, wsg),
                  (wide, torch.ones_like(wide, dtype=torch.int8))):  # fmt: skip
        c = SignedLog(x, sg).cumsum(1)
        _rows_check(c.log, c.sign, x.tolist(), sg.tolist(), dtype, prefix=True)
        xg = x[:, :200].clone().requires_grad_(True)  # autograd: the same paths, out of place
        cg = SignedLog(xg, sg[:, :200]).cumsum(1)
        assert torch.equal(cg.log.detach(), c.log[:, :200]) or dtype == F64
        _rows_check(cg.log.detach(), cg.sign, x[:, :200].tolist(), sg[:, :200].tolist(), dtype,
                    prefix=True)  # fmt: skip
        used = torch.isfinite(cg.log) & (cg.sign != 0)
        cg.log[used].sum().backward()
        assert torch.isfinite(xg.grad).all()
    big = SignedLog(torch.full((1, 5), 3.0, dtype=dtype)).cumsum(1)  # no prefix near 1
    assert torch.allclose(big.log.double(), 3 + torch.log(torch.arange(1.0, 6.0, dtype=F64)))
    # weights spread beyond 2^100 in a row: the pivoted prefix sums on the whole row
    x = torch.tensor([[0.0, -1.0, 2.0, -700.0, 0.5]], dtype=dtype)
    b = torch.tensor([[1.0, -(2.0**-120), 2.0**-200, 3.0, -1e-30]], dtype=dtype)
    lc, sc = logcumsumexp(x, 1, b=b, return_sign=True)
    _rows_check(
        lc,
        sc,
        x.tolist(),
        b.tolist(),
        dtype,
        prefix=True,
        eps=weight_log_error(b.flatten().tolist()),
    )


# --- gradients (explicit backward: x_i / s from the result) -----------------------------

GRAD_PREFIX_CASES = [  # (logs, weights): the last prefix is finite and nonzero
    ([-inf, 0.0, 1.0], [1.0, 1.0, 1.0]),  # a leading zero term (masked position)
    ([-inf, 0.0, 1.0], [1.0, 1.0, -1.0]),
    ([-inf, 0.0, 1.0], [0.0, 1.0, 1.0]),
    ([inf, 0.0, 1.0], [0.0, 1.0, 1.0]),  # a zero weight drops even an infinite log
    ([-inf, -inf, 0.5, 1.0, -2.0], [1.0, 1.0, 2.0, -1.0, 1.0]),
    ([0.0, 0.0, -1.0], [1.0, -1.0, 1.0]),  # after an exactly zero prefix
    ([0.0, 0.0, 5.0], [1.0, -1.0, 1.0]),
    ([0.0, 0.0, -1.0], [1.0, -1.0, -1.0]),
    ([3.0, 3.0, 3.0, -2.0], [1.0, -1.0, 1.0, 1.0]),
]


def _unit(ws):
    return all(w in (-1.0, 0.0, 1.0) for w in ws)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ls, ws", GRAD_PREFIX_CASES)
def test_prefix_gradients_past_zero_terms_and_zero_prefixes(dtype, ls, ws):
    # A zero term (a -inf log or a zero weight) or an exactly zero earlier prefix made the
    # gradient of every later prefix NaN (log 0 in the forward pass, 0 * inf backwards,
    # through the shared cumulative sum); the exact gradients are finite.
    a = torch.tensor(ls, dtype=dtype, requires_grad=True)
    b = torch.tensor(ws, dtype=dtype)
    lc, _ = logcumsumexp(a, 0, b=b, return_sign=True)
    (g,) = torch.autograd.grad(lc[-1], (a,))
    check_sum_grad(g.tolist(), ls, ws, dtype, t=len(ls) - 1, term_log_error=weight_log_error(ws))
    if _unit(ws) and inf not in ls:
        x = torch.tensor(ls, dtype=dtype, requires_grad=True)
        sg = torch.tensor(ws, dtype=torch.int8).masked_fill(x.detach() == -inf, 0)
        c = SignedLog(x, sg).cumsum(0)
        (g,) = torch.autograd.grad(c.log[-1], (x,), retain_graph=True)
        check_sum_grad(g.tolist(), ls, ws, dtype, t=len(ls) - 1)
        # every finite nonzero prefix used at once: finite gradients (zero ones unused)
        used = torch.isfinite(c.log) & (c.sign != 0)
        (g,) = torch.autograd.grad(c.log[used].sum(), (x,))
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("small", [-50.0, -104.0, -110.0, -300.0, -700.0])
def test_gradients_after_deep_cancellation(dtype, small):
    # [e^0, -e^0, e^small]: the sum is e^small, d/dl = [e^-small, -e^-small, 1]. Below
    # 2^-149 of the largest term the gradient was NaN (torch.frexp's derivative divides
    # by a float32 power of two); float32 gradients beyond its range are +-inf.
    ls, ws = [0.0, 0.0, small], [1.0, -1.0, 1.0]
    if dtype == F32 and small < -103.0:  # the logs must be float32 values
        ls[2] = float(np.float32(small))
    sg = torch.tensor([1, -1, 1], dtype=torch.int8)
    calls = {
        "SignedLog.sum": lambda x: SignedLog(x, sg).sum().log,
        "logsumexp(b)": lambda x: logsumexp(x, 0, b=sg.to(dtype)),
        "SignedLog.cumsum": lambda x: SignedLog(x, sg).cumsum(0).log[-1],
        "logcumsumexp(b)": lambda x: logcumsumexp(x, 0, b=sg.to(dtype))[-1],
        "log_matmul_exp": lambda x: log_matmul_exp(
            x[None], torch.zeros(3, 1, dtype=dtype), a_sign=sg[None].to(dtype)
        )[0, 0],
    }
    for name, f in calls.items():
        x = torch.tensor(ls, dtype=dtype, requires_grad=True)
        (g,) = torch.autograd.grad(f(x), (x,))
        t = 2 if "cumsum" in name else None
        check_sum_grad(g.tolist(), ls, ws, dtype, t=t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_conventions_at_zero_results(dtype):
    # An exactly zero result has log -inf, whose derivative is infinite: a used one gives
    # its nonzero terms +-inf (the limit s -> +0, as x + (-x) and logsubexp(a, a) do); an
    # unused one (zero upstream gradient) contributes nothing, never 0 * inf = NaN.
    x = torch.tensor([0.0, 0.0, -inf], dtype=dtype, requires_grad=True)
    sg = torch.tensor([1, -1, 0], dtype=torch.int8)
    (g,) = torch.autograd.grad(SignedLog(x, sg).sum().log, (x,))
    assert g.tolist() == [inf, -inf, 0.0]
    (g2,) = torch.autograd.grad((SignedLog(x[:1]) - SignedLog(x[1:2])).log, (x,))
    assert g2.tolist() == [inf, -inf, 0.0]
    y = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, requires_grad=True)
    c = SignedLog(y, torch.tensor([1, -1, 1], dtype=torch.int8)).cumsum(0)
    (g,) = torch.autograd.grad(c.log[1], (y,), retain_graph=True)
    assert g.tolist() == [inf, -inf, 0.0]
    (g,) = torch.autograd.grad(c.log[0] + c.log[2], (y,))
    assert torch.isfinite(g).all() and abs(g[2].item() - 1.0) <= 4 * U[dtype]
    # with general weights, the derivative with respect to the weights: e^l_i / s
    b = torch.tensor([2.0, -1.0, 0.5], dtype=dtype, requires_grad=True)
    a = torch.tensor([0.0, 1.0, -inf], dtype=dtype)
    (gb,) = torch.autograd.grad(logsumexp(a, 0, b=b, return_sign=True)[0], (b,))
    ref = exact_log_sum(a.tolist(), b.tolist())
    beta = signed_sum_error_bound(3, ref[2], float(ref[0]), F64, weight_log_error(b.tolist()),
                                  ref[3]).item()  # fmt: skip
    with mpmath.workprec(PREC):
        for got, l in zip(gb.tolist(), a.tolist(), strict=True):
            if l == -inf:
                assert got == 0
                continue
            want = ref[1] * mpmath.exp(l - ref[0])  # d log|s| / d b_i = e^(a_i) / s
            tol = math.expm1(beta + U64 * (abs(float(l - ref[0])) + 3)) + U[dtype]
            assert abs(got - want) <= tol * abs(want)


# --- exact zeros -------------------------------------------------------------------------

ZERO_ROWS = [  # (logs, weights) whose sum is exactly zero (Lindemann-Weierstrass)
    ([50.0, 100.0, 0.0, 50.0, 100.0, 0.0], [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]),
    ([100.0, 0.0, 100.0, 0.0, 50.0, 50.0], [1.0, 1.0, -1.0, -1.0, 1.0, -1.0]),
    ([300.0, -300.0, -inf, -300.0, 300.0, 3.0, 3.0], [1.0, 1.0, 0.0, -1.0, -1.0, 1.0, -1.0]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ls, ws", ZERO_ROWS)
def test_exact_cancellation_is_an_exact_zero(dtype, ls, ws):
    # e^100 + e^50 + 1 - e^100 - e^50 - 1 rounds in float64 to a multiple of an ulp of
    # e^100: it came back as (50, -1). Every order of the terms, every function.
    g = torch.Generator().manual_seed(5)
    perms = [list(range(len(ls)))] + [
        torch.randperm(len(ls), generator=g).tolist() for _ in range(6)
    ]
    for p in perms:
        lp, wp = [ls[i] for i in p], [ws[i] for i in p]
        a = torch.tensor(lp, dtype=dtype)
        b = torch.tensor(wp, dtype=dtype)
        x = SignedLog(a, b.to(torch.int8))
        refs = exact_prefix_log_sums(lp, wp)
        got = [
            (x.sum().log.item(), x.sum().sign.item()),
            tuple(v.item() for v in logsumexp(a, 0, b=b, return_sign=True)),
            tuple(v.item() for v in logsumexp(a, 0, b=b * 0.75, return_sign=True)),
            tuple(
                v.item()
                for v in log_matmul_exp(
                    a[None], torch.zeros(len(lp), 1, dtype=dtype), a_sign=b[None],
                    return_sign=True,
                )
            ),
        ]  # fmt: skip
        for gl, gs in got:
            assert (gl, gs) == (-inf, 0), (p, gl, gs)
        c = x.cumsum(0)
        lc, sc = logcumsumexp(a, 0, b=b, return_sign=True)
        for t, r in enumerate(refs):
            for gl, gs in ((c.log[t].item(), c.sign[t].item()), (lc[t].item(), sc[t].item())):
                if r[1] == 0:
                    assert (gl, gs) == (-inf, 0), (p, t, gl, gs)
                else:
                    _check_ref(gl, int(gs), r, dtype, t + 1)
        # the same under autograd, and finite gradients of the nonzero prefixes
        xg = a.clone().requires_grad_(True)
        sg = SignedLog(xg, b.to(torch.int8)).sum()
        assert (sg.log.item(), sg.sign.item()) == (-inf, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_cancellation_recomputed(dtype):
    # A sum whose equal logs cancel exactly except for a small term was computed as an
    # exact zero (float32 logsumexp with weights: 1 - 1 + e^-50 summed as (1 + e^-50) - 1)
    # or as garbage; terms with equal logs are merged exactly, so it is e^-50.
    a = torch.tensor([0.0, 0.0, -50.0, 7.0, 7.0], dtype=dtype)
    cases = [([1.0, -1.0, 1.0, 0.0, 0.0], -50.0), ([1.0, -1.0, 1.0, 0.5, -0.5], -50.0),
             ([0.25, -0.5, -1.0, 0.0, 0.0], None)]  # fmt: skip
    for ws, want in cases:
        b = torch.tensor(ws, dtype=dtype)
        for got, sign in (
            logsumexp(a, 0, b=b, return_sign=True),
            logsumexp(a.clone().requires_grad_(True), 0, b=b, return_sign=True),
        ):
            ref = exact_log_sum(a.tolist(), ws)
            _check_ref(got.item(), int(sign.item()), ref, dtype, 5, weight_log_error(ws))
            if want is not None:
                assert got.item() == want and sign.item() == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_cancellation_past_double_double_is_not_a_zero(dtype):
    # After an exact cancellation a prefix sum is the small terms that follow: 19 of the
    # 20 prefixes of this row came back as (-inf, 0), false zeros; so did sums cancelling
    # below what double-double resolves (e^(1e-40) - 1, and subnormal weights over logs
    # 8e-50 apart). Where float64 and double-double cannot decide, the value is summed
    # exactly: the float nearest to the exact log (rounded once more to float32).
    g = torch.Generator().manual_seed(3)
    tail = -800 + torch.randn(18, generator=g, dtype=torch.float64)
    signs = torch.where(torch.rand(18, generator=g) < 0.5, -1.0, 1.0)
    rows = [
        ([0.3, 0.3] + tail.tolist(), [1.0, -1.0] + signs.tolist(), True),
        ([0.0, 1e-40], [-1.0, 1.0], False),
    ]
    if dtype == torch.float64:
        tiny = 1.1125369292536007e-308
        rows.append(([0.0, 8.201333183203308e-50], [-tiny, tiny], False))

    def exact(got, ref):
        want = torch.tensor(float(ref[0]), dtype=dtype).item()
        spacing = float(np.spacing(NP[dtype](abs(want))))
        assert ref[1] != 0 and got[1] == ref[1] and abs(got[0] - want) <= spacing, (got, ref)

    for ls, ws, signs_only in rows:
        ls = [float(NP[dtype](v)) for v in ls]
        a, b = torch.tensor(ls, dtype=dtype), torch.tensor(ws, dtype=dtype)
        refs = exact_prefix_log_sums(ls, ws)
        sums = [logsumexp(a, 0, b=b, return_sign=True)]
        cums = [logcumsumexp(a, 0, b=b, return_sign=True)]
        if signs_only or max(map(abs, ws)) == 1:
            x = SignedLog(a, b.to(torch.int8))
            sums.append((x.sum().log, x.sum().sign))
            cums.append((x.cumsum(0).log, x.cumsum(0).sign))
        for lg, sg in sums:
            exact((lg.item(), sg.item()), refs[-1])
        for lc, sc in cums:
            for t, r in enumerate(refs):
                if r[1] == 0:
                    assert (lc[t].item(), sc[t].item()) == (-inf, 0)
                elif lc[t].item() == -inf or t >= 2:  # computed as zero, or past the cancellation
                    exact((lc[t].item(), sc[t].item()), r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_review_zeros_at_the_edges(dtype):
    # Found by a review of the exact-zero promise at the edges (each fails on the code
    # before its fix): (1) log_matmul_exp with signs merged terms by the high part of
    # a_ik + b_kj only: a false zero; (2) merged weights scaled by the largest input
    # weight, which had cancelled: survivors flushed (a false zero; 2.2e8x the bound with
    # 1e-12); (3) float64 autograd sums whose weights' scaling flushed every term: a false
    # zero of positive terms; (4) the pivoted prefix scan's weight-exponent error was not
    # allowed for in step 1: an exact zero returned as (660.5, +1); (5) a NaN later in the
    # block hid an earlier prefix's underflow: [-800, 0, nan] gave [-inf, 0, nan].
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    a, b = t([[600.0] * 4]), t([[2.0**-46], [2.0**-46], [0.0], [-(2.0**-46)]])
    sa = t([[1.0, -1.0, 1.0, -1.0]])
    got = log_matmul_exp(a, b, a_sign=sa, return_sign=True)
    want = 600 - 46 * math.log(2) + math.log1p(-(2.0**-47))  # e^600 (1 - e^(-2^-46))
    assert got[1].item() == 1 and abs(got[0].item() - want) <= torch.finfo(dtype).eps * want
    assert torch.equal(got[0], (SignedLog(a, sa.to(torch.int8)) @ SignedLog(b)).log)
    f64 = dtype == torch.float64
    rows = [([1.0, 1.0, 0.0], [1.0, -1.0, 1e-40 if not f64 else 5e-324])]
    if f64:
        rows += [([900.0, 900.0, 0.0, 0.0, 800.0], [1e-300, -1e-300, 1e308, -1e308, w])
                 for w in (1e-12, 1e-20)]  # fmt: skip
    for ls, ws in rows:
        got = logsumexp(t(ls), 0, b=t(ws), return_sign=True)
        ref = exact_log_sum(
            torch.tensor(ls, dtype=dtype).tolist(), torch.tensor(ws, dtype=dtype).tolist()
        )
        assert math.isfinite(got[0].item()), (ls, ws)
        _check_ref(got[0].item(), int(got[1].item()), ref, dtype, len(ls), weight_log_error(ws))
    if f64:
        la = t([0.0, -1000.0]).requires_grad_(True)
        got = logsumexp(la, 0, b=t([1e-300, 1e300]), return_sign=True)
        ref = exact_log_sum([0.0, -1000.0], [1e-300, 1e300])
        assert math.isfinite(got[0].item())
        _check_ref(
            got[0].item(), int(got[1].item()), ref, dtype, 2, weight_log_error([1e-300, 1e300])
        )
        lc, sc = logcumsumexp(t([0.0, 0.0, 0.0, -5.0]), 0, b=t([-1e300, -1e300, 2e300, 1e-10]),
                              return_sign=True)  # fmt: skip
        assert (lc[2].item(), sc[2].item()) == (-inf, 0.0)
        assert (lc[3].item(), sc[3].item()) == (-5 + math.log(1e-10), 1.0)
    # (6) the block sums of |x| scaled the weights by the row's largest: 1e-320 beside
    # 18098 flushed, and an exact zero looked certified; (7) a NaN later in the block
    # made the block's threshold NaN, so no prefix before it was checked
    rows = [([11.0, 11.0, -1488.5, -1489.8], [1e-320, -1e-320, -1.0, 18097.9]),
            ([0.3, 0.3, 0.3, -5.0, math.nan], [1e-30, 1e-30, -2e-30, -1e-4, 1.0])]  # fmt: skip
    for ls, ws in rows[(0 if f64 else 1) :]:
        lc, sc = logcumsumexp(t(ls), 0, b=t(ws), return_sign=True)
        assert (lc[1 if len(ls) == 4 else 2].item(), sc[1 if len(ls) == 4 else 2].item()) == (
            -inf,
            0.0,
        )
    for lc in (logcumsumexp(t([-800.0, 0.0, math.nan]), 0),
               SignedLog(t([-800.0, 0.0, math.nan])).cumsum(0).log):  # fmt: skip
        # log(1 + e^-800) rounds to 0 in either dtype
        assert lc[0].item() == -800 and lc[1].item() == 0 and math.isnan(lc[2].item())


@st.composite
def cancelling_vectors(draw, dtype):
    """Rows built from a multiset of terms and its negation (or weights summing to zero
    per log), shuffled, with a few extra terms: every prefix has an exact reference."""
    npdt = NP[dtype]
    # logs on a grid (many equal ones) or spread; none within 1e-6 of 0 but 0 itself (the
    # mpmath reference at 400 bits cannot tell e^(1e-236) from 1)
    value = st.one_of(
        st.integers(-240, 240).map(lambda k: k / 2),
        st.floats(-120, 120).filter(lambda v: v == 0 or abs(v) > 1e-6),
    )
    h = draw(st.integers(1, 12))
    xs = [float(npdt(v)) for v in draw(st.lists(value, min_size=h, max_size=h))]
    ls, ws = xs + xs, [1.0] * h + [-1.0] * h
    extra = draw(st.lists(value, max_size=2))
    ls += [float(npdt(v)) for v in extra]
    ws += [draw(st.sampled_from([1.0, -1.0])) for _ in extra]
    perm = draw(st.permutations(range(len(ls))))
    return [ls[i] for i in perm], [ws[i] for i in perm]


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_cancelling_sums_exact(dtype, data):
    ls, ws = data.draw(cancelling_vectors(dtype))
    a, b = torch.tensor(ls, dtype=dtype), torch.tensor(ws, dtype=dtype)
    x = SignedLog(a, b.to(torch.int8))
    refs = exact_prefix_log_sums(ls, ws)
    s, (lg, sg) = x.sum(), logsumexp(a, 0, b=b, return_sign=True)
    for gl, gs in ((s.log.item(), s.sign.item()), (lg.item(), sg.item())):
        if refs[-1][1] == 0:
            assert (gl, gs) == (-inf, 0)
        else:
            _check_ref(gl, int(gs), refs[-1], dtype, len(ls))
    c, (lc, sc) = x.cumsum(0), logcumsumexp(a, 0, b=b, return_sign=True)
    for t, r in enumerate(refs):
        for gl, gs in ((c.log[t].item(), c.sign[t].item()), (lc[t].item(), sc[t].item())):
            if r[1] == 0:
                assert (gl, gs) == (-inf, 0), (t, gl, gs)
            else:
                _check_ref(gl, int(gs), r, dtype, t + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_signs_never_take_the_exact_check(monkeypatch, dtype):
    # The exact-zero check runs only where the bound leaves a result undecided and the
    # largest-log terms cancel: random signed sums and prefix sums never get there.
    import attnprec.lognum._zeros as Z

    def fail(*args, **kwargs):
        raise AssertionError("exact check reached")

    monkeypatch.setattr(Z, "_merge_signs", fail)
    monkeypatch.setattr(Z, "_merge_weights", fail)
    monkeypatch.setattr(Z, "exact_prefixes", fail)
    g = torch.Generator().manual_seed(2)
    ls = torch.randn(4, 5000, generator=g, dtype=dtype)
    sg = torch.where(torch.rand(4, 5000, generator=g) < 0.5, -1, 1).to(torch.int8)
    x = SignedLog(ls, sg)
    x.sum(1), x.cumsum(1), logsumexp(ls, 1, b=sg.to(dtype)), logcumsumexp(ls, 1, b=sg.to(dtype))
    SignedLog(ls * 300, sg).sum(1), SignedLog(ls * 300, sg).cumsum(1)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: log_matmul_exp(torch.zeros(2, 2, 3), torch.zeros(3, 3, 1)), "b"),
        (
            lambda: log_matmul_exp(
                torch.tensor([[-inf, 1.0]]), torch.zeros(2, 1), a_sign=torch.ones(1, 2)
            ),
            "a_sign",
        ),
        (
            lambda: log_matmul_exp(
                torch.zeros(1, 2), torch.tensor([[-inf], [0.0]]), b_sign=torch.ones(2, 1)
            ),
            "b_sign",
        ),
        (lambda: log_matmul_exp(torch.zeros(3), torch.zeros(3, 1)), "a"),
    ],
)
def test_matmul_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        call()


@pytest.mark.parametrize(
    ("a", "b", "dtype", "exact"),
    [
        # a subnormal weight beside a zero term: the pivoted scan's block without another
        # term (val 0, shift 0) overflowed its scale, 0 * inf (a review)
        ((0.0, -math.inf), (1e-320, 1.0), torch.float64, math.log(1e-320)),
        ((-750.0, -math.inf), (1.0, 2.0**-101), torch.float64, -750.0),
        ((-750.0, -math.inf), (1.0, 1e-31), torch.float32, -750.0),
    ],
)
def test_weighted_prefix_sums_with_a_lone_pivot_are_finite(a, b, dtype, exact):
    out = logcumsumexp(torch.tensor(a, dtype=dtype), 0, b=torch.tensor(b, dtype=dtype))
    eps = 3 * U[F64] * 750  # term_log_error: 3u max |log |b_i|| (the docstring)
    bound = signed_sum_error_bound(2, exact, exact, dtype, eps, exact).item()
    assert bool(((out.double() - exact).abs() <= bound).all()), out


def test_weights_of_more_dims_than_a_give_scipys_shape():
    """A review: the result was shaped by ``a`` alone (SciPy: by the broadcast)."""
    cases = [
        (np.zeros(3), None, np.ones((2, 3)), True),
        (np.zeros(()), 0, np.ones((2, 3)), False),
        (np.zeros((1, 3)), 1, np.ones((2, 1, 3)), True),
    ]
    for a, dim, b, keepdim in cases:
        want = scipy.special.logsumexp(a, dim, b=b, keepdims=keepdim)
        got = logsumexp(torch.tensor(a), dim, b=torch.tensor(b), keepdim=keepdim)
        assert tuple(got.shape) == np.shape(want)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-15)


def test_signed_sum_error_bound_refuses_impossible_logs_and_bad_arguments():
    """A review: a sum e^6 times n max took a small bound; an integer dtype and shapes that
    do not broadcast raised torch's errors, naming nothing."""
    with pytest.raises(ValueError, match="^log_abs_sum: exceeds log n"):
        signed_sum_error_bound(2, 1.0, 0.0, log_abs_max=-5.0)
    with pytest.raises(TypeError, match="^dtype"):
        signed_sum_error_bound(2, 1.0, 0.0, dtype=torch.int32)
    with pytest.raises(ValueError, match="^log_abs_sum: shape"):
        signed_sum_error_bound(torch.tensor([2, 3]), torch.tensor([1.0, 1.0, 1.0]), 0.0)
    # the extreme that holds: n equal terms
    assert math.isfinite(signed_sum_error_bound(2, math.log(2), math.log(2), log_abs_max=0.0))
