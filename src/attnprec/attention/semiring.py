"""Attention over the linearizable semirings: weights ``rho(s)``, ``s = scale * q.k``.

Every semiring here has ``rho(s) = sum_r c_r exp(lam_r s)`` with ``c_r, lam_r > 0``
(``.terms``), except :class:`Tropical`, the ``tau -> 0`` limit of :class:`SoftMaxPlus`
(the maximum, ties averaged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnprec._validate import check_bool, check_int, resolve_scale
from attnprec.attention._common import (
    DEFAULT_CHUNK,
    check_chunk_size,
    check_state_args,
    prepare,
)
from attnprec.attention._feature import FeatureState
from attnprec.attention.favor import _favor
from attnprec.attention.softmax import causal_mask
from attnprec.attention.taylor import _polynomial

__all__ = [
    "linearized_coefficients",
    "Semiring",
    "LogExpMean",
    "SoftMaxPlus",
    "MixtureLSE",
    "Tropical",
    "semiring_attention",
]


def _positive(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    f = float(x)
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
    return f


class Semiring:
    """Base of the semirings: ``rho(s) = sum_r c_r exp(lam_r s)`` over :attr:`terms`."""

    @property
    def terms(self) -> tuple[tuple[float, float], ...]:
        """``((c_r, lam_r), ...)``, all positive; ``()`` for :class:`Tropical`."""
        raise NotImplementedError

    def rho(self, s: torch.Tensor) -> torch.Tensor:
        """``rho(s)`` elementwise (may overflow; the attention works shifted)."""
        return sum((c * torch.exp(lam * s) for c, lam in self.terms), start=torch.zeros_like(s))


@dataclass(frozen=True)
class LogExpMean(Semiring):
    """Log-exp-mean with power ``p > 0``: ``rho(s) = exp(p s)``."""

    p: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _positive("p", self.p))

    @property
    def terms(self) -> tuple[tuple[float, float], ...]:
        return ((1.0, self.p),)


@dataclass(frozen=True)
class SoftMaxPlus(Semiring):
    """Soft max-plus with temperature ``tau > 0``: ``rho(s) = exp(s / tau)``."""

    tau: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", _positive("tau", self.tau))

    @property
    def terms(self) -> tuple[tuple[float, float], ...]:
        return ((1.0, 1.0 / self.tau),)


@dataclass(frozen=True)
class MixtureLSE(Semiring):
    """Mixture of exponentials: ``rho(s) = sum_r c_r exp(lam_r s)``, ``c_r, lam_r > 0``."""

    c: tuple[float, ...]
    lam: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("c", "lam"):
            val = getattr(self, name)
            if not isinstance(val, Sequence) or isinstance(val, str):
                raise TypeError(f"{name}: expected a sequence of numbers, got {val!r}")
            object.__setattr__(self, name, tuple(_positive(name, x) for x in val))
        if len(self.c) != len(self.lam) or not self.c:
            raise ValueError(
                f"lam: expected as many entries as c (at least one), got {len(self.lam)} "
                f"and {len(self.c)}"
            )

    @property
    def terms(self) -> tuple[tuple[float, float], ...]:
        return tuple(zip(self.c, self.lam, strict=True))


@dataclass(frozen=True)
class Tropical(Semiring):
    """The tropical (max-plus) limit: all weight on the largest logit, ties averaged."""

    @property
    def terms(self) -> tuple[tuple[float, float], ...]:
        return ()

    def rho(self, s: torch.Tensor) -> torch.Tensor:
        raise ValueError("semiring: Tropical has no weight function rho; it is the max")


def _check_linearize(linearize: object) -> tuple[str, int] | None:
    if linearize is None:
        return None
    if not (isinstance(linearize, tuple) and len(linearize) == 2):
        raise TypeError(
            "linearize: expected None, ('taylor', degree) or ('favor', num_features), "
            f"got {linearize!r}"
        )
    kind, n = linearize
    if kind == "taylor":
        return kind, check_int("linearize", n, 0)
    if kind == "favor":
        return kind, check_int("linearize", n, 1)
    raise ValueError(f"linearize: expected 'taylor' or 'favor', got {kind!r}")


def linearized_coefficients(params: dict) -> tuple[tuple[float, ...], float]:
    """The weights' polynomial of a Taylor-linearized semiring (keywords ``semiring``,
    ``linearize=("taylor", P)``): ``c_p = sum_r c_r lam_r^p / p!``, and the relative
    error of its float64 evaluation against the exact coefficients."""
    semiring = params.get("semiring")
    if not isinstance(semiring, Semiring):
        raise TypeError(f"semiring: expected a Semiring, got {type(semiring).__name__}")
    lin = _check_linearize(params.get("linearize"))
    if lin is None or lin[0] != "taylor":
        raise ValueError(f"linearize: expected ('taylor', P), got {params.get('linearize')!r}")
    terms, deg = semiring.terms, lin[1]
    c = tuple(sum(a * lam**p for a, lam in terms) / math.factorial(p) for p in range(deg + 1))
    return c, (deg + len(terms) + 4) * 2.0**-52


def _exact(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, semiring: Semiring, causal: bool, s: float
) -> torch.Tensor:
    logits = (q * s) @ k.transpose(-1, -2)
    if q.shape[-2] == 0:  # no row: an empty product (amax refuses the empty dim)
        return logits @ v
    mask = causal_mask(q.shape[-2], q.device) if causal else None
    if isinstance(semiring, Tropical):
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        top = logits == logits.amax(-1, keepdim=True)
        w = top.to(v.dtype)
        # A NaN logit makes its row NaN (the maximum of a NaN row is NaN, matching none).
        w = torch.where(torch.isnan(logits).any(-1, keepdim=True), float("nan"), w)
    else:
        # log of each term, shifted by the row maximum over keys and terms.
        lt = torch.stack([math.log(c) + lam * logits for c, lam in semiring.terms])
        if mask is not None:
            lt = lt.masked_fill(~mask, float("-inf"))
        w = torch.exp(lt - lt.amax(dim=(0, -1), keepdim=True)).sum(0)
    return (w @ v) / w.sum(-1, keepdim=True)


def semiring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    semiring: Semiring,
    linearize: tuple[str, int] | None = None,
    causal: bool = False,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    projection: torch.Tensor | None = None,
    orthogonal: bool = True,
    allow_nonpositive: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    state: FeatureState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
    """Semiring attention ``y_i = sum_j rho(s_ij) v_j / sum_j rho(s_ij)``, exact or linearized.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    semiring : Semiring
        :class:`LogExpMean`, :class:`SoftMaxPlus`, :class:`MixtureLSE` or :class:`Tropical`.
    linearize : None, ("taylor", P) or ("favor", m)
        ``None``: the exact form, quadratic in n (shifted by the row maximum, so large
        logits do not overflow; Tropical averages the tied maxima exactly), no recurrent
        form. ``("taylor", P)``: every ``exp(lam_r s)`` replaced by its degree-P Taylor
        polynomial, i.e. :func:`attnprec.attention.polynomial_attention` with
        ``c_p = sum_r c_r lam_r^p / p!`` (odd P can give a normalizer ``<= 0``: that
        raises ``ValueError`` naming ``linearize`` unless ``allow_nonpositive``).
        ``("favor", m)``: each term by FAVOR+ with scale ``lam_r * scale`` and ``m``
        features (one projection shared by the terms, ``c_r`` on the key side), ``R m``
        features in all; ``generator``, ``projection`` and ``orthogonal`` as in
        :func:`attnprec.attention.favor_attention`. Tropical cannot be linearized.
    causal : bool
        Key ``j`` attends only to queries ``i >= j`` (requires ``n_q == n_k``).
    scale : float, optional
        Defaults to ``1/sqrt(d_k)`` (``>= 0`` for FAVOR+).
    chunk_size, state, return_state
        Linearized forms only; as in :func:`attnprec.attention.polynomial_attention`.

    Returns
    -------
    torch.Tensor or (torch.Tensor, FeatureState)
        ``[..., n_q, d_v]`` in q's dtype, and the state if requested.

    Notes
    -----
    Error: the exact form has the bound of :func:`attnprec.attention.softmax_attention`
    with the logits ``log c_r + lam_r s_ij`` (their error grows by the factor ``lam_r``
    and one rounding each, and one more for the sum over terms); Tropical is exact
    (selection and an average: ``gamma_{n_k}`` relative to ``sum |v_j|`` over the ties,
    plus one division) whenever the tied logits are computed exactly, e.g. integer
    inputs. The linearized forms have the bounds of polynomial and FAVOR+ attention.
    """
    if not isinstance(semiring, Semiring):
        raise TypeError(f"semiring: expected a Semiring, got {type(semiring).__name__}")
    lin = _check_linearize(linearize)
    check_state_args(causal, state, return_state)
    # Checked whatever the form, so a typo is an error even where the flag is not read.
    check_bool("orthogonal", orthogonal)
    check_bool("allow_nonpositive", allow_nonpositive)
    check_chunk_size(chunk_size)
    if lin is None and (state is not None or return_state):
        raise ValueError("linearize: the exact semiring form has no recurrent state; linearize it")
    if lin is not None and isinstance(semiring, Tropical):
        raise ValueError("linearize: Tropical (the max) has no Taylor or random-feature form")
    if lin is None:
        q, k, v, out_dtype = prepare(q, k, v, causal)
        s = resolve_scale(scale, q.shape[-1])
        return _exact(q, k, v, semiring, causal, s).to(out_dtype)
    kind, n = lin
    terms = semiring.terms
    if kind == "taylor":
        coeffs = tuple(
            sum(c * lam**p for c, lam in terms) / math.factorial(p) for p in range(n + 1)
        )
        return _polynomial(
            "semiring-taylor",
            q,
            k,
            v,
            coeffs,
            causal=causal,
            scale=scale,
            allow_nonpositive=allow_nonpositive,
            chunk_size=chunk_size,
            state=state,
            return_state=return_state,
            name="linearize",
            reason=f"odd Taylor degree {n}: the polynomial is negative for large negative logits",
        )
    return _favor(
        "semiring-favor",
        q,
        k,
        v,
        terms,
        num_features=n,
        projection=projection,
        orthogonal=orthogonal,
        generator=generator,
        causal=causal,
        scale=scale,
        allow_nonpositive=allow_nonpositive,
        chunk_size=chunk_size,
        state=state,
        return_state=return_state,
        name="linearize",
    )
