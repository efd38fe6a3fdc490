"""Random-feature (FAVOR+) error: estimator variance and a probabilistic output bound.

FAVOR+ (Choromanski et al. 2021) estimates K = exp(a . b) (a = sqrt(scale) q,
b = sqrt(scale) k) by K̂ = (1/m) sum_l Z_l, Z_l = exp(w_l . (a + b) - (|a|^2 + |b|^2) / 2),
w_l ~ N(0, I). For two keys b, b' of one query a, E[Z(b) Z(b')] = K K' exp((a + b).(a + b')),
so

    Cov(Z(b), Z(b')) = K K' (exp((a + b).(a + b')) - 1),    Var Z = K^2 (exp(|a + b|^2) - 1).

The output y = N / D (N = sum K_j v_j, D = sum K_j) is estimated by ŷ = N̂ / D̂, and
ŷ - y = (N̂ - y D̂) / D̂ where N̂ - y D̂ = (1/m) sum_l sum_j Z_jl (v_j - y) has mean 0 and the
variance above with weights (v_j - y). Chebyshev's inequality on each centered numerator
entry and on each denominator, with a union bound over the B n_q (d_v + 1) events (B the
batch items, which share the projection), gives |ŷ_ic - y_ic| <= t sigma_ic / (D_i - t
sigma_D,i) for all i, c with probability >= 1 - delta, t = sqrt(B n_q (d_v + 1) / delta).
The weights Z are lognormal (heavy tailed), so sub-Gaussian concentration does not apply;
Chebyshev needs only the variance.

Orthogonal projections: Choromanski et al. (2021, Theorem 2) show that one kernel entry's
estimate has a mean squared error at most the i.i.d. one; the output needs sums over keys,
whose variance that does not bound (a review's exact quadrature, d = m = 2, keys (r, 0) and
(0, r): the normalizer's variance up to 0.22% above the i.i.d. one). Features drawn in
independent blocks of at most ``block`` (``favor_projection(orthogonal=True)``: blocks of
d_k, each row still N(0, I)) are covered by the triangle inequality in L2: a block's sum
has a standard deviation at most the sum of its features', so the variance of the mean is
at most the i.i.d. one times ``sum_b |b|^2 / m`` (<= ``block``) (docs/bounds/favor.md,
"Assumptions").

A mixture of exponentials (semirings) sum_r c_r exp(lam_r s) uses one projection for every
term: the same formulas hold with a, b scaled by sqrt(lam_r) per term, summed over terms.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnprec._validate import check_finite, check_int, check_qkv, check_real, resolve_scale
from attnprec.analysis.bounds._rows import Visible
from attnprec.analysis.bounds.taylor import _check_radius, _check_tol

__all__ = [
    "block_factor",
    "favor_variance",
    "favor_error_bound",
    "favor_features_needed",
    "mixture_error_bound",
    "mixture_features_needed",
    "favor_rounding",
    "favor_rounding_state",
]


def _check_m(num_features: int) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features: expected a positive integer, got {num_features!r}")
    return num_features


def block_factor(num_features: int, block: int) -> float:
    """``sum_b |b|^2 / m`` over the independent blocks of at most ``block`` features (the
    last one partial): the factor on the i.i.d. variance of the mean of ``m`` features that
    are dependent within a block (1 for ``block = 1``, at most ``block``).

    Parameters
    ----------
    num_features : int
        m >= 1.
    block : int
        The largest block, ``>= 1``.

    Returns
    -------
    float
        The factor, in ``[1, block]``.

    Raises
    ------
    TypeError
        If ``block`` is not an integer.
    ValueError
        If ``num_features`` is not a positive integer or ``block < 1``.

    Notes
    -----
    Error: exact up to one float64 division.
    """
    m = _check_m(num_features)
    b = check_int("block", block, 1)
    return ((m // b) * b * b + (m % b) ** 2) / m


def _check_delta(delta: object) -> float:
    d = check_real("delta", delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta: expected a probability in (0, 1), got {delta!r}")
    return d


def _check_terms(terms: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
    if not terms:
        raise ValueError("semiring: has no exponential terms (Tropical is not linearizable)")
    for c, lam in terms:
        if not (c > 0 and lam > 0 and math.isfinite(c) and math.isfinite(lam)):
            raise ValueError(f"semiring: terms need c > 0 and lam > 0, got ({c}, {lam})")
    return terms


def _moments(
    q: torch.Tensor,
    k: torch.Tensor,
    terms: tuple[tuple[float, float], ...],
    scale: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact weights K [.., n_q, n_k] and covariance C [.., n_q, n_k, n_k] of one feature."""
    ws, alphas = [], []
    for c, lam in terms:
        a = q * math.sqrt(lam * scale)
        b = k * math.sqrt(lam * scale)
        ws.append(c * torch.exp(a @ b.transpose(-1, -2)))
        alphas.append(a.unsqueeze(-2) + b.unsqueeze(-3))  # [.., n_q, n_k, d]
    K = torch.stack(ws).sum(0)
    C = torch.zeros(*K.shape, K.shape[-1], dtype=torch.float64)
    for w1, a1 in zip(ws, alphas, strict=True):
        for w2, a2 in zip(ws, alphas, strict=True):
            C = C + w1.unsqueeze(-1) * w2.unsqueeze(-2) * torch.expm1(a1 @ a2.transpose(-1, -2))
    if mask is not None:
        K = K.masked_fill(~mask, 0.0)
        C = C.masked_fill(~(mask.unsqueeze(-1) & mask.unsqueeze(-2)), 0.0)
    return K, C


