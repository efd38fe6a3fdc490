"""Symmetry-aware Taylor attention and polynomial attention.

``(q.k)^p`` is computed from the packed monomials of the symmetric tensor power: over the
multi-indices ``|alpha| = p`` (sorted index tuples ``i_1 <= ... <= i_p`` in lexicographic
order, the upper hyper-triangle of ``q^{(x) p}``), ``(q.k)^p = sum_alpha (p!/alpha!) q^alpha
k^alpha`` with ``C(d+p-1, p)`` features instead of ``d^p``.

``form="scores"`` computes the same weights from the scores instead: ``s = scale q.k``,
the polynomial by Horner, then ``w V / sum w`` (quadratic cost, no state); its rounding
model is the score form's (docs/bounds/taylor.md, "Rounding of the score form").
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch

from attnprec._validate import check_finite, check_float, check_int, resolve_scale
from attnprec.attention._common import (
    DEFAULT_CHUNK,
    check_chunk_size,
    check_state_args,
    empty_result,
    guard_normalizer,
    lower_mask,
    prepare,
)
from attnprec.attention._feature import FeatureState, KeyMap, QueryMap, run_features

__all__ = [
    "POLYNOMIAL_FORMS",
    "taylor_coefficients",
    "polynomial_coefficients",
    "taylor_features",
    "taylor_multinomials",
    "taylor_attention",
    "polynomial_attention",
]


#: How the weights are computed (the how-keyword ``form``): ``"features"``, the packed
#: monomial features with a state (linear time); ``"scores"``, the polynomial of each score
#: ``scale q.k`` (quadratic time). The bound takes the same keyword (each has its model).
POLYNOMIAL_FORMS = ("features", "scores")


def check_form(form: object) -> str:
    """``form`` if it is one of :data:`POLYNOMIAL_FORMS`, else ``ValueError`` naming it."""
    if form not in POLYNOMIAL_FORMS:
        raise ValueError(f"form: expected one of {POLYNOMIAL_FORMS}, got {form!r}")
    return str(form)


@functools.lru_cache(maxsize=64)
def monomial_tables(d: int, p: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """The packed degree-``p`` monomials (``p >= 1``) of ``d`` variables, in
    lexicographic order of their nondecreasing index tuples: each one's parent (its first
    ``p - 1`` indices) among those of degree ``p - 1``, its last index, and its multinomial
    ``p! / alpha!`` (exact integers). Built from ``C(d + p - 1, p)`` tuples, never from
    ``d^p`` (a review: the bounds' own tables took ``torch.combinations``, ``d^p`` rows,
    and codes ``d^(p-1)`` past int64 at degree 33 in 4 channels)."""
    prev = {t: i for i, t in enumerate(itertools.combinations_with_replacement(range(d), p - 1))}
    parent, last, mult = [], [], []
    for t in itertools.combinations_with_replacement(range(d), p):
        parent.append(prev[t[:-1]])
        last.append(t[-1])
        denom = 1
        for _, run in itertools.groupby(t):
            denom *= math.factorial(len(list(run)))
        mult.append(math.factorial(p) // denom)
    return torch.tensor(parent), torch.tensor(last), tuple(mult)


def taylor_multinomials(d: int, p: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The multinomial weights ``p!/alpha!`` of the packed degree-``p`` monomials.

    Parameters
    ----------
    d : int
        Dimension (``>= 1``).
    p : int
        Power (``0 <= p <= MAX_DEGREE``, 170).
    dtype : torch.dtype
        Returned dtype.

    Returns
    -------
    torch.Tensor
        ``[C(d+p-1, p)]``, in the order of :func:`taylor_features`. Exact integers (in
        float64 exact while ``p! < 2^53``, i.e. ``p <= 18``).
    """
    d = check_int("d", d, 1)
    p = check_degree(p, "p")
    if p == 0:
        return torch.ones(1, dtype=dtype)
    return torch.tensor(monomial_tables(d, p)[2], dtype=dtype)


