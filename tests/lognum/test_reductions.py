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
from lognum_ref import NP, PREC, exact_signed_sum, log_err, mlog

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
    exact, abs_sum = exact_signed_sum(ls, ss) if sums is None else sums
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
    with mpmath.workprec(PREC):
        run, abs_run = mpmath.mpf(0), mpmath.mpf(0)
        for t in range(len(ls)):
            term = ss[t] * mpmath.exp(mpmath.mpf(ls[t])) if ss[t] else mpmath.mpf(0)
            run, abs_run = run + term, abs_run + abs(term)
            sums = (run, abs_run)
            _check_sum(c.log[t].item(), c.sign[t].item(), None, None, dtype, t + 1, sums)
            _check_sum(lc[t].item(), int(sc[t].item()), None, None, dtype, t + 1, sums)


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
    with mpmath.workprec(PREC):
        run, abs_run = mpmath.mpf(0), mpmath.mpf(0)
        for t in range(n):
            term = ss[t] * mpmath.exp(mpmath.mpf(ls[t]))
            run, abs_run = run + term, abs_run + abs(term)
            bound = signed_sum_error_bound(t + 1, mlog(abs_run), mlog(run)).item()
            if math.isfinite(bound):
                assert c.sign[t].item() == (1 if run > 0 else -1)
                assert log_err(c.log[t].item(), run) <= bound, t


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
            tl = [a[i * k + r] + b[r * p + j] for r in range(k)]  # exact in float64? not always
            with mpmath.workprec(PREC):
                mt = [mpmath.mpf(a[i * k + r]) + mpmath.mpf(b[r * p + j]) for r in range(k)]
                st_ = [sa[i * k + r] * sb[r * p + j] for r in range(k)]
                terms = [s * mpmath.exp(v) for v, s in zip(mt, st_, strict=True) if s]
                exact, abs_sum = mpmath.fsum(terms), mpmath.fsum(abs(t) for t in terms)
            eps = 2.0**-53 * max([abs(v) for v in tl if math.isfinite(v)], default=0.0)
            bound = signed_sum_error_bound(k, mlog(abs_sum), mlog(exact), dtype, eps).item()
            for got_l, got_s in (
                (C.log[i, j].item(), C.sign[i, j].item()),
                (L[i, j].item(), S[i, j].item()),
            ):
                if got_l == -inf:
                    assert got_s == 0
                if math.isfinite(bound):
                    assert got_s == (1 if exact > 0 else -1)
                    assert log_err(got_l, exact) <= bound


@given(data=st.data())
def test_float32_at_least_as_accurate_as_scipy(data):
    # Rule: ours is the float32 rounding of a float64 value within beta of the exact log,
    # so for any float32 f (SciPy's): |ours - exact| <= |f - exact| + 2 beta.
    ls, ss = data.draw(signed_vectors(torch.float32))
    a = np.array(ls, dtype=np.float32)
    b = np.array(ss, dtype=np.float32)
    exact, abs_sum = exact_signed_sum(ls, ss)
    if exact == 0 or mlog(abs_sum) - mlog(exact) > 1.0:
        return  # the claim is for well-conditioned sums (kappa <= e)
    want, _ = scipy.special.logsumexp(a, b=b, return_sign=True)
    got = logsumexp(torch.from_numpy(a), 0, b=torch.from_numpy(b), return_sign=True)[0].item()
    beta = signed_sum_error_bound(len(ls), mlog(abs_sum), mlog(exact), torch.float64).item()
    assert log_err(got, exact) <= log_err(float(want), exact) + 2 * beta


@given(data=st.data())
def test_float64_rounded_once(data):
    # float64 results are computed in double-double and rounded once (lognum/_dd.py): within
    # half an ulp of the exact log plus 2^-60 max(|L|, 1), hence never measurably less
    # accurate than SciPy's float64 logsumexp (weights of any size, or SignedLog signs).
    ls, ss = data.draw(signed_vectors(torch.float64))
    if data.draw(st.booleans()):
        mags = data.draw(st.lists(st.floats(0.01, 100.0), min_size=len(ls), max_size=len(ls)))
        ss = [s * w for s, w in zip(ss, mags, strict=True)]
    exact, abs_sum = exact_signed_sum(ls, ss)
    if exact == 0 or mlog(abs_sum) - mlog(exact) > 1.0:
        return  # the claim is for well-conditioned sums (kappa <= e)
    a, b = torch.tensor(ls, dtype=torch.float64), torch.tensor(ss, dtype=torch.float64)
    got, sign = logsumexp(a, 0, b=b, return_sign=True)
    big_l = mlog(exact)
    slack = 2.0**-60 * max(abs(big_l), 1.0)
    assert sign.item() == (1 if exact > 0 else -1)
    assert log_err(got.item(), exact) <= math.ulp(abs(big_l)) / 2 + slack
    want, _ = scipy.special.logsumexp(np.array(ls), b=np.array(ss), return_sign=True)
    assert log_err(got.item(), exact) <= log_err(float(want), exact) + slack
    if all(abs(s) in (0, 1) for s in ss):
        got_sl = SignedLog(a, torch.tensor(ss, dtype=torch.int8)).sum()
        assert got_sl.log.item() == got.item()


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


@pytest.mark.parametrize("dim", [0, 1])
def test_piecewise_sums_within_bound(monkeypatch, dim):
    # Sums and prefix sums run through pieces of 2^20 elements; shrink the pieces so that
    # the piece loop (and the running total carried between pieces) runs at a small size.
    import attnprec.lognum.reductions as R

    monkeypatch.setattr(R, "_PIECE", 8)
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
