"""Certified reference of H3.

Tolerance rules (docs/reference.md): two certified balls of one exact value overlap,
``|a - b| <= r_a + r_b``; a direct mpmath evaluation at 300 bits of the explicit sum (at most
8 tokens, log-decays within 5) loses far less than 100 bits: its error is at most ``2^-200``
of one plus its magnitude, the slack it is given.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.reference import reference
from attnprec.testing import params as P
from attnprec.testing.inputs import make_inputs

F64 = torch.float64


def _overlap(a, b):
    return bool(((a.value - b.value).abs() <= a.radius + b.radius).all())


def _mp_h3(q, k, v, shift, log_decay):
    """``o_t[e] = sum_{j<=t} sum_c q_t[c] exp((t - j) log_decay[c, e]) ks_j[c] v_j[e]`` at
    300 bits, the explicit sum (not the recurrence)."""
    mpmath.mp.prec = 300
    T, d_k = q.shape
    d_v = v.shape[1]
    sh = shift if shift.dim() == 2 else shift.unsqueeze(0).expand(d_k, -1)
    ld = log_decay.unsqueeze(-1) if log_decay.dim() == 1 else log_decay
    ld = ld.expand(d_k, d_v)

    def f(x):
        return mpmath.mpf(float(x))

    ks = [
        [sum(f(sh[c, i]) * f(k[j - i, c]) for i in range(min(sh.shape[1], j + 1))) for c in
         range(d_k)]
        for j in range(T)
    ]  # fmt: skip
    return [
        [
            sum(
                f(q[t, c]) * mpmath.exp((t - j) * f(ld[c, e])) * ks[j][c] * f(v[j, e])
                for j in range(t + 1)
                for c in range(d_k)
            )
            for e in range(d_v)
        ]
        for t in range(T)
    ]


@pytest.mark.parametrize("regime", P.H3_REGIMES)
@pytest.mark.parametrize("per_entry", [False, True])
def test_h3_against_mpmath(regime, per_entry):
    g = torch.Generator().manual_seed(11)
    T, d_k, d_v = 7, 3, 2
    q, k, v = make_inputs("cancel", n_q=T, d_k=d_k, d_v=d_v, generator=g)
    shift = torch.randn(d_k, 3, generator=g, dtype=F64)  # not on any grid: products inexact
    ld = P._h3_log_decay(regime, (d_k, d_v) if per_entry else (d_k,), g)
    r = reference("h3", q, k, v, shift=shift, log_decay=ld)
    mp = _mp_h3(q, k, v, shift, ld)
    for t in range(T):
        for e in range(d_v):
            err = abs(mp[t][e] - mpmath.mpf(float(r.value[t, e])))
            assert err <= float(r.radius[t, e]) + 2.0**-200 * (1 + abs(mp[t][e]))
    assert float(r.rel_radius().max()) <= 2.0**-52


@given(st.integers(0, 2**31), st.integers(1, 8), st.integers(1, 3), st.integers(1, 3))
def test_shift_one_is_the_gated_reference(seed, T, d_k, d_v):
    # shift = [1]: the shifted keys are the keys, so reference("gated") with the log-decays
    # as constant log-gates certifies the same exact value
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs("typical", n_q=T, d_k=d_k, d_v=d_v, generator=g)
    ld = -torch.rand(d_k, generator=g, dtype=F64)
    r = reference("h3", q, k, v, shift=torch.ones(1, dtype=F64), log_decay=ld)
    rg = reference("gated", q, k, v, causal=True, scale=1.0, log_g=ld.expand(T, d_k))
    assert _overlap(r, rg)


def test_backends_agree_and_rows_are_the_full_rows():
    g = torch.Generator().manual_seed(3)
    q, k, v = make_inputs("outliers", n_q=7, d_k=3, d_v=3, batch=(2,), generator=g)
    p = P.h3_defaults(3, 7, g)
    a = reference("h3", q, k, v, backend="arb", **p)
    m = reference("h3", q, k, v, backend="mpmath", **p)
    assert a.backend == "arb" and m.backend == "mpmath" and _overlap(a, m)
    r = reference("h3", q, k, v, rows=[1, 5], **p)
    assert r.rows.tolist() == [1, 5]
    assert torch.equal(r.value, a.value[..., [1, 5], :])
    assert torch.equal(r.radius, a.radius[..., [1, 5], :])


def test_batched_parameters_are_per_head():
    g = torch.Generator().manual_seed(4)
    q, k, v = make_inputs("typical", n_q=5, d_k=2, d_v=2, batch=(2,), generator=g)
    shift = torch.randn(2, 2, 3, generator=g, dtype=F64)  # [H, d_k, m]
    ld = -torch.rand(2, 2, 1, generator=g, dtype=F64)  # [H, d_k, 1]
    r = reference("h3", q, k, v, shift=shift, log_decay=ld)
    for h in range(2):
        rh = reference("h3", q[h], k[h], v[h], shift=shift[h], log_decay=ld[h, :, 0])
        assert torch.equal(r.value[h], rh.value) and torch.equal(r.radius[h], rh.radius)


def test_nan_reaches_the_rows_after_it():
    q, k, v = (torch.ones(5, 2, dtype=F64) for _ in range(3))
    k[2, 0] = math.nan
    p = {"shift": torch.tensor([1.0, 0.5], dtype=F64), "log_decay": -torch.ones(2, dtype=F64)}
    r = reference("h3", q, k, v, **p)
    assert bool(torch.isfinite(r.value[:2]).all()) and bool(torch.isnan(r.value[2:]).all())


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"backend": "ball"}, ValueError, "backend"),
        ({"causal": False}, ValueError, "causal"),
        ({"scale": 0.5}, ValueError, "scale"),
        ({"log_decay": torch.ones(2, dtype=F64)}, ValueError, "log_decay"),
        ({"shift": None}, ValueError, "shift"),
        ({"chunk_size": 4}, TypeError, "chunk_size"),
    ],
)
def test_bad_input_is_named(kw, err, match):
    x = torch.ones(3, 2, dtype=F64)
    p = {"shift": torch.ones(2, dtype=F64), "log_decay": -torch.ones(2, dtype=F64), **kw}
    with pytest.raises(err, match=match):
        reference("h3", x, x, x, **p)


def test_infinite_inputs_are_named():
    x = torch.ones(3, 2, dtype=F64)
    p = {"shift": torch.ones(2, dtype=F64), "log_decay": -torch.ones(2, dtype=F64)}
    with pytest.raises(ValueError, match="k: expected finite"):
        reference("h3", x, torch.full((3, 2), math.inf, dtype=F64), x, **p)