def taylor_features(x: torch.Tensor, p: int) -> torch.Tensor:
    """The packed degree-``p`` monomials ``x^alpha`` of the rows of ``x``.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., d]`` real floating tensor, ``d >= 1``.
    p : int
        Power (``0 <= p <= MAX_DEGREE``, 170).

    Returns
    -------
    torch.Tensor
        ``[..., C(d+p-1, p)]``: ``prod_{l} x_{i_l}`` over the sorted index tuples
        ``i_1 <= ... <= i_p`` in lexicographic order; with :func:`taylor_multinomials`
        ``w``, ``(x.y)^p = sum(w * taylor_features(x, p) * taylor_features(y, p))``.

    Notes
    -----
    Error: each monomial is a product of ``p`` factors built left to right, so its relative
    error is at most ``gamma_{p-1} = (p-1)u / (1 - (p-1)u)`` (u the unit roundoff of x's
    dtype), barring overflow/underflow.
    """
    check_float("x", x)
    p = check_degree(p, "p")
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., d], got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"x: expected d >= 1 features, got shape {tuple(x.shape)}")
    return _monomials(x, p)[-1]


def _monomials(x: torch.Tensor, top: int) -> list[torch.Tensor]:
    """The packed monomials of every power ``0..top``."""
    d = x.shape[-1]
    levels = [torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)]
    for p in range(1, top + 1):
        parent, last, _ = monomial_tables(d, p)
        levels.append(levels[-1][..., parent.to(x.device)] * x[..., last.to(x.device)])
    return levels


def _check_coeffs(coeffs: object) -> tuple[float, ...]:
    if isinstance(coeffs, torch.Tensor):
        check_float("coeffs", coeffs)
        if coeffs.dim() != 1:
            raise ValueError(f"coeffs: expected a 1-D sequence, got shape {tuple(coeffs.shape)}")
        check_finite("coeffs", coeffs)
        values = tuple(float(c) for c in coeffs)
    elif isinstance(coeffs, Sequence) and not isinstance(coeffs, str):
        for c in coeffs:
            if isinstance(c, bool) or not isinstance(c, (int, float)):
                raise TypeError(f"coeffs: expected real numbers, got {type(c).__name__}")
        values = tuple(float(c) for c in coeffs)
        if not all(math.isfinite(c) for c in values):
            raise ValueError("coeffs: expected finite values, found NaN or inf")
    else:
        raise TypeError(f"coeffs: expected a sequence of numbers, got {type(coeffs).__name__}")
    if not values:
        raise ValueError("coeffs: expected at least one coefficient")
    if not any(values):  # every weight 0: every output 0/0, no attention at all
        raise ValueError("coeffs: expected a nonzero coefficient, got all zeros")
    return values


def feature_count(d: int, coeffs: Sequence[float]) -> int:
    """Features used for ``coeffs`` in dimension ``d`` (powers with ``c_p = 0`` are skipped)."""
    return sum(math.comb(d + p - 1, p) for p, c in enumerate(coeffs) if c != 0)