@torch.no_grad()
def favor_variance(
    q: torch.Tensor, k: torch.Tensor, num_features: int, *, scale: float | None = None
) -> torch.Tensor:
    """Variance of the FAVOR+ estimate of exp(scale q_i . k_j) with m i.i.d. features.

    Var = exp(2 s_ij) (exp(scale |q_i + k_j|^2) - 1) / m (Choromanski et al. 2021, Lemma 2);
    with orthogonal features each entry's is at most this (their Theorem 2).

    Parameters
    ----------
    q, k : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``; taken as exact.
    num_features : int
        m >= 1.
    scale : float, optional
        Defaults to 1/sqrt(d_k).

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, n_k]``.

    Raises
    ------
    TypeError, ValueError
        Naming the argument: bad shapes or dtypes, ``num_features`` not a positive integer,
        or a bad ``scale``.

    Notes
    -----
    Error: the exact variance evaluated in float64 (not rounded up; ``inf`` on overflow).
    """
    m = _check_m(num_features)
    check_qkv(q, k, k)
    sc = resolve_scale(scale, q.shape[-1])
    q, k = q.double(), k.double()
    s = sc * (q @ k.transpose(-1, -2))
    nsq = sc * ((q.unsqueeze(-2) + k.unsqueeze(-3)) ** 2).sum(-1)
    return torch.exp(2 * s) * torch.expm1(nsq) / m


