"""Semiring attention: how well the linearized forms approximate the exact semiring.

A semiring weight is a mixture of exponentials rho(s) = sum_r c_r exp(lam_r s) (c_r, lam_r
> 0; attention/semiring.py). Linearized by Taylor, each exp(lam_r s) becomes T_P(lam_r s), so
the weight ratio r(s) = sum_r c_r T_P(lam_r s) / sum_r c_r exp(lam_r s) is a mediant of the
per-term ratios and lies in [min_r a_r, max_r b_r] with [a_r, b_r] the Taylor ratio range
on |x| <= lam_r R (:func:`attnprec.analysis.bounds.taylor.taylor_ratio_range`). The output
bound (b - a) / (b + a) max_j |v_j - y| of :mod:`.taylor` follows unchanged.

For SoftMaxPlus(tau) (lam = 1/tau) the effective radius is R / tau: the degree needed grows
like e R / tau and the random features needed like exp(4 R^2 / tau) (:mod:`.favor`), both
unbounded as tau -> 0; the tropical limit (the max) has no finite linearization, and
:func:`semiring_degree_needed` / :func:`semiring_features_needed` raise for ``Tropical``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnprec._validate import check_int
from attnprec.analysis.bounds.favor import mixture_features_needed
from attnprec.analysis.bounds.rounding import upper
from attnprec.analysis.bounds.taylor import _check_radius, _check_tol, taylor_ratio_range
from attnprec.attention.taylor import MAX_DEGREE, check_degree

__all__ = [
    "semiring_ratio_range",
    "semiring_output_bound",
    "semiring_degree_needed",
    "semiring_features_needed",
    "semiring_taylor_error_bound",
]


def _terms(semiring: Any) -> tuple[tuple[float, float], ...]:
    terms = getattr(semiring, "terms", None)
    if terms is None:
        raise TypeError(f"semiring: expected a Semiring, got {type(semiring).__name__}")
    if not terms:
        raise ValueError("semiring: Tropical (the max) is not linearizable: no finite bound")
    return tuple((float(c), float(lam)) for c, lam in terms)


def semiring_ratio_range(semiring: Any, radius: float, degree: int) -> tuple[float, float]:
    """Certified range of sum_r c_r T_P(lam_r s) / rho(s) over |s| <= radius (mediant)."""
    radius = _check_radius(radius)
    degree = check_degree(degree)
    ranges = [taylor_ratio_range(abs(lam) * radius, degree) for _, lam in _terms(semiring)]
    return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)


def semiring_output_bound(semiring: Any, radius: float, degree: int) -> float:
    """B with |y_lin - y_semiring| <= B max_j |v_j - y| for |s| <= R; inf if r can reach 0.

    Parameters
    ----------
    semiring : Semiring
        A linearizable semiring of :mod:`attnprec.attention` (not ``Tropical``).
    radius : float
        R >= 0, finite: the largest |s| = |scale q.k|.
    degree : int
        P, the Taylor degree, in ``[0, MAX_DEGREE]`` (170).

    Returns
    -------
    float
        B >= 0, or ``inf``.

    Raises
    ------
    TypeError
        If ``semiring`` is not a Semiring, ``radius`` not a number or ``degree`` not an
        integer.
    ValueError
        For ``Tropical``, or ``radius`` or ``degree`` out of range.

    Notes
    -----
    Error: a sound bound for every input with ``|s| <= R`` (certified ranges, rounded up).
    """
    lo, hi = semiring_ratio_range(semiring, radius, degree)
    if lo <= 0.0:
        return math.inf
    return upper((hi - lo) / (hi + lo), 3)


def semiring_degree_needed(semiring: Any, radius: float, tol: float, max_degree: int = 512) -> int:
    """Least Taylor degree P with :func:`semiring_output_bound` <= tol.

    Degrees past ``MAX_DEGREE`` (170, what the linearization takes) are not tried.

    Parameters
    ----------
    semiring : Semiring
        A linearizable semiring of :mod:`attnprec.attention` (not ``Tropical``).
    radius : float
        R >= 0, finite.
    tol : float
        Allowed relative output error, in ``(0, 1)``.
    max_degree : int, optional
        The largest degree tried, ``>= 0`` (default 512, capped at 170).

    Returns
    -------
    int
        The least such P.

    Notes
    -----
    Error: sound; chosen with :func:`semiring_output_bound`, a certified bound.

    Raises
    ------
    TypeError
        If an argument is not a number (``max_degree``: an integer).
    ValueError
        For ``Tropical`` (not linearizable), ``tol`` outside (0, 1), or when no degree up to
        ``max_degree`` suffices (e.g. SoftMaxPlus with tau -> 0).
    """
    _terms(semiring)
    radius = _check_radius(radius)
    tol = _check_tol(tol)
    max_degree = min(check_int("max_degree", max_degree), MAX_DEGREE)
    for p in range(max_degree + 1):
        if semiring_output_bound(semiring, radius, p) <= tol:
            return p
    raise ValueError(f"max_degree: no degree <= {max_degree} reaches tol={tol} at R={radius}")


def semiring_features_needed(
    semiring: Any, radius: float, tol: float, delta: float, *, block: int = 1
) -> int:
    """FAVOR+ features for the linearized semiring (:func:`.favor.mixture_features_needed`):
    exponential in lam_max R^2, so exp(4 R^2 / tau) for SoftMaxPlus(tau); ``block`` times
    as many for features in independent blocks of ``block`` (orthogonal ones: d_k).

    Parameters
    ----------
    semiring : Semiring
        A linearizable semiring of :mod:`attnprec.attention` (not ``Tropical``).
    radius, tol, delta, block
        As in :func:`.favor.mixture_features_needed`.

    Returns
    -------
    int
        m >= 1.

    Raises
    ------
    TypeError
        If ``semiring`` is not a Semiring; otherwise as
        :func:`.favor.mixture_features_needed`.
    ValueError
        For ``Tropical``; otherwise as :func:`.favor.mixture_features_needed`.

    Notes
    -----
    Error: probabilistic, as :func:`.favor.mixture_features_needed`.
    """
    return mixture_features_needed(_terms(semiring), radius, tol, delta, block=block)


@torch.no_grad()
def semiring_taylor_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    semiring: Any,
    degree: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    rows: object = None,
) -> torch.Tensor:
    """Per-element bound on |semiring_attention(linearize=("taylor", P)) - exact semiring|.

    The linearized weights ``sum_p c_p s^p`` with ``c_p = sum_r c_r lam_r^p / p!`` and the
    exact ``sum_r c_r exp(lam_r s)``: both outputs evaluated in float64 with certified
    radii, their difference plus the radii (:mod:`.approximation`). ``inf`` where the
    linearized normalizer is not certified away from 0.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, finite; taken as exact.
    semiring : Semiring
        A linearizable semiring of :mod:`attnprec.attention` (not ``Tropical``).
    degree : int
        P, in ``[0, MAX_DEGREE]`` (170).
    causal, scale
        As in the attention methods (scale defaults to 1/sqrt(d_k)).
    rows : int or sequence of int, optional
        As in :func:`.taylor.taylor_error_bound`.

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]`` (the selected rows when ``rows`` is given).

    Raises
    ------
    TypeError, ValueError
        Naming the argument: a ``semiring`` that is not one or is ``Tropical``, a bad
        ``degree``, shapes, dtypes, non-finite inputs or ``rows``.

    Notes
    -----
    Error: sound: ``|ŷ_lin - ŷ| + eps_lin + eps`` with certified radii eps (the linearized
    coefficients' float64 rounding included).
    """
    from attnprec.analysis.bounds.approximation import output_difference

    terms = _terms(semiring)
    degree = check_degree(degree)
    coeffs = [sum(c * lam**p for c, lam in terms) / math.factorial(p) for p in range(degree + 1)]
    return output_difference(
        q, k, v, causal=causal, scale=scale, rows=rows, coeffs=coeffs,
        coeff_rel=(degree + len(terms) + 4) * 2.0**-52, terms=terms,
    )  # fmt: skip