def _maps(coeffs: tuple[float, ...], scale: float) -> tuple[QueryMap, KeyMap, list[int]]:
    """Query map ``[c_p (p!/alpha!) (scale q)^alpha]_p`` and key map ``[k^alpha]_p``."""
    powers = [p for p, c in enumerate(coeffs) if c != 0]
    top = max(powers, default=0)

    def qmap(x: torch.Tensor) -> torch.Tensor:
        levels = _monomials(scale * x, top)
        d = x.shape[-1]
        w = [coeffs[p] * taylor_multinomials(d, p, dtype=x.dtype).to(x.device) for p in powers]
        return torch.cat([levels[p] * wp for p, wp in zip(powers, w, strict=True)], dim=-1)

    def kmap(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        levels = _monomials(x, top)
        return torch.cat([levels[p] for p in powers], dim=-1), None

    return qmap, kmap, powers


def _polynomial(
    tag: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeffs: tuple[float, ...],
    *,
    causal: bool,
    scale: float | None,
    allow_nonpositive: bool,
    chunk_size: int,
    state: FeatureState | None,
    return_state: bool,
    name: str,
    reason: str,
    form: str = "features",
) -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
    check_state_args(causal, state, return_state)
    form = check_form(form)
    q, k, v, out_dtype = prepare(q, k, v, causal)
    s = resolve_scale(scale, q.shape[-1])
    chunk_size = check_chunk_size(chunk_size)
    if not any(c != 0 for c in coeffs):
        raise ValueError(f"{name}: every coefficient is zero, so every weight is zero")
    if form == "scores":
        if state is not None or return_state:
            raise ValueError('form: "scores" keeps no state; use form="features" for state=')
        y = _scores(q, k, v, coeffs, s, causal, chunk_size, name, reason, allow_nonpositive)
        return y.to(out_dtype)
    qmap, kmap, _ = _maps(coeffs, s)
    return run_features(
        tag,
        qmap,
        kmap,
        q,
        k,
        v,
        causal=causal,
        chunk_size=chunk_size,
        state=state,
        name=name,
        reason=reason,
        allow_nonpositive=allow_nonpositive,
        out_dtype=out_dtype,
        return_state=return_state,
    )


def _scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeffs: tuple[float, ...],
    s: float,
    causal: bool,
    chunk: int,
    name: str,
    reason: str,
    allow_nonpositive: bool,
) -> torch.Tensor:
    """The score form: per block of ``chunk`` query rows, ``w = poly(s q.k)`` by Horner
    (hidden keys 0), ``y = w V / sum w``; memory ``O(chunk * n_k)``."""
    if q.shape[-2] == 0:
        return empty_result(q, k, v, q.dtype, None, False)  # type: ignore[return-value]
    n_k = k.shape[-2]
    mask = lower_mask(n_k, device=q.device) if causal else None
    out = []
    for t0 in range(0, q.shape[-2], chunk):
        x = (s * q[..., t0 : t0 + chunk, :]) @ k.transpose(-1, -2)
        w = torch.full_like(x, coeffs[-1])
        for c in reversed(coeffs[:-1]):
            w = w * x + c
        if mask is not None:
            w = torch.where(mask[t0 : t0 + chunk], w, 0.0)
        den = w.sum(-1, keepdim=True)
        guard_normalizer(den, name, reason, allow_nonpositive)
        out.append((w @ v) / den)
    return torch.cat(out, dim=-2)


def polynomial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeffs: Sequence[float] | torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    allow_nonpositive: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    state: FeatureState | None = None,
    return_state: bool = False,
    form: str = "features",
) -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
    r"""Attention with weights ``w_ij = sum_p c_p s_ij^p``, ``s_ij = scale * q_i . k_j``.

    Computed in linear time from the packed symmetric-power features
    (:func:`taylor_features`), powers with ``c_p = 0`` skipped:
    ``F = sum_{p: c_p != 0} C(d_k+p-1, p)`` features; or, with ``form="scores"``, from
    the scores (quadratic time).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    coeffs : sequence of float or 1-D tensor
        ``c_0, ..., c_P``, finite, not all zero.
    causal : bool
        Key ``j`` attends only to queries ``i >= j`` (requires ``n_q == n_k``).
    scale : float, optional
        Defaults to ``1/sqrt(d_k)``.
    allow_nonpositive : bool
        A normalizer ``sum_j w_ij <= 0`` raises ``ValueError`` (naming ``coeffs``) unless
        this is set; then the raw quotient (inf, NaN or sign-flipped) is returned.
    chunk_size : int
        Tokens per chunk; memory ``O(chunk_size * F + F * d_v)``. Only the rounding
        depends on it.
    state : FeatureState, optional
        Causal only: the state returned for the preceding tokens; the output continues
        the sequence. One token per call is the recurrent form (O(F d_v) per token).
    return_state : bool
        Causal only: also return the state after the last key.
    form : {"features", "scores"}
        How the weights are computed (a how-keyword: the exact output is the same).
        ``"features"``: the features and a state, as above. ``"scores"``: ``s = scale
        q.k``, the polynomial by Horner, ``w V / sum w`` over ``chunk_size`` query rows at a
        time (memory ``O(chunk_size * n_k)``; no ``state``). The bound takes the same
        keyword: ``attention_error_bound(..., form="scores")`` is the score form's model.

    Returns
    -------
    torch.Tensor or (torch.Tensor, FeatureState)
        ``[..., n_q, d_v]`` in q's dtype, and the state if requested.

    Notes
    -----
    Error (compute dtype with unit roundoff u, no overflow/underflow): with
    ``phi_f(q_i) psi_f(k_j)`` the feature products (``sum_f = w_ij``), each is computed with
    relative error at most ``gamma_{3P+2}`` (P the top power: p roundings of ``scale*q``,
    ``2(p-1)`` in the monomials, one for ``c_p p!/alpha!`` and one for the product), so with
    ``K = 3P + F + n_k + 5``, ``N^abs_i = sum_{j,f} |phi_f psi_f| |v_j|`` and
    ``D^abs_i = sum_{j,f} |phi_f psi_f|`` (j <= i when causal),
    ``|y~_i - y_i| <= (gamma_K N^abs_i + |y_i| gamma_K D^abs_i) / (D_i - gamma_K D^abs_i)
    + u |y~_i|`` whenever the denominator is positive. Half-precision outputs add their
    own store rounding.
    """
    c = _check_coeffs(coeffs)
    return _polynomial(
        "polynomial",
        q,
        k,
        v,
        c,
        causal=causal,
        scale=scale,
        allow_nonpositive=allow_nonpositive,
        chunk_size=chunk_size,
        state=state,
        return_state=return_state,
        name="coeffs",
        reason="the polynomial takes values <= 0 on these logits",
        form=form,
    )