@torch.no_grad()
def mixture_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: tuple[tuple[float, float], ...],
    num_features: int,
    delta: float,
    *,
    causal: bool = False,
    scale: float | None = None,
    block: int = 1,
) -> torch.Tensor:
    """Bound on |ŷ - y| for random-feature attention with weights sum_r c_r exp(lam_r s).

    Holds for every element simultaneously with probability >= 1 - delta over the draw of the
    projection, shared by the batch items: ``t sigma_ic / (D_i - t sigma_D,i)`` with
    t = sqrt(B n_q (d_v + 1) / delta), B the batch items (module docstring); ``inf`` where
    D_i <= t sigma_D,i. The projection's rows are N(0, I) each, in independent blocks of at
    most ``block`` (1: i.i.d.; d_k for orthogonal features): the variances carry
    :func:`block_factor`.
    y is the exact attention with these weights, evaluated in float64 (a relative error of
    order n u64, negligible against the random-feature error).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, finite; taken as exact.
    terms : tuple of (float, float)
        The pairs ``(c_r, lam_r)``, non-empty, each positive and finite.
    num_features : int
        m >= 1.
    delta : float
        Failure probability, in ``(0, 1)``.
    causal : bool, optional
        Causal mask (default False).
    scale : float, optional
        ``>= 0``; defaults to 1/sqrt(d_k).
    block : int, optional
        The largest block of dependent features (default 1, i.i.d.).

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]``; ``inf`` where the normalizer is not bounded away from 0.

    Raises
    ------
    TypeError, ValueError
        Naming the argument: bad shapes or dtypes, non-finite inputs, ``terms``,
        ``num_features``, ``delta``, ``block`` or ``scale`` out of range.

    Notes
    -----
    Error: a probabilistic bound (Chebyshev with a union bound), holding for all elements
    at once with probability >= 1 - delta; y is evaluated in float64, not certified.
    """
    n_q, n_k, d_k, d_v = check_qkv(q, k, v, causal)
    for name, t_ in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t_)
    m = _check_m(num_features)
    f = block_factor(m, block)
    delta = _check_delta(delta)
    terms = _check_terms(tuple(terms))
    sc = resolve_scale(scale, d_k)
    if sc < 0:
        raise ValueError(f"scale: random features need scale >= 0, got {sc}")
    q, k, v = q.double(), k.double(), v.double()
    mask = torch.ones(n_q, n_k, dtype=torch.bool).tril() if causal else None
    K, C = _moments(q, k, terms, sc, mask)
    D = K.sum(-1)
    y = (K @ v) / D.unsqueeze(-1)
    dv = v.unsqueeze(-3) - y.unsqueeze(-2)  # [.., n_q, n_k, d_v]
    var_num = ((C @ dv) * dv).sum(-2).clamp_min(0.0) * (f / m)  # [.., n_q, d_v]
    var_den = C.sum((-1, -2)).clamp_min(0.0) * (f / m)
    # one projection serves every batch item: the union bound is over all their events
    # (the broadcast batch: q [1, n, d] against k, v [B, n, .] is B items; a review: q's
    # batch alone, 1, failed 52 of 100 draws at delta = 0.5 over B = 2000)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    t = math.sqrt(math.prod(batch) * n_q * (d_v + 1) / delta)
    lo = D - t * var_den.sqrt()
    bound = t * var_num.sqrt() / lo.clamp_min(1e-300).unsqueeze(-1)
    return torch.where(lo.unsqueeze(-1) > 0, bound, torch.full_like(bound, math.inf))


@torch.no_grad()
def favor_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_features: int,
    delta: float,
    *,
    causal: bool = False,
    scale: float | None = None,
    orthogonal: bool = False,
) -> torch.Tensor:
    """Per-element bound on |favor_attention - softmax_attention| holding w.p. >= 1 - delta.

    Chebyshev on the exact variance of the centered numerator and of the normalizer, union
    bound over the B n_q (d_v + 1) events (module docstring), for a projection drawn by
    ``favor_projection(m, d_k, orthogonal=orthogonal)``: i.i.d. rows, or orthogonal blocks
    of d_k (variances times :func:`block_factor`, up to d_k; module docstring).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, finite; taken as exact.
    num_features : int
        m >= 1.
    delta : float
        Failure probability, in ``(0, 1)``.
    causal : bool, optional
        Causal mask (default False).
    scale : float, optional
        ``>= 0``; defaults to 1/sqrt(d_k).
    orthogonal : bool, optional
        Whether the projection was drawn orthogonal (default False).

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]``, as :func:`mixture_error_bound`.

    Raises
    ------
    TypeError
        If ``orthogonal`` is not a bool; otherwise as :func:`mixture_error_bound`.
    ValueError
        As :func:`mixture_error_bound`.

    Notes
    -----
    Error: probabilistic, over the draw of the projection, as :func:`mixture_error_bound`.
    """
    if not isinstance(orthogonal, bool):
        raise TypeError(f"orthogonal: expected a bool, got {orthogonal!r}")
    block = q.shape[-1] if orthogonal else 1
    return mixture_error_bound(
        q, k, v, ((1.0, 1.0),), num_features, delta, causal=causal, scale=scale, block=block
    )


