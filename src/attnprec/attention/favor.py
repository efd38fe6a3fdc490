"""FAVOR+ (Choromanski et al. 2021): positive random features, unbiased for ``exp(q.k)``.

``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)``, ``x' = sqrt(scale) x``, ``W [m, d]`` with rows
``w_r ~ N(0, I_d)`` marginally, so ``E[phi(q) . phi(k)] = exp(scale * q . k)``.
"""

from __future__ import annotations

import math

import torch

from attnprec._validate import (
    MAX_SIZE,
    check_bool,
    check_finite,
    check_float,
    check_int,
    resolve_scale,
)
from attnprec.attention._common import (
    DEFAULT_CHUNK,
    check_chunk_size,
    check_state_args,
    prepare,
)
from attnprec.attention._feature import FeatureState, KeyMap, QueryMap, run_features

__all__ = ["favor_projection", "favor_features", "favor_attention"]

#: Features when neither ``num_features`` nor ``projection`` is given (as in the Performer).
DEFAULT_FEATURES = 256


def favor_projection(
    num_features: int,
    d_k: int,
    *,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Draw a FAVOR+ projection ``W [num_features, d_k]`` whose rows are N(0, I) marginally.

    Parameters
    ----------
    num_features : int
        ``1 <= m <= 2**31 - 1`` (``MAX_SIZE``; memory may allow fewer).
    d_k : int
        ``1 <= d_k <= 2**31 - 1``.
    orthogonal : bool
        Orthogonal random features: rows orthogonal within each block of ``d_k`` (Haar
        orthogonal matrices, from QR with the sign of R's diagonal fixed), each row
        rescaled by an independent chi(d_k) norm, so every row is still N(0, I) and the
        estimator stays unbiased with lower variance. ``False``: i.i.d. Gaussian rows.
    generator : torch.Generator, optional
        Seeded generator for reproducible draws (the global RNG otherwise).
    dtype : torch.dtype
        Returned dtype (drawn in float64, rounded once).

    Returns
    -------
    torch.Tensor
        ``[num_features, d_k]``.
    """
    m = check_int("num_features", num_features, 1, MAX_SIZE)
    d = check_int("d_k", d_k, 1, MAX_SIZE)
    g = generator
    if not check_bool("orthogonal", orthogonal):
        return torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    nb = -(-m // d)
    qmat, r = torch.linalg.qr(torch.randn(nb, d, d, generator=g, dtype=torch.float64))
    # Haar: fix the signs QR leaves arbitrary (column j times sign(R_jj)).
    qmat = qmat * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)
    blocks = qmat.transpose(-1, -2).reshape(nb * d, d)
    norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (blocks[:m] * norms).to(dtype)


def _check_projection(projection: object, d_k: int) -> torch.Tensor:
    w = check_float("projection", projection)
    if w.dim() != 2 or w.shape[1] != d_k or w.shape[0] < 1:
        raise ValueError(f"projection: expected shape [m, d_k={d_k}], got {tuple(w.shape)}")
    check_finite("projection", w)
    return w


def _check_scale(scale: float | None, d_k: int) -> float:
    s = resolve_scale(scale, d_k)
    if s < 0:
        raise ValueError(f"scale: FAVOR+ features need scale >= 0 (sqrt(scale) x), got {s}")
    return s


def favor_log_features(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """``log phi(x) = W x' - |x'|^2/2 - log(m)/2`` (no overflow, unlike ``phi``)."""
    xs = math.sqrt(scale) * x
    return xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True) - 0.5 * math.log(w.shape[0])


def favor_features(x: torch.Tensor, W: torch.Tensor, scale: float) -> torch.Tensor:
    """The FAVOR+ positive random features ``exp(W x' - |x'|^2/2) / sqrt(m)``.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., d]`` real floating tensor.
    W : torch.Tensor
        ``[m, d]`` projection (:func:`favor_projection`), cast to x's dtype.
    scale : float
        ``>= 0``; ``x' = sqrt(scale) x`` so that ``E[phi(q).phi(k)] = exp(scale q.k)``.

    Returns
    -------
    torch.Tensor
        ``[..., m]``; may overflow or underflow for large ``|x'|`` (the attention uses the
        log features with a per-row shift instead).

    Notes
    -----
    Error: the exponent ``t`` is computed with absolute error at most
    ``gamma_{d+3} (sum_c |w_c x'_c| + |x'|^2/2 + log(m)/2)`` (one rounding of ``x'``, a
    length-d dot product, the subtractions), so the features have relative error at most
    ``exp(that) - 1`` plus the error of ``exp`` itself.
    """
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., d], got a scalar")
    w = _check_projection(W, x.shape[-1]).to(device=x.device, dtype=x.dtype)
    return torch.exp(favor_log_features(x, w, _check_scale(scale, x.shape[-1])))


def favor_maps(
    w: torch.Tensor, terms: tuple[tuple[float, float], ...], scale: float
) -> tuple[QueryMap, KeyMap]:
    """Query and key maps for ``sum_r c_r exp(lam_r scale q.k)``, each term by FAVOR+.

    Features of the terms are concatenated (``R m`` of them) and share ``w``; ``c_r`` goes
    to the key side as ``log c_r``. Query rows are shifted by their maximum (a per-row
    factor cancels in the quotient); key rows return their maximum as the log-scale.
    """

    def logs(x: torch.Tensor, key: bool) -> torch.Tensor:
        parts = []
        for c, lam in terms:
            lf = favor_log_features(x, w, lam * scale)
            parts.append(lf + math.log(c) if key else lf)
        return torch.cat(parts, dim=-1)

    def qmap(x: torch.Tensor) -> torch.Tensor:
        lf = logs(x, False)
        return torch.exp(lf - lf.amax(-1, keepdim=True))

    def kmap(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lf = logs(x, True)
        a = lf.amax(-1)
        return torch.exp(lf - a.unsqueeze(-1)), a

    return qmap, kmap


def resolve_projection(
    num_features: int | None,
    projection: torch.Tensor | None,
    d_k: int,
    orthogonal: bool,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The given ``projection`` (checked against ``num_features``) or a fresh draw (from
    ``generator``, on its device), as ``dtype`` on ``device``."""
    if projection is None:
        m = DEFAULT_FEATURES if num_features is None else num_features
        w = favor_projection(m, d_k, orthogonal=orthogonal, generator=generator, dtype=dtype)
        return w.to(device)
    w = _check_projection(projection, d_k)
    if num_features is not None:
        m = check_int("num_features", num_features, 1, MAX_SIZE)
        if m != w.shape[0]:
            raise ValueError(f"projection: has {w.shape[0]} rows, but num_features={m}")
    return w.to(device=device, dtype=dtype)


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_features: int | None = None,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    projection: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    allow_nonpositive: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    state: FeatureState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
    """FAVOR+ attention: ``w_ij = phi(q_i) . phi(k_j)`` with :func:`favor_features`.

    An unbiased random-feature estimate of the softmax weights ``exp(scale q_i . k_j)``.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    num_features : int, optional
        ``1 <= m <= 2**31 - 1``; defaults to the rows of ``projection``, else 256.
    orthogonal, generator
        How a projection is drawn when none is given (:func:`favor_projection`).
    projection : torch.Tensor, optional
        ``W [m, d_k]``; pass the same W to ``reference("favor", ..., projection=W)``.
        When carrying a state across calls, pass the same W every call.
    causal : bool
        Key ``j`` attends only to queries ``i >= j`` (requires ``n_q == n_k``).
    scale : float, optional
        ``>= 0``; defaults to ``1/sqrt(d_k)``.
    allow_nonpositive : bool
        The features are positive; a normalizer ``<= 0`` can only come from underflow
        (a query whose features are all below the smallest number relative to its largest)
        and raises ``ValueError`` naming ``num_features`` unless this is set.
    chunk_size, state, return_state
        As in :func:`attnprec.attention.polynomial_attention`. The state holds its sums in
        units of ``exp(shift)``, the running maximum of the key log-features.

    Returns
    -------
    torch.Tensor or (torch.Tensor, FeatureState)
        ``[..., n_q, d_v]`` in q's dtype, and the state if requested.

    Notes
    -----
    Error against the weights ``phi(q_i).phi(k_j)`` of the given W (unit roundoff u): the
    bound of :func:`attnprec.attention.linear_attention` with each feature product carrying
    the relative error of the two exponents (see :func:`favor_features`, plus one rounding
    for each row shift), of two ``exp``, and of the state rescalings ``exp(shift_old -
    shift_new)`` (at most one per chunk in which the running maximum grows). The
    random-feature error against softmax is bounded in :mod:`attnprec.analysis.bounds`.
    """
    return _favor(
        "favor",
        q,
        k,
        v,
        ((1.0, 1.0),),
        num_features=num_features,
        projection=projection,
        orthogonal=orthogonal,
        generator=generator,
        causal=causal,
        scale=scale,
        allow_nonpositive=allow_nonpositive,
        chunk_size=chunk_size,
        state=state,
        return_state=return_state,
        name="num_features",
    )


