"""The double-double helpers under the float64 sums (lognum/_dd.py), against mpmath."""

from __future__ import annotations

import math

import mpmath
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.lognum._dd import exp_dd, extract_sum, shift_log_dd

F64 = torch.float64


@given(st.lists(st.floats(-745.0, 709.0), min_size=1, max_size=64), st.floats(-1e-16, 1e-16))
def test_exp_dd_relative_error(ds, lo):
    hi_t, lo_t = exp_dd(torch.tensor(ds, dtype=F64), torch.full((len(ds),), lo, dtype=F64))
    with mpmath.workprec(200):
        for d, h, l in zip(ds, hi_t.tolist(), lo_t.tolist(), strict=True):
            exact = mpmath.exp(mpmath.mpf(d) + mpmath.mpf(lo))
            err = abs(mpmath.mpf(h) + mpmath.mpf(l) - exact)
            # relative 2^-66 in the normal range; absolute 2^-1074 below it
            assert err <= 2.0**-66 * exact + 2.0**-1074


def test_exp_dd_special_values():
    hi, lo = exp_dd(torch.tensor([-math.inf, -800.0, 0.0, math.nan], dtype=F64))
    assert hi[:2].tolist() == [0.0, 0.0] and lo[:2].tolist() == [0.0, 0.0]
    assert hi[2].item() == 1.0 and lo[2].item() == 0.0
    assert math.isnan(hi[3].item())


@given(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=200), st.integers(0, 2**31))
def test_extract_sum_exact_cancellation_and_accuracy(xs, seed):
    g = torch.Generator().manual_seed(seed)
    hi = torch.tensor(xs + [-x for x in xs], dtype=F64)[torch.randperm(2 * len(xs), generator=g)]
    s, e = extract_sum(hi, torch.zeros_like(hi), 0)
    # the leading parts cancel exactly; only the float64 sum of the remainders rounds
    assert abs(s.item() + e.item()) <= 2.0**-100 * sum(abs(x) for x in xs)
    pair = torch.tensor([xs[0], -xs[0]], dtype=F64)
    assert extract_sum(pair, torch.zeros_like(pair), 0) == (0.0, 0.0)  # x + (-x) is zero
    lo = torch.tensor(xs, dtype=F64) * 2.0**-60
    s, e = extract_sum(torch.tensor(xs, dtype=F64), lo, 0)
    with mpmath.workprec(300):
        exact = mpmath.fsum([mpmath.mpf(x) for x in xs] + [mpmath.mpf(v) for v in lo.tolist()])
        err = abs(mpmath.mpf(s.item()) + mpmath.mpf(e.item()) - exact)
        assert err <= 2.0**-100 * max(1.0, sum(abs(x) for x in xs))


@given(st.floats(-50.0, 50.0), st.floats(1e-300, 1e300), st.integers(-60, 60))
def test_shift_log_dd_rounded_once(shift, s, e_extra):
    s_t = torch.tensor([s], dtype=F64)
    got = shift_log_dd(
        torch.tensor([shift], dtype=F64),
        s_t,
        torch.zeros_like(s_t),
        torch.tensor([e_extra], dtype=F64),
    ).item()
    with mpmath.workprec(200):
        exact = mpmath.mpf(shift) + mpmath.log(mpmath.mpf(s)) + e_extra * mpmath.log(2)
        err = abs(mpmath.mpf(got) - exact)
        # parts up to ~800 in size may cancel: 2^-62 of the largest part
        scale = max(abs(shift), abs(math.log(s)), abs(e_extra), 1.0)
        assert err <= math.ulp(abs(float(exact))) / 2 + 2.0**-62 * scale
