"""Semiring linearizations: degree / features needed, the tropical limit, soundness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds.semiring import (
    semiring_degree_needed,
    semiring_features_needed,
    semiring_output_bound,
    semiring_taylor_error_bound,
)
from attnprec.analysis.reference import reference
from attnprec.attention import LogExpMean, MixtureLSE, SoftMaxPlus, Tropical
from attnprec.testing.inputs import make_inputs


def test_softmaxplus_needs_grow_as_tau_shrinks():
    degs = [semiring_degree_needed(SoftMaxPlus(tau), 1.0, 1e-3) for tau in (1.0, 0.5, 0.25, 0.125)]
    assert degs == sorted(degs) and degs[-1] > 2 * degs[0]
    for tau in (1.0, 0.5, 0.25):  # exp(4 R^2 / tau): unbounded as tau -> 0
        expected = 2 * math.expm1(4 * 0.25 / tau) * 1.1**2 / (0.1 * 0.1**2)
        assert semiring_features_needed(SoftMaxPlus(tau), 0.5, 0.1, 0.1) == math.ceil(expected)


def test_tropical_is_not_linearizable():
    with pytest.raises(ValueError, match="Tropical"):
        semiring_degree_needed(Tropical(), 1.0, 1e-2)
    with pytest.raises(ValueError, match="Tropical"):
        semiring_features_needed(Tropical(), 1.0, 1e-2, 0.1)


def test_needed_arguments_named():
    # "'<' not supported" before, and a string radius taken by float()
    with pytest.raises(TypeError, match="^tol: expected a real number"):
        semiring_degree_needed(SoftMaxPlus(1.0), 1.0, None)
    with pytest.raises(TypeError, match="^max_degree"):
        semiring_degree_needed(SoftMaxPlus(1.0), 1.0, 1e-2, None)
    with pytest.raises(TypeError, match="^delta: expected a real number"):
        semiring_features_needed(SoftMaxPlus(1.0), 1.0, 1e-2, None)
    with pytest.raises(TypeError, match="^radius: expected a real number"):
        semiring_features_needed(SoftMaxPlus(1.0), "1", 1e-2, 0.1)
    # the default max_degree (512) passed the linearization's cap (170): named degree before
    with pytest.raises(ValueError, match="^max_degree: no degree <= 170"):
        semiring_degree_needed(SoftMaxPlus(0.01), 5.0, 1e-3)


def test_single_term_matches_taylor_at_scaled_radius():
    from attnprec.analysis.bounds.taylor import taylor_output_bound

    assert semiring_output_bound(SoftMaxPlus(0.5), 1.0, 6) == taylor_output_bound(2.0, 6)


def _coeffs(semiring, degree):
    return [
        sum(c * lam**p for c, lam in semiring.terms) / math.factorial(p) for p in range(degree + 1)
    ]


@given(
    st.sampled_from([LogExpMean(0.5), SoftMaxPlus(0.5), MixtureLSE((0.3, 0.7), (0.5, 1.5))]),
    st.sampled_from(["typical", "ties", "cancel"]),
    st.integers(1, 10),
    st.integers(1, 6),
    st.integers(2, 10),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_taylor_linearization_sound(semiring, family, n, d, degree, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(family, n_q=n, d_k=d, d_v=2, generator=g)
    bound = semiring_taylor_error_bound(q, k, v, semiring, degree, causal=causal)
    ref_l = reference("polynomial", q, k, v, coeffs=_coeffs(semiring, degree), causal=causal)
    ref_e = reference("semiring", q, k, v, semiring=semiring, causal=causal)
    assert bool(ref_l.contains(ref_e.value, bound + ref_e.radius).all())


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).float().double())


def _off(exact: float, direction: int, ulps: int) -> float:
    """An fp32 result within ``ulps`` ulps of ``exact``, pushed to ``direction``: an
    operation at its declared worst."""
    one = lambda x: math.ldexp(1.0, math.frexp(abs(x))[1] - 24)  # noqa: E731
    c = _f32(exact + direction * ulps * one(exact))
    while abs(c - exact) > ulps * one(c):
        c -= direction * one(c)
    return c


def test_softmaxplus_with_its_division_by_tau_is_covered():
    """SoftMaxPlus as kernels write it, ``exp(s / tau)``: the division within the declared
    2 ulps (not one rounded product ``lam s``), log2(e) folded in, exp2 within 4 ulps,
    each pushed against the output, on two keys 10 ulps apart near ``s / tau = 2^12``,
    where a division's error is largest against ``|s / tau|`` (a review: 1.12x outside the
    bound of ``sums="linear"``, 0.64 of it now)."""
    from attnprec.analysis.bounds import attention_error_bound
    from attnprec.analysis.precision import ONE_PASS, Precision

    tau, k0 = 0.1, 409.6659240722656
    k1 = k0 - 10 * 2.0**-14
    q = torch.tensor([[[1.0]]], dtype=torch.float64)
    k = torch.tensor([[[k0], [k1]]], dtype=torch.float64)
    v = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    C = _f32(1 / math.log(2))
    z = [_f32(_off(k0 / tau, +1, 2) * C), _f32(_off(k1 / tau, -1, 2) * C)]
    e = [_off(2.0 ** _f32(z[0] - z[0]), +1, 4), _off(2.0 ** _f32(z[1] - z[0]), -1, 4)]
    N, D = _f32(e[0] - e[1]), _f32(e[0] + e[1])
    y = _off(N / D, 1, 2)
    sem = SoftMaxPlus(tau)
    ref = reference("semiring", q, k, v, semiring=sem, scale=1.0)
    err = abs(y - float(ref.value[0, 0, 0])) + float(ref.radius[0, 0, 0])
    for prec in (Precision("fp32", block=ONE_PASS, sums="linear"), Precision("fp32")):
        b = attention_error_bound("semiring", q, k, v, prec, semiring=sem, scale=1.0)
        assert err <= float(b.total[0, 0, 0])


def test_a_mixtures_log_c_within_the_declared_log_is_covered():
    """MixtureLSE's ``log c_r`` as a kernel forms it from fp32 ``c``, ``log(c)`` within the
    declared 4 ulps (one term's up, the other's down) at ``log c = 69``: 1.27x outside the
    ``sums="linear"`` one-pass bound, which took ``log c`` for one rounding, and beyond the
    probabilistic level, where the two shifts are shared by every key (a review)."""
    from attnprec.analysis.bounds import attention_error_bound
    from attnprec.analysis.precision import ONE_PASS, Precision

    c0 = math.exp(69.0)
    sem = MixtureLSE((c0, c0), (1e-3, 1.0))
    q = torch.tensor([[1.0]], dtype=torch.float64)
    k = torch.tensor([[-20.0], [0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    log_c = [_off(math.log(_f32(c0)), +1, 3.9), _off(math.log(_f32(c0)), -1, 3.9)]
    lam = [_f32(1e-3), 1.0]
    logits = [[_f32(log_c[r] + _f32(lam[r] * s)) for r in range(2)] for s in (-20.0, 0.0)]
    top = max(max(row) for row in logits)
    w = [_f32(sum(math.exp(_f32(x - top)) for x in row)) for row in logits]
    y = _f32(_f32(w[0] - w[1]) / _f32(w[0] + w[1]))
    ref = reference("semiring", q, k, v, semiring=sem, scale=1.0)
    err = abs(y - float(ref.value[0, 0])) + float(ref.radius[0, 0])
    for prec in (Precision("fp32", block=ONE_PASS, sums="linear"), Precision("fp32")):
        b = attention_error_bound("semiring", q, k, v, prec, semiring=sem, scale=1.0)
        assert err <= float(b.typical.total[0, 0]) <= float(b.total[0, 0])