def _favor(
    tag: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    terms: tuple[tuple[float, float], ...],
    *,
    num_features: int | None,
    projection: torch.Tensor | None,
    orthogonal: bool,
    generator: torch.Generator | None,
    causal: bool,
    scale: float | None,
    allow_nonpositive: bool,
    chunk_size: int,
    state: FeatureState | None,
    return_state: bool,
    name: str,
) -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
    """FAVOR+ attention with the weights ``sum_r c_r exp(lam_r scale q_i . k_j)`` estimated
    (``terms`` the pairs ``(c_r, lam_r)``); ``name`` is the argument an underflowed
    normalizer is blamed on."""
    check_state_args(causal, state, return_state)
    check_bool("orthogonal", orthogonal)
    check_bool("allow_nonpositive", allow_nonpositive)
    q, k, v, out_dtype = prepare(q, k, v, causal)
    d_k = q.shape[-1]
    s = _check_scale(scale, d_k)
    chunk_size = check_chunk_size(chunk_size)
    w = resolve_projection(num_features, projection, d_k, orthogonal, generator, q.dtype, q.device)
    qmap, kmap = favor_maps(w, terms, s)
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
        reason="the positive features underflowed",
        allow_nonpositive=allow_nonpositive,
        out_dtype=out_dtype,
        return_state=return_state,
    )