def mixture_features_needed(
    terms: tuple[tuple[float, float], ...],
    radius: float,
    tol: float,
    delta: float,
    *,
    block: int = 1,
) -> int:
    """Features m so that one output entry has |ŷ - y| <= tol max_j |v_j - y| w.p. >= 1 - delta.

    For inputs with sqrt(scale) |q_i|, sqrt(scale) |k_j| <= radius: every covariance ratio
    exp((a + b).(a + b')) - 1 is at most e^{4 lam_max R^2} - 1 =: g, so
    sigma_num <= sqrt(g / m) D max|v - y| and sigma_D <= sqrt(g / m) D; with t = sqrt(2 / delta)
    (two events), t sqrt(g / m) / (1 - t sqrt(g / m)) <= tol gives
    m = ceil(2 g (1 + tol)^2 / (delta tol^2)). Exponential in lam_max R^2: for SoftMaxPlus(tau)
    (lam = 1/tau) it grows as exp(4 R^2 / tau), unbounded as tau -> 0 (the tropical limit).
    Features in independent blocks of at most ``block`` (orthogonal ones: d_k) need
    ``block`` times as many (:func:`block_factor` <= ``block``).

    Parameters
    ----------
    terms : tuple of (float, float)
        The pairs ``(c_r, lam_r)``, non-empty, each positive and finite.
    radius : float
        R >= 0, finite.
    tol : float
        Allowed relative error, in ``(0, 1)``.
    delta : float
        Failure probability, in ``(0, 1)``.
    block : int, optional
        The largest block of dependent features (default 1).

    Returns
    -------
    int
        m >= 1.

    Raises
    ------
    TypeError
        If ``radius``, ``tol`` or ``delta`` is not a real number, or ``block`` not an integer.
    ValueError
        If an argument is out of range, or the count overflows float64.

    Notes
    -----
    Error: probabilistic: with m features one output entry meets ``tol`` with probability
    >= 1 - delta, for every input within the radius.
    """
    terms = _check_terms(tuple(terms))
    r = _check_radius(radius)
    tol = _check_tol(tol)
    delta = _check_delta(delta)
    b = check_int("block", block, 1)
    lam = max(lam for _, lam in terms)
    if 4.0 * lam * r * r > 709.0:  # (math.expm1 raised OverflowError)
        raise ValueError(
            f"radius: no finite number of features reaches tol at R={radius!r} "
            f"(e^(4 lam R^2) - 1 overflows float64)"
        )
    g = math.expm1(4.0 * lam * r * r)
    m = 2.0 * b * g * (1.0 + tol) ** 2 / (delta * tol * tol)
    if not math.isfinite(m):
        raise ValueError(
            f"radius: no finite number of features reaches tol={tol!r} with delta={delta!r} "
            f"at R={radius!r} (the count overflows float64)"
        )
    return max(1, math.ceil(m))


def favor_features_needed(radius: float, tol: float, delta: float, *, block: int = 1) -> int:
    """:func:`mixture_features_needed` for the exponential kernel (softmax): 2 block
    (e^{4R^2} - 1) (1 + tol)^2 / (delta tol^2) features, R bounding sqrt(scale) |q_i| and
    sqrt(scale) |k_j| (``block``: 1 for i.i.d. features, d_k for orthogonal ones).

    Parameters
    ----------
    radius, tol, delta, block
        As in :func:`mixture_features_needed`.

    Returns
    -------
    int
        m >= 1.

    Raises
    ------
    TypeError, ValueError
        As :func:`mixture_features_needed`.

    Notes
    -----
    Error: probabilistic, as :func:`mixture_features_needed`.
    """
    return mixture_features_needed(((1.0, 1.0),), radius, tol, delta, block=block)


