"""Relative-minimax polynomial weights: certified error, positivity, a-posteriori soundness."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds.minimax import (
    minimax_degree_needed,
    minimax_exp_coeffs,
    minimax_weight_bound,
    polynomial_error_bound,
    polynomial_ratio_range,
)
from attnprec.analysis.bounds.taylor import taylor_degree_needed, taylor_weight_bound
from attnprec.analysis.reference import reference
from attnprec.testing.inputs import make_inputs

mpmath.mp.prec = 120


def _sampled_max(coeffs: torch.Tensor, radius: float, points: int = 1001) -> mpmath.mpf:
    c = [mpmath.mpf(float(x)) for x in coeffs]
    worst = mpmath.mpf(0)
    for i in range(points):
        x = mpmath.mpf(radius) * (2 * mpmath.mpf(i) / (points - 1) - 1)
        worst = max(worst, abs(mpmath.polyval(c[::-1], x) * mpmath.exp(-x) - 1))
    return worst


@pytest.mark.parametrize(("radius", "degree"), [(1, 3), (2, 8), (4, 8), (8, 10)])
def test_certified_and_close_to_sampled(radius, degree):
    c = minimax_exp_coeffs(radius, degree)
    b = minimax_weight_bound(radius, degree)
    s = _sampled_max(c, radius)
    assert s <= b  # sound
    assert b <= 1.05 * s  # tight: the partition enclosure overestimates by < 5 %
    assert b < taylor_weight_bound(radius, degree)


def test_measured_figures():
    assert minimax_weight_bound(2, 8) < 6e-6
    assert minimax_weight_bound(4, 8) < 2.2e-3


def test_positive_on_interval():
    lo, _ = polynomial_ratio_range(minimax_exp_coeffs(4, 6), 4)
    assert lo > 0  # p(x) e^{-x} > 0, hence p > 0 on [-4, 4]


def test_degree_needed_beats_taylor():
    for radius in (1, 2):
        assert minimax_degree_needed(radius, 1e-3) < taylor_degree_needed(radius, 1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="degree"):
        minimax_exp_coeffs(2.0, -1)
    with pytest.raises(ValueError, match="coeffs"):
        polynomial_ratio_range((), 1.0)
    with pytest.raises(ValueError, match="coeffs"):
        polynomial_error_bound(*(torch.zeros(2, 2, dtype=torch.float64),) * 3, torch.tensor([]))


@given(
    st.sampled_from(["typical", "outliers", "ties", "cancel"]),
    st.integers(1, 16),
    st.integers(1, 8),
    st.sampled_from([(1.0, 3), (2.0, 4), (4.0, 8)]),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_aposteriori_sound(family, n, d, rp, causal, seed):
    radius, degree = rp
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(family, n_q=n, d_k=d, d_v=2, generator=g)
    c = minimax_exp_coeffs(radius, degree)
    bound = polynomial_error_bound(q, k, v, c, causal=causal)
    ref_p = reference("polynomial", q, k, v, coeffs=c, causal=causal)
    ref_s = reference("softmax", q, k, v, causal=causal)
    assert bool(ref_p.contains(ref_s.value, bound + ref_s.radius).all())
    assert not bool(torch.isnan(bound).any())
    if float((q @ k.transpose(-1, -2)).abs().max()) / math.sqrt(d) <= radius:
        # Inside [-R, R] the polynomial is certified positive: the bound must be finite.
        assert bool(torch.isfinite(bound).all())


@pytest.mark.parametrize("pieces", [0, -1])
def test_pieces_is_checked(pieces):
    """pieces <= 0 returned (inf, -inf), a range holding nothing; 2.5 was truncated."""
    with pytest.raises(ValueError, match="pieces"):
        polynomial_ratio_range((1.0, 1.0), 1.0, pieces)
    with pytest.raises(TypeError, match="pieces"):
        polynomial_ratio_range((1.0, 1.0), 1.0, 2.5)


def test_wide_radius_fits_and_certifies():
    # 128-bit Remez found its system singular past R ~ 60 (ZeroDivisionError before)
    c = minimax_exp_coeffs(100.0, 4)
    b = minimax_weight_bound(100.0, 4)
    assert math.isfinite(b) and b >= _sampled_max(c, 100.0, 201)


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="^radius: expected at most 700"):
        minimax_exp_coeffs(1e300, 4)
    with pytest.raises(ValueError, match="^radius: expected at most 700"):
        minimax_degree_needed(1e4, 1e-3)
    with pytest.raises(ValueError, match="^pieces: expected an integer <= 1048576"):
        polynomial_ratio_range((1.0, 1.0), 1.0, pieces=10**30)  # a hang before
    with pytest.raises(TypeError, match="^tol: expected a real number"):
        minimax_degree_needed(2.0, None)
    with pytest.raises(TypeError, match="^max_degree: expected an integer"):
        minimax_degree_needed(2.0, 1e-3, None)
    with pytest.raises(ValueError, match="^max_degree: expected an integer <= 170"):
        minimax_degree_needed(2.0, 1e-3, 10**30)