#: The highest Taylor degree: ``1/P!`` is a normal float64 up to P = 170 (171! overflows).
MAX_DEGREE = 170


def check_degree(degree: object, name: str = "degree") -> int:
    """``degree`` as an int in ``[0, MAX_DEGREE]``, else an error naming ``name``."""
    p = check_int(name, degree, 0)
    if p > MAX_DEGREE:
        raise ValueError(f"{name}: expected at most {MAX_DEGREE} (1/P! in float64), got {p}")
    return p


def taylor_coeffs(degree: int) -> tuple[float, ...]:
    """``1/p!`` for ``p = 0..degree``, the Taylor coefficients of ``exp``."""
    return tuple(1.0 / math.factorial(p) for p in range(check_degree(degree) + 1))


def taylor_coefficients(params: dict) -> tuple[tuple[float, ...], float]:
    """The weights' polynomial of ``taylor`` with keywords ``params`` (``degree``, default
    2), and the relative error of the float64 ``1/p!`` against the exact ones (u64)."""
    return taylor_coeffs(check_degree(params.get("degree", 2))), 2.0**-53


def polynomial_coefficients(params: dict) -> tuple[tuple[float, ...], float]:
    """The weights' polynomial of ``polynomial`` (its ``coeffs``, exact as given)."""
    if params.get("coeffs") is None:
        raise ValueError("coeffs: required for method 'polynomial'")
    return _check_coeffs(params["coeffs"]), 0.0


def taylor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    degree: int = 2,
    causal: bool = False,
    scale: float | None = None,
    allow_nonpositive: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    state: FeatureState | None = None,
    return_state: bool = False,
    form: str = "features",
) -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
    r"""Taylor attention: ``exp(s)`` replaced by ``sum_{p <= P} s^p / p!``, ``P = degree``.

    :func:`polynomial_attention` with ``c_p = 1/p!``: ``C(d_k + P, P)`` features.

    Parameters
    ----------
    q, k, v, causal, scale, chunk_size, state, return_state, form
        As in :func:`polynomial_attention`.
    degree : int
        The highest power ``P >= 0`` (``P + 1`` Taylor terms).
    allow_nonpositive : bool
        For even ``P`` every weight is positive (``e_P(s) > 0`` for all real ``s``). For odd
        ``P`` a weight is negative for ``s`` below the single real root of ``e_P``
        (``s <= -1`` for ``P = 1``), so a normalizer can vanish or turn negative: that raises
        ``ValueError`` naming ``degree`` unless ``allow_nonpositive=True``, which returns the
        raw quotient.

    Returns
    -------
    torch.Tensor or (torch.Tensor, FeatureState)
        ``[..., n_q, d_v]`` in q's dtype, and the state if requested.

    Notes
    -----
    Error: the bound of :func:`polynomial_attention` with ``P = degree`` (the coefficients
    ``1/p!`` are rounded once, inside the ``gamma_{3P+2}`` per feature product). The
    truncation error against softmax attention is bounded in
    :mod:`attnprec.analysis.bounds`.
    """
    degree = check_degree(degree)
    return _polynomial(
        "taylor",
        q,
        k,
        v,
        taylor_coeffs(degree),
        causal=causal,
        scale=scale,
        allow_nonpositive=allow_nonpositive,
        chunk_size=chunk_size,
        state=state,
        return_state=return_state,
        name="degree",
        reason=f"odd degree={degree}: the Taylor polynomial is negative for large negative logits",
        form=form,
    )