@torch.no_grad()
def favor_projection_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    rows: object = None,
) -> torch.Tensor:
    """Deterministic per-element bound on |favor_attention(projection=W) - softmax_attention|.

    For a fixed projection W the FAVOR+ weights are ``sum_f exp(t_q,f + t_k,f)`` with the
    feature exponents ``t = sqrt(scale) W x - scale |x|^2 / 2 - log(m) / 2``; both outputs
    are evaluated in float64 with certified radii (log-sum-exp of the exponents, so no key
    is lost to underflow) and the bound is their difference plus the radii
    (:mod:`.approximation`): the true error up to float64 evaluation.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, finite; taken as exact.
    projection : torch.Tensor
        W ``[m, d_k]``, finite.
    causal : bool, optional
        Causal mask (default False).
    scale : float, optional
        ``>= 0``; defaults to 1/sqrt(d_k).
    rows : int or sequence of int, optional
        As in :func:`.taylor.taylor_error_bound`.

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]`` (the selected rows when ``rows`` is given).

    Raises
    ------
    TypeError, ValueError
        Naming the argument: bad shapes or dtypes, non-finite inputs, a ``projection`` not
        ``[m, d_k]``, a negative ``scale``, or bad ``rows``.

    Notes
    -----
    Error: deterministic and sound for the given W: ``|ŷ_W - ŷ| + eps_W + eps`` with
    certified radii.
    """
    from attnprec.analysis.bounds.approximation import output_difference

    _, _, d_k, _ = check_qkv(q, k, v, causal)
    W = projection
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.shape[-1] != d_k:
        raise ValueError(f"projection: expected a tensor [m, d_k={d_k}], got {W!r:.60}")
    check_finite("projection", W)
    sc = resolve_scale(scale, d_k)
    if sc < 0:
        raise ValueError(f"scale: random features need scale >= 0, got {sc}")
    return output_difference(q, k, v, causal=causal, scale=sc, rows=rows, projection=W.double())


# ---------------------------------------------------------------------------------------------
# Rounding: the feature exponents, then the sums-of-exponentials model of :mod:`._expprod`.


def favor_exponents(
    x: torch.Tensor,
    W: torch.Tensor,
    sc: float,
    terms: tuple[tuple[float, float], ...],
    key: bool,
    precision: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature exponents ``t_rf = sqrt(lam_r sc) w_f . x - lam_r sc |x|^2 / 2 - log(m)/2
    (+ log c_r on keys)`` of ``x [B, n, d]``, concatenated over the terms ``[B, n, R m]``;
    a bound on their float64 evaluation error; and one on a kernel's error computing them
    in ``precision.compute`` (``sqrt`` of the scale, the load, W rounded to compute, a
    dot of d products, the squared norm, three subtractions: ``gamma_{d+8}`` (two more
    when the load rounds) of the moduli, plus ``(4d + 4)`` underflows (flushed or not)),
    at the coarser of compute and accumulate (the dot's sums are sums)."""
    from attnprec.analysis.bounds.rounding import U64, gamma, upper

    fc, fa = precision.compute, precision.accumulate
    # the dot's sums round in accumulate (a matmul), the rest in compute: the coarser, or
    # the dot's result converted into a narrower compute (its declared rounding)
    u_r, tiny = precision.product_u(), max(fc.underflow, fa.underflow)
    d, m = x.shape[-1], W.shape[0]
    xw, axw = x @ W.T, x.abs() @ W.abs().T
    nrm = (x * x).sum(-1, keepdim=True)
    n_r = d + 8 + (0 if precision.loads_exactly() else 2)
    ts, e64, ek = [], [], []
    # (in place, each step one rounding as written: FAVOR+'s state evaluation forms these
    # for every key, [n, m] each; no add with alpha, which fuses a multiply-add)
    for c, lam in terms:
        s = lam * sc
        rs = math.sqrt(s)
        logc = math.log(c) if key else 0.0
        half = (s / 2) * nrm
        ts.append(torch.mul(xw, rs).sub_(half).sub_(math.log(m) / 2).add_(logc))
        M = torch.mul(axw, rs).add_(half).add_(math.log(m) / 2).add_(abs(logc))
        e64.append(upper(M * gamma(2 * d + 10, U64), 4))
        M.mul_(gamma(n_r, u_r) + gamma(2 * d + 10, U64))
        ek.append(upper(M, 4).add_((4 * d + 4) * tiny))
        del M
    del xw, axw
    if len(terms) == 1:
        return ts[0], e64[0], ek[0]
    return torch.cat(ts, -1), torch.cat(e64, -1), torch.cat(ek, -1)


def favor_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any,
    sc: float,
    causal: bool | Visible,
    lam: float,
    W: torch.Tensor,
    terms: tuple[tuple[float, float], ...] = ((1.0, 1.0),),
    rows: torch.Tensor | None = None,
    lifted: bool = False,
) -> dict[str, torch.Tensor]:
    """Rounding bounds of FAVOR+ (and of a FAVOR+-linearized semiring with ``terms``):
    ``"sound"``, ``"typical"`` ``[B, rows, d_v]`` and the masks of the intermediates that
    may overflow. ``W [m, d_k]`` float64: the projection the kernel uses. ``lifted``: the
    kernel shifts by the largest linear part of the exponents (Performer's
    ``amax(data_dash)``, :func:`_lift`) rather than by the largest exponent."""
    from attnprec.analysis.bounds._expprod import Exponents, chord_reach, expprod_block
    from attnprec.analysis.bounds._rows import Block, stream
    from attnprec.analysis.bounds.softmax import Loaded

    W = W.to(torch.float64)
    ld = Loaded(precision)
    key_over = ld.over(k).any(-1) | ld.over(v).any(-1)  # loads past compute, once
    # the chords' decision from every row's and key's exponents, once per sequence
    Xs, _, eXs = favor_exponents(q, W, sc, terms, False, precision)
    Ys, yes, eYs = favor_exponents(k, W, sc, terms, True, precision)
    y_max = _key_top(Ys + _lift(k, sc, terms, W.shape[0]) if lifted else Ys, yes, eYs, causal,
                     lifted)  # fmt: skip
    chords = chord_reach(Xs, Ys, eXs, eYs, precision)
    key_shift_err = (eYs + yes).amax((-1, -2))
    y_top = _every_key_top(Ys, yes, eYs, causal)
    del Xs, eXs

    def block(blk: Block) -> dict[str, torch.Tensor]:
        X, xe, eX = favor_exponents(blk.q, W, sc, terms, False, precision)
        # the keys' exponents as the sequence's (a block's own product may differ in its
        # last bits, and the running key maxima continue across blocks: a review)
        Y, ye, eY = (x[..., blk.held, :] for x in (Ys, yes, eYs))
        ex = Exponents(
            X, Y, xe, ye, eX, eY, per_channel=False, key_over=key_over, y_max=y_max, chords=chords,
            key_shift_err=key_shift_err, y_top=y_top,
            q_lift=_row_lift(blk.q, sc, terms, W.shape[0]) if lifted else None,
        )  # fmt: skip
        out, _ = expprod_block(blk, ex, precision, lam)
        return out

    width = W.shape[0] * len(terms)
    return stream(block, q, k, v, causal, rows, width=width)


def _lift(x: torch.Tensor, sc: float, terms: tuple[tuple[float, float], ...], m: int) -> Any:
    """``[B, n, R m]``, at least what each feature exponent of ``x`` lacks of its linear
    part: ``(lam_r sc / 2) |x|^2 + log(m) / 2``, rounded up. Performer's code shifts by the
    largest linear part, ``amax(data_dash)`` (keys: over the sequence; queries: over the
    row's features), above the largest exponent: a review's fp32 emulation with a key of
    ``x = 80`` setting that shift was 1.97x outside the rounding bound that shifted by
    the largest exponent (``test_witness_favor_performer_shift``)."""
    from attnprec.analysis.bounds.rounding import upper

    half = (x * x).sum(-1, keepdim=True) * (sc / 2)
    parts = [(half * lam + math.log(m) / 2).expand(*x.shape[:-1], m) for _, lam in terms]
    return upper(parts[0] if len(parts) == 1 else torch.cat(parts, -1), 4)


def _row_lift(x: torch.Tensor, sc: float, terms: tuple[tuple[float, float], ...], m: int) -> Any:
    """``[B, n, 1]``: how far above a row's largest feature exponent a kernel may shift the
    row (:class:`._expprod.Exponents` ``q_lift``): its largest :func:`_lift`."""
    return _lift(x, sc, terms, m).amax(-1, keepdim=True)


def _computed_keys(t: torch.Tensor, e64: torch.Tensor, ek: torch.Tensor) -> torch.Tensor:
    """Each key's largest feature exponent as the kernel computes it ``[B, n, 1]`` (an
    upper bound), from :func:`favor_exponents` ``(t, e64, ek)``."""
    from attnprec.analysis.bounds.rounding import U64

    hi = torch.add(t, e64).add_(ek)
    err = hi.abs().add_(e64).add_(ek).mul_(4 * U64)
    return hi.add_(err).amax(-1, keepdim=True)


def _every_key_top(
    t: torch.Tensor, e64: torch.Tensor, ek: torch.Tensor, causal: bool | Visible
) -> torch.Tensor | None:
    """The largest computed key exponent over the padding keys ``[B, 1, 1]``
    (:func:`._rows.padding_max`; :func:`._expprod._past_exp`)."""
    from attnprec.analysis.bounds._rows import padding_max

    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    return None if vis.key_mask is None else padding_max(_computed_keys(t, e64, ek), vis)


def _key_top(
    t: torch.Tensor,
    e64: torch.Tensor,
    ek: torch.Tensor,
    causal: bool | Visible,
    lifted: bool = False,
) -> torch.Tensor | None:
    """The largest key shift a kernel may take over every feature and key of the sequence,
    ``[B, 1, 1]``, from the keys' :func:`favor_exponents` ``(t, e64, ek)``: their largest
    exponent as the kernel computes it (a shift by it: :func:`._rows.sequence_max`, None
    where every row sees every key), or with ``lifted`` (``t`` lifted by :func:`_lift`,
    Performer's ``amax(data_dash)``, above the largest exponent) whether the rows see
    every key or not."""
    from attnprec.analysis.bounds._rows import sequence_max

    def computed_keys() -> torch.Tensor:
        return _computed_keys(t, e64, ek)

    if not lifted:
        return sequence_max(causal, computed_keys)
    vis = causal if isinstance(causal, Visible) else Visible(bool(causal))
    top = computed_keys()
    if vis.key_mask is not None:  # (padding keys: no kernel's shift)
        top = top.masked_fill(~vis.key_mask.unsqueeze(-1), -math.inf)
    return top.amax(-2, keepdim=True)


def favor_rounding_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any,
    sc: float,
    causal: bool,
    lam: float,
    W: torch.Tensor,
    terms: tuple[tuple[float, float], ...] = ((1.0, 1.0),),
    rows: torch.Tensor | None = None,
    lifted: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`favor_rounding`'s sound bound from per-feature key states
    (:func:`._expprod.expprod_state`, ``evaluation="state"``): ``O((n + rows) m d_v)``
    time for ``m`` features, the same model with separable per-term factors (the key shift
    over every feature); never below the pair evaluation with its factors evaluated
    exactly; ``"typical"`` the probabilistic level at ``lam`` (likewise never below the
    pair evaluation's)."""
    from attnprec.analysis.bounds._expprod import Exponents, expprod_state
    from attnprec.analysis.bounds.softmax import Loaded

    W = W.to(torch.float64)
    ld = Loaded(precision)
    qr = q if rows is None else q[:, rows]  # the rows evaluated (expprod_state)
    X, xe, eX = favor_exponents(qr, W, sc, terms, False, precision)
    Y, ye, eY = favor_exponents(k, W, sc, terms, True, precision)
    m = W.shape[0]
    ex = Exponents(
        X, Y, xe, ye, eX, eY, per_channel=False,
        key_over=ld.over(k).any(-1) | ld.over(v).any(-1),
        y_max=_key_top(Y + _lift(k, sc, terms, m) if lifted else Y, ye, eY, causal, lifted),
        q_lift=_row_lift(qr, sc, terms, m) if lifted else None,
        y_top=_every_key_top(Y, ye, eY, causal),
    )  # fmt: skip
    return expprod_state(
        ex, q, v, precision, causal, lam, rows,
        lambda idx: favor_rounding(q, k, v, precision, sc, causal, lam, W, terms, idx, lifted),
    )  # fmt: skip
